"""Large output written at the end of the turn (WRITE_LATER_BYTES), attacked by an outside
review; the suite keeps its tests.

Flow control: while a connection's output waits in ``later``, nothing reaches its transport,
so pause_writing cannot fire; libuv's uv__read loops up to 32 reads of uvloop's 256,000-byte
buffer per readable event as long as each read fills it. Output past WRITE_NOW_BYTES is
therefore written with its event. These tests bound what the proxy holds in user space for
one stalled or slow peer (the first version of the change held 4-8 MB on uvloop).

Correctness on real sockets, both loops: pipelined answers, close-delimited, re-chunked,
upgrade after a large answer, large uploads, TLS both ways, the access log's bytes_out,
and the latency of a large answer on an idle proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop
from proxy_helpers import (
    FakeTransport,
    RawClient,
    fake_proxy_server,
    get,
    start_proxy,
    stop_proxy,
)

import lb
from lb.data import proxy as P
from lb.data.accesslog import AccessLog

pytestmark = pytest.mark.timeout(120)

LOOPS = pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
WLB = P.WRITE_LATER_BYTES
BOUND = 1 << 20
"""What one stalled peer may make the proxy hold (before the change: ~0.2-0.3 MiB)."""


def run_on(loop_kind: str, coro: Any) -> Any:
    async def main() -> Any:
        return await coro

    if loop_kind == "uvloop":
        return uvloop.run(main())
    return asyncio.run(main())


def body_of(n: int) -> bytes:
    return (hashlib.sha256(str(n).encode()).digest() * (n // 32 + 1))[:n]


def mode() -> str:
    return f"compiled={lb.compiled_in_use()}"


# -- flow control ---------------------------------------------------------------------------


BIG_DOWNLOAD = 20 << 20


async def fast_big_backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG_DOWNLOAD)
        chunk = b"x" * (1 << 20)
        for _ in range(BIG_DOWNLOAD >> 20):
            w.write(chunk)
            await w.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    w.close()


@LOOPS
def test_review_stalled_download_is_bounded(loop_kind: str) -> None:
    """A client that asks for a 20 MB body and reads nothing: the proxy must pause the
    backend with little held (before the change: 242 KB on uvloop)."""

    async def scenario() -> None:
        srv = await asyncio.start_server(fast_big_backend, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        px = await start_proxy([("a", f"127.0.0.1:{port}")])
        s = px.server
        assert isinstance(s, P.ProxyServer)
        c = socket.create_connection(("127.0.0.1", px.port))
        try:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            peak = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.0:
                await asyncio.sleep(0.002)
                for cl in list(s.clients):
                    if cl.transport is not None:
                        peak = max(peak, cl.transport.get_write_buffer_size())
            cl = next(iter(s.clients))
            up = cl.queue[0].upstream
            assert cl.wpaused and up is not None and up.rpaused
            print(f"{mode()} {loop_kind}: client transport buffer peak {peak} bytes")
            assert peak <= BOUND, f"{loop_kind} {mode()}: {peak} bytes held for one client"
        finally:
            c.close()
            await stop_proxy(px)
            srv.close()

    run_on(loop_kind, scenario())


class _SlowReader(asyncio.Protocol):
    """A backend that reads one piece every 50 ms and never answers."""

    got = 0

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        _SlowReader.got += len(data)
        self.t.pause_reading()
        asyncio.get_running_loop().call_later(0.05, self._resume)

    def _resume(self) -> None:
        if not self.t.is_closing():
            self.t.resume_reading()


UPLOADER = """
import socket, sys
c = socket.socket()
c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
c.connect(("127.0.0.1", int(sys.argv[1])))
c.sendall(b"POST /u HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: %d\\r\\n\\r\\n" % (64 << 20))
c.sendall(b"y" * (64 << 20))
"""


@LOOPS
def test_review_upload_to_a_slow_backend_is_bounded(loop_kind: str) -> None:
    """A fast client uploading to a backend that reads slowly: the proxy must pause the
    client with little held (before the change: ~0.3 MB on uvloop)."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(_SlowReader, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        px = await start_proxy([("a", f"127.0.0.1:{port}")])
        s = px.server
        assert isinstance(s, P.ProxyServer)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", UPLOADER,
                                                    str(px.port))
        try:
            peak = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 4.0:
                await asyncio.sleep(0.002)
                for u in list(s.upstreams):
                    if u.transport is not None:
                        peak = max(peak, u.transport.get_write_buffer_size())
            print(f"{mode()} {loop_kind}: upstream transport buffer peak {peak} bytes "
                  f"(backend read {_SlowReader.got})")
            assert peak <= BOUND, f"{loop_kind} {mode()}: {peak} bytes held for one upload"
        finally:
            proc.kill()
            await proc.wait()
            await stop_proxy(px)
            srv.close()

    run_on(loop_kind, scenario())


