"""Open-loop HTTP load for ``pairlb demo`` and bench/chaos.py, and what its records say.

``python -m lab.load HOST:PORT OUT [--rate R] [--duration S] ...`` (started inside the
client namespace, or on loopback) starts one request every 1/rate seconds whatever happened
to the earlier ones. Open loop on purpose: during an outage a closed-loop client stops
asking, and the outage would hide as "fewer requests" instead of showing as a gap.

Requests are deterministic by index: every ``post_every``-th is ``POST /echo`` (its body
must come back intact), the others ``GET /``; even indices reuse an idle keep-alive
connection (checked for a FIN first, as urllib3 does), odd ones open a fresh connection
(``Connection: close``). A GET that fails on a reused connection before any response byte
is retried once on a fresh one, as browsers do for a stale keep-alive connection; a POST is
never retried (the chaos suite checks that no POST is delivered twice). Each request carries
a unique ``X-Client-Id``.

One line per request in OUT, written when it ends (line-buffered, so a reader sees it at
once), times are CLOCK_MONOTONIC (one clock for every process on the host)::

    t0 t1 METHOD ID STATUS BACKEND PEER CONN RETRIED ERROR

STATUS is 0 when no response arrived; BACKEND is the response's X-Backend, PEER its X-Peer
(the address of the load balancer that carried it, added by the demo backends); CONN is
``new`` or ``reused``; ERROR is ``-`` or a short code (timeout, refused, reset, eof,
unreachable, garbled, corrupt, http503, ...).

Bounded: ``--duration`` and ``--max-requests``; SIGTERM/SIGINT stop it early. The analysis
half (``Record``, ``RecordLog``, ``window_stats``) is pure and is what the demo's summary and
the chaos invariants are computed from. Imports nothing from lb, healthcheck or failover.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import itertools
import os
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

FIELDS = 10
REUSE_POST_MAX_IDLE_S = 1.0
"""A POST reuses an idle connection only if it was idle less than this (a long-idle one is
the likeliest to be closed by the server just as we send, and a POST cannot be retried)."""


# -- records ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One client request as the client saw it."""

    t0: float
    t1: float
    method: str
    cid: str
    status: int
    backend: str
    peer: str
    conn: str
    retried: bool
    error: str

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300 and self.error == "-"

    def line(self) -> str:
        return (f"{self.t0:.6f} {self.t1:.6f} {self.method} {self.cid} {self.status} "
                f"{self.backend or '-'} {self.peer or '-'} {self.conn} {int(self.retried)} "
                f"{self.error or '-'}\n")

    @classmethod
    def parse(cls, line: str) -> Record | None:
        parts = line.split()
        if len(parts) != FIELDS:
            return None
        try:
            return cls(float(parts[0]), float(parts[1]), parts[2], parts[3], int(parts[4]),
                       parts[5], parts[6], parts[7], parts[8] == "1", parts[9])
        except ValueError:
            return None


class RecordLog:
    """Reads a load generator's output incrementally (a line still being written waits)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        self.records: list[Record] = []
        self._offset = 0

    def poll(self) -> list[Record]:
        """Records that appeared since the last call (also appended to ``records``)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        new = [r for line in chunk[:end].decode("ascii", "replace").splitlines()
               if (r := Record.parse(line)) is not None]
        self.records.extend(new)
        return new


@dataclass
class WindowStats:
    """What the client saw in one window of time (requests counted by completion time)."""

    since: float
    until: float
    requests: int = 0
    failed: int = 0
    failed_get: int = 0
    failed_post: int = 0
    retried: int = 0
    max_gap_s: float = 0.0
    """Longest time between two successive successful completions (the outage)."""
    gap_at: float = 0.0
    """Where that gap started."""
    errors: Counter[str] = field(default_factory=Counter)
    backends: Counter[str] = field(default_factory=Counter)
    peers: Counter[str] = field(default_factory=Counter)
    five_xx: int = 0

    def errors_text(self, limit: int = 3) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.errors.most_common(limit)) or "-"


IN_FLIGHT_S = 0.05
"""How long a healthy request takes at most, here (they take 1-5 ms)."""


def attributed_at(r: Record, slow_s: float = 0.2) -> float:
    """The moment a request belongs to: when a healthy system would have answered it.

    A request that was in flight when a fault hit belongs to the fault even if it started a
    moment before it (its answer was due after the fault) and even if it failed much later
    (a timeout only notices the loss). Slow GETs (ids ending in "s") were due ``slow_s``
    after they started.
    """
    due = r.t0 + IN_FLIGHT_S + (slow_s if r.cid.endswith("s") else 0.0)
    return min(r.t1, due)


