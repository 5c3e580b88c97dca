"""The HTTP proxy engine against real backends on 127.0.0.1: what a client and a backend see."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from proxy_helpers import (
    CountingBackend,
    RawClient,
    Seen,
    aiohttp_backend,
    free_port,
    get,
    ok_behaviour,
    proxy_in_front_of,
    request,
    run,
    start_proxy,
    stop_proxy,
    wait_for,
)

from lb.data.pool import BackendEntry, build_pool
from lb.data.proxy import ProxyServer

pytestmark = pytest.mark.timeout(60)


async def backends(*names: str, behaviour: Any = ok_behaviour) -> list[CountingBackend]:
    return [await CountingBackend(n, behaviour).start() for n in names]


async def stop_all(bes: list[CountingBackend]) -> None:
    for b in bes:
        await b.stop()


# -- basics ----------------------------------------------------------------------------------


def test_get_reaches_backend_with_forwarding_headers_and_no_hop_by_hop() -> None:
    async def scenario() -> None:
        (be,) = await backends("web1")
        async with proxy_in_front_of([be]) as px:
            r = await request(px.port, b"GET /a?b=1 HTTP/1.1\r\nHost: site.test\r\n"
                              b"Connection: keep-alive, X-Private\r\nX-Private: 1\r\n"
                              b"Keep-Alive: timeout=5\r\nX-Forwarded-For: 6.6.6.6\r\n"
                              b"Proxy-Connection: x\r\n\r\n")
            assert r.status == 200
            assert r.body == b"web1 GET /a?b=1\n"
            seen = be.requests[0]
            assert seen.target == "/a?b=1"
            assert seen.header("host") == "site.test"
            assert seen.header("x-forwarded-for") == "127.0.0.1"
            assert seen.header("x-forwarded-proto") == "http"
            assert seen.header("forwarded") == "for=127.0.0.1;proto=http"
            assert seen.header("via") == "1.1 pairlb"
            assert seen.header("x-request-id")
            for hop in ("connection", "x-private", "keep-alive", "proxy-connection"):
                assert seen.header(hop) is None, hop
        await stop_all([be])

    run(scenario())


def test_trusted_proxy_keeps_client_forwarding_headers() -> None:
    async def scenario() -> None:
        (be,) = await backends("web1")
        async with proxy_in_front_of([be], listener={"trusted_proxies": ["127.0.0.0/8"]}) as px:
            await request(px.port, b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n"
                          b"X-Request-ID: abc\r\n\r\n")
            seen = be.requests[0]
            assert seen.header("x-forwarded-for") == "6.6.6.6, 127.0.0.1"
            assert seen.header("x-request-id") == "abc"
        await stop_all([be])

    run(scenario())


def test_weighted_round_robin_proportions() -> None:
    async def scenario() -> None:
        bes = await backends("w1", "w2", "w3")
        px = await start_proxy([("w1", bes[0].address, 1), ("w2", bes[1].address, 2),
                                ("w3", bes[2].address, 1)])
        c = await RawClient.connect(px.port)
        for i in range(40):
            await c.send(get(f"/{i}"))
            assert (await c.response()).status == 200
        assert [len(b.requests) for b in bes] == [10, 20, 10]
        # Keep-alive on both sides: 40 requests over one connection per backend.
        assert [b.connections for b in bes] == [1, 1, 1]
        await c.close()
        await stop_proxy(px)
        await stop_all(bes)

    run(scenario())


def test_http10_closes_unless_keep_alive_asked() -> None:
    async def scenario() -> None:
        (be,) = await backends("web1")
        async with proxy_in_front_of([be]) as px:
            c = await RawClient.connect(px.port)
            await c.send(b"GET / HTTP/1.0\r\n\r\n")
            r = await c.response()
            assert r.status == 200 and r.header("connection") == "close"
            assert await c.closed()
            c = await RawClient.connect(px.port)
            for _ in range(3):
                await c.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                r = await c.response()
                assert r.status == 200 and r.header("connection") == "keep-alive"
            await c.close()
            assert be.requests[0].header("via") == "1.0 pairlb"
        await stop_all([be])

    run(scenario())


def test_connection_close_from_client_is_honoured() -> None:
    async def scenario() -> None:
        (be,) = await backends("web1")
        async with proxy_in_front_of([be]) as px:
            c = await RawClient.connect(px.port)
            await c.send(get(extra="Connection: close\r\n"))
            r = await c.response()
            assert r.header("connection") == "close"
            assert await c.closed()
        await stop_all([be])

    run(scenario())


def test_pipelined_requests_answered_in_order() -> None:
    def slow_first(seen: Seen, be: CountingBackend) -> Any:
        data = ok_behaviour(seen, be)
        return ("delay", 0.2, data) if seen.target == "/0" else data

    async def scenario() -> None:
        bes = await backends("a", "b", behaviour=slow_first)
        async with proxy_in_front_of(bes) as px:
            c = await RawClient.connect(px.port)
            body = b"hello"
            batch = b"".join(get(f"/{i}") for i in range(5))
            batch += b"POST /5 HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n" + body
            batch += get("/6")
            await c.send(batch)
            rs = await c.responses(7)
            assert [r.body.split()[-1] for r in rs] == [f"/{i}".encode() for i in range(7)]
            assert all(r.status == 200 for r in rs)
            await c.close()
        await stop_all(bes)

    run(scenario())


def test_head_204_304_have_no_body_and_connection_stays_usable() -> None:
    def beh(seen: Seen, be: CountingBackend) -> Any:
        if seen.target == "/204":
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        if seen.target == "/304":
            return b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n"
        if seen.target == "/hc":
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        return ok_behaviour(seen, be)

    async def scenario() -> None:
        (be,) = await backends("web1", behaviour=beh)
        async with proxy_in_front_of([be]) as px:
            c = await RawClient.connect(px.port)
            await c.send(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n")
            # The client's parser must be told this was HEAD: read the head by hand.
            raw = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
            assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"Content-Length: 13\r\n" in raw
            await c.send(b"HEAD /hc HTTP/1.1\r\nHost: a\r\n\r\n")
            raw = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
            assert b"Transfer-Encoding: chunked\r\n" in raw
            for path in ("/204", "/304", "/after"):
                await c.send(get(path))
                r = await c.response()
                assert r.body == (b"" if path != "/after" else b"web1 GET /after\n")
            await c.close()
            assert be.connections == 1  # HEAD did not poison the pooled connection
        await stop_all([be])

    run(scenario())


def test_absolute_form_target_uses_its_authority_as_host() -> None:
    async def scenario() -> None:
        (be,) = await backends("web1")
        async with proxy_in_front_of([be]) as px:
            r = await request(px.port, b"GET http://real.test:8080/x?y HTTP/1.1\r\n"
                              b"Host: other.test\r\n\r\n")
            assert r.status == 200
            assert be.requests[0].target == "/x?y"
            assert be.requests[0].header("host") == "real.test:8080"
        await stop_all([be])

    run(scenario())


# -- bodies ----------------------------------------------------------------------------------


def echo_app() -> web.Application:
    app = web.Application(client_max_size=1 << 30)

    async def echo(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def chunks(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(b"part%d;" % i)
            await asyncio.sleep(0.01)
        await resp.write_eof()
        return resp

    async def length(request: web.Request) -> web.Response:
        data = await request.read()
        return web.Response(text=f"{len(data)} {request.headers.get('Transfer-Encoding')}")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await sock.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await sock.send_bytes(msg.data[::-1])
        return sock

    async def early(request: web.Request) -> web.Response:
        return web.Response(status=413, text="too big for me")

    app.router.add_post("/echo", echo)
    app.router.add_get("/chunks", chunks)
    app.router.add_post("/len", length)
    app.router.add_put("/len", length)
    app.router.add_get("/ws", ws)
    app.router.add_post("/early", early)
    return app


def test_chunked_request_and_response_pass_through() -> None:
    async def scenario() -> None:
        runner, port = await aiohttp_backend(echo_app())
        px = await start_proxy([("a", f"127.0.0.1:{port}")])
        c = await RawClient.connect(px.port)
        await c.send(b"POST /len HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
        r = await c.response()
        assert r.status == 200 and r.body == b"11 chunked"
        await c.send(get("/chunks"))
        r = await c.response()
        assert r.header("transfer-encoding") == "chunked"
        assert r.body == b"part0;part1;part2;part3;part4;"
        # An HTTP/1.0 client cannot take chunked: raw body, delimited by close.
        await c.close()
        c = await RawClient.connect(px.port)
        await c.send(b"GET /chunks HTTP/1.0\r\n\r\n")
        r = await c.response()
        assert r.header("transfer-encoding") is None and r.header("connection") == "close"
        assert r.body == b"part0;part1;part2;part3;part4;"
        await c.close()
        # aiohttp client streaming a body through the proxy.
        async with aiohttp.ClientSession() as s:
            data = bytes(range(256)) * 4096

            async def gen() -> Any:
                for i in range(0, len(data), 65536):
                    yield data[i : i + 65536]

            async with s.post(f"http://127.0.0.1:{px.port}/echo", data=gen()) as resp:
                assert await resp.read() == data
        await stop_proxy(px)
        await runner.cleanup()

    run(scenario())


def test_expect_100_continue_relayed() -> None:
    async def scenario() -> None:
        runner, port = await aiohttp_backend(echo_app())
        px = await start_proxy([("a", f"127.0.0.1:{port}")])
        c = await RawClient.connect(px.port)
        await c.send(b"PUT /len HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
        await c.send(b"data")
        r = await c.response()
        assert r.status == 200 and r.body == b"4 None"
        await c.close()
        await stop_proxy(px)
        await runner.cleanup()

    run(scenario())


def test_early_response_closes_client_and_drops_backend_connection() -> None:
    async def scenario() -> None:
        runner, port = await aiohttp_backend(echo_app())
        px = await start_proxy([("a", f"127.0.0.1:{port}")])
        c = await RawClient.connect(px.port)
        await c.send(b"POST /early HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n"
                     + b"x" * 1000)
        r = await c.response()
        assert r.status == 413 and r.header("connection") == "close"
        await c.close()
        await wait_for(lambda: px.in_flight == 0)
        await stop_proxy(px)
        await runner.cleanup()

    run(scenario())


def test_websocket_through_proxy() -> None:
    async def scenario() -> None:
        runner, port = await aiohttp_backend(echo_app())
        px = await start_proxy([("a", f"127.0.0.1:{port}")])
        url = f"http://127.0.0.1:{px.port}/ws"
        async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
            for i in range(20):
                await ws.send_str(f"m{i}")
                assert (await ws.receive_str()) == f"echo:m{i}"
            await ws.send_bytes(b"\x00\x01" * 50000)
            assert (await ws.receive_bytes()) == (b"\x00\x01" * 50000)[::-1]
            assert px.in_flight == 1  # a tunnel holds its backend
        await wait_for(lambda: px.in_flight == 0)
        assert px.stats.snapshot()["requests"]["p"]["a"]["1xx"] == 1
        await stop_proxy(px)
        await runner.cleanup()

    run(scenario())


def test_idle_websocket_tunnel_is_closed_after_client_idle_timeout() -> None:
    async def scenario() -> None:
        runner, port = await aiohttp_backend(echo_app())
        px = await start_proxy([("a", f"127.0.0.1:{port}")],
                               listener={"client_idle_timeout_s": 0.4})
        url = f"http://127.0.0.1:{px.port}/ws"
        async with aiohttp.ClientSession() as s, s.ws_connect(url, autoping=False) as ws:
            for i in range(3):  # traffic keeps it open past the timeout
                await asyncio.sleep(0.25)
                await ws.send_str(f"m{i}")
                assert (await ws.receive_str()) == f"echo:m{i}"
            msg = await asyncio.wait_for(ws.receive(), 3)  # then silence: closed
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.ERROR)
        await wait_for(lambda: px.in_flight == 0)
        await stop_proxy(px)
        await runner.cleanup()

    run(scenario())


# -- errors ----------------------------------------------------------------------------------


def test_503_when_no_backend_is_eligible(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        (be,) = await backends("web1")
        async with proxy_in_front_of([be]) as px:
            px.pool.apply(1, {b.name: BackendEntry(False, 1.0) for b in px.pool.backends}, False)
            c = await RawClient.connect(px.port)
            await c.send(get())
            r = await c.response()
            assert r.status == 503 and b"no backend" in r.body
            # The client may keep its connection: the request was complete.
            px.pool.apply(2, {px.pool.backends[0].name: BackendEntry(True, 1.0)}, False)
            await c.send(get())
            assert (await c.response()).status == 200
            await c.close()
        await stop_all([be])

    with caplog.at_level(logging.WARNING, logger="lb.data.proxy"):
        run(scenario())
    line = "event=proxy_error status=503 listener=l pool=p backend=- reason=no_backend"
    assert line in caplog.text


def test_connect_failure_retried_on_another_backend(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        (be,) = await backends("up")
        dead = f"127.0.0.1:{free_port()}"
        px = await start_proxy([("dead", dead), ("up", be.address)])
        for _ in range(6):
            r = await request(px.port, get())
            assert r.status == 200 and r.body.startswith(b"up ")
        snap = px.stats.snapshot()
        assert snap["retries"]["p"]["connect_refused"] >= 1
        # All dead: 502, naming the backend.
        px2 = await start_proxy([("d1", dead), ("d2", f"127.0.0.1:{free_port()}")])
        r = await request(px2.port, get())
        assert r.status == 502
        snap2 = px2.stats.snapshot()
        assert snap2["errors"]["p"] == {"d1": {"connect_refused": 1},
                                        "d2": {"connect_refused": 1}}
        assert snap2["requests"]["p"]["d2"] == {"5xx": 1} or snap2["requests"]["p"]["d1"] == {
            "5xx": 1}
        assert px.in_flight == 0 and px2.in_flight == 0
        await stop_proxy(px)
        await stop_proxy(px2)
        await stop_all([be])

    with caplog.at_level(logging.WARNING, logger="lb.data.proxy"):
        run(scenario())
    assert "status=502" in caplog.text and "reason=connect_refused" in caplog.text


def test_504_on_response_timeout_and_retry_on_timeout() -> None:
    def hang(seen: Seen, be: CountingBackend) -> Any:
        return "hang"

    async def scenario() -> None:
        (slow,) = await backends("slow", behaviour=hang)
        (fast,) = await backends("fast")
        px = await start_proxy([("slow", slow.address)], pool={"response_timeout_s": 0.3})
        r = await request(px.port, get())
        assert r.status == 504
        await stop_proxy(px)
        # Passive ejection off: the GETs' timeouts would otherwise take slow out of rotation
        # locally before a POST reaches it.
        px = await start_proxy([("slow", slow.address), ("fast", fast.address)],
                               pool={"response_timeout_s": 0.3, "retry_on_timeout": True,
                                     "passive": {"enabled": False}})
        for _ in range(4):
            r = await request(px.port, get())
            assert r.status == 200 and r.body.startswith(b"fast")
        # POST is not retried on timeout even when enabled.
        statuses = set()
        for _ in range(2):
            r = await request(px.port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx")
            statuses.add(r.status)
        assert 504 in statuses
        assert px.in_flight == 0
        await stop_proxy(px)
        await stop_all([slow, fast])

    run(scenario())


def test_stale_keepalive_connection_is_retried_transparently() -> None:
    async def scenario() -> None:
        (be,) = await backends("web1")
        be.close_after_response = True  # closes after each answer without saying so
        async with proxy_in_front_of([be]) as px:
            c = await RawClient.connect(px.port)
            for _ in range(10):
                await c.send(get())
                assert (await c.response()).status == 200
                # Do not give the proxy time to notice the close every time.
            await c.close()
            assert len(be.requests) == 10
        await stop_all([be])

    run(scenario())


def test_post_that_reached_a_backend_is_never_sent_again() -> None:
    def kill(seen: Seen, be: CountingBackend) -> Any:
        return None if seen.method == "POST" else ok_behaviour(seen, be)

    async def scenario() -> None:
        bes = await backends("a", "b", "c", behaviour=kill)
        async with proxy_in_front_of(bes, pool={"retries": 5}) as px:
            c = await RawClient.connect(px.port)
            await c.send(get())  # warm a pooled connection
            assert (await c.response()).status == 200
            for _ in range(3):
                r = await request(px.port, b"POST /p HTTP/1.1\r\nHost: a\r\n"
                                  b"Content-Length: 3\r\n\r\nabc")
                assert r.status == 502
            posts = sum(1 for b in bes for s in b.requests if s.method == "POST")
            assert posts == 3
            # A GET killed the same way is retried on another backend (idempotent).
            await c.close()
            assert px.in_flight == 0
        await stop_all(bes)

    run(scenario())


def test_idempotent_request_reset_before_answer_is_retried() -> None:
    def kill(seen: Seen, be: CountingBackend) -> Any:
        return None if be.name == "bad" else ok_behaviour(seen, be)

    async def scenario() -> None:
        bes = await backends("bad", "good", behaviour=kill)
        async with proxy_in_front_of(bes) as px:
            for _ in range(4):
                r = await request(
                    px.port, b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
                )
                assert r.status == 200 and r.body.startswith(b"good")
            assert all(s.body == b"hi" for s in bes[1].requests)
        await stop_all(bes)

    run(scenario())


def test_backend_dying_mid_response_cuts_the_client() -> None:
    async def scenario() -> None:
        def partial(seen: Seen, be: CountingBackend) -> Any:
            t = next(iter(be.open)).transport
            assert t is not None
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
            asyncio.get_running_loop().call_later(0.05, t.abort)
            return "hang"

        (be,) = await backends("web1", behaviour=partial)
        async with proxy_in_front_of([be]) as px:
            c = await RawClient.connect(px.port)
            await c.send(get())
            got = await c.responses(1)
            assert got == []  # never a complete (wrong) response
            assert c.eof
            await wait_for(lambda: px.in_flight == 0)
        await stop_all([be])

    run(scenario())


def test_in_flight_returns_to_zero_after_error_battery() -> None:
    def beh(seen: Seen, be: CountingBackend) -> Any:
        if seen.target == "/hang":
            return "hang"
        if seen.target == "/kill":
            return None
        if seen.target == "/500":
            return b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"
        if seen.target == "/garbage":
            return b"NOT HTTP\r\n\r\n"
        if seen.target == "/big":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"y" * 10000000
        return ok_behaviour(seen, be)

    async def scenario() -> None:
        bes = await backends("a", "b", behaviour=beh)
        px = await start_proxy([("a", bes[0].address), ("b", bes[1].address),
                                ("dead", f"127.0.0.1:{free_port()}")],
                               pool={"response_timeout_s": 0.3, "retries": 1})
        px.pool.consecutive_failures = 10**6  # keep everyone in rotation for this test
        for path in ("/hang", "/kill", "/500", "/garbage", "/ok"):
            for method in ("GET", "POST"):
                r = await request(px.port, f"{method} {path} HTTP/1.1\r\nHost: a\r\n"
                                  f"Content-Length: 0\r\n\r\n".encode())
                assert r.status in (200, 500, 502, 504), (path, method, r.status)
        # Client goes away mid-response and mid-request.
        for path in ("/big", "/hang"):
            c = await RawClient.connect(px.port)
            await c.send(get(path))
            await asyncio.sleep(0.05)
            c.writer.transport.abort()
        c = await RawClient.connect(px.port)
        await c.send(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
        await asyncio.sleep(0.05)
        c.writer.transport.abort()
        await wait_for(lambda: px.in_flight == 0, 5)
        # Exactly one release per pick: none left over, none given back twice.
        assert [b.in_flight for b in px.pool.backends] == [0, 0, 0]
        assert sum(b.requests for b in px.pool.backends) > 10
        assert not px.server.clients  # type: ignore[union-attr]
        await stop_proxy(px)
        await stop_all(bes)

    run(scenario())


def test_passive_ejection_on_5xx_and_switch() -> None:
    def fail(seen: Seen, be: CountingBackend) -> Any:
        if be.name == "sick":
            return b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"
        return ok_behaviour(seen, be)

    async def scenario(count_5xx: bool) -> list[Any]:
        bes = await backends("sick", "well", behaviour=fail)
        px = await start_proxy([(b.name, b.address) for b in bes],
                               pool={"passive": {"count_5xx": count_5xx,
                                                 "consecutive_failures": 2}})
        for _ in range(8):
            await request(px.port, get())
        await stop_proxy(px)
        await stop_all(bes)
        return px.ejections

    ej = run(scenario(True))
    assert len(ej) == 1 and ej[0].backend == "sick" and ej[0].outcome == "http_5xx"
    assert run(scenario(False)) == []


def test_update_switches_new_requests_to_new_pool() -> None:
    async def scenario() -> None:
        old, new = await backends("old", "new")
        px = await start_proxy([("old", old.address)])
        assert (await request(px.port, get())).body.startswith(b"old")
        pool2 = build_pool("p", "round_robin", [("new", "127.0.0.1", new.port, 1.0)])
        cfg2 = px.pool_cfg.model_copy(update={"backends": ()})
        px.server.update(pool2, cfg2)
        assert (await request(px.port, get())).body.startswith(b"new")
        await stop_proxy(px)
        await stop_all([old, new])

    run(scenario())


def test_a_reload_s_timeouts_and_limits_reach_new_requests() -> None:
    """The server copies its hot settings out of the configs (``_listener_set``,
    ``_PoolKnobs``): a reload's values must reach the next request, and a request already
    on its way keeps its pool's."""

    def hang_on_slow(seen: Seen, be: CountingBackend) -> Any:
        return "hang" if seen.target == "/slow" else ok_behaviour(seen, be)

    async def scenario() -> None:
        (be,) = await backends("web1", behaviour=hang_on_slow)
        px = await start_proxy([("web1", be.address)], pool={"response_timeout_s": 30.0})
        srv = px.server
        before = await RawClient.connect(px.port)
        await before.send(get("/slow"))  # on its way with the old 30 s
        await wait_for(lambda: len(be.requests) == 1)
        srv.update(px.pool, px.pool_cfg.model_copy(update={"response_timeout_s": 0.3}))
        t0 = asyncio.get_running_loop().time()
        r = await request(px.port, get("/slow"), timeout_s=5)
        assert r.status == 504 and asyncio.get_running_loop().time() - t0 < 3
        with pytest.raises(TimeoutError):  # still waiting: its pool's 30 s
            await before.responses(1, timeout_s=0.5)
        await before.close()
        body = b"x" * 100
        post = (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + body)
        assert (await request(px.port, post)).status == 200
        assert (await request(px.port, get("/" + "a" * 300))).status == 200
        srv.listener_changed(srv.listener.model_copy(
            update={"max_body_bytes": 50, "max_request_line_bytes": 200}))
        assert (await request(px.port, post)).status == 413
        assert (await request(px.port, get("/" + "a" * 300))).status == 414
        await stop_proxy(px)
        await stop_all([be])

    run(scenario())


