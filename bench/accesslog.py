#!/usr/bin/env python3
"""What the access log costs a proxy worker, in-process: lb/data/accesslog.py alone.

Reported, for the ``json`` and ``combined`` formats:

- **write() us**: one ``AccessLog.write(rec)`` on the event loop (uvloop), the record built
  beforehand: what the hot path pays besides building its tuple (the line is formatted
  there, into the loop's buffer; the writer thread only writes, here to /dev/null);
- **tuple+write() us**: the same plus building the 22-field tuple from a request object's
  attributes, as the proxy will;
- **format us/line**, typical and hostile records: the formatter alone over a batch
  (``json_lines`` / ``combined_lines``), per line: the part of write() that grows with
  what clients send. Hostile: quotes, backslashes, control characters,
  invalid UTF-8 and a 4 KiB target in every record;
- **CPU us/req (on - off)**: process CPU (both threads, syscalls included) to log N records
  into a file through a real ``AccessLog``, minus the same loop without a log; the number to
  hold against a request's CPU in bench/perf.py (the issue's target: under 10 % more).
  Records are logged at ``--rate`` per second, a saturated worker's pace.

    .venv/bin/python bench/accesslog.py                 # ~30 s
    .venv/bin/python bench/accesslog.py --quick --markdown
    .venv/bin/python bench/accesslog.py --module /other/tree/lb/data/accesslog.py

Loads lb/data/accesslog.py from its file (``--module``; it imports nothing from lb), so the
same script measures another tree. Nothing leaves the process but a temporary file.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None  # type: ignore[assignment]

DEFAULT_MODULE = Path(__file__).resolve().parents[1] / "lb" / "data" / "accesslog.py"
FORMATS = ("json", "combined")


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("accesslog_bench", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses/typing look the module up by name
    spec.loader.exec_module(mod)
    return mod


class Req:
    """What a request object of the proxy holds when it ends (the tuple's sources)."""

    __slots__ = ("backend", "bytes_in", "bytes_out", "ip", "listener", "method", "pool",
                 "port", "proto", "referer", "retries", "rid", "status", "t0", "t_conn",
                 "t_end", "t_first", "t_pick", "target", "term", "ua")

    def __init__(self, i: int, hostile: bool = False) -> None:
        self.t0 = time.time()
        self.ip = f"203.0.113.{i % 250}"
        self.port = 40000 + i % 20000
        self.listener = "web"
        self.method = b"GET"
        self.target = b"/api/v1/items?id=%d&sort=asc" % i
        self.proto = "HTTP/1.1"
        self.status = 200
        self.bytes_in = 180
        self.bytes_out = 2350
        self.pool = "app"
        self.backend = f"app-{i % 8}"
        self.retries = 0
        self.t_pick, self.t_conn, self.t_first, self.t_end = 0.011, 0.0, 1.204, 1.532
        self.term = "--"
        self.rid = b"5f2a9c1e07b3-%08x" % i
        self.ua = (b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
                   b"Chrome/124.0.0.0 Safari/537.36")
        self.referer = b"https://www.example.com/catalog/page-2"
        if hostile:
            self.target = b'/q?x="\\\x01\x1b[2J\xff\xfe' + b"A%22" * 1024
            self.ua = b'Evil "agent" \\ \x00\r\n\xc3\x28 \xe2\x80\xa8 \xf0\x9f\x92\xa5'
            self.referer = b'\x7f"><script>\\u2028'
            self.rid = b"id with spaces \"and\" quotes"


def build(r: Req) -> tuple[Any, ...]:
    return (r.t0, r.ip, r.port, r.listener, "http", r.method, r.target, r.proto, r.status,
            r.bytes_in, r.bytes_out, r.pool, r.backend, r.retries, r.t_pick, r.t_conn,
            r.t_first, r.t_end, r.term, r.rid, r.ua, r.referer)


def best(fn: Callable[[], float], repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def new_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def bench_write(mod: ModuleType, fmt: str, n: int, repeat: int) -> tuple[float, float]:
    """(write() us, tuple+write() us) on the loop; no batch is handed over meanwhile."""
    reqs = [Req(i) for i in range(1000)]
    recs = [build(r) for r in reqs]

    async def main() -> tuple[float, float]:
        log = mod.AccessLog("/dev/null", fmt, flush_interval=3600)
        write = log.write
        rounds = max(1, n // len(recs))

        def empty() -> float:
            t = time.perf_counter()
            for _ in range(rounds):
                for _rec in recs:
                    pass
            return time.perf_counter() - t

        def writes() -> float:
            t = time.perf_counter()
            for _ in range(rounds):
                for rec in recs:
                    write(rec)
            return time.perf_counter() - t

        def builds() -> float:
            t = time.perf_counter()
            for _ in range(rounds):
                for r in reqs:
                    write((r.t0, r.ip, r.port, r.listener, "http", r.method, r.target,
                           r.proto, r.status, r.bytes_in, r.bytes_out, r.pool, r.backend,
                           r.retries, r.t_pick, r.t_conn, r.t_first, r.t_end, r.term, r.rid,
                           r.ua, r.referer))
            return time.perf_counter() - t

        base = best(empty, repeat)
        w = best(writes, repeat)
        b = best(builds, repeat)
        log.close()
        per = rounds * len(recs)
        return (w - base) / per * 1e6, (b - base) / per * 1e6

    loop = new_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def bench_format(mod: ModuleType, fmt: str, hostile: bool, n: int, repeat: int) -> float:
    batch = [build(Req(i, hostile)) for i in range(n)]
    f = mod.FORMATTERS[fmt]
    f(batch[:10])  # warm the name caches as a running writer has them

    def once() -> float:
        t = time.perf_counter()
        f(batch)
        return time.perf_counter() - t

    return best(once, repeat) / n * 1e6


def bench_cpu(
    mod: ModuleType, fmt: str, n: int, rate: float, rounds: int, tmp: Path
) -> float:
    """Process CPU per request, log on minus off (medians of ``rounds`` interleaved runs):
    the loop builds n records, 500 at a time at ``rate`` records/s (a busy worker), and logs
    them into a file; then the log is closed (its last batch is counted too)."""
    reqs = [Req(i) for i in range(500)]

    async def run(log_on: bool) -> float:
        path = tmp / f"access-{fmt}.log"
        path.unlink(missing_ok=True)
        log = mod.AccessLog(str(path), fmt) if log_on else None
        write = log.write if log is not None else (lambda rec: None)
        await asyncio.sleep(0.01)
        c0 = time.process_time()
        t0 = time.monotonic()
        done = 0
        while done < n:
            for r in reqs:
                write(build(r))
            done += len(reqs)
            await asyncio.sleep(max(0.0, t0 + done / rate - time.monotonic()))
        if log is not None:
            assert log.close(timeout=30)
            st = log.stats()
            assert st["written"] == done and st["dropped"] == 0, st
        c = time.process_time() - c0
        path.unlink(missing_ok=True)
        return c / done * 1e6

    loop = new_loop()
    offs: list[float] = []
    ons: list[float] = []
    try:
        for _ in range(rounds):
            offs.append(loop.run_until_complete(run(False)))
            ons.append(loop.run_until_complete(run(True)))
    finally:
        loop.close()
    return statistics.median(ons) - statistics.median(offs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts (a smoke run, ~1 s)")
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--rate", type=float, default=25_000,
                    help="records/s of the CPU run (default 25000: a saturated worker)")
    ap.add_argument("--module", type=Path, default=DEFAULT_MODULE,
                    help="the accesslog.py to measure (default: this tree's)")
    args = ap.parse_args(argv)
    mod = load(args.module)
    n_write, n_fmt, n_cpu, repeat, rounds = ((20_000, 1000, 2_500, 2, 1) if args.quick
                                             else (300_000, 5000, 50_000, 5, 3))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pairlb-accesslog-bench-") as tmp:
        for fmt in FORMATS:
            w, bw = bench_write(mod, fmt, n_write, repeat)
            rows.append({
                "format": fmt,
                "write_us": round(w, 3),
                "tuple_write_us": round(bw, 3),
                "format_typical_us": round(bench_format(mod, fmt, False, n_fmt, repeat), 3),
                "format_hostile_us": round(bench_format(mod, fmt, True, n_fmt // 4, repeat), 3),
                "cpu_per_req_us": round(
                    bench_cpu(mod, fmt, n_cpu, args.rate, rounds, Path(tmp)), 3),
            })
    meta = {"python": sys.version.split()[0], "loop": "uvloop" if uvloop else "asyncio",
            "module": str(args.module), "quick": args.quick, "rate": args.rate}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    cols = [("format", "format"), ("write_us", "write() us"),
            ("tuple_write_us", "tuple+write() us"), ("format_typical_us", "format us/line"),
            ("format_hostile_us", "hostile us/line"), ("cpu_per_req_us", "CPU us/req on-off")]
    if args.markdown:
        print(f"Python {meta['python']}, {meta['loop']}, CPU run at {args.rate:g} records/s"
              + (" (--quick)" if args.quick else ""))
        print()
        print("| " + " | ".join(h for _, h in cols) + " |")
        print("|" + "|".join("---" if k == "format" else "---:" for k, _ in cols) + "|")
        for r in rows:
            print("| " + " | ".join(str(r[k]) for k, _ in cols) + " |")
    else:
        print("  ".join(f"{h:>17}" for _, h in cols))
        for r in rows:
            print("  ".join(f"{r[k]!s:>17}" for k, _ in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
