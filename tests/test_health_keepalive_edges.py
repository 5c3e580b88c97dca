"""``reuse_connection`` edges found by an outside review (each failed on its first version).

Each test states the contract it holds the feature to (docs/architecture.md "Connections per
check", docs/configuration.md, the HttpProbe/CheckSpec docstrings). All traffic is on
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from health_helpers import LOOPBACK, raw_server, refused_port, run

from healthcheck import CheckResult, CheckStatus, HttpProbe

pytestmark = pytest.mark.timeout(30)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BUSY = b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"


class Counting:
    """Counts accepted connections; ``answers[n]`` is what connection n (from 1) sends to each
    request, in turn (the last one repeats)."""

    def __init__(self, *answers: list[bytes]) -> None:
        self.answers = answers
        self.accepted = 0

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        script = self.answers[min(self.accepted, len(self.answers)) - 1]
        i = 0
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(script[min(i, len(script) - 1)])
            await writer.drain()
            i += 1


# -- 1. a failing check's connection is kept ------------------------------------------------


def test_a_failing_checks_connection_is_not_kept_for_the_next_check() -> None:
    """Contract: "a *passing* check's connection is kept". A 503 that says keep-alive is a
    failing check; the next check must connect anew (accepted == 2)."""
    srv = Counting([BUSY])

    async def body() -> list[CheckResult]:
        async with raw_server(srv.handler) as port:
            probe = HttpProbe(timeout_s=1, reuse_connection=True)
            try:
                first = await probe.run(LOOPBACK, port)
                await asyncio.sleep(0.02)
                second = await probe.run(LOOPBACK, port)
            finally:
                probe.close()
            return [first, second]

    results = run(body())
    assert [r.status for r in results] == [CheckStatus.L7_STATUS] * 2
    assert srv.accepted == 2, "the 503 check's connection was reused by the next check"


def test_a_failing_backend_does_not_pass_on_a_connection_its_listener_no_longer_offers() -> None:
    """Why it matters: the backend answers 503 (it is going DOWN), then stops listening while
    the connection it already accepted starts answering 200. The documented price of reuse
    ("answers on an old connection but accepts no new ones passes") is only paid for a
    connection kept from a *passing* check; here the check after a failure must meet the
    dead listener (L4_REFUSED), not the kept connection."""

    async def body() -> CheckResult:
        srv = Counting([BUSY, OK])
        server = await asyncio.start_server(srv.handler, LOOPBACK, 0)
        port = int(server.sockets[0].getsockname()[1])
        probe = HttpProbe(timeout_s=1, reuse_connection=True)
        try:
            assert (await probe.run(LOOPBACK, port)).status is CheckStatus.L7_STATUS
            server.close()  # the listener is gone; the accepted connection lives on
            return await probe.run(LOOPBACK, port)
        finally:
            probe.close()

    result = run(body())
    assert result.status is CheckStatus.L4_REFUSED, result


# -- 2. reuse_connection changes the verdict of a 101 -------------------------------------

UPGRADE = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"


@pytest.mark.parametrize(
    ("expect_status", "want"),
    [(((101, 101),), CheckStatus.L7_OK), (((200, 399),), CheckStatus.L7_STATUS)],
)
def test_reuse_connection_does_not_change_the_verdict_of_an_upgrade(
    expect_status: tuple[tuple[int, int], ...], want: CheckStatus
) -> None:
    """CheckSpec.tested(): reuse_connection "only [changes] whether a passing check's
    connection is kept", so a reload toggling it keeps the counter. The same 101 response
    must then get the same verdict with reuse on as with reuse off."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(UPGRADE)
        await writer.drain()
        await reader.read()

    async def body() -> tuple[CheckResult, CheckResult]:
        async with raw_server(serve) as port:
            off = await HttpProbe(timeout_s=1, expect_status=expect_status).run(LOOPBACK, port)
            probe = HttpProbe(timeout_s=1, expect_status=expect_status, reuse_connection=True)
            try:
                on = await probe.run(LOOPBACK, port)
            finally:
                probe.close()
            return off, on

    off, on = run(body())
    assert off.status is want
    assert (on.status, on.code) == (off.status, off.code), (off, on)


# -- 3. a host name is pinned to the address of its kept connection ------------------------


def test_a_host_name_is_checked_at_the_address_it_resolves_to_now(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/configuration.md: a backend host name "is resolved at connect time" (the data
    plane's new connections follow DNS). The name moves from a healthy server to an address
    that refuses; the check must see the refusal, as it does without reuse. With reuse the
    kept connection is reused as long as checks keep passing (IDLE_MAX_S bounds idle time,
    not age), so the old server is checked forever."""
    srv = Counting([OK])

    async def body() -> tuple[CheckResult, CheckResult]:
        loop = asyncio.get_running_loop()
        where: dict[str, int] = {}

        async def getaddrinfo(host: str, port: int, **kw: Any) -> list[Any]:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (LOOPBACK, where["port"]))]

        monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
        async with raw_server(srv.handler) as healthy:
            with refused_port() as gone:
                where["port"] = healthy
                probe = HttpProbe(timeout_s=1, reuse_connection=True)
                try:
                    assert (await probe.run("app.internal", 8080)).ok
                    where["port"] = gone  # DNS now points elsewhere
                    fresh = await HttpProbe(timeout_s=1).run("app.internal", 8080)
                    reused = await probe.run("app.internal", 8080)
                finally:
                    probe.close()
                return fresh, reused

    fresh, reused = run(body())
    assert fresh.status is CheckStatus.L4_REFUSED
    assert reused.status is CheckStatus.L4_REFUSED, reused