def test_idle_backend_connections_follow_the_pool_s_limits_and_their_reloads() -> None:
    def slow(seen: Seen, be: CountingBackend) -> Any:
        return ("delay", 0.2, ok_behaviour(seen, be))

    async def scenario() -> None:
        (be,) = await backends("web1", behaviour=slow)
        px = await start_proxy([("web1", be.address)],
                               pool={"max_idle_per_backend": 3, "idle_timeout_s": 30.0})
        srv = px.server
        assert isinstance(srv, ProxyServer)

        def idle() -> int:
            return sum(len(v) for v in srv.idle.values())

        async def burst() -> None:  # five at once: five backend connections
            rs = await asyncio.gather(*(request(px.port, get()) for _ in range(5)))
            assert all(r.status == 200 for r in rs)

        await burst()
        assert idle() == 3
        srv.update(px.pool, px.pool_cfg.model_copy(
            update={"max_idle_per_backend": 1, "idle_timeout_s": 0.3}))
        await burst()
        assert idle() == 1  # the three were taken again; one of the five goes back
        await wait_for(lambda: idle() == 0, timeout_s=5)  # 0.3 s now, not 30 s
        await burst()
        assert idle() == 1
        await stop_proxy(px)
        await stop_all([be])

    run(scenario())


def test_drain_finishes_in_flight_and_closes_idle() -> None:
    def slow(seen: Seen, be: CountingBackend) -> Any:
        return ("delay", 0.3, ok_behaviour(seen, be))

    async def scenario() -> None:
        (be,) = await backends("web1", behaviour=slow)
        px = await start_proxy([("web1", be.address)])
        idle = await RawClient.connect(px.port)
        busy = await RawClient.connect(px.port)
        await busy.send(get())
        await asyncio.sleep(0.05)
        cut = await px.server.drain(5.0)
        assert cut == 0
        r = await busy.response()
        assert r.status == 200 and r.header("connection") == "close"
        assert await idle.closed(1.0)
        # No longer accepting: a new connection waits in the shared backlog for another
        # worker, unanswered by this one.
        late = await RawClient.connect(px.port)
        await late.send(get())
        with pytest.raises(TimeoutError):
            await late.responses(1, timeout_s=0.3)
        await late.close()
        await stop_proxy(px)
        await stop_all([be])

    run(scenario())


