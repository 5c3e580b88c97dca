#!/usr/bin/env python3
"""The Maglev control plane at 3,000 backends (issue 17): what building a pool's lookup
table costs the control process (health checks, the admin API, /metrics) and the workers,
and what the keys' backends do meanwhile, against a round_robin pool of the same size in
the same run.

One nginx (1 worker, bench/elastic.py's farm: 200 ``ok`` and ``X-Backend: <its port>``)
listens on ``--backends`` + ``--burst`` + 1 ports of 127.0.0.1. For each mode (``maglev``,
then ``round_robin``) a fresh ``pairlb run`` (``[node] workers = 2``, logging at info, a
state dir and a token file of its own) gets one pool ``web`` of N backends
(``balance = "maglev"``, ``hash_on = "header:X-User"``, the default table size; or
``round_robin``), health checks at the default interval (1 s, ``rise`` 2, timeout 0.5 s),
``drain_timeout_s = 5``. Then:

1. **startup**: seconds from the start to the admin API answering, to the first table
   (``/status`` ``pools[].hashing.built_at``), to ``/readyz``, to every backend UP; the build
   time from ``/status`` (``build_ms``) and from the log line ``event=maglev_table``;
2. **steady** (``--idle`` s): the load, the scrape and the probes below, nothing else;
3. **adds**: ``--burst`` ``POST /pools/web/backends`` back to back on one keep-alive
   connection; the window lasts until the table is current again (maglev) and every added
   backend is usable, plus ``--tail`` s;
4. **removes**: the same backends ``DELETE``d (each drains first), until the table is current
   and the pool is back to N members, plus the tail;
5. **reload, same file**: ``POST /reload`` with the file unchanged (no build expected);
6. **reload, +1 backend**: the file gets one more backend, ``POST /reload`` (one build).

All along: an open-loop client (``_load``, lab.load's client with an ``X-User`` header:
``--keys`` distinct keys in a fixed order, ``--rate`` GETs per second, half of them on a
fresh connection) goes through the listener; a separate process scrapes ``/metrics`` every
``--scrape-every`` s as Prometheus does (its Accept header, gzip) and keeps the check
lateness histogram of each scrape (so every window has its own lateness p50/p99); another
(``_probe``) GETs ``/healthz`` every 0.1 s (the control loop's responsiveness: a trivial
handler, so its latency is the loop's backlog) and ``/status`` every second (its latency,
``health_checks.lateness_max_ms.10s``, ``rotation.apply_ms.max_10s``, the largest
``workers[].rotation_lag_s`` and the table's state). Per window: builds (log lines),
lateness p50/p99 (histogram deltas between scrapes) and the max from /status, how long
rotation changes took to reach the workers (the worst push-to-applied of the last 10 s read
during the window or 1.5 s after it, and the largest worker lag seen), /healthz and
/status p50/p99/max, scrape p50/p99/max and failures, requests and failures and latency
p50/p99 of the load (the workers' ``set_hash_table`` shows there), CPU of the control
process and of each worker, health transitions to DOWN (every backend is healthy: each one
is spurious).

Affinity (maglev): every key is asked once (``--keys`` GETs, 4 keep-alive connections)
before the adds, after them, after the removes and after the +1 reload; reported: the share
of keys whose backend changed (against the ideal), where they went (an added backend or
another old one), and whether any key whose backend was the same at both ends of a phase
was ever served elsewhere in between (by the load's requests: must be 0).

    .venv/bin/python bench/maglev_scale.py --markdown --json /tmp/maglev-scale.json  # < 3 min
    .venv/bin/python bench/maglev_scale.py --quick                 # smoke: N = 300, < 20 s
    .venv/bin/python bench/maglev_scale.py loop --markdown         # in-process, ~30 s

``loop`` is the one part that imports lb (in-process, like bench/maglev.py): an asyncio loop
starts ``--rate`` health-check-like requests a second (connect, GET, read, close) to one
nginx port for ``--seconds``, while nothing else runs, while 3,000-backend tables
(M = 524,309) are built back to back in a thread (``asyncio.to_thread(lb.maglev.build)``),
and while they are built back to back by lb.control.hashing's ``Builder`` (a helper
process), ``--rounds`` times: checks done per second, how late they started (p50/p99/max)
and how many failed (2 s timeout). The box's other load hits all three alike; the GIL only
the thread.

Everything is bounded (``--budget`` s per node for the load and the scrape, ``--wait`` s per
wait); every process is started by this script and stopped by PID in a finally, also on
Ctrl-C and SIGTERM; all traffic stays on 127.0.0.1. Imports nothing from lb (it measures the
installed ``pairlb``) nor from tests/.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import gzip
import http.client
import itertools
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c
import elastic as el

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from lab.load import (  # noqa: E402
    LoadClient,
    Record,
    RecordLog,
)

HOST = el.HOST
POOL = "web"
TOKEN = "maglev-scale-bench-token"
HEADER = "X-User"
MODES = ("maglev", "round_robin")
KEY_STRIDE = 7919
"""Request i of the load asks for key (i * KEY_STRIDE) % K: every key once per K requests."""
LATENESS = "pairlb_health_check_lateness_seconds"
MAGLEV_LINE = re.compile(rb"event=maglev_table pool=(\S+) members=(\d+) size=(\d+) "
                         rb"build_ms=([\d.]+)")
DOWN_LINE = re.compile(rb"event=health_transition [^\n]* to=DOWN")
BUILD_FAILED = re.compile(rb"event=maglev_build_failed")


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--backends", type=int, default=3000, help="N: backends in the file")
    ap.add_argument("--burst", type=int, default=300, help="runtime adds, then removes")
    ap.add_argument("--modes", default=",".join(MODES), help="pools measured, in order")
    ap.add_argument("--rate", type=float, default=200.0, help="load, requests per second")
    ap.add_argument("--keys", type=int, default=2000, help="distinct X-User values")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of the steady window")
    ap.add_argument("--tail", type=float, default=1.0,
                    help="seconds a window goes on after its change is complete")
    ap.add_argument("--scrape-every", type=float, default=1.0, help="/metrics period, s")
    ap.add_argument("--access-log", choices=("json", "combined"), default=None,
                    help="[logging] access_log on (access-logs/access-MODE.log in the workdir)")
    ap.add_argument("--status-every", type=float, default=1.0, help="/status period, s")
    ap.add_argument("--healthz-every", type=float, default=0.1, help="/healthz period, s")
    ap.add_argument("--interval", type=float, default=None,
                    help="health check interval_s (default: pairlb's, 1 s)")
    ap.add_argument("--rise", type=int, default=None, help="health check rise (default: 2)")
    ap.add_argument("--drain", type=float, default=5.0, help="the pool's drain_timeout_s")
    ap.add_argument("--wait", type=float, default=60.0,
                    help="seconds to wait for startup (every backend UP)")
    ap.add_argument("--settle-wait", type=float, default=20.0,
                    help="seconds to wait for a change to settle (table current, pool complete)")
    ap.add_argument("--burst-budget", type=float, default=60.0,
                    help="seconds the adds (and the removes) may take: the rest is skipped")
    ap.add_argument("--budget", type=float, default=300.0,
                    help="seconds one node may take (bounds its load and scrape)")
    ap.add_argument("--json", type=Path, help="write the results here (one JSON object)")
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    ap.add_argument("--keep-workdir", action="store_true", help="leave configs and logs")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: N = 300, a burst of 30, checks every 0.5 s, short windows")
    args = ap.parse_args(argv)
    if args.quick:
        args.backends, args.burst, args.rate, args.keys = 300, 30, 100.0, 300
        args.idle, args.tail, args.interval, args.rise = 0.5, 0.3, 0.5, 1
        args.drain, args.wait, args.budget, args.status_every = 1.0, 10.0, 40.0, 0.5
        args.settle_wait = 10.0
        args.burst_budget = 10.0
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.backends < 2 or args.burst < 1 or args.keys < 1 or args.rate <= 0:
        ap.error("--backends >= 2, --burst >= 1, --keys >= 1, --rate > 0")
    if not args.modes or set(args.modes) - set(MODES):
        ap.error(f"--modes: some of {','.join(MODES)}")
    if math.gcd(KEY_STRIDE, args.keys) != 1:
        args.keys += 1  # every key in each round of K requests
    return args


# --------------------------------------------------------------------------- helpers


def key_of(i: int, keys: int) -> str:
    return f"u{(i * KEY_STRIDE) % keys}"


def pct(xs: Sequence[float], q: float) -> float:
    return el.pct(xs, q)


def lat_ms(xs: Sequence[float]) -> dict[str, Any]:
    """n, p50/p99/max in ms of durations in seconds."""
    if not xs:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"n": len(xs), "p50_ms": round(pct(xs, 50) * 1e3, 2),
            "p99_ms": round(pct(xs, 99) * 1e3, 2), "max_ms": round(max(xs) * 1e3, 2)}


def hist_quantile(bounds: list[float], counts: list[float], q: float) -> float | None:
    """Prometheus's histogram_quantile over cumulative counts (the last bound is +Inf);
    None without observations; the largest finite bound if the rank falls in +Inf."""
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    rank = q * total
    i = bisect.bisect_left(counts, rank)
    if i >= len(bounds) or math.isinf(bounds[i]):
        return max(b for b in bounds if not math.isinf(b))
    lo = bounds[i - 1] if i > 0 else 0.0
    below = counts[i - 1] if i > 0 else 0.0
    inside = counts[i] - below
    return lo + (bounds[i] - lo) * ((rank - below) / inside if inside else 1.0)


def metric_values(text: str, name: str) -> dict[str, float]:
    """``name{labels} value`` lines of an exposition -> {labels text: value}."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name) and line[len(name):len(name) + 1] in ("{", " "):
            head, _, val = line.rpartition(" ")
            out[head[len(name):]] = float(val)
    return out


class Admin:
    """The admin API on keep-alive connections: one for changes, one for polling."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.api = el.HttpClient(port, TOKEN)
        self.poll = el.HttpClient(port)

    def pool_metrics(self) -> dict[str, float]:
        """The pool's usable backends, members, and table state (-1: not readable)."""
        out = {"usable": -1.0, "members": -1.0, "current": -1.0}
        try:
            status, raw, _ = self.poll.call("GET", "/metrics?scope=pool")
        except (OSError, http.client.HTTPException):
            self.poll.close()
            return out
        if status != 200:
            return out
        text = raw.decode()
        lab = f'pool="{POOL}"'
        for k, v in metric_values(text, "pairlb_pool_usable_backends").items():
            if lab in k:
                out["usable"] = v
        members = [v for k, v in metric_values(text, "pairlb_pool_backends").items() if lab in k]
        if members:
            out["members"] = sum(members)
        for k, v in metric_values(text, "pairlb_maglev_table_current").items():
            if lab in k:
                out["current"] = v
        return out

    def status(self) -> dict[str, Any]:
        return self.poll.json("/status")

    def close(self) -> None:
        self.api.close()
        self.poll.close()


def wait_until(pred: Callable[[], bool], timeout_s: float, every_s: float,
               proc: c.Managed) -> float | None:
    return el.wait_for(pred, timeout_s, every_s, proc)


class LogTail:
    """Counts of the interesting lines of pairlb's log from a byte offset on."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def offset(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def since(self, start: int, end: int | None = None) -> dict[str, Any]:
        try:
            with open(self.path, "rb") as f:
                f.seek(start)
                data = f.read() if end is None else f.read(max(0, end - start))
        except FileNotFoundError:
            data = b""
        builds = [m for m in MAGLEV_LINE.finditer(data) if m.group(1) == POOL.encode()]
        return {"builds": len(builds),
                "build_ms": [float(m.group(4)) for m in builds],
                "build_members": [int(m.group(2)) for m in builds],
                "build_failures": len(BUILD_FAILED.findall(data)),
                "to_down": len(DOWN_LINE.findall(data))}


# --------------------------------------------------------------------------- _load


class KeyedLoad(LoadClient):
    """lab.load's open-loop client, GETs only, each with ``X-User: key_of(i)`` (its record's
    id is ``r<i>``, so the key is known from the record)."""

    def __init__(self, *args: Any, keys: int, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.keys = keys

    def extra_headers(self, cid: str) -> str:
        return f"{HEADER}: {key_of(int(cid[len(self.prefix):]), self.keys)}\r\n"


def load_main(argv: list[str]) -> int:
    """``_load PORT OUT RATE DURATION KEYS``: lab.load's record lines in OUT."""
    port, out, rate, duration, keys = (int(argv[0]), argv[1], float(argv[2]), float(argv[3]),
                                       int(argv[4]))
    with open(out, "a", buffering=1, encoding="ascii") as f:
        client = KeyedLoad(HOST, port, f, rate=rate, duration_s=duration,
                           max_requests=int(rate * duration) + 10, timeout_s=2.0,
                           post_every=0, prefix="r", keys=keys)
        return asyncio.run(client.run())


