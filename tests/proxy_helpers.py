"""Real servers and clients for the proxy engine's tests.

- ``CountingBackend``: a raw asyncio HTTP/1.1 server that records every request it receives
  (method, target, headers, body) and answers according to a ``behaviour`` callable; used
  where a test must prove what did or did not reach a backend.
- ``aiohttp_backend``: an aiohttp app for streaming, chunked, WebSocket and slow answers.
- ``start_proxy``: a ProxyServer (or TcpProxyServer) in this process on 127.0.0.1:0.
- ``http_exchange`` / ``read_response``: a raw-socket client where exact bytes matter.
- ``FakeLoop`` / ``FakeTransport``: the engine without sockets (a loop whose ready callbacks
  the test runs, a transport that keeps what is written).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools
from aiohttp import web

from lab.ports import free_port
from lb.config import ListenerConfig, PoolConfig
from lb.data.pool import Pool, build_pool
from lb.data.proxy import ProxyServer
from lb.data.tcpproxy import TcpProxyServer
from lb.listen import make_listen_socket
from lb.stats import Stats


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    conn_id: int

    def header(self, name: str) -> str | None:
        vals = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(vals) if vals else None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


# A behaviour returns the raw response bytes, or None to close the connection at once,
# or "hang" to never answer.
Behaviour = Callable[["Seen", "CountingBackend"], Any]


def ok_behaviour(seen: Seen, be: CountingBackend) -> bytes:
    body = f"{be.name} {seen.method} {seen.target}\n".encode()
    if seen.method == "HEAD":
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Backend: %s\r\n\r\n%s" % (
        len(body), be.name.encode(), body,
    )


class _BackendConn(asyncio.Protocol):
    def __init__(self, be: CountingBackend) -> None:
        self.be = be
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.hdrs: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.conn_id = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.be.connections += 1
        self.conn_id = self.be.connections
        self.be.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.be.open.discard(self)

    def data_received(self, data: bytes) -> None:
        self.be.bytes_received += len(data)
        if self.be.read_delay_s:
            assert self.transport is not None
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(self.be.read_delay_s, self._resume)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.be.parse_errors.append(repr(exc))
            assert self.transport is not None
            self.transport.close()

    def _resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def on_message_begin(self) -> None:
        self.url = b""
        self.hdrs = []
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.hdrs.append((name, value))

    def on_body(self, body: bytes) -> None:
        if self.be.keep_bodies:
            self.body.append(body)
        self.be.body_bytes += len(body)

    def on_message_complete(self) -> None:
        seen = Seen(
            self.parser.get_method().decode(),
            self.url.decode("latin-1"),
            [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.hdrs],
            b"".join(self.body),
            self.conn_id,
        )
        self.be.requests.append(seen)
        out = self.be.behaviour(seen, self.be)
        assert self.transport is not None
        if out is None:
            self.transport.abort()
        elif out == "hang":
            pass
        elif isinstance(out, tuple) and out[0] == "delay":
            _, delay, data = out
            t = self.transport
            asyncio.get_running_loop().call_later(
                delay, lambda: None if t.is_closing() else t.write(data)
            )
        else:
            self.transport.write(out)
            if self.be.close_after_response:
                self.transport.close()


class CountingBackend:
    """Raw HTTP/1.1 backend on 127.0.0.1 that records every request it receives."""

    def __init__(self, name: str, behaviour: Behaviour = ok_behaviour) -> None:
        self.name = name
        self.behaviour = behaviour
        self.requests: list[Seen] = []
        self.connections = 0
        self.bytes_received = 0
        self.body_bytes = 0
        self.parse_errors: list[str] = []
        self.keep_bodies = True
        self.close_after_response = False
        self.read_delay_s = 0.0
        self.open: set[_BackendConn] = set()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, port: int = 0) -> CountingBackend:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _BackendConn(self), "127.0.0.1", port, reuse_address=True
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill_connections(self) -> None:
        for c in list(self.open):
            if c.transport is not None:
                c.transport.abort()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.kill_connections()
            await self.server.wait_closed()
            self.server = None


async def aiohttp_backend(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


@dataclass
class Proxy:
    server: ProxyServer | TcpProxyServer
    pool: Pool
    pool_cfg: PoolConfig
    listener: ListenerConfig
    stats: Stats
    sock: socket.socket
    port: int
    ejections: list[Any] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return sum(b.in_flight for b in self.pool.backends)


async def start_proxy(
    backends: list[tuple[str, str]] | list[tuple[str, str, int]],
    *,
    mode: str = "http",
    balance: str = "round_robin",
    listener: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
) -> Proxy:
    """A proxy on 127.0.0.1:<free port> in front of ``backends`` ((name, address[, weight]))."""
    bcfg = [
        {"name": b[0], "address": b[1], "weight": b[2] if len(b) > 2 else 1}  # type: ignore[misc]
        for b in backends
    ]
    pool_cfg = PoolConfig.model_validate({"name": "p", "balance": balance, "backends": bcfg,
                                          **(pool or {})})
    lcfg = ListenerConfig.model_validate(
        {"name": "l", "bind": f"127.0.0.1:{free_port()}", "pool": "p", "mode": mode,
         **(listener or {})}
    )
    wpool = build_pool(
        "p", balance,
        [(b.name, *b.host_port, float(b.weight)) for b in pool_cfg.backends],
        consecutive_failures=pool_cfg.passive.consecutive_failures,
        local_eject_s=pool_cfg.passive.eject_s,
        max_eject_percent=pool_cfg.passive.max_eject_percent,
        seed=1,
    )
    stats = Stats()
    sock = make_listen_socket(lcfg)
    port = sock.getsockname()[1]
    proxy = Proxy(None, wpool, pool_cfg, lcfg, stats, sock, port)  # type: ignore[arg-type]
    cls = TcpProxyServer if mode == "tcp" else ProxyServer
    server = cls(lcfg, wpool, pool_cfg, stats, on_ejection=proxy.ejections.append)
    proxy.server = server
    await server.start(sock)
    return proxy


async def stop_proxy(proxy: Proxy) -> None:
    proxy.server.close()
    proxy.sock.close()
    await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def proxy_in_front_of(
    backends: list[CountingBackend], **kw: Any
) -> AsyncIterator[Proxy]:
    proxy = await start_proxy([(b.name, b.address) for b in backends], **kw)
    try:
        yield proxy
    finally:
        await stop_proxy(proxy)


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    http_version: str = "1.1"
    keep_alive: bool = True

    def header(self, name: str) -> str | None:
        vals = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(vals) if vals else None


class _RespCollector:
    def __init__(self) -> None:
        self.done: list[Response] = []
        self.reason = b""
        self.hdrs: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.parser: Any = None
        self.in_msg = False

    def on_message_begin(self) -> None:
        self.reason = b""
        self.hdrs = []
        self.body = []
        self.in_msg = False

    def on_headers_complete(self) -> None:
        # Only a body without Content-Length or chunked framing may end at EOF.
        self.in_msg = not any(
            n.lower() in (b"content-length", b"transfer-encoding") for n, _ in self.hdrs
        )

    def on_status(self, s: bytes) -> None:
        self.reason += s

    def on_header(self, n: bytes, v: bytes) -> None:
        self.hdrs.append((n, v))

    def on_body(self, b: bytes) -> None:
        self.body.append(b)

    def on_message_complete(self) -> None:
        self.in_msg = False
        self.done.append(
            Response(
                self.parser.get_status_code(), self.reason.decode("latin-1"),
                [(n.decode("latin-1"), v.decode("latin-1")) for n, v in self.hdrs],
                b"".join(self.body), self.parser.get_http_version(),
                self.parser.should_keep_alive(),
            )
        )


class RawClient:
    """A keep-alive HTTP client over one raw TCP connection (exact bytes, pipelining)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.col = _RespCollector()
        self.parser = httptools.HttpResponseParser(self.col)
        self.col.parser = self.parser
        self.raw = bytearray()
        self.eof = False
        self.head_requests = 0

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        r, w = await asyncio.open_connection(host, port)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def responses(self, n: int, timeout_s: float = 5.0) -> list[Response]:
        """Read until ``n`` complete responses (or EOF); returns those complete."""
        async with asyncio.timeout(timeout_s):
            while len(self.col.done) < n and not self.eof:
                data = await self.reader.read(65536)
                if not data:
                    self.eof = True
                    if self.col.in_msg:  # a close-delimited body ends here
                        self.col.on_message_complete()
                    break
                self.raw += data
                try:
                    self.parser.feed_data(data)
                except httptools.HttpParserError:
                    break
        out, self.col.done = self.col.done[:n], self.col.done[n:]
        return out

    async def response(self, timeout_s: float = 5.0) -> Response:
        got = await self.responses(1, timeout_s)
        if not got:
            raise ConnectionError(f"no response; raw={bytes(self.raw)[:300]!r}")
        return got[0]

    async def closed(self, timeout_s: float = 3.0) -> bool:
        """True when the server closes the connection within ``timeout_s``."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        return True
                    self.raw += data
        except (ConnectionError, TimeoutError):
            return isinstance(self.reader.exception(), ConnectionError)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def request(
    port: int, data: bytes, *, timeout_s: float = 5.0
) -> Response:
    """One request on a fresh connection."""
    c = await RawClient.connect(port)
    try:
        await c.send(data)
        return await c.response(timeout_s)
    finally:
        await c.close()


async def wait_for(cond: Callable[[], bool], timeout_s: float = 3.0) -> None:
    """Poll ``cond`` (state owned by other code, no event to wait on) until true."""
    async with asyncio.timeout(timeout_s):
        while not cond():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def gather_limited(coros: list[Awaitable[Any]]) -> list[Any]:
    return list(await asyncio.gather(*coros))


def get(path: str = "/", host: str = "example.test", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def run(coro: Awaitable[Any]) -> Any:
    """Run one scenario on a fresh event loop (tests are plain functions)."""

    async def main() -> Any:
        return await coro

    return asyncio.run(main())


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SERVE_CODE = """
import asyncio, sys
sys.path.insert(0, {tests!r})
sys.path.insert(0, {root!r})
import uvloop
from proxy_helpers import start_proxy

