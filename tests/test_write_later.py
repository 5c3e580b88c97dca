"""Large output is written once the loop's ready events have run (WRITE_LATER_BYTES).

In memory (a loop whose ready callbacks the test runs): what waits and what goes at once,
and that a close or abort in between neither loses, doubles nor miscounts a byte. On real
sockets, both event loops: many clients at once get large bodies around the threshold
exact, with keep-alive reuse and a closing response. In a subprocess: the worker's malloc
settings keep a turn's freed bodies for the next (no page faults per turn).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from typing import Any

import pytest
import uvloop
from proxy_helpers import (
    FakeLoop,
    FakeTransport,
    RawClient,
    fake_proxy_server,
    get,
    start_proxy,
    stop_proxy,
)

from lb.data import proxy as P

BIG = P.WRITE_LATER_BYTES + 1



def client(srv: P.ProxyServer) -> tuple[Any, FakeTransport]:
    c = P._Client(srv)
    t = FakeTransport(c)
    c.connection_made(t)
    return c, t


def run_ready(loop: FakeLoop) -> int:
    n = 0
    while loop.ready:
        cb, args = loop.ready.popleft()
        cb(*args)
        n += 1
    return n


def test_large_output_waits_for_the_ready_events_small_output_does_not() -> None:
    srv, loop = fake_proxy_server()
    (a, ta), (b, tb), (s, ts) = client(srv), client(srv), client(srv)
    a.send(b"a" * BIG)
    srv.flush()
    b.send(b"b" * 100)
    b.send_view(memoryview(b"B" * BIG))  # pieces add up: 100 + BIG is large
    s.send(b"s" * P.WRITE_LATER_BYTES)  # at the threshold: at once
    srv.flush()
    assert bytes(ta.out) == b"" and bytes(tb.out) == b""
    assert bytes(ts.out) == b"s" * P.WRITE_LATER_BYTES
    assert len(loop.ready) == 1  # one callback for the whole turn
    a.send(b"A" * 10)  # more for a waiting connection joins its queue, in order
    srv.flush()
    assert run_ready(loop) == 1
    assert bytes(ta.out) == b"a" * BIG + b"A" * 10
    assert bytes(tb.out) == b"b" * 100 + b"B" * BIG
    assert a.nsent == BIG + 10 and b.nsent == BIG + 100
    assert a.nout == 0 and b.nout == 0 and srv.later == []
    # the next turn schedules again
    a.send(b"x" * BIG)
    srv.flush()
    assert bytes(ta.out).endswith(b"A" * 10) and run_ready(loop) == 1
    assert bytes(ta.out).endswith(b"x" * BIG)


def test_a_close_before_the_write_sends_it_once_an_abort_throws_it_away() -> None:
    srv, loop = fake_proxy_server()
    (a, ta), (b, tb) = client(srv), client(srv)
    a.send(b"a" * BIG)
    b.send(b"b" * BIG)
    srv.flush()
    a.close()  # graceful: what was sent goes first, then the close
    b.abort()
    assert bytes(ta.out) == b"a" * BIG and ta.closed
    assert bytes(tb.out) == b"" and tb.closed
    assert b.nsent == 0  # the access log's bytes out: nothing was sent
    assert run_ready(loop) == 1
    assert bytes(ta.out) == b"a" * BIG  # not twice
    assert bytes(tb.out) == b""


def body_of(n: int) -> bytes:
    return (hashlib.sha256(str(n).encode()).digest() * (n // 32 + 1))[:n]


SIZES = [P.WRITE_LATER_BYTES - 300, P.WRITE_LATER_BYTES + 1, 300_000]


async def sized(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """GET /size/N: a body of N bytes."""
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            n = int(head.split(b" ", 2)[1].rsplit(b"/", 1)[1])
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n + body_of(n))
            await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    w.close()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_many_clients_at_once_get_large_bodies_exact(loop_kind: str) -> None:
    async def scenario() -> None:
        srv = await asyncio.start_server(sized, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        px = await start_proxy([("a", f"127.0.0.1:{port}")])
        try:
            async def one(i: int) -> None:
                c = await RawClient.connect(px.port)
                try:
                    for n in SIZES[i % 3:] + SIZES[: i % 3]:
                        await c.send(get(f"/size/{n}"))
                        r = await c.response(timeout_s=20)
                        assert r.status == 200 and r.body == body_of(n), (i, n)
                    # the client asks to close: the last large answer, then the close
                    await c.send(b"GET /size/%d HTTP/1.1\r\nHost: x\r\nConnection: close"
                                 b"\r\n\r\n" % BIG)
                    r = await c.response(timeout_s=20)
                    assert r.body == body_of(BIG) and r.header("connection") == "close"
                    assert await c.closed()  # then the proxy closes
                finally:
                    await c.close()

            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(40))), 60)
            srv_ = px.server
            assert isinstance(srv_, P.ProxyServer)
            assert srv_.later == [] and srv_.dirty == []
        finally:
            await stop_proxy(px)
            srv.close()

    if loop_kind == "uvloop":
        uvloop.run(scenario())
    else:
        asyncio.run(scenario())


FAULTS = """
import resource, sys
from lb import sysutil
if sys.argv[1] == "tuned" and not sysutil.tune_malloc():
    print("untunable"); sys.exit(0)
def turn():  # a turn of the loop: 20 responses of 64 KiB held, then freed together
    held = [b"%d" % i + bytes(65793) for i in range(20)]
    del held
for _ in range(20):
    turn()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    turn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def faults(mode: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                          check=True, cwd=root, timeout=60).stdout.strip()


def test_the_worker_malloc_settings_keep_a_turns_memory_for_the_next() -> None:
    tuned = faults("tuned")
    if tuned == "untunable":
        pytest.skip("no glibc mallopt here")
    plain = int(faults("plain"))
    # glibc's defaults give the freed 1.3 MB back after each turn and fault it in again
    assert int(tuned) < 50 and plain > 2000, (tuned, plain)
