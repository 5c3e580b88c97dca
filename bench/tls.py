#!/usr/bin/env python3
"""TLS termination benchmark: pairlb against HAProxy and nginx, in one run (issue 15).

Every server terminates TLS with the same ECDSA P-256 certificate (a test CA and a leaf for
bench.test and 127.0.0.1, made with the openssl CLI by lab/pki.py) in front of the
same nginx backends that bench/perf.py uses, and also serves plain HTTP on a second port of
the same process, so the plain ratio of the same run sits beside the TLS one. One worker
each: pairlb ``workers = 1`` (mode http, a ``[listener.tls]`` listener), HAProxy
``nbthread 1`` (``bind ... ssl crt PEM alpn http/1.1``; cert and key in one PEM), nginx
``worker_processes 1`` (``listen ... ssl``). The server under test is pinned to CPU 0, the
load generator and the backends to CPU 1 (as bench/perf.py does).

Workloads, interleaved: every round runs each (workload, server) once in a shuffled order;
the table shows the median over rounds.

- ``plain``: keep-alive HTTP, ``wrk -c50`` (the reference: bench/perf.py's 100 B case);
- ``keepalive``: keep-alive HTTPS, ``wrk -c50``: the cost of TLS records on a request;
- ``newconn``: ``wrk -c50 -H "Connection: close"`` over HTTPS: a new TCP connection and
  handshake per request. wrk keeps its SSL object across reconnects (SSL_shutdown then
  SSL_clear), so after the first connection of each slot it offers the previous session's
  ticket and every server here resumes: these are **resumed** handshakes (TLS 1.3
  PSK + ECDHE), not full ones. The notes show pairlb's own count of full and resumed
  handshakes to prove it;
- ``full``: ``openssl s_time -new`` (``--full-clients`` processes at once): a **full**
  handshake (certificate, ECDSA signature) and one HTTP/1.0 request per connection;
- idle memory (once per server, before the rounds, on fresh processes): after ``--idle-warm``
  warm-up connections, ``--idle-conns`` keep-alive connections that made one request each
  and stay open; the RSS delta of the server's processes / connections, plain and TLS.
  Use thousands: with a few hundred, memory the process freed at start-up is reused and
  the figure comes out low.

For each: requests (connections) per second, the ratio to HAProxy (median, and paired per
round), **server CPU microseconds per request** (utime+stime of the server's process tree
from /proc / requests: the per-core figure, which the load generator's limit does not
hide), p50/p99 from wrk (for ``newconn`` wrk starts its clock after the handshake), errors,
how busy each CPU was, and the foreign load (other people's processes).

A client handshake costs more than the server's (it verifies a signature and does the same
key exchange), so on one load core the handshake workloads are often load-generator bound:
then req/s ratios are squeezed towards 1 and the CPU-per-request ratio is the one to read
(the notes say which CPU was full).

Usage (results and their reading: docs/performance.md, "TLS termination")::

    .venv/bin/python bench/tls.py --markdown --json /tmp/tls.json   # defaults: under 5 min
    .venv/bin/python bench/tls.py --quick      # about 30 s: what tests/test_bench_tls_smoke.py runs

``--rounds``, ``--duration``, ``--servers``, ``--workloads``, ``--idle-conns`` narrow it;
``--budget`` (s) stops the waits for a quiet box and the repeats of disturbed runs once the
run would otherwise overrun it. Exit status: 0; 1 if a run failed or a server did not come
up (HAProxy not installed is only skipped); 2 if a tool is missing; 130 on Ctrl-C.

Only processes this script started are stopped, by PID, also on Ctrl-C, SIGTERM or error.
Imports nothing from lb: it measures the installed ``pairlb`` command (or ``--pairlb-cmd``).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import perf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab.pki import Pki  # noqa: E402  (certificates made with the openssl CLI)

ALL_SERVERS = ("pairlb", "haproxy", "nginx")
ALL_WORKLOADS = ("plain", "keepalive", "newconn", "full")
WORKLOAD_TITLE = {
    "plain": "plain HTTP keep-alive",
    "keepalive": "TLS keep-alive",
    "newconn": "TLS new conn, resumed (wrk Connection: close)",
    "full": "TLS new conn, full handshake (s_time -new)",
}
UNIT = {"plain": "req", "keepalive": "req", "newconn": "conn", "full": "conn"}
ROOT_ROLE = perf.ROOT_ROLE
CHILD_ROLE = perf.CHILD_ROLE
SNI = "bench.test"
SIZE = 100
"""Response body bytes (bench/perf.py's small case)."""


@dataclass
class Server:
    name: str
    plain_port: int
    tls_port: int
    proc: c.Managed
    admin_port: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    """What the start-up probe saw: protocol, cipher, whether a session resumed."""


@dataclass
class Sample:
    server: str
    workload: str
    round: int
    ok: bool
    error: str = ""
    requests: int = 0
    rps: float = 0.0
    server_cpu_s: float = 0.0
    cpu_us_per_req: float | None = None
    cpu_us_by_role: dict[str, float] = field(default_factory=dict)
    p50_us: float | None = None
    p99_us: float | None = None
    errors: int = 0
    load_cpu_s: float = 0.0
    """CPU time of the load generator (wrk or the s_time processes)."""
    backend_cpu_s: float = 0.0
    wall_s: float = 0.0
    cpu_busy: dict[str, float] = field(default_factory=dict)
    other_cores: float = 0.0
    steal_cores: float = 0.0
    attempts: int = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--duration", type=int, default=4, help="seconds per measured run (integer)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="seconds of unmeasured load before each")
    ap.add_argument(
        "--servers", default=",".join(ALL_SERVERS), help="subset of pairlb,haproxy,nginx"
    )
    ap.add_argument(
        "--workloads", default=",".join(ALL_WORKLOADS), help="subset of " + ",".join(ALL_WORKLOADS)
    )
    ap.add_argument("--connections", type=int, default=50, help="wrk -c")
    ap.add_argument("--full-clients", type=int, default=8, help="openssl s_time processes at once")
    ap.add_argument("--idle-conns", type=int, default=2000, help="idle TLS connections (0: skip)")
    ap.add_argument("--idle-warm", type=int, default=200, help="warm-up connections before those")
    ap.add_argument(
        "--idle-pause",
        type=float,
        default=1.0,
        help="seconds the RSS settles before it is read (half of it after the warm-up and "
        "after the connections close)",
    )
    ap.add_argument("--quick", action="store_true", help="a few seconds: for the smoke test")
    ap.add_argument("--json", type=Path, help="write every sample and the summary here")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    ap.add_argument(
        "--pairlb-cmd",
        default=perf.DEFAULT_PAIRLB_CMD,
        help="command template; placeholders {venv}, {config}, {python}",
    )
    ap.add_argument("--venv", type=Path, default=None, help="default: REPO/.venv or sys.prefix")
    ap.add_argument("--no-pin", action="store_true", help="never use taskset")
    ap.add_argument("--proxy-cpus", default="0", help="CPU list of the server under test")
    ap.add_argument("--load-cpus", default="1", help="CPU list of the load generator, backends")
    ap.add_argument("--start-timeout", type=float, default=30.0)
    ap.add_argument(
        "--settle", type=float, default=2.0, help="wait up to this for other load to drop"
    )
    ap.add_argument("--max-other", type=float, default=0.2, help="cores of other load: repeat")
    ap.add_argument("--noisy-retries", type=int, default=1)
    ap.add_argument(
        "--budget",
        type=float,
        default=280.0,
        help="seconds: past the share of it a run may take, no more settling or repeats",
    )
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--keep-workdir", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 1, 0
        args.settle, args.noisy_retries = 0.0, 0
        args.idle_conns, args.idle_warm, args.full_clients = min(args.idle_conns, 100), 20, 4
        args.idle_pause = min(args.idle_pause, 0.2)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.servers or set(args.servers) - set(ALL_SERVERS):
        ap.error(f"--servers: choose from {','.join(ALL_SERVERS)}")
    if not args.workloads or set(args.workloads) - set(ALL_WORKLOADS):
        ap.error(f"--workloads: choose from {','.join(ALL_WORKLOADS)}")
    for name in ("duration", "rounds", "connections", "full_clients"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.warmup < 0 or args.idle_conns < 0 or args.idle_warm < 0 or args.idle_pause < 0:
        ap.error("--warmup, --idle-conns, --idle-warm, --idle-pause: must be >= 0")
    if args.venv is None:
        args.venv = REPO / ".venv" if (REPO / ".venv").is_dir() else Path(sys.prefix)
    args.pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    return args


# --------------------------------------------------------------------------- configs


def make_certificate(workdir: Path) -> dict[str, Path]:
    """The one ECDSA P-256 leaf every server serves: chain, key, and both in one PEM."""
    leaf = Pki(workdir / "pki").leaf("bench", [SNI], ["127.0.0.1"])
    both = workdir / "pki" / "bench.haproxy.pem"
    both.write_bytes(leaf.cert.read_bytes() + leaf.key.read_bytes())
    both.chmod(0o600)
    return {"chain": leaf.cert, "key": leaf.key, "both": both}


def haproxy_config(
    workdir: Path, port: int, tls_port: int, backends: list[int], cert: dict[str, Path]
) -> Path:
    """bench/perf.py's HAProxy (frontend ``fe``) plus a TLS frontend to the same backend."""
    conf = c.write_haproxy(workdir, port, backends, nbthread=1)
    conf.write_text(
        conf.read_text()
        + f"""
frontend fe_tls
    bind 127.0.0.1:{tls_port} ssl crt {cert["both"]} alpn http/1.1
    default_backend be
"""
    )
    return conf


def nginx_config(
    workdir: Path, port: int, tls_port: int, backends: list[int], cert: dict[str, Path]
) -> Path:
    """bench/perf.py's nginx proxy with a second, TLS, ``listen`` in the same server block."""
    c.prepare_nginx_dirs(workdir, "nginx-proxy")
    conf = c.write_nginx_proxy(workdir, port, backends, workers=1)
    plain = f"        listen 127.0.0.1:{port} backlog=4096;\n"
    text = conf.read_text()
    if text.count(plain) != 1:
        raise RuntimeError("bench/_common.py's nginx proxy config changed: no single listen line")
    conf.write_text(
        text.replace(
            plain,
            plain
            + f"        listen 127.0.0.1:{tls_port} ssl backlog=4096;\n"
            + "        ssl_protocols TLSv1.2 TLSv1.3;\n"  # 1.22's default lacks 1.3
            + f"        ssl_certificate {cert['chain']};\n"
            + f"        ssl_certificate_key {cert['key']};\n",
        )
    )
    return conf


def pairlb_config(
    workdir: Path,
    port: int,
    tls_port: int,
    admin_port: int,
    backends: list[int],
    cert: dict[str, Path],
) -> Path:
    """bench/perf.py's pairlb config plus a second, TLS, listener on the same pool."""
    conf = perf.pairlb_config(workdir, port, admin_port, backends, workers=1)
    conf.write_text(
        conf.read_text()
        + f"""
[[listener]]
name = "bench-tls"
bind = "127.0.0.1:{tls_port}"
mode = "http"
pool = "bench"

[listener.tls]
certificates = [{{ cert_file = "{cert["chain"]}", key_file = "{cert["key"]}" }}]
"""
    )
    return conf


# --------------------------------------------------------------------------- TLS client


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def read_response(sock: socket.socket, until_eof: bool = False) -> int:
    """Read one HTTP response (Content-Length bodies, or to EOF); return its status."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the response head: {buf[:80]!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    if until_eof or length is None:
        while chunk := sock.recv(65536):
            body += chunk
    else:
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside the body")
            body += chunk
    return status


def request(
    port: int,
    *,
    tls: bool,
    ctx: ssl.SSLContext | None = None,
    session: ssl.SSLSession | None = None,
    http10: bool = False,
    keep: bool = False,
    timeout_s: float = 5.0,
) -> tuple[int, socket.socket, dict[str, Any]]:
    """One GET of the benchmark body; the socket is left open when ``keep``."""
    sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    info: dict[str, Any] = {}
    try:
        if tls:
            sock = (ctx or client_context()).wrap_socket(sock, server_hostname=SNI, session=session)
        if http10:  # what openssl s_time -www sends
            sock.sendall(f"GET {c.body_path(SIZE)} HTTP/1.0\r\n\r\n".encode())
        else:
            conn = "" if keep else "Connection: close\r\n"
            sock.sendall(f"GET {c.body_path(SIZE)} HTTP/1.1\r\nHost: {SNI}\r\n{conn}\r\n".encode())
        status = read_response(sock, until_eof=http10)
        if isinstance(sock, ssl.SSLSocket):
            cipher = sock.cipher()
            info = {
                "version": sock.version(),
                "cipher": cipher[0] if cipher else None,
                "alpn": sock.selected_alpn_protocol(),
                "reused": sock.session_reused,
                "session": sock.session,
            }
    except BaseException:
        sock.close()
        raise
    if not keep:
        sock.close()
    return status, sock, info


def wait_https_ok(port: int, timeout_s: float, proc: c.Managed, successes: int) -> None:
    deadline = time.monotonic() + timeout_s
    ok, last = 0, ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode}; log tail:\n{proc.log_tail()}"
            )
        try:
            status, _, _ = request(port, tls=True, timeout_s=2.0)
        except (OSError, ValueError, IndexError) as exc:
            status, last = 0, repr(exc)
        if status == 200:
            ok += 1
            if ok >= successes:
                return
            continue
        ok, last = 0, last or f"status {status}"
        time.sleep(0.05)
    raise RuntimeError(f"https://127.0.0.1:{port} gave no 200 within {timeout_s}s ({last})")


def probe(port: int) -> dict[str, Any]:
    """What a client gets: protocol and cipher, whether a session resumes, and whether the
    HTTP/1.0 request without Host that s_time sends is answered 200."""
    ctx = client_context()
    status, _, first = request(port, tls=True, ctx=ctx)
    status2, _, second = request(port, tls=True, ctx=ctx, session=first.pop("session"))
    status3, _, _ = request(port, tls=True, ctx=ctx, http10=True)
    second.pop("session", None)
    return {
        **first,
        "status": status,
        "resumes": bool(second.get("reused")) and status2 == 200,
        "http10_status": status3,
    }


# --------------------------------------------------------------------------- servers


def start_server(
    name: str,
    args: argparse.Namespace,
    workdir: Path,
    procs: c.ProcessSet,
    backends: list[int],
    cert: dict[str, Path],
) -> Server:
    cpus = args.proxy_cpus if args.pin else None
    port, tls_port, admin_port = c.free_ports(3)
    c.require_free([port, tls_port, admin_port])
    log = workdir / f"{name}.log"
    if name == "haproxy":
        conf = haproxy_config(workdir, port, tls_port, backends, cert)
        proc = procs.start(name, c.haproxy_argv(conf), log, cpus=cpus)
    elif name == "nginx":
        conf = nginx_config(workdir, port, tls_port, backends, cert)
        proc = procs.start(name, c.nginx_argv(conf, workdir), log, cpus=cpus)
    else:
        conf = pairlb_config(workdir, port, tls_port, admin_port, backends, cert)
        cmd = args.pairlb_cmd.format(venv=args.venv, config=conf, python=sys.executable)
        argv = shlex.split(cmd)
        if not argv or shutil.which(argv[0]) is None:
            raise RuntimeError(f"pairlb command not found: {argv[0] if argv else cmd!r}")
        proc = procs.start(name, argv, log, cpus=cpus)
    try:
        c.wait_http_ok(
            "127.0.0.1",
            port,
            c.body_path(SIZE),
            args.start_timeout,
            proc=proc,
            successes=2 * len(backends),
        )
        wait_https_ok(tls_port, args.start_timeout, proc, successes=len(backends))
        info = probe(tls_port)
    except (RuntimeError, OSError, ValueError) as exc:
        procs.stop(proc, timeout_s=5)
        raise RuntimeError(f"{name}: {exc}") from exc
    proc.remember_tree()
    return Server(name, port, tls_port, proc, admin_port if name == "pairlb" else None, info)


def roles(server: Server) -> dict[int, str]:
    out = {}
    for i, pid in enumerate(c.tree_pids(server.proc.pid)):
        out[pid] = ROOT_ROLE[server.name] if i == 0 else f"{CHILD_ROLE[server.name]}{i}"
    return out


def pairlb_handshakes(server: Server) -> dict[str, float] | None:
    """pairlb's own count of the TLS listener's handshakes by kind (full, resumed)."""
    if server.admin_port is None:
        return None
    conn = http.client.HTTPConnection("127.0.0.1", server.admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    out: dict[str, float] = {}
    for m in re.finditer(r"^pairlb_tls_handshakes_total\{([^}]*)\}\s+(\S+)$", text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("listener") == "bench-tls":
            kind = labels.get("kind", "?")
            out[kind] = out.get(kind, 0.0) + float(m.group(2))
    return out


# --------------------------------------------------------------------------- memory


def tree_rss_kb(root: int) -> dict[int, int]:
    return {m.pid: m.rss_kb for m in c.tree_mem(root)}


def idle_memory(
    server: Server, tls: bool, n: int, warm: int, pause_s: float = 1.0
) -> dict[str, Any]:
    """RSS delta of the server's processes per idle keep-alive connection (one request each).

    The client is this script, with blocking sockets opened one after the other; ``pause_s``
    before the second RSS reading, half of it before the first and after closing.
    """
    port = server.tls_port if tls else server.plain_port
    ctx = client_context()
    socks: list[socket.socket] = []
    try:
        for _ in range(warm):
            socks.append(request(port, tls=tls, ctx=ctx, keep=True)[1])
        time.sleep(pause_s / 2)
        r0 = tree_rss_kb(server.proc.pid)
        t0 = time.monotonic()
        for _ in range(n):
            status, sock, _ = request(port, tls=tls, ctx=ctx, keep=True)
            socks.append(sock)
            if status != 200:
                raise RuntimeError(f"status {status}")
        open_s = time.monotonic() - t0
        time.sleep(pause_s)
        r1 = tree_rss_kb(server.proc.pid)
    finally:
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
    time.sleep(pause_s / 2)
    role = roles(server)
    by_role = {role.get(pid, f"pid{pid}"): (kb - r0.get(pid, 0)) / n for pid, kb in r1.items()}
    return {
        "server": server.name,
        "tls": tls,
        "conns": n,
        "kib_per_conn": (sum(r1.values()) - sum(r0.values())) / n,
        "kib_per_conn_by_role": by_role,
        "rss_before_kb": {role.get(p, f"pid{p}"): kb for p, kb in r0.items()},
        "open_s": open_s,
    }


# --------------------------------------------------------------------------- load


def run_load(argvs: list[list[str]], limit_s: float, logs: list[Path]) -> tuple[list[str], float]:
    """Run the load processes at once, bounded in time; their outputs and CPU seconds."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    popens = []
    try:
        for argv, log in zip(argvs, logs, strict=True):
            with open(log, "wb") as out:
                popens.append(
                    subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        preexec_fn=c._die_with_parent,
                    )
                )
        deadline = time.monotonic() + limit_s
        for p in popens:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired as exc:
                raise RuntimeError(f"{argvs[0][-1]}: load ran over {limit_s:.0f}s: killed") from exc
    finally:
        for p in popens:
            if p.poll() is None:
                p.kill()
                p.wait()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    texts = [log.read_text(errors="replace") for log in logs]
    bad = [(p.returncode, t) for p, t in zip(popens, texts, strict=True) if p.returncode != 0]
    if bad:
        raise RuntimeError(f"load generator exited {bad[0][0]}:\n{bad[0][1][-2000:]}")
    return texts, cpu


