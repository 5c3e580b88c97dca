"""The demo's network: a client, two pairlb nodes and three backends in namespaces.

Shared by ``pairlb demo`` (lab/demo.py) and the chaos suite (bench/chaos.py). ``Cluster``
builds the topology with lab.netns (client .11, lb1 .12, lb2 .13, one host per backend from
.14, VIP .100, all in TEST-NET-1), writes each node's config derived from the embedded
default (same listener, pool, backend names and weights; addresses moved into the
topology; ``[failover]`` and ``[admin]`` added), generates the failover key and the admin
token into a work directory, and starts real ``pairlb run`` processes and demo backends.
It then knows how to hurt them (kill, stop, cut a link, reload, drain, switch over) and how
to look at them without trusting them:

- the load generator (lab.load) in the client namespace records every request;
- the backends (``python -m lab.cluster backend``) are lab.backend_app plus an ``X-Peer``
  response header (the address the request came from: the load balancer's own address, so
  the client knows which node carried it; pairlb's Via names no node) and a journal of every
  request with an ``X-Client-Id``, one write(2) per request so it survives kill -9;
- the VIP watch (lab.vipwatch.VipWatch) reads rtnetlink address events from inside lb1 and
  lb2: the kernel's own record of who held the VIP when.

Run as a script it is those helper programs: ``backend NAME HOST:PORT JOURNAL`` and
``forward PORT=NETNS:HOST:PORT ...`` (a loopback TCP forwarder from the root namespace into
the namespaces, so ``--keep`` can print admin URLs a browser can open).

Imports lab (netns, vipwatch), lb (config, the admin client) and failover's public names
only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import netns
from lab.vipwatch import VipWatch
from lb import config as config_mod
from lb.admin import client

CLIENT = "client"
LBS = ("lb1", "lb2")
VIP_HOST = 100
ADMIN_PORT = 9900
STATE_FILE = "demo-state.json"
WORKDIR_PREFIX = "pairlb-demo-"
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


@dataclass(frozen=True)
class Settings:
    """What the demo and the chaos suite add to the embedded default (timers, workers)."""

    workers: int = 2
    interval_s: float = config_mod.DEFAULT_HEARTBEAT_INTERVAL_S
    down_after: int = 3
    priorities: tuple[int, int] = (150, 100)
    preempt: bool = True
    health_interval_s: float = 0.2
    health_timeout_s: float = 0.2
    rise: int = 2
    fall: int = 2
    response_timeout_s: float = 0.5
    """Short, with retry_on_timeout, so a hung (SIGSTOPped) backend costs GETs latency, not
    errors (the default 30 s would make the demo look frozen)."""
    shutdown_timeout_s: float = 2.0
    eject_s: float = 2.0
    """Passive ejection (errors seen by the proxy) lasts this, n times for the n-th in a row."""
    max_eject_s: float = 10.0


@dataclass(frozen=True)
class Backend:
    name: str
    port: int
    weight: int


def default_layout() -> tuple[config_mod.Config, list[Backend]]:
    """The embedded default config and its backends (names, ports, weights)."""
    base = config_mod.loads(config_mod.DEFAULT_CONFIG_TOML, "<embedded default>")
    pool = base.pool_by_name(base.listener[0].pool)
    return base, [Backend(b.name, b.host_port[1], b.weight) for b in pool.backends]


def node_config(
    base: config_mod.Config, node: str, *, addr: dict[str, str], vip: str, key_file: str,
    token_file: str, settings: Settings, variant: str = "",
) -> str:
    """TOML for `node`: the embedded default moved into the topology, plus failover/admin.

    variant "alt" changes one pool setting (a valid reload that changes the pool), "broken"
    is a config with an error (a reload that must be refused).
    """
    s = settings
    lst = base.listener[0]
    pool = base.pool_by_name(lst.pool)
    me = LBS.index(node)
    peer = LBS[1 - me]
    backends = ",\n".join(
        f'  {{ name = "{b.name}", address = "{addr[b.name]}:{b.host_port[1]}", '
        f"weight = {b.weight} }}" for b in pool.backends)
    connect = 0.4 if variant == "alt" else 0.5
    broken = 'weight = "heavy"\n' if variant == "broken" else ""
    text = f"""\
