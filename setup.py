"""The optional compiled parts of pairlb.

- lb/data/_fastlog.c, the access log's common-case formatter (always tried).
- With ``PAIRLB_MYPYC=1`` (what ``./dev`` sets, in the venv that has mypy and every
  dependency): the proxy's hot path, the modules in ``lb.COMPILED``, compiled by
  mypyc into one group (``lb.data._native__mypyc``). Only after the build succeeded is
  ``lb/data/_native.sha256`` written: the digest of the sources it was built from
  (``lb.source_digest``: every .py under lb/, the Python version), removed when a build
  starts. lb/__init__.py uses the compiled modules only while that digest matches (an
  edited source is never shadowed by a stale or half-done build) and never with
  ``PAIRLB_PURE_PYTHON=1``. ``PAIRLB_MYPYC_OPT`` sets mypyc's C optimisation level
  (default 3; the install tests use 0: the same code, built faster).

A wheel (``PAIRLB_MYPYC=1 pip wheel --no-build-isolation . -w DIR``, in a venv that has
mypy and pairlb's dependencies: mypyc type-checks against them, so pip's isolated build
environment will not do) gets the compiled group and its own ``lb/data/_native.sha256``:
the digest is written into build/lib next to the .py files the wheel ships, so the
installed package checks itself (same .py files, same digest; the interpreter installing
it must be the exact Python version that built it, else it runs pure). The in-place build
(``./dev``: ``build_ext --inplace``) writes the digest next to the sources, as before. A
build for a wheel or an install first clears compiled artefacts an earlier build left in
build/lib, so a pure wheel never ships them.

Everything else is in pyproject.toml. Both parts are optional: without a C compiler (or
without mypy) the install still succeeds and pairlb runs as pure Python (same behaviour,
the same tests).
"""

import importlib.machinery
import os
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
MYPYC = os.environ.get("PAIRLB_MYPYC") == "1"
DIGEST = HERE / "lb" / "data" / "_native.sha256"

sys.path.insert(0, str(HERE))
import lb  # noqa: E402  (lb/__init__.py imports only the standard library)

ext_modules: list[Any] = [
    Extension(
        "lb.data._fastlog",
        ["lb/data/_fastlog.c"],
        optional=True,
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-parameter"],
    )
]


def _clear_compiled(lib: Path) -> None:
    """Remove what a mypyc build puts in a build directory ``lib`` (build/lib: never the
    sources): the digest, each compiled module's extension, the group's library."""
    (lib / "lb" / "data" / DIGEST.name).unlink(missing_ok=True)
    for name in (*lb.COMPILED, lb.GROUP + "__mypyc"):
        base = lib.joinpath(*name.split("."))
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            base.with_name(base.name + suffix).unlink(missing_ok=True)


class BuildExt(build_ext):
    """build_ext that records what a mypyc build was made from, once it has succeeded: next
    to the sources for an in-place build (./dev), in build/lib for a wheel or an install."""

    def run(self) -> None:
        if self.inplace:
            target = DIGEST
        else:
            # The digest must describe the .py files that ship with the .so files: have
            # build_py put them in build/lib first (a no-op when `build` already ran it).
            self.run_command("build_py")
            _clear_compiled(Path(self.build_lib))
            target = Path(self.build_lib) / "lb" / "data" / DIGEST.name
        if not MYPYC:
            super().run()
            return
        target.unlink(missing_ok=True)
        digest = lb.source_digest(str(HERE / "lb"))  # the sources as they are now
        super().run()
        if not self.inplace:
            shipped = lb.source_digest(str(Path(self.build_lib) / "lb"))
            if shipped != digest:
                print(f"setup.py: warning: {self.build_lib}/lb differs from {HERE}/lb (stale "
                      "files in build/?): no _native.sha256, the package will run as pure "
                      "Python; remove build/ and build again", file=sys.stderr)
                return
        tmp = target.with_suffix(".tmp")
        tmp.write_text(digest + "\n")
        tmp.replace(target)


if MYPYC:
    try:
        from mypyc.build import mypycify
    except ImportError:
        sys.exit("setup.py: PAIRLB_MYPYC=1 needs mypy (mypyc) and pairlb's dependencies in "
                 "the build environment: pip install mypy ..., then build with "
                 "pip wheel/install --no-build-isolation")

    ext_modules += mypycify([name.replace(".", "/") + ".py" for name in lb.COMPILED],
                            group_name=lb.GROUP,
                            opt_level=os.environ.get("PAIRLB_MYPYC_OPT", "3"))

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
