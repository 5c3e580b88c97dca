"""A large Content-Length response body bypasses the response parser (PASS_BODY_MIN).

The proxy relays such a body as the reads bring it and starts a new parser for the next
response: these tests check the bytes (exact, across the threshold, split at every kind of
boundary), the keep-alive reuse after it, and the backend errors around it (bytes past the
end, a close mid-body), on both event loops the workers can run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from proxy_helpers import RawClient, get, start_proxy, stop_proxy, wait_for

import lb
from lb.data import proxy as P

MIN = P.PASS_BODY_MIN
SIZES = [MIN - 1, MIN, MIN + 1, 200_000, 3 << 20]


def run_on(loop_kind: str, coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    if loop_kind == "uvloop":
        return uvloop.run(main())
    return asyncio.run(main())


LOOPS = pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])


def body_of(n: int) -> bytes:
    return (hashlib.sha256(str(n).encode()).digest() * (n // 32 + 1))[:n]


async def sized(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """GET/HEAD /size/N: a body of N bytes (body_of)."""
    while True:
        head = await r.readuntil(b"\r\n\r\n")
        method, target = head.split(b" ", 2)[:2]
        n = int(target.rsplit(b"/", 1)[1])
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
        if method != b"HEAD":
            w.write(body_of(n))
        await w.drain()


@LOOPS
def test_bodies_across_the_threshold_are_exact_and_the_connection_is_reused(
        loop_kind: str) -> None:
    async def scenario() -> None:
        async with proxied(sized) as (px, c, conns):
            for n in [*SIZES, 100, *reversed(SIZES)]:
                await c.send(get(f"/size/{n}"))
                r = await c.response(timeout_s=10)
                assert r.status == 200 and len(r.body) == n, n
                assert r.body == body_of(n), n
                assert r.header("content-length") == str(n)
            assert len(conns) == 1  # one backend connection served them all
            # HEAD of a large body: its head only (the client's parser is not told: by hand)
            h = await RawClient.connect(px.port)
            await h.send(b"HEAD /size/%d HTTP/1.1\r\nHost: x\r\n\r\n" % (1 << 20))
            raw = await asyncio.wait_for(h.reader.readuntil(b"\r\n\r\n"), 5)
            assert b"Content-Length: 1048576\r\n" in raw
            await h.send(get("/size/70000"))
            r = await h.response(timeout_s=10)
            assert r.status == 200 and r.body == body_of(70000)
            await h.close()
            assert len(conns) == 1
            await wait_for(lambda: px.in_flight == 0)

    run_on(loop_kind, scenario())


async def raw_backend(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.AbstractServer, int, list[int]]:
    """A backend written byte by byte by ``handler``; also counts its connections."""
    conns: list[int] = []

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns.append(1)
        with contextlib.suppress(ConnectionError):
            await handler(r, w)
        w.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], conns


@contextlib.asynccontextmanager
async def proxied(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[tuple[Any, RawClient, list[int]]]:
    """The proxy in front of a raw backend, and a client connection to it: (proxy, client,
    the backend's connections)."""
    srv, port, conns = await raw_backend(handler)
    px = await start_proxy([("a", f"127.0.0.1:{port}")])
    c = await RawClient.connect(px.port)
    try:
        yield px, c, conns
    finally:
        await c.close()
        await stop_proxy(px)
        srv.close()


async def read_head(r: asyncio.StreamReader) -> bytes:
    return await r.readuntil(b"\r\n\r\n")


@LOOPS
@pytest.mark.parametrize("split", ["head_alone", "with_head", "bytewise_tail"])
def test_a_body_in_pieces_arrives_whole(loop_kind: str, split: str) -> None:
    n = 100_000
    body = body_of(n)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_head(r)
            head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n
            if split == "head_alone":
                w.write(head)
                await w.drain()
                await asyncio.sleep(0.01)
                pieces = [body[:5000], body[5000:60000], body[60000:]]
            elif split == "with_head":
                pieces = [head + body[:70000], body[70000:]]
            else:
                pieces = [head + body[:-5], *(body[i:i + 1] for i in range(n - 5, n))]
            for p in pieces:
                w.write(p)
                await w.drain()
                await asyncio.sleep(0.002)

    async def scenario() -> None:
        async with proxied(handler) as (_px, c, conns):
            for _ in range(3):
                await c.send(get("/"))
                r = await c.response(timeout_s=10)
                assert r.status == 200 and r.body == body
            assert len(conns) == 1

    run_on(loop_kind, scenario())


@LOOPS
def test_bytes_past_the_body_are_dropped_and_the_connection_not_reused(loop_kind: str) -> None:
    n = 50_000
    body = body_of(n)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_head(r)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n + body[:30000])
            await w.drain()
            await asyncio.sleep(0.005)
            w.write(body[30000:] + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\njunk!")
            await w.drain()

    async def scenario() -> None:
        async with proxied(handler) as (_px, c, conns):
            for i in range(2):
                await c.send(get("/"))
                r = await c.response(timeout_s=10)
                assert r.status == 200 and r.body == body, i
                await wait_for(lambda i=i: len(conns) == i + 1)
            assert b"junk!" not in bytes(c.raw)
            assert len(conns) == 2  # each response's connection was dropped, not reused

    run_on(loop_kind, scenario())


@LOOPS
def test_a_backend_closing_mid_body_cuts_the_client_and_counts_an_error(
        loop_kind: str) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + os.urandom(40000))
        await w.drain()
        await asyncio.sleep(0.02)
        w.transport.abort()

    async def scenario() -> None:
        async with proxied(handler) as (px, c, _):
            await c.send(get("/"))
            got = await c.responses(1, timeout_s=5)
            assert got == []  # never a complete (wrong) response
            assert await c.closed()
            assert 40000 <= len(c.raw) < 100000 + 200
            await wait_for(lambda: px.in_flight == 0)
            assert any(k[2].startswith("backend_") for k in px.stats._errors), px.stats._errors

    run_on(loop_kind, scenario())