def test_vip_moved_closes_keepalive_clients_but_answers_a_fresh_connections_first_request(
) -> None:
    """When this node loses the VIP (close_idle from the control process), idle keep-alive
    clients are closed (their next request would hit the new holder as a reset), busy ones
    after their response, and a connection accepted just before the move still gets its
    first request answered: its bytes may already be on the way here."""
    def slow(seen: Seen, be: CountingBackend) -> Any:
        return ("delay", 0.2, ok_behaviour(seen, be))

    async def scenario() -> None:
        (be,) = await backends("web1", behaviour=slow)
        async with proxy_in_front_of([be]) as px:
            used = await RawClient.connect(px.port)
            await used.send(get())
            assert (await used.response()).status == 200
            busy = await RawClient.connect(px.port)
            await busy.send(get())
            fresh = await RawClient.connect(px.port)
            await wait_for(lambda: len(px.server.clients) == 3)
            px.server.close_idle(spare_fresh=True)
            assert await used.closed(1.0)
            await fresh.send(get())
            r = await fresh.response()
            assert r.status == 200 and r.header("connection") == "close"
            assert await fresh.closed(1.0)
            r = await busy.response()
            assert r.status == 200 and r.header("connection") == "close"
            assert await busy.closed(1.0)
        await stop_all([be])

    run(scenario())


