"""Hostile and malformed requests: a clear status, Connection: close, nothing forwarded.

Each corpus item (tests/corpus/bad_requests/NNN-what.http) is sent to a proxy in front of a
counting backend that records every complete request it receives. The backend must see
none of them, the client must get NNN with Connection: close and a closed connection, and
the proxy must go on serving valid requests. The same holds when every item is split at
random byte boundaries across TCP writes, and for a seeded stream of mutated requests.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from proxy_helpers import (
    CountingBackend,
    RawClient,
    get,
    request,
    run,
    start_proxy,
    stop_proxy,
)

pytestmark = pytest.mark.timeout(120)

CORPUS = Path(__file__).parent / "corpus" / "bad_requests"
ITEMS = sorted(CORPUS.glob("*.http"))
DATA = {p: p.read_bytes() for p in ITEMS}
LISTENER = {"max_body_bytes": 1000}


def expected(path: Path) -> int:
    return int(path.name[:3])


async def send_split(c: RawClient, data: bytes, rng: random.Random | None) -> None:
    if rng is None:
        await c.send(data)
        return
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 5))))
    pos = 0
    for cut in [*cuts, len(data)]:
        try:
            await c.send(data[pos:cut])
        except ConnectionError:
            return  # the proxy already answered and closed: fine
        pos = cut
        await asyncio.sleep(0.002)


async def check_item(port: int, path: Path, rng: random.Random | None) -> None:
    data = DATA[path]
    c = await RawClient.connect(port)
    await send_split(c, data, rng)
    r = await c.response(timeout_s=5)
    assert r.status == expected(path), (path.name, r.status, r.body)
    assert r.header("connection") == "close", path.name
    assert await c.closed(3.0), f"{path.name}: connection left open"
    await c.close()


def test_corpus_is_there() -> None:
    assert len(ITEMS) >= 50
    assert {expected(p) for p in ITEMS} >= {400, 405, 413, 414, 417, 431, 501, 505}


@pytest.mark.parametrize("path", ITEMS, ids=[p.stem for p in ITEMS])
def test_bad_request_refused_and_never_forwarded(path: Path) -> None:
    async def scenario() -> None:
        be = await CountingBackend("web1").start()
        px = await start_proxy([("web1", be.address)], listener=LISTENER)
        # A pooled connection to the backend exists, so a forwarded head would arrive at once.
        assert (await request(px.port, get("/warm"))).status == 200
        await check_item(px.port, path, None)
        assert [s.target for s in be.requests] == ["/warm"], "backend saw the bad request"
        # The worker still serves.
        assert (await request(px.port, get("/after"))).status == 200
        bad = px.stats.snapshot()["bad_requests"]["l"]
        assert sum(n for by_status in bad.values() for n in by_status.values()) == 1
        assert px.in_flight == 0
        await stop_proxy(px)
        await be.stop()

    run(scenario())


def test_random_splits_give_the_same_answers() -> None:
    async def scenario() -> None:
        be = await CountingBackend("web1").start()
        px = await start_proxy([("web1", be.address)], listener=LISTENER)
        rng = random.Random(20260101)
        for _ in range(2):
            for path in ITEMS:
                await check_item(px.port, path, rng)
            # Valid requests split at random still work.
            for i in range(10):
                c = await RawClient.connect(px.port)
                await send_split(c, get(f"/ok{i}") + b"POST /p HTTP/1.1\r\nHost: h\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", rng)
                rs = await c.responses(2)
                assert [r.status for r in rs] == [200, 200]
                await c.close()
        assert all(s.target.startswith(("/ok", "/p")) for s in be.requests)
        assert len(be.requests) == 40
        assert px.in_flight == 0
        await stop_proxy(px)
        await be.stop()

    run(scenario())


def test_slowloris_gets_408_and_idle_connection_closes_quietly() -> None:
    async def scenario() -> None:
        be = await CountingBackend("web1").start()
        px = await start_proxy([("web1", be.address)],
                               listener={"client_header_timeout_s": 0.3})
        c = await RawClient.connect(px.port)
        for piece in (b"GET / HT", b"TP/1.1\r\n", b"Host: a\r\n", b"X-Slow: 1\r\n"):
            await c.send(piece)
            await asyncio.sleep(0.1)
        r = await c.response(timeout_s=3)
        assert r.status == 408 and r.header("connection") == "close"
        assert await c.closed()
        # Nothing sent at all: closed at the header timeout, without a 408.
        idle = await RawClient.connect(px.port)
        assert await idle.closed(3.0)
        assert idle.raw == b""
        assert be.requests == []
        bad = px.stats.snapshot()["bad_requests"]["l"]
        assert bad["header_timeout"] == {"408": 1}
        await stop_proxy(px)
        await be.stop()

    run(scenario())


def test_pipelined_garbage_after_a_valid_request() -> None:
    async def scenario() -> None:
        be = await CountingBackend("web1").start()
        px = await start_proxy([("web1", be.address)])
        c = await RawClient.connect(px.port)
        await c.send(get("/first") + b"GET /x HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n"
                     + get("/never"))
        rs = await c.responses(2)
        assert [r.status for r in rs] == [200, 400]
        assert rs[1].header("connection") == "close"
        assert await c.closed()
        assert [s.target for s in be.requests] == ["/first"]
        await stop_proxy(px)
        await be.stop()

    run(scenario())


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        i = rng.randrange(len(b)) if b else 0
        if op < 0.4 and b:
            b[i] = rng.randrange(256)
        elif op < 0.6:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op < 0.8 and b:
            del b[i : i + rng.randint(1, 8)]
        else:
            b[i:i] = rng.choice([b"\r\n", b"\n", b":", b" ", b"\x00", b"\r\n\r\n",
                                 b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n"])
    return bytes(b)


def test_fuzzed_streams_never_reach_a_backend_invalid_and_never_stop_the_worker() -> None:
    seeds = [get("/a"), b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
             b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"5\r\nhello\r\n0\r\n\r\n", get("/d") + get("/e")]

    async def scenario() -> None:
        be = await CountingBackend("web1").start()
        px = await start_proxy([("web1", be.address)],
                               listener={"client_header_timeout_s": 0.5,
                                         "client_idle_timeout_s": 0.5},
                               pool={"response_timeout_s": 2})
        rng = random.Random(8)

        async def one(i: int) -> None:
            data = _mutate(rng, rng.choice(seeds)) if i % 4 else bytes(
                rng.randrange(256) for _ in range(rng.randint(1, 300))
            )
            c = await RawClient.connect(px.port)
            try:
                await send_split(c, data, rng)
                await c.closed(1.5)
            finally:
                await c.close()

        for batch in range(10):
            await asyncio.gather(*(one(batch * 30 + i) for i in range(30)))
        # Whatever reached the backend was a valid request to its strict parser.
        assert be.parse_errors == []
        assert (await request(px.port, get("/alive"))).status == 200
        await asyncio.sleep(0.1)
        assert px.in_flight == 0
        await stop_proxy(px)
        await be.stop()

    run(scenario())