async def main():
    px = await start_proxy({backends!r}, mode={mode!r}, listener={listener!r}, pool={pool!r})
    print(px.port, flush=True)
    await asyncio.Event().wait()

uvloop.run(main())
"""


async def spawn_proxy(
    backends: list[tuple[str, str]], *, mode: str = "http",
    listener: dict[str, Any] | None = None, pool: dict[str, Any] | None = None,
) -> tuple[asyncio.subprocess.Process, int]:
    """A proxy in its own process (uvloop), for measurements that need its own RSS/CPU."""
    code = SERVE_CODE.format(tests=TESTS_DIR, root=os.path.dirname(TESTS_DIR), backends=backends,
                             mode=mode, listener=listener or {}, pool=pool or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    return proc, int(line)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """VmRSS (now) or VmHWM (peak) of a process, KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


# -- the engine without sockets ------------------------------------------------------------


class FakeLoop:
    def __init__(self) -> None:
        self.now = 1000.0
        self.ready: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()

    def time(self) -> float:
        return self.now

    def call_soon(self, cb: Callable[..., Any], *args: Any) -> None:
        self.ready.append((cb, args))

    def call_later(self, delay: float, cb: Callable[..., Any], *args: Any) -> Any:
        return None  # the ticker: the harness calls _tick itself

    def create_task(self, coro: Any) -> Any:
        coro.close()
        raise AssertionError("the harness connects backends itself")


class FakeTransport:
    def __init__(self, proto: Any) -> None:
        self.proto = proto
        self.out = bytearray()
        self.closed = False
        self.lost = False
        self.paused = False
        self.eof_written = False

    def write(self, data: bytes) -> None:
        assert not self.eof_written, "write() after write_eof()"  # asyncio and uvloop raise
        if not self.closed:
            self.out += data

    def writelines(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.write(piece)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default


def fake_proxy_server() -> tuple[ProxyServer, FakeLoop]:
    """A ProxyServer on a FakeLoop (one pool of one backend that is never connected to):
    for tests that drive its connections and lists by hand."""
    loop = FakeLoop()
    lcfg = ListenerConfig.model_validate({"name": "l", "bind": "127.0.0.1:1", "pool": "p"})
    pcfg = PoolConfig.model_validate(
        {"name": "p", "backends": [{"name": "b1", "address": "127.0.0.1:9"}]})
    pool = build_pool("p", "round_robin", [("b1", "127.0.0.1", 9, 1.0)], seed=1)
    return ProxyServer(lcfg, pool, pcfg, Stats(), loop=loop), loop
