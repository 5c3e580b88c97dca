"""Streaming with backpressure: bodies are never buffered whole.

The big test pushes 1 GiB up (Content-Length) and 1 GiB down (chunked, re-chunked by the
proxy) through a proxy running in its own process and checks its peak RSS grew by a few
MiB, not by a GiB. The others watch the proxy's own buffers while one side is slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest
from aiohttp import web
from proxy_helpers import (
    CountingBackend,
    RawClient,
    aiohttp_backend,
    rss_kib,
    run,
    spawn_proxy,
    start_proxy,
    stop_proxy,
    wait_for,
)

GIB = 1 << 30
MIB = 1 << 20


def stream_app(total: int) -> web.Application:
    app = web.Application()
    block = os.urandom(MIB)

    async def down(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        while sent < total:
            n = min(MIB, total - sent)
            await resp.write(block[:n])
            sent += n
        await resp.write_eof()
        return resp

    app.router.add_get("/down", down)
    return app


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_gib_each_way_in_bounded_memory() -> None:
    async def scenario() -> None:
        be = await CountingBackend("up").start()
        be.keep_bodies = False
        runner, port = await aiohttp_backend(stream_app(GIB))
        proc, pport = await spawn_proxy([("up", be.address), ("down", f"127.0.0.1:{port}")])
        try:
            base = rss_kib(proc.pid)
            # Up: 1 GiB with Content-Length, written as fast as the proxy lets us.
            c = await RawClient.connect(pport)
            await c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % GIB)
            block = os.urandom(MIB)
            for _ in range(GIB // MIB):
                c.writer.write(block)
                await c.writer.drain()
            r = await c.response(timeout_s=60)
            assert r.status == 200
            assert be.body_bytes == GIB
            await c.close()
            # Down: 1 GiB chunked from the backend, re-chunked by the proxy.
            got = 0
            for _ in range(4):  # round robin: find the streaming backend
                c = await RawClient.connect(pport)
                await c.send(b"GET /down HTTP/1.1\r\nHost: a\r\n\r\n")
                head = await c.reader.readuntil(b"\r\n\r\n")
                if b"transfer-encoding: chunked" in head.lower():
                    while True:
                        data = await c.reader.read(MIB)
                        if not data:
                            break
                        got += len(data)
                        if data.endswith(b"0\r\n\r\n") and got > GIB:
                            break
                    await c.close()
                    break
                await c.close()
            assert got > GIB  # the body plus chunk framing
            peak = rss_kib(proc.pid, "VmHWM")
            grown_mib = (peak - base) / 1024
            print(f"proxy RSS: start {base / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB")
            assert grown_mib < 48, f"proxy grew {grown_mib:.1f} MiB moving 2 GiB"
        finally:
            proc.kill()
            await proc.wait()
            await runner.cleanup()
            await be.stop()

    run(scenario())


@pytest.mark.timeout(60)
def test_slow_client_bounds_proxy_buffer_and_stalls_backend() -> None:
    async def scenario() -> None:
        total = 64 * MIB
        runner, port = await aiohttp_backend(stream_app(total))
        px = await start_proxy([("down", f"127.0.0.1:{port}")])
        c = await RawClient.connect(px.port)
        await c.send(b"GET /down HTTP/1.1\r\nHost: a\r\n\r\n")
        await c.reader.readuntil(b"\r\n\r\n")
        peak = 0
        got = 0
        server = px.server
        while got < total:
            data = await c.reader.read(64 * 1024)
            if not data:
                break
            got += len(data)
            await asyncio.sleep(0.0005)  # a slow reader
            for cl in server.clients:  # type: ignore[union-attr]
                if cl.transport is not None and not cl.closed:
                    peak = max(peak, cl.transport.get_write_buffer_size())
        assert got >= total
        # The proxy holds at most its write-buffer high-water mark plus one read.
        assert peak < 2 * MIB, peak
        await c.close()
        await stop_proxy(px)
        await runner.cleanup()

    run(scenario())


@pytest.mark.timeout(60)
def test_slow_backend_bounds_proxy_buffer_and_stalls_client() -> None:
    async def scenario() -> None:
        be = await CountingBackend("slow").start()
        be.keep_bodies = False
        be.read_delay_s = 0.002
        px = await start_proxy([("slow", be.address)])
        c = await RawClient.connect(px.port)
        total = 32 * MIB
        await c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        block = b"z" * (256 * 1024)
        peak = 0
        for _ in range(total // len(block)):
            c.writer.write(b"%x\r\n%b\r\n" % (len(block), block))
            await c.writer.drain()
            for up in px.server.upstreams:  # type: ignore[union-attr]
                if up.transport is not None and not up.closed:
                    peak = max(peak, up.transport.get_write_buffer_size())
        await c.send(b"0\r\n\r\n")
        r = await c.response(timeout_s=30)
        assert r.status == 200 and be.body_bytes == total
        assert peak < 2 * MIB, peak
        await c.close()
        await stop_proxy(px)
        await be.stop()

    run(scenario())


@pytest.mark.timeout(60)
def test_client_disconnect_mid_download_releases_everything() -> None:
    async def scenario() -> None:
        runner, port = await aiohttp_backend(stream_app(256 * MIB))
        px = await start_proxy([("down", f"127.0.0.1:{port}")])
        for _ in range(3):
            c = await RawClient.connect(px.port)
            await c.send(b"GET /down HTTP/1.1\r\nHost: a\r\n\r\n")
            await c.reader.readuntil(b"\r\n\r\n")
            await c.reader.read(MIB)
            c.writer.transport.abort()
        await wait_for(lambda: not px.in_flight and not px.server.upstreams, 5)  # type: ignore[union-attr]
        await stop_proxy(px)
        with contextlib.suppress(Exception):
            await runner.cleanup()

    run(scenario())