def test_client_idle_timeout_closes_quietly() -> None:
    async def scenario() -> None:
        (be,) = await backends("web1")
        async with proxy_in_front_of([be], listener={"client_idle_timeout_s": 0.2}) as px:
            c = await RawClient.connect(px.port)
            await c.send(get())
            await c.response()
            assert await c.closed(2.0)
            assert c.raw.count(b"HTTP/1.1") == 1  # no 408 for an idle connection
        await stop_all([be])

    run(scenario())


def test_stats_count_requests_errors_and_connections() -> None:
    async def scenario() -> None:
        (be,) = await backends("web1")
        async with proxy_in_front_of([be]) as px:
            for _ in range(3):
                await request(px.port, get())
            await request(px.port, b"GET / HTTP/1.1\r\n\r\n")  # no Host
            await wait_for(lambda: px.stats.active_connections("l") == 0)
            d = px.stats.take_delta()
            assert d["requests"]["p"]["web1"] == {"2xx": 3}
            assert d["bad_requests"]["l"]["missing_host"] == {"400": 1}
            assert d["connections"]["l"]["accepted"] == 4
            assert sum(d["duration"]["p"]["buckets"]) == 3
            assert px.stats.take_delta() == {}
        await stop_all([be])

    run(scenario())


def test_backend_connection_close_does_not_close_the_client() -> None:
    def closing(seen: Seen, be: CountingBackend) -> Any:
        body = b"bye"
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\n" + body

    async def scenario() -> None:
        (be,) = await backends("web1", behaviour=closing)
        be.close_after_response = True
        async with proxy_in_front_of([be]) as px:
            c = await RawClient.connect(px.port)
            for _ in range(3):
                await c.send(get())
                r = await c.response()
                assert r.status == 200 and r.body == b"bye"
                assert r.header("connection") is None  # hop-by-hop: not forwarded
            await c.close()
            assert be.connections == 3  # a closed backend connection is never reused
        await stop_all([be])

    run(scenario())


