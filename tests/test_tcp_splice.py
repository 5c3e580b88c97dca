"""TCP mode's splice(2) path (lb.data.tcpproxy._SplicePipe) and the transport path it starts
on and falls back to, held to the same behaviour: every test runs on asyncio and on uvloop
(what the workers run), spliced from the first chunk on (``SPLICE_AFTER = 0``), moved to
splice mid-stream (after 256 KiB), and never spliced (``tcpproxy.SPLICE``;
``PAIRLB_TCP_SPLICE=0`` in a worker). Real sockets on 127.0.0.1: large transfers both ways,
half-close either way, backpressure from a slow reader on either side, a backend that
resets or closes mid-transfer, the access log's bytes in/out, what is left open afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from proxy_helpers import Proxy, start_proxy, stop_proxy, wait_for

from lb.data import tcpproxy
from lb.data.accesslog import AccessLog

pytestmark = pytest.mark.timeout(120)

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
MiB = 1024 * 1024


@pytest.fixture(params=["splice", "switch", "transport"])
def splice(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    on = request.param != "transport"
    if on and not hasattr(os, "splice"):
        pytest.skip("no os.splice here")
    monkeypatch.setattr(tcpproxy, "SPLICE", on)
    monkeypatch.setattr(tcpproxy, "SPLICE_AFTER", 0 if request.param == "splice" else 256 * 1024)
    if request.param == "switch":  # the ticker moves a pipe: tick often, at any rate
        monkeypatch.setattr(tcpproxy, "SPLICE_RATE", 0)
        monkeypatch.setattr(tcpproxy.TcpProxyServer, "tick_interval", lambda self: 0.005)
    return on


@pytest.fixture
def splice_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test of the splice path itself (whatever PAIRLB_TCP_SPLICE says)."""
    if not hasattr(os, "splice"):
        pytest.skip("no os.splice here")
    monkeypatch.setattr(tcpproxy, "SPLICE", True)
    monkeypatch.setattr(tcpproxy, "SPLICE_AFTER", 0)