@dataclass
class LoadResult:
    requests: int
    wall_s: float
    cpu_s: float
    p50_us: float | None = None
    p99_us: float | None = None
    errors: int = 0


def wrk_argv(args: argparse.Namespace, url: str, seconds: int, close: bool) -> list[str]:
    exe = shutil.which("wrk") or "wrk"
    return [
        *c.taskset_prefix(args.load_cpus if args.pin else None),
        exe,
        "-t1",
        f"-c{args.connections}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "--latency",
        *(["-H", "Connection: close"] if close else []),
        url,
    ]


_S_TIME = re.compile(r"^(\d+) connections in [\d.]+s;", re.M)


def s_time_argv(args: argparse.Namespace, port: int, seconds: int) -> list[str]:
    exe = shutil.which("openssl") or "openssl"
    return [
        *c.taskset_prefix(args.load_cpus if args.pin else None),
        exe,
        "s_time",
        "-connect",
        f"127.0.0.1:{port}",
        "-new",
        "-time",
        str(seconds),
        "-www",
        c.body_path(SIZE),
    ]


def drive(
    workload: str, server: Server, seconds: int, args: argparse.Namespace, workdir: Path
) -> LoadResult:
    limit = seconds + 20.0
    t0 = time.monotonic()
    if workload == "full":
        n = args.full_clients
        argvs = [s_time_argv(args, server.tls_port, seconds)] * n
        logs = [workdir / f"s_time{i}.out" for i in range(n)]
        texts, cpu = run_load(argvs, limit, logs)
        wall = time.monotonic() - t0
        counts = []
        for t in texts:
            m = _S_TIME.search(t)
            if not m:
                raise RuntimeError(f"no connection count in s_time output:\n{t[-1500:]}")
            counts.append(int(m.group(1)))
        errors = sum(t.count("ERROR") + t.count("Unable to get connection") for t in texts)
        return LoadResult(sum(counts), wall, cpu, errors=errors)
    tls = workload != "plain"
    port = server.tls_port if tls else server.plain_port
    url = f"{'https' if tls else 'http'}://127.0.0.1:{port}{c.body_path(SIZE)}"
    argv = wrk_argv(args, url, seconds, close=workload == "newconn")
    (text,), cpu = run_load([argv], limit, [workdir / "wrk.out"])
    res = c.parse_wrk(text, cpu)
    return LoadResult(
        res.requests,
        res.duration_s,
        cpu,
        res.latency_us.get("50"),
        res.latency_us.get("99"),
        res.errors,
    )