def test_large_pipelined_body_then_split_head() -> None:
    async def scenario() -> None:
        (be,) = await backends("web1")
        async with proxy_in_front_of([be]) as px:
            c = await RawClient.connect(px.port)
            body = b"p" * 300_000
            data = (b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
                    + body + b"GET /next HTTP/1.1\r\nHo")
            await c.send(data)
            await asyncio.sleep(0.05)
            await c.send(b"st: a\r\n\r\n")
            rs = await c.responses(2)
            assert [r.status for r in rs] == [200, 200]
            assert be.requests[0].body == body and be.requests[1].target == "/next"
            await c.close()
        await stop_all([be])

    run(scenario())


def test_max_connections_leaves_the_rest_in_the_backlog() -> None:
    async def scenario() -> None:
        (be,) = await backends("web1")
        async with proxy_in_front_of([be], listener={"max_connections": 2}) as px:
            a = await RawClient.connect(px.port)
            b = await RawClient.connect(px.port)
            await asyncio.sleep(0.05)
            c = await RawClient.connect(px.port)  # accepted by the kernel, not by us
            await c.send(get("/c"))
            with pytest.raises(TimeoutError):
                await c.responses(1, timeout_s=0.3)
            await a.close()  # a slot frees up: c is served
            r = await c.response(timeout_s=3)
            assert r.status == 200 and r.body.endswith(b"/c\n")
            await b.close()
            await c.close()
        await stop_all([be])

    run(scenario())