# -- correctness on real sockets --------------------------------------------------------------


async def multi(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """GET /size/N (Content-Length), /chunked/N, /close10/N (no length, close),
    /upgrade (101, then echo), POST /echo (the body's sha256 and length)."""
    try:
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0]
            method, target = line.split(b" ")[:2]
            parts = target.split(b"/")
            if target.startswith(b"/size/"):
                n = int(parts[2])
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
                if method != b"HEAD":
                    w.write(body_of(n))
            elif target.startswith(b"/chunked/"):
                n = int(parts[2])
                body = body_of(n)
                w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                for i in range(0, n, 70_000):
                    piece = body[i:i + 70_000]
                    w.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                w.write(b"0\r\n\r\n")
            elif target.startswith(b"/close10/"):
                n = int(parts[2])
                w.write(b"HTTP/1.0 200 OK\r\n\r\n" + body_of(n))
                await w.drain()
                w.close()
                return
            elif target == b"/upgrade":
                w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n"
                        b"Connection: Upgrade\r\n\r\n")
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    w.write(data)
                    await w.drain()
                w.close()
                return
            elif target == b"/echo":
                if b"transfer-encoding: chunked" in head.lower():
                    pieces = []
                    while True:
                        size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
                        if size == 0:
                            await r.readuntil(b"\r\n")  # no trailers
                            break
                        pieces.append(await r.readexactly(size))
                        await r.readexactly(2)
                    body = b"".join(pieces)
                else:
                    cl = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    body = await r.readexactly(cl)
                digest = hashlib.sha256(body).hexdigest().encode()
                out = digest + b" %d" % len(body)
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(out) + out)
            else:
                w.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    w.close()


@contextlib.asynccontextmanager
async def proxied_multi(**kw: Any) -> Any:
    conns: list[int] = []

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(1)
        await multi(r, w)

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    px = await start_proxy([("a", f"127.0.0.1:{port}")], **kw)
    try:
        yield px, conns
    finally:
        await stop_proxy(px)
        srv.close()


@LOOPS
def test_review_pipelined_large_and_small_answers_in_order(loop_kind: str) -> None:
    sizes = [300_000, 10, 70_000, WLB + 1, 0, 1 << 20, 5]

    async def scenario() -> None:
        async with proxied_multi() as (px, _):
            c = await RawClient.connect(px.port)
            try:
                reqs = b"".join(get(f"/size/{n}") for n in sizes)
                reqs += get("/chunked/500000") + get("/nope")
                reqs += b"HEAD /size/400000 HTTP/1.1\r\nHost: x\r\n\r\n" + get("/size/77777")
                await c.send(reqs)
                got = await c.responses(len(sizes) + 2, timeout_s=20)
                assert [len(r.body) for r in got[:len(sizes)]] == sizes
                for r, n in zip(got, sizes, strict=False):
                    assert r.body == body_of(n)
                assert got[len(sizes)].body == body_of(500_000)
                assert got[len(sizes) + 1].status == 404
                raw = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 10)
                assert b"Content-Length: 400000" in raw  # the HEAD answer: head only
                c.parser = type(c.parser)(c.col)
                c.col.parser = c.parser
                r = await c.response(timeout_s=10)
                assert r.body == body_of(77777)
            finally:
                await c.close()
            srv = px.server
            assert isinstance(srv, P.ProxyServer)
            assert getattr(srv, "later", []) == [] and srv.dirty == []

    run_on(loop_kind, scenario())


