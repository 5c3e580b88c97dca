"""The systemd unit and the daemon's side of the systemd contract.

Two halves:
- the unit file itself: `systemd-analyze verify` is clean, `systemd-analyze security` scores
  it at most 2.0, the settings the issue asks for are there, every relaxation is explained,
  and the sysctl drop-in applies (in a throwaway network namespace, never the host's);
- the daemon as systemd sees it: `pairlb run` with $NOTIFY_SOCKET pointing at a socket this
  test owns (tests/test_sdnotify.py's NotifySocket) and real backends; READY, STATUS,
  RELOADING/READY around SIGHUP, STOPPING, and the watchdog, including that WATCHDOG=1 stops
  while the control loop is blocked.

Processes are started in their own session and killed by process group in teardown.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pytest
from test_sdnotify import Notification, NotifySocket, has

from lab import backend_app
from lab.ports import free_port
from lb.config import NodeConfig

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "deploy" / "systemd" / "pairlb.service"
SYSCTL = REPO / "deploy" / "sysctl" / "90-pairlb.conf"
EXAMPLE = REPO / "deploy" / "pairlb.toml"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
MAX_EXPOSURE = 2.0
CAPS = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}


# -- the unit file ---------------------------------------------------------------------------


@dataclass
class Setting:
    section: str
    key: str
    value: str
    comment: str
    """The comment block directly above the setting (lines starting with '#')."""


def parse_unit(text: str) -> list[Setting]:
    """Unit files allow repeated keys (ExecReload=, LoadCredential=): keep every one, in order."""
    out: list[Setting] = []
    section = ""
    comment: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            comment = []
        elif line.startswith(("#", ";")):
            comment.append(line.lstrip("#; "))
        elif line.startswith("["):
            section = line.strip("[]")
            comment = []
        else:
            key, _, value = line.partition("=")
            out.append(Setting(section, key.strip(), value.strip(), "\n".join(comment)))
    return out


@pytest.fixture(scope="module")
def unit() -> list[Setting]:
    return parse_unit(UNIT.read_text())


def values(unit: list[Setting], key: str, section: str = "Service") -> list[str]:
    return [s.value for s in unit if s.key == key and s.section == section]


def one(unit: list[Setting], key: str, section: str = "Service") -> str:
    got = values(unit, key, section)
    assert len(got) == 1, f"{section}.{key}: expected exactly one, got {got}"
    return got[0]


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|min)?", value)
    assert m, value
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "min": 60.0, None: 1.0}[m.group(2)]


def test_unit_is_a_notify_service_with_watchdog_checked_start_and_validated_reload(
    unit: list[Setting],
) -> None:
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert 1.0 <= seconds(one(unit, "WatchdogSec")) <= 60.0
    assert one(unit, "Restart") == "on-failure"
    exe = "/opt/pairlb/bin/pairlb"
    conf = "/etc/pairlb/pairlb.toml"
    stage = f"+{exe} stage-tls -q /etc/pairlb/tls /run/pairlb/tls"
    assert values(unit, "ExecStartPre") == [stage, f"{exe} check-config -q {conf}"]
    assert one(unit, "ExecStart") == f"{exe} run -c {conf}"
    # Order matters: systemd runs ExecReload= lines in sequence and stops at the first
    # failure, so a broken file never reaches the daemon. The TLS files are staged (as root,
    # "+") first, so check-config and the daemon read the same new copies.
    assert values(unit, "ExecReload") == [
        stage,
        f"{exe} check-config -q {conf}",
        "/bin/kill -HUP $MAINPID",
    ]


def test_unit_stops_by_draining_and_gives_the_drain_enough_time(unit: list[Setting]) -> None:
    # mixed: SIGTERM to the control process only (it drains the workers), SIGKILL to all later.
    assert one(unit, "KillMode") == "mixed"
    assert one(unit, "KillSignal") == "SIGTERM"
    drain_s = NodeConfig.model_fields["shutdown_timeout_s"].default
    assert seconds(one(unit, "TimeoutStopSec")) >= drain_s + 5.0
    assert seconds(one(unit, "TimeoutAbortSec")) <= seconds(one(unit, "TimeoutStopSec"))
    assert int(one(unit, "LimitNOFILE")) >= 65536


def test_unit_runs_unprivileged_with_exactly_three_capabilities(unit: list[Setting]) -> None:
    assert one(unit, "DynamicUser") == "yes"
    assert one(unit, "NoNewPrivileges") == "yes"
    assert set(one(unit, "CapabilityBoundingSet").split()) == CAPS
    assert set(one(unit, "AmbientCapabilities").split()) == CAPS
    assert one(unit, "RuntimeDirectory") == "pairlb pairlb/tls"
    assert one(unit, "ProtectSystem") == "strict"


def test_out_of_memory_the_unit_keeps_the_control_process_and_the_node(
    unit: list[Setting],
) -> None:
    """The control process starts at OOMScoreAdjust (the workers go 1000 above it: see
    tests/test_oom.py), and a worker killed for memory does not stop the service."""
    from lb import sysutil

    assert int(one(unit, "OOMScoreAdjust")) == sysutil.OOM_SCORE_ADJ_CONTROL
    assert sysutil.worker_oom_score_adj(sysutil.OOM_SCORE_ADJ_CONTROL) == 500
    assert one(unit, "OOMPolicy") == "continue"


def _bytes(value: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", value)
    assert m, value
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


def test_memory_limits_are_the_ones_operations_md_derives(unit: list[Setting]) -> None:
    """docs/operations.md ("Memory") measures ~200 MB + 60 MB per worker and sizes the unit
    for 16 workers; the unit says the same numbers, High below Max, both above that peak."""
    high, top = one(unit, "MemoryHigh"), one(unit, "MemoryMax")
    ops = (REPO / "docs" / "operations.md").read_text()
    assert f"`MemoryHigh={high}`" in ops and f"`MemoryMax={top}`" in ops
    peak_16 = (200 + 60 * 16) << 20
    assert peak_16 < _bytes(high) < _bytes(top)


def test_every_relaxation_is_commented_with_its_reason(unit: list[Setting]) -> None:
    """Each capability, address family and system call granted is named in the comment
    above it, and each hardening option left out says why in the NOT SET block."""
    granted = [s for s in unit if s.key in ("CapabilityBoundingSet", "RestrictAddressFamilies")]
    granted += [
        s for s in unit if s.key == "SystemCallFilter" and not s.value.startswith(("@", "~"))
    ]
    assert len(granted) == 4  # capabilities, address families, setpriority, capset
    for s in granted:
        key = s.key
        assert "RELAXATION" in s.comment, key
        for token in s.value.split():
            assert re.search(rf"\b{token}\b", s.comment), f"{key}: {token} has no reason"
    text = UNIT.read_text()
    for unset in ("PrivateNetwork", "PrivateUsers", "IPAddressDeny", "ProcSubset"):
        assert re.search(rf"^#\s+{unset}=\s+\S", text, re.M), f"why {unset}= is not set"
        assert values(unit, unset) == [], f"{unset}= is set after all"


def test_credentials_in_the_unit_match_the_paths_in_the_example_config(
    unit: list[Setting],
) -> None:
    creds = dict(v.split(":", 1) for v in values(unit, "LoadCredential"))
    assert creds == {
        "failover.key": "/etc/pairlb/failover.key",
        "admin.token": "/etc/pairlb/admin.token",
    }
    example = EXAMPLE.read_text()
    for name in creds:
        assert f'"/run/credentials/pairlb.service/{name}"' in example, name


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=60, cwd="/tmp")


@needs_analyze
@pytest.mark.timeout(90)
def test_security_exposure_is_at_most_2() -> None:
    res = _analyze("security", "--offline=true", "--no-pager", str(UNIT))
    m = re.search(r"Overall exposure level for pairlb\.service: (\d+\.\d+)", res.stdout)
    assert m, res.stdout[-2000:] + res.stderr
    exposure = float(m.group(1))
    print(f"systemd-analyze security: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE


def _unit_with_runnable_paths(tmp_path: Path, text: str) -> Path:
    """verify checks that every Exec binary exists; /opt/pairlb is not installed on a dev box,
    so point the copy at this checkout's virtualenv (same console script, same arguments)."""
    pairlb = Path(sys.executable).parent / "pairlb"
    if not pairlb.exists():
        pytest.skip(f"no pairlb console script next to {sys.executable}")
    out = tmp_path / "pairlb.service"
    out.write_text(text.replace("/opt/pairlb/bin/pairlb", str(pairlb)))
    return out


