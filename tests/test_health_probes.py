"""Ring 4: HTTP and TCP probes against real servers on 127.0.0.1, one test per label."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from health_helpers import (
    LOOPBACK,
    aiohttp_server,
    full_backlog_port,
    raw_server,
    refused_port,
    run,
)

from healthcheck import CheckResult, CheckStatus, HealthConfigError, HttpProbe, TcpProbe

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def backend_app() -> tuple[web.Application, list[web.Request]]:
    seen: list[web.Request] = []
    app = web.Application()

    async def ok(request: web.Request) -> web.Response:
        seen.append(request)
        return web.Response(text="status: all good")

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, text="all good, honest")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    async def big(request: web.Request) -> web.StreamResponse:
        # the marker sits after 100 KiB of filler, past what a probe reads
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(100):
            await resp.write(b"x" * 1024)
        await resp.write(b"MARKER")
        return resp

    app.router.add_get("/healthz", ok)
    app.router.add_get("/fail", fail)
    app.router.add_get("/slow", slow)
    app.router.add_get("/big", big)
    return app, seen


async def probe_app(probe: HttpProbe) -> tuple[CheckResult, list[web.Request]]:
    app, seen = backend_app()
    async with aiohttp_server(app) as port:
        return await probe.run(LOOPBACK, port), seen


def test_200_is_l7_ok_and_request_is_well_formed() -> None:
    result, seen = run(probe_app(HttpProbe(timeout_s=1)))
    assert (result.status, result.code, result.ok) == (CheckStatus.L7_OK, 200, True)
    assert 0 < result.duration_s < 1
    (req,) = seen
    assert req.method == "GET" and req.path == "/healthz"
    assert req.host.startswith(f"{LOOPBACK}:")
    assert req.headers["Connection"] == "close"


def test_host_header_and_method_are_sent() -> None:
    result, seen = run(probe_app(HttpProbe(method="HEAD", host="app.example", timeout_s=1)))
    assert result.status is CheckStatus.L7_OK
    assert (seen[0].method, seen[0].host) == ("HEAD", "app.example")


def test_500_is_l7_status_with_code() -> None:
    result, _ = run(probe_app(HttpProbe(path="/fail", timeout_s=1)))
    assert (result.status, result.code, result.ok) == (CheckStatus.L7_STATUS, 500, False)


def test_500_passes_when_expected() -> None:
    result, _ = run(probe_app(HttpProbe(path="/fail", expect_status=((500, 500),), timeout_s=1)))
    assert result.status is CheckStatus.L7_OK


def test_body_substring_present() -> None:
    result, _ = run(probe_app(HttpProbe(expect_body="all good", timeout_s=1)))
    assert result.status is CheckStatus.L7_OK


def test_body_substring_missing() -> None:
    result, _ = run(probe_app(HttpProbe(expect_body="database: ok", timeout_s=1)))
    assert (result.status, result.code) == (CheckStatus.L7_BODY_MISMATCH, 200)


def test_bad_status_wins_over_matching_body() -> None:
    result, _ = run(probe_app(HttpProbe(path="/fail", expect_body="all good", timeout_s=1)))
    assert (result.status, result.code) == (CheckStatus.L7_STATUS, 500)


def test_body_search_is_bounded_to_64k() -> None:
    result, _ = run(probe_app(HttpProbe(path="/big", expect_body="MARKER", timeout_s=1)))
    assert result.status is CheckStatus.L7_BODY_MISMATCH
    assert "65536" in result.detail


def test_slow_handler_is_l7_timeout_within_budget() -> None:
    result, _ = run(probe_app(HttpProbe(path="/slow", timeout_s=0.2)))
    assert result.status is CheckStatus.L7_TIMEOUT
    assert 0.2 <= result.duration_s < 0.5


def test_closed_port_is_l4_refused() -> None:
    with refused_port() as port:
        result = run(HttpProbe(timeout_s=1).run(LOOPBACK, port))
    assert result.status is CheckStatus.L4_REFUSED


def test_full_accept_queue_is_l4_timeout() -> None:
    # Linux drops SYNs to a listener whose accept queue is full: a real hung connect on loopback
    with full_backlog_port() as port:
        http = run(HttpProbe(timeout_s=0.2).run(LOOPBACK, port))
        tcp = run(TcpProbe(timeout_s=0.2).run(LOOPBACK, port))
    assert http.status is CheckStatus.L4_TIMEOUT
    assert tcp.status is CheckStatus.L4_TIMEOUT
    assert 0.2 <= http.duration_s < 0.5


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(1)


async def accept_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


async def close_mid_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(5)


async def endless_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for i in range(10_000):
        writer.write(b"X-Filler-%d: %s\r\n" % (i, b"y" * 100))
        await writer.drain()


async def interim_then_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(1)


async def close_delimited_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.0 200 OK\r\n\r\nready: yes")
    await writer.drain()


@pytest.mark.parametrize(
    ("handler", "probe", "status", "detail"),
    [
        (garbage, HttpProbe(timeout_s=1), CheckStatus.L7_BAD_RESPONSE, "invalid HTTP"),
        (accept_and_close, HttpProbe(timeout_s=1), CheckStatus.L7_BAD_RESPONSE, "before response"),
        (close_mid_headers, HttpProbe(timeout_s=1), CheckStatus.L7_BAD_RESPONSE, "before resp"),
        (endless_headers, HttpProbe(timeout_s=2), CheckStatus.L7_BAD_RESPONSE, "no complete"),
        (silent, HttpProbe(timeout_s=0.1), CheckStatus.L7_TIMEOUT, ""),
        (interim_then_ok, HttpProbe(timeout_s=1), CheckStatus.L7_OK, ""),
        (close_delimited_body, HttpProbe(expect_body="yes", timeout_s=1), CheckStatus.L7_OK, ""),
        (
            close_delimited_body,
            HttpProbe(expect_body="no", timeout_s=1),
            CheckStatus.L7_BODY_MISMATCH,
            "",
        ),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_raw_servers(handler: Handler, probe: HttpProbe, status: CheckStatus, detail: str) -> None:
    async def body() -> CheckResult:
        async with raw_server(handler) as port:
            return await probe.run(LOOPBACK, port)

    result = run(body())
    assert result.status is status, result
    assert detail in result.detail


def test_tcp_probe_ok_and_refused() -> None:
    async def body() -> tuple[CheckResult, CheckResult]:
        async with raw_server(silent) as port:
            ok = await TcpProbe(timeout_s=1).run(LOOPBACK, port)
        with refused_port() as port:
            refused = await TcpProbe(timeout_s=1).run(LOOPBACK, port)
        return ok, refused

    ok, refused = run(body())
    assert (ok.status, ok.ok) == (CheckStatus.L4_OK, True)
    assert (refused.status, refused.ok) == (CheckStatus.L4_REFUSED, False)


def test_probe_does_not_swallow_cancellation() -> None:
    async def body() -> None:
        async with raw_server(silent) as port:
            task = asyncio.create_task(HttpProbe(timeout_s=5).run(LOOPBACK, port))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(body())


def test_ipv6_host_header_is_bracketed() -> None:
    req = HttpProbe().request_bytes("::1", 8080)
    assert b"\r\nHost: [::1]:8080\r\n" in req
    assert b"\r\nHost: 10.0.0.1\r\n" in HttpProbe().request_bytes("10.0.0.1", 80)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"timeout_s": 0}, "timeout_s"),
        ({"path": "healthz"}, "path"),
        ({"path": "/a\r\nX-Evil: 1"}, "path"),
        ({"method": "GE T"}, "method"),
        ({"host": "a\r\nb"}, "host"),
        ({"expect_status": ((400, 200),)}, "expect_status"),
        ({"expect_status": ()}, "expect_status"),
        ({"method": "HEAD", "expect_body": "ok"}, "expect_body"),
    ],
)
def test_invalid_probe_settings_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(HealthConfigError) as err:
        HttpProbe(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field
