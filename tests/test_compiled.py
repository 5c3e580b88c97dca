"""The compiled hot path (mypyc: lb/data/proxy.py, lb/data/headers.py) and its pure-Python
twin: which one runs is decided in lb/__init__.py, and both must behave the same.

The rest of the suite runs whatever ./dev built (compiled when a C compiler and mypy are
there); here the proxy's own tests run once more on the pure-Python path, and the rule that
picks the path is checked against stale and missing builds.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lb
import lb.data.headers
import lb.data.proxy

ROOT = Path(__file__).resolve().parents[1]
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def test_the_modules_in_use_are_the_ones_lb_says() -> None:
    for mod in (lb.data.proxy, lb.data.headers):
        assert mod.__file__ is not None
        assert mod.__file__.endswith(".py") != lb.compiled_in_use(), mod.__file__


def test_pure_python_path_passes_the_proxy_tests() -> None:
    """PAIRLB_PURE_PYTHON=1: the .py files run (never the .so beside them) and the proxy's
    tests pass on them, as they do on the compiled build."""
    env = {**os.environ, "PAIRLB_PURE_PYTHON": "1"}
    probe = subprocess.run(
        [sys.executable, "-c", "import lb, lb.data.proxy as p, lb.data.headers as h; "
         "print(lb.compiled_in_use(), p.__file__.endswith('.py'), h.__file__.endswith('.py'))"],
        env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert probe.stdout.split() == ["False", "True", "True"], probe.stderr
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-p", "no:randomly", "tests/test_proxy_http.py",
                        "tests/test_proxy_bad_requests.py", "tests/test_headers.py"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def _fake_build(tmp: Path, digest_of: bytes | None = None) -> Path:
    """A copy of lb/data's compiled sources with .so stand-ins and a build hash."""
    data = tmp / "data"
    data.mkdir()
    h = hashlib.sha256()
    for name in lb.COMPILED:
        base = name.rsplit(".", 1)[1]
        shutil.copy(ROOT / "lb" / "data" / f"{base}.py", data / f"{base}.py")
        (data / f"{base}{SUFFIX}").write_bytes(b"")
        h.update((data / f"{base}.py").read_bytes())
    digest = hashlib.sha256(digest_of).hexdigest() if digest_of is not None else h.hexdigest()
    (data / "_native.sha256").write_text(digest + "\n")
    return data


def test_the_compiled_path_is_used_only_for_the_sources_it_was_built_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAIRLB_PURE_PYTHON", raising=False)
    data = _fake_build(tmp_path)
    monkeypatch.setattr(lb, "_DATA", str(data))
    assert lb._use_pure() is False  # built from these very sources
    monkeypatch.setenv("PAIRLB_PURE_PYTHON", "1")
    assert lb._use_pure() is True  # asked for
    monkeypatch.delenv("PAIRLB_PURE_PYTHON")
    with open(data / "proxy.py", "a") as f:
        f.write("# edited after the build\n")
    assert lb._use_pure() is True  # a stale build never shadows an edited source


@pytest.mark.parametrize("missing", ["hash", "proxy.so", "headers.so"])
def test_an_incomplete_build_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         missing: str) -> None:
    monkeypatch.delenv("PAIRLB_PURE_PYTHON", raising=False)
    data = _fake_build(tmp_path)
    monkeypatch.setattr(lb, "_DATA", str(data))
    victim = {"hash": "_native.sha256", "proxy.so": f"proxy{SUFFIX}",
              "headers.so": f"headers{SUFFIX}"}[missing]
    (data / victim).unlink()
    assert lb._use_pure() is True


def test_a_build_of_other_sources_is_not_used(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAIRLB_PURE_PYTHON", raising=False)
    monkeypatch.setattr(lb, "_DATA", str(_fake_build(tmp_path, digest_of=b"other")))
    assert lb._use_pure() is True
