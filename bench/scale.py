#!/usr/bin/env python3
"""The control side with many backends: health checks, /metrics and /status at 1000-3000.

Starts one real pairlb node (no failover) in front of N backends that all stay healthy,
checks every backend every ``--interval`` s over HTTP, and for ``--duration`` s scrapes
/metrics every second the way Prometheus does (its Accept header, gzip) and /status and the
status page every few seconds. Reports per N:

- **transitions**: health state changes during the window (every backend is healthy, so
  every one is spurious), counted from pairlb's log (``event=health_transition``);
- **check lateness** p50/p99 (start time minus scheduled time, from the
  ``pairlb_health_check_lateness_seconds`` histogram over the window) and max (from /status,
  ``health_checks.lateness_max_ms``); "-" on a pairlb that does not export them;
- **checks/s** completed over the window (``pairlb_health_checks_total``);
- **control CPU** in cores (utime+stime of the control process from /proc/PID/stat over the
  window; the workers and the backends are reported apart);
- **/metrics** size (uncompressed, and on the wire) and time p50/p99/max; **/status** and
  **GET /** (the status page) time p50/p99/max; the 1-minute load average at the end.

Backends: ONE nginx (master + 1 worker) listening on all N ports of 127.0.0.1 and answering
``/healthz`` with 200 (the cheapest server there is, so the box's CPU goes to pairlb), or,
without nginx or with ``--backend-server python``, one Python asyncio process on all N ports.

    .venv/bin/python bench/scale.py                          # N = 1000 and 3000, 60 s each
    .venv/bin/python bench/scale.py --backends 3000 --duration 30 --json /tmp/scale.json
    .venv/bin/python bench/scale.py --quick                  # 50 backends, 5 s: a smoke run
    .venv/bin/python bench/scale.py --admin-extra 'metrics_backend_series = "none"'

Every process is started by this script and stopped by PID (see bench/_common.py), also on
Ctrl-C; all traffic stays on 127.0.0.1. Imports nothing from lb: it measures the installed
command.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import http.client
import json
import math
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
"""What Prometheus 2.x sends when it scrapes (it prefers OpenMetrics)."""
TRANSITION = re.compile(rb"event=health_transition ")
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)', re.M)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--backends", default="1000,3000", help="comma-separated N values")
    ap.add_argument("--duration", type=float, default=60.0, help="measured seconds per N")
    ap.add_argument("--interval", type=float, default=1.0, help="health check interval_s")
    ap.add_argument("--timeout", type=float, default=0.5, help="health check timeout_s")
    ap.add_argument("--metrics-every", type=float, default=1.0, help="seconds between scrapes")
    ap.add_argument("--status-every", type=float, default=5.0, help="seconds between /status")
    ap.add_argument("--workers", type=int, default=1, help="pairlb proxy workers")
    ap.add_argument("--backend-server", choices=("auto", "nginx", "python"), default="auto")
    ap.add_argument("--up-timeout", type=float, default=120.0,
                    help="seconds to wait for every backend to be UP before measuring")
    ap.add_argument("--measure-anyway", action="store_true",
                    help="measure even if not every backend came UP within --up-timeout "
                         "(to record how a node that cannot keep up behaves)")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds after all are UP before the window starts")
    ap.add_argument("--admin-extra", action="append", default=[],
                    help="extra TOML line for [admin] (repeatable)")
    ap.add_argument("--health-extra", action="append", default=[],
                    help="extra TOML line for [pool.health], e.g. 'reuse_connection = true'")
    ap.add_argument("--pairlb-cmd", default="{venv}/bin/pairlb run -c {config}",
                    help="command to start pairlb ({venv}, {config}, {python})")
    ap.add_argument("--quick", action="store_true", help="smoke run: 50 backends, 5 s")
    ap.add_argument("--json", type=Path, help="write every sample and the summary here")
    ap.add_argument("--markdown", action="store_true", help="print the Markdown table")
    ap.add_argument("--keep-workdir", action="store_true", help="leave configs and logs")
    ap.add_argument("--serve-ports", type=Path, help=argparse.SUPPRESS)  # internal
    args = ap.parse_args(argv)
    if args.quick:
        args.backends = "50"
        args.duration = min(args.duration, 5.0)
        args.status_every = min(args.status_every, 2.0)
        args.settle = min(args.settle, 1.0)
        args.up_timeout = min(args.up_timeout, 30.0)
    args.sizes = [int(n) for n in args.backends.split(",") if n.strip()]
    return args


# --------------------------------------------------------------------------- backends


def serve_ports(path: Path) -> None:
    """The Python backend (``--serve-ports FILE``): 200 "ok" on every port, then close."""
    ports = [int(p) for p in path.read_text().split()]
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
        b"Connection: close\r\n\r\nok\n"
    )

    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            self.buf += data
            if b"\r\n\r\n" in self.buf:
                self.t.write(response)  # type: ignore[attr-defined]
                self.t.close()
            elif len(self.buf) > 65536:
                self.t.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for p in ports:
            await loop.create_server(Answer, "127.0.0.1", p, backlog=512)
        print("serving", len(ports), flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


def start_backends(
    args: argparse.Namespace, workdir: Path, procs: c.ProcessSet, n: int
) -> tuple[c.Managed, list[int], str]:
    ports = c.free_ports(n)
    kind = args.backend_server
    if kind == "auto":
        kind = "nginx" if shutil.which("nginx") else "python"
    if kind == "nginx":
        conf = c.write_nginx_many(workdir, "127.0.0.1", ports)
        proc = procs.start("backends", c.nginx_argv(conf, workdir), workdir / "backends.log")
    else:
        pf = workdir / "ports.txt"
        pf.write_text(" ".join(map(str, ports)))
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve-ports", str(pf)]
        proc = procs.start("backends", argv, workdir / "backends.log")
    for p in (ports[0], ports[-1]):
        c.wait_http_ok("127.0.0.1", p, "/healthz", 20.0, proc=proc)
    return proc, ports, kind


# --------------------------------------------------------------------------- pairlb


def pairlb_config(
    args: argparse.Namespace, workdir: Path, port: int, admin_port: int, backends: list[int]
) -> Path:
    entries = ",\n".join(
        f'  {{ name = "b{i}", address = "127.0.0.1:{p}" }}' for i, p in enumerate(backends, 1)
    )
    extra = "".join(line + "\n" for line in args.admin_extra)
    health_extra = "".join(line + "\n" for line in args.health_extra)
    text = f"""# written by bench/scale.py
