"""The optional C part of pairlb: lb/data/_fastlog.c, the access log's common-case formatter.

Everything else is in pyproject.toml. ``optional=True``: without a C compiler the install
still succeeds and lb/data/accesslog.py uses its Python formatters (same output).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "lb.data._fastlog",
            ["lb/data/_fastlog.c"],
            optional=True,
            extra_compile_args=["-O2", "-Wall", "-Wno-unused-parameter"],
        )
    ]
)