def window_stats(records: Sequence[Record], since: float, until: float,
                 slow_s: float = 0.2) -> WindowStats:
    """Stats of the requests that belong to [since, until) (see ``attributed_at``).

    The outage is the longest time between two successive successful completions in the
    window, measured from the last success before ``since`` so an outage that starts with
    the fault is counted whole.
    """
    ws = WindowStats(since, until)
    last_ok: float | None = None
    last_end: float | None = None
    for r in sorted(records, key=lambda r: r.t1):
        if r.ok and r.t1 < since:
            last_ok = r.t1
        if not since <= r.t1 < until or not r.ok:
            continue
        ws.backends[r.backend] += 1
        ws.peers[r.peer] += 1
        if last_ok is not None and r.t1 - last_ok > ws.max_gap_s:
            ws.max_gap_s, ws.gap_at = r.t1 - last_ok, last_ok
        last_ok = r.t1
    last_ok = max((r.t1 for r in records if r.ok and since <= r.t1 < until), default=last_ok)
    for r in records:
        if not since <= attributed_at(r, slow_s) < until:
            continue
        ws.requests += 1
        ws.retried += r.retried
        if r.ok:
            continue
        last_end = max(last_end or r.t1, r.t1)
        ws.failed += 1
        ws.errors[r.error] += 1
        if 500 <= r.status < 600:
            ws.five_xx += 1
        if r.method == "POST":
            ws.failed_post += 1
        else:
            ws.failed_get += 1
    if last_ok is not None and last_end is not None:
        # Failures after the last success, up to the end of the window: a gap too.
        end = min(last_end, until)
        if end - last_ok > ws.max_gap_s:
            ws.max_gap_s, ws.gap_at = end - last_ok, last_ok
    return ws


def handovers(records: Iterable[Record], join_s: float = 0.5, prompt_s: float = 0.2
              ) -> list[tuple[float, float, int]]:
    """Stretches during which both load balancers answered the client.

    Which node the client's packets reach shows in the *prompt* successes on *new*
    connections (latency at most ``prompt_s``: a request whose SYN was retransmitted a
    second later says where packets went then, not when it started), ordered by when their
    SYN left. A request on an older connection, or on one whose SYN reached the old holder
    just before a move, is finished by that node (connection handover) and says nothing
    about where new packets go. A change of PEER is a handover; a clean one is a single
    change. Changes closer than ``join_s`` apart form one stretch; a stretch of two or more
    changes means both nodes were answering: returns (start, end, changes) of each, end -
    start being how long.
    """
    changes: list[float] = []
    prev: str | None = None
    prompt = (r for r in records
              if r.ok and r.peer != "-" and r.conn == "new" and r.t1 - r.t0 <= prompt_s)
    for r in sorted(prompt, key=lambda r: r.t0):
        if prev is not None and r.peer != prev:
            changes.append(r.t0)
        prev = r.peer
    out: list[tuple[float, float, int]] = []
    i = 0
    while i < len(changes):
        j = i
        while j + 1 < len(changes) and changes[j + 1] - changes[j] <= join_s:
            j += 1
        if j > i:
            out.append((changes[i], changes[j], j - i + 1))
        i = j + 1
    return out


# -- the client ------------------------------------------------------------------------------


class _Conn:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def usable(self) -> bool:
        return not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()


class _Failed(Exception):
    def __init__(self, code: str, got_bytes: bool = False) -> None:
        super().__init__(code)
        self.code = code
        self.got_bytes = got_bytes


