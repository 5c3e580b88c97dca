"""Helpers for the admin, metrics and status-page tests: real pairlb processes, real backends.

- ``free_port()``: a port the kernel just handed out on 127.0.0.1 (other engineers run
  servers on this machine at the same time, so no fixed ports anywhere).
- ``Backends``: ``python -m lab.backend_app NAME 127.0.0.1:PORT`` subprocesses.
- ``Pairlb``: ``python -m lb run -c CFG`` as a subprocess, ready when /readyz says 200;
  stopped with SIGTERM (SIGKILL after a deadline), killed by PID only.
- ``in_process_daemon()``: a real ``lb.control.daemon.Daemon`` with its pools set up but no workers
  or checks started, for tests of the admin app that need no traffic.
- ``FakeFailover``: stands in for the failover controller where a test needs a MASTER with a
  peer without building namespaces (the daemon's ``failover_view``, typed).
- ``http()``: one urllib request, returning (status, headers, body) also for 4xx/5xx.

Everything binds 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

from aiohttp import web

import failover
from lab import backend_app
from lab.ports import free_port, free_udp_port
from lb.admin import client
from lb.control import status as status_mod

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
if not Path(PYTHON).exists():
    PYTHON = sys.executable
ARTIFACTS = ROOT / "tests" / "artifacts"
LOOPBACK = "127.0.0.1"
SCHEMA = ROOT / "docs" / "status.schema.json"


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {LOOPBACK}:{port} after {timeout_s}s")


def write_token(directory: Path, token: str = "s3cret-token-for-tests", mode: int = 0o600) -> Path:
    path = directory / "admin.token"
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def config_text(
    *,
    node: str = "t1",
    listen_port: int,
    admin_port: int,
    backends: list[tuple[str, int]],
    token_file: Path | None = None,
    workers: int = 2,
    admin_bind_host: str = LOOPBACK,
    response_timeout_s: float = 30.0,
    state_dir: Path | None = None,
) -> str:
    members = ", ".join(
        f'{{ name = "{n}", address = "{LOOPBACK}:{p}" }}' for n, p in backends
    )
    token = f'token_file = "{token_file}"\n' if token_file else ""
    return f"""\
[node]
name = "{node}"
workers = {workers}
shutdown_timeout_s = 2.0
{f'state_dir = "{state_dir}"' if state_dir else ''}

[[listener]]
name = "web"
bind = "{LOOPBACK}:{listen_port}"
pool = "web"

[[pool]]
name = "web"
backends = [ {members} ]
response_timeout_s = {response_timeout_s}

[pool.health]
interval_s = 0.2
timeout_s = 0.2
rise = 1
fall = 2