def test_the_large_body_takes_the_parser_free_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path above is the one taken (pure path only: compiled code calls the method
    directly; tests/test_compiled.py runs this file pure)."""
    if lb.compiled_in_use():
        pytest.skip("compiled: a patched method is not called (run pure)")
    calls: list[int] = []
    orig = P._Upstream.pass_body

    def spy(self: Any, data: Any, client: Any) -> None:
        calls.append(len(data))
        orig(self, data, client)

    monkeypatch.setattr(P._Upstream, "pass_body", spy)

    async def scenario() -> None:
        async with proxied(sized) as (_px, c, _):
            for n in (MIN - 1, MIN):
                await c.send(get(f"/size/{n}"))
                assert (await c.response()).body == body_of(n)

    run_on("asyncio", scenario())
    assert sum(calls) == MIN  # the body under the threshold went through the parser


@LOOPS
@pytest.mark.parametrize("status", [304, 204])
@pytest.mark.parametrize("clen", [MIN - 1, MIN + 4000])
def test_a_bodiless_status_with_a_large_content_length_ends_at_its_head(
        loop_kind: str, status: int, clen: int) -> None:
    """RFC 9110 8.6: a 304 may carry the Content-Length of the representation (and a 204
    must not have a body): the exchange ends at the head, whatever the length says, and
    the next request on the connection is answered (found by an outside review: the
    parser-free path waited for a body that never came)."""
    reason = b"Not Modified" if status == 304 else b"No Content"

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = True
        while True:
            await read_head(r)
            if first:
                w.write(b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nETag: \"x\"\r\n\r\n"
                        % (status, reason, clen))
                first = False
            else:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            await w.drain()

    async def scenario() -> None:
        async with proxied(handler) as (px, c, conns):
            await c.send(b"GET / HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"x\"\r\n\r\n")
            raw = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
            assert raw.startswith(b"HTTP/1.1 %d" % status)
            await c.send(get("/next"))
            got = await asyncio.wait_for(c.reader.readuntil(b"hello"), 3)
            assert got.startswith(b"HTTP/1.1 200")
            await wait_for(lambda: px.in_flight == 0)
            assert len(conns) == 1

    run_on(loop_kind, scenario())


@LOOPS
def test_an_interim_response_and_a_large_body_in_one_read(loop_kind: str) -> None:
    n = 40_000
    body = body_of(n)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_head(r)
            w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n + body)
            await w.drain()

    async def scenario() -> None:
        async with proxied(handler) as (_px, c, conns):
            for _ in range(2):
                await c.send(get("/"))
                r = await c.response(timeout_s=5)
                while r.status < 200:
                    r = await c.response(timeout_s=5)
                assert r.status == 200 and r.body == body
            assert len(conns) == 1

    run_on(loop_kind, scenario())
