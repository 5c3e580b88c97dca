"""Import rules from docs/architecture.md, enforced by walking the AST (not by hope)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = [
    "lb/data/pool.py",
    "lb/control/rotation.py",
    "lb/data/headers.py",
    "healthcheck/state.py",
    "failover/core/codec.py",
    "failover/core/machine.py",
    "failover/core/frames.py",
    "lb/tls/names.py",
    "lb/tls/sni_peek.py",
    "lb/maglev.py",
    "lb/data/proxyproto.py",
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
    """``from failover import machine`` reaches in as much as ``import failover.core.machine``."""
    for f in files("lb"):
        for i in lb_modules(f):
            if top(i) in {"healthcheck", "failover"}:
                assert i in {"healthcheck", "failover"}, f"{f.relative_to(ROOT)} reaches into {i}"


@pytest.mark.parametrize("rel", PURE)
def test_pure_modules_do_no_io(rel: str) -> None:
    path = ROOT / rel
    if not path.exists():
        pytest.skip(f"{rel} not present")
    bad = {i for i in imports_of(path) if top(i) in IMPURE}
    assert not bad, f"{rel} imports {bad}"


def test_one_netlink_dialect() -> None:
    """The runtime talks rtnetlink through pyroute2 behind failover.adapters.rtnl and never
    shells out to ``ip``; nothing packs rtnetlink by hand (the lab's VIP watch reads pyroute2
    too; the lab still builds its namespaces with the ``ip`` tool, as an operator would)."""
    for pkg in ("lb", "healthcheck", "failover", "lab"):
        for f in files(pkg):
            text = f.read_text()
            assert "NETLINK_ROUTE" not in text, f"{f.relative_to(ROOT)} packs rtnetlink"
            if pkg == "lab":
                continue
            assert '["ip", ' not in text, f"{f.relative_to(ROOT)} runs the ip tool"
            if any(top(i) == "pyroute2" for i in imports_of(f)):
                assert f == ROOT / "failover" / "adapters" / "rtnl.py", (
                    f"{f.relative_to(ROOT)} imports pyroute2")


def test_prometheus_client_only_in_metrics_and_admin() -> None:
    allowed = {ROOT / "lb" / "admin" / "metrics.py", ROOT / "lb" / "admin" / "server.py"}
    for pkg in ("lb", "healthcheck", "failover"):
        for f in files(pkg):
            if any(top(i) == "prometheus_client" for i in imports_of(f)):
                assert f in allowed, f"{f.relative_to(ROOT)} imports prometheus_client"


def _first_party(path: Path) -> set[str]:
    """lb modules (``from lb import x`` counts as lb.x) and third-party packages a file
    imports; failover and the standard library are left out."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [_submodule(node.module, a.name) for a in node.names]
        for i in names:
            if top(i) == "lb":
                out.add(i)
            elif top(i) not in {"failover", "__future__"} and not _stdlib(top(i)):
                out.add(top(i))
    return out


def _submodule(module: str, name: str) -> str:
    """``from lb.x import y``: lb.x.y when y is a module of ours, else lb.x."""
    base = ROOT.joinpath(*module.split("."))
    if (base / f"{name}.py").exists() or (base / name / "__init__.py").exists():
        return f"{module}.{name}"
    return module


def lb_modules(path: Path) -> set[str]:
    """Every module of ours (lb, lab, healthcheck, failover) a file imports, by full name."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.update(_submodule(node.module, a.name) for a in node.names)
    return {m for m in out if top(m) in {"lb", "lab", "healthcheck", "failover"}}


def test_the_runtime_never_imports_the_lab() -> None:
    for pkg in ("lb", "healthcheck", "failover"):
        for f in files(pkg):
            bad = {m for m in lb_modules(f) if top(m) == "lab"}
            assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def _within(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


@pytest.mark.parametrize(
    "room,forbidden",
    [
        # the control process talks to workers over lb.channel; it never loads their engine
        ("lb/control", ("lb.data",)),
        ("lb/admin", ("lb.data",)),
        # a worker knows nothing of the control process, its admin edge or failover
        # (failover itself it may load: lb.config validates track_gateway with it)
        ("lb/data", ("lb.control", "lb.admin", "lb.failoverd")),
        ("lb/failoverd", ("lb.control", "lb.admin", "lb.data", "healthcheck")),
    ],
)
def test_rooms_import_only_what_their_process_runs(room: str, forbidden: tuple[str, ...]) -> None:
    for f in files(room):
        bad = {m for m in lb_modules(f) if any(_within(m, r) for r in forbidden)}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_the_failover_core_knows_no_adapter() -> None:
    """failover/core (role machine, codec, ports) is what the adapters and the controller
    build on, never the other way round."""
    for f in files("failover/core"):
        bad = {m for m in lb_modules(f)
               if _within(m, "failover.adapters") or _within(m, "failover.controller")}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def test_bench_and_tests_share_helpers_through_the_lab_not_each_other() -> None:
    """No bench script reaches into tests/ (sys.path or imports); no test imports bench/
    except the bench smoke tests, which run the scripts as programs."""
    for f in files("bench"):
        text = f.read_text()
        assert '"tests"' not in text and "'tests'" not in text, f"{f.relative_to(ROOT)}"
        bad = {m for m in imports_of(f) if top(m).startswith(("test_", "e2e_", "failover_e2e"))}
        assert not bad, f"{f.relative_to(ROOT)} imports {bad}"


def _stdlib(name: str) -> bool:
    import sys

    return name in sys.stdlib_module_names


def test_the_failover_process_loads_only_failover_and_small_lb_modules() -> None:
    """lb.failoverd.main is the whole failover process: heartbeats, VIP, nothing else. It must
    not pull in the control process's machinery (config models, health checks, aiohttp,
    prometheus_client, the daemon): less to start, nothing of theirs on its loop."""
    allowed = {"lb.channel", "lb.log", "lb.sysutil", "lb.failoverd.link", "lb.__version__"}
    for rel in ("lb/failoverd/main.py", "lb/failoverd/link.py", "lb/channel.py", "lb/log.py",
                "lb/sysutil.py"):
        path = ROOT / rel
        if not path.exists():
            pytest.skip(f"{rel} not present")
        bad = _first_party(path) - allowed
        assert not bad, f"{rel} imports {bad}"
