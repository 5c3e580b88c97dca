"""pairlb: the application. The rooms: lb.control (the control process), lb.data (proxy
workers), lb.failoverd (the failover process), lb.admin (its admin edge); shared modules here.

The proxy's hot path may be compiled (setup.py, ``PAIRLB_MYPYC=1``: mypyc builds
lb/data/proxy.py and lb/data/headers.py in place). The compiled modules are used only when
the hash recorded at build time matches the sources; otherwise, or with
``PAIRLB_PURE_PYTHON=1``, a finder loads the .py files (the same code, interpreted).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

__version__ = "0.1.0"

COMPILED = ("lb.data.headers", "lb.data.proxy")
"""The modules mypyc may compile (setup.py's list, in the same order)."""

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def _source(fullname: str) -> str:
    return os.path.join(_DATA, fullname.rsplit(".", 1)[1] + ".py")


def compiled_in_use() -> bool:
    """Whether lb.data.proxy and lb.data.headers run as mypyc-compiled code."""
    return not _PURE


def _use_pure() -> bool:
    if os.environ.get("PAIRLB_PURE_PYTHON") == "1":
        return True
    try:
        with open(os.path.join(_DATA, "_native.sha256"), encoding="ascii") as f:
            want = f.read().strip()
        h = hashlib.sha256()
        for name in COMPILED:
            with open(_source(name), "rb") as src:
                h.update(src.read())
    except OSError:
        return True  # never built (or no sources to compare): nothing compiled to trust
    if h.hexdigest() != want:
        return True  # a source changed since the build: the .so files are stale
    built = [
        any(os.path.exists(os.path.join(_DATA, name.rsplit(".", 1)[1] + suffix))
            for suffix in importlib.machinery.EXTENSION_SUFFIXES)
        for name in COMPILED
    ]
    return not all(built)


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Loads the compiled modules' .py files, ahead of the .so files next to them."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname in COMPILED:
            return importlib.util.spec_from_file_location(fullname, _source(fullname))
        return None


_PURE = _use_pure()
if _PURE:
    sys.meta_path.insert(0, _SourceFinder())
