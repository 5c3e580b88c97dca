"""The optional compiled parts of pairlb.

- lb/data/_fastlog.c, the access log's common-case formatter (always tried).
- With ``PAIRLB_MYPYC=1`` (what ``./dev`` sets, in the venv that has mypy and every
  dependency): the proxy's hot path, lb/data/proxy.py and lb/data/headers.py, compiled by
  mypyc into one group (``lb.data._native__mypyc``). Only after the build succeeded is
  ``lb/data/_native.sha256`` written: the digest of the sources it was built from
  (``lb.source_digest``: every .py under lb/, the Python version), removed when a build
  starts. lb/__init__.py uses the compiled modules only while that digest matches (an
  edited source is never shadowed by a stale or half-done build) and never with
  ``PAIRLB_PURE_PYTHON=1``.

Everything else is in pyproject.toml. Both parts are optional: without a C compiler (or
without mypy) the install still succeeds and pairlb runs as pure Python (same behaviour,
the same tests).
"""

import os
import sys
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
MYPYC = os.environ.get("PAIRLB_MYPYC") == "1"
DIGEST = HERE / "lb" / "data" / "_native.sha256"

ext_modules: list[Any] = [
    Extension(
        "lb.data._fastlog",
        ["lb/data/_fastlog.c"],
        optional=True,
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-parameter"],
    )
]


class BuildExt(build_ext):
    """build_ext that records what a mypyc build was made from, once it has succeeded."""

    def run(self) -> None:
        if not MYPYC:
            super().run()
            return
        import lb

        DIGEST.unlink(missing_ok=True)
        digest = lb.source_digest(str(HERE / "lb"))  # the sources as they are now
        super().run()
        tmp = DIGEST.with_suffix(".tmp")
        tmp.write_text(digest + "\n")
        tmp.replace(DIGEST)


if MYPYC:
    from mypyc.build import mypycify

    sys.path.insert(0, str(HERE))
    import lb  # lb/__init__.py imports only the standard library

    ext_modules += mypycify([name.replace(".", "/") + ".py" for name in lb.COMPILED],
                            group_name=lb.GROUP, opt_level="3")

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