@pytest.fixture(params=sorted(LOOPS))
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def run_on(loop: str, coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(main())


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def backend(handle: Handler) -> AsyncIterator[str]:
    """A TCP server running ``handle`` per connection; yields its address."""
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    finally:
        srv.close()


@contextlib.asynccontextmanager
async def proxy(address: str, log: Path | None = None, **kw: Any) -> AsyncIterator[Proxy]:
    px = await start_proxy([("b", address)], mode="tcp", **kw)
    if log is not None:
        px.server.alog = AccessLog(str(log), flush_interval=0.01)
    try:
        yield px
    finally:
        await stop_proxy(px)


async def log_lines(px: Proxy, path: Path) -> list[dict[str, Any]]:
    """The access log's records so far (the log is closed)."""
    alog = px.server.alog
    assert alog is not None
    assert await alog.aclose(5.0)
    return [json.loads(x) for x in path.read_bytes().splitlines()]  # noqa: ASYNC240


def pipe_kind(px: Proxy) -> type:
    (p,) = px.server.clients
    return type(p)


def expect_kind(px: Proxy, splice: bool) -> None:
    assert pipe_kind(px) is (tcpproxy._SplicePipe if splice else tcpproxy._Pipe)


def reset(w: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0)."""
    w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                          struct.pack("ii", 1, 0))
    w.transport.abort()


async def send_all(w: asyncio.StreamWriter, data: bytes, eof: bool = True,
                   pause_at: int = 0, until: Callable[[], bool] | None = None) -> None:
    """Write ``data`` in 256 KiB chunks; at ``pause_at`` bytes, wait for ``until`` first."""
    view = memoryview(data)
    for i in range(0, len(data), 256 * 1024):
        if until is not None and i == pause_at:
            await wait_for(until, 20)
        w.write(view[i:i + 256 * 1024])
        await w.drain()
    if eof:
        w.write_eof()


def digest(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- tests -----------------------------------------------------------------------------------


def test_large_transfers_both_ways_at_once(loop: str, splice: bool, tmp_path: Path) -> None:
    """32 MiB up and 48 MiB down on one connection, concurrently, then each side's EOF.

    Moved to splice mid-stream: both senders wait after their first MiB until the move is
    made (with bytes still flowing both ways, the transports are seldom both empty at a
    tick: the move is opportunistic, see _SplicePipe; a full suite once saw none in 80 MiB).
    """
    up, down = os.urandom(32 * MiB), os.urandom(48 * MiB)
    got_up: list[bytes] = []
    pxs: list[Proxy] = []

    def moved() -> bool:
        return not splice or pxs[0].server.spliced == 1

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        sender = asyncio.create_task(send_all(w, down, pause_at=MiB, until=moved))
        got_up.append(await r.read(-1))
        await sender
        w.close()

    async def scenario() -> None:
        async with backend(handle) as addr, proxy(addr, tmp_path / "a.log") as px:
            pxs.append(px)
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            await wait_for(lambda: len(px.server.clients) == 1)
            expect_kind(px, splice)
            sender = asyncio.create_task(send_all(w, up, pause_at=MiB, until=moved))
            got_down = await asyncio.wait_for(r.read(-1), 60)
            await sender
            w.close()
            await wait_for(lambda: not px.server.clients)
            assert digest(got_down) == digest(down)
            assert digest(got_up[0]) == digest(up)
            assert px.server.spliced == int(splice)
            snap = px.stats.snapshot()["tcp"]["p"]["b"]
            assert (snap["bytes_in"], snap["bytes_out"]) == (len(up), len(down))
            (line,) = await log_lines(px, tmp_path / "a.log")
            assert (line["bytes_in"], line["bytes_out"]) == (len(up), len(down))
            assert line["termination"] == "--", line
            assert line["backend"] == "b" and line["mode"] == "tcp"

    run_on(loop, scenario())


def test_client_half_close_keeps_the_answer_coming(loop: str, splice: bool) -> None:
    """The client's EOF reaches the backend, which answers after it (4 MiB)."""
    answer = os.urandom(4 * MiB)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read(-1)  # until the client's EOF
        w.write(digest(data).encode() + b"\n")
        await send_all(w, answer)
        w.close()

    async def scenario() -> None:
        async with backend(handle) as addr, proxy(addr) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            payload = os.urandom(3 * MiB + 17)
            await send_all(w, payload)
            line = await asyncio.wait_for(r.readline(), 20)
            assert line.strip().decode() == digest(payload)
            rest = await asyncio.wait_for(r.read(-1), 20)
            assert digest(rest) == digest(answer)
            w.close()
            await wait_for(lambda: not px.server.clients)

    run_on(loop, scenario())


def test_backend_half_close_keeps_the_upload_going(loop: str, splice: bool) -> None:
    """The backend says its piece and half-closes; the client still uploads, then ends."""
    got: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"hello, then nothing more")
        w.write_eof()
        got.append(await r.read(-1))
        w.close()

    async def scenario() -> None:
        async with backend(handle) as addr, proxy(addr) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            assert await asyncio.wait_for(r.read(-1), 10) == b"hello, then nothing more"
            upload = os.urandom(5 * MiB)
            await send_all(w, upload)
            await wait_for(lambda: bool(got), 20)
            assert digest(got[0]) == digest(upload)
            await wait_for(lambda: not px.server.clients)
            w.close()

    run_on(loop, scenario())


