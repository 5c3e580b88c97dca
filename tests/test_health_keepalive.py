"""Ring 4: ``reuse_connection`` HTTP checks against real servers on 127.0.0.1.

Each server counts the connections it accepts, so every test says how many connections a
series of checks cost, and each backend misbehaviour a kept connection meets (idle close,
close under the request, unsolicited bytes, Connection: close) is shown to cost no failed
check.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import pytest
from health_helpers import LOOPBACK, raw_server, run

from healthcheck import CheckResult, CheckStatus, HealthConfigError, HttpProbe
from lb.config import ConfigError, loads

pytestmark = pytest.mark.timeout(30)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Counting:
    """A raw HTTP server whose per-connection behaviour is ``serve(n, reader, writer)``,
    ``n`` the connection's number (from 1); it records each request line per connection."""

    def __init__(
        self,
        serve: Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ) -> None:
        self.serve = serve
        self.accepted = 0
        self.requests: list[tuple[int, bytes]] = []

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        await self.serve(self.accepted, reader, writer)

    async def read_request(self, n: int, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append((n, head))
        return head


def keep_alive_server() -> Counting:
    async def serve(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await srv.read_request(n, reader)
            writer.write(OK)
            await writer.drain()

    srv = Counting(serve)
    return srv


async def checks(probe: HttpProbe, port: int, count: int, gap_s: float = 0.01) -> list[CheckResult]:
    out = []
    for _ in range(count):
        out.append(await probe.run(LOOPBACK, port))
        await asyncio.sleep(gap_s)
    return out


def run_checks(
    srv: Counting,
    count: int,
    gap_s: float = 0.01,
    timeout_s: float = 1.0,
    expect_body: str | None = None,
) -> list[CheckResult]:
    """``count`` checks of ``srv`` by one reusing probe (closed at the end)."""

    async def body() -> list[CheckResult]:
        async with raw_server(srv.handler) as port:
            probe = HttpProbe(timeout_s=timeout_s, expect_body=expect_body, reuse_connection=True)
            try:
                return await checks(probe, port, count, gap_s)
            finally:
                probe.close()

    return run(body())


def test_passing_checks_share_one_connection_and_send_no_connection_close() -> None:
    async def body() -> tuple[list[CheckResult], Counting]:
        srv = keep_alive_server()
        async with raw_server(srv.handler) as port:
            probe = HttpProbe(timeout_s=1, reuse_connection=True)
            results = await checks(probe, port, 10)
            probe.close()
            return results, srv

    results, srv = run(body())
    assert [r.status for r in results] == [CheckStatus.L7_OK] * 10
    assert srv.accepted == 1
    assert len(srv.requests) == 10
    assert all(b"connection: close" not in head.lower() for _, head in srv.requests)


def test_without_reuse_every_check_is_a_new_connection() -> None:
    async def body() -> Counting:
        srv = keep_alive_server()
        async with raw_server(srv.handler) as port:
            results = await checks(HttpProbe(timeout_s=1), port, 5)
            assert [r.status for r in results] == [CheckStatus.L7_OK] * 5
            return srv

    srv = run(body())
    assert srv.accepted == 5
    assert all(b"Connection: close" in head for _, head in srv.requests)


def test_chunked_response_and_body_check_are_reused() -> None:
    async def serve(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await srv.read_request(n, reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"6\r\nready:\r\n4\r\n yes\r\n0\r\n\r\n"
            )
            await writer.drain()

    srv = Counting(serve)

    results = run_checks(srv, 4, expect_body="ready: yes")
    assert [r.status for r in results] == [CheckStatus.L7_OK] * 4
    assert srv.accepted == 1


def test_connection_close_response_is_not_reused() -> None:
    async def serve(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(n, reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(1)  # keep it open: only the header says "do not reuse"

    srv = Counting(serve)

    results = run_checks(srv, 3)
    assert [r.status for r in results] == [CheckStatus.L7_OK] * 3
    assert srv.accepted == 3


def test_backend_idle_timeout_closing_the_kept_connection_costs_nothing() -> None:
    """The backend closes each connection 50 ms after answering (a short keepalive_timeout);
    checks 150 ms apart find it closed (the peek sees EOF) and connect anew."""

    async def serve(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(n, reader)
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.05)

    srv = Counting(serve)

    results = run_checks(srv, 4, 0.15)
    assert [r.status for r in results] == [CheckStatus.L7_OK] * 4
    assert srv.accepted == 4


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_connection_closed_under_the_request_is_retried_on_a_new_one(how: str) -> None:
    """The backend's idle timeout meets our request on the way: connection 1 answers once,
    then closes on the second request without a byte. The check retries on a new
    connection inside its budget and passes."""

    async def serve(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(n, reader)
        writer.write(OK)
        await writer.drain()
        if n == 1:
            await srv.read_request(n, reader)
            if how == "reset":
                writer.transport.abort()
            return
        await asyncio.sleep(1)

    srv = Counting(serve)

    results = run_checks(srv, 2)
    assert [r.status for r in results] == [CheckStatus.L7_OK] * 2, results
    assert srv.accepted == 2
    assert [n for n, _ in srv.requests] == [1, 1, 2]


def test_a_retry_is_not_repeated_when_the_new_connection_fails_too() -> None:
    """Connection 1 answers once then drops the next request; every later connection is
    dropped at once: the check fails (one retry, not a loop)."""

    async def serve(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(n, reader)
        if n == 1:
            writer.write(OK)
            await writer.drain()
            await srv.read_request(n, reader)

    srv = Counting(serve)

    results = run_checks(srv, 2)
    assert results[0].status is CheckStatus.L7_OK
    assert results[1].status is CheckStatus.L7_BAD_RESPONSE
    assert "before response" in results[1].detail
    assert srv.accepted == 2


def test_unsolicited_bytes_on_an_idle_connection_are_never_taken_for_the_answer() -> None:
    """After answering, connection 1 sends a 500 nobody asked for (as servers send 408 on
    idle close) and stays open. The next check must not read that 500 as its response."""

    async def serve(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(n, reader)
        writer.write(OK)
        if n == 1:
            writer.write(b"HTTP/1.1 500 Stale\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    srv = Counting(serve)

    results = run_checks(srv, 2, 0.1)
    assert [r.status for r in results] == [CheckStatus.L7_OK] * 2, results
    assert srv.accepted == 2


def test_a_timeout_on_a_kept_connection_drops_it() -> None:
    async def serve(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(n, reader)
        writer.write(OK)
        await writer.drain()
        await srv.read_request(n, reader)  # the second request is never answered
        await asyncio.sleep(1)

    srv = Counting(serve)

    results = run_checks(srv, 3, timeout_s=0.2)
    assert [r.status for r in results] == [
        CheckStatus.L7_OK,
        CheckStatus.L7_TIMEOUT,
        CheckStatus.L7_OK,
    ], results
    assert srv.accepted == 2  # the timed-out connection was not kept


def test_a_pass_known_before_the_response_ends_waits_for_its_end_to_keep_the_connection() -> None:
    """Headers in one segment, the body 50 ms later: the verdict (at the headers) is held
    until the body ends, so the connection is kept; the check still passes."""

    async def serve(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await srv.read_request(n, reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"ok")
            await writer.drain()

    srv = Counting(serve)

    results = run_checks(srv, 3)
    assert [r.status for r in results] == [CheckStatus.L7_OK] * 3
    assert srv.accepted == 1


def test_a_pass_whose_response_never_ends_passes_and_is_not_kept() -> None:
    """Content-Length 10, 2 bytes sent: at the deadline the held pass is reported (not a
    timeout) and the connection is closed, not kept."""

    async def serve(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await srv.read_request(n, reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(1)

    srv = Counting(serve)

    async def body() -> list[CheckResult]:
        async with raw_server(srv.handler) as port:
            probe = HttpProbe(timeout_s=0.2, reuse_connection=True)
            return await checks(probe, port, 2)

    results = run(body())
    assert [r.status for r in results] == [CheckStatus.L7_OK] * 2
    assert srv.accepted == 2


def test_a_connection_older_than_the_age_limit_is_not_reused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The documented price is bounded: past REUSE_MAX_AGE_S the check connects anew."""
    monkeypatch.setattr("healthcheck.probes.REUSE_MAX_AGE_S", 0.15)

    async def body() -> Counting:
        srv = keep_alive_server()
        async with raw_server(srv.handler) as port:
            probe = HttpProbe(timeout_s=1, reuse_connection=True)
            results = await checks(probe, port, 6, 0.05)
            probe.close()
            assert [r.status for r in results] == [CheckStatus.L7_OK] * 6
            return srv

    accepted = run(body()).accepted
    assert 2 <= accepted <= 4, accepted


def test_the_known_price_an_old_connection_passes_after_the_listener_is_gone() -> None:
    """Why it is off by default: with reuse a backend that no longer accepts connections
    still passes on the kept one; without reuse the same moment is L4_REFUSED."""

    async def body() -> tuple[CheckResult, CheckResult]:
        srv = keep_alive_server()
        server = await asyncio.start_server(srv.handler, LOOPBACK, 0)
        port = int(server.sockets[0].getsockname()[1])
        probe = HttpProbe(timeout_s=1, reuse_connection=True)
        assert (await probe.run(LOOPBACK, port)).status is CheckStatus.L7_OK
        server.close()  # stop listening; the accepted connection lives on
        reused = await probe.run(LOOPBACK, port)
        fresh = await HttpProbe(timeout_s=1).run(LOOPBACK, port)
        probe.close()
        return reused, fresh

    reused, fresh = run(body())
    assert reused.status is CheckStatus.L7_OK
    assert fresh.status is CheckStatus.L4_REFUSED


def test_close_releases_the_kept_connection() -> None:
    async def body() -> tuple[int, int, bool]:
        eof = asyncio.Event()

        async def serve(n: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await srv.read_request(n, reader)
            writer.write(OK)
            await writer.drain()
            await reader.read()  # until the probe closes
            if n == 2:
                eof.set()

        srv = Counting(serve)
        async with raw_server(srv.handler) as port:
            probe = HttpProbe(timeout_s=1, reuse_connection=True)
            await HttpProbe(timeout_s=1).run(LOOPBACK, port)  # the loop's epoll set exists
            await asyncio.sleep(0.05)
            before = len(os.listdir("/proc/self/fd"))
            await probe.run(LOOPBACK, port)
            kept = len(os.listdir("/proc/self/fd"))
            probe.close()
            await asyncio.wait_for(eof.wait(), 2)
            return before, kept, eof.is_set()

    before, kept, closed = run(body())
    assert kept == before + 2  # our kept socket and the server's end
    assert closed


def test_idle_too_long_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("healthcheck.probes.IDLE_MAX_S", 0.05)

    async def body() -> Counting:
        srv = keep_alive_server()
        async with raw_server(srv.handler) as port:
            probe = HttpProbe(timeout_s=1, reuse_connection=True)
            results = await checks(probe, port, 3, 0.1)
            probe.close()
            assert [r.status for r in results] == [CheckStatus.L7_OK] * 3
            return srv

    assert run(body()).accepted == 3


def test_settings_that_cannot_reuse_are_refused_naming_the_key() -> None:
    with pytest.raises(HealthConfigError) as ei:
        HttpProbe(method="HEAD", reuse_connection=True)
    assert ei.value.field == "reuse_connection"
    base = """
[node]
name = "lb1"
[[listener]]
name = "web"
bind = "127.0.0.1:8080"
pool = "app"
[[pool]]
name = "app"
backends = [{ name = "a", address = "127.0.0.1:9000" }]
[pool.health]
reuse_connection = true
"""
    loads(base)  # GET: fine
    for extra in ('type = "tcp"', 'method = "HEAD"'):
        with pytest.raises(ConfigError) as ce:
            loads(base + extra + "\n")
        assert any("reuse_connection" in e for e in ce.value.errors), ce.value.errors
