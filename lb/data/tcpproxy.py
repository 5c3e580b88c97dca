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

PROXY protocol (lb.data.proxyproto). Sending: a pool with ``send_proxy_protocol`` = v1/v2
starts every backend connection (each retry's too) with a header carrying the client's
address and the address it connected to (those of an accepted header, when there was one).
To a ``[pool.tls]`` pool the header goes first on the wire, before the TLS handshake (as
HAProxy's ``send-proxy`` with ``ssl``): the socket is connected, the header written, then
TLS started on it. Accepting (``accept_proxy_protocol``): before anything else (the SNI
peek, the backend connect), a connection from a ``trusted_proxies`` address must start with
a valid header (v1 or v2), whole within ``client_header_timeout_s``; its source becomes the
connection's client address (``_Pipe.client_addr``); a LOCAL/UNKNOWN header keeps the real
peer. A connection from any other address is an ordinary client, connected at once, but
its first bytes are held until they cannot start a header; if they are a PROXY signature it
is refused. Refused = closed without a byte, counted as a bad request with status 0 and
reason ``proxy_protocol_missing``/``_invalid``/``_untrusted`` (lb.data.proxyproto.REASONS).
A ``[listener.tls]`` listener reads no header: TLS is terminated before the engine sees a
byte (the config should refuse the combination).

Zero-copy (``_SplicePipe``): a plain pipe (no ``[listener.tls]``, no SNI routes, no
``accept_proxy_protocol``, no ``[pool.tls]``; a PROXY header to send is fine) starts on the
loop's transports like any other, and once it has carried ``SPLICE_AFTER`` bytes and still
moves ``SPLICE_RATE`` bytes a second (bulk data; the ticker looks), it moves to splice(2):
its bytes then go socket to kernel pipe to socket, never through Python. The move is made
at a moment when neither transport holds a byte (all that was read has been written); the
transports are dropped for duplicates of their sockets, and each direction is read and
written on the loop's add_reader/add_writer. Everything above holds there too
(backpressure: a direction whose kernel pipe still holds bytes reads no more until the
destination took them; what a pipe holds at the end is still written, within
``client_idle_timeout_s``). Empty kernel pipes are shared by all connections (a direction
holds one only while its bytes wait), so a quiet spliced connection costs two descriptors,
as on the transports. ``PAIRLB_TCP_SPLICE=0`` (or a system without os.splice) keeps every
pipe on the transports. Measured in docs/performance.md ("TCP mode").

Imports no control-plane module.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import ipaddress
import logging
import os
import select
import socket
import ssl
import termios
import time
from collections.abc import Callable
from typing import Any, ClassVar

from lb.config import ListenerConfig, PoolConfig
from lb.data import accesslog as A
from lb.data import headers as H
from lb.data import proxyproto as pp
from lb.data.listener import ListenerServer, unread_bytes
from lb.data.pool import Backend, Ejection, Outcome, Pool
from lb.maglev import key_hash
from lb.stats import Stats
from lb.tls.names import NameTable
from lb.tls.sni_peek import NEED_MORE, NOT_TLS, SniPeeker

logger = logging.getLogger(__name__)

BUFFER_LIMIT = 256 * 1024
"""Client bytes held while the backend connection is being made, before reading pauses."""

SPLICE = hasattr(os, "splice") and os.environ.get("PAIRLB_TCP_SPLICE", "1") != "0"
"""Plain pipes (see _SplicePipe) move bytes with splice(2) through a kernel pipe, never
through Python; False (``PAIRLB_TCP_SPLICE=0``, or no os.splice): every pipe uses the
loop's transports. Read per connection: a test may flip it."""

PIPE_SIZE = 256 * 1024
"""The kernel pipe's capacity asked for (F_SETPIPE_SZ): the most one splice moves. Refused
(past the user's pipe-user-pages-soft), the default (64 KiB) is kept."""

SPLICE_AFTER = 1024 * 1024
"""Bytes (both ways) a plain pipe carries on the loop's transports before it may move to
splice(2). The move costs some 30-60 us of CPU (two descriptors duplicated, two loop
registrations, more calls at the close), about what splicing saves on 512 KiB (measured:
docs/performance.md, "TCP mode"): a connection that ends soon after the move loses, one
that goes on wins. 0: every plain pipe moves as soon as it is joined."""

SPLICE_RATE = 512 * 1024
"""...and bytes per second it must be moving (seen by the ticker): bulk data. A chatty
connection's small chunks cost as much spliced as on the transports (a few % more)."""

PIPES_KEPT = 32
"""Empty kernel pipes kept for the next chunk (of any connection): a pipe is held by a
direction only while its bytes wait for the destination to take them."""

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
    __slots__ = ("buf", "buf_bytes", "gate")

    def __init__(self, pipe: _Pipe) -> None:
        super().__init__(pipe)
        self.buf: list[bytes] = []
        self.buf_bytes = 0
        self.gate: pp.Gate | None = None
        """The PROXY protocol gate the first bytes pass (accept_proxy_protocol), until it
        decided; None then, and on other listeners."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.pipe.client_connected(self)

    def data_received(self, data: bytes) -> None:
        if self.gate is not None:
            data = self.pipe.gated(self, data)
            if not data:
                return
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
        if self.gate is not None and not self.pipe.gate_ended(self):
            return False
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
        if self.gate is not None:
            data = self.pipe.gated(self, data)
            if not data:
                return
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
        if self.gate is not None and not pipe.gate_ended(self):
            return False
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
        speaks first; uvloop delivers it before create_connection returns), or while the
        client's PROXY gate holds it back (``_Pipe.hold``)."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        pipe = self.pipe
        pipe.touch()
        pipe.bytes_out += len(data)
        if self.peer is not None and not pipe.hold:
            self.peer.write(data)
        else:
            self.early.append(data)
            if self.peer is not None:
                self.pause_read()  # until the gate decides; the rest waits in the kernel

    def eof_received(self) -> bool:
        self.eof = True
        if self.peer is None or self.pipe.hold:
            return True  # passed on once joined, after what it sent first
        return self.pipe.half_close(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        pipe = self.pipe
        if isinstance(exc, ConnectionResetError) and pipe.end is None:
            pipe.end = "backend_reset"  # the access log's SD: not a clean end
        pipe.side_lost(self)


class _Pipe:
    """One proxied TCP connection: the client side, the backend side, the picked backend."""

    __slots__ = (
        "backend", "backend_side", "bname", "bytes_in", "bytes_out", "client", "client_addr",
        "connect_s", "deadline", "done", "end", "excluded", "gate_timer", "hold", "local_addr",
        "pool", "pool_cfg", "srv", "t0", "t_pick", "tries_left",
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
        self.client_addr: pp.Address | None = None
        """The client's (ip, port): the peer's, or the one an accepted PROXY header gave."""
        self.local_addr: pp.Address | None = None
        """The address the client connected to (likewise)."""
        self.t0 = 0.0
        self.t_pick = -1.0
        self.connect_s = -1.0
        self.end: str | None = None
        """Why pairlb ended it (an error reason; None: a side closed): the access log's."""
        self.bname: str | None = None
        """The last backend tried (the access log's)."""
        self.gate_timer: asyncio.TimerHandle | None = None
        self.hold = False
        """An untrusted client's first bytes may start a PROXY header: until its gate
        decides, nothing passes either way (a refused client gets no byte of the backend)."""

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
        srv = self.srv
        srv.client_opened(self)
        self.t0 = srv.time()
        self.touch()
        transport = client.transport
        self.client_addr = _address(transport.get_extra_info("peername"))
        self.local_addr = _address(transport.get_extra_info("sockname"))
        if srv.accept_proxy:
            trusted = (self.client_addr is not None
                       and H.is_trusted(self.client_addr[0], srv.trusted))
            client.gate = pp.Gate(trusted)
            if trusted:  # nothing happens before its header
                self.gate_timer = srv.loop.call_later(
                    srv.listener.client_header_timeout_s, self._gate_expired)
                return
        self.begin()

    def begin(self) -> None:
        """The client's address is known: go on to its backend."""
        self._pick()

    # -- PROXY protocol (accept_proxy_protocol) ---------------------------------------------

    def gated(self, client: _ClientSide, data: bytes) -> bytes:
        """``data`` from a client whose gate has not decided: what to take as its bytes now
        (b"": nothing yet, or refused)."""
        gate = client.gate
        assert gate is not None
        srv = self.srv
        self.touch()
        try:
            res = gate.feed(data)
        except pp.ProxyProtocolError as exc:
            client.gate = None
            self.refuse(exc.reason)
            return b""
        if res.state is pp.NEED_MORE:
            if self.gate_timer is None:  # an untrusted client's first bytes hold it back
                self.hold = True
                self.gate_timer = srv.loop.call_later(
                    srv.listener.client_header_timeout_s, self._gate_expired)
            return b""
        client.gate = None
        self._cancel_gate_timer()
        header = gate.header
        if header is not None and header.source is not None:
            self.client_addr, self.local_addr = header.source, header.dest
        if gate.trusted:
            self.begin()
        elif self.hold:
            self._release_hold(client)
        return res.rest

    def _release_hold(self, client: _ClientSide) -> None:
        """An untrusted client's held bytes are not a header: let the backend's through."""
        self.hold = False
        side = self.backend_side
        if side is None:
            return  # not joined yet: _connect passes what it sent
        side.resume_read()  # first: writing what it held may pause it again (backpressure)
        if side.early:
            client.write(b"".join(side.early))
            side.early = []
        if side.eof:
            self.half_close(side)

    def gate_ended(self, client: _ClientSide) -> bool:
        """The client's EOF before its gate decided: False if that refuses it."""
        gate = client.gate
        assert gate is not None
        client.gate = None
        reason = gate.cut()
        if reason is None:
            return True  # an untrusted client that sent nothing: an ordinary EOF
        self.refuse(reason)
        return False

    def _gate_expired(self) -> None:
        self.gate_timer = None
        client = self.client
        if self.done or client is None or client.gate is None:
            return
        if unread_bytes(client.transport):
            # The loop stalled past the deadline with the bytes already here: read them.
            self.gate_timer = self.srv.loop.call_later(
                self.srv.tick_interval(), self._gate_expired)
            return
        gate, client.gate = client.gate, None
        reason = gate.cut()
        if reason is not None:
            self.refuse(reason)

    def _cancel_gate_timer(self) -> None:
        if self.gate_timer is not None:
            self.gate_timer.cancel()
            self.gate_timer = None

    def refuse(self, reason: str) -> None:
        """Close the connection without a byte: a PROXY protocol refusal."""
        srv = self.srv
        srv.stats.bad_request(srv.listener.name, reason, 0)
        logger.debug(
            "event=bad_request status=0 listener=%s peer=%s reason=%s",
            srv.listener.name, self.client_addr[0] if self.client_addr else "-", reason,
        )
        self.end = reason
        self.finish()

    # -- the backend -----------------------------------------------------------------------

    def _pick(self) -> None:
        srv = self.srv
        pool = self.pool
        key = None
        addr = self.client_addr
        if pool.balance == "maglev" and addr is not None:
            key = key_hash(addr[0].encode())  # hash_on = "source_ip", the only TCP key
        now = srv.time()
        backend = pool.pick(now, self.excluded, key)
        if backend is None:
            logger.warning(
                "event=proxy_error status=0 listener=%s pool=%s backend=- reason=no_backend",
                srv.listener.name, self.pool.name,
            )
            srv.stats.error(self.pool.name, "-", "no_backend")
            self.end = "no_backend"
            self.finish()
            return
        if self.t_pick < 0:
            self.t_pick = now
        self.backend = backend
        self.bname = backend.name
        srv.spawn(self._connect(backend))

    def backend_protocol(self) -> _BackendSide:
        return _BackendSide(self)

    def proxy_header(self) -> bytes:
        """What the pool's ``send_proxy_protocol`` puts first on a backend connection."""
        mode = self.pool_cfg.send_proxy_protocol
        if mode == "off":
            return b""
        encode = pp.encode_v1 if mode == "v1" else pp.encode_v2
        return encode(self.client_addr, self.local_addr)

    async def _connect(self, backend: Backend) -> None:
        srv = self.srv
        header = self.proxy_header()
        started = srv.time()
        try:
            async with asyncio.timeout(self.pool_cfg.connect_timeout_s):
                ctx = srv.backend_tls.get(self.pool.name)
                if ctx is None:
                    _, side = await srv.loop.create_connection(
                        self.backend_protocol, backend.host, backend.port
                    )
                    if header:
                        side.write(header)  # its first bytes, before anything of the client
                else:
                    tls = self.pool_cfg.tls
                    name = tls.server_name if tls is not None and tls.server_name else None
                    if header:
                        # The header precedes the TLS handshake on the wire.
                        sock = await _connect_and_send(srv.loop, backend.host, backend.port,
                                                       header)
                        try:
                            _, side = await srv.loop.create_connection(
                                self.backend_protocol, sock=sock,
                                ssl=ctx, server_hostname=name or backend.host,
                            )
                        except BaseException:
                            sock.close()
                            raise
                    else:
                        _, side = await srv.loop.create_connection(
                            self.backend_protocol, backend.host, backend.port,
                            ssl=ctx, server_hostname=name or backend.host,
                        )
        except (OSError, TimeoutError) as exc:
            self._connect_failed(backend, exc)
            return
        if self.done:
            side.close()
            return
        self.connect_s = srv.time() - started
        srv.observe(self, backend, Outcome.OK)
        srv.stats.tcp_connection(self.pool.name, backend.name)
        client = self.client
        assert client is not None
        self.backend_side = side
        side.peer = client
        client.peer = side
        if not self.hold:  # else passed once the client's gate let it through
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
        self.end = reason
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
        self._cancel_gate_timer()
        self._close_sides()
        b = self.backend
        if b is not None:
            srv.stats.tcp_bytes(self.pool.name, b.name, self.bytes_in, self.bytes_out)
        self._release()
        if srv.alog is not None:
            self._log()
        srv.client_gone(self)

    def _close_sides(self) -> None:
        """Close both ends, each once what is queued for it is written."""
        if self.client is not None:
            self.client.close()
        if self.backend_side is not None:
            self.backend_side.close()

    def _log(self) -> None:
        """The connection's access log record (lb.data.accesslog.FIELDS; TCP: no method,
        target or status)."""
        srv = self.srv
        alog = srv.alog
        assert alog is not None
        total = srv.time() - self.t0
        addr = self.client_addr
        t_pick = self.t_pick
        alog.write((
            time.time() - total, addr[0] if addr else None, addr[1] if addr else 0,
            srv.listener.name, "tcp", None, None, None, 0, self.bytes_in, self.bytes_out,
            self.pool.name, self.bname, self.pool_cfg.retries - self.tries_left,
            (t_pick - self.t0) * 1000 if t_pick >= 0 else -1.0,
            self.connect_s * 1000 if self.connect_s >= 0 else -1.0, -1.0, total * 1000,
            _termination(self.end), None, None, None,
        ))

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

    def begin(self) -> None:
        srv = self.srv
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
            if self.end is None:
                self.end = "sni:closed"  # the client left before a whole ClientHello: CR
            self.srv.sni_decisions["closed"] += 1
            self.srv.stats.sni(self.srv.listener.name, "closed")
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        super().finish()


# -- splice(2): plain pipes ------------------------------------------------------------------

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_SPLICE_MAX = 1 << 30
"""Asked of each splice into a kernel pipe: the pipe's free room is the real limit."""
_free_pipes: list[tuple[int, int]] = []
"""Empty kernel pipes (read end, write end) for the next chunk of any connection."""


def _take_pipe() -> tuple[int, int]:
    """An empty kernel pipe: a kept one, or a new one (OSError: none could be made)."""
    if _free_pipes:
        return _free_pipes.pop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # past pipe-user-pages-soft: the default size
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


def _give_pipe(pipe: tuple[int, int]) -> None:
    """Keep an empty pipe for the next chunk (a few at most; the rest are closed)."""
    if len(_free_pipes) < PIPES_KEPT:
        _free_pipes.append(pipe)
    else:
        _close_pipe(pipe)


def _close_pipe(pipe: tuple[int, int]) -> None:
    for fd in pipe:
        with contextlib.suppress(OSError):
            os.close(fd)


def _dup_socket(transport: Any) -> socket.socket:
    """A socket object on a duplicate of a transport's descriptor."""
    raw = transport.get_extra_info("socket")
    return socket.socket(raw.family, raw.type, raw.proto, os.dup(raw.fileno()))


def _fd_unread(fd: int) -> bool:
    """Bytes in the socket's receive buffer (lb.data.listener.unread_bytes, for an fd)."""
    buf = bytearray(4)
    try:
        fcntl.ioctl(fd, termios.FIONREAD, buf)
    except OSError:
        return False
    return any(buf)


class _Detached(asyncio.Protocol):
    """The protocol of a transport whose socket a _SplicePipe took over: the transport only
    closes its own descriptor (not the connection: the pipe holds a duplicate)."""


_DETACHED = _Detached()


class _Flow:
    """One direction of a _SplicePipe: ``src``'s bytes spliced into a kernel pipe and on
    into ``dst``, never through Python. While the pipe holds bytes ``dst`` has not taken,
    ``src`` is not read (backpressure: the rest waits in ``src``'s receive buffer, then in
    its peer's send buffer) and ``dst``'s writability is awaited instead."""

    __slots__ = (
        "dst", "dst_fd", "eof", "from_backend", "loop", "moved", "owner", "pending", "pipe",
        "reading", "src_fd",
    )

    def __init__(self, owner: _SplicePipe, src: socket.socket, dst: socket.socket,
                 from_backend: bool) -> None:
        self.owner = owner
        self.loop = owner.srv.loop
        self.src_fd = src.fileno()
        self.dst = dst
        self.dst_fd = dst.fileno()
        self.from_backend = from_backend
        self.pipe: tuple[int, int] | None = None
        """The kernel pipe, held only while it has bytes for ``dst``."""
        self.pending = 0
        """Bytes in the pipe that ``dst`` has not taken yet."""
        self.moved = 0
        """Bytes read from ``src`` (the access log's bytes in/out)."""
        self.eof = False
        self.reading = False

    def start(self) -> None:
        self.reading = True
        self.loop.add_reader(self.src_fd, self.readable)

    def readable(self) -> None:
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = self.pipe = _take_pipe()
            except OSError as exc:  # out of descriptors
                self.owner.broken(self, exc, False)
                return
        try:
            n = os.splice(self.src_fd, pipe[1], _SPLICE_MAX, flags=_SPLICE_FLAGS)
        except BlockingIOError:  # (a wakeup with nothing to read: the empty pipe goes back)
            self.pipe = None
            _give_pipe(pipe)
            return
        except OSError as exc:
            self.owner.broken(self, exc, True)
            return
        if n == 0:
            self.ended()
            return
        self.moved += n
        owner = self.owner
        owner.touch()
        try:
            m = os.splice(pipe[0], self.dst_fd, n, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            m = 0
        except OSError as exc:
            self.pending = n
            owner.broken(self, exc, False)
            return
        if m == n:
            self.pipe = None
            _give_pipe(pipe)
            return
        # dst's send buffer is full: wait for room, read src no more until then.
        self.pending = n - m
        self.reading = False
        self.loop.remove_reader(self.src_fd)
        self.loop.add_writer(self.dst_fd, self.writable)

    def writable(self) -> None:
        pipe = self.pipe
        assert pipe is not None
        try:
            m = os.splice(pipe[0], self.dst_fd, self.pending, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self.owner.broken(self, exc, False)
            return
        self.pending -= m
        owner = self.owner
        if owner.done:  # a lingering flush (_SplicePipe._close_sides)
            if not self.pending:
                self.loop.remove_writer(self.dst_fd)
                owner.flushed(self)
            return
        owner.touch()
        if self.pending:
            return
        self.pipe = None
        _give_pipe(pipe)
        self.loop.remove_writer(self.dst_fd)
        self.reading = True
        self.loop.add_reader(self.src_fd, self.readable)

    def ended(self) -> None:
        """EOF from ``src`` (its pipe is empty: nothing is read while it holds bytes)."""
        self.eof = True
        self.stop()
        self.owner.half_closed(self)

    def stop(self) -> None:
        """No more reading nor writing; the pipe closed or kept."""
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.src_fd)
        pipe = self.pipe
        if pipe is not None:
            self.pipe = None
            if self.pending:
                self.loop.remove_writer(self.dst_fd)
                self.pending = 0
                _close_pipe(pipe)
            else:
                _give_pipe(pipe)


class _SplicingClientSide(_ClientSide):
    """The client of a _SplicePipe while it is still on the transports (nothing more on the
    path of a chunk: the ticker decides the move)."""

    __slots__ = ()

    def resume_writing(self) -> None:
        _splicing_resume(self)


class _SplicingBackendSide(_BackendSide):
    """The backend of a _SplicePipe while it is still on the transports."""

    __slots__ = ()

    def resume_writing(self) -> None:
        _splicing_resume(self)


def _splicing_resume(side: _Side) -> None:
    """``side``'s write buffer drained. A pipe waiting for that to move to splice keeps the
    other side's reading paused (nothing new enters the transports) and tries the move."""
    pipe = side.pipe
    assert isinstance(pipe, _SplicePipe)
    if pipe.wants_splice and not pipe.done:
        pipe.held.append(side)
        pipe.splice_soon()
        return
    _Side.resume_writing(side)


class _SplicePipe(_Pipe):
    """A plain pipe (no TLS either way, no SNI peek, no PROXY header to read; one to send is
    fine) that moves to splice(2) once it carries bulk data.

    It starts as any pipe, on the loop's transports: a short or chatty connection pays
    nothing more (not even a test per chunk). The server's ticker moves a pipe that has
    carried ``SPLICE_AFTER`` bytes and is moving ``SPLICE_RATE`` bytes a second, if neither
    transport holds a byte and neither side has half-closed (a tick runs after uvloop has
    written what it queued). A transport that still holds bytes (a slow reader) is told to
    call resume_writing only once it is empty (low water 0); that call, whose peer's
    reading is still paused by the backpressure, tries the move again. Both transports are then
    dropped for duplicates of their sockets, and each direction becomes a _Flow on the
    loop's add_reader/add_writer. Half-close, idle timeout, byte counts and the access log
    go on as before; a socket whose peer is gone is seen on the next read or write. If the
    sockets cannot be duplicated, the pipe stays on the transports."""

    __slots__ = (
        "aborting", "bsock", "c2s", "csock", "held", "linger_timer", "lingering", "s2c",
        "seen", "seen_at", "switching", "wants_splice",
    )

    def __init__(self, srv: TcpProxyServer) -> None:
        super().__init__(srv)
        self.csock: socket.socket | None = None
        self.bsock: socket.socket | None = None
        """The duplicated sockets, once spliced (None: still on the transports)."""
        self.c2s: _Flow | None = None
        self.s2c: _Flow | None = None
        self.seen = 0
        self.seen_at = 0.0
        """Bytes (both ways) carried at the last tick, and its time."""
        self.switching = False
        """A move to splice is scheduled."""
        self.wants_splice = False
        """A move was put off by bytes in a transport: its emptying tries again."""
        self.held: list[_Side] = []
        """Sides whose write buffer emptied while a move is scheduled: their peers' reading
        stays paused until the move is made (or, if not, resumed then)."""
        self.aborting = False
        self.lingering: list[_Flow] = []
        """Flows still writing what their pipe holds after the end (finish)."""
        self.linger_timer: asyncio.TimerHandle | None = None

    def backend_protocol(self) -> _BackendSide:
        return _SplicingBackendSide(self)

    def client_connected(self, client: _ClientSide) -> None:
        super().client_connected(client)
        if not self.done:
            self.seen_at = self.t0
            self.srv.splice_candidates.add(self)

    async def _connect(self, backend: Backend) -> None:
        await super()._connect(backend)
        if SPLICE_AFTER <= 0 and self.backend_side is not None and not self.done:
            self.splice_soon()

    def tick(self, now: float) -> None:
        """The ticker's look at a pipe still on the transports: bulk data moves it."""
        moved = self.bytes_in + self.bytes_out
        if (moved >= SPLICE_AFTER
                and moved - self.seen >= SPLICE_RATE * (now - self.seen_at)):
            self._to_splice()
        self.seen, self.seen_at = moved, now

    def splice_soon(self) -> None:
        """Move to splice once this loop iteration's writes went out (uvloop writes at its
        end)."""
        if not self.switching:
            self.switching = True
            self.srv.loop.call_soon(self._to_splice)

    def _to_splice(self) -> None:
        self.switching = False
        held, self.held = self.held, []
        if self.done:
            return
        client, side = self.client, self.backend_side
        if self._try_splice(client, side):
            self.srv.splice_candidates.discard(self)
            return
        for s in held:
            if not s.closed:
                _Side.resume_writing(s)  # the resume it was called for

    def _try_splice(self, client: _ClientSide | None, side: _BackendSide | None) -> bool:
        if client is None or side is None:
            return False  # not joined yet: again on a later chunk
        ct, bt = client.transport, side.transport
        if (self.hold or client.gate is not None or client.eof or side.eof
                or client.closed or side.closed or ct.is_closing() or bt.is_closing()):
            self.wants_splice = False
            return False
        busy = [t for t in (ct, bt) if t.get_write_buffer_size()]
        if busy:
            # Bytes in flight (a slow reader): again once they are out.
            for t in busy:
                t.set_write_buffer_limits(high=t.get_write_buffer_limits()[1], low=0)
            self.wants_splice = True
            return False
        try:
            csock = _dup_socket(ct)
            try:
                bsock = _dup_socket(bt)
            except BaseException:
                csock.close()
                raise
        except (OSError, AttributeError, ValueError):
            self.wants_splice = False
            self.srv.splice_candidates.discard(self)  # the transports keep the pipe
            return False
        # Nothing read is left undelivered (a paused transport reads nothing), nothing
        # written is left unsent: the transports close their own descriptors, the
        # duplicates carry on.
        for t in (ct, bt):
            t.set_protocol(_DETACHED)
            t.close()
        client.closed = side.closed = True
        self.wants_splice = False
        self.csock, self.bsock = csock, bsock
        self.c2s = _Flow(self, csock, bsock, False)
        self.c2s.moved = self.bytes_in
        self.s2c = _Flow(self, bsock, csock, True)
        self.s2c.moved = self.bytes_out
        self.c2s.start()
        self.s2c.start()
        self.srv.spliced += 1
        return True

    def half_closed(self, flow: _Flow) -> None:
        """``flow``'s source sent EOF: pass it on, keep the other direction open."""
        other = self.s2c if flow is self.c2s else self.c2s
        if other is None or other.eof:
            self.finish()
            return
        try:
            flow.dst.shutdown(socket.SHUT_WR)
        except OSError:
            self.finish()

    def broken(self, flow: _Flow, exc: OSError, reading: bool) -> None:
        """A splice failed: reading ``flow``'s source, or writing its destination."""
        if self.done:  # a lingering flush: its destination is gone
            self.flushed(flow)
            return
        backend = flow.from_backend == reading
        if backend and isinstance(exc, ConnectionResetError) and self.end is None:
            self.end = "backend_reset"  # the access log's SD, as on the transport path
        if not reading:
            flow.stop()  # its bytes have nowhere to go
        self.finish()

    def has_unread(self) -> bool:
        if self.csock is None:
            return super().has_unread()
        return any(f is not None and f.reading and _fd_unread(f.src_fd)
                   for f in (self.c2s, self.s2c))

    def abort(self) -> None:
        if self.csock is None:
            super().abort()
            return
        self.aborting = True
        self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.srv.splice_candidates.discard(self)
        if self.csock is not None:
            self.bytes_in = self.c2s.moved if self.c2s is not None else 0
            self.bytes_out = self.s2c.moved if self.s2c is not None else 0
        super().finish()

    def _close_sides(self) -> None:
        if self.csock is None:
            super()._close_sides()
            return
        keep: list[socket.socket] = []
        for flow in (self.c2s, self.s2c):
            if flow is None:
                continue
            if flow.reading:
                flow.reading = False
                flow.loop.remove_reader(flow.src_fd)
            if flow.pending and not self.aborting:
                # What the pipe holds still goes out (as a transport's close writes its
                # buffer first), within the idle timeout.
                self.lingering.append(flow)
                keep.append(flow.dst)
            else:
                flow.stop()
        for sock in (self.csock, self.bsock):
            if sock is not None and sock not in keep:
                sock.close()
        if self.lingering:
            self.linger_timer = self.srv.loop.call_later(
                self.srv.listener.client_idle_timeout_s, self._linger_expired)

    def flushed(self, flow: _Flow) -> None:
        """A lingering flow wrote the last of its pipe (or cannot): close its destination."""
        if flow in self.lingering:
            self.lingering.remove(flow)
            flow.stop()
            flow.dst.close()
            if not self.lingering and self.linger_timer is not None:
                self.linger_timer.cancel()
                self.linger_timer = None

    def _linger_expired(self) -> None:
        self.linger_timer = None
        for flow in self.lingering:
            flow.stop()
            flow.dst.close()
        self.lingering = []


class TcpProxyServer(ListenerServer["_Pipe"]):
    """The TCP proxy for one listener (lifecycle: lb.data.listener)."""

    TICK_FAILED: ClassVar[str] = "tcp_tick_failed"

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
        self.accept_proxy = listener.accept_proxy_protocol
        self.trusted = H.parse_networks(listener.trusted_proxies)
        self.spliced = 0
        """Pipes moved to splice(2) (_SplicePipe) so far."""
        self.splice_candidates: set[_SplicePipe] = set()
        """Plain pipes still on the transports (the ticker looks at their rate)."""

    def listener_changed(self, listener: ListenerConfig) -> None:
        super().listener_changed(listener)
        self.sni_table = _sni_table(listener)  # new connections route by the new table
        self.accept_proxy = listener.accept_proxy_protocol
        self.trusted = H.parse_networks(listener.trusted_proxies)

    def protocol(self) -> asyncio.Protocol:
        if self.sni_table is None:
            if (SPLICE and self.tls is None and not self.accept_proxy
                    and self.pool_cfg.tls is None and self.pool.name not in self.backend_tls):
                return _SplicingClientSide(_SplicePipe(self))
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
            p.end = "idle_timeout"
            p.abort()
        for sp in list(self.splice_candidates):
            sp.tick(now)


def _termination(end: str | None) -> str:
    """The access log's code of a pipe's end: ``sni:DECISION`` (no pool was ever chosen)
    from accesslog.SNI_TERMINATION, else pairlb's reason."""
    if end is not None and end.startswith("sni:"):
        return A.SNI_TERMINATION.get(end[4:], "PR")
    return A.termination(end)


def _address(sockaddr: Any) -> pp.Address | None:
    """(ip, port) of a socket address (IPv6's flow and scope dropped); None for another
    kind (a Unix socket)."""
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        return str(sockaddr[0]), int(sockaddr[1])
    return None


async def _connect_and_send(
    loop: asyncio.AbstractEventLoop, host: str, port: int, data: bytes
) -> socket.socket:
    """A TCP connection to ``host``:``port`` (each address in turn, as create_connection
    tries them) with ``data`` (if any) sent on it: the PROXY header before a TLS handshake,
    or before the first spliced byte."""
    targets: list[tuple[int, Any]]
    family = _literal_family(host)
    if family is None:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        targets = [(int(family), addr) for family, _, _, _, addr in infos]
    else:
        targets = [(family, (host, port))]
    error: OSError = OSError(f"no address for {host}")
    for family, addr in targets:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await _sock_connect(loop, sock, addr)
            if data:
                await loop.sock_sendall(sock, data)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error


@functools.lru_cache(maxsize=4096)
def _literal_family(host: str) -> int | None:
    """AF_INET/AF_INET6 for an IP address literal, None for a name (to be resolved)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET if ip.version == 4 else socket.AF_INET6


async def _sock_connect(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                        addr: Any) -> None:
    """connect(2) a non-blocking socket to a resolved address, its completion awaited on
    the loop. (uvloop's sock_connect resolves the address again, through its thread pool:
    that doubled a short connection's CPU.) Raises what connect raises (OSError(errno) is
    ConnectionRefusedError etc.)."""
    err = sock.connect_ex(addr)
    if err in (errno.EINPROGRESS, errno.EINTR):
        fd = sock.fileno()
        poll = select.poll()
        poll.register(fd, select.POLLOUT)
        if not poll.poll(0):  # (a near backend has often answered already)
            done = loop.create_future()
            loop.add_writer(fd, _set_done, done)
            try:
                await done
            finally:
                loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"connect to {addr}: {os.strerror(err)}")


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _sni_table(listener: ListenerConfig) -> NameTable[str] | None:
    if not listener.sni_routes:
        return None
    return NameTable("", [((r.server_name,), r.pool) for r in listener.sni_routes])


__all__ = ["SNI_DECISIONS", "SNI_PEEK_MAX", "TcpProxyServer"]