def test_backend_killed_under_load_costs_idempotent_clients_nothing() -> None:
    def slowish(seen: Seen, be: CountingBackend) -> Any:
        return ("delay", 0.005, ok_behaviour(seen, be))

    async def scenario() -> None:
        bes = await backends("a", "b", "c", behaviour=slowish)
        async with proxy_in_front_of(bes) as px:
            statuses: list[int] = []

            async def client(i: int) -> None:
                c = await RawClient.connect(px.port)
                for j in range(30):
                    await c.send(get(f"/{i}/{j}"))
                    statuses.append((await c.response()).status)
                await c.close()

            load = asyncio.gather(*(client(i) for i in range(10)))
            await asyncio.sleep(0.1)
            await bes[1].stop()  # like kill -9: listener gone, connections reset
            await load
            assert len(statuses) == 300
            assert set(statuses) == {200}, [s for s in statuses if s != 200]
            await wait_for(lambda: px.in_flight == 0)
        await stop_all([bes[0], bes[2]])

    run(scenario())


def test_make_listen_socket_ipv6_and_freebind() -> None:
    import socket

    from lb.config import ListenerConfig
    from lb.listen import make_listen_socket

    s6 = make_listen_socket(ListenerConfig(name="v6", bind=f"[::1]:{free_port()}", pool="p"))
    assert s6.family == socket.AF_INET6
    assert s6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    assert not s6.getblocking()
    s6.close()
    # A standby binds the VIP before it holds it: an address this host does not have.
    # (Bound only; nothing is ever sent to or from it.)
    sf = make_listen_socket(ListenerConfig(name="vip", bind="192.0.2.77:18080", pool="p"))
    assert sf.getsockname() == ("192.0.2.77", 18080)
    sf.close()
    with open("/proc/sys/net/ipv4/ip_nonlocal_bind") as f:
        nonlocal_bind = f.read().strip() == "1"
    if not nonlocal_bind:  # else the host allows it anyway
        with pytest.raises(OSError):
            make_listen_socket(
                ListenerConfig(name="vip", bind="192.0.2.77:18080", pool="p", freebind=False,
                               transparent=False)
            )