# Written by pairlb demo: the embedded default config moved into the demo's namespaces,
# plus [failover] and [admin]. Timers are faster than the defaults so the story is quick.
[node]
name = "{node}"
workers = {s.workers}
shutdown_timeout_s = {s.shutdown_timeout_s}

[[listener]]
name = "{lst.name}"
bind = "{vip}:{lst.host_port[1]}"
mode = "{lst.mode}"
pool = "{pool.name}"

[[pool]]
name = "{pool.name}"
balance = "{pool.balance}"
connect_timeout_s = {connect}
response_timeout_s = {s.response_timeout_s}
retry_on_timeout = true
{broken}backends = [
{backends},
]

[pool.health]
interval_s = {s.health_interval_s}
timeout_s = {s.health_timeout_s}
rise = {s.rise}
fall = {s.fall}

[pool.passive]
eject_s = {s.eject_s}
max_eject_s = {s.max_eject_s}

[failover]
interface = "{netns.NODE_IFNAME}"
vips = ["{vip}/24"]
priority = {s.priorities[me]}
peers = ["{addr[peer]}"]
bind = "{addr[node]}"
key_file = "{key_file}"
interval_s = {s.interval_s}
down_after = {s.down_after}
preempt = {str(s.preempt).lower()}

[admin]
bind = "127.0.0.1:{ADMIN_PORT}"
token_file = "{token_file}"
"""
    if variant != "broken":
        config_mod.loads(text, f"<demo config of {node}>")  # a bug here must not reach a node
    return text


# -- helper programs ------------------------------------------------------------------------


def backend_main(name: str, address: str, journal: str) -> int:
    """lab.backend_app, plus X-Peer on every response and a kill-proof journal.

    Journal line: ``MONOTONIC METHOD CLIENT_ID PEER``, written before the answer.
    """
    from aiohttp import web
    from aiohttp.typedefs import Handler

    from lab.backend_app import make_app

    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    app = make_app(name)

    @web.middleware
    async def journal_first(request: web.Request, handler: Handler) -> web.StreamResponse:
        cid = request.headers.get("X-Client-Id")
        if cid:
            # One write(2) straight to the kernel: on disk even after kill -9.
            line = f"{time.monotonic():.6f} {request.method} {cid} {request.remote or '?'}\n"
            os.write(fd, line.encode())
        return await handler(request)

    async def tag(request: web.Request, response: web.StreamResponse) -> None:
        # At prepare time, so streamed answers (POST /echo) carry the headers too.
        response.headers["X-Peer"] = request.remote or "?"
        response.headers.setdefault("X-Backend", name)

    app.middlewares.append(journal_first)
    app.on_response_prepare.append(tag)
    host, port = config_mod.parse_hostport(address)
    web.run_app(app, host=host, port=port, print=None, access_log=None, handle_signals=True)
    return 0


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def _socket_in(ns: str) -> socket.socket:
    """A TCP socket born in namespace `ns` (a socket keeps the namespace it was made in)."""
    s = netns.call_in_netns(ns, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    return s


async def _forward(specs: list[tuple[int, str, str, int]]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = []
    for lport, ns, host, port in specs:

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, ns: str = ns,
                         host: str = host, port: int = port) -> None:
            sock = _socket_in(ns)
            try:
                async with asyncio.timeout(5.0):
                    await loop.sock_connect(sock, (host, port))
                ur, uw = await asyncio.open_connection(sock=sock)
            except (OSError, TimeoutError):
                sock.close()
                w.close()
                return
            await asyncio.gather(_pipe(r, uw), _pipe(ur, w))

        servers.append(await asyncio.start_server(handle, "127.0.0.1", lport))
    await stop.wait()
    for srv in servers:
        srv.close()


def forward_main(args: Sequence[str]) -> int:
    """``forward PORT=NETNS:HOST:PORT ...``: listen on 127.0.0.1:PORT here, connect inside."""
    specs = []
    for a in args:
        lport, _, rest = a.partition("=")
        ns, host, port = rest.split(":")
        specs.append((int(lport), ns, host, int(port)))
    asyncio.run(_forward(specs))
    return 0


# -- talking to a node's admin API from inside its namespace ------------------------------------


def admin_call(base: str, method: str, path: str, token: str | None, timeout_s: float
               ) -> tuple[int, Any]:
    """One admin API call through lb.admin.client (the project's one admin client);
    (status, parsed JSON or text), or (0, the error) when nothing answered."""
    try:
        status, _, raw = client.exchange(method, base + path, token=token, timeout_s=timeout_s)
    except OSError as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def _http(method: str, path: str, token: str | None, timeout_s: float) -> tuple[int, Any]:
    return admin_call(f"http://127.0.0.1:{ADMIN_PORT}", method, path, token, timeout_s)


class DemoError(RuntimeError):
    """The demo network could not reach a state it needs (the message says which)."""


@dataclass
class Proc:
    """A process we started in a namespace (`ip netns exec` execs, so pid is the program)."""

    name: str
    proc: subprocess.Popen[bytes]
    started_at: float

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


@dataclass
class Cluster:
    """The topology, its processes and what was done to them. Use as a context manager."""

    workdir: Path
    settings: Settings = field(default_factory=Settings)
    python: str = sys.executable

    def __post_init__(self) -> None:
        self.base, self.backends = default_layout()
        self.backend_names = [b.name for b in self.backends]
        self.nodes = (CLIENT, *LBS, *self.backend_names)
        self.lbs: dict[str, Proc] = {}
        self.backend_procs: dict[str, Proc] = {}
        self.load: Proc | None = None
        self.watch: VipWatch | None = None
        self.keep = False
        self.topo = netns.build(self.nodes)
        try:
            self.vip = self.topo.host4(VIP_HOST)
            self.addr = {n: self.topo[n].ipv4 for n in self.nodes}
            self.node_of_addr = {v: k for k, v in self.addr.items()}
            self.listen_port = self.base.listener[0].host_port[1]
            self.key_file = self.workdir / "failover.key"
            import failover

            failover.write_key_file(str(self.key_file))
            self.token_file = self.workdir / "admin.token"
            self.token = os.urandom(16).hex()
            failover.write_secret(str(self.token_file), self.token.encode() + b"\n")
            self.write_state()
        except BaseException:
            self.topo.teardown()
            raise

    @property
    def prefix(self) -> str:
        return self.topo.prefix

    def write_state(self, **extra: Any) -> None:
        """What `pairlb demo --cleanup` needs to remove this run (prefix, pids we own)."""
        state = {"prefix": self.prefix, "workdir": str(self.workdir), "pid": os.getpid(),
                 **extra}
        (self.workdir / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop everything and delete the namespaces (unless `keep`); safe to call twice."""
        if self.watch is not None:
            with contextlib.suppress(Exception):
                self.watch.close()
            self.watch = None
        self.stop_load()
        if self.keep:
            return
        for p in [*self.lbs.values(), *self.backend_procs.values()]:
            with contextlib.suppress(ProcessLookupError):
                if p.running:
                    os.kill(p.proc.pid, signal.SIGCONT)
        self.topo.teardown()

    def _env(self) -> dict[str, str]:
        path = os.environ.get("PYTHONPATH")
        return {**os.environ, "PYTHONUNBUFFERED": "1",
                "PYTHONPATH": PACKAGE_ROOT + (os.pathsep + path if path else "")}

    def _popen(self, node: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            # A session of its own: Ctrl-C in the terminal reaches only the demo, which then
            # tears down in order (pairlb nodes would otherwise start their own shutdown).
            return self.topo.popen(node, argv, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=out, env=self._env(), start_new_session=True)

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 30) -> str:
        try:
            text = self.log(name).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- backends ----------------------------------------------------------------------

    def journal(self, name: str) -> Path:
        return self.workdir / f"{name}.journal"

    def start_backend(self, name: str) -> Proc:
        b = next(b for b in self.backends if b.name == name)
        argv = [self.python, "-m", "lab.cluster", "backend", name,
                f"{self.addr[name]}:{b.port}", str(self.journal(name))]
        p = Proc(name, self._popen(name, argv, self.log(name)), time.monotonic())
        self.backend_procs[name] = p
        return p

    def start_backends(self, timeout_s: float = 15.0) -> None:
        for b in self.backends:
            self.start_backend(b.name)
        for b in self.backends:
            self.wait_backend(b.name, timeout_s)

    def wait_backend(self, name: str, timeout_s: float = 10.0) -> float:
        port = next(b.port for b in self.backends if b.name == name)
        p = self.backend_procs[name]

        def up() -> bool:
            if not p.running:
                raise DemoError(f"backend {name} exited:\n{self.log_tail(name)}")
            return self.topo.tcp_probe(CLIENT, self.addr[name], port, 0.2) is netns.Probe.OPEN

        return self.wait_for(f"backend {name} to listen", up, timeout_s, 0.02)

    def signal_backend(self, name: str, sig: int) -> float:
        p = self.backend_procs[name]
        t = time.monotonic()
        if p.running:
            os.kill(p.proc.pid, sig)
        if sig == signal.SIGKILL:
            p.proc.wait(5.0)
        return t

    def stop_backend(self, name: str) -> None:
        """Graceful: SIGCONT (in case), SIGTERM, wait (SIGKILL after 5 s)."""
        p = self.backend_procs[name]
        if not p.running:
            return
        os.kill(p.proc.pid, signal.SIGCONT)
        os.kill(p.proc.pid, signal.SIGTERM)
        try:
            p.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            os.kill(p.proc.pid, signal.SIGKILL)
            p.proc.wait(5.0)

    def journal_entries(self) -> list[tuple[float, str, str, str, str]]:
        """(time, backend, method, client id, peer address) of every journaled request."""
        out = []
        for b in self.backend_names:
            try:
                text = self.journal(b).read_text(encoding="ascii", errors="replace")
            except FileNotFoundError:
                continue
            for line in text.splitlines():
                parts = line.split()
                if len(parts) == 4:
                    out.append((float(parts[0]), b, parts[1], parts[2], parts[3]))
        return out

    # -- load balancers -----------------------------------------------------------------

    def config_path(self, node: str) -> Path:
        return self.workdir / f"{node}.toml"

    def write_config(self, node: str, variant: str = "") -> None:
        text = node_config(self.base, node, addr=self.addr, vip=self.vip,
                           key_file=str(self.key_file), token_file=str(self.token_file),
                           settings=self.settings, variant=variant)
        tmp = self.config_path(node).with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.config_path(node))  # a reload never reads half a file

    def start_lb(self, node: str) -> Proc:
        if node in self.lbs and self.lbs[node].running:
            raise DemoError(f"{node} already runs (pid {self.lbs[node].proc.pid})")
        if not self.config_path(node).exists():
            self.write_config(node)
        with open(self.log(node), "ab") as f:
            f.write(f"--- start at {time.monotonic():.6f}\n".encode())
        argv = [self.python, "-m", "lb", "run", "-c", str(self.config_path(node))]
        p = Proc(node, self._popen(node, argv, self.log(node)), time.monotonic())
        self.lbs[node] = p
        return p

    def start_pair(self, timeout_s: float = 20.0) -> None:
        if self.watch is None:
            self.watch = VipWatch(self.topo, LBS, self.vip)
        for node in LBS:
            self.start_lb(node)
        self.wait_for("lb1 MASTER and lb2 BACKUP", lambda: (self.role("lb1"), self.role("lb2"))
                      == ("MASTER", "BACKUP"), timeout_s, 0.05)

    def lb_running(self, node: str) -> bool:
        p = self.lbs.get(node)
        return p is not None and p.running

    def spared_pids(self) -> set[int]:
        """Processes in a node's namespace that signal_node leaves alone (none here)."""
        return set()

    def signal_node(self, node: str, sig: int) -> float:
        """`sig` to every process of the node (control and workers) at once."""
        spared = self.spared_pids()
        pids = [pid for pid in self.topo.pids(node) if pid not in spared]
        t = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if sig == signal.SIGKILL and node in self.lbs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.lbs[node].proc.wait(5.0)
        return t

    def signal_control(self, node: str, sig: int) -> float:
        """`sig` to the control process only (SIGTERM, SIGHUP, SIGUSR1)."""
        t = time.monotonic()
        p = self.lbs[node]
        if p.running:
            os.kill(p.proc.pid, sig)
        return t

    def stop_lb(self, node: str, timeout_s: float = 10.0) -> None:
        p = self.lbs.get(node)
        if p is None or not p.running:
            return
        os.kill(p.proc.pid, signal.SIGTERM)
        try:
            p.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.signal_node(node, signal.SIGCONT)
            self.signal_node(node, signal.SIGKILL)

    # -- looking ------------------------------------------------------------------------

    def admin(self, node: str, method: str, path: str, timeout_s: float = 2.0
              ) -> tuple[int, Any]:
        """A call to the node's admin API (inside its namespace); (0, error) if unreachable."""
        try:
            return self.topo.call(node, _http, method, path,
                                  self.token if method == "POST" else None, timeout_s)
        except OSError as exc:  # the namespace itself (setns), not the API
            return 0, f"{type(exc).__name__}: {exc}"

    def status(self, node: str, timeout_s: float = 1.0) -> dict[str, Any] | None:
        if not self.lb_running(node):
            return None
        code, body = self.admin(node, "GET", "/status", timeout_s)
        return body if code == 200 and isinstance(body, dict) else None

    def role(self, node: str) -> str | None:
        st = self.status(node)
        return None if st is None else str(st.get("role"))

    def master(self) -> str | None:
        """The only MASTER, or None when there is none or more than one."""
        masters = [n for n in LBS if self.role(n) == "MASTER"]
        return masters[0] if len(masters) == 1 else None

    def backend_states(self, st: dict[str, Any]) -> dict[str, dict[str, Any]]:
        for p in st.get("pools", []):
            return {b["name"]: b for b in p["backends"]}
        return {}

    def worker_pids(self, node: str) -> list[int]:
        st = self.status(node)
        return [] if st is None else [int(w["pid"]) for w in st["workers"] if w.get("pid")]

    def holding(self) -> set[str]:
        return set() if self.watch is None else self.watch.holding()

    def wait_for(self, what: str, cond: Callable[[], bool], timeout_s: float,
                 poll_s: float = 0.02) -> float:
        """Poll until cond() holds; the time it first held. DemoError with the logs if not."""
        deadline = time.monotonic() + timeout_s
        while True:
            if cond():
                return time.monotonic()
            if time.monotonic() > deadline:
                logs = "\n".join(f"== {n} log ==\n{self.log_tail(n, 15)}" for n in LBS)
                raise DemoError(f"timed out after {timeout_s:g} s waiting for {what}\n{logs}")
            time.sleep(poll_s)

    def steady_problem(self, backends_up: Sequence[str] | None = None) -> str | None:
        """Why the pair is not in a steady state now, or None: one MASTER, one BACKUP, both
        healthy, the VIP on the MASTER only (kernel), `backends_up` in rotation on both."""
        want = self.backend_names if backends_up is None else backends_up
        sts = {n: self.status(n) for n in LBS}
        roles = {n: (st or {}).get("role") for n, st in sts.items()}
        masters = [n for n, r in roles.items() if r == "MASTER"]
        if len(masters) != 1 or sorted(str(r) for r in roles.values()) != ["BACKUP", "MASTER"]:
            return f"roles {roles}"
        for n, st in sts.items():
            assert st is not None
            states = self.backend_states(st)
            down = [b for b in want if not states.get(b, {}).get("in_rotation")]
            if down:
                return f"{n}: not in rotation: {down}"
        if self.holding() != {masters[0]}:
            return f"VIP held by {sorted(self.holding())} (kernel), MASTER is {masters[0]}"
        return None

    # -- actions ------------------------------------------------------------------------

    def set_admin_state(self, backend: str, action: str) -> dict[str, float]:
        """drain / enable / maintenance on every running node; when each answered."""
        pool = self.base.listener[0].pool
        done: dict[str, float] = {}
        for node in LBS:
            if not self.lb_running(node):
                continue
            code, body = self.admin(node, "POST", f"/backends/{pool}/{backend}/{action}")
            if code != 200:
                raise DemoError(f"{action} {backend} on {node}: {code} {body}")
            done[node] = time.monotonic()
        return done

    def switchover(self, node: str) -> tuple[float, dict[str, Any]]:
        """Admin API switchover on `node` (returns once the peer holds the VIP)."""
        t = time.monotonic()
        code, body = self.admin(node, "POST", "/failover/switchover", timeout_s=8.0)
        if code != 200:
            raise DemoError(f"switchover on {node}: {code} {body}")
        return t, body

    # -- load ---------------------------------------------------------------------------

    def start_load(self, out: Path, *, rate: float, duration_s: float, timeout_s: float = 2.0,
                   post_every: int = 4, prefix: str = "r", slow_every: int = 0,
                   slow_s: float = 0.2) -> Proc:
        argv = [self.python, "-m", "lab.load", f"{self.vip}:{self.listen_port}", str(out),
                "--rate", str(rate), "--duration", str(duration_s), "--timeout", str(timeout_s),
                "--max-requests", str(int(rate * duration_s * 1.2) + 100),
                "--post-every", str(post_every), "--prefix", prefix,
                "--slow-every", str(slow_every), "--slow", str(slow_s)]
        self.load = Proc("load", self._popen(CLIENT, argv, self.log("load")), time.monotonic())
        return self.load

    def stop_load(self) -> None:
        if self.load is None or not self.load.running:
            return
        os.kill(self.load.proc.pid, signal.SIGTERM)
        try:
            self.load.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            os.kill(self.load.proc.pid, signal.SIGKILL)
            self.load.proc.wait(5.0)

    # -- --keep -------------------------------------------------------------------------

    def start_forwarder(self, ports: dict[str, int]) -> int:
        """A detached loopback forwarder: 127.0.0.1:ports[lbN] -> lbN's admin, and
        ports['vip'] -> the VIP from the client namespace. Returns its pid."""
        specs = [f"{ports[n]}={self.topo[n].netns}:127.0.0.1:{ADMIN_PORT}" for n in LBS]
        specs.append(f"{ports['vip']}={self.topo[CLIENT].netns}:{self.vip}:{self.listen_port}")
        with open(self.log("forward"), "ab") as out:
            proc = subprocess.Popen([self.python, "-m", "lab.cluster", "forward", *specs],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    env=self._env(), start_new_session=True)
        return proc.pid


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kept_runs(tmp: str | None = None) -> list[dict[str, Any]]:
    """State of every demo left running with --keep (or crashed) on this host."""
    import tempfile

    root = Path(tmp or tempfile.gettempdir())
    out = []
    for f in sorted(root.glob(f"{WORKDIR_PREFIX}*/{STATE_FILE}")):
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(f.read_text(encoding="utf-8"))
            if isinstance(state, dict):
                out.append(state)
    return out


