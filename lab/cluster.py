"""The demo's pair: a client, two pairlb nodes and three backends in namespaces.

Shared by ``pairlb demo`` (lab/demo.py) and the chaos suite (bench/chaos.py). ``Cluster`` is
a lab.pair.Pair (the topology, the nodes' and backends' processes, their logs, the admin
API, the kernel's record of the VIP) whose nodes run the embedded default config moved into
the topology (same listener, pool, backend names, ports and weights; ``[failover]`` and
``[admin]`` added: `node_config`), with the failover key and an admin token in a work
directory. On top it knows how to hurt the pair (kill, stop, reload, drain, switch over) and
how to look at it without trusting it:

- the load generator (lab.load) in the client namespace records every request;
- the backends' journals (lab.pair's backend helper) record every request that reached one;
- the VIP watch (lab.vipwatch) is the kernel's own record of who held the VIP when.

HTTPS (the demo's, optional): `make_demo_tls` makes a CA and a certificate for
``demo.pairlb.test`` and the VIP with the openssl CLI in the work directory; with
``Cluster.tls`` set, both nodes also serve it on VIP:8443 (no ticket key configured: both
derive it from the failover key, so a client resumes its TLS session on the peer).
`HttpsProbe` is a client in the client namespace that sends one HTTPS GET at a time on a new
connection, offering the session it got last, and records what happened (who answered,
resumed or not, certificate errors).

Run as a script it is a helper program: ``forward PORT=NETNS:HOST:PORT ...`` (a loopback
TCP forwarder from the root namespace into the namespaces, so ``--keep`` can print admin
URLs a browser can open).

Imports lab.pair, lb.config and failover's public names only (ssl and the openssl CLI for
the HTTPS part).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import Any

from lab import netns
from lab.pair import (
    ADMIN_PORT,
    CLIENT,
    LBS,
    Backend,
    Pair,
    PairError,
    Proc,
    child_env,
    failover_toml,
    is_ours,
)
from lb import config as config_mod

STATE_FILE = "demo-state.json"
WORKDIR_PREFIX = "pairlb-demo-"


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


def default_layout() -> tuple[config_mod.Config, list[Backend]]:
    """The embedded default config and its backends (names, ports, weights)."""
    base = config_mod.loads(config_mod.DEFAULT_CONFIG_TOML, "<embedded default>")
    pool = base.pool_by_name(base.listener[0].pool)
    return base, [Backend(b.name, b.host_port[1], b.weight) for b in pool.backends]


# -- HTTPS ------------------------------------------------------------------------------------

HTTPS_NAME = "demo.pairlb.test"
HTTPS_PORT = 8443


class DemoTlsUnavailable(Exception):
    """The demo's certificates could not be made (the message says why, in a few words)."""


@dataclass(frozen=True)
class DemoTls:
    """The demo's HTTPS: a CA made at start, and a certificate it signed for `name`."""

    ca: Path
    cert: Path
    """The certificate, then the CA (the chain as served)."""
    key: Path
    name: str = HTTPS_NAME
    port: int = HTTPS_PORT


def make_demo_tls(directory: Path, ips: Sequence[str], name: str = HTTPS_NAME,
                  days: int = 2) -> DemoTls:
    """A CA and an ECDSA P-256 certificate for `name` and `ips` it signed, made with the
    openssl CLI (as an operator would) in `directory`; the key mode 0600."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise DemoTlsUnavailable("the openssl command is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "demo-ca.pem", directory / "demo-ca.key"
    key, csr = directory / "demo.key", directory / "demo.csr"
    leaf, cert, ext = directory / "demo.leaf.pem", directory / "demo.pem", directory / "demo.ext"
    san = ",".join([f"DNS:{name}", *(f"IP:{ip}" for ip in ips)])
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n", encoding="ascii")
    steps = [
        ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ca_key)],
        ["req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", str(days), "-subj",
         "/CN=pairlb demo CA", "-out", str(ca)],
        ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)],
        ["req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(csr)],
        ["x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-sha256", "-days", str(days), "-extfile", str(ext), "-out",
         str(leaf)],
    ]
    old = os.umask(0o077)  # the keys are born 0600
    try:
        for argv in steps:
            try:
                done = subprocess.run([openssl, *argv], capture_output=True, timeout=30,
                                      stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise DemoTlsUnavailable(f"openssl {argv[0]}: {exc}") from None
            if done.returncode != 0:
                last = (done.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]
                raise DemoTlsUnavailable(f"openssl {argv[0]} failed: {last}")
    finally:
        os.umask(old)
    cert.write_bytes(leaf.read_bytes() + ca.read_bytes())
    cert.chmod(0o644)
    ca.chmod(0o644)
    key.chmod(0o600)
    return DemoTls(ca, cert, key, name)


def tls_listener_toml(lst_name: str, bind: str, pool: str, tls: DemoTls) -> str:
    """The demo's HTTPS listener (no ticket_key_file: derived from the failover key)."""
    return f"""
[[listener]]
name = "{lst_name}-tls"
bind = "{bind}"
mode = "http"
pool = "{pool}"

[listener.tls]
certificates = [
  {{ cert_file = "{tls.cert}", key_file = "{tls.key}" }},
]
"""


