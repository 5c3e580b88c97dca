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
                        "tests/test_proxy_bad_requests.py", "tests/test_proxy_stream.py",
                        "tests/test_fuzz_proxy_requests.py", "tests/test_redirect_acme.py",
                        "tests/test_headers.py", "tests/test_proxy_passbody.py",
                        "tests/test_pool.py"],
                       env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def _fake_build(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in lb/ tree: the compiled modules' sources and another module, .so
    stand-ins for their extensions and mypyc's group library, and the digest a successful
    build records."""
    monkeypatch.delenv("PAIRLB_PURE_PYTHON", raising=False)
    data = tmp / "data"
    data.mkdir()
    (tmp / "config.py").write_text("LIMIT: int = 1\n")
    for name in lb.COMPILED:
        rel = Path(*name.split(".")[1:])
        shutil.copy(ROOT / "lb" / f"{rel}.py", tmp / f"{rel}.py")
        (tmp / f"{rel}{SUFFIX}").write_bytes(b"")
    (data / f"_native__mypyc{SUFFIX}").write_bytes(b"")
    (data / "_native.sha256").write_text(lb.source_digest(str(tmp)) + "\n")
    monkeypatch.setattr(lb, "_ROOT", str(tmp))
    monkeypatch.setattr(lb, "_DATA", str(data))
    return data


def test_the_compiled_path_is_used_only_for_the_sources_it_was_built_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _fake_build(tmp_path, monkeypatch)
    assert lb._use_pure() is False  # built from these very sources
    for value, pure in (("1", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv("PAIRLB_PURE_PYTHON", value)
        assert lb._use_pure() is pure, value
    monkeypatch.delenv("PAIRLB_PURE_PYTHON")
    with open(data / "proxy.py", "a") as f:
        f.write("# edited after the build\n")
    assert lb._use_pure() is True  # a stale build never shadows an edited source


def test_any_module_of_lb_changed_makes_the_build_stale(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mypyc builds other modules' Final constants and types into the compiled ones: an
    edit anywhere in lb/ (here a module that is not compiled) retires the build; so does
    a moved file or text moved from one file to another."""
    _fake_build(tmp_path, monkeypatch)
    (tmp_path / "config.py").write_text("LIMIT: int = 2\n")
    assert lb._use_pure() is True
    d2 = tmp_path / "two"
    d2.mkdir()
    (d2 / "a.py").write_text("x = 1\ny = 2\n")
    (d2 / "b.py").write_text("")
    before = lb.source_digest(str(d2))
    (d2 / "a.py").write_text("x = 1\n")
    (d2 / "b.py").write_text("y = 2\n")
    assert lb.source_digest(str(d2)) != before


@pytest.mark.parametrize("missing", ["digest", "proxy", "headers", "_native__mypyc"])
def test_an_incomplete_build_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         missing: str) -> None:
    """No digest (a build that failed or was cut short: it is written last), or a missing
    extension: the .py files run, never a crash on import."""
    data = _fake_build(tmp_path, monkeypatch)
    victim = "_native.sha256" if missing == "digest" else f"{missing}{SUFFIX}"
    (data / victim).unlink()
    assert lb._use_pure() is True


def test_a_build_of_other_sources_is_not_used(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data = _fake_build(tmp_path, monkeypatch)
    (data / "_native.sha256").write_text(hashlib.sha256(b"other").hexdigest() + "\n")
    assert lb._use_pure() is True


def test_a_failed_build_leaves_no_digest(tmp_path: Path) -> None:
    """setup.py removes the digest when a mypyc build starts and writes it only after
    build_ext succeeded: a compiler that fails leaves none (so pure Python runs)."""
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    tree = tmp_path / "tree"
    for pkg in ("lb", "healthcheck", "failover"):  # what mypyc's type check follows
        shutil.copytree(ROOT / pkg, tree / pkg, ignore=shutil.ignore_patterns(
            "__pycache__", "*.so", "*.sha256"))
    shutil.copy(ROOT / "setup.py", tree / "setup.py")
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    (tree / "lb" / "data" / "_native.sha256").write_text("0" * 64 + "\n")
    env = {**os.environ, "PAIRLB_MYPYC": "1", "CC": "false"}
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert not (tree / "lb" / "data" / "_native.sha256").exists()
