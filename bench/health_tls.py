#!/usr/bin/env python3
"""Health checks over TLS at scale: the checker's CPU per probe and its lateness, plain vs TLS.

Runs pairlb's health checker (``healthcheck.HealthChecker``, the code the control process
runs, with the ``ProbeTls`` that ``lb.control.backends`` builds for a ``[pool.tls]`` pool) in
a process of its own against N backends on 127.0.0.1 that all stay healthy, every backend
checked every ``--interval`` s, once per mode:

- ``plain``: HTTP over plain TCP (what a pool without ``[pool.tls]`` costs);
- ``tls``: HTTP over TLS, a full handshake every check (verify on, ECDSA P-256 leaf signed
  by a test CA, TLS 1.3): the default;
- ``tls-resume``: the same, resuming the last session (``ProbeTls.resume_s`` = 30);
- ``tls-reuse``: ``reuse_connection = true`` over TLS (one handshake per kept connection);
- ``tcp-tls``: ``type = "tcp"`` over TLS (the check is the handshake);
- ``plain-reuse``: ``reuse_connection = true`` over plain TCP, for comparison.

For each mode, after every target is UP and ``--settle`` s, it measures ``--duration`` s:

- **CPU per probe**: utime+stime of the checker process (``getrusage``) over the window /
  probes completed in it; **cores** = CPU seconds / window seconds;
- **lateness** p50/p99 (start minus due time of every check, the histogram the daemon
  exports as ``pairlb_health_check_lateness_seconds``, as ``bench/scale.py`` reads it:
  quantiles of the window's delta) and max (``Lateness.max_over``, whole seconds);
- **failed** probes and **transitions** (all spurious: every backend is healthy), by label;
- **resumed**: the share of TLS connections that resumed a session (tls-resume);
- the backends' CPU in cores (they are not what is measured; a saturated backend farm shows
  up as lateness or timeouts, so it is reported).

Backends: ONE nginx (``--nginx-workers``, default 1) listening on N plain and N TLS ports
(keep-alive as shipped, a shared session cache, tickets on), or, without nginx or with
``--backend-server python``, ``--python-servers`` asyncio processes each serving a share of
the ports (TLS from the stdlib ``ssl`` module). Certificates: a test CA and a leaf for
127.0.0.1, made with the openssl CLI in the work directory. With 2+ CPUs the checker is
pinned to CPU 0 and the backends to the others (``--no-pin`` to disable).

    .venv/bin/python bench/health_tls.py                             # N = 3000, 20 s per mode
    .venv/bin/python bench/health_tls.py --modes plain,tls --duration 30 --json /tmp/ht.json
    .venv/bin/python bench/health_tls.py --quick                     # 100 backends, 3 s

Every process is started by this script and stopped by PID (bench/_common.py), also on
Ctrl-C; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import resource
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import _common as c  # noqa: E402

MODES: dict[str, dict[str, Any]] = {
    "plain": {"probe": "http", "tls": False},
    "plain-reuse": {"probe": "http", "tls": False, "reuse": True},
    "tls": {"probe": "http", "tls": True},
    "tls-resume": {"probe": "http", "tls": True, "resume_s": 30.0},
    "tls-reuse": {"probe": "http", "tls": True, "reuse": True},
    "tcp-tls": {"probe": "tcp", "tls": True},
}
DEFAULT_MODES = "plain,tls,tls-resume,tls-reuse,tcp-tls"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--backends", type=int, default=3000, help="N: targets checked")
    ap.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated of {list(MODES)}")
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds per mode")
    ap.add_argument("--interval", type=float, default=1.0, help="health check interval_s")
    ap.add_argument("--timeout", type=float, default=0.5, help="health check timeout_s")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds after all are UP before the window starts")
    ap.add_argument("--up-timeout", type=float, default=60.0,
                    help="seconds to wait for every target to be UP")
    ap.add_argument("--backend-server", choices=("auto", "nginx", "python"), default="auto")
    ap.add_argument("--nginx-workers", type=int, default=1)
    ap.add_argument("--python-servers", type=int, default=2,
                    help="processes of the Python backend")
    ap.add_argument("--no-pin", action="store_true", help="do not pin checker and backends")
    ap.add_argument("--quiet-wait", type=float, default=60.0,
                    help="seconds to wait, before each mode, for other processes' load to "
                         "fall below --max-other cores")
    ap.add_argument("--max-other", type=float, default=0.2, help="see --quiet-wait")
    ap.add_argument("--quick", action="store_true", help="smoke run: 100 backends, 3 s")
    ap.add_argument("--json", type=Path, help="write every mode's measurements here")
    ap.add_argument("--keep-workdir", action="store_true")
    # internal: the checker and Python backend processes
    ap.add_argument("--checker", help=argparse.SUPPRESS)
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.backends = min(args.backends, 100)
        args.duration = min(args.duration, 3.0)
        args.settle = min(args.settle, 1.0)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.mode_list if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    return args


# --------------------------------------------------------------------------- certificates


def make_pki(workdir: Path) -> tuple[Path, Path, Path]:
    """(CA, leaf chain, leaf key): ECDSA P-256, the leaf for IP 127.0.0.1."""

    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=30)

    ca, ca_key = workdir / "ca.pem", workdir / "ca.key"
    leaf, key, csr = workdir / "leaf.pem", workdir / "leaf.key", workdir / "leaf.csr"
    ext = workdir / "leaf.ext"
    run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(ca_key))
    run("openssl", "req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", "2",
        "-subj", "/CN=pairlb bench CA", "-out", str(ca))
    run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key))
    run("openssl", "req", "-new", "-key", str(key), "-subj", "/CN=backend.test", "-out", str(csr))
    ext.write_text("subjectAltName=DNS:backend.test,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-sha256", "-extfile", str(ext), "-days", "2", "-out",
        str(workdir / "leaf.only.pem"))
    leaf.write_bytes((workdir / "leaf.only.pem").read_bytes() + ca.read_bytes())
    return ca, leaf, key


# --------------------------------------------------------------------------- backends


def write_nginx(workdir: Path, plain: list[int], tls: list[int], leaf: Path, key: Path,
                workers: int) -> Path:
    c.prepare_nginx_dirs(workdir, "backends")
    head = c.nginx_head(workers, workdir, "backends",
                        connections=4 * (len(plain) + len(tls)) + 1024)
    plain_listens = "".join(f"        listen 127.0.0.1:{p} backlog=512;\n" for p in plain)
    tls_listens = "".join(f"        listen 127.0.0.1:{p} ssl backlog=512;\n" for p in tls)
    text = (
        head
        + "http {\n"
        + c._NGINX_TEMP.format(dir=workdir, name="backends")
        + "    access_log off;\n    keepalive_timeout 65s;\n"
        + "    server {\n" + plain_listens
        + '        location / { return 200 "ok\\n"; }\n    }\n'
        + "    server {\n" + tls_listens
        + f"        ssl_certificate {leaf};\n        ssl_certificate_key {key};\n"
        + "        ssl_protocols TLSv1.2 TLSv1.3;\n"
        + "        ssl_session_cache shared:checks:10m;\n"
        + '        location / { return 200 "ok\\n"; }\n    }\n}\n'
    )
    conf = workdir / "backends.conf"
    conf.write_text(text)
    return conf


def serve(spec_path: Path) -> None:
    """The Python backend (``--serve FILE``): 200 "ok" on every port (TLS on the TLS ones),
    keep-alive like nginx."""
    spec = json.loads(spec_path.read_text())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(spec["leaf"], spec["key"])
    ok = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nok\n"
    bye = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
           b"Connection: close\r\n\r\nok\n")

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t: Any = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            while b"\r\n\r\n" in self.buf:
                head, self.buf = self.buf.split(b"\r\n\r\n", 1)
                if b"\nconnection: close" in head.lower():
                    self.t.write(bye)
                    self.t.close()
                    return
                self.t.write(ok)
            if len(self.buf) > 65536:
                self.t.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for p in spec["plain"]:
            await loop.create_server(Answer, "127.0.0.1", p, backlog=512)
        for p in spec["tls"]:
            await loop.create_server(Answer, "127.0.0.1", p, backlog=512, ssl=ctx)
        print("serving", len(spec["plain"]) + len(spec["tls"]), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def wait_tls(port: int, ca: Path, timeout_s: float, proc: c.Managed) -> None:
    ctx = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"backends exited; log tail:\n{proc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"TLS port {port} not ready within {timeout_s}s")


def start_backends(
    args: argparse.Namespace, workdir: Path, procs: c.ProcessSet, pins: tuple[str, str] | None,
    ca: Path, leaf: Path, key: Path,
) -> tuple[list[c.Managed], list[int], list[int], str]:
    ports = c.free_ports(2 * args.backends)
    plain, tls = ports[: args.backends], ports[args.backends:]
    kind = args.backend_server
    if kind == "auto":
        kind = "nginx" if shutil.which("nginx") else "python"
    cpus = pins[1] if pins else None
    started: list[c.Managed] = []
    if kind == "nginx":
        conf = write_nginx(workdir, plain, tls, leaf, key, args.nginx_workers)
        started.append(procs.start("backends", c.nginx_argv(conf, workdir),
                                   workdir / "backends.log", cpus=cpus))
    else:
        k = max(1, args.python_servers)
        for i in range(k):
            spec = workdir / f"serve{i}.json"
            spec.write_text(json.dumps({"plain": plain[i::k], "tls": tls[i::k],
                                        "leaf": str(leaf), "key": str(key)}))
            argv = [sys.executable, str(Path(__file__).resolve()), "--serve", str(spec)]
            started.append(procs.start(f"backends{i}", argv, workdir / f"backends{i}.log",
                                       cpus=cpus))
    for i, m in enumerate(started):
        k = len(started)
        mine_plain, mine_tls = plain[i::k], tls[i::k]
        for p in (mine_plain[0], mine_plain[-1]):
            c.wait_http_ok("127.0.0.1", p, "/", 30.0, proc=m)
        for p in (mine_tls[0], mine_tls[-1]):
            wait_tls(p, ca, 30.0, m)
    return started, plain, tls, kind


# --------------------------------------------------------------------------- the checker


def lateness_quantile(before: list[int], after: list[int], bounds: tuple[float, ...],
                      q: float) -> float | None:
    """Upper-bound-interpolated quantile of the window's delta (histogram_quantile)."""
    delta = [a - b for a, b in zip(after, before, strict=True)]
    total = sum(delta)
    if not total:
        return None
    rank = q * total
    acc, lo = 0, 0.0
    for i, n in enumerate(delta):
        hi = bounds[i] if i < len(bounds) else math.inf
        if n and acc + n >= rank:
            return lo if math.isinf(hi) else lo + (hi - lo) * (rank - acc) / n
        acc += n
        lo = hi
    return None