# --------------------------------------------------------------------------- _scrape


def scrape_main(argv: list[str]) -> int:
    """``_scrape PORT OUT EVERY DURATION``: GET /metrics like Prometheus every EVERY s; one
    JSON line per scrape: t, took, status, wire and text bytes, the check lateness
    histogram (cumulative, by bound) and the pool's health check count."""
    port, out, every, duration = int(argv[0]), Path(argv[1]), float(argv[2]), float(argv[3])
    headers = {"Accept": el.PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"}
    bucket = re.compile(rf'^{LATENESS}_bucket\{{le="([^"]+)"\}} (\S+)', re.M)
    conn: http.client.HTTPConnection | None = None
    end = time.monotonic() + duration
    with open(out, "a", buffering=1) as f:
        while time.monotonic() < end:
            t = time.monotonic()
            row: dict[str, Any] = {"t": t, "status": 0, "wire": 0, "size": 0}
            t0 = time.perf_counter()
            try:
                conn = conn or http.client.HTTPConnection(HOST, port, timeout=10)
                conn.request("GET", "/metrics", headers=headers)
                r = conn.getresponse()
                body = r.read()
                row["took"] = time.perf_counter() - t0
                row["status"], row["wire"] = r.status, len(body)
                if r.getheader("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                row["size"] = len(body)
                text = body.decode(errors="replace")
                row["lat"] = {le: float(v) for le, v in bucket.findall(text)}
                if r.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                row["took"] = time.perf_counter() - t0
                row["error"] = exc.__class__.__name__
                if conn is not None:
                    conn.close()
                conn = None
            f.write(json.dumps(row) + "\n")
            time.sleep(max(0.0, t + every - time.monotonic()))
    return 0


# --------------------------------------------------------------------------- _probe


def probe_main(argv: list[str]) -> int:
    """``_probe PORT OUT DURATION HEALTHZ_EVERY STATUS_EVERY``: two threads, each on its own
    keep-alive connection: ``h t took status`` lines for /healthz, ``s {json}`` lines for
    /status (took, lateness, the pool's table state and size)."""
    port, out, duration = int(argv[0]), Path(argv[1]), float(argv[2])
    hz_every, st_every = float(argv[3]), float(argv[4])
    end = time.monotonic() + duration
    lock = threading.Lock()
    f = open(out, "a", buffering=1)  # noqa: SIM115 (closed after both threads)

    def write(line: str) -> None:
        with lock:
            f.write(line + "\n")

    def get(conn: http.client.HTTPConnection | None, path: str
            ) -> tuple[http.client.HTTPConnection | None, int, bytes, float]:
        t0 = time.perf_counter()
        try:
            conn = conn or http.client.HTTPConnection(HOST, port, timeout=10)
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            if r.will_close:
                conn.close()
                conn = None
            return conn, r.status, body, time.perf_counter() - t0
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            return None, 0, b"", time.perf_counter() - t0

    def healthz() -> None:
        conn = None
        while (t := time.monotonic()) < end:
            conn, status, _, took = get(conn, "/healthz")
            write(f"h {t:.6f} {took:.6f} {status}")
            time.sleep(max(0.0, t + hz_every - time.monotonic()))

    def status() -> None:
        conn = None
        while (t := time.monotonic()) < end:
            conn, code, body, took = get(conn, "/status")
            row: dict[str, Any] = {"t": t, "took": took, "status": code}
            if code == 200:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    st = json.loads(body)
                    hc = st["health_checks"]
                    row["lat_max_10s"] = hc["lateness_max_ms"]["10s"]
                    row["lat_p99"] = hc["lateness_ms"]["p99"]
                    rot = st["rotation"]
                    row["rot_max_10s"] = rot["apply_ms"]["max_10s"]
                    row["rot_lag_max"] = max((w["rotation_lag_s"] for w in st["workers"]),
                                             default=0.0)
                    for p in st["pools"]:
                        if p["name"] == POOL:
                            row["hashing"] = p.get("hashing")
                            row["members"] = len(p["backends"])
                            row["usable"] = p["usable"]
            write("s " + json.dumps(row))
            time.sleep(max(0.0, t + st_every - time.monotonic()))

    threads = [threading.Thread(target=fn, daemon=True) for fn in (healthz, status)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(duration + 15)
    f.close()
    return 0


# --------------------------------------------------------------------------- the node


def write_pairlb(path: Path, args: argparse.Namespace, workdir: Path, mode: str, port: int,
                 admin_port: int, backends: Sequence[tuple[str, int]]) -> None:
    entries = ",\n".join(f'  {{ name = "{n}", address = "{HOST}:{p}" }}' for n, p in backends)
    hashing = f'hash_on = "header:{HEADER}"\n' if mode == "maglev" else ""
    health = ""
    if args.interval is not None:
        health += f"interval_s = {args.interval}\ntimeout_s = {min(0.5, args.interval)}\n"
    if args.rise is not None:
        health += f"rise = {args.rise}\n"
    alog = ""
    if args.access_log:
        logs = workdir / "access-logs"  # the workers write it (nobody, when run as root)
        logs.mkdir(exist_ok=True)
        logs.chmod(0o1777)
        alog = (f'access_log = "{logs / f"access-{mode}.log"}"\n'
                f'access_log_format = "{args.access_log}"\n')
    text = f"""# written by bench/maglev_scale.py
[node]
name = "maglev-scale"
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
balance = "{mode}"
{hashing}drain_timeout_s = {args.drain}
backends = [
{entries},
]

[pool.health]
path = "/healthz"
{health}
[admin]
bind = "{HOST}:{admin_port}"
token_file = "{workdir / 'admin.token'}"

[logging]
level = "info"
{alog}"""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Node:
    """One pairlb and the processes watching it."""

    def __init__(self, args: argparse.Namespace, workdir: Path, procs: c.ProcessSet,
                 mode: str, names: dict[str, str]) -> None:
        self.args, self.workdir, self.procs, self.mode = args, workdir, procs, mode
        self.names = names
        """nginx port -> backend name (X-Backend says the port)."""
        self.port, self.admin_port = c.free_ports(2)
        c.require_free([self.port, self.admin_port])
        self.conf = workdir / f"pairlb-{mode}.toml"
        self.log = workdir / f"pairlb-{mode}.log"
        self.tail = LogTail(self.log)
        self.admin = Admin(self.admin_port)
        self.load_out = workdir / f"load-{mode}.txt"
        self.scrape_out = workdir / f"scrape-{mode}.jsonl"
        self.probe_out = workdir / f"probe-{mode}.txt"
        self.proc: c.Managed | None = None
        self.pids: el.Pids | None = None
        self.watchers: list[c.Managed] = []
        self.windows: dict[str, dict[str, Any]] = {}
        """name -> t0, t1, log offsets, CPU snapshots (filled in at the end)."""

    # -- lifetime

    def start(self, backends: Sequence[tuple[str, int]]) -> dict[str, Any]:
        a = self.args
        write_pairlb(self.conf, a, self.workdir, self.mode, self.port, self.admin_port, backends)
        venv = REPO / ".venv" if (REPO / ".venv").is_dir() else Path(sys.prefix)
        wall0, t0 = time.time(), time.monotonic()
        self.proc = proc = self.procs.start(
            f"pairlb-{self.mode}", [str(venv / "bin" / "pairlb"), "run", "-c", str(self.conf)],
            self.log)
        out: dict[str, Any] = {}
        c.wait_http_ok(HOST, self.admin_port, "/healthz", a.wait, proc=proc)
        out["admin_s"] = round(time.monotonic() - t0, 2)
        n = len(backends)
        ready = up = None
        deadline = t0 + a.wait
        while time.monotonic() < deadline and (ready is None or up is None):
            if not proc.alive():
                raise RuntimeError(f"pairlb exited:\n{proc.log_tail()}")
            if ready is None and c.http_get_status(HOST, self.admin_port, "/readyz") == 200:
                ready = time.monotonic() - t0
            if up is None and self.admin.pool_metrics()["usable"] >= n:
                up = time.monotonic() - t0
            time.sleep(0.05)
        out["ready_s"] = None if ready is None else round(ready, 2)
        out["all_up_s"] = None if up is None else round(up, 2)
        if up is None:
            raise RuntimeError(f"pairlb-{self.mode}: {n} backends not all UP in {a.wait:g} s")
        st = self.admin.status()
        pool = next(p for p in st["pools"] if p["name"] == POOL)
        h = pool.get("hashing")
        if h is not None:
            out["first_table_s"] = (round(h["built_at"] - wall0, 2) if h.get("built_at")
                                    else None)
            out["build_ms_status"] = h.get("build_ms")
            out["table_size"] = h.get("size")
            out["digest"] = h.get("digest")
        logged = self.tail.since(0)
        out["builds"] = logged["builds"]
        out["build_ms_log"] = logged["build_ms"]
        out["to_down"] = logged["to_down"]
        self.pids = el.Pids(proc.pid, [w["pid"] for w in st["workers"]])
        proc.remember_tree()
        return out

    def watch(self) -> None:
        """The load, the scraper and the probes, for at most --budget s."""
        a, py, me = self.args, sys.executable, str(Path(__file__).resolve())
        b = f"{a.budget:g}"
        for name, argv, log in (
            ("load", [py, me, "_load", str(self.port), str(self.load_out), f"{a.rate:g}", b,
                      str(a.keys)], "load"),
            ("scraper", [py, me, "_scrape", str(self.admin_port), str(self.scrape_out),
                         f"{a.scrape_every:g}", b], "scrape"),
            ("probe", [py, me, "_probe", str(self.admin_port), str(self.probe_out), b,
                       f"{a.healthz_every:g}", f"{a.status_every:g}"], "probe"),
        ):
            self.watchers.append(self.procs.start(f"{name}-{self.mode}", argv,
                                                  self.workdir / f"{log}-{self.mode}.log"))

    def stop(self) -> list[int]:
        for m in self.watchers:
            self.procs.stop(m, timeout_s=5)
        pids = [p for m in self.watchers for p in m.known]
        self.admin.close()
        if self.proc is not None:
            self.proc.remember_tree()
            pids += list(self.proc.known)
            self.procs.stop(self.proc, timeout_s=10)
        return pids

    # -- windows

    def mark(self) -> dict[str, Any]:
        assert self.pids is not None
        skip = {self.pids.control, *self.pids.workers}
        others = {p: v for p, v in c.tree_cpu_by_pid(self.pids.control).items() if p not in skip}
        return {"t": time.monotonic(), "log": self.tail.offset(), "cpu": self.pids.snap(),
                "others": others}

    def window(self, name: str, begin: dict[str, Any], end: dict[str, Any]) -> None:
        self.windows[name] = {"begin": begin, "end": end}

    # -- changes

    def settle(self, want_members: int, want_usable: int, since: float) -> float | None:
        """Seconds after ``since`` until the pool has want_members members, want_usable
        usable backends and (maglev) a current table; None if not within --settle-wait."""
        assert self.proc is not None

        def ok() -> bool:
            m = self.admin.pool_metrics()
            return (m["members"] == want_members and m["usable"] >= want_usable
                    and (self.mode != "maglev" or m["current"] == 1))

        took = wait_until(ok, self.args.settle_wait, 0.05, self.proc)
        return None if took is None else round(time.monotonic() - since, 3)

    def burst(self, label: str, items: Sequence[tuple[str, int]], add: bool) -> dict[str, Any]:
        want = 201 if add else 202
        lat: list[float] = []
        statuses: Counter[int] = Counter()
        errors: list[str] = []
        t0 = time.monotonic()
        deadline = t0 + self.args.burst_budget
        done: list[tuple[str, int]] = []
        for name, p in items:
            if time.monotonic() > deadline:
                break
            try:
                if add:
                    status, raw, took = self.admin.api.call(
                        "POST", f"/pools/{POOL}/backends",
                        {"name": name, "address": f"{HOST}:{p}", "weight": 1})
                else:
                    status, raw, took = self.admin.api.call(
                        "DELETE", f"/pools/{POOL}/backends/{name}")
            except (OSError, http.client.HTTPException) as exc:
                status, raw, took = 0, repr(exc).encode(), math.nan
            statuses[status] += 1
            if not math.isnan(took):
                lat.append(took)
            if status == want:
                done.append((name, p))
            elif len(errors) < 5:
                errors.append(f"{name}: {status} {raw[:200]!r}")
        t1 = time.monotonic()
        return {"what": label, "count": len(items), "ok": statuses.get(want, 0),
                "truncated": len(done) + sum(v for k, v in statuses.items() if k != want)
                < len(items), "done": done,
                "statuses": {str(k): v for k, v in sorted(statuses.items())},
                "errors": errors, "total_s": round(t1 - t0, 3),
                "per_s": round(len(items) / (t1 - t0), 1) if t1 > t0 else None,
                "api": lat_ms(lat), "t0": t0, "t1": t1}

    def reload(self, backends: Sequence[tuple[str, int]]) -> dict[str, Any]:
        write_pairlb(self.conf, self.args, self.workdir, self.mode, self.port, self.admin_port,
                     backends)
        t0 = time.monotonic()
        status, raw, took = self.admin.api.call("POST", "/reload")
        ok = status == 200 and json.loads(raw).get("ok") is True
        return {"status": status, "ok": ok, "ms": round(took * 1e3, 1), "t0": t0,
                "t1": time.monotonic()}

    # -- affinity

    def sweep(self, keys: int) -> dict[str, Any]:
        """Every key once, on 4 keep-alive connections: key -> backend name."""
        conns: list[http.client.HTTPConnection | None] = [None] * 4
        got: dict[str, str] = {}
        failed: Counter[str] = Counter()
        lat: list[float] = []
        t0, log0 = time.monotonic(), self.tail.offset()
        for i in range(keys):
            key = f"u{i}"
            for attempt in range(2):
                conn = conns[i % 4] or http.client.HTTPConnection(HOST, self.port, timeout=5)
                conns[i % 4] = conn
                s0 = time.perf_counter()
                try:
                    conn.request("GET", "/", headers={HEADER: key})
                    r = conn.getresponse()
                    r.read()
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    conns[i % 4] = None
                    if attempt:
                        failed[exc.__class__.__name__] += 1
                    continue  # a stale keep-alive connection: once more, on a new one
                lat.append(time.perf_counter() - s0)
                if r.status == 200 and r.getheader("X-Backend"):
                    got[key] = self.names.get(r.getheader("X-Backend", ""), "?")
                else:
                    failed[f"http{r.status}"] += 1
                if r.will_close:
                    conn.close()
                    conns[i % 4] = None
                break
        for conn in conns:
            if conn is not None:
                conn.close()
        return {"t0": t0, "t1": time.monotonic(), "log0": log0, "log1": self.tail.offset(),
                "map": got, "failed": sum(failed.values()),
                "errors": dict(failed), "latency": lat_ms(lat)}


# --------------------------------------------------------------------------- analysis


def read_scrapes(path: Path) -> list[dict[str, Any]]:
    rows = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    return rows


def read_probes(path: Path) -> tuple[list[tuple[float, float, int]], list[dict[str, Any]]]:
    hz, st = [], []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            kind, _, rest = line.partition(" ")
            with contextlib.suppress(ValueError):
                if kind == "h":
                    t, took, code = rest.split()
                    hz.append((float(t), float(took), int(code)))
                elif kind == "s":
                    st.append(json.loads(rest))
    return hz, st


def lateness_between(scrapes: list[dict[str, Any]], t0: float, t1: float) -> dict[str, Any]:
    """The checks that started between the last good scrape before t0 and the first after
    t1 (the histogram's difference): p50/p99 in ms, and how many."""
    good = [s for s in scrapes if s.get("lat")]
    before = [s for s in good if s["t"] <= t0]
    after = [s for s in good if s["t"] + s.get("took", 0) >= t1]
    if not before or not after:
        return {"checks": None, "p50_ms": None, "p99_ms": None}
    a, b = before[-1]["lat"], after[0]["lat"]
    les = sorted(b, key=lambda x: math.inf if x == "+Inf" else float(x))
    bounds = [math.inf if x == "+Inf" else float(x) for x in les]
    counts = [b[x] - a.get(x, 0.0) for x in les]
    wall = after[0]["t"] + after[0].get("took", 0) - before[-1]["t"]
    q = {k: hist_quantile(bounds, counts, v) for k, v in (("p50", 0.5), ("p99", 0.99))}
    over = counts[-1] - (counts[bounds.index(0.1)] if 0.1 in bounds else 0)
    top = next((bounds[i] for i in range(len(counts) - 1, -1, -1)
                if counts[i] - (counts[i - 1] if i else 0) > 0), None)
    return {"checks": int(counts[-1]) if counts else 0,
            "checks_per_s": round(counts[-1] / wall, 1) if counts and wall > 0 else None,
            "p50_ms": None if q["p50"] is None else round(q["p50"] * 1e3, 1),
            "p99_ms": None if q["p99"] is None else round(q["p99"] * 1e3, 1),
            "over_100ms": int(over), "max_bucket_ms": None if top is None else (
                "inf" if math.isinf(top) else round(top * 1e3)),
            "from_t": before[-1]["t"], "to_t": after[0]["t"]}


def cpu_cores(a: el.Snap, b: el.Snap, oa: dict[int, float], ob: dict[int, float]
              ) -> dict[str, Any]:
    """CPU of the control process, of its other children (the table builder, if it runs in
    a process of its own) and of each worker, over a window."""
    wall = b[0] - a[0]
    wk = [b[2][p] - a[2][p] for p in a[2] if p in b[2]]
    other = sum(v - oa.get(p, 0.0) for p, v in ob.items())
    return {"wall_s": round(wall, 2), "control_cpu_s": round(b[1] - a[1], 3),
            "control_cores": round((b[1] - a[1]) / wall, 3) if wall > 0 else None,
            "other_children_cpu_s": round(other, 3),
            "other_children_cores": round(other / wall, 3) if wall > 0 else None,
            "worker_cpu_s": [round(x, 3) for x in wk],
            "worker_cores": round(statistics.mean(wk) / wall, 3) if wk and wall > 0 else None}


def load_window(records: list[Record], t0: float, t1: float) -> dict[str, Any]:
    rs = [r for r in records if t0 <= r.t0 <= t1]
    bad = [r for r in rs if not r.ok]
    took = [r.t1 - r.t0 for r in rs if r.ok]
    return {"requests": len(rs), "failed": len(bad),
            "errors": dict(Counter(r.error for r in bad).most_common(5)),
            **{k: v for k, v in lat_ms(took).items() if k != "n"}}


def summarize_window(node: Node, name: str, records: list[Record],
                     scrapes: list[dict[str, Any]], hz: list[tuple[float, float, int]],
                     st: list[dict[str, Any]]) -> dict[str, Any]:
    w = node.windows[name]
    b, e = w["begin"], w["end"]
    t0, t1 = b["t"], e["t"]
    sc = [s for s in scrapes if t0 <= s["t"] <= t1]
    hs = [x for x in hz if t0 <= x[0] <= t1]
    ss = [x for x in st if t0 <= x["t"] <= t1]
    # /status's maximum of the last 10 s, read during the window or just after it (so it
    # may include up to 10 s before the window: the histogram's p50/p99 are the window's own).
    lat_max = [x["lat_max_10s"] for x in st
               if t0 <= x["t"] <= t1 + 1.5 and x.get("lat_max_10s") is not None]
    rot_max = [x["rot_max_10s"] for x in st
               if t0 <= x["t"] <= t1 + 1.5 and x.get("rot_max_10s") is not None]
    return {
        "seconds": round(t1 - t0, 2),
        **node.tail.since(b["log"], e["log"]),
        "rotation": {"apply_max_ms": max(rot_max) if rot_max else None,
                     "lag_max_s": max((x.get("rot_lag_max", 0.0) for x in ss), default=None)},
        "lateness": {**lateness_between(scrapes, t0, t1),
                     "status_max_10s_ms": max(lat_max) if lat_max else None},
        "healthz": {**lat_ms([x[1] for x in hs if x[2] == 200]),
                    "failed": sum(1 for x in hs if x[2] != 200)},
        "status": {**lat_ms([x["took"] for x in ss if x["status"] == 200]),
                   "failed": sum(1 for x in ss if x["status"] != 200)},
        "scrape": {**lat_ms([s["took"] for s in sc if s["status"] == 200]),
                   "failed": sum(1 for s in sc if s["status"] != 200),
                   "max_bytes": max((s["size"] for s in sc), default=0)},
        "load": load_window(records, t0, t1),
        "cpu": cpu_cores(b["cpu"], e["cpu"], b["others"], e["others"]),
    }


def moved(a: dict[str, str], b: dict[str, str], new: set[str]) -> dict[str, Any]:
    keys = sorted(set(a) & set(b))
    mv = [k for k in keys if a[k] != b[k]]
    return {"keys": len(keys), "moved": len(mv),
            "moved_pct": round(100 * len(mv) / len(keys), 2) if keys else None,
            "to_new": sum(1 for k in mv if b[k] in new),
            "from_new": sum(1 for k in mv if a[k] in new),
            "between_old": sum(1 for k in mv if a[k] not in new and b[k] not in new)}


def stayed(records: list[Record], keys: int, names: dict[str, str], a: dict[str, str],
           b: dict[str, str], t0: float, t1: float) -> dict[str, Any]:
    """Keys with the same backend at both ends: requests between served elsewhere (must be
    none); and the keys that moved: how many were seen on a third backend on the way."""
    same = {k for k in set(a) & set(b) if a[k] == b[k]}
    wrong_req, wrong_keys, seen, third = 0, set(), 0, set()
    for r in records:
        if not (t0 <= r.t0 <= t1) or not r.ok:
            continue
        key = key_of(int(r.cid[1:]), keys)
        be = names.get(r.backend) or r.backend
        if key in same:
            seen += 1
            if be != a[key]:
                wrong_req += 1
                wrong_keys.add(key)
        elif key in a and key in b and be not in (a[key], b[key]):
            third.add(key)
    return {"stable_keys": len(same), "their_requests": seen, "served_elsewhere": wrong_req,
            "keys_served_elsewhere": len(wrong_keys), "moved_keys_via_third": len(third)}


# --------------------------------------------------------------------------- one node


def run_node(args: argparse.Namespace, workdir: Path, procs: c.ProcessSet, mode: str,
             base: list[tuple[str, int]], added: list[tuple[str, int]],
             extra: tuple[str, int], names: dict[str, str]) -> tuple[dict[str, Any], list[int]]:
    node = Node(args, workdir, procs, mode, names)
    out: dict[str, Any] = {"mode": mode}
    maglev = mode == "maglev"
    n, k = len(base), len(added)
    sweeps: dict[str, dict[str, Any]] = {}
    try:
        out["startup"] = node.start(base)
        print(f"[{mode}] up: {out['startup']}", flush=True)
        node.watch()
        time.sleep(2.0 if not args.quick else 0.5)  # the watchers' first rounds
        m0 = node.mark()
        time.sleep(args.idle)
        node.window("steady", m0, node.mark())
        if maglev:
            sweeps["before"] = node.sweep(args.keys)
        # adds
        m0 = node.mark()
        adds = node.burst("adds", added, True)
        have = adds.pop("done")
        adds["settled_s"] = node.settle(n + len(have), n + len(have), adds["t1"])
        time.sleep(args.tail)
        node.window("adds", m0, node.mark())
        out["adds"] = adds
        print(f"[{mode}] adds: {adds['ok']}/{k} in {adds['total_s']} s, api {adds['api']}, "
              f"settled {adds['settled_s']} s after the last", flush=True)
        if maglev:
            sweeps["after_adds"] = node.sweep(args.keys)
        # removes
        m0 = node.mark()
        removes = node.burst("removes", have, False)
        gone = len(removes.pop("done"))
        removes["settled_s"] = node.settle(n + len(have) - gone, n, removes["t1"])
        time.sleep(args.tail)
        node.window("removes", m0, node.mark())
        out["removes"] = removes
        print(f"[{mode}] removes: {removes['ok']}/{k} in {removes['total_s']} s, api "
              f"{removes['api']}, settled {removes['settled_s']} s after the last", flush=True)
        if maglev:
            sweeps["after_removes"] = node.sweep(args.keys)
        # reloads
        m0 = node.mark()
        same = node.reload(base)
        same["settled_s"] = node.settle(n, n, same["t1"])
        time.sleep(args.tail)
        node.window("reload_same", m0, node.mark())
        m0 = node.mark()
        plus = node.reload([*base, extra])
        plus["settled_s"] = node.settle(n + 1, n + 1, plus["t1"])
        time.sleep(args.tail)
        node.window("reload_plus1", m0, node.mark())
        out["reload_same"], out["reload_plus1"] = same, plus
        print(f"[{mode}] reloads: same file {same['ms']} ms, +1 {plus['ms']} ms", flush=True)
        if maglev:
            sweeps["after_plus1"] = node.sweep(args.keys)
        st = node.admin.status()
        ws = st["workers"]
        out["workers"] = {"restarts": sum(w["restarts"] for w in ws),
                          "crashes": sum(w["crashes"] for w in ws),
                          "hung_kills": sum(w["hung_kills"] for w in ws),
                          "same_pids": [w["pid"] for w in ws] == (node.pids.workers
                                                                  if node.pids else None)}
        pool = next(p for p in st["pools"] if p["name"] == POOL)
        out["hashing_end"] = pool.get("hashing")
        out["rotation_end"] = st["rotation"]
        out["api_connections"] = node.admin.api.connects
    finally:
        pids = node.stop()
    records = RecordLog(node.load_out).poll()
    scrapes = read_scrapes(node.scrape_out)
    hz, st_rows = read_probes(node.probe_out)
    out["windows"] = {name: summarize_window(node, name, records, scrapes, hz, st_rows)
                      for name in node.windows}
    out["builds_total"] = node.tail.since(0)["builds"]
    t_first = records[0].t0 if records else 0.0
    out["load"] = load_window(records, t_first, math.inf)
    good = [s for s in scrapes if s.get("status") == 200]
    out["scrape"] = {"scrapes": len(scrapes), "failed": len(scrapes) - len(good),
                     **lat_ms([s["took"] for s in good]),
                     "max_bytes": max((s["size"] for s in good), default=0)}
    if maglev and sweeps:
        new = {nm for nm, _ in added}
        aff: dict[str, Any] = {"sweeps": {
            name: {"t0": s["t0"], "t1": s["t1"], "keys": len(s["map"]), "failed": s["failed"],
                   "errors": s["errors"], "latency": s["latency"],
                   "backends": len(set(s["map"].values()))} for name, s in sweeps.items()}}
        order = [x for x in ("before", "after_adds", "after_removes", "after_plus1")
                 if x in sweeps]
        kk = out.get("adds", {}).get("ok", k)
        ideal = {"after_adds": kk / (n + kk), "after_removes": kk / (n + kk),
                 "after_plus1": 1 / (n + 1)}
        for prev, cur in itertools.pairwise(order):
            a, b = sweeps[prev]["map"], sweeps[cur]["map"]
            step = moved(a, b, new | {extra[0]})
            step["ideal_pct"] = round(100 * ideal[cur], 2)
            step.update(stayed(records, args.keys, names, a, b, sweeps[prev]["t1"],
                               sweeps[cur]["t0"]))
            step["to_down"] = node.tail.since(sweeps[prev]["log0"],
                                              sweeps[cur]["log1"])["to_down"]
            aff[f"{prev}->{cur}"] = step
        if "before" in sweeps and "after_removes" in sweeps:
            aff["before_vs_after_removes"] = moved(sweeps["before"]["map"],
                                                   sweeps["after_removes"]["map"], new)
        out["affinity"] = aff
    out["failed_requests"] = out["load"]["failed"] + sum(s["failed"] for s in sweeps.values())
    return out, pids


# --------------------------------------------------------------------------- output


def _f(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _l(d: dict[str, Any] | None) -> str:
    if not d or not d.get("n"):
        return "-"
    return f"{_f(d['p50_ms'])} / {_f(d['p99_ms'])} / {_f(d['max_ms'])}"


WINDOW_LABELS = {"steady": "steady", "adds": "burst of adds", "removes": "burst of removes",
                 "reload_same": "reload, same file", "reload_plus1": "reload, +1 backend"}


def tables(res: dict[str, Any], args: argparse.Namespace) -> str:
    md = args.markdown
    nodes = res.get("nodes", {})
    out = []
    rows = []
    for mode, nd in nodes.items():
        s = nd.get("startup") or {}
        rows.append([mode, _f(s.get("admin_s"), 2), _f(s.get("first_table_s"), 2),
                     _f(s.get("build_ms_status")),
                     ", ".join(f"{x:,.0f}" for x in s.get("build_ms_log", [])) or "-",
                     _f(s.get("ready_s"), 2), _f(s.get("all_up_s"), 2),
                     _f(s.get("table_size")), _f(s.get("to_down"))])
    out.append(el.render(["pool", "admin up s", "first table s", "build ms (/status)",
                          "build ms (log)", "/readyz s", "all UP s", "table size",
                          "transitions to DOWN"], rows, md))
    rows = []
    for mode, nd in nodes.items():
        for name, w in nd.get("windows", {}).items():
            lt, ld = w["lateness"], w["load"]
            rows.append([
                mode, WINDOW_LABELS.get(name, name), _f(w["seconds"]),
                f"{w['builds']}" + (f" ({', '.join(f'{x:,.0f}' for x in w['build_ms'])} ms)"
                                    if w["builds"] else ""),
                f"{_f(lt['p50_ms'])} / {_f(lt['p99_ms'])} / {_f(lt['status_max_10s_ms'])}",
                _f(lt.get("over_100ms")),
                f"{_f(w['rotation']['apply_max_ms'])} / {_f(w['rotation']['lag_max_s'], 3)}",
                _f(w["to_down"]),
                _l(w["healthz"]), _l(w["status"]),
                _l(w["scrape"]) + (f" ({w['scrape']['failed']} failed)"
                                   if w["scrape"]["failed"] else ""),
                f"{ld['requests']:,} / {ld['failed']:,}", f"{_f(ld['p50_ms'])} / "
                f"{_f(ld['p99_ms'])} / {_f(ld['max_ms'])}",
                f"{_f(w['cpu']['control_cores'], 2)} / "
                f"{_f(w['cpu']['other_children_cores'], 2)} / "
                f"{_f(w['cpu']['worker_cores'], 2)}"])
    out.append(el.render(["pool", "window", "s", "builds (ms)",
                          "check lateness p50 / p99 / max ms", "checks > 100 ms late",
                          "rotation applied, max ms / worker lag max s", "to DOWN",
                          "/healthz p50 / p99 / max ms",
                          "/status p50 / p99 / max ms", "/metrics p50 / p99 / max ms",
                          "requests / failed", "request p50 / p99 / max ms",
                          "CPU cores: control / builder process / each worker"], rows, md))
    rows = []
    for mode, nd in nodes.items():
        for key in ("adds", "removes"):
            b = nd.get(key)
            if b:
                rows.append([mode, f"{b['what']} ({b['ok']}/{b['count']}"
                             + (", out of time)" if b["truncated"] else ")"), _f(b["total_s"], 2),
                             _f(b["per_s"]), _l(b["api"]),
                             _f(nd["windows"][key]["builds"]), _f(b["settled_s"], 2)])
        for key, label in (("reload_same", "reload, same file"),
                           ("reload_plus1", "reload, +1 backend")):
            r = nd.get(key)
            if r:
                rows.append([mode, label + ("" if r["ok"] else f" (status {r['status']})"),
                             "-", "-", f"{r['ms']:,.1f} ms", _f(nd["windows"][key]["builds"]),
                             _f(r["settled_s"], 2)])
    out.append(el.render(["pool", "change", "total s", "per s", "API p50 / p99 / max ms",
                          "builds", "settled (table current, pool complete) s after"],
                         rows, md))
    aff = (nodes.get("maglev") or {}).get("affinity")
    if aff:
        rows = []
        for key, label in (("before->after_adds", f"+{args.burst} (runtime adds)"),
                           ("after_adds->after_removes", f"-{args.burst} (runtime removes)"),
                           ("after_removes->after_plus1", "+1 (reload)")):
            s = aff.get(key)
            if s:
                rows.append([label, f"{s['keys']:,}", f"{s['moved']:,} ({_f(s['moved_pct'], 2)} %)",
                             f"{_f(s['ideal_pct'], 2)} %", f"{s['to_new']:,}",
                             f"{s['from_new']:,}", f"{s['between_old']:,}",
                             f"{s['stable_keys']:,} ({s['their_requests']:,} requests)",
                             f"{s['served_elsewhere']:,}", f"{s['moved_keys_via_third']:,}",
                             f"{s['to_down']:,}"])
        out.append(el.render(["change", "keys", "moved", "ideal", "to an added backend",
                              "from an added backend", "between old backends",
                              "unmoved keys (their requests meanwhile)",
                              "of those served elsewhere", "moved keys seen on a third backend",
                              "transitions to DOWN (first sweep to last)"],
                             rows, md))
    notes = []
    for mode, nd in nodes.items():
        sc, w_ = nd.get("scrape", {}), nd.get("workers", {})
        notes.append(f"{mode}: builds {nd.get('builds_total')} in all; load "
                     f"{nd['load']['requests']:,} requests, {nd['load']['failed']} failed; "
                     f"sweeps and load failed {nd.get('failed_requests')}; /metrics scrapes "
                     f"{sc.get('scrapes')} ({sc.get('failed')} failed), up to "
                     f"{sc.get('max_bytes', 0) / 1e6:.2f} MB; workers: restarts "
                     f"{w_.get('restarts')}, crashes {w_.get('crashes')}, hung kills "
                     f"{w_.get('hung_kills')}, same PIDs {w_.get('same_pids')}")
        rot = nd.get("rotation_end")
        if rot:
            am = rot["apply_ms"]
            notes.append(f"{mode}: {rot['applied']:,} rotation pushes applied by the workers "
                         f"(one per worker and push), from push to applied p50 {am['p50']} ms, "
                         f"p99 {am['p99']} ms, worst of the last 60 s {am['max_60s']} ms")
    if aff and "before_vs_after_removes" in aff:
        bv = aff["before_vs_after_removes"]
        notes.append(f"maglev: keys on another backend after the adds and removes than before "
                     f"them: {bv['moved']} of {bv['keys']}")
    notes.append(f"foreign load {res.get('foreign_cores')} cores, load average "
                 f"{res.get('loadavg_start')} at the start, {res.get('loadavg_end')} at the end")
    out.append("\n".join(f"- {x}" for x in notes))
    return "\n\n".join(out)


# --------------------------------------------------------------------------- main


def loop_main(argv: list[str]) -> int:
    """``loop``: see the module docstring."""
    ap = argparse.ArgumentParser(prog="maglev_scale.py loop")
    ap.add_argument("--backends", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=1000.0, help="checks started per second")
    ap.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from lb import maglev  # in-process part only: the rest measures the installed pairlb
    from lb.control import hashing

    members = tuple(sorted((f"b{i}", 1) for i in range(args.backends)))
    size = maglev.table_size(args.backends)
    builder_cls = getattr(hashing, "Builder", None)

    async def checks(port: int, lat: list[float], ok: list[bool]) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        async def one(due: float) -> None:
            lat.append(loop.time() - due)
            try:
                async with asyncio.timeout(2.0):
                    r, w = await asyncio.open_connection(HOST, port)
                    w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    await r.read()
                    w.close()
                ok.append(True)
            except (OSError, TimeoutError):
                ok.append(False)

        tasks = []
        for i in itertools.count():
            due = t0 + i / args.rate
            if due - t0 >= args.seconds:
                break
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            tasks.append(asyncio.ensure_future(one(due)))
        await asyncio.gather(*tasks)

    async def measure(mode: str, port: int) -> dict[str, Any]:
        lat: list[float] = []
        ok: list[bool] = []
        took: list[float] = []
        stop = asyncio.Event()
        builder = builder_cls() if mode == "process" and builder_cls else None

        async def builds() -> None:
            while not stop.is_set():
                t = time.perf_counter()
                if builder is not None:
                    await builder.build(members, size)
                else:
                    await asyncio.to_thread(maglev.build, members, size)
                took.append(time.perf_counter() - t)

        bg = None if mode == "none" else asyncio.ensure_future(builds())
        if builder is not None:
            await asyncio.sleep(1.0)  # the helper started and building
        t = time.perf_counter()
        await checks(port, lat, ok)
        wall = time.perf_counter() - t
        stop.set()
        if bg is not None:
            await bg
        if builder is not None:
            await builder.aclose()
        return {"mode": mode, "checks_per_s": round(len(ok) / wall), "failed": ok.count(False),
                "late_ms": lat_ms(lat), "builds": len(took),
                "build_s": round(statistics.mean(took), 2) if took else None,
                "loadavg": el.loadavg()}

    modes = ["none", "thread"] + (["process"] if builder_cls else [])
    rows: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="maglev-loop-"))
    try:
        with c.sigterm_as_exit(), c.ProcessSet() as procs:
            port = c.free_ports(1)[0]
            c.require_free([port])
            conf = c.write_nginx_many(workdir, HOST, [port])
            ng = procs.start("nginx", c.nginx_argv(conf, workdir), workdir / "nginx.log")
            c.wait_http_ok(HOST, port, "/", 10.0, proc=ng)
            for _ in range(args.rounds):
                for mode in modes:
                    rows.append(asyncio.run(measure(mode, port)))
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    label = {"none": "no build", "thread": "builds in a thread (asyncio.to_thread)",
             "process": "builds in the helper process (hashing.Builder)"}
    print(el.render(["while", "checks/s (wanted)", "failed", "late p50 / p99 / max ms",
                     "builds", "build s (wall)", "load avg"],
                    [[label[r["mode"]], f"{r['checks_per_s']:,} ({args.rate:,.0f})",
                      f"{r['failed']:,}", _l(r["late_ms"]), str(r["builds"]),
                      _f(r["build_s"], 2), f"{r['loadavg']:.1f}"] for r in rows],
                    args.markdown))
    if args.json:
        args.json.write_text(json.dumps(rows) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sub = {"_load": load_main, "_scrape": scrape_main, "_probe": probe_main, "loop": loop_main}
    if argv[:1] and argv[0] in sub:
        return sub[argv[0]](argv[1:])
    args = parse_args(argv)
    if shutil.which("nginx") is None:
        print("nginx not found", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="maglev-scale-"))
    workdir.chmod(0o755)
    (workdir / "admin.token").write_text(TOKEN + "\n")
    (workdir / "admin.token").chmod(0o600)
    res: dict[str, Any] = {
        "args": {k: v for k, v in vars(args).items()
                 if isinstance(v, int | float | str | bool | list) or v is None},
        "commit": c.tool_version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "uncommitted_in_tree": el.uncommitted(),
        "pythonpath": os.environ.get("PYTHONPATH"),
        "cpu": c.cpu_model(), "cpus": os.cpu_count(), "loadavg_start": el.loadavg(),
        "nodes": {},
    }
    started: list[int] = []
    t_begin = time.monotonic()
    code = 0
    try:
        with c.sigterm_as_exit(), c.ProcessSet() as procs:
            n, k = args.backends, args.burst
            ports = c.free_ports(n + k + 1)
            c.require_free(ports)
            base = [(f"b{i}", p) for i, p in enumerate(ports[:n], 1)]
            added = [(f"e{i}", p) for i, p in enumerate(ports[n:n + k], 1)]
            extra = ("x1", ports[-1])
            names = {str(p): nm for nm, p in [*base, *added, extra]}
            nginx = procs.start("backends", c.nginx_argv(el.write_nginx(workdir, ports), workdir),
                                workdir / "backends.log")
            for p in (ports[0], ports[-1]):
                c.wait_http_ok(HOST, p, "/", 30.0, proc=nginx)
            started += nginx.remember_tree()
            res["foreign_at_start"] = round(c.wait_quiet([nginx.pid], 0.0 if args.quick else
                                                         10.0, 0.2), 2)
            fg = el.Foreign(procs).start()
            for mode in args.modes:
                out, pids = run_node(args, workdir, procs, mode, base, added, extra, names)
                res["nodes"][mode] = out
                started += pids
            res["foreign_cores"] = fg.cores()
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
    res["loadavg_end"] = el.loadavg()
    res["started_pids"] = sorted(set(started))
    res["elapsed_s"] = round(time.monotonic() - t_begin, 1)
    res["failed_requests"] = sum(nd.get("failed_requests", 0) for nd in res["nodes"].values())
    if code == 130:
        return code
    text = tables(res, args)
    print()
    print(text)
    print(f"\ncommit {res['commit']}, {res['elapsed_s']:.0f} s, N = {args.backends}, burst "
          f"{args.burst}, load {args.rate:g} req/s over {args.keys} keys, checks every "
          f"{args.interval or 1:g} s")
    line = json.dumps(res, default=str, allow_nan=True)
    out = args.json
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="maglev-scale-results-")) / "maglev-scale.json"
    out.write_text(line + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    print(f"results: {out} and {out.with_suffix('.md')}")
    return code


if __name__ == "__main__":
    sys.exit(main())
