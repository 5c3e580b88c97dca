"""What a proxy worker does the same way for every listener, whatever it speaks.

`ListenerServer` is the lifecycle the HTTP engine (lb.data.proxy) and the TCP engine
(lb.data.tcpproxy) share: accept on the listening socket the control process passed down
(its slot's with ``reuseport``, else the shared one; each worker its own duplicate, so
closing it stops only this worker's accepting), and on other slots' sockets while the
control process asks for help (`set_help`), stop accepting at ``max_connections`` and
resume below it (further connections wait in the backlog for another worker), drain,
close, own every task it starts, tick its deadlines, and turn a passive-check outcome into
a local ejection. An engine supplies the protocol of
one client connection, its tick and what else to close; nothing here runs per request.

Imports no control-plane module.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import ssl
import termios
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, TypeVar

from mypy_extensions import mypyc_attr

from lb.config import ListenerConfig, PoolConfig
from lb.data.pool import Backend, Ejection, Outcome, Pool
from lb.stats import Stats

if TYPE_CHECKING:
    from lb.data.accesslog import AccessLog
    from lb.tls.server import ListenerTls

logger: Final = logging.getLogger(__name__)

TLS_SHUTDOWN_TIMEOUT_S: Final = 5.0
"""How long a TLS connection's close_notify exchange may take before it is cut."""

C = TypeVar("C", bound=Hashable)
"""One client connection of the engine (an HTTP client, a TCP pipe)."""


def unread_bytes(transport: Any) -> bool:
    """Bytes in the kernel's receive buffer that the loop has not read yet.

    Asked only when a client's idle or first-header deadline expires: uvloop runs due timers
    before it polls for I/O, so after a loop stall longer than the timeout (CPU starvation, a
    long GC) the sweep would close a connection whose next bytes already arrived.
    """
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    buf = bytearray(4)
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    except (OSError, ValueError):
        return False
    return any(buf)


def _no_loop() -> float:
    raise RuntimeError("the listener's server has not been started")


