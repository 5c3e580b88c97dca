"""The TCP proxy engine (listener mode ``tcp``): bytes piped both ways to a pooled backend.

Same balancing as HTTP (``Pool.pick``), a connect failure retried on another backend (up to
``retries``; nothing has been sent yet, so it is always safe), backpressure both ways
(pause_reading on the other side while a write buffer is full), half-close passed through
(EOF one way keeps the other way open), and an idle timeout (``client_idle_timeout_s``, no
byte either way) checked by one ticker per server.

SNI routes (``sni_routes``, TLS passed through, not terminated): the connection's first bytes
are held (at most ``SNI_PEEK_MAX`` of them, for at most ``sni_inspect_timeout_s``) until they
make a ClientHello (lb.tls.sni_peek); its server name chooses the pool (exact name, then a
one-label wildcard), anything else goes to ``pool``. Only then is a backend picked and
connected; the held bytes go to it first, unchanged. How each choice was made is counted in
``TcpProxyServer.sni_decisions``. A listener without routes never looks at the bytes.

A pool with ``[pool.tls]`` is connected to with TLS (its context from the worker, the name
sent and verified ``server_name`` or the backend's host); a failed handshake or verification
is a connect failure, retried on another backend like a refused connect.

Imports no control-plane module.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any

from lb.config import ListenerConfig, PoolConfig
from lb.data.listener import ListenerServer, unread_bytes
from lb.data.pool import Backend, Ejection, Outcome, Pool
from lb.stats import Stats
from lb.tls.names import NameTable
from lb.tls.sni_peek import NEED_MORE, NOT_TLS, SniPeeker

logger = logging.getLogger(__name__)

BUFFER_LIMIT = 256 * 1024
"""Client bytes held while the backend connection is being made, before reading pauses."""

SNI_PEEK_MAX = 16 * 1024
"""Client bytes held, at most, waiting for a complete ClientHello (HAProxy's buffer size)."""

SNI_DECISIONS = ("route", "no_match", "no_sni", "not_tls", "oversize", "timeout", "eof", "closed")
"""How the pool of a connection to a listener with SNI routes was chosen:

- ``route``: a ClientHello whose server name matches a route: that route's pool;
- ``no_match``: a ClientHello with a server name no route matches: ``pool``;
- ``no_sni``: a ClientHello without a server name: ``pool``;
- ``not_tls``: the first bytes are not a (well-formed) ClientHello: ``pool``, at once;
- ``oversize``: ``SNI_PEEK_MAX`` bytes and still no complete ClientHello: ``pool``;
- ``timeout``: no complete ClientHello within ``sni_inspect_timeout_s`` (a client that
  waits for the server to speak first, a slow one): ``pool``;
- ``eof``: the client half-closed before a complete ClientHello: ``pool``;
- ``closed``: the client went away (or was cut) before any of these: no pool."""


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


class _PeekingClientSide(_ClientSide):
    """The client of a listener with SNI routes: what it sends is held and read as a
    ClientHello until the pipe has chosen its pool."""

    __slots__ = ("sni",)

    def __init__(self, pipe: _SniPipe) -> None:
        super().__init__(pipe)
        self.sni = pipe

    def data_received(self, data: bytes) -> None:
        pipe = self.sni
        if pipe.peeker is None:
            _ClientSide.data_received(self, data)
            return
        pipe.touch()
        pipe.bytes_in += len(data)
        self.buf.append(data)
        self.buf_bytes += len(data)
        pipe.peek(data, self.buf_bytes)

    def eof_received(self) -> bool:
        pipe = self.sni
        if pipe.peeker is None:
            return _ClientSide.eof_received(self)
        self.eof = True
        pipe.decide(None, "eof")  # the EOF follows the held bytes once connected
        return pipe.half_close(self)


class _BackendSide(_Side):
    __slots__ = ("early",)

    def __init__(self, pipe: _Pipe) -> None:
        super().__init__(pipe)
        self.early: list[bytes] = []
        """What the backend sent before the pipe joined the two sides (a server that
        speaks first; uvloop delivers it before create_connection returns)."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pipe = self.pipe
        pipe.touch()
        pipe.bytes_out += len(data)
        if self.peer is not None:
            self.peer.write(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is None:
            return True  # passed on once joined, after what it sent first
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

    def has_unread(self) -> bool:
        """A side that is reading has bytes in the kernel the loop has not taken yet."""
        return any(
            side is not None and not side.rpaused and not side.closed
            and unread_bytes(side.transport)
            for side in (self.client, self.backend_side)
        )

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
                ctx = srv.backend_tls.get(self.pool.name)
                if ctx is None:
                    _, side = await srv.loop.create_connection(
                        lambda: _BackendSide(self), backend.host, backend.port
                    )
                else:
                    tls = self.pool_cfg.tls
                    name = tls.server_name if tls is not None and tls.server_name else None
                    _, side = await srv.loop.create_connection(
                        lambda: _BackendSide(self), backend.host, backend.port,
                        ssl=ctx, server_hostname=name or backend.host,
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
        if side.early:
            client.write(b"".join(side.early))
            side.early = []
        if side.eof:
            self.half_close(side)
        if client.buf:
            side.write(b"".join(client.buf))
            client.buf = []
            client.buf_bytes = 0
        if client.eof and side.transport.can_write_eof():
            # (A TLS backend cannot take a half-close: it stays open for its answer.)
            with contextlib.suppress(OSError):
                side.transport.write_eof()
        client.resume_read()
        self.touch()

    def _connect_failed(self, backend: Backend, exc: BaseException) -> None:
        srv = self.srv
        if isinstance(exc, TimeoutError):
            reason, outcome = "connect_timeout", Outcome.TIMEOUT
        elif isinstance(exc, ssl.SSLCertVerificationError):
            reason, outcome = "tls_verify", Outcome.CONNECT_FAILED
        elif isinstance(exc, ssl.SSLError):
            reason, outcome = "tls_handshake", Outcome.CONNECT_FAILED
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
            self.finish()
            return False
        if side is self.client:
            # A TLS backend cannot be half-closed (close_notify ends both ways): it stays
            # open for its answer; its own close, or the idle timeout, ends the pipe.
            return True
        # The backend is done and the TLS client cannot be half-closed: close it once what
        # the backend sent is written.
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


class _SniPipe(_Pipe):
    """A pipe of a listener with SNI routes: no backend until the pool is chosen."""

    __slots__ = ("peeker", "timer")

    def __init__(self, srv: TcpProxyServer) -> None:
        super().__init__(srv)
        self.peeker: SniPeeker | None = SniPeeker()
        """Reads the ClientHello; None once the pool is chosen."""
        self.timer: asyncio.TimerHandle | None = None

    def client_connected(self, client: _ClientSide) -> None:
        self.client = client
        srv = self.srv
        srv.client_opened(self)
        self.touch()
        self.timer = srv.loop.call_later(srv.listener.sni_inspect_timeout_s, self._timed_out)

    def peek(self, data: bytes, held: int) -> None:
        """``data`` arrived, ``held`` bytes in all so far (``data`` included)."""
        peeker = self.peeker
        assert peeker is not None
        room = SNI_PEEK_MAX - (held - len(data))
        result = peeker.feed(data if len(data) <= room else data[:room])
        if result is NEED_MORE:
            if held >= SNI_PEEK_MAX:
                self.decide(None, "oversize")
        elif result is NOT_TLS:
            self.decide(None, "not_tls")
        elif result.server_name is None:
            self.decide(None, "no_sni")
        else:
            srv = self.srv
            assert srv.sni_table is not None
            pool = srv.sni_table.match(result.server_name)
            if pool is not None and pool in srv.pools and pool in srv.pool_cfgs:
                self.decide(pool, "route")
            else:
                self.decide(None, "no_match")

    def _timed_out(self) -> None:
        self.timer = None
        if self.peeker is not None and not self.done:
            self.decide(None, "timeout")

    def decide(self, pool: str | None, why: str) -> None:
        """Send this connection to ``pool`` (None: the listener's) and connect it."""
        self.peeker = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        srv = self.srv
        srv.sni_decisions[why] += 1
        srv.stats.sni(srv.listener.name, why)
        if pool is None:
            self.pool, self.pool_cfg = srv.pool, srv.pool_cfg
        else:
            self.pool, self.pool_cfg = srv.pools[pool], srv.pool_cfgs[pool]
        self.tries_left = self.pool_cfg.retries
        self._pick()

    def finish(self) -> None:
        if self.done:
            return
        if self.peeker is not None:
            self.peeker = None
            self.srv.sni_decisions["closed"] += 1
            self.srv.stats.sni(self.srv.listener.name, "closed")
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        super().finish()


class TcpProxyServer(ListenerServer["_Pipe"]):
    """The TCP proxy for one listener (lifecycle: lb.data.listener)."""

    TICK_FAILED = "tcp_tick_failed"

    def __init__(
        self,
        listener: ListenerConfig,
        pool: Pool,
        pool_cfg: PoolConfig,
        stats: Stats,
        on_ejection: Callable[[Ejection], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(listener, pool, pool_cfg, stats, on_ejection, loop)
        self.sni_table: NameTable[str] | None = _sni_table(listener)
        """Server name -> pool name of the SNI routes; None without routes."""
        self.sni_decisions: dict[str, int] = dict.fromkeys(SNI_DECISIONS, 0)
        """How many connections had their pool chosen which way (see SNI_DECISIONS)."""

    def listener_changed(self, listener: ListenerConfig) -> None:
        super().listener_changed(listener)
        self.sni_table = _sni_table(listener)  # new connections route by the new table

    def protocol(self) -> asyncio.Protocol:
        if self.sni_table is None:
            return _ClientSide(_Pipe(self))
        return _PeekingClientSide(_SniPipe(self))

    def close_idle(self, *, spare_fresh: bool = False) -> None:
        """TCP connections carry no request boundaries: nothing can be closed cleanly."""

    def observe(self, pipe: _Pipe, backend: Backend, outcome: Outcome) -> None:
        if pipe.pool_cfg.passive.enabled:
            self.eject_on(pipe.pool, backend, outcome)

    def tick_interval(self) -> float:
        return min(0.5, max(0.01, self.listener.client_idle_timeout_s / 10))

    def on_tick(self, now: float) -> None:
        for p in [p for p in self.clients if p.deadline <= now]:
            if p.has_unread():
                # Bytes arrived while the loop was stalled (uvloop runs timers before it
                # polls): the pipe is not idle, move them first.
                p.deadline = now + self.tick_interval()
                continue
            logger.info(
                "event=tcp_idle_timeout listener=%s pool=%s", self.listener.name, p.pool.name
            )
            p.abort()


def _sni_table(listener: ListenerConfig) -> NameTable[str] | None:
    if not listener.sni_routes:
        return None
    return NameTable("", [((r.server_name,), r.pool) for r in listener.sni_routes])


__all__ = ["SNI_DECISIONS", "SNI_PEEK_MAX", "TcpProxyServer"]
