"""Review 2: what one stalled peer makes the proxy hold (transport buffer + queued ``out``),
on paths the first review's tests did not measure: a re-chunked close-delimited download,
a chunked upload to a slow backend, pipelined answers to a stalled client."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from typing import Any

import pytest
import uvloop
from proxy_helpers import start_proxy, stop_proxy

import lb
from lb.data import proxy as P

pytestmark = pytest.mark.timeout(120)
LOOPS = pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
BOUND = 1 << 20


def run_on(loop_kind: str, coro: Any) -> Any:
    async def main() -> Any:
        return await coro

    return uvloop.run(main()) if loop_kind == "uvloop" else asyncio.run(main())


def held(c: Any) -> int:
    t = c.transport
    return (t.get_write_buffer_size() if t is not None else 0) + c.nout


async def close10_backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        await r.readuntil(b"\r\n\r\n")
        w.write(b"HTTP/1.0 200 OK\r\n\r\n")
        chunk = b"x" * (1 << 20)
        for _ in range(20):
            w.write(chunk)
            await w.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    w.close()


async def pipelined_backend(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while True:
            await r.readuntil(b"\r\n\r\n")
            n = 100_000  # between WRITE_LATER_BYTES and WRITE_NOW_BYTES
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n + b"p" * n)
            await w.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    w.close()


async def _stalled_client(loop_kind: str, handler: Any, request: bytes, what: str) -> None:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    px = await start_proxy([("a", f"127.0.0.1:{port}")])
    s = px.server
    assert isinstance(s, P.ProxyServer)
    c = socket.create_connection(("127.0.0.1", px.port))
    try:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        c.sendall(request)
        peak = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:
            await asyncio.sleep(0.002)
            for cl in list(s.clients):
                peak = max(peak, held(cl))
        print(f"compiled={lb.compiled_in_use()} {loop_kind} {what}: peak held {peak} bytes")
        assert peak <= BOUND, f"{loop_kind}: {peak} bytes held for one client ({what})"
    finally:
        c.close()
        await stop_proxy(px)
        srv.close()


@LOOPS
def test_review2_rechunked_close_delimited_stalled_download(loop_kind: str) -> None:
    run_on(loop_kind, _stalled_client(
        loop_kind, close10_backend, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "rechunked"))


@LOOPS
def test_review2_pipelined_answers_to_a_stalled_client(loop_kind: str) -> None:
    reqs = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 60
    run_on(loop_kind, _stalled_client(loop_kind, pipelined_backend, reqs, "pipelined"))


class _SlowReader(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.t.pause_reading()
        asyncio.get_running_loop().call_later(0.05, self._resume)

    def _resume(self) -> None:
        if not self.t.is_closing():
            self.t.resume_reading()


CHUNKED_UPLOADER = """
import socket, sys
c = socket.socket()
c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
c.connect(("127.0.0.1", int(sys.argv[1])))
c.sendall(b"POST /u HTTP/1.1\\r\\nHost: x\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n")
piece = b"%x\\r\\n" % (1 << 20) + b"y" * (1 << 20) + b"\\r\\n"
for _ in range(64):
    c.sendall(piece)
"""


@LOOPS
def test_review2_chunked_upload_to_a_slow_backend(loop_kind: str) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(_SlowReader, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        px = await start_proxy([("a", f"127.0.0.1:{port}")])
        s = px.server
        assert isinstance(s, P.ProxyServer)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CHUNKED_UPLOADER,
                                                    str(px.port))
        try:
            peak = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < 3.0:
                await asyncio.sleep(0.002)
                for u in list(s.upstreams):
                    peak = max(peak, held(u))
            print(f"compiled={lb.compiled_in_use()} {loop_kind} chunked upload: "
                  f"peak held {peak} bytes")
            assert peak <= BOUND, f"{loop_kind}: {peak} bytes held for one upload"
        finally:
            proc.kill()
            await proc.wait()
            await stop_proxy(px)
            srv.close()

    run_on(loop_kind, scenario())