@LOOPS
@pytest.mark.parametrize("n", [WLB + 1, 3 << 20])
def test_review_close_delimited_and_http10_large_bodies(loop_kind: str, n: int) -> None:
    async def scenario() -> None:
        async with proxied_multi() as (px, _):
            for req in (get(f"/close10/{n}"),
                        f"GET /size/{n} HTTP/1.0\r\nHost: x\r\n\r\n".encode(),
                        f"GET /chunked/{n} HTTP/1.0\r\nHost: x\r\n\r\n".encode()):
                r, w = await asyncio.open_connection("127.0.0.1", px.port)
                w.write(req)
                data = await asyncio.wait_for(r.read(), 20)  # until the proxy closes
                w.close()
                head, _, body = data.partition(b"\r\n\r\n")
                assert body == body_of(n), (req, len(body), head)

    run_on(loop_kind, scenario())


@LOOPS
def test_review_upgrade_right_after_a_large_answer(loop_kind: str) -> None:
    async def scenario() -> None:
        async with proxied_multi() as (px, _):
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            try:
                w.write(get("/size/400000") + b"GET /upgrade HTTP/1.1\r\nHost: x\r\n"
                        b"Upgrade: echo\r\nConnection: Upgrade\r\n\r\n" + b"ping-1;")
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200")
                body = await asyncio.wait_for(r.readexactly(400000), 10)
                assert body == body_of(400000)
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 101"), head
                assert await asyncio.wait_for(r.readexactly(7), 5) == b"ping-1;"
                big = body_of(500_000)
                w.write(big)
                assert await asyncio.wait_for(r.readexactly(len(big)), 10) == big
            finally:
                w.close()

    run_on(loop_kind, scenario())


@LOOPS
def test_review_large_uploads_arrive_exact_and_reuse_the_connection(loop_kind: str) -> None:
    async def scenario() -> None:
        async with proxied_multi() as (px, conns):
            c = await RawClient.connect(px.port)
            try:
                for n in (70_000, 1 << 20, 100, 5 << 20):
                    body = body_of(n)
                    await c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                                 % n + body)
                    r = await c.response(timeout_s=20)
                    assert r.body == hashlib.sha256(body).hexdigest().encode() + b" %d" % n
                # chunked upload, re-framed by the proxy
                body = body_of(300_000)
                chunks = b"".join(b"%x\r\n%b\r\n" % (len(body[i:i + 90_000]),
                                                     body[i:i + 90_000])
                                  for i in range(0, len(body), 90_000))
                await c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                             b"\r\n\r\n" + chunks + b"0\r\n\r\n")
                r = await c.response(timeout_s=20)
                assert r.body == hashlib.sha256(body).hexdigest().encode() + b" 300000"
            finally:
                await c.close()
            assert len(conns) == 1  # one backend connection, reused for every upload

    run_on(loop_kind, scenario())


@LOOPS
def test_review_large_answer_latency_on_an_idle_proxy(loop_kind: str) -> None:
    """A large answer must not wait for a timer or the next event once the turn is over."""

    async def scenario() -> None:
        async with proxied_multi(pool={"response_timeout_s": 30},
                                 listener={"client_idle_timeout_s": 30}) as (px, _):
            c = await RawClient.connect(px.port)
            worst = 0.0
            try:
                for i in range(60):
                    n = 100_000 + i
                    t0 = time.monotonic()
                    await c.send(get(f"/size/{n}"))
                    r = await c.response(timeout_s=10)
                    worst = max(worst, time.monotonic() - t0)
                    assert r.body == body_of(n)
            finally:
                await c.close()
            print(f"{mode()} {loop_kind}: worst latency {worst * 1000:.1f} ms")
            assert worst < 0.25

    run_on(loop_kind, scenario())


