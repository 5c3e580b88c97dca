"""The TCP proxy engine (listener mode ``tcp``): bytes piped both ways to a pooled backend.

Same balancing as HTTP (``Pool.pick``), a connect failure retried on another backend (up to
``retries``; nothing has been sent yet, so it is always safe), backpressure both ways
(pause_reading on the other side while a write buffer is full), half-close passed through
(EOF one way keeps the other way open), and an idle timeout (``client_idle_timeout_s``, no
byte either way) checked by one ticker per server.

Imports no control-plane module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from lb.data.listener import ListenerServer
from lb.data.pool import Backend, Outcome

logger = logging.getLogger(__name__)

BUFFER_LIMIT = 256 * 1024
"""Client bytes held while the backend connection is being made, before reading pauses."""


class _Side(asyncio.Protocol):
    """One end of a pipe; ``peer`` is the other end."""

    __slots__ = ("closed", "eof", "peer", "pipe", "rpaused", "transport")

    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe
        self.transport: Any = None
        self.peer: _Side | None = None
        self.closed = False
        self.eof = False
        self.rpaused = False

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_read()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_read()

    def pause_read(self) -> None:
        if not self.rpaused and not self.closed and self.transport is not None:
            self.rpaused = True
            self.transport.pause_reading()

    def resume_read(self) -> None:
        if self.rpaused and not self.closed and self.transport is not None:
            self.rpaused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.closed and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()


class _ClientSide(_Side):
    __slots__ = ("buf", "buf_bytes")

    def __init__(self, pipe: _Pipe) -> None:
        super().__init__(pipe)
        self.buf: list[bytes] = []
        self.buf_bytes = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.pipe.client_connected(self)

    def data_received(self, data: bytes) -> None:
        pipe = self.pipe
        pipe.touch()
        pipe.bytes_in += len(data)
        if self.peer is None:
            self.buf.append(data)
            self.buf_bytes += len(data)
            if self.buf_bytes > BUFFER_LIMIT:
                self.pause_read()
            return
        self.peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        return self.pipe.half_close(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pipe.side_lost(self)


class _BackendSide(_Side):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pipe = self.pipe
        pipe.touch()
        pipe.bytes_out += len(data)
        if self.peer is not None:
            self.peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        return self.pipe.half_close(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pipe.side_lost(self)


class _Pipe:
    """One proxied TCP connection: the client side, the backend side, the picked backend."""

    __slots__ = (
        "backend", "backend_side", "bytes_in", "bytes_out", "client", "deadline", "done",
        "excluded", "pool", "pool_cfg", "srv", "tries_left",
    )

    def __init__(self, srv: TcpProxyServer) -> None:
        self.srv = srv
        self.pool = srv.pool
        self.pool_cfg = srv.pool_cfg
        self.client: _ClientSide | None = None
        self.backend_side: _BackendSide | None = None
        self.backend: Backend | None = None
        self.excluded: list[Backend] = []
        self.tries_left = self.pool_cfg.retries
        self.deadline = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.done = False

    def touch(self) -> None:
        self.deadline = self.srv.time() + self.srv.listener.client_idle_timeout_s

    def client_connected(self, client: _ClientSide) -> None:
        self.client = client
        self.srv.client_opened(self)
        self.touch()
        self._pick()

    def _pick(self) -> None:
        srv = self.srv
        backend = self.pool.pick(srv.time(), self.excluded)
        if backend is None:
            logger.warning(
                "event=proxy_error status=0 listener=%s pool=%s backend=- reason=no_backend",
                srv.listener.name, self.pool.name,
            )
            srv.stats.error(self.pool.name, "-", "no_backend")
            self.finish()
            return
        self.backend = backend
        srv.spawn(self._connect(backend))

    async def _connect(self, backend: Backend) -> None:
        srv = self.srv
        try:
            async with asyncio.timeout(self.pool_cfg.connect_timeout_s):
                _, side = await srv.loop.create_connection(
                    lambda: _BackendSide(self), backend.host, backend.port
                )
        except (OSError, TimeoutError) as exc:
            self._connect_failed(backend, exc)
            return
        if self.done:
            side.close()
            return
        srv.observe(self, backend, Outcome.OK)
        srv.stats.tcp_connection(self.pool.name, backend.name)
        client = self.client
        assert client is not None
        self.backend_side = side
        side.peer = client
        client.peer = side
        if client.buf:
            side.write(b"".join(client.buf))
            client.buf = []
            client.buf_bytes = 0
        if client.eof:
            with contextlib.suppress(OSError):
                side.transport.write_eof()
        client.resume_read()
        self.touch()

    def _connect_failed(self, backend: Backend, exc: BaseException) -> None:
        srv = self.srv
        if isinstance(exc, TimeoutError):
            reason, outcome = "connect_timeout", Outcome.TIMEOUT
        elif isinstance(exc, ConnectionRefusedError):
            reason, outcome = "connect_refused", Outcome.CONNECT_FAILED
        else:
            reason, outcome = "connect_failed", Outcome.CONNECT_FAILED
        srv.observe(self, backend, outcome)
        srv.stats.error(self.pool.name, backend.name, reason)
        self._release()
        if self.done:
            return
        if self.tries_left > 0:
            self.tries_left -= 1
            self.excluded.append(backend)
            srv.stats.retry(self.pool.name, reason)
            self._pick()
            return
        logger.warning(
            "event=proxy_error status=0 listener=%s pool=%s backend=%s reason=%s",
            srv.listener.name, self.pool.name, backend.name, reason,
        )
        self.finish()

    def half_close(self, side: _Side) -> bool:
        """EOF from ``side``: pass it on; keep the other direction open until it ends too."""
        peer = side.peer
        if peer is None:
            # Client EOF before the backend is connected: send the EOF once connected.
            return side is self.client and self.backend is not None
        if peer.eof or peer.closed:
            self.finish()
            return False
        try:
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
                return True
        except OSError:
            pass
        self.finish()
        return False

    def side_lost(self, side: _Side) -> None:
        # One side gone for good: close the other once its pending bytes are written.
        self.finish()

    def _release(self) -> None:
        b = self.backend
        if b is not None:
            self.backend = None
            self.pool.release(b)

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        srv = self.srv
        if self.client is not None:
            self.client.close()
        if self.backend_side is not None:
            self.backend_side.close()
        b = self.backend
        if b is not None:
            srv.stats.tcp_bytes(self.pool.name, b.name, self.bytes_in, self.bytes_out)
        self._release()
        srv.client_gone(self)

    def abort(self) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.closed = True
            self.client.transport.abort()
        if self.backend_side is not None and self.backend_side.transport is not None:
            self.backend_side.closed = True
            self.backend_side.transport.abort()
        self.finish()


class TcpProxyServer(ListenerServer["_Pipe"]):
    """The TCP proxy for one listener (lifecycle: lb.data.listener)."""

    TICK_FAILED = "tcp_tick_failed"

    def protocol(self) -> asyncio.Protocol:
        return _ClientSide(_Pipe(self))

    def close_idle(self, *, spare_fresh: bool = False) -> None:
        """TCP connections carry no request boundaries: nothing can be closed cleanly."""

    def observe(self, pipe: _Pipe, backend: Backend, outcome: Outcome) -> None:
        if pipe.pool_cfg.passive.enabled:
            self.eject_on(pipe.pool, backend, outcome)

    def tick_interval(self) -> float:
        return min(0.5, max(0.01, self.listener.client_idle_timeout_s / 10))

    def on_tick(self, now: float) -> None:
        for p in [p for p in self.clients if p.deadline <= now]:
            logger.info(
                "event=tcp_idle_timeout listener=%s pool=%s", self.listener.name, p.pool.name
            )
            p.abort()


__all__ = ["TcpProxyServer"]