def measure_once(
    server: Server,
    workload: str,
    rnd: int,
    args: argparse.Namespace,
    backends: c.Managed,
    own_roots: list[int],
    workdir: Path,
) -> Sample:
    try:
        if not server.proc.alive():
            raise RuntimeError(f"{server.name} is no longer running:\n{server.proc.log_tail()}")
        if args.warmup:
            drive(workload, server, args.warmup, args, workdir)
        server.proc.remember_tree()
        root = server.proc.pid
        pc0 = c.tree_cpu_by_pid(root)
        b0 = c.tree_cpu_s(backends.pid)
        own0 = sum(c.tree_cpu_s(p) for p in own_roots) + sum(os.times()[:2])
        cpu0, st0, t0 = c.cpu_times(), c.steal_s(), time.monotonic()
        res = drive(workload, server, args.duration, args, workdir)
        cpu1, st1, t1 = c.cpu_times(), c.steal_s(), time.monotonic()
        own1 = sum(c.tree_cpu_s(p) for p in own_roots) + sum(os.times()[:2])
        b1 = c.tree_cpu_s(backends.pid)
        pc1 = c.tree_cpu_by_pid(root)
    except (RuntimeError, ValueError, OSError) as exc:
        return Sample(server.name, workload, rnd, ok=False, error=str(exc))
    if res.requests <= 0:
        return Sample(server.name, workload, rnd, ok=False, error="no requests completed")
    server_cpu = sum(pc1.values()) - sum(pc0.values())
    role = roles(server)
    other = c.busy_cpu_s(cpu0, cpu1) - (own1 - own0) - res.cpu_s
    return Sample(
        server=server.name,
        workload=workload,
        round=rnd,
        ok=True,
        requests=res.requests,
        rps=res.requests / res.wall_s,
        server_cpu_s=server_cpu,
        cpu_us_per_req=server_cpu / res.requests * 1e6,
        cpu_us_by_role={
            role.get(pid, f"pid{pid}"): (t - pc0.get(pid, 0.0)) / res.requests * 1e6
            for pid, t in pc1.items()
        },
        p50_us=res.p50_us,
        p99_us=res.p99_us,
        errors=res.errors,
        load_cpu_s=res.cpu_s,
        backend_cpu_s=b1 - b0,
        wall_s=t1 - t0,
        cpu_busy=c.cpu_busy(cpu0, cpu1),
        other_cores=max(0.0, other) / (t1 - t0),
        steal_cores=(st1 - st0) / (t1 - t0),
    )