@LOOPS
def test_review_access_log_bytes_out_of_large_answers(loop_kind: str, tmp_path: Path) -> None:
    sizes = [300_000, 10, WLB + 1]

    async def scenario() -> None:
        async with proxied_multi() as (px, _):
            path = tmp_path / "access.log"
            alog = AccessLog(str(path), flush_interval=0.01)
            px.server.alog = alog
            c = await RawClient.connect(px.port)
            try:
                await c.send(b"".join(get(f"/size/{n}") for n in sizes))
                got = await c.responses(len(sizes), timeout_s=20)
                await c.send(b"GET /size/200000 HTTP/1.1\r\nHost: x\r\nConnection: close"
                             b"\r\n\r\n")
                got += [await c.response(timeout_s=20)]
                assert await c.closed()
            finally:
                await c.close()
            assert await alog.aclose(5.0)
            lines = [json.loads(x) for x in path.read_bytes().splitlines()]
            assert len(lines) == 4
            wire = bytes(c.raw)
            # each answer's bytes on the wire: split the raw stream at the heads
            total = sum(d["bytes_out"] for d in lines)
            assert total == len(wire), (total, len(wire), [d["bytes_out"] for d in lines])
            for d, n in zip(lines, [*sizes, 200_000], strict=True):
                assert n < d["bytes_out"] < n + 400, (d["bytes_out"], n)

    run_on(loop_kind, scenario())


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tls_helpers import Pki
    return Pki(tmp_path_factory.mktemp("pki"))


@LOOPS
def test_review_tls_both_ways_large_bodies_exact(loop_kind: str, pki: Any) -> None:
    from test_proxy_tls import backend_ctx, client_ctx, start_tls_proxy

    leaf = pki.leaf("site", ["site.test"], ["127.0.0.1"])
    bctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    bctx.load_cert_chain(leaf.cert, leaf.key)

    async def scenario() -> None:
        srv = await asyncio.start_server(multi, "127.0.0.1", 0, ssl=bctx)
        port = srv.sockets[0].getsockname()[1]
        px = await start_tls_proxy([("a", f"127.0.0.1:{port}")], leaf,
                                   pool={"tls": {"server_name": "site.test"}},
                                   backend_tls=backend_ctx(pki))
        try:
            r, w = await asyncio.open_connection("127.0.0.1", px.port, ssl=client_ctx(pki),
                                                 server_hostname="site.test")
            c = RawClient(r, w)
            try:
                sizes = [300_000, 10, 2 << 20, WLB + 1]
                await c.send(b"".join(get(f"/size/{n}") for n in sizes))
                got = await c.responses(len(sizes), timeout_s=20)
                assert [r.body for r in got] == [body_of(n) for n in sizes]
                body = body_of(3 << 20)
                await c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                             % len(body) + body)
                r1 = await c.response(timeout_s=20)
                assert r1.body == hashlib.sha256(body).hexdigest().encode() + b" %d" % len(body)
            finally:
                await c.close()
        finally:
            await stop_proxy(px)
            srv.close()

    run_on(loop_kind, scenario())