@pytest.mark.skipif(os.geteuid() != 0, reason="IP_TRANSPARENT needs CAP_NET_ADMIN")
def test_listen_socket_is_transparent_and_accepted_connections_inherit_it() -> None:
    """A handover removes the VIP while responses are in flight; accepted sockets must keep
    IP_TRANSPARENT so they can still send from it (the kernel copies it to the child)."""
    import socket

    from lb.config import ListenerConfig
    from lb.listen import make_listen_socket

    ls = make_listen_socket(ListenerConfig(name="t", bind=f"127.0.0.1:{free_port()}", pool="p"))
    ls.setblocking(True)
    try:
        assert ls.getsockopt(socket.SOL_IP, 19) == 1
        with socket.create_connection(ls.getsockname(), timeout=2):
            conn, _ = ls.accept()
            with conn:
                assert conn.getsockopt(socket.SOL_IP, 19) == 1
    finally:
        ls.close()
    off = make_listen_socket(ListenerConfig(name="t", bind=f"127.0.0.1:{free_port()}",
                                            pool="p", transparent=False))
    assert off.getsockopt(socket.SOL_IP, 19) == 0
    off.close()


def test_ipv6_client_through_proxy() -> None:
    async def scenario() -> None:
        (be,) = await backends("web1")
        from lb.config import ListenerConfig, PoolConfig
        from lb.data.pool import build_pool
        from lb.data.proxy import ProxyServer
        from lb.listen import make_listen_socket
        from lb.stats import Stats

        port = free_port()
        lcfg = ListenerConfig(name="v6", bind=f"[::1]:{port}", pool="p")
        pcfg = PoolConfig.model_validate(
            {"name": "p", "backends": [{"name": "web1", "address": be.address}]}
        )
        srv = ProxyServer(lcfg, build_pool("p", "round_robin", [("web1", "127.0.0.1",
                                                                  be.port, 1.0)]),
                          pcfg, Stats())
        sock = make_listen_socket(lcfg)
        await srv.start(sock)
        c = await RawClient.connect(port, host="::1")
        await c.send(get())
        assert (await c.response()).status == 200
        await c.close()
        assert be.requests[0].header("forwarded") == 'for="[::1]";proto=http'
        assert be.requests[0].header("x-forwarded-for") == "::1"
        srv.close()
        sock.close()
        await stop_all([be])

    run(scenario())