def measure(
    server: Server,
    workload: str,
    rnd: int,
    args: argparse.Namespace,
    backends: c.Managed,
    own_roots: list[int],
    workdir: Path,
    calm: bool,
) -> Sample:
    """One measurement, repeated when other processes loaded the box (``calm``: time left
    for that), keeping the least disturbed attempt."""
    best: Sample | None = None
    for attempt in range((args.noisy_retries if calm else 0) + 1):
        if calm and args.settle > 0:
            c.wait_quiet(own_roots, args.settle, args.max_other / 2)
        s = measure_once(server, workload, rnd, args, backends, own_roots, workdir)
        s.attempts = attempt + 1
        if best is None or not best.ok or (s.ok and s.other_cores < best.other_cores):
            best = s
        if not s.ok or s.other_cores <= args.max_other:
            break
    assert best is not None
    return best


# --------------------------------------------------------------------------- report


def summarize(samples: list[Sample], args: argparse.Namespace, servers: list[str]) -> list[dict]:
    med = perf._median
    rows = []
    for w in args.workloads:
        by: dict[str, dict[str, Any]] = {}
        for name in servers:
            ss = [s for s in samples if s.server == name and s.workload == w and s.ok]
            failed = [s for s in samples if s.server == name and s.workload == w and not s.ok]
            if not ss:
                by[name] = {
                    "workload": w,
                    "server": name,
                    "ok": False,
                    "error": failed[0].error if failed else "not measured",
                }
                continue
            rps = [s.rps for s in ss]
            by[name] = {
                "workload": w,
                "server": name,
                "ok": True,
                "rounds": len(ss),
                "failed_rounds": len(failed),
                "rps": med(rps),
                "rps_min": min(rps),
                "rps_max": max(rps),
                "cpu_us_per_req": med([s.cpu_us_per_req for s in ss if s.cpu_us_per_req]),
                "p50_us": med([s.p50_us for s in ss if s.p50_us is not None]),
                "p99_us": med([s.p99_us for s in ss if s.p99_us is not None]),
                "errors": sum(s.errors for s in ss),
                "load_cpu_us_per_req": med([s.load_cpu_s / s.requests * 1e6 for s in ss]),
                "backend_cpu_us_per_req": med([s.backend_cpu_s / s.requests * 1e6 for s in ss]),
                "cpu_busy": {
                    k: med([s.cpu_busy.get(k, 0.0) for s in ss])
                    for k in sorted({k for s in ss for k in s.cpu_busy})
                },
                "other_cores": med([s.other_cores for s in ss]),
                "steal_cores": med([s.steal_cores for s in ss]),
                "cpu_us_by_role": {
                    r: med([s.cpu_us_by_role[r] for s in ss if r in s.cpu_us_by_role])
                    for r in sorted({k for s in ss for k in s.cpu_us_by_role})
                },
            }
        hap = by.get("haproxy", {})
        hap_round = {
            s.round: s for s in samples if s.server == "haproxy" and s.workload == w and s.ok
        }
        for row in by.values():
            if row.get("ok") and hap.get("ok"):
                row["rps_vs_haproxy"] = row["rps"] / hap["rps"]
                row["rps_vs_haproxy_by_round"] = [
                    s.rps / hap_round[s.round].rps
                    for s in samples
                    if s.server == row["server"]
                    and s.workload == w
                    and s.ok
                    and s.round in hap_round
                ]
                if row.get("cpu_us_per_req") and hap.get("cpu_us_per_req"):
                    # Capacity per core relative to HAProxy: HAProxy's CPU/req over ours.
                    row["per_core_vs_haproxy"] = hap["cpu_us_per_req"] / row["cpu_us_per_req"]
            rows.append(row)
    return rows


