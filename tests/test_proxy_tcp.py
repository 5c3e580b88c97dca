"""TCP mode: bytes piped both ways, balanced, retried on connect failure, half-close, idle."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections import Counter

import pytest
from proxy_helpers import free_port, run, start_proxy, stop_proxy, wait_for

pytestmark = pytest.mark.timeout(60)


class TcpBackend:
    """Says its name on connect, then echoes; answers EOF with a byte count and closes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> TcpBackend:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            w.write(self.name.encode() + b"\n")
            n = 0
            try:
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    n += len(data)
                    w.write(data)
                    await w.drain()
                w.write(b"\nbytes=%d\n" % n)  # after the client's EOF: half-close works
                await w.drain()
            except ConnectionError:
                pass
            finally:
                w.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def talk(port: int, payload: bytes) -> tuple[bytes, bytes]:
    """Send ``payload``, half-close, read everything; return (greeting, rest)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    greeting = await r.readline()

    async def writer() -> None:
        for i in range(0, len(payload), 65536):
            w.write(payload[i : i + 65536])
            await w.drain()
        w.write_eof()

    task = asyncio.create_task(writer())
    rest = await r.read(-1)
    await task
    w.close()
    return greeting, rest


def test_bytes_piped_both_ways_with_half_close() -> None:
    async def scenario() -> None:
        be = await TcpBackend("t1").start()
        px = await start_proxy([("t1", be.address)], mode="tcp")
        payload = os.urandom(8 * 1024 * 1024)
        greeting, rest = await talk(px.port, payload)
        assert greeting == b"t1\n"
        echoed, _, tail = rest.rpartition(b"\nbytes=")
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        assert tail == b"%d\n" % len(payload)
        await wait_for(lambda: px.in_flight == 0)
        snap = px.stats.snapshot()
        assert snap["tcp"]["p"]["t1"]["connections"] == 1
        assert snap["tcp"]["p"]["t1"]["bytes_in"] == len(payload)
        await stop_proxy(px)
        await be.stop()

    run(scenario())


def test_weighted_balancing_of_connections() -> None:
    async def scenario() -> None:
        bes = [await TcpBackend(n).start() for n in ("a", "b", "c")]
        px = await start_proxy([("a", bes[0].address, 1), ("b", bes[1].address, 2),
                                ("c", bes[2].address, 1)], mode="tcp")
        seen = Counter()
        for _ in range(40):
            greeting, _ = await talk(px.port, b"x")
            seen[greeting.strip().decode()] += 1
        assert seen == {"a": 10, "b": 20, "c": 10}
        await stop_proxy(px)
        for b in bes:
            await b.stop()

    run(scenario())


def test_connect_failure_retried_on_another_backend() -> None:
    async def scenario() -> None:
        be = await TcpBackend("alive").start()
        px = await start_proxy([("dead", f"127.0.0.1:{free_port()}"), ("alive", be.address)],
                               mode="tcp")
        for _ in range(6):
            greeting, rest = await talk(px.port, b"hello")
            assert greeting == b"alive\n" and rest.startswith(b"hello")
        assert px.stats.snapshot()["retries"]["p"]["connect_refused"] >= 1
        # Every backend dead: the client connection is closed, nothing hangs.
        px2 = await start_proxy([("d1", f"127.0.0.1:{free_port()}")], mode="tcp")
        r, w = await asyncio.open_connection("127.0.0.1", px2.port)
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        await wait_for(lambda: px.in_flight == 0 and px2.in_flight == 0)
        await stop_proxy(px)
        await stop_proxy(px2)
        await be.stop()

    run(scenario())


def test_idle_timeout_closes_both_sides() -> None:
    async def scenario() -> None:
        be = await TcpBackend("t1").start()
        px = await start_proxy([("t1", be.address)], mode="tcp",
                               listener={"client_idle_timeout_s": 0.3})
        r, w = await asyncio.open_connection("127.0.0.1", px.port)
        assert await r.readline() == b"t1\n"
        w.write(b"ping")
        assert await r.readexactly(4) == b"ping"
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(r.readexactly(1), 3)
        assert 0.2 < loop.time() - t0 < 2.0
        w.close()
        await wait_for(lambda: px.in_flight == 0 and not px.server.clients)  # type: ignore[union-attr]
        await stop_proxy(px)
        await be.stop()

    run(scenario())


def test_client_early_data_before_backend_connects_is_delivered() -> None:
    async def scenario() -> None:
        be = await TcpBackend("t1").start()
        px = await start_proxy([("t1", be.address)], mode="tcp")
        r, w = await asyncio.open_connection("127.0.0.1", px.port)
        w.write(b"early")  # before the proxy has its backend connection
        w.write_eof()
        data = await asyncio.wait_for(r.read(), 5)
        assert data == b"t1\nearly\nbytes=5\n"
        w.close()
        await stop_proxy(px)
        await be.stop()

    run(scenario())


def test_drain_waits_for_open_connections() -> None:
    async def scenario() -> None:
        be = await TcpBackend("t1").start()
        px = await start_proxy([("t1", be.address)], mode="tcp")
        r, w = await asyncio.open_connection("127.0.0.1", px.port)
        await r.readline()
        drain = asyncio.create_task(px.server.drain(0.3))
        await asyncio.sleep(0.1)
        w.write(b"still here")
        assert await r.readexactly(10) == b"still here"
        assert await drain == 1  # cut at the deadline
        w.close()
        await stop_proxy(px)
        await be.stop()

    run(scenario())
