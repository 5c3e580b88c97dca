#!/usr/bin/env python3
"""Elastic pools (issue 16): backends added and removed one by one through the admin API, up
to 3,000, under load, against the old way (rewrite the config file, ``POST /reload``) and,
when it is installed, HAProxy's runtime API.

One nginx (1 worker) listens on every port used (``--base`` + ``--backends`` + 1) of
127.0.0.1 and answers every request with 200 ``ok`` and ``X-Backend: <its port>``. One
``pairlb run`` (``[node] workers = 2``, ``state_dir`` and an ``[admin] token_file`` in the
work dir) starts with a pool of ``--base`` backends, checked every ``--interval`` s (HTTP,
``rise = 1``, ``reuse_connection``), ``drain_timeout_s = 5``. Then, in one run:

1. **adds**: ``POST /pools/web/backends`` N times (``{"name": "eI", "address":
   "127.0.0.1:PORT"}``, a distinct nginx port each), sequentially, one HTTP client on one
   keep-alive connection. Reported: API latency p50/p99/max of adds #1-W and of the last W
   (``--window``, 100: no growth with N is the point), total time, CPU seconds per 1,000 adds
   of the control process (the PID started) and of each worker (``/status`` ->
   ``workers[].pid``; utime+stime from /proc/PID/stat), for the whole phase and for each
   window, and the time until all N are in rotation (``pairlb_pool_usable_backends``).
   Between the phases the control and workers' idle CPU rate (health checks of N backends,
   the 1 s scrape) is measured for ``--idle`` s, once with the base pool and once at N.
2. **a reload at N** (``--no-reload-at-n`` to skip): the config file gets one more backend,
   ``POST /reload``; then the file as it was, ``POST /reload`` again: the old way's price of
   one change with N runtime backends in the pool (and a check that a reload keeps them).
3. **removes**: ``DELETE /pools/web/backends/eI`` for each, same figures, and the time until
   ``/status`` lists none of them (each drains first).

During 1-3 an open-loop client (``python -m lab.load``, ``--rate`` req/s, GETs only: nginx
does not echo a POST body) goes through the listener and a separate process scrapes
``/metrics`` every second as Prometheus does (its Accept header, gzip): requests, failed
requests (should be 0), requests that reached a backend more than 1 s after its DELETE
answered, scrape time p50/p99/max.

4. **the old way** (baseline, ``--reloads`` K, 300): a fresh pairlb with the same base pool,
   the same load; K times: rewrite the config file with one more backend, ``POST /reload``;
   latency of the first ``--reload-window`` reloads against the last, CPU per 1,000, time
   until all K are in rotation. Then (``--no-reload-at-n`` to skip) the file jumps to N
   backends (one reload, timed, not a per-change figure) and gets one more and one fewer:
   the old way's price of one change at N configured backends. Measured, not extrapolated.
5. **HAProxy** (if ``haproxy`` is installed; ``--no-haproxy`` to skip): the same N adds over
   its stats socket (``add server be/eI ADDR check``, ``enable health``, ``enable server``;
   one connection in prompt mode), pinned like pairlb, no traffic; then ``disable server`` +
   ``del server`` for each.

Nothing is pinned by default: on a 2-core box pairlb's control process and two workers on
one core are a 1-core box, and at 3,000 backends the workers then fall behind the control
process's snapshots (every request of the load times out; docs/performance.md). ``--pin``
puts pairlb and HAProxy on CPU 0 and nginx, the load, the scraper and this script on CPU 1,
as bench/pool_scale.py does with one worker. Everything is bounded:
``--budget`` s for phases 1-3, ``--reload-budget`` for 4; a phase out of time stops early and
says so. Every process is started by this script and stopped by PID in a finally, also on
Ctrl-C and SIGTERM; all traffic stays on 127.0.0.1.

    .venv/bin/python bench/elastic.py --markdown               # N = 3,000, < 10 min
    .venv/bin/python bench/elastic.py --quick                  # smoke: N = 200, < 60 s

Prints the table(s), one JSON line with every number, and where both were written
(``--json FILE``; otherwise a results directory of its own). Imports nothing from lb (it
measures the installed ``pairlb``); lab.load's RecordLog reads the client's records.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import http.client
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from lab.load import RecordLog  # noqa: E402

HOST = "127.0.0.1"
POOL = "web"
TOKEN = "elastic-bench-token"
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
API_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 5.0
LATE_AFTER_DELETE_S = 1.0
"""A request that starts this long after a backend's DELETE answered and still reaches it is
counted (the drain stops new requests at once; 1 s covers the snapshot's way to workers)."""


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--backends", type=int, default=3000, help="N: backends added, then removed")
    ap.add_argument("--base", type=int, default=3, help="backends in the config file's pool")
    ap.add_argument("--window", type=int, default=100,
                    help="adds/removes compared at the start and at the end")
    ap.add_argument("--reloads", type=int, default=300, help="K: reloads of the old way")
    ap.add_argument("--reload-window", type=int, default=20,
                    help="reloads compared at the start and at the end")
    ap.add_argument("--no-reload-at-n", action="store_true",
                    help="skip the reloads at N backends (runtime and configured)")
    ap.add_argument("--rate", type=float, default=200.0, help="lab.load requests per second")
    ap.add_argument("--interval", type=float, default=2.0, help="health check interval_s")
    ap.add_argument("--scrape-every", type=float, default=1.0, help="/metrics scrape period, s")
    ap.add_argument("--idle", type=float, default=3.0,
                    help="seconds of idle CPU measured with the base pool and at N")
    ap.add_argument("--budget", type=float, default=420.0,
                    help="seconds for adds + reload at N + removes (and the load's bound)")
    ap.add_argument("--reload-budget", type=float, default=60.0,
                    help="seconds for the old way (and its load's bound)")
    ap.add_argument("--wait", type=float, default=30.0,
                    help="seconds to wait for backends to come into rotation or leave /status")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="seconds to wait at the start for other processes' load to drop")
    ap.add_argument("--no-haproxy", action="store_true", help="skip HAProxy's runtime API")
    ap.add_argument("--pin", action="store_true",
                    help="pairlb (control + both workers) and HAProxy on CPU 0, nginx, the load, "
                         "the scraper and this script on CPU 1 (default: nothing pinned)")
    ap.add_argument("--json", type=Path, help="write the results here (one JSON object)")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    ap.add_argument("--keep-workdir", action="store_true", help="leave configs and logs")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: N=200, 20 reloads, 0.5 s idle windows, no wait for a "
                         "quiet box, short budgets")
    args = ap.parse_args(argv)
    if args.quick:
        args.backends, args.reloads, args.reload_window, args.idle = 200, 20, 5, 0.5
        args.quiet_wait = 0.0
        args.budget, args.reload_budget, args.wait = 40.0, 25.0, 10.0
    if args.backends < 2 or args.base < 1 or args.reloads < 2 or args.window < 1:
        ap.error("--backends >= 2, --base >= 1, --reloads >= 2, --window >= 1")
    args.window = min(args.window, args.backends // 2)
    args.reload_window = max(1, min(args.reload_window, args.reloads // 2))
    args.pin = args.pin and (os.cpu_count() or 1) >= 2
    return args


# --------------------------------------------------------------------------- small helpers


def pct(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN of nothing."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def ms(xs: Sequence[float]) -> dict[str, float | int]:
    """p50/p99/max in milliseconds of durations in seconds."""
    return {"n": len(xs), "p50_ms": round(pct(xs, 50) * 1e3, 2),
            "p99_ms": round(pct(xs, 99) * 1e3, 2),
            "max_ms": round(max(xs) * 1e3, 2) if xs else math.nan}


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def own_cpu_s(procs: c.ProcessSet) -> float:
    """CPU of everything this script runs (its own process and every tree it started)."""
    return sum(c.tree_cpu_s(m.pid) for m in procs.procs) + sum(os.times()[:2])


@dataclass
class Foreign:
    """Busy CPU of the box not charged to our processes, over an interval, in cores."""

    procs: c.ProcessSet
    t0: float = 0.0
    busy0: dict[str, tuple[int, int]] = field(default_factory=dict)
    own0: float = 0.0

    def start(self) -> Foreign:
        self.t0, self.busy0, self.own0 = time.monotonic(), c.cpu_times(), own_cpu_s(self.procs)
        return self

    def cores(self) -> float:
        wall = time.monotonic() - self.t0
        busy = c.busy_cpu_s(self.busy0, c.cpu_times())
        own = own_cpu_s(self.procs) - self.own0
        return round(max(0.0, busy - own) / wall, 2) if wall > 0 else 0.0


class HttpClient:
    """One keep-alive HTTP/1.1 connection to the admin port, reopened if the server closed
    it (counted: a reconnect's connect lands in that request's latency)."""

    def __init__(self, port: int, token: str | None = None) -> None:
        self.port = port
        self.token = token
        self.conn: http.client.HTTPConnection | None = None
        self.connects = 0

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def call(self, method: str, path: str, body: Any = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes, float]:
        data = None if body is None else json.dumps(body).encode()
        hdrs = dict(headers or {})
        if self.token is not None:
            hdrs["Authorization"] = f"Bearer {self.token}"
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=API_TIMEOUT_S)
                self.connects += 1
            t0 = time.perf_counter()
            try:
                self.conn.request(method, path, body=data, headers=hdrs)
                r = self.conn.getresponse()
                raw = r.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()  # the server closed an idle keep-alive connection: once more
                if attempt:
                    raise
                continue
            took = time.perf_counter() - t0
            if r.will_close:
                self.close()
            return r.status, raw, took
        raise AssertionError("unreachable")

    def json(self, path: str) -> Any:
        status, raw, _ = self.call("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path}: {status} {raw[:200]!r}")
        return json.loads(raw)


def usable(client: HttpClient) -> int:
    """pairlb_pool_usable_backends of the pool (-1 if not readable)."""
    try:
        status, raw, _ = client.call("GET", "/metrics?scope=pool")
    except (OSError, http.client.HTTPException):
        client.close()
        return -1
    if status != 200:
        return -1
    for line in raw.decode().splitlines():
        if line.startswith("pairlb_pool_usable_backends") and f'pool="{POOL}"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return -1


def members(client: HttpClient) -> dict[str, dict[str, Any]]:
    st = client.json("/status")
    return {b["name"]: b for p in st["pools"] if p["name"] == POOL for b in p["backends"]}


def wait_for(pred: Callable[[], bool], timeout_s: float, every_s: float,
             proc: c.Managed | None = None) -> float | None:
    """Seconds until pred() held (polled every every_s), None if it never did in time."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        if pred():
            return time.monotonic() - t0
        time.sleep(every_s)
    return None


# --------------------------------------------------------------------------- configs


def write_nginx(workdir: Path, ports: list[int]) -> Path:
    """One nginx, one worker, every port; 200 ``ok`` with ``X-Backend: <port>``; keep-alive
    long enough for kept check connections and the workers' idle backend connections."""
    name = "backends"
    c.prepare_nginx_dirs(workdir, name)
    listens = "".join(f"        listen {HOST}:{p} backlog=512;\n" for p in ports)
    # A slot per listening socket, per kept check connection and per worker's idle one.
    text = (
        c.nginx_head(1, workdir, name, connections=4 * len(ports) + 1024)
        + "http {\n"
        + c._NGINX_TEMP.format(dir=workdir, name=name)
        + "    access_log off;\n    tcp_nodelay on;\n"
        + "    keepalive_timeout 300s;\n    keepalive_requests 100000000;\n    server {\n"
        + listens
        + "        add_header X-Backend $server_port always;\n"
        + '        location / { return 200 "ok\\n"; }\n    }\n}\n'
    )
    conf = workdir / f"{name}.conf"
    conf.write_text(text)
    return conf


def write_pairlb(path: Path, args: argparse.Namespace, workdir: Path, port: int,
                 admin_port: int, backends: Sequence[tuple[str, int]]) -> None:
    """The config file (written whole, then renamed into place: a reload never reads half).
    Each node keeps its runtime changes in a state dir of its own (``state-<config stem>``):
    a DELETE leaves a tombstone there that hides a config backend of the same name."""
    entries = ",\n".join(f'  {{ name = "{n}", address = "{HOST}:{p}" }}' for n, p in backends)
    text = f"""# written by bench/elastic.py
[node]
name = "elastic"
workers = 2
shutdown_timeout_s = 1
state_dir = "{workdir / ('state-' + path.stem)}"

[[listener]]
name = "web"
bind = "{HOST}:{port}"
mode = "http"
pool = "{POOL}"

[[pool]]
name = "{POOL}"
balance = "round_robin"
drain_timeout_s = {DRAIN_TIMEOUT_S}
backends = [
{entries},
]

[pool.health]
path = "/healthz"
interval_s = {args.interval}
timeout_s = {min(1.0, args.interval / 2)}
rise = 1
fall = 3
reuse_connection = true

[admin]
bind = "{HOST}:{admin_port}"
token_file = "{workdir / 'admin.token'}"

[logging]
level = "warning"
"""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_haproxy(workdir: Path, port: int, sock: Path, interval: float,
                  backends: Sequence[tuple[str, int]]) -> Path:
    servers = "".join(f"    server {n} {HOST}:{p} check inter {interval:g}s rise 1 fall 3\n"
                      for n, p in backends)
    text = f"""global
    nbthread 1
    maxconn 4096
    pidfile {workdir}/haproxy.pid
    stats socket {sock} mode 600 level admin

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend fe
    bind {HOST}:{port}
    default_backend be

backend be
    balance roundrobin
    option httpchk GET /healthz
{servers}"""
    conf = workdir / "haproxy.cfg"
    conf.write_text(text)
    return conf


# --------------------------------------------------------------------------- the scraper


def scraper_main(argv: list[str]) -> int:
    """``elastic.py _scrape PORT OUT EVERY DURATION``: GET /metrics every EVERY s the way
    Prometheus does, one line per scrape: ``t_monotonic seconds status wire_bytes bytes``.
    Runs as its own process so its parsing never lands in the admin client's latencies."""
    port, out, every, duration = int(argv[0]), Path(argv[1]), float(argv[2]), float(argv[3])
    client = HttpClient(port)
    headers = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
    end = time.monotonic() + duration
    with open(out, "a", buffering=1) as f:
        while time.monotonic() < end:
            t = time.monotonic()
            status, wire, size, took = 0, 0, 0, 0.0
            try:
                t0 = time.perf_counter()
                conn = client.conn or http.client.HTTPConnection(HOST, port, timeout=10)
                client.conn = conn
                conn.request("GET", "/metrics", headers=headers)
                r = conn.getresponse()
                body = r.read()
                took = time.perf_counter() - t0
                status, wire = r.status, len(body)
                if r.getheader("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                size = len(body)
                if r.will_close:
                    client.close()
            except (OSError, http.client.HTTPException):
                client.close()
                took = time.perf_counter() - t0
            f.write(f"{t:.6f} {took:.6f} {status} {wire} {size}\n")
            time.sleep(max(0.0, t + every - time.monotonic()))
    return 0


def read_scrapes(path: Path, since: float, until: float) -> dict[str, Any]:
    rows = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 5:
                rows.append((float(parts[0]), float(parts[1]), int(parts[2]), int(parts[3]),
                             int(parts[4])))
    rows = [r for r in rows if since <= r[0] <= until]
    took = [r[1] for r in rows]
    return {"scrapes": len(rows), "failed": sum(1 for r in rows if r[2] != 200),
            **{f"scrape_{k}": v for k, v in ms(took).items() if k != "n"},
            "max_bytes": max((r[4] for r in rows), default=0),
            "max_wire_bytes": max((r[3] for r in rows), default=0)}


# --------------------------------------------------------------------------- CPU windows


@dataclass
class Pids:
    control: int
    workers: list[int]

    def snap(self) -> tuple[float, float, dict[int, float]]:
        """(monotonic, control CPU s, worker pid -> CPU s)."""
        now = time.monotonic()
        ctl = c.read_stat(self.control)
        wk = {p: s.cpu_s for p in self.workers if (s := c.read_stat(p)) is not None}
        return now, ctl.cpu_s if ctl else math.nan, wk


Snap = tuple[float, float, dict[int, float]]


def cpu_between(a: Snap, b: Snap, count: int) -> dict[str, Any]:
    """CPU seconds per 1,000 changes between two snapshots: control, each worker (mean, and
    the list), and the wall time."""
    wall = b[0] - a[0]
    ctl = b[1] - a[1]
    wk = [b[2][p] - a[2][p] for p in a[2] if p in b[2]]
    per = 1000 / count if count else math.nan
    return {"count": count, "wall_s": round(wall, 3), "control_cpu_s": round(ctl, 3),
            "worker_cpu_s": [round(x, 3) for x in wk],
            "control_cpu_s_per_1000": round(ctl * per, 3),
            "worker_cpu_s_per_1000": round(statistics.mean(wk) * per, 3) if wk else math.nan}


def net_of_idle(summary: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> None:
    """Add ``control_net_per_1000``/``worker_net_per_1000`` to each CPU window of a phase:
    its CPU less what the processes burn anyway (health checks of every backend, the 1 s
    scrape, the load) at the idle rate measured before the phase (first window), after it
    (last window) or their mean (the whole phase; the pool's size changes linearly)."""
    for key, rates in (("cpu_first", (before,)), ("cpu_last", (after,)),
                       ("cpu_all", (before, after))):
        d = summary.get(key)
        if not d or not d["count"]:
            continue
        rc = statistics.mean(r["control_cores"] for r in rates)
        rw = statistics.mean(r["worker_cores"] for r in rates)
        per = 1000 / d["count"]
        d["control_net_per_1000"] = round((d["control_cpu_s"] - rc * d["wall_s"]) * per, 3)
        if d["worker_cpu_s"]:
            wk = statistics.mean(d["worker_cpu_s"])
            d["worker_net_per_1000"] = round((wk - rw * d["wall_s"]) * per, 3)


def idle_rate(pids: Pids, seconds: float) -> dict[str, Any]:
    a = pids.snap()
    time.sleep(seconds)
    b = pids.snap()
    wall = b[0] - a[0]
    wk = [b[2][p] - a[2][p] for p in a[2] if p in b[2]]
    return {"wall_s": round(wall, 2), "control_cores": round((b[1] - a[1]) / wall, 4),
            "worker_cores": round(statistics.mean(wk) / wall, 4) if wk else math.nan}


@dataclass
class Changes:
    """One phase of sequential changes: latencies, answers, CPU at the window edges."""

    name: str
    want: int
    window: int
    lat: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    answers: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)
    """Monotonic time each answer arrived (for the load's per-backend check)."""
    snaps: dict[int, Snap] = field(default_factory=dict)
    truncated: bool = False
    t0: float = 0.0
    t1: float = 0.0

    def run(self, n: int, do: Callable[[int], tuple[int, bytes, float]], pids: Pids | None,
            deadline: float) -> None:
        snapper = pids.snap if pids else None
        edges = {0, self.window, n - self.window}
        self.t0 = time.monotonic()
        for i in range(n):
            if i in edges and snapper is not None:
                self.snaps[i] = snapper()
            if time.monotonic() > deadline:
                self.truncated = True
                break
            try:
                status, raw, took = do(i)
            except (OSError, http.client.HTTPException) as exc:
                status, raw, took = 0, repr(exc).encode(), math.nan
            self.statuses[status] += 1
            self.answers.append(status)
            self.lat.append(took)
            self.done_at.append(time.monotonic())
            if status != self.want and len(self.errors) < 5:
                self.errors.append(f"#{i + 1}: {status} {raw[:200]!r}")
        self.t1 = time.monotonic()
        if snapper is not None:
            self.snaps[len(self.lat)] = snapper()

    def summary(self) -> dict[str, Any]:
        n, w = len(self.lat), self.window
        good = [x for x in self.lat if not math.isnan(x)]
        out: dict[str, Any] = {
            "name": self.name, "count": n, "ok": self.statuses.get(self.want, 0),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors, "truncated": self.truncated, "window": w,
            "total_s": round(self.t1 - self.t0, 3),
            "per_s": round(n / (self.t1 - self.t0), 1) if self.t1 > self.t0 else math.nan,
            "all": ms(good), "first": ms(self.lat[:w]), "last": ms(self.lat[max(0, n - w):]),
        }
        s = self.snaps
        if 0 in s and n in s:
            out["cpu_all"] = cpu_between(s[0], s[n], n)
            if w in s and w:
                out["cpu_first"] = cpu_between(s[0], s[w], w)
            if n - w in s and not self.truncated:
                out["cpu_last"] = cpu_between(s[n - w], s[n], w)
        return out


# --------------------------------------------------------------------------- pairlb


@dataclass
class Node:
    proc: c.Managed
    conf: Path
    port: int
    admin_port: int
    api: HttpClient
    poll: HttpClient
    pids: Pids


def start_pairlb(args: argparse.Namespace, workdir: Path, procs: c.ProcessSet, tag: str,
                 backends: Sequence[tuple[str, int]]) -> Node:
    port, admin_port = c.free_ports(2)
    c.require_free([port, admin_port])
    conf = workdir / f"pairlb-{tag}.toml"
    write_pairlb(conf, args, workdir, port, admin_port, backends)
    venv = REPO / ".venv" if (REPO / ".venv").is_dir() else Path(sys.prefix)
    lb = procs.start(f"pairlb-{tag}", [str(venv / "bin" / "pairlb"), "run", "-c", str(conf)],
                     workdir / f"pairlb-{tag}.log", cpus="0" if args.pin else None)
    c.wait_http_ok(HOST, admin_port, "/healthz", 60.0, proc=lb)
    poll = HttpClient(admin_port)
    if wait_for(lambda: usable(poll) >= len(backends), 60.0, 0.2, lb) is None:
        raise RuntimeError(f"pairlb-{tag}: the base pool never came up")
    st = poll.json("/status")
    workers = [w["pid"] for w in st["workers"]]
    lb.remember_tree()
    return Node(lb, conf, port, admin_port, HttpClient(admin_port, TOKEN), poll,
                Pids(lb.pid, workers))


def worker_health(node: Node) -> dict[str, Any]:
    st = node.poll.json("/status")
    ws = st["workers"]
    return {"pids": [w["pid"] for w in ws], "restarts": sum(w["restarts"] for w in ws),
            "crashes": sum(w["crashes"] for w in ws),
            "hung_kills": sum(w["hung_kills"] for w in ws),
            "same_pids": [w["pid"] for w in ws] == node.pids.workers}


def start_load(args: argparse.Namespace, workdir: Path, procs: c.ProcessSet, port: int,
               out: Path, duration: float) -> c.Managed:
    argv = ["env", "-C", str(REPO), sys.executable, "-m", "lab.load", f"{HOST}:{port}", str(out),
            "--rate", f"{args.rate:g}", "--duration", f"{duration:g}",
            "--max-requests", str(int(args.rate * duration) + 10), "--post-every", "0"]
    return procs.start(f"load-{out.stem}", argv, workdir / f"{out.stem}.log",
                       cpus="1" if args.pin else None)


def start_scraper(args: argparse.Namespace, workdir: Path, procs: c.ProcessSet, admin_port: int,
                  out: Path, duration: float) -> c.Managed:
    argv = [sys.executable, str(Path(__file__).resolve()), "_scrape", str(admin_port), str(out),
            f"{args.scrape_every:g}", f"{duration:g}"]
    return procs.start(f"scraper-{out.stem}", argv, workdir / f"{out.stem}.log",
                       cpus="1" if args.pin else None)


def load_summary(records: list[Any], since: float, until: float) -> dict[str, Any]:
    rs = [r for r in records if since <= r.t0 <= until]
    bad = [r for r in rs if not r.ok]
    return {"requests": len(rs), "failed": len(bad),
            "errors": dict(Counter(r.error for r in bad).most_common(5)),
            "backends_served": len({r.backend for r in rs if r.ok}),
            "p99_ms": round(pct([r.t1 - r.t0 for r in rs], 99) * 1e3, 2) if rs else math.nan}


# --------------------------------------------------------------------------- HAProxy


class HaproxyCli:
    """The stats socket in prompt mode: one connection, one command at a time."""

    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(API_TIMEOUT_S)
        self.s.connect(str(path))
        self.s.sendall(b"prompt\n")
        self._read()

    def _read(self) -> bytes:
        buf = b""
        while not buf.endswith(b"\n> "):
            chunk = self.s.recv(1 << 16)
            if not chunk:
                raise ConnectionError("haproxy closed the CLI")
            buf += chunk
        return buf[:-2]

    def cmd(self, line: str) -> str:
        self.s.sendall(line.encode() + b"\n")
        return self._read().decode(errors="replace")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.s.sendall(b"quit\n")
        self.s.close()


def haproxy_running(cli: HaproxyCli, prefix: str) -> int:
    """Servers named prefix* whose srv_op_state is 2 (running)."""
    n = 0
    for line in cli.cmd("show servers state be").splitlines():
        f = line.split()
        if len(f) > 5 and f[3].startswith(prefix) and f[5] == "2":
            n += 1
    return n


def run_haproxy(args: argparse.Namespace, workdir: Path, procs: c.ProcessSet,
                base: list[tuple[str, int]], added: list[tuple[str, int]]) -> dict[str, Any]:
    port = c.free_ports(1)[0]
    c.require_free([port])
    sock = workdir / "haproxy.sock"
    conf = write_haproxy(workdir, port, sock, args.interval, base)
    hp = procs.start("haproxy", c.haproxy_argv(conf), workdir / "haproxy.log",
                     cpus="0" if args.pin else None)
    try:
        c.wait_http_ok(HOST, port, "/", 20.0, proc=hp)
        cli = HaproxyCli(sock)
        pids = Pids(hp.pid, [])
        deadline = time.monotonic() + args.budget / 2
        adds = Changes("haproxy add", 200, args.window)

        def add(i: int) -> tuple[int, bytes, float]:
            name, p = added[i]
            t0 = time.perf_counter()
            a = cli.cmd(f"add server be/{name} {HOST}:{p} check inter {args.interval:g}s "
                        f"rise 1 fall 3")
            b = cli.cmd(f"enable health be/{name}")
            e = cli.cmd(f"enable server be/{name}")
            took = time.perf_counter() - t0
            ok = "New server registered" in a and not b.strip() and not e.strip()
            return (200 if ok else 500), (a + b + e).encode(), took

        adds.run(len(added), add, pids, deadline)
        n_ok = adds.statuses.get(200, 0)
        until_up = wait_for(lambda: haproxy_running(cli, "e") >= n_ok, args.wait, 0.2, hp)
        idle = idle_rate(pids, args.idle)
        removes = Changes("haproxy remove", 200, args.window)

        def remove(i: int) -> tuple[int, bytes, float]:
            name = added[i][0]
            t0 = time.perf_counter()
            a = cli.cmd(f"disable server be/{name}")
            b = cli.cmd(f"del server be/{name}")
            took = time.perf_counter() - t0
            return (200 if "Server deleted" in b else 500), (a + b).encode(), took

        removes.run(n_ok, remove, pids, time.monotonic() + args.budget / 2)
        left = haproxy_running(cli, "e")
        cli.close()
        return {"version": c.tool_version(["haproxy", "-v"]), "add": adds.summary(),
                "until_in_rotation_s": None if until_up is None else round(until_up, 2),
                "idle_at_n": idle, "remove": removes.summary(), "running_after_removes": left}
    finally:
        procs.stop(hp, timeout_s=5)


# --------------------------------------------------------------------------- the phases


def elastic_phase(args: argparse.Namespace, workdir: Path, procs: c.ProcessSet,
                  base: list[tuple[str, int]], added: list[tuple[str, int]],
                  extra: tuple[str, int], res: dict[str, Any]) -> list[int]:
    node = start_pairlb(args, workdir, procs, "elastic", base)
    n = len(added)
    load_out, scrape_out = workdir / "load-elastic.txt", workdir / "scrape-elastic.txt"
    fg = Foreign(procs).start()
    t_begin = time.monotonic()
    deadline = t_begin + args.budget / 2
    bound = args.budget + 150  # + the waits for rotation and drains; stopped when done
    load = start_load(args, workdir, procs, node.port, load_out, bound)
    scraper = start_scraper(args, workdir, procs, node.admin_port, scrape_out, bound)
    try:
        res["idle_base"] = idle_rate(node.pids, args.idle)
        # 1. adds
        adds = Changes("pairlb add", 201, args.window)

        def add(i: int) -> tuple[int, bytes, float]:
            name, p = added[i]
            return node.api.call("POST", f"/pools/{POOL}/backends",
                                 {"name": name, "address": f"{HOST}:{p}", "weight": 1})

        adds.run(n, add, node.pids, deadline)
        n_ok = adds.statuses.get(201, 0)
        have = [added[i] for i, st in enumerate(adds.answers) if st == 201]
        t_added = time.monotonic()
        want = len(base) + n_ok
        up = wait_for(lambda: usable(node.poll) >= want, args.wait, 0.1, node.proc)
        res["add"] = adds.summary()
        res["add"]["until_in_rotation_s"] = None if up is None else round(up, 2)
        res["add"]["until_in_rotation_from_first_s"] = (
            None if up is None else round(t_added + up - adds.t0, 2))
        res["add"]["usable_after"] = usable(node.poll)
        res["idle_at_n"] = idle_rate(node.pids, args.idle)
        net_of_idle(res["add"], res["idle_base"], res["idle_at_n"])
        print(f"adds: {n_ok}/{n} in {res['add']['total_s']:.1f} s, first {args.window} p99 "
              f"{res['add']['first']['p99_ms']} ms, last {res['add']['last']['p99_ms']} ms; "
              f"all in rotation {res['add']['until_in_rotation_s']} s later", flush=True)
        # 2. one change the old way with N runtime backends in the pool
        if not args.no_reload_at_n:  # two reloads: bounded by the API's timeout
            res["reload_at_n_runtime"] = reload_pair(args, workdir, node, base, extra,
                                                     len(base) + n_ok)
        # 3. removes
        removes = Changes("pairlb remove", 202, args.window)

        def remove(i: int) -> tuple[int, bytes, float]:
            return node.api.call("DELETE", f"/pools/{POOL}/backends/{have[i][0]}")

        removes.run(len(have), remove, node.pids, time.monotonic() + args.budget / 2)
        t_removed = time.monotonic()
        names = {have[i][0] for i, st in enumerate(removes.answers) if st == 202}
        gone = wait_for(lambda: not (names & set(members(node.poll))),
                        DRAIN_TIMEOUT_S + args.wait, 0.25, node.proc)
        res["remove"] = removes.summary()
        res["remove"]["until_gone_s"] = None if gone is None else round(gone, 2)
        res["remove"]["until_gone_from_first_s"] = (
            None if gone is None else round(t_removed + gone - removes.t0, 2))
        left = {a[0] for a in have} & set(members(node.poll))
        res["remove"]["left_in_status"] = len(left)  # the ones not removed (out of time) too
        print(f"removes: {res['remove']['ok']}/{n_ok} in {res['remove']['total_s']:.1f} s, "
              f"first p99 {res['remove']['first']['p99_ms']} ms, last "
              f"{res['remove']['last']['p99_ms']} ms; gone from /status "
              f"{res['remove']['until_gone_s']} s later", flush=True)
        res["idle_after"] = idle_rate(node.pids, args.idle)
        net_of_idle(res["remove"], res["idle_at_n"], res["idle_after"])
        res["workers"] = worker_health(node)
        res["api_connections"] = node.api.connects
        t_end = time.monotonic()
        res["foreign_cores"] = fg.cores()
        res["loadavg_1m"] = loadavg()
    finally:
        node.proc.remember_tree()
        procs.stop(scraper, timeout_s=5)
        procs.stop(load, timeout_s=10)
    records = RecordLog(load_out).poll()
    res["load"] = load_summary(records, t_begin, t_end)
    res["load"]["late_to_removed"] = late_to_removed(records, have, removes)
    res["load_during_adds"] = load_summary(records, adds.t0, adds.t1)
    res["load_during_removes"] = load_summary(records, removes.t0, removes.t1)
    res["load_during_adds"]["by_pool_size"] = by_size(records, adds, len(base), 1)
    res["load_during_removes"]["by_pool_size"] = by_size(records, removes, len(base) + len(have),
                                                         -1)
    res["scrape"] = read_scrapes(scrape_out, t_begin, t_end)
    pids = sorted(node.proc.known)
    procs.stop(node.proc, timeout_s=10)
    return pids


def by_size(records: list[Any], phase: Changes, start: int, step: int,
            buckets: int = 6) -> list[dict[str, Any]]:
    """The load's requests during a phase by the pool's size when they started (``start``
    backends, ``step`` per answered change): where in the phase requests failed."""
    done = phase.done_at
    if not done:
        return []
    n = len(done)
    width = max(1, math.ceil(n / buckets))
    out = []
    for lo in range(0, n, width):
        hi = min(n, lo + width)
        t0 = phase.t0 if lo == 0 else done[lo - 1]
        t1 = done[hi - 1]
        rs = [r for r in records if t0 <= r.t0 < t1]
        out.append({"changes": f"{lo + 1}-{hi}", "pool": f"{start + step * lo}-"
                    f"{start + step * hi}", "requests": len(rs),
                    "failed": sum(1 for r in rs if not r.ok)})
    return out


def late_to_removed(records: list[Any], added: list[tuple[str, int]], removes: Changes) -> int:
    """Requests that started LATE_AFTER_DELETE_S after a backend's DELETE answered (202) and
    were still served by it."""
    answered = {str(added[i][1]): t for i, t in enumerate(removes.done_at)
                if removes.answers[i] == 202}
    return sum(1 for r in records
               if r.backend in answered and r.t0 > answered[r.backend] + LATE_AFTER_DELETE_S)


def reload_pair(args: argparse.Namespace, workdir: Path, node: Node,
                base: list[tuple[str, int]], extra: tuple[str, int],
                expect: int) -> dict[str, Any]:
    """One more backend in the file + POST /reload, then the file as it was + POST /reload."""
    out: dict[str, Any] = {"reloads": []}
    for backends in ([*base, extra], base):
        write_pairlb(node.conf, args, workdir, node.port, node.admin_port, backends)
        a = node.pids.snap()
        status, raw, took = node.api.call("POST", "/reload")
        b = node.pids.snap()
        ok = status == 200 and json.loads(raw).get("ok") is True
        out["reloads"].append({"backends_in_file": len(backends), "status": status, "ok": ok,
                               "ms": round(took * 1e3, 1), **cpu_between(a, b, 1)})
    time.sleep(0.5)
    have = members(node.poll)
    out["members_after"] = len(have)
    out["kept_runtime_backends"] = len(have) >= expect
    return out


def reload_phase(args: argparse.Namespace, workdir: Path, procs: c.ProcessSet,
                 base: list[tuple[str, int]], added: list[tuple[str, int]],
                 extra: tuple[str, int], res: dict[str, Any]) -> list[int]:
    node = start_pairlb(args, workdir, procs, "reload", base)
    added = [(f"r{i}", p) for i, (_, p) in enumerate(added, 1)]  # names the other node never had
    k = args.reloads
    load_out = workdir / "load-reload.txt"
    fg = Foreign(procs).start()
    t_begin = time.monotonic()
    deadline = t_begin + args.reload_budget
    load = start_load(args, workdir, procs, node.port, load_out, args.reload_budget + 60)
    reloads = Changes("reload add", 200, args.reload_window)
    try:
        def reload(i: int) -> tuple[int, bytes, float]:
            write_pairlb(node.conf, args, workdir, node.port, node.admin_port,
                         base + added[: i + 1])  # K <= N: the first K of the same ports
            status, raw, took = node.api.call("POST", "/reload")
            if status == 200 and json.loads(raw).get("ok") is not True:
                status = 299  # 200 but not applied: counted apart
            return status, raw, took

        reloads.run(k, reload, node.pids, deadline)
        t_done = time.monotonic()
        done = reloads.statuses.get(200, 0)
        up = wait_for(lambda: usable(node.poll) >= len(base) + done, args.wait, 0.1,
                      node.proc)
        res["reload"] = reloads.summary()
        res["reload"]["until_in_rotation_s"] = None if up is None else round(up, 2)
        res["reload"]["until_in_rotation_from_first_s"] = (
            None if up is None else round(t_done + up - reloads.t0, 2))
        print(f"reloads: {done}/{k} in {res['reload']['total_s']:.1f} s, first "
              f"{args.reload_window} p99 {res['reload']['first']['p99_ms']} ms, last "
              f"{res['reload']['last']['p99_ms']} ms", flush=True)
        if not args.no_reload_at_n and time.monotonic() < deadline:
            # The file jumps to N backends (one reload, not a per-change figure) ...
            write_pairlb(node.conf, args, workdir, node.port, node.admin_port, base + added)
            a = node.pids.snap()
            status, raw, took = node.api.call("POST", "/reload")
            b = node.pids.snap()
            jump = {"to_backends": len(base) + len(added), "status": status,
                    "ok": status == 200 and json.loads(raw).get("ok") is True,
                    "ms": round(took * 1e3, 1), **cpu_between(a, b, 1)}
            up_n = wait_for(lambda: usable(node.poll) >= len(base) + len(added), args.wait,
                            0.2, node.proc)
            jump["until_in_rotation_s"] = None if up_n is None else round(up_n, 2)
            res["reload_jump_to_n"] = jump
            # ... then one more and one fewer: the old way's price of a change at N.
            res["reload_at_n_config"] = reload_pair(args, workdir, node, base + added, extra,
                                                    len(base) + len(added))
        res["reload_workers"] = worker_health(node)
        t_end = time.monotonic()
        res["reload_foreign_cores"] = fg.cores()
        res["reload_loadavg_1m"] = loadavg()
    finally:
        node.proc.remember_tree()
        procs.stop(load, timeout_s=10)
    records = RecordLog(load_out).poll()
    res["reload_load"] = load_summary(records, t_begin, t_end)
    pids = sorted(node.proc.known)
    procs.stop(node.proc, timeout_s=10)
    return pids


# --------------------------------------------------------------------------- output


def _f(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _after(what: str, x: float | None, wait: float, tail: str = "after the last") -> str:
    if x is None:
        return f"NOT {what} after {wait:g} s"
    return f"{what} {x:,.2f} s {tail}"


def _lat(d: dict[str, Any] | None) -> str:
    if not d or not d.get("n"):
        return "-"
    return f"{_f(d['p50_ms'], 2)} / {_f(d['p99_ms'], 2)} / {_f(d['max_ms'], 1)}"


def _cpu(s: dict[str, Any], which: str, key: str) -> str:
    d = s.get(which)
    return _f(d.get(key), 3) if d else "-"


def render(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def tables(res: dict[str, Any], args: argparse.Namespace) -> str:
    n, b, w, rw = args.backends, args.base, args.window, args.reload_window
    head = ["change", "count", f"first {w}: p50 / p99 / max ms", f"last {w}: p50 / p99 / max ms",
            "total s", "control CPU s per 1,000 (first / last / all)",
            "same, net of idle", "worker CPU s per 1,000, each (first / last / all)",
            "same, net of idle", "then"]
    rows = []

    def row(label: str, s: dict[str, Any] | None, then: str, window: int | None = None) -> None:
        if not s:
            return
        cw = window or w
        h = [label, f"{s['ok']:,}/{s['count']:,}" + (" (out of time)" if s["truncated"] else ""),
             _lat(s["first"]), _lat(s["last"]), _f(s["total_s"], 1),
             *(" / ".join(_cpu(s, k, key) for k in ("cpu_first", "cpu_last", "cpu_all"))
               for key in ("control_cpu_s_per_1000", "control_net_per_1000",
                           "worker_cpu_s_per_1000", "worker_net_per_1000")), then]
        if cw != w:
            h[2] = f"({cw}) " + h[2]
            h[3] = f"({cw}) " + h[3]
        rows.append(h)

    a, r = res.get("add"), res.get("remove")
    wt = args.wait
    row(f"pairlb `POST /pools/web/backends` ({b} -> {b + n:,} backends)", a,
        _after("all in rotation", a.get("until_in_rotation_s"), wt) if a else "")
    row(f"pairlb `DELETE /pools/web/backends/NAME` ({b + n:,} -> {b})", r,
        _after("gone from /status", r.get("until_gone_s"), wt + DRAIN_TIMEOUT_S) if r else "")
    rl = res.get("reload")
    row(f"old way: file + `POST /reload` ({b} -> {b + args.reloads} backends)", rl,
        _after("all in rotation", rl.get("until_in_rotation_s"), wt) if rl else "", rw)
    for key, label in (("reload_at_n_runtime", f"`POST /reload` +1 / -1 backend in the file, "
                        f"{n:,} runtime backends in the pool"),
                       ("reload_at_n_config", f"old way at N: file + `POST /reload` +1 / -1, "
                        f"{n:,} backends in the file")):
        d = res.get(key)
        if d:
            rls = d["reloads"]
            rows.append([label, f"{sum(x['ok'] for x in rls)}/{len(rls)}",
                         " ; ".join(f"{x['ms']:,.1f}" for x in rls) + " ms", "-", "-",
                         " ; ".join(f"{x['control_cpu_s']:.3f}" for x in rls) + " (each)", "-",
                         " ; ".join(f"{statistics.mean(x['worker_cpu_s']):.3f}"
                                    for x in rls if x["worker_cpu_s"]) + " (each)", "-",
                         f"members after: {d['members_after']:,}"])
    j = res.get("reload_jump_to_n")
    if j:
        rows.append([f"old way: the file jumps {b + args.reloads} -> {j['to_backends']:,} "
                     f"backends, one `POST /reload`", "1", f"{j['ms']:,.1f} ms", "-", "-",
                     f"{j['control_cpu_s']:.3f} (this reload)", "-",
                     f"{statistics.mean(j['worker_cpu_s']):.3f} (this reload)"
                     if j["worker_cpu_s"] else "-", "-",
                     _after("all in rotation", j.get("until_in_rotation_s"), wt, "later")])
    hp = res.get("haproxy")
    if hp and "add" in hp:
        row("HAProxy CLI `add server` + `enable health` + `enable server` (no traffic)",
            hp["add"], _after("all running", hp.get("until_in_rotation_s"), wt))
        row("HAProxy CLI `disable server` + `del server`", hp["remove"],
            f"running after: {hp.get('running_after_removes')}")
    out = [render(head, rows, args.markdown)]
    lhead = ["while", "requests", "failed", "p99 ms", "backends that served",
             "/metrics scrapes (failed)", "scrape p50 / p99 / max ms", "/metrics max size",
             "foreign load, cores", "load avg 1m"]
    lrows = []
    for key, label in (("load_during_adds", "adds"), ("load_during_removes", "removes"),
                       ("load", "adds, reload at N, removes (whole phase)"),
                       ("reload_load", "old way (reloads)")):
        ld = res.get(key)
        if not ld:
            continue
        whole = key == "load"
        sc = res.get("scrape", {}) if whole else {}
        lrows.append([
            label, f"{ld['requests']:,}", f"{ld['failed']:,}" + (
                " (" + ", ".join(f"{k} {v:,}" for k, v in ld["errors"].items()) + ")"
                if ld["failed"] else ""),
            _f(ld["p99_ms"], 1), f"{ld['backends_served']:,}",
            f"{sc['scrapes']} ({sc['failed']})" if sc else "-",
            f"{_f(sc['scrape_p50_ms'], 1)} / {_f(sc['scrape_p99_ms'], 1)} / "
            f"{_f(sc['scrape_max_ms'], 1)}" if sc else "-",
            f"{sc['max_bytes'] / 1e6:.2f} MB ({sc['max_wire_bytes'] / 1e3:.0f} kB gzip)"
            if sc else "-",
            _f(res.get("foreign_cores") if whole else
               res.get("reload_foreign_cores") if key == "reload_load" else None, 2),
            _f(res.get("loadavg_1m") if whole else
               res.get("reload_loadavg_1m") if key == "reload_load" else None, 2),
        ])
    out.append(render(lhead, lrows, args.markdown))
    brows = []
    for key, label in (("load_during_adds", "adds"), ("load_during_removes", "removes")):
        for bk in (res.get(key) or {}).get("by_pool_size", []):
            brows.append([label, bk["changes"], bk["pool"].replace("-", " -> "),
                          f"{bk['requests']:,}", f"{bk['failed']:,}"])
    if brows:
        out.append(render(["phase", "changes #", "pool size", "requests", "failed"], brows,
                          args.markdown))
    notes = []
    ib, il = res.get("idle_base"), res.get("idle_at_n")
    if ib and il:
        notes.append(f"idle CPU (checks every {args.interval:g} s, scrape every "
                     f"{args.scrape_every:g} s, {args.rate:g} req/s): control "
                     f"{ib['control_cores']:.3f} cores with {b} backends, "
                     f"{il['control_cores']:.3f} with {b + n:,}; each worker "
                     f"{ib['worker_cores']:.3f} / {il['worker_cores']:.3f}")
    if hp and "skipped" in hp:
        notes.append(f"HAProxy: {hp['skipped']}")
    lr = res.get("load", {})
    if "late_to_removed" in lr:
        notes.append(f"requests served by a removed backend more than {LATE_AFTER_DELETE_S:g} s "
                     f"after its DELETE answered: {lr['late_to_removed']}")
    w_ = res.get("workers")
    if w_:
        notes.append(f"workers: restarts {w_['restarts']}, crashes {w_['crashes']}, hung kills "
                     f"{w_['hung_kills']}, same PIDs all along: {w_['same_pids']}")
    out.append("\n".join(f"- {x}" for x in notes))
    return "\n\n".join(out)


# --------------------------------------------------------------------------- main


def uncommitted() -> list[str]:
    """Files of the measured code (lb, healthcheck) that differ from the commit: others
    change the tree while benchmarks run, so the commit alone does not say what ran."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        r = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "lb",
                            "healthcheck"], capture_output=True, text=True, timeout=30)
        return [line[3:] for line in r.stdout.splitlines()]
    return []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_scrape"]:
        return scraper_main(argv[1:])
    args = parse_args(argv)
    if shutil.which("nginx") is None:
        print("nginx not found", file=sys.stderr)
        return 2
    haproxy = None if args.no_haproxy else shutil.which("haproxy")
    workdir = Path(tempfile.mkdtemp(prefix="elastic-"))
    workdir.chmod(0o755)
    (workdir / "admin.token").write_text(TOKEN + "\n")
    (workdir / "admin.token").chmod(0o600)
    if args.pin:
        os.sched_setaffinity(0, {1})  # this script (the API client) with the load, on CPU 1
    res: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool)
                 or v is None},
        "commit": c.tool_version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "uncommitted_in_tree": uncommitted(),
        "cpu": c.cpu_model(), "cpus": os.cpu_count(), "loadavg_start": loadavg(),
    }
    started: list[int] = []
    t_begin = time.monotonic()
    code = 0
    try:
        with c.sigterm_as_exit(), c.ProcessSet() as procs:
            nb, n = args.base, args.backends
            ports = c.free_ports(nb + n + 1)
            c.require_free(ports)
            base = [(f"b{i}", p) for i, p in enumerate(ports[:nb], 1)]
            added = [(f"e{i}", p) for i, p in enumerate(ports[nb:nb + n], 1)]
            extra = ("x1", ports[-1])
            nginx = procs.start("backends", c.nginx_argv(write_nginx(workdir, ports), workdir),
                                workdir / "backends.log", cpus="1" if args.pin else None)
            for p in (ports[0], ports[-1]):
                c.wait_http_ok(HOST, p, "/", 30.0, proc=nginx)
            started += nginx.remember_tree()
            res["foreign_at_start"] = round(c.wait_quiet([nginx.pid], args.quiet_wait, 0.2), 2)
            started += elastic_phase(args, workdir, procs, base, added, extra, res)
            started += reload_phase(args, workdir, procs, base, added, extra, res)
            if haproxy is None:
                res["haproxy"] = {"skipped": "not installed" if not args.no_haproxy
                                  else "--no-haproxy"}
            else:
                try:
                    res["haproxy"] = run_haproxy(args, workdir, procs, base, added)
                except (OSError, RuntimeError) as exc:
                    res["haproxy"] = {"skipped": f"failed: {exc}"}
            started += [p for m in procs.procs for p in m.known]
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        res["error"] = str(exc)
        code = 1
    finally:
        if args.keep_workdir:
            print(f"workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    res["started_pids"] = sorted(set(started))
    res["elapsed_s"] = round(time.monotonic() - t_begin, 1)
    if code == 130:
        return code
    text = tables(res, args)
    print()
    print(text)
    print(f"\ncommit {res['commit']}, {res['elapsed_s']:.0f} s, pinned: {args.pin}, "
          f"N = {args.backends}, base {args.base}, {args.reloads} reloads, load "
          f"{args.rate:g} req/s, checks every {args.interval:g} s")
    line = json.dumps(res, default=str, allow_nan=True)
    print(line)
    out = args.json
    if out is None:
        rdir = Path(tempfile.mkdtemp(prefix="elastic-results-"))
        out = rdir / "elastic.json"
    out.write_text(line + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    print(f"results: {out} and {out.with_suffix('.md')}")
    return code


if __name__ == "__main__":
    sys.exit(main())