@LOOPS
def test_review_tls_listener_stalled_download_is_bounded(loop_kind: str, pki: Any) -> None:
    from test_proxy_tls import client_ctx, start_tls_proxy

    leaf = pki.leaf("site", ["site.test"], ["127.0.0.1"])

    async def scenario() -> None:
        srv = await asyncio.start_server(fast_big_backend, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        px = await start_tls_proxy([("a", f"127.0.0.1:{port}")], leaf)
        s = px.server
        assert isinstance(s, P.ProxyServer)
        raw = socket.create_connection(("127.0.0.1", px.port))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        c = client_ctx(pki).wrap_socket(raw, server_hostname="site.test",
                                        do_handshake_on_connect=False)
        c.setblocking(False)
        try:
            while True:  # the handshake, without blocking the proxy's loop
                try:
                    c.do_handshake()
                    break
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    await asyncio.sleep(0.005)
            c.send(b"GET / HTTP/1.1\r\nHost: site.test\r\n\r\n")
            peak = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 2.5:
                await asyncio.sleep(0.002)
                for cl in list(s.clients):
                    if cl.transport is not None:
                        peak = max(peak, cl.transport.get_write_buffer_size())
            print(f"{mode()} {loop_kind} TLS: client transport buffer peak {peak} bytes")
            assert peak <= BOUND, f"{loop_kind} {mode()} TLS: {peak} bytes held for one client"
        finally:
            c.close()
            await stop_proxy(px)
            srv.close()

    run_on(loop_kind, scenario())


# -- _write_later and an exception ------------------------------------------------------------


class _Raising(FakeTransport):
    def write(self, data: bytes) -> None:
        raise RuntimeError("transport gone")


def test_review_an_exception_in_write_later_strands_no_other_connection() -> None:
    """One flush_out that raises (no transport is known to) ends that connection only: the
    others in ``later`` are written, and what is sent to them afterwards too."""
    srv, loop = fake_proxy_server()
    a = P._Client(srv)
    ta = _Raising(a)
    a.connection_made(ta)
    b = P._Client(srv)
    tb = FakeTransport(b)
    b.connection_made(tb)
    big = b"z" * (WLB + 1)
    a.send(big)
    b.send(big)
    srv.flush()
    cb, args = loop.ready.popleft()
    cb(*args)  # logged (event=proxy_write_failed), not raised into the loop
    assert ta.closed and a.closed and bytes(tb.out) == big
    b.send(b"small, later")
    srv.flush()
    while loop.ready:
        cb, args = loop.ready.popleft()
        cb(*args)
    assert bytes(tb.out) == big + b"small, later", (len(tb.out), b.out is not None)


# -- the suite's own backpressure tests, on uvloop (they run on asyncio only) ---------------


def test_review_slow_client_stream_test_on_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/test_proxy_stream.py's slow-client bound (< 2 MiB held), run on the loop the
    workers use (the suite runs it on asyncio only). Its slow-backend twin cannot run on
    uvloop as is: CountingBackend asserts an asyncio.Transport (BrokenPipe on both commits)."""
    import test_proxy_stream as S

    monkeypatch.setattr(S, "run", lambda coro: uvloop.run(coro))
    S.test_slow_client_bounds_proxy_buffer_and_stalls_backend()


# -- drain and close with output waiting in ``later`` ---------------------------------------



def test_review_drain_and_stop_with_output_in_later() -> None:
    srv, loop = fake_proxy_server()
    a = P._Client(srv)
    ta = FakeTransport(a)
    a.connection_made(ta)
    b = P._Client(srv)
    tb = FakeTransport(b)
    b.connection_made(tb)
    big = b"q" * (WLB + 1)
    a.send(big)
    b.send(big)
    srv.flush()
    assert srv.later == [a, b] and not ta.out
    b.queue.append(object())  # b: a request still being answered (not idle)
    srv.begin_drain()  # a keep-alive idle client: closed gracefully, its answer first
    assert bytes(ta.out) == big and ta.closed
    assert not tb.closed and not tb.out
    b.queue.clear()
    srv.close()  # the hard stop: b is cut, its queued bytes thrown away and not counted
    assert tb.closed and not tb.out and b.nsent == 0
    while loop.ready:
        cb, args = loop.ready.popleft()
        cb(*args)  # _write_later after the stop: nothing more, nothing twice
    assert bytes(ta.out) == big and not tb.out and srv.later == []


@LOOPS
def test_review_drain_while_a_large_answer_is_read_slowly(loop_kind: str) -> None:
    async def scenario() -> None:
        async with proxied_multi() as (px, _):
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.transport.pause_reading()
            w.write(get("/size/3000000"))
            await asyncio.sleep(0.3)
            drain = asyncio.ensure_future(px.server.drain(10.0))
            await asyncio.sleep(0.1)
            w.transport.resume_reading()
            data = await asyncio.wait_for(r.read(), 10)
            head, _, body = data.partition(b"\r\n\r\n")
            assert body == body_of(3000000), (len(body), head)
            assert await asyncio.wait_for(drain, 10) == 0
            w.close()

    run_on(loop_kind, scenario())