def test_a_slow_client_holds_the_backend_back(loop: str, splice: bool) -> None:
    """64 MiB down to a client that reads nothing for a while: the backend cannot write it
    all (nothing piles up in the proxy beyond kernel buffers), and every byte arrives."""
    down = os.urandom(64 * MiB)
    sent = [0]

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        view = memoryview(down)
        for i in range(0, len(down), 256 * 1024):
            w.write(view[i:i + 256 * 1024])
            await w.drain()
            sent[0] = i + 256 * 1024
        w.close()

    async def scenario() -> None:
        async with backend(handle) as addr, proxy(addr) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            await asyncio.sleep(1.0)
            stalled = sent[0]
            await asyncio.sleep(0.3)
            assert sent[0] == stalled, "the backend kept writing to a client that reads nothing"
            assert stalled < 48 * MiB, stalled
            got = await asyncio.wait_for(r.read(-1), 60)
            assert digest(got) == digest(down)
            w.close()
            assert px.server.spliced == int(splice)
            await wait_for(lambda: not px.server.clients)

    run_on(loop, scenario())


def test_a_slow_backend_holds_the_client_back(loop: str, splice: bool) -> None:
    """64 MiB up to a backend that reads nothing for a while: the client's writes stall."""
    up = os.urandom(64 * MiB)
    got: list[bytes] = []

    async def scenario() -> None:
        start = asyncio.Event()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            await start.wait()
            got.append(await r.read(-1))
            w.close()

        async with backend(handle) as addr, proxy(addr) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            written = 0
            view = memoryview(up)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.5):
                    while written < len(up):
                        w.write(view[written:written + 256 * 1024])
                        written += 256 * 1024  # (written, even if the drain times out)
                        await w.drain()
            assert written < 48 * MiB, written
            start.set()
            w.write(view[written:])
            await w.drain()
            w.write_eof()
            await wait_for(lambda: bool(got), 60)
            assert digest(got[0]) == digest(up)
            assert px.server.spliced == int(splice)
            assert await asyncio.wait_for(r.read(-1), 10) == b""
            w.close()
            await wait_for(lambda: not px.server.clients)

    run_on(loop, scenario())


def test_backend_reset_mid_transfer(loop: str, splice: bool, tmp_path: Path) -> None:
    """The backend sends 1 MiB and resets: the client gets what came before (or a reset),
    the connection ends, the log says SD with the bytes counted."""
    part = os.urandom(MiB)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(5)
        await send_all(w, part, eof=False)
        await asyncio.sleep(0.2)
        reset(w)

    async def scenario() -> None:
        async with backend(handle) as addr, proxy(addr, tmp_path / "a.log") as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.write(b"hello")
            got = b""
            with contextlib.suppress(ConnectionError):
                while chunk := await asyncio.wait_for(r.read(65536), 10):
                    got += chunk
            assert part.startswith(got)
            w.close()
            await wait_for(lambda: not px.server.clients)
            (line,) = await log_lines(px, tmp_path / "a.log")
            assert line["termination"] == "SD", line
            assert (line["bytes_in"], line["bytes_out"]) == (5, len(part))

    run_on(loop, scenario())


def test_backend_dies_during_an_upload(loop: str, splice: bool) -> None:
    """The backend closes while the client is still sending: the client's connection ends
    (reset or EOF), nothing is left open."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readexactly(MiB)
        reset(w)

    async def scenario() -> None:
        async with backend(handle) as addr, proxy(addr) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(20):
                    view = memoryview(os.urandom(16 * MiB))
                    for i in range(0, len(view), 65536):
                        w.write(view[i:i + 65536])
                        await w.drain()
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(r.read(-1), 10) == b""
            w.close()
            await wait_for(lambda: not px.server.clients, 10)
            assert px.in_flight == 0

    run_on(loop, scenario())


def test_client_reset_mid_transfer(loop: str, splice: bool, tmp_path: Path) -> None:
    """The client resets while 32 MiB come down: the backend's connection is closed too."""

    async def scenario() -> None:
        gone = asyncio.Event()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                await send_all(w, os.urandom(32 * MiB))
                await r.read(-1)
            gone.set()
            w.close()

        async with backend(handle) as addr, proxy(addr, tmp_path / "a.log") as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            await r.readexactly(MiB)
            reset(w)
            await asyncio.wait_for(gone.wait(), 10)
            await wait_for(lambda: not px.server.clients)
            (line,) = await log_lines(px, tmp_path / "a.log")
            assert line["bytes_out"] >= MiB

    run_on(loop, scenario())