[admin]
bind = "{admin_bind_host}:{admin_port}"
{token}"""


def http(
    method: str,
    url: str,
    *,
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    return client.exchange(method, url, token=token, body=body, headers=headers,
                           timeout_s=timeout_s)


def get_json(url: str) -> Any:
    status, _, body = http("GET", url)
    assert status == 200, (status, body)
    return json.loads(body)


def drive(url: str, n: int, concurrency: int = 8, timeout_s: float = 5.0) -> dict[int, int]:
    """Send exactly ``n`` GETs, each on a new connection (so the kernel spreads them over the
    workers); return the count per status (-1 for a transport error)."""

    def one(_: int) -> int:
        req = urllib.request.Request(url, headers={"Connection": "close"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                resp.read()
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return -1

    counts: dict[int, int] = {}
    with ThreadPoolExecutor(concurrency) as pool:
        for status in pool.map(one, range(n)):
            counts[status] = counts.get(status, 0) + 1
    return counts


def wait_until(pred: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5.0)


class Backends:
    """Real backend web servers (lab.backend_app) in subprocesses on free ports."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.ports = {n: free_port() for n in names}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> Backends:
        try:
            for n, port in self.ports.items():
                self.procs[n] = subprocess.Popen(
                    [PYTHON, "-m", "lab.backend_app", n, f"{LOOPBACK}:{port}"],
                    cwd=ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            for n, port in self.ports.items():
                backend_app.wait_answering(LOOPBACK, port, n)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs.values():
            _stop(proc, 5.0)

    @property
    def members(self) -> list[tuple[str, int]]:
        return list(self.ports.items())

    def stats(self, name: str) -> Any:
        return get_json(f"http://{LOOPBACK}:{self.ports[name]}/stats")


class Daemon:
    """``pairlb run -c FILE`` in a subprocess, ready when /readyz says 200; log in
    ``tmp/pairlb.log`` (shown on failure). A subclass writes ``self.config`` first."""

    def __init__(self, tmp: Path, *, token: bool = True) -> None:
        self.tmp = tmp
        self.token_file = write_token(tmp) if token else None
        self.token = self.token_file.read_text().strip() if self.token_file else None
        self.admin_port = free_port()
        self.config = tmp / "pairlb.toml"
        self.log = tmp / "pairlb.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def admin(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    def __enter__(self) -> Self:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "lb", "run", "-c", str(self.config)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(self._ready, 25.0, "pairlb /readyz == 200", 0.1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"pairlb exited with {self.proc.returncode}:\n{self.logs()}")
        try:
            return http("GET", self.admin + "/readyz", timeout_s=1.0)[0] == 200
        except OSError:
            return False

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            _stop(self.proc, 10.0)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def status(self) -> Any:
        return get_json(self.admin + "/status")

    def metrics(self) -> str:
        status, _, body = http("GET", self.admin + "/metrics")
        assert status == 200
        return body.decode()


class Pairlb(Daemon):
    """A node on the config_text() config: one HTTP listener, one pool of ``backends``."""

    def __init__(
        self,
        tmp: Path,
        backends: Backends,
        *,
        token: bool = True,
        workers: int = 2,
        response_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(tmp, token=token)
        self.listen_port = free_port()
        self.config.write_text(
            config_text(
                listen_port=self.listen_port,
                admin_port=self.admin_port,
                backends=backends.members,
                token_file=self.token_file,
                workers=workers,
                response_timeout_s=response_timeout_s,
                state_dir=tmp / "state",
            )
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.listen_port}"



Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text format to {(name, labels): value} (prometheus_client's parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def total(samples: Samples, name: str, **match: str) -> float:
    return sum(
        v
        for (n, labels), v in samples.items()
        if n == name and all((k, val) in labels for k, val in match.items())
    )


# -- in-process daemon ----------------------------------------------------------------------


def in_process_daemon(cfg_text: str, path: Path | None = None) -> Any:
    """A real Daemon with its pools built (as startup does) but no sockets, workers or checks.

    Call inside a running event loop. Backends start healthy or not as the config says.
    """
    from lb import config as config_mod
    from lb.control import daemon as daemon_mod

    if path is not None:
        path.write_text(cfg_text)
    cfg = config_mod.loads(cfg_text)
    d = daemon_mod.Daemon(cfg, str(path) if path else None)
    d.health.set_targets(d.table.targets())  # fills the book; no probe runs
    d.push_snapshots()
    return d


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Serve an app on 127.0.0.1:<free port>; yields its base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    try:
        assert runner.addresses
        yield f"http://{LOOPBACK}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


class FakeFailover:
    """The parts of the failover controller the daemon's status() reads, frozen in a state."""

    def __init__(self, role: str = "MASTER", peer_role: str = "BACKUP", match: bool = True):
        self.role = role  # the setter makes it a failover.Role
        self.peer_role = peer_role
        self.match = match
        self.switchovers = 0
        self.local_health: tuple[bool, int, int] | None = None

    def set_local_health(self, healthy: bool, usable: int, total: int) -> None:
        self.local_health = (healthy, usable, total)

    async def close_handover(self) -> None:
        """Like FailoverController's: nothing installed here."""

    async def stop(self, graceful: bool = True) -> None:
        pass

    @property
    def role(self) -> failover.Role:
        """A real failover.Role, as the daemon reads it; set it with "MASTER" etc."""
        return self._role

    @role.setter
    def role(self, name: str | failover.Role) -> None:
        self._role = failover.Role(str(name).lower())

    def view(self) -> status_mod.FailoverView:
        """The typed view the daemon's status() gives (lb.control.status.FailoverView)."""
        import failover
        from failover.adapters.track import GatewayStatus, TargetStatus

        role = self.role
        peer = failover.PeerStatus(
            name="lb2", role=failover.Role(self.peer_role.lower()), priority=100, alive=True,
            last_heard_age_s=0.031, paths=(failover.PathStatus("10.0.0.2:5405", 0.031),),
            healthy=True, healthy_count=3, total_count=3, config_digest_match=self.match,
            leaving=False, switchover=False, clock_offset_s=-0.0021,
            clock_skew_warning=False, key_id="3f2a9c1e", interval_s=0.03,
        )
        R = failover.Role
        st = failover.FailoverStatus(
            node="t1", role=role, role_reason="highest priority", role_since=time.time() - 42.0,
            role_age_s=42.0, priority=150, healthy=True, healthy_count=3, total_count=3,
            faults=(), vip_holding=role is failover.Role.MASTER, switchover_pending=False,
            preempt_suppressed=False, master_down_s=0.16, peers=(peer,),
            counters=failover.FailoverCounters(
                heartbeats_sent=1200, heartbeats_received=1190,
                rejected={failover.RejectReason.BAD_MAC: 3, failover.RejectReason.REPLAYED: 1},
                transitions={(R.INIT, R.BACKUP): 1, (R.BACKUP, R.MASTER): 1},
            ),
            send_lag=failover.SendLag(100, 0.0001, 0.0004, 0.0012),
            handover_enabled=True,
            keys=(failover.KeyStatus("3f2a9c1e", True, 1190),),
            gateway=GatewayStatus(
                up=True, targets=(TargetStatus("tcp:192.0.2.1:22", True, "refused", 0.0002,
                                               120, 1),),
                interval_s=0.5, timeout_s=0.5, fall=3, rise=2, transitions=0,
            ),
        )
        return status_mod.FailoverView(
            st, "eth0", ("192.0.2.10/24", "2001:db8::10/64"),
            sent_gap_max_s=0.0312, received_gap_max_s=0.033,
            process=status_mod.ProcessStatus(4242, True, 42.0, 0.1, 0, 0, 0, False),
        )


def attach_fake_failover(daemon: Any, fake: FakeFailover) -> None:
    """Make ``daemon`` report ``fake``'s failover state and answer switchover from it."""
    daemon.failover = fake
    daemon.failover_view = fake.view

    async def switchover() -> dict[str, Any]:
        fake.switchovers += 1
        if fake.role is not failover.Role.MASTER:
            return {"ok": False, "error": f"not MASTER (role {fake.role.label})"}
        fake.role, fake.peer_role = "BACKUP", "MASTER"
        return {"ok": True, "role": "BACKUP"}

    daemon.switchover = switchover


@contextlib.contextmanager
def chdir(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


# -- PromQL ---------------------------------------------------------------------------------

_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan", "atan2",
}


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords dropped).

    Enough of a parser for dashboards and alert rules: strings, label matchers, ranges,
    Grafana variables and grouping clauses are removed, then every identifier that is not a
    function call or a keyword is a metric name.
    """

    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"'(?:[^'\\]|\\.)*'", "''", s)
    s = re.sub(r"\{[^}]*\}", "", s)
    s = re.sub(r"\[[^\]]*\]", "", s)
    s = re.sub(r"\$\{?\w+\}?", "", s)
    s = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s
    )
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", s):
        word = m.group(0)
        if s[m.end() :].lstrip().startswith("("):
            continue  # a function
        if word.lower() in _PROMQL_WORDS:
            continue
        names.add(word)
    return names


# -- a real failover pair on loopback (controllers only; VIPs in memory) ---------------------


class MemoryVip:
    """A VIP port that only remembers (no netlink): the controller's contract, nothing more."""
    announcements_sent = 0
    announcement_errors = 0

    def __init__(self) -> None:
        self._holding = False

    @property
    def holding(self) -> bool:
        return self._holding

    async def acquire(self) -> None:
        self._holding = True

    async def release(self) -> None:
        self._holding = False

    async def announce(self) -> None:
        pass

    async def remove_stale(self) -> list[str]:
        return []

    async def held(self) -> bool:
        return self._holding


def failover_config(node: str, priority: int, port: int, peer_port: int, tmp: Path) -> str:
    """A node config with [failover]; the pools are identical so the digests match."""
    base = config_text(
        node=node,
        listen_port=free_port(),
        admin_port=free_port(),
        backends=[("b1", 1), ("b2", 2)],
        token_file=write_token(tmp) if not (tmp / "admin.token").exists() else tmp / "admin.token",
    )
    # The listener address is part of the digest: both nodes must show the same one.
    base = re.sub(r'bind = "127\.0\.0\.1:\d+"\npool', 'bind = "127.0.0.1:18000"\npool', base)
    return base + (
        "\n[failover]\n"
        'interface = "plbnone0"\n'
        'vips = ["192.0.2.10/24"]\n'
        f'peers = ["{LOOPBACK}:{peer_port}"]\n'
        f"port = {port}\n"
        f'bind = "{LOOPBACK}"\n'
        f"priority = {priority}\n"
        "interval_s = 0.05\n"
    )


def attach_real_failover(daemon: Any, key: bytes) -> Any:
    """Give an in-process daemon a real FailoverController (real heartbeats over UDP on
    127.0.0.1, real role machine) with its VIPs in memory; returns the controller."""
    import failover

    fcfg = daemon.cfg.failover
    spec = failover.FailoverSpec(
        node_name=daemon.cfg.node.name,
        interface=fcfg.interface,
        vips=fcfg.vips,
        priority=fcfg.priority,
        peers=fcfg.peers,
        key=key,
        port=fcfg.port,
        bind=fcfg.bind,
        interval_s=fcfg.interval_s,
        config_digest=daemon.cfg.digest_bytes(failover.DIGEST_LEN),
    )
    ctl = failover.FailoverController(spec, MemoryVip())
    ctl.set_local_health(True, 2, 2)
    daemon.failover = ctl
    return ctl


class LoopThread:
    """An event loop in a thread, for in-process servers that must keep serving while the
    test's own thread blocks (subprocesses, urllib, sleeps)."""

    def __init__(self) -> None:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout_s: float = 30.0) -> Any:
        import asyncio

        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextlib.contextmanager
def failover_pair(tmp: Path) -> Iterator[dict[str, Any]]:
    """Two in-process daemons (lb1 priority 150, lb2 priority 100) with real failover
    controllers and their admin apps, served from a LoopThread until the context ends.

    Yields ``{"urls": {"lb1": url, "lb2": url}, "daemons": {...}, "thread": LoopThread}``;
    lb1 is MASTER and lb2 BACKUP when it yields.
    """
    import asyncio

    import failover
    from lb.admin import server as admin

    lt = LoopThread()
    key = failover.generate_key()
    port_a, port_b = free_udp_port(), free_udp_port()
    state: dict[str, Any] = {"urls": {}, "daemons": {}, "thread": lt}
    stack = contextlib.AsyncExitStack()
    controllers: list[Any] = []

    async def up() -> None:
        for name, prio, mine, peer in (("lb1", 150, port_a, port_b), ("lb2", 100, port_b, port_a)):
            d = in_process_daemon(failover_config(name, prio, mine, peer, tmp))
            controllers.append(attach_real_failover(d, key))
            state["daemons"][name] = d
            state["urls"][name] = await stack.enter_async_context(serve(admin.make_app(d)))
        for ctl in controllers:
            await ctl.start()
        deadline = asyncio.get_running_loop().time() + 10
        while [d.role() for d in state["daemons"].values()] != ["MASTER", "BACKUP"]:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("the pair did not elect lb1")
            await asyncio.sleep(0.05)

    async def down() -> None:
        for ctl in controllers:
            await ctl.stop(graceful=False)
        await stack.aclose()

    try:
        lt.run(up())
        yield state
    finally:
        try:
            lt.run(down())
        finally:
            lt.close()