@dataclass(frozen=True)
class HttpsRecord:
    """One HTTPS request of the probe, as the client saw it."""

    t0: float
    t1: float
    status: int
    peer: str
    """The X-Peer of the answer: the address of the node that carried it."""
    reused: bool
    """The TLS session the client offered was resumed."""
    tries: int
    """Connections it took (more than 1: the first ones failed before an answer)."""
    error: str
    """"-", "certificate" (verification failed: never retried), or the last error."""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error == "-"


def https_get(host: str, port: int, name: str, ctx: ssl.SSLContext,
              session: ssl.SSLSession | None, timeout_s: float
              ) -> tuple[int, str, bool, ssl.SSLSession | None]:
    """GET / on a new TLS connection offering `session`: (status, X-Peer, resumed, the
    session to offer next). Runs in the namespace of the thread that calls it."""
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(sock, server_hostname=name, session=session) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
                      .encode())
            resp = HTTPResponse(s)
            resp.begin()
            resp.read()
            # A TLS 1.3 ticket arrives after the handshake: read with the response.
            return (resp.status, resp.getheader("X-Peer") or "-", bool(s.session_reused),
                    s.session)


class HttpsProbe:
    """HTTPS GETs to the VIP from the client namespace, one every `every_s` on a new
    connection offering the last session (as a browser resumes). A connection that fails
    before an answer is tried again 20 ms later until `timeout_s` (a browser reconnects);
    a certificate error is recorded at once. Bounded by `max_requests` and stop()."""

    RETRY_S = 0.02

    def __init__(self, pair: Pair, host: str, tls: DemoTls, *, every_s: float = 0.25,
                 timeout_s: float = 2.0, max_requests: int = 10_000) -> None:
        self.pair = pair
        self.host = host
        self.tls = tls
        self.every_s = every_s
        self.timeout_s = timeout_s
        self.max_requests = max_requests
        self.records: list[HttpsRecord] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="https-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout_s + 5.0)

    def snapshot(self) -> list[HttpsRecord]:
        with self._lock:
            return list(self.records)

    def _run(self) -> None:
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        session: ssl.SSLSession | None = None
        due = time.monotonic()
        for _ in range(self.max_requests):
            if self._stop.is_set():
                return
            rec, session = self._one(ctx, session)
            with self._lock:
                self.records.append(rec)
            due = max(due + self.every_s, time.monotonic())
            if self._stop.wait(max(0.0, due - time.monotonic())):
                return

    def _one(self, ctx: ssl.SSLContext, session: ssl.SSLSession | None
             ) -> tuple[HttpsRecord, ssl.SSLSession | None]:
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
        tries, error = 0, "-"
        while True:
            tries += 1
            left = max(0.05, deadline - time.monotonic())
            try:
                status, peer, reused, new = self.pair.topo.call(
                    CLIENT, https_get, self.host, self.tls.port, self.tls.name, ctx, session,
                    left)
            except ssl.SSLCertVerificationError:
                return HttpsRecord(t0, time.monotonic(), 0, "-", False, tries,
                                   "certificate"), session
            except (OSError, ssl.SSLError, HTTPException) as exc:
                error = type(exc).__name__
                if self._stop.is_set() or time.monotonic() + self.RETRY_S >= deadline:
                    return HttpsRecord(t0, time.monotonic(), 0, "-", False, tries,
                                       error), session
                time.sleep(self.RETRY_S)
                continue
            return HttpsRecord(t0, time.monotonic(), status, peer, reused, tries,
                               "-" if status == 200 else f"http{status}"), new or session


# -- node configs -------------------------------------------------------------------------------


