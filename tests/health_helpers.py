"""Loopback servers for the healthcheck tests: real aiohttp apps, raw asyncio servers that
misbehave, a refused port and a port whose accept queue is full (connects hang).

Everything binds 127.0.0.1 only. Imports nothing from lb or failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")

LOOPBACK = "127.0.0.1"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one async test body on a fresh event loop (the project has no pytest-asyncio)."""
    return asyncio.run(coro)


@contextlib.asynccontextmanager
async def aiohttp_server(app: web.Application) -> AsyncIterator[int]:
    """Serve ``app`` on 127.0.0.1:<free port>; yields the port."""
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    try:
        assert runner.addresses
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def raw_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A plain asyncio TCP server on 127.0.0.1 (for responses aiohttp would never send)."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the probe closes as soon as it has its verdict
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, LOOPBACK, 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port that answers SYN with RST: bound (so nobody else takes it) but not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((LOOPBACK, 0))
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


@contextlib.contextmanager
def full_backlog_port() -> Iterator[int]:
    """A listening port whose accept queue is full, so Linux drops new SYNs: a connect to it
    hangs, which gives a real L4 timeout without leaving loopback."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((LOOPBACK, 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers: list[socket.socket] = []
    try:
        for _ in range(16):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.settimeout(0.2)
            try:
                filler.connect((LOOPBACK, port))
            except TimeoutError:
                filler.close()
                break  # queue full: the next SYN is dropped too
            fillers.append(filler)
        else:
            raise RuntimeError("accept queue never filled; cannot provoke a connect timeout")
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


class FlipApp:
    """An aiohttp backend whose /healthz answers 200 or 503 as the test decides; it records
    when each check arrived (monotonic) so tests can count probes."""

    def __init__(self) -> None:
        self.healthy = True
        self.hits: list[float] = []
        self.app = web.Application()
        self.app.router.add_get("/healthz", self._health)

    async def _health(self, request: web.Request) -> web.Response:
        self.hits.append(asyncio.get_running_loop().time())
        if self.healthy:
            return web.Response(text="ok")
        return web.Response(status=503, text="unhealthy")


async def wait_for(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.005) -> bool:
    """Poll ``predicate`` until true or ``timeout_s``; returns its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(step_s)
    return True
