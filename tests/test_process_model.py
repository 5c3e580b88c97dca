"""Process model with real processes: worker crashes, reloads and stops under load (issue 5).

A real ``pairlb run`` (control process + 2 workers) in front of three real aiohttp backends
on 127.0.0.1; a bounded load generator of concurrent clients, one connection per request,
records every outcome. Assertions are about what a client would see.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab import backend_app
from lab.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def wait_http(port: int, path: str = "/", timeout_s: float = 15.0, want: int = 200) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with contextlib.suppress(OSError, http.client.HTTPException):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", path)
            if c.getresponse().status == want:
                return
        time.sleep(0.05)
    raise TimeoutError(f"127.0.0.1:{port}{path} did not answer {want} in {timeout_s} s")


@dataclass
class Load:
    """Concurrent clients hammering a URL until stopped; bounded by ``max_requests``."""

    port: int
    path: str = "/"
    clients: int = 6
    max_requests: int = 200_000
    results: list[tuple[float, int | str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.results) < self.max_requests:
            t = time.monotonic()
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", self.path)
                r = c.getresponse()
                r.read()
                outcome: int | str = r.status
                c.close()
            except (OSError, http.client.HTTPException) as exc:
                outcome = type(exc).__name__
            with self._lock:
                self.results.append((t, outcome))

    def __enter__(self) -> Load:
        for _ in range(self.clients):
            th = threading.Thread(target=self._run, daemon=True)
            th.start()
            self._threads.append(th)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for th in self._threads:
            th.join(10)

    def failures(self) -> list[tuple[float, int | str]]:
        return [(t, o) for t, o in self.results if o != 200]

    def ok(self) -> int:
        return sum(1 for _, o in self.results if o == 200)


class Node:
    """A pairlb process with its backends; everything stopped by PID at the end."""

    def __init__(self, tmp: Path, workers: int = 2, extra_pool: str = "") -> None:
        self.tmp = tmp
        self.port = free_port()
        self.bports = [free_port() for _ in range(3)]
        self.extra_pool = extra_pool
        self.workers = workers
        self.cfg = tmp / "pairlb.toml"
        self.log = tmp / "pairlb.log"
        self.backends: list[subprocess.Popen[bytes]] = []
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self, backends: int = 3, extra: str = "") -> str:
        lines = ",\n".join(
            f'  {{ name = "web{i + 1}", address = "127.0.0.1:{p}" }}'
            for i, p in enumerate(self.bports[:backends])
        )
        return f"""