@needs_analyze
@pytest.mark.timeout(90)
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    res = _analyze("verify", str(_unit_with_runnable_paths(tmp_path, UNIT.read_text())))
    # verify exits 0 on mere warnings (an unknown key is "ignoring"), so no output is the bar.
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr


@needs_analyze
@pytest.mark.timeout(90)
def test_verify_would_catch_a_typo(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key and a bad value are reported."""
    broken = UNIT.read_text().replace("KillMode=mixed", "KilMode=mixed")
    broken = broken.replace("Type=notify", "Type=notfy")
    res = _analyze("verify", str(_unit_with_runnable_paths(tmp_path, broken)))
    assert "Unknown key" in res.stderr and "KilMode" in res.stderr
    assert "notfy" in res.stderr


def _sysctl_settings() -> dict[str, str]:
    out = {}
    for line in SYSCTL.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            out[key.strip()] = " ".join(value.split())
    return out


@pytest.mark.timeout(60)
def test_sysctl_drop_in_applies_in_a_throwaway_network_namespace() -> None:
    """Every key exists and takes its value. `unshare -n` gives a namespace that dies with
    the command, so the host's settings are never touched (all these keys are per-netns)."""
    if os.geteuid() != 0 or not all(shutil.which(c) for c in ("unshare", "sysctl", "nft")):
        pytest.skip("needs root, unshare, sysctl and nft")
    settings = _sysctl_settings()
    assert len(settings) >= 5
    keys = " ".join(settings)
    # The conntrack keys exist once nf_conntrack is loaded: a ct rule loads it, as pairlb's
    # handover table does.
    conntrack = ("nft add table ip t && nft 'add chain ip t c { type filter hook prerouting "
                 "priority 0; }' && nft add rule ip t c ct state new accept")
    script = f"{conntrack} && sysctl -q -p {SYSCTL} && sysctl -n {keys}"
    res = subprocess.run(
        ["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stderr
    got = [" ".join(v.split()) for v in res.stdout.splitlines()]
    assert got == list(settings.values())
    # Each group of settings has its reason in a comment in the same paragraph.
    for para in SYSCTL.read_text().split("\n\n"):
        lines = [ln for ln in para.splitlines() if ln.strip()]
        if any(not ln.startswith("#") for ln in lines):
            assert any(ln.startswith("# ") for ln in lines), para


# -- the daemon under a fake service manager -------------------------------------------------


def _get(port: int, path: str = "/", timeout_s: float = 3.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("X-Backend") or ""
    finally:
        conn.close()


def _stop(proc: subprocess.Popen[bytes], group: bool) -> None:
    """SIGCONT first (a test may have stopped it), then SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(proc.pid, sig)
            else:
                proc.send_signal(sig)

    send(signal.SIGCONT)
    send(signal.SIGTERM)
    try:
        proc.wait(8.0)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(5.0)
    if group:  # workers left behind by a SIGKILLed control process
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    notify: NotifySocket
    port: int
    cfg: Path
    log: Path
    backends: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    backend_ports: dict[str, int] = field(default_factory=dict)

    def messages_from_others(self) -> list[Notification]:
        return [m for m in self.notify.snapshot() if m.pid != self.proc.pid]


def _config(port: int, ports: dict[str, int], weights: dict[str, int], dead: list[str]) -> str:
    entries = [
        f'{{ name = "{n}", address = "127.0.0.1:{p}", weight = {weights.get(n, 1)} }}'
        for n, p in ports.items()
    ]
    return f"""
[node]
name = "sd1"
workers = 1
shutdown_timeout_s = 2.0
[[listener]]
name = "web"
bind = "127.0.0.1:{port}"
pool = "web"
[[pool]]
name = "web"
backends = [{", ".join(entries)}]
[pool.health]
interval_s = 0.2
timeout_s = 0.1
rise = 1
fall = 1
[admin]
enabled = false
"""


def _start_backend(name: str, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-m", "lab.backend_app", name, f"127.0.0.1:{port}"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


class StartNode(Protocol):
    def __call__(
        self,
        live: tuple[str, ...] = ...,
        dead: tuple[str, ...] = ...,
        env: dict[str, str] | None = ...,
        pythonpath_extra: Path | None = ...,
    ) -> Node: ...


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[StartNode]:
    started: list[Node] = []

    def start(
        live: tuple[str, ...] = ("b1",),
        dead: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        pythonpath_extra: Path | None = None,
    ) -> Node:
        notify = NotifySocket(tmp_path / f"notify{len(started)}")
        port = free_port()
        ports = {n: free_port() for n in (*live, *dead)}
        backends = {n: _start_backend(n, ports[n]) for n in live}
        for n in live:
            backend_app.wait_answering("127.0.0.1", ports[n], n, 15.0)
        cfg = tmp_path / f"lb{len(started)}.toml"
        cfg.write_text(_config(port, ports, {}, list(dead)))
        log = tmp_path / f"daemon{len(started)}.log"
        full_env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")
        }
        paths = [str(REPO)] + ([str(pythonpath_extra)] if pythonpath_extra else [])
        full_env["PYTHONPATH"] = os.pathsep.join(paths)
        full_env["NOTIFY_SOCKET"] = notify.address
        full_env.update(env or {})
        with log.open("wb") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lb", "run", "-c", str(cfg)],
                env=full_env,
                cwd=REPO,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        node = Node(proc, notify, port, cfg, log, backends, ports)
        started.append(node)
        return node

    yield start
    for node in started:
        _stop(node.proc, group=True)
        for b in node.backends.values():
            _stop(b, group=True)
        node.notify.close()


def _log_tail(node: Node) -> str:
    return node.log.read_text()[-3000:]


WATCHDOG_USEC = 500_000
"""A 0.5 s watchdog: WATCHDOG=1 every 0.25 s; short enough for a quick test, with 0.25 s of
slack for a loaded machine before a ping would count as late."""


def _pings(node: Node, since: float, until: float) -> list[float]:
    return [
        m.at
        for m in node.notify.snapshot()
        if "WATCHDOG" in m.fields and since <= m.at <= until and m.pid == node.proc.pid
    ]


def _max_gap(times: list[float]) -> float:
    return max(b - a for a, b in itertools.pairwise(times))


@pytest.mark.timeout(60)
def test_ready_only_once_serving_and_status_follows_the_backends(node_factory: StartNode) -> None:
    # WATCHDOG_PID names another process (as when systemd watches a wrapper): this one must
    # then never ping, however long it runs.
    node = node_factory(
        live=("b1", "b2"),
        dead=("b3",),
        env={"WATCHDOG_USEC": str(WATCHDOG_USEC), "WATCHDOG_PID": "1"},
    )
    t0 = time.monotonic()
    try:
        _, ready = node.notify.wait_for(has("READY", "1"), 20.0)
    except AssertionError:
        raise AssertionError(_log_tail(node)) from None
    # The very first request after READY=1 is served: no retry, no connection refused.
    status, backend = _get(node.port)
    served_at = time.monotonic()
    assert status == 200 and backend in ("b1", "b2")
    print(f"READY after {ready.at - t0:.3f} s; first request {served_at - ready.at:.3f} s later")
    # READY carries the first status line, so `systemctl status` is never blank.
    assert re.fullmatch(r"role=STANDALONE backends_up=\d/3 workers=1", ready.fields["STATUS"])
    assert ready.pid == node.proc.pid

    i, _ = node.notify.wait_for(
        lambda m: m.fields.get("STATUS") == "role=STANDALONE backends_up=2/3 workers=1", 10.0
    )
    # A backend dies: `systemctl status` says so within a check interval plus the 1 s refresh.
    killed_at = time.monotonic()
    _stop(node.backends["b2"], group=True)
    _, m = node.notify.wait_for(
        lambda m: m.fields.get("STATUS") == "role=STANDALONE backends_up=1/3 workers=1",
        10.0,
        start=i + 1,
    )
    delay = m.at - killed_at
    print(f"STATUS showed the dead backend {delay:.3f} s after it died")
    assert delay < 2.5
    assert _pings(node, 0.0, time.monotonic()) == []
    # Everything came from the control process, nothing from the workers: with
    # NotifyAccess=main systemd would drop (and log) any other sender's message.
    assert node.messages_from_others() == []


@pytest.mark.timeout(60)
def test_sighup_reports_reloading_then_ready_and_sigterm_stopping(node_factory: StartNode) -> None:
    node = node_factory(live=("b1", "b2"))
    i, _ = node.notify.wait_for(has("READY", "1"), 20.0)
    node.cfg.write_text(_config(node.port, node.backend_ports, {"b2": 3}, []))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    os.kill(node.proc.pid, signal.SIGHUP)
    j, reloading = node.notify.wait_for(has("RELOADING", "1"), 10.0, start=i + 1)
    k, ready = node.notify.wait_for(has("READY", "1"), 10.0, start=j + 1)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    # CLOCK_MONOTONIC is one clock for every process: systemd compares it with its own.
    assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after
    print(f"reload took {ready.at - reloading.at:.3f} s (RELOADING=1 -> READY=1)")
    # The reload took effect: b2 now gets three times b1's share.
    seen = [_get(node.port)[1] for _ in range(40)]
    assert seen.count("b2") >= 2 * seen.count("b1"), seen

    # A broken file: still RELOADING then READY (systemd must not stay in "reloading"), the
    # process lives on and keeps serving with the old config.
    node.cfg.write_text("[node\nname = ")
    os.kill(node.proc.pid, signal.SIGHUP)
    m, _ = node.notify.wait_for(has("RELOADING", "1"), 10.0, start=k + 1)
    n, _ = node.notify.wait_for(has("READY", "1"), 10.0, start=m + 1)
    assert node.proc.poll() is None
    assert _get(node.port)[0] == 200
    assert "event=reload_failed" in node.log.read_text()

    t0 = time.monotonic()
    os.kill(node.proc.pid, signal.SIGTERM)
    _, stopping = node.notify.wait_for(has("STOPPING", "1"), 10.0, start=n + 1)
    rc = node.proc.wait(15.0)
    exited = time.monotonic()
    assert rc == 0, _log_tail(node)
    assert stopping.at <= exited
    print(f"STOPPING=1 {stopping.at - t0:.3f} s after SIGTERM; exit after {exited - t0:.3f} s")
    assert node.messages_from_others() == []


@pytest.mark.timeout(60)
def test_watchdog_pings_arrive_on_time_and_stop_while_the_process_is_stopped(
    node_factory: StartNode,
) -> None:
    node = node_factory(env={"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    _, ready = node.notify.wait_for(has("READY", "1"), 20.0)
    time.sleep(2.0)
    pings = _pings(node, ready.at, time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    print(
        f"WATCHDOG=1: {len(pings)} pings in 2 s, gap median {statistics.median(gaps):.4f} s "
        f"max {max(gaps):.4f} s (WATCHDOG_USEC {WATCHDOG_USEC / 1e6} s)"
    )
    assert len(pings) >= 7
    assert 0.22 <= statistics.median(gaps) <= 0.32
    # systemd fires when a whole WATCHDOG_USEC passes without a ping: never happened.
    assert max(gaps) < WATCHDOG_USEC / 1e6

    # SIGSTOP (the weak proof: every thread stops) -> no ping; SIGCONT -> they resume.
    os.kill(node.proc.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    time.sleep(1.0)
    os.kill(node.proc.pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    assert _pings(node, stopped_at + 0.01, resumed_at) == []
    _, first = node.notify.wait_for(lambda m: "WATCHDOG" in m.fields and m.at > resumed_at, 2.0)
    print(f"first ping {first.at - resumed_at:.4f} s after SIGCONT")
    assert first.at - resumed_at < WATCHDOG_USEC / 1e6


_BLOCKER = '''
"""Test-only: SIGURG blocks the main thread (the control loop) for PLB_TEST_BLOCK_S."""
import os, signal, time

def _block(signum, frame):
    time.sleep(float(os.environ.get("PLB_TEST_BLOCK_S", "1.0")))

signal.signal(signal.SIGURG, _block)
'''


@pytest.mark.timeout(60)
def test_watchdog_stops_while_the_control_loop_is_blocked_and_resumes_after(
    node_factory: StartNode, tmp_path: Path
) -> None:
    """The strong proof: the process is alive, its workers serve, only the control loop is
    stuck (a Python signal handler that sleeps runs on the loop's thread, as any blocking
    call there would). WATCHDOG=1 must stop, because it is sent from that loop, not from a
    helper thread that would keep systemd happy while heartbeats stall. The blocker is
    injected with a sitecustomize module on PYTHONPATH: no test hook in the daemon."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(_BLOCKER)
    node = node_factory(
        env={"WATCHDOG_USEC": str(WATCHDOG_USEC), "PLB_TEST_BLOCK_S": "1.5"},
        pythonpath_extra=hook_dir,
    )
    node.notify.wait_for(has("READY", "1"), 20.0)
    time.sleep(0.5)
    blocked_at = time.monotonic()
    os.kill(node.proc.pid, signal.SIGURG)  # USR1 and USR2 are the daemon's own
    time.sleep(0.5)
    # Workers are separate processes: traffic still flows while the control loop is stuck.
    assert _get(node.port)[0] == 200
    _, after = node.notify.wait_for(
        lambda m: "WATCHDOG" in m.fields and m.at > blocked_at + 1.4, 3.0
    )
    pings = _pings(node, blocked_at - 1.0, after.at)
    gap = _max_gap(pings)
    print(f"watchdog gap, loop blocked 1.5 s: {gap:.3f} s (systemd fires after 0.5 s)")
    assert gap >= 1.4
    assert gap > WATCHDOG_USEC / 1e6
    assert node.proc.poll() is None
