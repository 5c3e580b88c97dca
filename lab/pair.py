"""A pairlb pair in network namespaces: what the demo's Cluster and the failover Rig share.

Topology (lab.netns, one bridge, TEST-NET-1): client .11, lb1 .12, lb2 .13, one host per
backend from .14, the VIP .100. `Pair` builds it, writes the failover key into its work
directory, watches the VIP from inside lb1 and lb2 (lab.vipwatch.VipWatch: the kernel's own
record of who held it when), and owns every process it starts there:

- the nodes: ``python -m lb run -c WORKDIR/NODE.toml`` in lb1 and lb2: start, signal the
  whole node or its control process only, stop gracefully. Each has a log file in which
  every start is marked (``--- start N at MONOTONIC``); `log_time` reads the node's own
  time stamps after the latest mark;
- the backends: ``python -m lab.pair backend NAME HOST:PORT JOURNAL`` is lab.backend_app plus
  an ``X-Peer`` response header (the address the request came from: the load balancer's own,
  so a client knows which node carried it; pairlb's Via names no node), an ``X-Seen-Proto``
  response header and ``GET /whoami`` (the X-Forwarded-Proto the request arrived with: a
  client of an HTTPS listener can tell the backend learnt it was HTTPS) and a journal of
  every request that has an ``X-Client-Id``, one write(2) per request so it survives kill -9.

It looks at them without trusting them: each node's admin API from inside its namespace
(its own 127.0.0.1:9900) through lb.admin.client, the kernel's address events, and
`wait_for`, whose error carries the tail of both nodes' logs.

What a pair runs is its subclass's: the node config (given to `start_lb`, or installed
before it; `failover_toml` writes the ``[failover]`` section both configs share), its error
type, and what its callers do on top. lab.cluster.Cluster is the demo's and the chaos
bench's (the embedded default config, an admin token, load); lab.pair_rig.Rig is the
failover tests' and benchmarks' (PairSettings, a prober, the scenarios).

Run as a script it is the backend helper program. Imports lab.netns and lb.admin.client at
the top; lb.config, failover, aiohttp and pyroute2 (lab.vipwatch) only where they are used,
so the helper starts fast.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Self

from lab import netns
from lb.admin import client

if TYPE_CHECKING:
    from lab.vipwatch import VipWatch

CLIENT = "client"
LBS = ("lb1", "lb2")
VIP_HOST = 100
ADMIN_PORT = 9900
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
"""The source tree this lab belongs to (on every child's PYTHONPATH)."""


class PairError(RuntimeError):
    """The pair could not reach a state it needs (the message says which, with evidence)."""


@dataclass(frozen=True)
class Backend:
    name: str
    port: int
    weight: int = 1


@dataclass
class Proc:
    """A process we started in a namespace (`ip netns exec` execs, so pid is the program)."""

    name: str
    proc: subprocess.Popen[bytes]
    started_at: float

    @property
    def running(self) -> bool:
        return self.proc.poll() is None


def child_env() -> dict[str, str]:
    """The environment of everything the lab starts: this source tree first on
    PYTHONPATH, unbuffered output."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": PACKAGE_ROOT + (os.pathsep + path if path else "")}


def is_ours(pid: int, needle: str) -> bool:
    """Whether `pid` runs a command line containing `needle` (never signal a reused pid)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return needle.encode() in f.read().replace(b"\0", b" ")
    except OSError:
        return False


def admin_call(base: str, method: str, path: str, token: str | None, timeout_s: float,
               body: Any = None) -> tuple[int, Any]:
    """One admin API call through lb.admin.client (the project's one admin client), ``body``
    sent as JSON; (status, parsed JSON or text), or (0, the error) when nothing (whole)
    answered."""
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}
    try:
        status, _, raw = client.exchange(method, base + path, token=token, body=data,
                                         headers=headers, timeout_s=timeout_s)
    except (OSError, http.client.HTTPException) as exc:
        return 0, f"{type(exc).__name__}: {exc}"
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def failover_toml(node: str, *, addr: Mapping[str, str], vip: str, key_file: str | Path,
                  priority: int, interval_s: float, down_after: int, preempt: bool,
                  more: str = "") -> str:
    """`node`'s ``[failover]`` section: the VIP (/24) on its eth0, the other node its peer,
    heartbeats from its own address, the pair's key; `more` is lines of the caller's own."""
    peer = LBS[1 - LBS.index(node)]
    return f"""\
[failover]
interface = "{netns.NODE_IFNAME}"
vips = ["{vip}/24"]
priority = {priority}
peers = ["{addr[peer]}"]
bind = "{addr[node]}"
key_file = "{key_file}"
interval_s = {interval_s}
down_after = {down_after}
preempt = {str(preempt).lower()}
{more}"""