[node]
name = "scale"
workers = {args.workers}
shutdown_timeout_s = 2

[[listener]]
name = "web"
bind = "127.0.0.1:{port}"
mode = "http"
pool = "web"

[[pool]]
name = "web"
backends = [
{entries},
]

[pool.health]
path = "/healthz"
interval_s = {args.interval}
timeout_s = {args.timeout}
{health_extra}
[admin]
bind = "127.0.0.1:{admin_port}"
{extra}
[logging]
level = "info"
"""
    conf = workdir / "pairlb.toml"
    conf.write_text(text)
    return conf


def pairlb_argv(args: argparse.Namespace, conf: Path) -> list[str]:
    venv = REPO / ".venv"
    cmd = args.pairlb_cmd.format(venv=venv, config=conf, python=sys.executable)
    return cmd.split()


class Admin:
    """GETs against the admin endpoint, timed; one connection per request (like a scrape)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def get(
        self, path: str, headers: dict[str, str] | None = None, timeout_s: float = 60.0
    ) -> tuple[int, bytes, dict[str, str], float]:
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout_s)
        try:
            conn.request("GET", path, headers=headers or {})
            r = conn.getresponse()
            body = r.read()
            hdrs = {k.lower(): v for k, v in r.getheaders()}
            return r.status, body, hdrs, time.perf_counter() - t0
        finally:
            conn.close()

    def metrics(self) -> tuple[str, int, float]:
        """(text, bytes on the wire, seconds) of one Prometheus-style scrape."""
        status, body, hdrs, took = self.get(
            "/metrics", {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
        )
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        wire = len(body)
        if hdrs.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        return body.decode(), wire, took

    def status(self) -> tuple[dict[str, Any], float]:
        status, body, _, took = self.get("/status")
        if status != 200:
            raise RuntimeError(f"/status answered {status}")
        return json.loads(body), took


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for m in SAMPLE.finditer(text):
        if m.group(1) != name:
            continue
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.append((labels, float(m.group(3))))
    return out


def total(text: str, name: str, **match: str) -> float:
    return sum(
        v for labels, v in samples(text, name) if all(labels.get(k) == x for k, x in match.items())
    )


def histogram(text: str, name: str) -> dict[float, float]:
    """le -> cumulative count, summed over label sets."""
    out: dict[float, float] = {}
    for labels, v in samples(text, name + "_bucket"):
        le = float(labels["le"])
        out[le] = out.get(le, 0.0) + v
    return out


def quantile_from(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """Upper-bound-interpolated quantile (like histogram_quantile) of the delta of two scrapes."""
    les = sorted(after)
    delta = [(le, after[le] - before.get(le, 0.0)) for le in les]
    if not delta or delta[-1][1] <= 0:
        return None
    rank = q * delta[-1][1]
    prev_le, prev_n = 0.0, 0.0
    for le, n in delta:
        if n >= rank:
            if math.isinf(le):
                return prev_le
            if n == prev_n:
                return le
            return prev_le + (le - prev_le) * (rank - prev_n) / (n - prev_n)
        prev_le, prev_n = le, n
    return None


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def count_transitions(log: Path, start: int = 0) -> tuple[int, int]:
    """(transitions logged from byte offset start, end offset)."""
    with open(log, "rb") as f:
        f.seek(start)
        data = f.read()
    return len(TRANSITION.findall(data)), start + len(data)


def run_one(args: argparse.Namespace, n: int, procs: c.ProcessSet, workdir: Path) -> dict[str, Any]:
    backends, ports, kind = start_backends(args, workdir, procs, n)
    port, admin_port = c.free_ports(2)
    c.require_free([port, admin_port])
    conf = pairlb_config(args, workdir, port, admin_port, ports)
    log = workdir / "pairlb.log"
    t_start = time.monotonic()
    lb = procs.start("pairlb", pairlb_argv(args, conf), log)
    admin = Admin(admin_port)
    c.wait_http_ok("127.0.0.1", admin_port, "/healthz", max(30.0, args.up_timeout), proc=lb)
    # Every backend UP (the initial DOWN -> UP transitions are expected, not counted).
    deadline = time.monotonic() + args.up_timeout
    up = 0
    while time.monotonic() < deadline:
        if not lb.alive():
            raise RuntimeError(f"pairlb exited:\n{lb.log_tail()}")
        text, _, _ = admin.metrics()
        up = int(total(text, "pairlb_backend_healthy"))
        usable = int(total(text, "pairlb_pool_usable_backends"))
        if max(up, usable) >= n:
            break
        time.sleep(0.5)
    else:
        if not args.measure_anyway:
            raise RuntimeError(f"only {up}/{n} backends UP after {args.up_timeout} s")
        print(f"N={n}: only {up}/{n} backends UP after {args.up_timeout} s; measuring anyway",
              file=sys.stderr, flush=True)
    all_up_s: float | None = time.monotonic() - t_start
    if max(up, usable) < n:
        all_up_s = None
    time.sleep(args.settle)

    # The window.
    lb.remember_tree()
    root = lb.pid
    workers = [p for p in c.tree_pids(root) if p != root]
    trans0, offset = count_transitions(log)
    m_before, _, _ = admin.metrics()
    cpu0 = c.read_stat(root)
    wcpu0 = sum(s.cpu_s for p in workers if (s := c.read_stat(p)) is not None)
    bcpu0 = c.tree_cpu_s(backends.pid)
    t0 = time.monotonic()
    end = t0 + args.duration
    m_times: list[float] = []
    m_sizes: list[int] = []
    m_wire: list[int] = []
    s_times: list[float] = []
    p_times: list[float] = []
    lat_max: list[float] = []
    next_m, next_s = t0, t0 + min(args.status_every, args.duration / 2)
    last_text = m_before
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now >= next_m:
            text, wire, took = admin.metrics()
            m_times.append(took)
            m_sizes.append(len(text.encode()))
            m_wire.append(wire)
            last_text = text
            next_m += args.metrics_every
            while next_m <= time.monotonic():
                next_m += args.metrics_every  # a slow scrape skips slots, as Prometheus does
        if now >= next_s:
            st, took = admin.status()
            s_times.append(took)
            hc = st.get("health_checks") or {}
            window = hc.get("lateness_max_ms") or {}
            # The 10 s maximum read at least 10 s into the window covers only the window.
            if "10s" in window and now - t0 >= 10.0 - 1e-6:
                lat_max.append(float(window["10s"]))
            status_code, _, _, took = admin.get("/")
            if status_code == 200:
                p_times.append(took)
            next_s += args.status_every
        if not lb.alive():
            raise RuntimeError(f"pairlb exited during the window:\n{lb.log_tail()}")
        time.sleep(max(0.0, min(next_m, next_s, end) - time.monotonic()))
    elapsed = time.monotonic() - t0
    m_after, _, _ = admin.metrics()
    if not any(m_times):
        last_text = m_after
    cpu1 = c.read_stat(root)
    wcpu1 = sum(s.cpu_s for p in workers if (s := c.read_stat(p)) is not None)
    bcpu1 = c.tree_cpu_s(backends.pid)
    trans, _ = count_transitions(log, offset)
    st, _ = admin.status()
    hc = st.get("health_checks") or {}
    window = hc.get("lateness_max_ms") or {}
    if "60s" in window and elapsed >= 60.0 - 1e-6 and not lat_max:
        lat_max.append(float(window["60s"]))
    name = "pairlb_health_check_lateness_seconds"
    hb, ha = histogram(m_before, name), histogram(m_after, name)
    checks = total(m_after, "pairlb_health_checks_total") - total(
        m_before, "pairlb_health_checks_total"
    )
    if checks == 0:  # per-backend series turned off: the pool's checks are under backend="*"
        checks = total(m_after, "pairlb_pool_health_checks_total") - total(
            m_before, "pairlb_pool_health_checks_total"
        )
    down = n - int(total(m_after, "pairlb_pool_usable_backends"))
    assert cpu0 is not None and cpu1 is not None
    q50, q99 = quantile_from(hb, ha, 0.5), quantile_from(hb, ha, 0.99)
    return {
        "backends": n,
        "backend_server": kind,
        "duration_s": round(elapsed, 2),
        "all_up_s": None if all_up_s is None else round(all_up_s, 2),
        "transitions": trans,
        "transitions_before_window": trans0,
        "not_usable_at_end": down,
        "checks_per_s": round(checks / elapsed, 1),
        "lateness_p50_ms": None if q50 is None else round(q50 * 1000, 2),
        "lateness_p99_ms": None if q99 is None else round(q99 * 1000, 2),
        "lateness_max_ms": round(max(lat_max), 2) if lat_max else None,
        "control_cores": round((cpu1.cpu_s - cpu0.cpu_s) / elapsed, 3),
        "workers_cores": round((wcpu1 - wcpu0) / elapsed, 3),
        "backends_cores": round((bcpu1 - bcpu0) / elapsed, 3),
        "metrics_bytes": max(m_sizes) if m_sizes else len(last_text.encode()),
        "metrics_wire_bytes": max(m_wire) if m_wire else None,
        "metrics_scrapes": len(m_times),
        "metrics_s": _stats(m_times),
        "status_s": _stats(s_times),
        "page_s": _stats(p_times),
        "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
        "pairlb_pid": root,
        "backends_pid": backends.pid,
    }


def _stats(values: list[float]) -> dict[str, float | None]:
    return {
        "n": len(values),
        "p50": None if not values else round(statistics.median(values), 4),
        "p99": None if not values else round(pct(values, 0.99) or 0.0, 4),
        "max": None if not values else round(max(values), 4),
    }


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v * 1000:,.0f} ms" if v >= 0.01 else f"{v * 1000:.1f} ms"


def _size(b: int | None) -> str:
    if b is None:
        return "-"
    return f"{b / 1e6:.2f} MB" if b >= 1e5 else f"{b / 1e3:.1f} kB"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "| backends | transitions | lateness p50 / p99 / max | checks/s | control CPU | "
        "/metrics size (wire) | /metrics p50 / p99 / max | /status p50 / p99 | page p50 / p99 "
        "| load 1m |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat = " / ".join(
            "-" if r[k] is None else f"{r[k]:.1f} ms"
            for k in ("lateness_p50_ms", "lateness_p99_ms", "lateness_max_ms")
        )
        m, s, p = r["metrics_s"], r["status_s"], r["page_s"]
        lines.append(
            f"| {r['backends']} | {r['transitions']} | {lat} | {r['checks_per_s']:,.0f} "
            f"| {r['control_cores']:.2f} cores | {_size(r['metrics_bytes'])} "
            f"({_size(r['metrics_wire_bytes'])}) | {_ms(m['p50'])} / {_ms(m['p99'])} / "
            f"{_ms(m['max'])} | {_ms(s['p50'])} / {_ms(s['p99'])} | {_ms(p['p50'])} / "
            f"{_ms(p['p99'])} | {r['loadavg_1m']:.2f} |"
        )
    lines.append("")
    lines.append(
        f"{args.duration:g} s per row, checks every {args.interval:g} s (timeout "
        f"{args.timeout:g} s), /metrics every {args.metrics_every:g} s with Prometheus's "
        f"Accept header and gzip, /status and the page every {args.status_every:g} s; "
        f"{args.workers} worker(s); backends: {rows[0]['backend_server'] if rows else '-'}."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_ports:
        serve_ports(args.serve_ports)
        return 0
    rows: list[dict[str, Any]] = []
    started: list[int] = []
    with c.sigterm_as_exit():
        try:
            for n in args.sizes:
                workdir = Path(tempfile.mkdtemp(prefix=f"plb-scale-{n}-"))
                with c.ProcessSet() as procs:
                    try:
                        row = run_one(args, n, procs, workdir)
                    finally:
                        for m in procs.procs:
                            started.extend(m.known or [m.pid])
                rows.append(row)
                print(
                    f"N={n}: transitions {row['transitions']}, lateness p99 "
                    f"{row['lateness_p99_ms']} ms, control {row['control_cores']} cores, "
                    f"/metrics p50 {row['metrics_s']['p50']} s ({row['metrics_bytes']} B), "
                    f"/status p50 {row['status_s']['p50']} s",
                    file=sys.stderr,
                    flush=True,
                )
                if args.keep_workdir:
                    print(f"workdir kept: {workdir}", file=sys.stderr)
                else:
                    shutil.rmtree(workdir, ignore_errors=True)
        except KeyboardInterrupt:
            return 130
    if args.markdown:
        print(markdown(rows, args))
    if args.json:
        doc = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": rows,
            "started_pids": sorted(set(started)),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "kernel": platform.release()},
        }
        args.json.write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