def _fmt_us(us: float | None) -> str:
    return perf._fmt_us(us) if us else "-"


def cpu_names(rows: list[dict[str, Any]]) -> list[str]:
    names: set[str] = set()
    for r in rows:
        names.update(r.get("cpu_busy", {}))
    return sorted(names, key=lambda n: int(n[3:]))


def render(head: list[str], lines: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(x.replace("|", "/") for x in ln) + " |" for ln in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), *(fmt.format(*ln) for ln in lines)])


def table(rows: list[dict[str, Any]], markdown: bool) -> str:
    cpus = cpu_names(rows)
    head = [
        "workload",
        "server",
        "req/s",
        "spread",
        "vs HAProxy",
        "server CPU us/req",
        "per core",
        "per core vs HAProxy",
        "p50",
        "p99",
        "errors",
        "busy " + "/".join(cpus),
        "foreign load",
    ]
    lines = []
    for r in rows:
        title = WORKLOAD_TITLE[r["workload"]]
        if not r.get("ok"):
            why = r.get("error", "").splitlines()[0][:60] if r.get("error") else ""
            lines.append([title, r["server"], "failed", *[""] * 9, why])
            continue
        spread = (r["rps_max"] - r["rps_min"]) / r["rps"] * 100 if r["rps"] else 0.0
        cpu = r.get("cpu_us_per_req")
        lines.append(
            [
                title,
                r["server"],
                f"{r['rps']:,.0f}",
                f"{spread:.0f}%",
                f"{r['rps_vs_haproxy']:.2f}x" if "rps_vs_haproxy" in r else "-",
                f"{cpu:.1f}" if cpu else "-",
                f"{1e6 / cpu:,.0f}" if cpu else "-",
                f"{r['per_core_vs_haproxy']:.2f}x" if "per_core_vs_haproxy" in r else "-",
                _fmt_us(r["p50_us"]),
                _fmt_us(r["p99_us"]),
                str(r["errors"]),
                "/".join(f"{r['cpu_busy'].get(k, 0) * 100:.0f}%" for k in cpus),
                f"{r['other_cores']:.2f} cores",
            ]
        )
    return render(head, lines, markdown)