def node_config(
    base: config_mod.Config, node: str, *, addr: dict[str, str], vip: str, key_file: str,
    token_file: str, settings: Settings, variant: str = "", tls: DemoTls | None = None,
    state_dir: str | None = None,
) -> str:
    """TOML for `node`: the embedded default moved into the topology, plus failover/admin
    (and, with `tls`, an HTTPS listener on VIP:tls.port in front of the same pool).

    variant "alt" changes one pool setting (a valid reload that changes the pool), "broken"
    is a config with an error (a reload that must be refused).
    """
    s = settings
    lst = base.listener[0]
    pool = base.pool_by_name(lst.pool)
    failover = failover_toml(node, addr=addr, vip=vip, key_file=key_file,
                             priority=s.priorities[LBS.index(node)], interval_s=s.interval_s,
                             down_after=s.down_after, preempt=s.preempt)
    backends = ",\n".join(
        f'  {{ name = "{b.name}", address = "{addr[b.name]}:{b.host_port[1]}", '
        f"weight = {b.weight} }}" for b in pool.backends)
    connect = 0.4 if variant == "alt" else 0.5
    broken = 'weight = "heavy"\n' if variant == "broken" else ""
    https = "" if tls is None else tls_listener_toml(lst.name, f"{vip}:{tls.port}", pool.name,
                                                     tls)
    text = f"""\
# Written by pairlb demo: the embedded default config moved into the demo's namespaces,
# plus [failover] and [admin]. Timers are faster than the defaults so the story is quick.
[node]
name = "{node}"
workers = {s.workers}
shutdown_timeout_s = {s.shutdown_timeout_s}
{f'state_dir = "{state_dir}"' if state_dir else ""}

[[listener]]
name = "{lst.name}"
bind = "{vip}:{lst.host_port[1]}"
mode = "{lst.mode}"
pool = "{pool.name}"
{https}
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

{failover}
[admin]
bind = "127.0.0.1:{ADMIN_PORT}"
token_file = "{token_file}"
"""
    if variant != "broken":
        config_mod.loads(text, f"<demo config of {node}>")  # a bug here must not reach a node
    return text


# -- helper programs ------------------------------------------------------------------------


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


# -- the demo's pair --------------------------------------------------------------------------


class DemoError(PairError):
    """The demo network could not reach a state it needs (the message says which)."""


class Cluster(Pair):
    """The demo's pair, its load and what was done to them. Use as a context manager."""

    error = DemoError
    evidence_lines = 15

    def __init__(self, workdir: Path, settings: Settings | None = None,
                 python: str = sys.executable) -> None:
        self.settings = settings or Settings()
        self.base, backends = default_layout()
        self.load: Proc | None = None
        self.tls: DemoTls | None = None
        """Set (make_demo_tls) before the nodes start: they serve HTTPS too."""
        super().__init__(workdir, backends, python)
        try:
            self.listen_port = self.base.listener[0].host_port[1]
            self.token_file = self.workdir / "admin.token"
            self.token = os.urandom(16).hex()
            import failover

            failover.write_secret(str(self.token_file), self.token.encode() + b"\n")
            self.write_state()
        except BaseException:
            self.close()
            raise

    def write_state(self, **extra: Any) -> None:
        """What `pairlb demo --cleanup` needs to remove this run (prefix, pids we own)."""
        state = {"prefix": self.prefix, "workdir": str(self.workdir), "pid": os.getpid(),
                 **extra}
        (self.workdir / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")

    def close(self) -> None:
        """Stop the load, then as Pair.close (nothing else with `keep`); safe to call twice."""
        self.stop_load()
        super().close()

    # -- load balancers -----------------------------------------------------------------

    def config_text(self, node: str, variant: str = "") -> str:
        return node_config(self.base, node, addr=self.addr, vip=self.vip,
                           key_file=str(self.key_file), token_file=str(self.token_file),
                           settings=self.settings, variant=variant, tls=self.tls,
                           state_dir=str(self.workdir / f"{node}-state"))

    def write_config(self, node: str, variant: str = "") -> None:
        """Install `node`'s config (a reload is the caller's: SIGHUP)."""
        self.install_config(node, self.config_text(node, variant))

    def start_lb(self, node: str, config: str | None = None) -> Proc:
        """Start `node`; a node that has no config yet gets the default variant's."""
        if config is None and not self.config_path(node).exists():
            config = self.config_text(node)
        return super().start_lb(node, config)

    def start_pair(self, timeout_s: float = 20.0) -> None:
        for node in LBS:
            self.start_lb(node)
        self.wait_for("lb1 MASTER and lb2 BACKUP", lambda: (self.role("lb1"), self.role("lb2"))
                      == ("MASTER", "BACKUP"), timeout_s, 0.05)

    # -- looking ------------------------------------------------------------------------

    def backend_states(self, st: dict[str, Any]) -> dict[str, dict[str, Any]]:
        for p in st.get("pools", []):
            return {b["name"]: b for b in p["backends"]}
        return {}

    def worker_pids(self, node: str) -> list[int]:
        st = self.status(node)
        return [] if st is None else [int(w["pid"]) for w in st["workers"] if w.get("pid")]

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
        self.load = Proc("load", self.popen(CLIENT, argv, self.log_path("load")),
                         time.monotonic())
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
        with open(self.log_path("forward"), "ab") as out:
            proc = subprocess.Popen([self.python, "-m", "lab.cluster", "forward", *specs],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    env=child_env(), start_new_session=True)
        return proc.pid


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
    if argv[:1] == ["forward"] and len(argv) > 1:
        return forward_main(argv[1:])
    print("usage: python -m lab.cluster forward PORT=NETNS:HOST:PORT ...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