def _os_code(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN):
        return "unreachable"
    return f"errno{exc.errno}" if exc.errno else "oserror"


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, server_closes); raises _Failed."""
    got = False
    try:
        line = await reader.readline()
        if not line:
            raise _Failed("eof")
        got = True
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise _Failed("garbled", True)
        status = int(parts[1])
        headers: dict[str, str] = {}
        while True:
            h = await reader.readline()
            if not h:
                raise _Failed("eof", True)
            if h in (b"\r\n", b"\n"):
                break
            k, _, v = h.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(chunks)
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        elif status in (204, 304):
            body = b""
        else:
            body = await reader.read()
            headers["connection"] = "close"
    except asyncio.IncompleteReadError:
        raise _Failed("eof", True) from None
    except OSError as exc:
        raise _Failed(_os_code(exc), got) from None
    except ValueError:
        raise _Failed("garbled", True) from None
    closes = headers.get("connection", "").lower() == "close" or parts[0] == b"HTTP/1.0"
    return status, headers, body, closes


class LoadClient:
    """The open-loop generator (see the module docstring)."""

    def __init__(self, host: str, port: int, out: TextIO, *, rate: float, duration_s: float,
                 max_requests: int, timeout_s: float, post_every: int, prefix: str,
                 slow_every: int = 0, slow_s: float = 0.2, max_idle: int = 16) -> None:
        self.host, self.port = host, port
        self.out = out
        self.rate = rate
        self.duration_s = duration_s
        self.max_requests = max_requests
        self.timeout_s = timeout_s
        self.post_every = post_every
        self.prefix = prefix
        self.slow_every = slow_every
        self.slow_s = slow_s
        self.max_idle = max_idle
        self.idle: deque[_Conn] = deque()
        self.stop = asyncio.Event()
        self.sent = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        pending: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        due = start
        for i in itertools.count():
            if self.stop.is_set() or i >= self.max_requests:
                break
            now = time.monotonic()
            if now - start >= self.duration_s:
                break
            task = asyncio.create_task(self._one(i))
            pending.add(task)
            task.add_done_callback(pending.discard)
            due += 1.0 / self.rate
            now = time.monotonic()
            if due < now - 0.1:
                due = now  # we stalled (a loaded box): keep the cadence from here, no burst
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), max(0.0, due - now))
        if pending:
            await asyncio.wait(pending, timeout=self.timeout_s + 1.0)
        for c in self.idle:
            c.close()
        return 0

    async def _one(self, i: int) -> None:
        post = self.post_every > 0 and i % self.post_every == self.post_every - 1
        method = "POST" if post else "GET"
        slow = not post and self.slow_every > 0 and i % self.slow_every == 0
        cid = f"{self.prefix}{i}" + ("s" if slow else "")
        reuse = i % 2 == 0
        t0 = time.monotonic()
        status, backend, peer, kind, retried, error = 0, "-", "-", "new", False, "-"
        try:
            async with asyncio.timeout(self.timeout_s):
                try:
                    status, backend, peer, kind = await self._attempt(method, cid, reuse)
                except _Failed as exc:
                    if exc.code.startswith("reused:") and not post:
                        retried = True
                        status, backend, peer, kind = await self._attempt(method, cid, False)
                    else:
                        raise
        except _Failed as exc:
            error = exc.code.removeprefix("reused:")
            kind = "reused" if exc.code.startswith("reused:") else kind
        except TimeoutError:
            error = "timeout"
        if error == "-" and not 200 <= status < 300:
            error = f"http{status}"
        rec = Record(t0, time.monotonic(), method, cid, status, backend, peer, kind, retried,
                     error)
        self.out.write(rec.line())

    def _take_idle(self, post: bool) -> _Conn | None:
        now = time.monotonic()
        while self.idle:
            c = self.idle.pop()
            if c.usable() and (not post or now - c.idle_since < REUSE_POST_MAX_IDLE_S):
                return c
            c.close()
        return None

    def extra_headers(self, cid: str) -> str:
        """More header lines (``Name: value\\r\\n``) for request ``cid``: none here."""
        return ""

    async def _attempt(self, method: str, cid: str, reuse: bool) -> tuple[int, str, str, str]:
        """One try; a slow GET (id ending in "s") asks the backend to wait before answering."""
        conn = self._take_idle(method == "POST") if reuse else None
        reused = conn is not None
        if conn is None:
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError as exc:
                raise _Failed(_os_code(exc)) from None
            conn = _Conn(reader, writer)
        body = f"payload of {cid}\n".encode() if method == "POST" else b""
        path = "/echo" if method == "POST" else (
            f"/sleep/{self.slow_s:g}" if cid.endswith("s") else "/")
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nX-Client-Id: {cid}\r\n"
                + self.extra_headers(cid) + ("" if reuse else "Connection: close\r\n")
                + (f"Content-Length: {len(body)}\r\n" if method == "POST" else "") + "\r\n")
        try:
            try:
                conn.writer.write(head.encode("latin-1") + body)
                await conn.writer.drain()
            except OSError as exc:
                raise _Failed(_os_code(exc)) from None
            status, headers, rbody, closes = await _read_response(conn.reader)
        except _Failed as exc:
            conn.close()
            if reused and not exc.got_bytes:
                raise _Failed("reused:" + exc.code) from None
            raise
        except BaseException:
            conn.close()
            raise
        if method == "POST" and 200 <= status < 300 and rbody != body:
            conn.close()
            raise _Failed("corrupt", True)
        if closes or not reuse or len(self.idle) >= self.max_idle:
            conn.close()
        else:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        return (status, headers.get("x-backend", "-"), headers.get("x-peer", "-"),
                "reused" if reused else "new")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lab.load")
    ap.add_argument("target", help="HOST:PORT")
    ap.add_argument("out", help="record file (appended)")
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds (bound)")
    ap.add_argument("--max-requests", type=int, default=100_000, help="bound")
    ap.add_argument("--timeout", type=float, default=2.0, help="per request, seconds")
    ap.add_argument("--post-every", type=int, default=4, help="every Nth request is a POST")
    ap.add_argument("--prefix", default="r", help="prefix of the X-Client-Id values")
    ap.add_argument("--slow-every", type=int, default=0,
                    help="every Nth request is a slow GET (/sleep/S; its id ends in 's')")
    ap.add_argument("--slow", type=float, default=0.2, help="S for the slow GETs, seconds")
    args = ap.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    if args.rate <= 0 or not port.isdigit():
        ap.error("need HOST:PORT and a positive --rate")
    with open(args.out, "a", buffering=1, encoding="ascii") as out:
        client = LoadClient(host, int(port), out, rate=args.rate, duration_s=args.duration,
                            max_requests=args.max_requests, timeout_s=args.timeout,
                            post_every=args.post_every, prefix=args.prefix,
                            slow_every=args.slow_every, slow_s=args.slow)
        return asyncio.run(client.run())


if __name__ == "__main__":
    sys.exit(main())