def _local_admin(method: str, path: str, token: str | None, timeout_s: float,
                 body: Any = None) -> tuple[int, Any]:
    return admin_call(f"http://127.0.0.1:{ADMIN_PORT}", method, path, token, timeout_s, body)


class Pair:
    """The topology, its processes and how to look at them. Use as a context manager."""

    error: ClassVar[type[Exception]] = PairError
    """What wait_for and the other checks raise (the subclass's own type)."""
    evidence_lines: ClassVar[int] = 40
    """Lines of each node's log a wait_for timeout shows."""

    def __init__(self, workdir: Path, backends: Sequence[Backend],
                 python: str = sys.executable) -> None:
        self.workdir = workdir
        self.python = python
        self.source = Path(PACKAGE_ROOT)
        """The source tree `pairlb run` starts from (bench/pair_scale.py can name another)."""
        self.backends = list(backends)
        self.backend_names = [b.name for b in self.backends]
        self.nodes = (CLIENT, *LBS, *self.backend_names)
        self.lbs: dict[str, Proc] = {}
        self.starts = dict.fromkeys(LBS, 0)
        self.backend_procs: dict[str, Proc] = {}
        self.token: str | None = None
        """The admin token POSTs carry (None: the nodes' admin takes no actions)."""
        self.keep = False
        """close() leaves everything running (pairlb demo --keep)."""
        self.topo = netns.build(self.nodes)
        try:
            self.vip = self.topo.host4(VIP_HOST)
            self.addr = {n: self.topo[n].ipv4 for n in self.nodes}
            self.node_of_addr = {v: k for k, v in self.addr.items()}
            self.key_file = self.workdir / "failover.key"
            import failover

            self.key = failover.write_key_file(str(self.key_file))
            from lab.vipwatch import VipWatch

            self.watch: VipWatch = VipWatch(self.topo, LBS, self.vip)
        except BaseException:
            self.topo.teardown()
            raise

    @property
    def prefix(self) -> str:
        return self.topo.prefix

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the watch and, unless `keep`, kill the nodes (a stopped one first wakes) and
        delete the namespaces with everything still in them. Safe to call twice."""
        with contextlib.suppress(Exception):
            self.watch.close()
        if self.keep:
            return
        for node in list(self.lbs):
            with contextlib.suppress(Exception):
                self.signal_node(node, signal.SIGCONT)
                self.signal_node(node, signal.SIGKILL)
        self.topo.teardown()

    def popen(self, node: str, argv: list[str], log: Path, *, cwd: Path | None = None
              ) -> subprocess.Popen[bytes]:
        """argv in `node`'s namespace, stdout and stderr appended to `log`. A session of its
        own: Ctrl-C in the terminal reaches only us, and we tear down in order."""
        with open(log, "ab") as out:
            return self.topo.popen(node, argv, stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=out, env=child_env(), cwd=cwd,
                                   start_new_session=True)

    # -- logs --------------------------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def log_text(self, name: str) -> str:
        try:
            return self.log_path(name).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, name: str, lines: int = 40) -> str:
        return "\n".join(self.log_text(name).splitlines()[-lines:])

    def log_time(self, node: str, needle: str, after: float | None = None) -> float | None:
        """Monotonic time of the first log line of the node's latest start containing
        `needle` (log stamps are wall clock with ms; converted with the current offset);
        with `after`, the first one at or after that time (less the stamps' 1 ms)."""
        text = self.log_text(node)
        last_start = text.rfind("--- start ")
        offset = time.time() - time.monotonic()
        for line in text[max(0, last_start):].splitlines():
            if needle in line and line[:4].isdigit():
                stamp = line.split()[0].rstrip("Z")
                wall = time.mktime(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
                wall += float("0" + stamp[19:]) - time.timezone
                if after is None or wall - offset >= after - 0.001:
                    return wall - offset
        return None

    # -- backends ----------------------------------------------------------------------------

    def journal(self, name: str) -> Path:
        return self.workdir / f"{name}.journal"

    def start_backend(self, name: str) -> Proc:
        port = next(b.port for b in self.backends if b.name == name)
        argv = [self.python, "-m", "lab.pair", "backend", name, f"{self.addr[name]}:{port}",
                str(self.journal(name))]
        p = Proc(name, self.popen(name, argv, self.log_path(name)), time.monotonic())
        self.backend_procs[name] = p
        return p

    def start_backends(self, timeout_s: float = 15.0) -> None:
        for name in self.backend_names:
            self.start_backend(name)
        for name in self.backend_names:
            self.wait_backend(name, timeout_s)

    def wait_backend(self, name: str, timeout_s: float = 10.0) -> float:
        """Until the client can connect to it; raises at once if it exited."""
        port = next(b.port for b in self.backends if b.name == name)
        p = self.backend_procs[name]

        def up() -> bool:
            if not p.running:
                raise self.error(f"backend {name} exited:\n{self.log_tail(name)}")
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

    # -- the nodes ---------------------------------------------------------------------------

    def config_path(self, node: str) -> Path:
        return self.workdir / f"{node}.toml"

    def install_config(self, node: str, text: str) -> None:
        """Write the node's config file (by rename: a reload never reads half a file)."""
        tmp = self.config_path(node).with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(self.config_path(node))

    def start_lb(self, node: str, config: str | None = None) -> Proc:
        """``pairlb run`` in `node` (it must not run) with `config`, or with the config
        already installed there."""
        if self.lb_running(node):
            raise self.error(f"{node} already runs (pid {self.lbs[node].proc.pid})")
        if config is not None:
            self.install_config(node, config)
        self.starts[node] += 1
        with open(self.log_path(node), "ab") as f:
            f.write(f"--- start {self.starts[node]} at {time.monotonic():.6f}\n".encode())
        argv = [self.python, "-m", "lb", "run", "-c", str(self.config_path(node))]
        p = Proc(node, self.spawn_lb(node, argv), time.monotonic())
        self.lbs[node] = p
        return p

    def spawn_lb(self, node: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """How a node's processes start: output appended to its log, from `source`."""
        return self.popen(node, argv, self.log_path(node), cwd=self.source)

    def lb_running(self, node: str) -> bool:
        p = self.lbs.get(node)
        return p is not None and p.running

    def pids(self, node: str) -> list[int]:
        return self.topo.pids(node)

    def spared_pids(self) -> set[int]:
        """Processes in a node's namespace that signal_node leaves alone (none here)."""
        return set()

    def signal_node(self, node: str, sig: int, pids: Sequence[int] | None = None) -> float:
        """`sig` to every process of the node (control, failover and workers) at once, or
        to `pids`; SIGKILL waits for the control process. The time just before the first."""
        if pids is None:
            spared = self.spared_pids()
            pids = [pid for pid in self.pids(node) if pid not in spared]
        t = time.monotonic()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if sig == signal.SIGKILL and node in self.lbs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.lbs[node].proc.wait(5.0)
        return t

    def signal_control(self, node: str, sig: int) -> float:
        """`sig` to the control process only (SIGTERM: graceful stop, SIGHUP: reload,
        SIGUSR1: switchover)."""
        t = time.monotonic()
        p = self.lbs[node]
        if p.running:
            os.kill(p.proc.pid, sig)
        return t

    def stop_lb(self, node: str, timeout_s: float = 10.0) -> None:
        """Graceful stop and wait for the exit (SIGKILL to the whole node after the timeout)."""
        p = self.lbs.get(node)
        if p is None or not p.running:
            return
        os.kill(p.proc.pid, signal.SIGTERM)
        try:
            p.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.signal_node(node, signal.SIGCONT)
            self.signal_node(node, signal.SIGKILL)

    def failover_pid(self, node: str) -> int | None:
        """The node's failover process (its command line names lb.failoverd.main), if any."""
        return next((pid for pid in self.pids(node) if is_ours(pid, "lb.failoverd.main")),
                    None)

    # -- looking -----------------------------------------------------------------------------

    def admin(self, node: str, method: str, path: str, timeout_s: float = 2.0,
              body: Any = None) -> tuple[int, Any]:
        """A call to the node's admin API (inside its namespace); (0, error) if unreachable.
        Actions (anything but GET) carry the token."""
        try:
            return self.topo.call(node, _local_admin, method, path,
                                  self.token if method != "GET" else None, timeout_s, body)
        except OSError as exc:  # the namespace itself (setns), not the API
            return 0, f"{type(exc).__name__}: {exc}"

    def status(self, node: str, timeout_s: float = 1.0) -> dict[str, Any] | None:
        """GET /status of a running node, or None if it does not answer."""
        if not self.lb_running(node):
            return None
        code, body = self.admin(node, "GET", "/status", timeout_s)
        return body if code == 200 and isinstance(body, dict) else None

    def role(self, node: str) -> str | None:
        st = self.status(node)
        return None if st is None else str(st.get("role"))

    def failover(self, node: str) -> dict[str, Any]:
        """/status's failover section (raises when the node does not answer)."""
        st = self.status(node)
        if st is None or st.get("failover") is None:
            raise self.error(f"{node}: no status from the admin app\n{self.log_tail(node)}")
        fo: dict[str, Any] = st["failover"]
        return fo

    def master(self) -> str | None:
        """The only MASTER, or None when there is none or more than one."""
        masters = [n for n in LBS if self.role(n) == "MASTER"]
        return masters[0] if len(masters) == 1 else None

    def holding(self) -> set[str]:
        """The nodes whose kernel holds the VIP now."""
        return self.watch.holding()

    def wait_for(self, what: str, cond: Callable[[], bool], timeout_s: float,
                 poll_s: float = 0.02) -> float:
        """Poll until cond() holds; the time it first held (monotonic). `error` with the
        nodes' logs if it does not within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            if cond():
                return time.monotonic()
            if time.monotonic() > deadline:
                logs = "\n".join(f"== {n} log ==\n{self.log_tail(n, self.evidence_lines)}"
                                 for n in LBS)
                raise self.error(f"timed out after {timeout_s:g} s waiting for {what}\n{logs}")
            time.sleep(poll_s)

    def wait_role(self, node: str, role: str, timeout_s: float = 10.0) -> float:
        return self.wait_for(f"{node} to be {role}", lambda: self.role(node) == role, timeout_s)


# -- the backend helper program ---------------------------------------------------------------


def backend_main(name: str, address: str, journal: str) -> int:
    """lab.backend_app, plus X-Peer and X-Seen-Proto on every response, ``GET /whoami`` and
    a kill-proof journal.

    Journal line: ``MONOTONIC METHOD CLIENT_ID PEER``, written before the answer.
    ``/whoami`` answers ``NAME saw proto=XFP host=HOST peer=PEER`` (XFP ``-`` when the
    request had none): a page whose body says over what the load balancer received it.
    """
    from aiohttp import web
    from aiohttp.typedefs import Handler

    from lab.backend_app import make_app, parse_address

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
        response.headers["X-Seen-Proto"] = request.headers.get("X-Forwarded-Proto", "-")

    async def whoami(request: web.Request) -> web.Response:
        proto = request.headers.get("X-Forwarded-Proto", "-")
        return web.Response(text=f"{name} saw proto={proto} host={request.host} "
                                 f"peer={request.remote or '?'}\n")

    app.middlewares.append(journal_first)
    app.on_response_prepare.append(tag)
    app.router.add_get("/whoami", whoami)
    host, port = parse_address(address)
    web.run_app(app, host=host, port=port, print=None, access_log=None, handle_signals=True)
    return 0


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["backend"] and len(argv) == 4:
        return backend_main(argv[1], argv[2], argv[3])
    print("usage: python -m lab.pair backend NAME HOST:PORT JOURNAL", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