[node]
name = "lb1"
workers = {self.workers}
state_dir = "{self.tmp / 'state'}"
shutdown_timeout_s = 5.0
[[listener]]
name = "web"
bind = "127.0.0.1:{self.port}"
pool = "web"
[[pool]]
name = "web"
backends = [
{lines}
]
{self.extra_pool}
[pool.health]
interval_s = 0.2
timeout_s = 0.2
{extra}
[admin]
enabled = false
"""

    def start(self) -> None:
        for i, p in enumerate(self.bports):
            self.backends.append(
                subprocess.Popen(
                    [PY, "-m", "lab.backend_app", f"web{i + 1}", f"127.0.0.1:{p}"], cwd=ROOT
                )
            )
        for i, p in enumerate(self.bports):
            backend_app.wait_answering("127.0.0.1", p, f"web{i + 1}", 15.0)
        self.cfg.write_text(self.config())
        self.proc = subprocess.Popen(
            [PY, "-m", "lb", "run", "-c", str(self.cfg)], cwd=ROOT, stderr=self.log.open("wb")
        )
        wait_http(self.port)

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True
        ).stdout
        return [int(x) for x in out.split()]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        procs = ([self.proc] if self.proc else []) + self.backends
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    try:
        n.start()
        yield n
    finally:
        n.stop()


@pytest.mark.timeout(90)
def test_kill_9_worker_under_load(node: Node) -> None:
    pids = node.worker_pids()
    assert len(pids) == 2
    with Load(node.port) as load:
        time.sleep(1.0)
        before = len(load.results)
        killed_at = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        # The worker slot is refilled within a second.
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            now_pids = node.worker_pids()
            if len(now_pids) == 2 and pids[0] not in now_pids:
                break
            time.sleep(0.02)
        back_s = time.monotonic() - killed_at
        time.sleep(1.0)
    assert len(node.worker_pids()) == 2 and pids[0] not in node.worker_pids()
    assert back_s < 1.0, f"worker back after {back_s:.2f} s"
    fails = load.failures()
    # Only requests in flight on the killed worker may fail: at most one per client.
    assert len(fails) <= load.clients, fails
    assert all(t >= killed_at - 0.01 for t, _ in fails)
    assert load.ok() > before + 100, "load did not continue after the kill"
    assert "event=worker_died" in node.log_text() and "signal=SIGKILL" in node.log_text()


@pytest.mark.timeout(120)
def test_repeated_worker_kills_keep_serving(node: Node) -> None:
    kills = 0
    with Load(node.port) as load:
        end = time.monotonic() + 6.0
        while time.monotonic() < end:
            pids = node.worker_pids()
            if pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pids[kills % len(pids)], signal.SIGKILL)
                    kills += 1
            time.sleep(0.4)
        time.sleep(1.5)
        tail_start = time.monotonic() - 1.0
    assert kills >= 8
    # Serving at the end, and the failures stayed bounded by what was in flight at each kill.
    assert any(t >= tail_start and o == 200 for t, o in load.results)
    assert len(load.failures()) <= kills * load.clients
    assert load.ok() > 10 * len(load.failures())
    wait_http(node.port)
    assert node.proc is not None and node.proc.poll() is None


def _wait_log(node: Node, text: str, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while text not in node.log_text():
        assert time.monotonic() < end, node.log_text()[-3000:]
        time.sleep(0.05)


@pytest.mark.timeout(90)
def test_sighup_reload_under_load_loses_nothing(node: Node) -> None:
    assert node.proc is not None
    with Load(node.port) as load:
        time.sleep(0.8)
        # A changed pool: web3 removed, weights changed.
        node.cfg.write_text(node.config(backends=2))
        node.proc.send_signal(signal.SIGHUP)
        _wait_log(node, "event=reloaded generation=2", 10.0)
        time.sleep(0.3)  # the workers take the new pool a few ms after the control process
        mark = time.monotonic()
        time.sleep(0.8)
    assert load.failures() == []
    assert re.search(r"event=reloaded generation=2 .*pool web changed", node.log_text())
    # web3 no longer gets traffic after the reload.
    seen = set()
    for _ in range(12):
        c = http.client.HTTPConnection("127.0.0.1", node.port, timeout=2)
        c.request("GET", "/")
        r = c.getresponse()
        r.read()
        seen.add(r.getheader("X-Backend"))
    assert seen == {"web1", "web2"}
    assert any(t > mark for t, _ in load.results)


@pytest.mark.timeout(90)
def test_broken_reload_under_load_keeps_old_config(node: Node) -> None:
    assert node.proc is not None
    with Load(node.port) as load:
        time.sleep(0.8)
        node.cfg.write_text(node.config().replace('bind = "127.0.0.1', 'bind = "not-an-ip'))
        node.proc.send_signal(signal.SIGHUP)
        _wait_log(node, "event=reload_failed", 10.0)
        time.sleep(0.5)  # and serving on, under load, with the old config
    assert load.failures() == []
    log = node.log_text()
    assert "event=reload_rejected" in log and "listener[0].bind" in log
    assert "event=reload_failed kept_generation=1" in log
    seen = set()
    for _ in range(12):
        c = http.client.HTTPConnection("127.0.0.1", node.port, timeout=2)
        c.request("GET", "/")
        r = c.getresponse()
        r.read()
        seen.add(r.getheader("X-Backend"))
    assert seen == {"web1", "web2", "web3"}


@pytest.mark.timeout(90)
def test_sigterm_finishes_in_flight_then_refuses(node: Node) -> None:
    assert node.proc is not None
    results: list[int | str] = []

    def slow() -> None:
        try:
            c = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
            c.request("GET", "/sleep/1.5")
            r = c.getresponse()
            r.read()
            results.append(r.status)
        except (OSError, http.client.HTTPException) as exc:
            results.append(type(exc).__name__)

    threads = [threading.Thread(target=slow) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # The listener is closed: new connections are refused while the slow ones finish.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", node.port), timeout=1).close()
    for t in threads:
        t.join(10)
    assert results == [200, 200, 200, 200]
    assert node.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5.0


# -- privileges and the OOM killer (issue 13) ------------------------------------------------


def _wait_workers_serving(node: Node, n: int, timeout_s: float = 20.0) -> None:
    end = time.monotonic() + timeout_s
    while node.log_text().count("event=worker_serving") < n:
        assert time.monotonic() < end, node.log_text()[-3000:]
        time.sleep(0.05)


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _oom_adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


@pytest.mark.timeout(90)
@pytest.mark.skipif(os.geteuid() != 0, reason="the drop from root to nobody needs root")
def test_workers_run_as_nobody_with_no_capability_and_still_serve(node: Node) -> None:
    """Run by hand as root: every worker is nobody/nogroup, no supplementary groups, all
    five capability sets empty, no_new_privs, and first in the OOM killer's choice; the
    control process keeps its privileges (it needs them) and ranks last."""
    import grp
    import pwd

    assert node.proc is not None
    _wait_workers_serving(node, 2)
    time.sleep(0.5)
    # One "serving" per worker: a config and a snapshot read together start servers once.
    assert node.log_text().count("event=worker_serving") == 2, node.log_text()[-2000:]
    nobody = pwd.getpwnam("nobody")
    group = grp.getgrgid(nobody.pw_gid).gr_gid
    pids = node.worker_pids()
    assert len(pids) == 2
    for pid in pids:
        st = _status(pid)
        assert st["Uid"].split() == [str(nobody.pw_uid)] * 4, st["Uid"]
        assert st["Gid"].split() == [str(group)] * 4, st["Gid"]
        assert st["Groups"] == ""
        for caps in ("CapEff", "CapPrm", "CapAmb", "CapInh"):
            assert int(st[caps], 16) == 0, (caps, st[caps])
        if int(_status(os.getpid())["CapEff"], 16) & (1 << 8):  # CAP_SETPCAP: may drop it
            assert int(st["CapBnd"], 16) == 0, st["CapBnd"]
        assert st["NoNewPrivs"] == "1"
    control = _status(node.proc.pid)
    assert control["Uid"].split()[1] == "0" and int(control["CapEff"], 16) != 0
    adj = _oom_adj(node.proc.pid)
    if int(control["CapEff"], 16) & (1 << 24):  # CAP_SYS_RESOURCE: it may lower its own
        assert adj == -500
    assert adj <= 0
    # Every worker 1000 points above the control process (+500 over -500, or +1000 over 0).
    assert [_oom_adj(pid) for pid in pids] == [min(1000, adj + 1000)] * 2
    assert "event=privileges workers_user=nobody workers_group=" in node.log_text()
    # Traffic still flows through the unprivileged workers (both of them, new connections).
    with Load(node.port, clients=4, max_requests=400) as load:
        end = time.monotonic() + 10
        while len(load.results) < 400 and time.monotonic() < end:
            time.sleep(0.05)
    assert load.ok() >= 400 and load.failures() == []
    assert "ModuleNotFoundError" not in node.log_text()
    assert "PermissionError" not in node.log_text()


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_drop_refuses_to_serve(tmp_path: Path) -> None:
    """Asked to become uid 0 (what a drop that silently failed would leave), the worker's
    own check of /proc/self/status refuses: exit 78, a clear log line, nothing served."""
    parent, child = socket.socketpair()
    uid = os.geteuid()
    args = ["--uid", str(uid), "--gid", str(os.getegid())]
    if uid != 0:
        pytest.skip("as non-root the worker keeps its own uid, which is not 0")
    proc = subprocess.run(
        [PY, "-m", "lb.data.worker", str(child.fileno()), "0", *args],
        cwd=ROOT, pass_fds=[child.fileno()], capture_output=True, text=True, timeout=30,
    )
    child.close()
    parent.settimeout(1)
    assert parent.recv(100) == b""  # never said hello
    parent.close()
    assert proc.returncode == 78, proc.stderr
    assert "event=worker_privilege_drop_failed" in proc.stderr
    assert "still uid 0" in proc.stderr


@pytest.mark.timeout(60)
def test_an_unknown_worker_user_stops_the_start_with_the_key_named(tmp_path: Path) -> None:
    n = Node(tmp_path)
    text = n.config().replace("workers = 2\n", 'workers = 2\nworker_user = "plb-no-such-user"\n')
    n.cfg.write_text(text)
    proc = subprocess.run([PY, "-m", "lb", "run", "-c", str(n.cfg)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "node.worker_user: no such user 'plb-no-such-user'" in proc.stderr
    check = subprocess.run([PY, "-m", "lb", "check-config", str(n.cfg)], cwd=ROOT,
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 2
    assert "node.worker_user: no such user 'plb-no-such-user'" in check.stderr


@pytest.mark.timeout(90)
def test_reload_refuses_what_check_config_refuses(node: Node) -> None:
    """SIGHUP runs the checks of check-config (lb.control.preflight), not only the schema: a probe
    that cannot be built (HEAD with a body to expect) is refused, the old config serves."""
    assert node.proc is not None
    node.cfg.write_text(node.config(extra='method = "HEAD"\nexpect_body = "ok"\n'))
    node.proc.send_signal(signal.SIGHUP)
    end = time.monotonic() + 10
    while "event=reload_failed" not in node.log_text():
        assert time.monotonic() < end, node.log_text()[-3000:]
        time.sleep(0.05)
    log = node.log_text()
    assert "pool[0].health.expect_body: needs a method other than HEAD" in log
    assert "event=reload_failed kept_generation=1" in log
    assert node.proc.poll() is None
    wait_http(node.port)