def test_many_connections_leave_no_descriptor_behind(loop: str, splice: bool) -> None:
    """200 short connections (each both ways, then closed): the process holds no more
    descriptors than before, but for the few kept empty kernel pipes."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.read(-1))
        w.close()

    async def one(port: int) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"x" * 100_000)
        w.write_eof()
        assert len(await r.read(-1)) == 100_000
        w.close()
        await w.wait_closed()

    async def scenario() -> None:
        async with backend(handle) as addr, proxy(addr) as px:
            await one(px.port)
            before = open_fds()
            for _ in range(10):
                await asyncio.gather(*(one(px.port) for _ in range(20)))
            await wait_for(lambda: not px.server.clients)
            await asyncio.sleep(0.1)
            assert open_fds() <= before + 2 * tcpproxy.PIPES_KEPT

    run_on(loop, scenario())


def test_what_the_pipe_holds_still_reaches_the_client_after_the_end(
        loop: str, splice_only: None) -> None:
    """A spliced pipe ended while the client is slow (e.g. the backend's side failed):
    the bytes already taken from the backend are written before the client's socket is
    closed (as a transport's close writes its buffer)."""
    down = os.urandom(32 * MiB)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await send_all(w, down, eof=False)
            await r.read(-1)
        w.close()

    async def scenario() -> None:
        async with backend(handle) as addr, proxy(addr) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            await wait_for(lambda: len(px.server.clients) == 1)
            (pipe,) = px.server.clients
            assert isinstance(pipe, tcpproxy._SplicePipe)
            await wait_for(lambda: pipe.s2c is not None and pipe.s2c.pending > 0, 10)
            pipe.finish()
            assert pipe.lingering
            moved = pipe.bytes_out
            got = await asyncio.wait_for(r.read(-1), 20)
            assert len(got) == moved and down.startswith(got)
            await wait_for(lambda: not pipe.lingering)
            w.close()

    run_on(loop, scenario())


def test_a_client_that_never_reads_is_cut_after_the_idle_timeout(
        loop: str, splice_only: None) -> None:
    """...and the bytes the pipe holds for it do not keep its socket open for ever."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            await send_all(w, os.urandom(32 * MiB), eof=False)
            await r.read(-1)
        w.close()

    async def scenario() -> None:
        async with backend(handle) as addr, proxy(
                addr, listener={"client_idle_timeout_s": 0.3}) as px:
            _, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            await wait_for(lambda: len(px.server.clients) == 1)
            (pipe,) = px.server.clients
            await wait_for(lambda: pipe.s2c is not None and pipe.s2c.pending > 0, 10)
            pipe.finish()
            assert pipe.lingering
            await wait_for(lambda: not pipe.lingering, 3)
            assert pipe.csock is not None and pipe.csock.fileno() == -1
            w.close()

    run_on(loop, scenario())


def test_splice_is_used_only_for_plain_pipes(loop: str, splice_only: None) -> None:
    """SNI routes, an accepted PROXY header, TLS (either side) keep the transport path;
    a PROXY header to send does not."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.read(-1))
        w.close()

    async def kind(**kw: Any) -> type:
        async with backend(handle) as addr, proxy(addr, **kw) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            await wait_for(lambda: len(px.server.clients) == 1)
            k = pipe_kind(px)
            w.write_eof()
            await asyncio.wait_for(r.read(-1), 5)
            w.close()
            return k

    async def scenario() -> None:
        assert await kind() is tcpproxy._SplicePipe
        assert await kind(pool={"send_proxy_protocol": "v2"}) is tcpproxy._SplicePipe
        assert await kind(listener={"accept_proxy_protocol": True,
                                    "trusted_proxies": ["10.0.0.0/8"]}) is tcpproxy._Pipe
        assert await kind(listener={"sni_routes": [{"server_name": "a.test", "pool": "p"}]}
                          ) is tcpproxy._SniPipe

    run_on(loop, scenario())


def test_the_proxy_header_goes_before_the_first_spliced_byte(loop: str, splice: bool) -> None:
    got: list[bytes] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got.append(await r.read(-1))
        w.close()

    async def scenario() -> None:
        async with backend(handle) as addr, proxy(addr, pool={"send_proxy_protocol": "v1"}) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.write(b"payload")
            w.write_eof()
            await asyncio.wait_for(r.read(-1), 5)
            w.close()
            await wait_for(lambda: bool(got))
            port = w.get_extra_info("sockname")[1]
            assert got[0] == (b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\npayload"
                              % (port, px.port))

    run_on(loop, scenario())


def test_connect_failures_are_retried_on_another_backend(loop: str, splice: bool,
                                                         tmp_path: Path) -> None:
    """A refused connect and one that times out (a backend whose accept queue is full
    drops the SYN) are retried on the next backend; the log names the reason."""

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"alive:" + await r.read(-1))
        w.close()

    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    stuck = [socket.create_connection(full.getsockname(), timeout=5)]  # the queue is full
    refused = socket.socket()
    refused.bind(("127.0.0.1", 0))  # bound, never listening: refused

    async def scenario() -> None:
        async with backend(handle) as addr:
            px = await start_proxy(
                [("refused", f"127.0.0.1:{refused.getsockname()[1]}"),
                 ("full", f"127.0.0.1:{full.getsockname()[1]}"), ("b", addr)],
                mode="tcp", pool={"connect_timeout_s": 0.3, "retries": 2})
            px.server.alog = AccessLog(str(tmp_path / "a.log"), flush_interval=0.01)
            try:
                r, w = await asyncio.open_connection("127.0.0.1", px.port)
                w.write(b"x")
                w.write_eof()
                assert await asyncio.wait_for(r.read(-1), 10) == b"alive:x"
                w.close()
                await wait_for(lambda: not px.server.clients)
                retries = px.stats.snapshot()["retries"]["p"]
                assert retries["connect_refused"] == 1 and retries["connect_timeout"] == 1
                (line,) = await log_lines(px, tmp_path / "a.log")
                assert (line["backend"], line["retries"]) == ("b", 2), line
            finally:
                await stop_proxy(px)

    try:
        run_on(loop, scenario())
    finally:
        for s in (full, refused, *stuck):
            s.close()


def test_only_bulk_connections_move_to_splice(loop: str, splice_only: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A short exchange, and a slow trickle past SPLICE_AFTER, stay on the transports; a
    bulk download moves (the ticker's look, here every 50 ms)."""
    monkeypatch.setattr(tcpproxy, "SPLICE_AFTER", 64 * 1024)
    monkeypatch.setattr(tcpproxy.TcpProxyServer, "tick_interval", lambda self: 0.05)

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    async def scenario() -> None:
        async with backend(echo) as addr, proxy(addr) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.write(b"x" * 30_000)
            await r.readexactly(30_000)
            await asyncio.sleep(0.2)
            assert px.server.spliced == 0  # short: under SPLICE_AFTER
            msg = os.urandom(1024)
            for _ in range(60):  # ~120 KiB both ways at ~100 KiB/s: under SPLICE_RATE
                w.write(msg)
                assert await r.readexactly(1024) == msg
                await asyncio.sleep(0.02)
            assert px.server.spliced == 0
            bulk = os.urandom(64 * MiB)
            sender = asyncio.create_task(send_all(w, bulk))
            got = await asyncio.wait_for(r.read(-1), 60)
            await sender
            assert digest(got) == digest(bulk)
            assert px.server.spliced == 1
            w.close()

    run_on(loop, scenario())
