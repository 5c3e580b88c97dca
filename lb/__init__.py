"""pairlb: the application. The rooms: lb.control (the control process), lb.data (proxy
workers), lb.failoverd (the failover process), lb.admin (its admin edge); shared modules here.

The proxy's hot path may be compiled (setup.py, ``PAIRLB_MYPYC=1``: mypyc builds the
modules in ``COMPILED`` in place, as ``./dev`` does). The compiled modules
are used only when the digest recorded after a successful build matches the sources
(``source_digest``: all of lb/ and the Python version); otherwise, or with
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

COMPILED = ("lb.data.headers", "lb.data.listener", "lb.data.pool", "lb.data.proxy", "lb.stats")
"""The modules mypyc compiles (setup.py builds exactly these)."""

_ROOT = os.path.dirname(os.path.abspath(__file__))
_DATA = os.path.join(_ROOT, "data")
GROUP = "lb.data._native"
"""mypyc's group name for COMPILED (setup.py); its shared library is GROUP + "__mypyc"."""


def _path(fullname: str) -> str:
    """lb.data.proxy -> .../lb/data/proxy (no suffix)."""
    return os.path.join(_ROOT, *fullname.split(".")[1:])


def _source(fullname: str) -> str:
    return _path(fullname) + ".py"


def pure_python_requested() -> bool:
    """``PAIRLB_PURE_PYTHON`` set to anything but "" or "0": no compiled code at all (the
    proxy's hot path and the access log's C formatter)."""
    return os.environ.get("PAIRLB_PURE_PYTHON", "") not in ("", "0")


def source_digest(root: str | None = None) -> str:
    """What a compiled build is valid for: every .py file under lb/ (names and contents;
    mypyc builds other modules' constants and types into the compiled ones) and the exact
    Python version."""
    root = _ROOT if root is None else root
    h = hashlib.sha256(sys.version.encode() + b"\0")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                with open(path, "rb") as f:
                    data = f.read()
                rel = os.path.relpath(path, root).encode()
                h.update(b"%d:%s\0%d\0" % (len(rel), rel, len(data)))
                h.update(data)
    return h.hexdigest()


def compiled_in_use() -> bool:
    """Whether the modules in COMPILED run as mypyc-compiled code."""
    return not _PURE


def _has_extension(fullname: str) -> bool:
    return any(os.path.exists(_path(fullname) + suffix)
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def _use_pure() -> bool:
    if pure_python_requested():
        return True
    if not all(_has_extension(name) for name in COMPILED):
        return True  # never built (or only in part)
    if not _has_extension(GROUP + "__mypyc"):
        return True
    try:
        with open(os.path.join(_DATA, "_native.sha256"), encoding="ascii") as f:
            want = f.read().strip()
        return source_digest() != want  # a source changed since the build: stale
    except OSError:
        return True  # no record of what was built (a build that failed or was cut short)


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
