"""Ring 4: HTTP and TCP probes against real servers on 127.0.0.1, one test per label."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
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
    wait_for,
)

from healthcheck import CheckResult, CheckStatus, HealthConfigError, HttpProbe, TcpProbe
from healthcheck.probes import LOOP_LAG_GRACE_S

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


# -- hostile servers, the callback form and its bounds -----------------------------------------


async def slowloris_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Status and headers at once, then one body byte every 20 ms, never the marker."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    for _ in range(200):
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.02)


async def slowloris_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A status line, then header bytes one at a time: the headers never end."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\n")
    for _ in range(200):
        writer.write(b"X")
        await writer.drain()
        await asyncio.sleep(0.02)


async def huge_header_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One header line of 1 MiB, sent as fast as the socket takes it."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nX-Huge: " + b"a" * (1 << 20))
    await writer.drain()
    await asyncio.sleep(1)


async def reset_after_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()  # RST


async def binary_noise(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(bytes(range(256)) * 64)
    await writer.drain()
    await asyncio.sleep(1)


@pytest.mark.parametrize(
    ("handler", "probe", "status", "detail", "max_s"),
    [
        (slowloris_body, HttpProbe(expect_body="ok", timeout_s=0.3), CheckStatus.L7_TIMEOUT,
         "no response", 0.3),
        (slowloris_headers, HttpProbe(timeout_s=0.3), CheckStatus.L7_TIMEOUT, "no response", 0.3),
        (huge_header_line, HttpProbe(timeout_s=2), CheckStatus.L7_BAD_RESPONSE, "", 1.0),
        (reset_after_request, HttpProbe(timeout_s=1), CheckStatus.L7_BAD_RESPONSE,
         "before response", 0.5),
        (binary_noise, HttpProbe(timeout_s=1), CheckStatus.L7_BAD_RESPONSE, "invalid HTTP", 0.5),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_hostile_servers_get_a_bounded_verdict(
    handler: Handler, probe: HttpProbe, status: CheckStatus, detail: str, max_s: float
) -> None:
    async def body() -> CheckResult:
        async with raw_server(handler) as port:
            return await probe.run(LOOPBACK, port)

    result = run(body())
    assert result.status is status, result
    assert detail in result.detail
    # The deadline holds however the bytes trickle in (plus the loop-lag grace at most).
    assert result.duration_s <= max_s + LOOP_LAG_GRACE_S + 0.1, result


def test_start_reports_once_never_inside_start_and_abort_reports_nothing() -> None:
    async def body() -> None:
        app, _ = backend_app()
        async with aiohttp_server(app) as port:
            results: list[CheckResult] = []
            inside = True
            calls_inside: list[CheckResult] = []

            def done(r: CheckResult) -> None:
                (calls_inside if inside else results).append(r)

            with refused_port() as closed:
                handles = [HttpProbe(timeout_s=1).start(LOOPBACK, port, done),
                           TcpProbe(timeout_s=1).start(LOOPBACK, closed, done),
                           HttpProbe(timeout_s=1).start("not an address", port, done)]
                inside = False
                assert await wait_for(lambda: len(results) == 3, 2.0)
            await asyncio.sleep(0.1)
            assert calls_inside == [] and len(results) == 3
            assert sorted(r.status for r in results) == sorted(
                [CheckStatus.L7_OK, CheckStatus.L4_REFUSED, CheckStatus.L4_ERROR]
            ), results
            for h in handles:
                h.abort()  # after the verdict: harmless
            aborted: list[CheckResult] = []
            h = HttpProbe(timeout_s=0.2).start(LOOPBACK, port, aborted.append)
            h.abort()
            await asyncio.sleep(0.4)  # past its deadline: still nothing
            assert aborted == []

    run(body())


def test_many_probes_leave_no_socket_or_timer_behind() -> None:
    async def body() -> None:
        app, _ = backend_app()
        async with aiohttp_server(app) as port:
            await HttpProbe(timeout_s=2).run(LOOPBACK, port)  # the loop's epoll set exists
            before = len(os.listdir("/proc/self/fd"))
            loop = asyncio.get_running_loop()
            timers_before = len(loop._scheduled)  # type: ignore[attr-defined]
            with refused_port() as closed:
                results = await asyncio.gather(
                    *(HttpProbe(timeout_s=2).run(LOOPBACK, port) for _ in range(150)),
                    *(HttpProbe(timeout_s=2).run(LOOPBACK, closed) for _ in range(50)),
                )
            assert [r.status for r in results].count(CheckStatus.L7_OK) == 150
            assert [r.status for r in results].count(CheckStatus.L4_REFUSED) == 50
            await asyncio.sleep(0.05)
            assert len(os.listdir("/proc/self/fd")) <= before
            live = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
            assert len(live) <= timers_before

    run(body())


def test_a_busy_control_loop_is_not_blamed_on_the_backend() -> None:
    """The loop blocks past the probe's deadline while the backend's answer is already in
    the socket: the probe reads it (grace) instead of reporting a timeout."""

    async def body() -> tuple[CheckResult, CheckResult]:
        app, _ = backend_app()
        async with aiohttp_server(app) as port, raw_server(silent) as quiet:
            fut = asyncio.ensure_future(HttpProbe(timeout_s=0.1).run(LOOPBACK, port))
            slow = asyncio.ensure_future(HttpProbe(timeout_s=0.1).run(LOOPBACK, quiet))
            await asyncio.sleep(0)  # both probes start
            time.sleep(0.3)  # noqa: ASYNC251 (the control loop is busy past the deadline)
            return await fut, await slow

    ok, silent_result = run(body())
    assert ok.status is CheckStatus.L7_OK, ok
    assert ok.duration_s > 0.1  # it really was judged after its deadline
    # A backend that really says nothing still times out: at the late deadline (0.3 s) plus
    # one extension as long as the loop was late, capped at the budget (0.1 s).
    assert silent_result.status is CheckStatus.L7_TIMEOUT, silent_result
    assert 0.3 + LOOP_LAG_GRACE_S <= silent_result.duration_s < 0.3 + 0.1 + 0.1


def test_host_names_are_resolved_and_every_address_tried() -> None:
    async def body() -> tuple[CheckResult, CheckResult]:
        app, _ = backend_app()
        async with aiohttp_server(app) as port:
            ok = await HttpProbe(timeout_s=2).run("localhost", port)
        with refused_port() as closed:
            refused = await TcpProbe(timeout_s=2).run("localhost", closed)
        return ok, refused

    ok, refused = run(body())
    assert ok.status is CheckStatus.L7_OK, ok
    assert refused.status is CheckStatus.L4_REFUSED, refused
