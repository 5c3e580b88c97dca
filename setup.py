"""The optional compiled parts of pairlb.

- lb/data/_fastlog.c, the access log's common-case formatter (always tried).
- With ``PAIRLB_MYPYC=1`` (what ``./dev`` sets, in the venv that has mypy and every
  dependency): the proxy's hot path, lb/data/proxy.py and lb/data/headers.py, compiled by
  mypyc into one group (``lb.data._native__mypyc``), and ``lb/data/_native.sha256``, the
  hash of the sources it was built from. lb/__init__.py uses the compiled modules only while
  that hash matches the .py files (an edited source is never shadowed by a stale build) and
  never with ``PAIRLB_PURE_PYTHON=1``.

Everything else is in pyproject.toml. Both parts are optional: without a C compiler (or
without mypy) the install still succeeds and pairlb runs as pure Python (same behaviour,
the same tests).
"""

import hashlib
import os
from pathlib import Path

from setuptools import Extension, setup

ext_modules = [
    Extension(
        "lb.data._fastlog",
        ["lb/data/_fastlog.c"],
        optional=True,
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-parameter"],
    )
]

if os.environ.get("PAIRLB_MYPYC") == "1":
    from mypyc.build import mypycify

    # Keep in sync with lb.COMPILED.
    sources = ["lb/data/headers.py", "lb/data/proxy.py"]
    ext_modules += mypycify(sources, group_name="lb.data._native", opt_level="3")
    digest = hashlib.sha256(b"".join(Path(s).read_bytes() for s in sources)).hexdigest()
    Path("lb/data/_native.sha256").write_text(digest + "\n")

setup(ext_modules=ext_modules)