def memory_table(mem: list[dict[str, Any]], servers: list[str], markdown: bool) -> str:
    head = ["server", "plain KiB/conn", "TLS KiB/conn", "TLS extra KiB/conn", "RSS before (MB)"]
    lines = []
    for name in servers:
        plain = next((m for m in mem if m["server"] == name and not m["tls"]), None)
        tls = next((m for m in mem if m["server"] == name and m["tls"]), None)
        if plain is None and tls is None:
            continue
        extra = (
            f"{tls['kib_per_conn'] - plain['kib_per_conn']:.1f}"
            if plain and tls and "kib_per_conn" in plain and "kib_per_conn" in tls
            else "-"
        )
        before = (tls or plain or {}).get("rss_before_kb", {})
        lines.append(
            [
                name,
                f"{plain['kib_per_conn']:.1f}" if plain and "kib_per_conn" in plain else "-",
                f"{tls['kib_per_conn']:.1f}" if tls and "kib_per_conn" in tls else "-",
                extra,
                ", ".join(f"{r} {kb / 1024:.1f}" for r, kb in before.items()) or "-",
            ]
        )
    return render(head, lines, markdown) if lines else ""


def notes(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    servers: dict[str, Server],
    handshakes: dict[str, float] | None,
    samples: list[Sample],
    skipped: dict[str, str],
) -> list[str]:
    out = []
    get = {(r["workload"], r["server"]): r for r in rows}
    for w in args.workloads:
        pl = get.get((w, "pairlb"))
        if pl and "rps_vs_haproxy" in pl:
            paired = " ".join(f"{x:.2f}" for x in pl.get("rps_vs_haproxy_by_round", []))
            per_core = pl.get("per_core_vs_haproxy")
            out.append(
                f"pairlb/HAProxy {WORKLOAD_TITLE[w]}: req/s {pl['rps_vs_haproxy']:.2f}"
                + (
                    f" (same-round {paired})"
                    if len(pl.get("rps_vs_haproxy_by_round", [])) > 1
                    else ""
                )
                + (
                    f"; per core (HAProxy CPU/{UNIT[w]} / pairlb's) {per_core:.2f}"
                    if per_core
                    else ""
                )
            )
    for name, s in servers.items():
        i = s.info
        out.append(
            f"{name}: {i.get('version')} {i.get('cipher')}, ALPN {i.get('alpn')}, "
            f"session resumes: {'yes' if i.get('resumes') else 'NO'}, "
            f"HTTP/1.0 (s_time's request) status {i.get('http10_status')}"
        )
    if handshakes is not None:
        nc = sum(s.requests for s in samples if s.server == "pairlb" and s.workload == "newconn")
        out.append(
            f"pairlb counted {handshakes.get('full', 0):,.0f} full and "
            f"{handshakes.get('resumed', 0):,.0f} resumed handshakes over the whole run "
            f"(measured newconn runs alone made {nc:,} connections)"
            + (
                ""
                if not nc
                else ": wrk's Connection: close connections resume"
                if handshakes.get("resumed", 0) >= nc / 2
                else ": wrk's Connection: close connections did NOT resume"
            )
        )
    if args.pin:
        load_cpu = "cpu" + args.load_cpus.split(",")[0].split("-")[0]
        srv_cpu = "cpu" + args.proxy_cpus.split(",")[0].split("-")[0]
        for r in rows:
            if not r.get("ok"):
                continue
            lb, sb = r["cpu_busy"].get(load_cpu, 0.0), r["cpu_busy"].get(srv_cpu, 0.0)
            if lb > 0.9 and sb < 0.9:
                out.append(
                    f"load-bound: {r['server']} {r['workload']}: {load_cpu} (load generator + "
                    f"backends) {lb:.0%} busy, {srv_cpu} (server) {sb:.0%}: "
                    f"read CPU/{UNIT[r['workload']]}"
                )
    for r in rows:
        split = r.get("cpu_us_by_role") or {}
        if r.get("ok") and len(split) > 1:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in split.items() if v is not None)
            out.append(
                f"{r['server']} {r['workload']} CPU us/{UNIT[r['workload']]} by process: {parts}"
            )
    for r in rows:
        if r.get("ok") and r["other_cores"] > args.max_other:
            out.append(
                f"warning: {r['other_cores']:.2f} cores of other processes' load during "
                f"{r['server']} {r['workload']}: noisy"
            )
    if not args.pin:
        out.append("not pinned: server, load generator and backends share all CPUs")
    for t, why in skipped.items():
        out.append(f"{t} skipped: {why.splitlines()[0] if why else '?'}")
    return out


