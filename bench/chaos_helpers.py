#!/usr/bin/env python3
"""Helper programs of bench/chaos.py, each started inside a namespace of the chaos network.

``scrape OUT --port P [--paths /metrics,/status] [--concurrency N] [--every S]
--duration S --max N``: N threads, each with one keep-alive connection (reopened after an
error, as Prometheus does), GET the paths in turn with Prometheus's Accept header and
``Accept-Encoding: gzip``; with ``--every`` each thread waits that long between requests
(a scrape interval), without it they go back to back (a scrape storm). One line per request
in OUT, written when it ends: ``t0 t1 PATH STATUS BYTES ERROR`` (CLOCK_MONOTONIC, one clock
for every process on the host; STATUS 0 and ERROR a short code when no answer came).

``farm HOST FIRST COUNT``: one asyncio process listening on COUNT ports from FIRST, every
request answered ``200 ok`` and the connection closed (cheap backends for a huge reload).

Bounded: ``--duration`` and ``--max`` (scrape); SIGTERM/SIGINT stop either. Imports only the
standard library (starts in tens of milliseconds, and can be read on its own).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


# -- scrape ----------------------------------------------------------------------------------


class Scrapes:
    """The shared budget and output of the scraper threads."""

    def __init__(self, out: TextIO, max_requests: int, end: float) -> None:
        self.out = out
        self.left = max_requests
        self.end = end
        self.stop = threading.Event()
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.left <= 0 or self.stop.is_set() or time.monotonic() >= self.end:
                return False
            self.left -= 1
            return True

    def record(self, t0: float, path: str, status: int, size: int, error: str) -> None:
        line = f"{t0:.6f} {time.monotonic():.6f} {path} {status} {size} {error}\n"
        with self.lock:
            self.out.write(line)


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "eof"
    if isinstance(exc, http.client.HTTPException):
        return "http"
    return type(exc).__name__.lower()


def scraper(s: Scrapes, host: str, port: int, paths: Sequence[str], every_s: float,
            timeout_s: float, offset: int) -> None:
    conn: http.client.HTTPConnection | None = None
    i = offset
    headers = {"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip",
               "User-Agent": "pairlb-chaos-scraper"}
    while s.take():
        path = paths[i % len(paths)]
        i += 1
        t0 = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            s.record(t0, path, resp.status, len(body), "-")
            if resp.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            s.record(t0, path, 0, 0, _error_code(exc))
            if conn is not None:
                conn.close()
            conn = None
        if every_s > 0:
            s.stop.wait(max(0.0, t0 + every_s - time.monotonic()))
    if conn is not None:
        conn.close()


def scrape_main(args: argparse.Namespace) -> int:
    paths = [p for p in args.paths.split(",") if p]
    with open(args.out, "a", buffering=1, encoding="ascii") as out:
        s = Scrapes(out, args.max, time.monotonic() + args.duration)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: s.stop.set())
        threads = [threading.Thread(target=scraper, daemon=True, args=(
            s, args.host, args.port, paths, args.every, args.timeout, n))
            for n in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    return 0


# -- farm ------------------------------------------------------------------------------------


class _Answer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                 b"Connection: close\r\n\r\nok")
            self.transport.close()


async def _farm(host: str, first: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = [await loop.create_server(_Answer, host, first + i, backlog=64)
               for i in range(count)]
    print(f"farm: listening on {host}:{first}-{first + count - 1}", flush=True)
    await stop.wait()
    for srv in servers:
        srv.close()


def farm_main(args: argparse.Namespace) -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_farm(args.host, args.first, args.count))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sc = sub.add_parser("scrape")
    sc.add_argument("out")
    sc.add_argument("--host", default="127.0.0.1")
    sc.add_argument("--port", type=int, required=True)
    sc.add_argument("--paths", default="/metrics")
    sc.add_argument("--concurrency", type=int, default=1)
    sc.add_argument("--every", type=float, default=0.0)
    sc.add_argument("--duration", type=float, required=True)
    sc.add_argument("--max", type=int, required=True)
    sc.add_argument("--timeout", type=float, default=10.0)
    fa = sub.add_parser("farm")
    fa.add_argument("host")
    fa.add_argument("first", type=int)
    fa.add_argument("count", type=int)
    args = ap.parse_args(argv)
    return scrape_main(args) if args.cmd == "scrape" else farm_main(args)


if __name__ == "__main__":
    sys.exit(main())