@mypyc_attr(allow_interpreted_subclasses=True)  # TcpProxyServer (interpreted)
class ListenerServer(Generic[C]):
    """One listener in one worker: its accepting, its client connections and its tasks."""

    TICK_FAILED: ClassVar[str] = "listener_tick_failed"
    """The log event of a tick that raised (each engine keeps its own name)."""

    def __init__(
        self,
        listener: ListenerConfig,
        pool: Pool,
        pool_cfg: PoolConfig,
        stats: Stats,
        on_ejection: Callable[[Ejection], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.listener = listener
        self.pool = pool
        self.pool_cfg = pool_cfg
        self.stats = stats
        self.on_ejection = on_ejection
        self.loop: Any = loop
        self.time: Callable[[], float] = loop.time if loop is not None else _no_loop
        self.clients: set[C] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._sock: socket.socket | None = None
        self._server: asyncio.AbstractServer | None = None
        self._accepting = False
        self._ticker: asyncio.TimerHandle | None = None
        self._drained: asyncio.Event | None = None
        self.handshaking = 0
        """TLS connections accepted whose handshake has not finished (or failed) yet."""
        self._relistening = False
        self._help_socks: dict[int, socket.socket] = {}
        """Other slots' sockets this worker accepts on too (lb.control.acceptwatch)."""
        self._help_servers: dict[int, asyncio.AbstractServer] = {}
        self._help_opening: set[int] = set()
        self._help_failed: set[int] = set()
        """Slots whose helper failed to open: logged once until one opens again."""
        self.on_paused: Callable[[bool], None] | None = None
        """Told when accepting pauses at ``max_connections`` (True) and resumes (False): the
        worker tells the control process, which has the others take our socket's queue."""
        self._paused = False
        self.tls: ListenerTls | None = None
        """Set by the worker before start() on a ``[listener.tls]`` listener: connections
        are accepted with its front context (the SNI callback picks the certificate)."""
        self.pools: Mapping[str, Pool] = {pool.name: pool}
        self.pool_cfgs: Mapping[str, PoolConfig] = {pool_cfg.name: pool_cfg}
        self.backend_tls: Mapping[str, ssl.SSLContext] = {}
        """Pool name -> the context of its backend connections (``[pool.tls]``)."""
        self.alog: AccessLog | None = None
        """The worker's access log (``[logging] access_log``), set by the worker."""

    # -- what an engine supplies -------------------------------------------------------------

    def protocol(self) -> asyncio.Protocol:
        """The protocol of one newly accepted client connection."""
        raise NotImplementedError

    def tick_interval(self) -> float:
        """Seconds between deadline checks: a tenth of the shortest timeout, 10-500 ms."""
        raise NotImplementedError

    def on_tick(self, now: float) -> None:
        """Act on the deadlines that passed by ``now``."""
        raise NotImplementedError

    def begin_drain(self) -> None:
        """Called once accepting stopped and before waiting for the clients to finish."""

    def abort_more(self) -> None:
        """Cut what else the engine holds (backend connections) at a hard stop."""

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self, sock: socket.socket) -> None:
        """Accept on an already-bound listening socket (shared with other workers)."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            self.time = self.loop.time
        self._sock = sock
        if self.tls is not None:
            self.tls.hooks = self
        await self._listen()
        self._schedule_tick()

    async def _listen(self, resume: bool = False) -> None:
        """Start accepting; ``resume``: again, after max_connections or a new handshake
        timeout paused it (unless a stop or another resume came first)."""
        assert self._sock is not None
        try:
            server = await self._serve(self._sock)
        except OSError as exc:
            if not resume:
                raise  # at start: the worker reports it
            # EMFILE, most likely: the others take our queue (paused) until a connection
            # of ours closes and resumes it again.
            logger.error("event=listen_failed listener=%s error=%r", self.listener.name,
                         str(exc))
            self._set_paused(True)
            return
        finally:
            if resume:
                self._relistening = False
        if resume and (not self._accepting or self._server is not None):
            server.close()
            return
        self._server = server
        self._accepting = True
        self._sync_help()
        self._set_paused(False)

    async def _serve(self, sock: socket.socket, start: bool = True) -> asyncio.AbstractServer:
        """A loop server accepting on our own fd of ``sock`` (closing it stops our accepting
        only: the socket stays open in the control process and the other workers);
        ``start`` False: not accepting until ``start_serving()``."""
        tls = self.tls
        if tls is None:
            return await self.loop.create_server(  # type: ignore[no-any-return]
                self.protocol, sock=sock.dup(), backlog=self.listener.backlog,
                start_serving=start)
        return await self.loop.create_server(  # type: ignore[no-any-return]
            self.protocol, sock=sock.dup(), backlog=self.listener.backlog,
            ssl=tls.front, ssl_handshake_timeout=tls.settings.handshake_timeout_s,
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_S, start_serving=start)

    # -- helping other slots (one socket per worker: [listener] reuseport) -----------------

    def set_help(self, socks: Mapping[int, socket.socket]) -> None:
        """Accept on these other slots' sockets too, while we accept on our own (not while
        paused or stopping), until a later call leaves them out."""
        self._help_socks = dict(socks)
        self._sync_help()

    def _sync_help(self) -> None:
        active = self._accepting and self._server is not None
        for k in [k for k in self._help_servers if not active or k not in self._help_socks]:
            self._help_servers.pop(k).close()
        if active:
            for k, sock in self._help_socks.items():
                if k not in self._help_servers and k not in self._help_opening:
                    self._help_opening.add(k)
                    self.spawn(self._open_help(k, sock))

    async def _open_help(self, k: int, sock: socket.socket) -> None:
        try:
            server = await self._serve(sock, start=False)
        except OSError as exc:  # EMFILE: workers x listeners descriptors (LimitNOFILE)
            if k not in self._help_failed:  # retried at each help change: logged once
                self._help_failed.add(k)
                logger.error("event=accept_help_failed listener=%s slot=%d error=%r",
                             self.listener.name, k, str(exc))
            return
        finally:
            self._help_opening.discard(k)
        if (k in self._help_servers or self._help_socks.get(k) is not sock
                or not self._accepting or self._server is None):
            server.close()  # no longer wanted while it opened
            return
        self._help_failed.discard(k)
        self._help_servers[k] = server  # registered first: a close() meanwhile closes it
        try:
            await server.start_serving()
        except BaseException:
            self._help_servers.pop(k, None)
            server.close()
            raise

    def update(self, pool: Pool, pool_cfg: PoolConfig) -> None:
        """New connections (HTTP: new requests) use the new pool; open ones keep theirs."""
        self.pool = pool
        self.pool_cfg = pool_cfg

    def listener_changed(self, listener: ListenerConfig) -> None:
        """A reload's settings of this listener (the same name, socket and TLS presence; a
        change of those replaces the workers): new connections use them."""
        old, self.listener = self.listener, listener
        if (self.tls is not None and old.tls is not None and listener.tls is not None
                and old.tls.handshake_timeout_s != listener.tls.handshake_timeout_s
                and self._server is not None):
            # The loop's server holds the handshake timeout: a new one takes over (our
            # socket stays open; meanwhile the kernel queues, or another worker takes,
            # what arrives).
            self._close_servers()  # the helping servers have the old timeout too
            self._relistening = True
            self.spawn(self._listen(resume=True))
        if listener.max_connections != old.max_connections:
            self._maybe_pause()
            self._maybe_resume()

    def routes_changed(
        self, pools: Mapping[str, Pool], pool_cfgs: Mapping[str, PoolConfig],
        backend_tls: Mapping[str, ssl.SSLContext],
    ) -> None:
        """Every pool of the worker, by name (an engine routing to more than ``pool``, as the
        TCP engine's SNI routes do, reads them here), and each pool's backend TLS context."""
        self.pools = pools
        self.pool_cfgs = pool_cfgs
        self.backend_tls = backend_tls

    async def stop_accepting(self) -> None:
        self._accepting = False
        self._close_servers()

    def _close_servers(self) -> None:
        """Stop our accepting on our own socket and on the slots we help (a later _listen
        opens both again, unless we stopped)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self._sync_help()

    async def drain(self, timeout_s: float) -> int:
        """Let open connections finish until ``timeout_s``; cut the rest, return how many."""
        await self.stop_accepting()
        self.begin_drain()
        if self.clients:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._drained.wait()
        cut = len(self.clients)
        for c in list(self.clients):
            c.abort()  # type: ignore[attr-defined]
        return cut

    def close(self) -> None:
        """Hard stop: every connection is cut, every task cancelled."""
        self._accepting = False
        self._close_servers()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for c in list(self.clients):
            c.abort()  # type: ignore[attr-defined]
        self.abort_more()
        for t in list(self.tasks):
            t.cancel()

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` as a task this server owns (cancelled by close())."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- client connections ------------------------------------------------------------------

    def client_opened(self, c: C) -> None:
        self.clients.add(c)
        self.stats.connection_opened(self.listener.name)
        self._maybe_pause()

    def client_gone(self, c: C) -> None:
        if c in self.clients:
            self.clients.discard(c)
            self.stats.connection_closed(self.listener.name)
            if not self.clients and self._drained is not None:
                self._drained.set()
        self._maybe_resume()

    # A TLS connection reaches the engine (client_opened) only once its handshake is done;
    # until then it is counted here, so max_connections bounds it too.

    def handshake_started(self) -> None:
        self.handshaking += 1
        self._maybe_pause()

    def handshake_ended(self) -> None:
        self.handshaking -= 1
        if self._server is None and self.loop is not None:
            # Maybe from a finalizer (an abandoned handshake collected): act from the loop.
            self.loop.call_soon(self._maybe_resume)

    def _maybe_pause(self) -> None:
        mc = self.listener.max_connections
        if mc and len(self.clients) + self.handshaking >= mc and self._server is not None:
            # Leave further connections in the backlog for other workers (our own socket's
            # too: the control process asks them to take its queue while we are paused).
            self._close_servers()
            self._set_paused(True)

    def _set_paused(self, paused: bool) -> None:
        if paused != self._paused:
            self._paused = paused
            if self.on_paused is not None:
                self.on_paused(paused)

    def _maybe_resume(self) -> None:
        mc = self.listener.max_connections  # 0 (no limit) resumes too: a reload lifted it
        if (
            self._accepting and self._server is None and self._sock is not None
            and not self._relistening and (not mc or len(self.clients) + self.handshaking < mc)
        ):
            self._relistening = True  # one _listen at a time
            self.spawn(self._listen(resume=True))

    # -- passive checks ------------------------------------------------------------------------

    def eject_on(self, pool: Pool, backend: Backend, outcome: Outcome) -> None:
        """Feed one outcome to the pool's passive check; log and report an ejection."""
        ej = pool.observe(backend, outcome, self.time())
        if ej is not None:
            logger.warning(
                "event=backend_ejected_locally listener=%s pool=%s backend=%s reason=%s",
                self.listener.name, ej.pool, ej.backend, ej.outcome,
            )
            if self.on_ejection is not None:
                self.on_ejection(ej)

    # -- timers --------------------------------------------------------------------------------

    def _schedule_tick(self) -> None:
        self._ticker = self.loop.call_later(self.tick_interval(), self._tick)

    def _tick(self) -> None:
        try:
            self.on_tick(self.time())
        except Exception:
            logger.exception("event=%s listener=%s", self.TICK_FAILED, self.listener.name)
        self._schedule_tick()


__all__ = ["ListenerServer"]