def test_pipelining_flood_is_parsed_a_bounded_way_ahead() -> None:
    async def scenario() -> None:
        (be,) = await backends("web1")
        async with proxy_in_front_of([be]) as px:
            c = await RawClient.connect(px.port)
            n = 6000  # ~200 KiB of tiny requests in one write
            await c.send(b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(n)))
            peak = 0
            got: list[Any] = []
            async with asyncio.timeout(30):
                while len(got) < n:
                    got += await c.responses(1)
                    for cl in px.server.clients:  # type: ignore[union-attr]
                        peak = max(peak, len(cl.queue))
            assert [r.body.split()[-1] for r in got] == [b"/%d" % i for i in range(n)]
            # Parsed ahead: at most the limit plus one 16 KiB slice of requests.
            assert peak < 8 + 16384 // 29 + 1, peak
            await c.close()
        await stop_all([be])

    run(scenario())


def test_head_responses_leave_no_request_alive() -> None:
    """Found by an outside review: the engine raised one shared exception object to end a
    HEAD response (and to stop parsing); each raise grew its traceback, whose frames kept
    every request and connection alive. 300 HEAD requests, then nothing of them is left."""
    import gc

    from lb.data import proxy as P

    def alive() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) in (P._Request, P._Upstream))

    async def scenario() -> None:
        (be,) = await backends("web1")
        async with proxy_in_front_of([be]) as px:
            before = alive()
            c = await RawClient.connect(px.port)
            for i in range(300):
                await c.send(b"HEAD /h%d HTTP/1.1\r\nHost: a\r\n\r\n" % i)
                await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
            await c.close()
            await asyncio.sleep(0.05)
            assert alive() <= before + 3  # the pooled backend connection, at most
        await stop_all([be])

    run(scenario())
