"""The namespace library lives in lb.netns (the demo builds its network with it too).

This alias keeps ``import netns`` working in tests: it is the same module object.
"""

import sys

import lb.netns as _impl

sys.modules[__name__] = _impl