# --------------------------------------------------------------------------- main


def raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def run(args: argparse.Namespace) -> int:
    need = ["nginx", "openssl"]
    if any(w != "full" for w in args.workloads):
        need.append("wrk")
    missing = [t for t in need if shutil.which(t) is None]
    if missing:
        print(f"error: not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    skipped: dict[str, str] = {}
    if "haproxy" in args.servers and shutil.which("haproxy") is None:
        skipped["haproxy"] = "haproxy not installed"
    wanted = [s for s in args.servers if s not in skipped]
    raise_nofile(args.idle_conns + args.idle_warm + 1024)
    workdir = Path(tempfile.mkdtemp(prefix="pairlb-bench-tls-"))
    samples: list[Sample] = []
    mem: list[dict[str, Any]] = []
    started: list[int] = []
    servers: dict[str, Server] = {}
    handshakes: dict[str, float] | None = None
    rng = random.Random(args.seed)
    t_start = time.monotonic()
    procs = c.ProcessSet()
    try:
        cert = make_certificate(workdir)
        backend_ports = c.free_ports(3)
        c.require_free(backend_ports)
        c.prepare_nginx_dirs(workdir, "backends")
        bconf = c.write_nginx_backends(workdir, backend_ports, [SIZE], workers=1)
        backends = procs.start(
            "backends",
            c.nginx_argv(bconf, workdir),
            workdir / "backends.log",
            cpus=args.load_cpus if args.pin else None,
        )
        for p in backend_ports:
            c.wait_http_ok("127.0.0.1", p, "/healthz", args.start_timeout, proc=backends)
        started.extend(backends.remember_tree())
        own_roots = [backends.pid]
        for name in wanted:
            try:
                s = start_server(name, args, workdir, procs, backend_ports, cert)
            except RuntimeError as exc:
                skipped[name] = f"did not come up: {exc}"
                print(f"{name} skipped: {exc}", file=sys.stderr)
                continue
            servers[name] = s
            started.extend(s.proc.remember_tree())
            own_roots.append(s.proc.pid)
        print(
            f"workdir {workdir}; pinned={args.pin}; "
            + ", ".join(
                f"{s.name}: plain {s.plain_port} tls {s.tls_port}" for s in servers.values()
            ),
            file=sys.stderr,
        )
        if args.idle_conns:
            for s in servers.values():
                for tls in (False, True):
                    try:
                        m = idle_memory(
                            s, tls, args.idle_conns, args.idle_warm, args.idle_pause
                        )
                    except (OSError, RuntimeError, ValueError) as exc:
                        m = {"server": s.name, "tls": tls, "error": repr(exc)}
                    mem.append(m)
                    print(
                        f"idle {s.name:8} {'tls' if tls else 'plain':5} "
                        + (
                            f"{m['kib_per_conn']:6.1f} KiB/conn ({m['open_s']:.1f}s to open)"
                            if "kib_per_conn" in m
                            else f"FAILED: {m['error']}"
                        ),
                        file=sys.stderr,
                    )
        plan_total = args.rounds * len(servers) * len(args.workloads)
        per_run = args.duration + args.warmup + 1.0
        done = 0
        for rnd in range(1, args.rounds + 1):
            plan = [(s, w) for s in servers.values() for w in args.workloads]
            rng.shuffle(plan)
            for s, w in plan:
                left = args.budget - (time.monotonic() - t_start)
                calm = left > (plan_total - done) * per_run + args.settle + per_run
                smp = measure(s, w, rnd, args, backends, own_roots, workdir, calm)
                samples.append(smp)
                done += 1
                status = (
                    f"{smp.rps:9,.0f}/s  cpu/{UNIT[w]} {smp.cpu_us_per_req or 0:7.1f} us  "
                    f"busy {' '.join(f'{k}={v:.0%}' for k, v in smp.cpu_busy.items())}"
                    + (f"  other {smp.other_cores:.2f}" if smp.other_cores > 0.05 else "")
                    if smp.ok
                    else f"FAILED: {smp.error.splitlines()[0] if smp.error else ''}"
                )
                print(f"round {rnd} {s.name:8} {w:9}  {status}", file=sys.stderr)
        if "pairlb" in servers:
            # The worker sends its counters to the control process every 0.25 s: read them
            # until two readings 0.5 s apart agree (at most 1.5 s after the last run).
            deadline = time.monotonic() + 1.5
            handshakes = pairlb_handshakes(servers["pairlb"])
            while time.monotonic() < deadline:
                time.sleep(0.5)
                again = pairlb_handshakes(servers["pairlb"])
                if again == handshakes:
                    break
                handshakes = again
    finally:
        procs.close()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    names = [n for n in args.servers if n in servers]
    rows = summarize(samples, args, names)
    cmd = " ".join(shlex.quote(a) for a in ["bench/tls.py", *sys.argv[1:]])
    text_notes = notes(rows, args, servers, handshakes, samples, skipped)
    print(f"\n$ {cmd}")
    print(table(rows, args.markdown))
    if mem:
        print()
        print(memory_table(mem, names, args.markdown))
    print()
    for line in text_notes:
        print(("- " if args.markdown else "") + line)
    if args.json:
        doc = {
            "command": cmd,
            "machine": {
                **perf.machine_info(args),
                "openssl": c.tool_version(["openssl", "version"]),
            },
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "elapsed_s": time.monotonic() - t_start,
            "skipped": skipped,
            "servers": {n: {"info": s.info} for n, s in servers.items()},
            "pairlb_handshakes": handshakes,
            "started_pids": started,
            "summary": rows,
            "memory": mem,
            "notes": text_notes,
            "samples": [asdict(s) for s in samples],
        }
        args.json.write_text(json.dumps(doc, indent=2, default=str))
    failed = [r for r in rows if not r.get("ok")]
    # A server that is not installed is skipped; one that did not come up is a failure.
    broken = [n for n, why in skipped.items() if why.startswith("did not come up")]
    return 1 if failed or broken or any("error" in m for m in mem) else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with c.sigterm_as_exit():
        try:
            return run(args)
        except KeyboardInterrupt:
            print("interrupted; servers stopped", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