async def checker(args: argparse.Namespace, job: dict[str, Any]) -> dict[str, Any]:
    from healthcheck import CheckSpec, HealthChecker, ProbeTls, Target
    from healthcheck import probes as probes_mod
    from lb.tls.contexts import client_context

    mode = MODES[job["mode"]]
    tls = None
    if mode["tls"]:
        ctx = client_context(verify=True, ca_pem=job["ca_pem"], min_version="1.2")
        tls = ProbeTls(ctx, resume_s=mode.get("resume_s", 0.0))
    spec = CheckSpec(
        probe=mode["probe"], path="/healthz", interval_s=args.interval, timeout_s=args.timeout,
        reuse_connection=mode.get("reuse", False), tls=tls,
    )
    ports = job["tls_ports"] if mode["tls"] else job["plain_ports"]
    targets = [Target(("bench", f"b{i}"), "127.0.0.1", p, spec) for i, p in enumerate(ports)]

    results: Counter[str] = Counter()
    transitions: Counter[str] = Counter()
    handshakes = {"resumed": 0, "full": 0}
    remember = probes_mod._remember

    def counting_remember(probe: Any, sslobj: ssl.SSLObject, now: float) -> None:
        handshakes["resumed" if sslobj.session_reused else "full"] += 1
        remember(probe, sslobj, now)

    if mode["tls"] and job["count_handshakes"]:
        probes_mod._remember = counting_remember

    hc = HealthChecker(
        on_result=lambda key, result, counter: results.update([str(result.status)]),
        on_transition=lambda key, old, new, result: transitions.update(
            [f"{old}->{new} {result.status}"]),
    )
    hc.set_targets(targets)
    t_start = time.monotonic()
    async with hc:
        deadline = t_start + args.up_timeout
        while time.monotonic() < deadline:
            up = sum(1 for s in hc.states().values() if str(s.health) == "UP")
            if up == len(targets):
                break
            await asyncio.sleep(0.2)
        all_up_s = time.monotonic() - t_start
        await asyncio.sleep(args.settle)
        gc.collect()
        gc.freeze()  # what the daemon does once settled (lb.control.daemon.settle_gc)
        results.clear()
        transitions.clear()
        handshakes.update(resumed=0, full=0)
        lat = hc.lateness
        lat_before = list(lat.counts)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        b0 = sum(c.tree_cpu_s(pid) for pid in job["backend_pids"])
        s0, st0 = c.cpu_times(), c.steal_s()
        t0 = time.monotonic()
        await asyncio.sleep(args.duration)
        t1 = time.monotonic()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        s1, st1 = c.cpu_times(), c.steal_s()
        b1 = sum(c.tree_cpu_s(pid) for pid in job["backend_pids"])
        lat_after = list(lat.counts)
        window = t1 - t0
        probes = sum(results.values())
        up_end = sum(1 for s in hc.states().values() if str(s.health) == "UP")
        lat_max = lat.max_over(max(1, min(60, int(window))), time.monotonic())
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    foreign = max(0.0, c.busy_cpu_s(s0, s1) - cpu - (b1 - b0)) / window
    failed = {k: v for k, v in results.items() if k not in ("L7_OK", "L4_OK")}
    q50 = lateness_quantile(lat_before, lat_after, lat.bounds, 0.5)
    q99 = lateness_quantile(lat_before, lat_after, lat.bounds, 0.99)
    conns = handshakes["resumed"] + handshakes["full"]
    return {
        "mode": job["mode"],
        "targets": len(targets),
        "all_up_s": round(all_up_s, 2),
        "window_s": round(window, 2),
        "probes": probes,
        "probes_per_s": round(probes / window, 1),
        "cpu_s": round(cpu, 3),
        "user_s": round(r1.ru_utime - r0.ru_utime, 3),
        "sys_s": round(r1.ru_stime - r0.ru_stime, 3),
        "cpu_us_per_probe": round(cpu / probes * 1e6, 1) if probes else None,
        "cores": round(cpu / window, 3),
        "lateness_p50_ms": None if q50 is None else round(q50 * 1000, 2),
        "lateness_p99_ms": None if q99 is None else round(q99 * 1000, 2),
        "lateness_max_ms": round(lat_max * 1000, 1),
        "failed": failed,
        "transitions": dict(transitions),
        "up_at_end": up_end,
        "resumed_share": round(handshakes["resumed"] / conns, 3) if conns else None,
        "backend_cores": round((b1 - b0) / window, 3),
        "foreign_cores": round(foreign, 3),
        "steal_cores": round((st1 - st0) / window, 3),
    }