def is_ours(pid: int, needle: str) -> bool:
    """Whether `pid` runs a command line containing `needle` (never signal a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return needle.encode() in f.read().replace(b"\0", b" ")
    except OSError:
        return False


def cleanup_run(state: dict[str, Any]) -> list[str]:
    """Remove one demo run: its forwarder (by pid, checked), namespaces and work dir."""
    import shutil

    done = []
    fwd = state.get("forwarder_pid")
    if isinstance(fwd, int) and is_ours(fwd, "lab.cluster forward"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(fwd, signal.SIGTERM)
        done.append(f"stopped forwarder pid {fwd}")
    prefix = str(state.get("prefix", ""))
    with contextlib.suppress(ValueError):
        done += [f"removed namespace {n}" for n in netns.cleanup(prefix)]
    workdir = Path(str(state.get("workdir", "")))
    if workdir.name.startswith(WORKDIR_PREFIX) and workdir.is_dir():
        shutil.rmtree(workdir, ignore_errors=True)
        done.append(f"removed {workdir}")
    return done


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["backend"] and len(argv) == 4:
        return backend_main(argv[1], argv[2], argv[3])
    if argv[:1] == ["forward"] and len(argv) > 1:
        return forward_main(argv[1:])
    print("usage: python -m lab.cluster backend NAME HOST:PORT JOURNAL | "
          "forward PORT=NETNS:HOST:PORT ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
