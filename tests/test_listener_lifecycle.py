"""The listener lifecycle both engines share (lb.data.listener): a tick that raises is
logged under the engine's own event name and the ticking goes on; max_connections pauses
accepting and resumes it; drain ends what is still open."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from proxy_helpers import run, start_proxy, stop_proxy, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("mode,event", [("http", "proxy_tick_failed"),
                                        ("tcp", "tcp_tick_failed")])
def test_a_failing_tick_is_logged_and_ticking_goes_on(
    mode: str, event: str, caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        px = await start_proxy([("a", "127.0.0.1:9")], mode=mode)
        calls = 0

        def boom() -> float:
            nonlocal calls
            calls += 1
            raise RuntimeError("tick")

        # The tick's clock is an attribute: compiled code calls what it holds (a method
        # replaced on the instance would not be called), and each engine logs its own event
        # (TcpProxyServer is interpreted: its class attribute must win over the base's).
        px.server.time = boom
        try:
            with caplog.at_level(logging.ERROR):
                await wait_for(lambda: calls >= 2, timeout_s=5.0)
        finally:
            await stop_proxy(px)

    run(main())
    assert f"event={event} listener=l" in caplog.text


@pytest.mark.parametrize("mode,cut", [("http", 0), ("tcp", 1)])
def test_max_connections_pauses_then_resumes_and_drain_ends_the_rest(mode: str, cut: int) -> None:
    """Drain closes an idle HTTP client cleanly (nothing cut); a TCP pipe has no request
    boundary, so one still open at the deadline is cut and counted."""

    async def main() -> None:
        async def hold(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.read()  # a backend that keeps its connections open
            w.close()

        backend = await asyncio.start_server(hold, "127.0.0.1", 0)
        bport = backend.sockets[0].getsockname()[1]
        px = await start_proxy([("a", f"127.0.0.1:{bport}")], mode=mode,
                               listener={"max_connections": 1, "client_idle_timeout_s": 30})
        srv = px.server
        held = socket.create_connection(("127.0.0.1", px.port))
        again: socket.socket | None = None
        try:
            await wait_for(lambda: len(srv.clients) == 1, timeout_s=5.0)
            assert srv._server is None  # paused: the next one waits in the shared backlog
            held.close()
            await wait_for(lambda: srv._server is not None and not srv.clients, timeout_s=5.0)
            again = socket.create_connection(("127.0.0.1", px.port))
            await wait_for(lambda: len(srv.clients) == 1, timeout_s=5.0)
            assert await srv.drain(0.2) == cut
            assert not srv.clients and srv._server is None
        finally:
            held.close()
            if again is not None:
                again.close()
            await stop_proxy(px)
            backend.close()

    run(main())


@pytest.mark.parametrize("mode", ["http", "tcp"])
def test_helping_a_slot_accepts_there_and_a_failed_open_is_logged(
    mode: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """set_help opens a server on another slot's socket (a connection queued there is
    served), closes it when left out, and an open that fails (EMFILE, a closed socket) is
    logged with the listener and slot instead of dying in an unread task."""

    async def main() -> None:
        px = await start_proxy([("a", "127.0.0.1:9")], mode=mode)
        srv = px.server
        other = socket.socket()
        other.bind(("127.0.0.1", 0))
        other.listen(8)
        other.setblocking(False)
        gone = socket.socket()
        gone.close()
        try:
            srv.set_help({1: other})
            await wait_for(lambda: 1 in srv._help_servers, timeout_s=5.0)
            c = socket.create_connection(other.getsockname(), timeout=5)
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

            def answer() -> bytes:  # 502 (http) or the pipe closed (tcp): port 9 refuses
                try:
                    return c.recv(100) or b"closed"
                except ConnectionResetError:
                    return b"reset"

            got = await asyncio.to_thread(answer)  # socket.timeout: nobody accepted it
            assert got.startswith(b"HTTP/1.1 502") if mode == "http" else got, got
            c.close()
            with caplog.at_level(logging.ERROR):
                srv.set_help({2: gone})
                await wait_for(lambda: "accept_help_failed" in caplog.text, timeout_s=5.0)
                for _ in range(3):  # asked again and again: tried again, logged once
                    srv.set_help({})
                    srv.set_help({2: gone})
                    await asyncio.sleep(0.05)
            assert caplog.text.count("accept_help_failed") == 1, caplog.text
            assert srv._help_servers == {}  # slot 1 left out: closed; slot 2 never opened
        finally:
            await stop_proxy(px)
            other.close()

    run(main())
    assert "event=accept_help_failed listener=l slot=2" in caplog.text