def checker_main(args: argparse.Namespace) -> int:
    job = json.loads(Path(args.checker).read_text())
    job["ca_pem"] = Path(job["ca"]).read_bytes()
    out = asyncio.run(checker(args, job))
    Path(job["out"]).write_text(json.dumps(out))
    return 0


# --------------------------------------------------------------------------- driver


def run_mode(args: argparse.Namespace, mode: str, workdir: Path, procs: c.ProcessSet,
             pins: tuple[str, str] | None, job: dict[str, Any]) -> dict[str, Any]:
    job = dict(job, mode=mode, out=str(workdir / f"{mode}.out.json"))
    other = c.wait_quiet(job["backend_pids"], args.quiet_wait, args.max_other)
    if other >= args.max_other:
        print(f"{mode}: other processes keep {other:.2f} cores busy; measuring anyway",
              file=sys.stderr, flush=True)
    jf = workdir / f"{mode}.job.json"
    jf.write_text(json.dumps(job))
    argv = [sys.executable, str(Path(__file__).resolve()), "--checker", str(jf),
            "--backends", str(args.backends), "--duration", str(args.duration),
            "--interval", str(args.interval), "--timeout", str(args.timeout),
            "--settle", str(args.settle), "--up-timeout", str(args.up_timeout)]
    m = procs.start(f"checker-{mode}", argv, workdir / f"checker-{mode}.log",
                    cpus=pins[0] if pins else None)
    limit = args.up_timeout + args.settle + args.duration + 60
    try:
        m.popen.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        procs.stop(m)
        raise RuntimeError(f"checker {mode} did not finish in {limit:.0f}s") from None
    procs.procs.remove(m)
    if m.popen.returncode != 0:
        raise RuntimeError(f"checker {mode} exited {m.popen.returncode}:\n{m.log_tail()}")
    return dict(json.loads(Path(job["out"]).read_text()))


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, kind: str) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
        f"{platform.node() or 'this host'} ({os.cpu_count()} CPUs, {c.cpu_model()}, "
        f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION}): {args.backends} "
        f"targets, interval {args.interval:g} s, timeout {args.timeout:g} s, "
        f"{args.duration:g} s window per mode, backends: {kind}"
        + ("" if args.no_pin or (os.cpu_count() or 1) < 2 else
           " (checker pinned to CPU 0, backends to the others)") + ".",
        "",
        "| mode | probes/s | checker CPU us/probe (user+sys) | checker cores | lateness p50 / "
        "p99 / max (ms) | failed probes | transitions | resumed | backend cores | "
        "foreign cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        failed = ", ".join(f"{k} {v}" for k, v in r["failed"].items()) or "0"
        trans = sum(r["transitions"].values())
        resumed = "-" if r["resumed_share"] is None else f"{r['resumed_share']:.0%}"
        lines.append(
            f"| {r['mode']} | {r['probes_per_s']} | {r['cpu_us_per_probe']} "
            f"({r['user_s']:.2f}+{r['sys_s']:.2f} s) | {r['cores']} | {r['lateness_p50_ms']} / "
            f"{r['lateness_p99_ms']} / {r['lateness_max_ms']} | {failed} | {trans} | {resumed} "
            f"| {r['backend_cores']} | {r['foreign_cores']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        serve(args.serve)
        return 0
    if args.checker is not None:
        return checker_main(args)
    if not shutil.which("openssl"):
        print("needs the openssl CLI (certificates)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="plb-health-tls-"))
    ncpu = os.cpu_count() or 1
    pins = None if args.no_pin or ncpu < 2 else ("0", f"1-{ncpu - 1}")
    rows: list[dict[str, Any]] = []
    try:
        with c.sigterm_as_exit(), c.ProcessSet() as procs:
            ca, leaf, key = make_pki(workdir)
            backends, plain, tls, kind = start_backends(args, workdir, procs, pins, ca, leaf, key)
            job = {"ca": str(ca), "plain_ports": plain, "tls_ports": tls,
                   "backend_pids": [m.pid for m in backends], "count_handshakes": True}
            for mode in args.mode_list:
                row = run_mode(args, mode, workdir, procs, pins, job)
                rows.append(row)
                print(f"{mode}: {row['probes_per_s']} probes/s, {row['cpu_us_per_probe']} us "
                      f"CPU/probe, {row['cores']} cores, lateness p99 {row['lateness_p99_ms']} "
                      f"ms max {row['lateness_max_ms']} ms, failed {row['failed']}, "
                      f"transitions {sum(row['transitions'].values())}, resumed "
                      f"{row['resumed_share']}, backends {row['backend_cores']} cores, "
                      f"foreign {row['foreign_cores']} cores",
                      file=sys.stderr, flush=True)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"work directory kept: {workdir}", file=sys.stderr)
    table = markdown(rows, args, kind)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
