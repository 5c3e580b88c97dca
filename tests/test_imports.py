"""Import rules from docs/architecture.md, enforced by walking the AST (not by hope)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = [
    "lb/pool.py",
    "lb/rotation.py",
    "lb/headers.py",
    "healthcheck/state.py",
    "failover/codec.py",
    "failover/machine.py",
]
IMPURE = {"asyncio", "socket", "time", "logging", "selectors", "threading", "subprocess"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            out.add("." * node.level + (node.module or ""))
    return out


def top(name: str) -> str:
    return name.split(".")[0]


def files(pkg: str) -> list[Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize(
    "pkg,forbidden", [("healthcheck", {"lb", "failover"}), ("failover", {"lb", "healthcheck"})]
)
def test_leaf_packages_do_not_import_the_app_or_each_other(pkg: str, forbidden: set[str]) -> None:
    for f in files(pkg):
        bad = {i for i in imports_of(f) if top(i) in forbidden}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_lb_uses_only_public_names_of_the_leaf_packages() -> None:
    for f in files("lb"):
        for i in imports_of(f):
            if top(i) in {"healthcheck", "failover"}:
                assert i in {"healthcheck", "failover"}, f"{f.relative_to(ROOT)} reaches into {i}"


@pytest.mark.parametrize("rel", PURE)
def test_pure_modules_do_no_io(rel: str) -> None:
    path = ROOT / rel
    if not path.exists():
        pytest.skip(f"{rel} not present")
    bad = {i for i in imports_of(path) if top(i) in IMPURE}
    assert not bad, f"{rel} imports {bad}"


def test_pyroute2_only_in_the_vip_adapter() -> None:
    for pkg in ("lb", "healthcheck", "failover"):
        for f in files(pkg):
            if any(top(i) == "pyroute2" for i in imports_of(f)):
                assert f == ROOT / "failover" / "vip.py", f"{f.relative_to(ROOT)} imports pyroute2"


def test_prometheus_client_only_in_metrics_and_admin() -> None:
    allowed = {ROOT / "lb" / "metrics.py", ROOT / "lb" / "admin.py"}
    for pkg in ("lb", "healthcheck", "failover"):
        for f in files(pkg):
            if any(top(i) == "prometheus_client" for i in imports_of(f)):
                assert f in allowed, f"{f.relative_to(ROOT)} imports prometheus_client"
