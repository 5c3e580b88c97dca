"""Active probes: one HTTP request or one TCP connect, labelled with an L4/L7 status.

Why not aiohttp here (the first design said so): its client hides the phase a failure happened
in. A total timeout raises the same ``TimeoutError`` whether the connect or the response
was slow, so L4_TIMEOUT and L7_TIMEOUT cannot be told apart without splitting the budget,
and a probe through ``ClientSession`` costs a session, a connector, a request and a response
object each time (or keep-alive reuse, which would hide a backend that no longer accepts new
connections).

Why not an ``asyncio.Protocol`` with ``create_connection`` either (the previous version):
at 3000 backends checked every second the control process spent ~250 us of CPU per probe,
most of it in asyncio's transport machinery (a Future and a Task hop for the connect, a
transport object, ``connection_made``/``connection_lost`` handles), so 3000 probes a second
needed 0.75 of a core. And a probe that awaits futures is judged late: when the loop was
busy, the connect's completion and the timeout are processed in the same pass, and the
timeout wins, so a busy control loop marked healthy backends DOWN (L4_TIMEOUT) by the
thousand. So a probe here is a small state machine on a non-blocking socket, driven by
readiness callbacks and one timer: connect, send one pre-formatted request (``Connection:
close`` unless the connection is to be kept), feed what arrives to httptools (llhttp, the
data plane's parser), close as soon as the verdict is known: at the end of the headers when
no body check is asked for, or once the substring is seen in the first 64 KiB of body. No
Task, no Future, no transport, and not even the loop's ``add_reader``/``add_writer`` per
socket (~10 us of Python each in the stdlib loop): the probes of a loop share one epoll set
of their own, which the loop watches as a single reader (``_Poller``), and their deadlines
sit in one timer wheel of ``TICK_S`` slots (one loop timer while probes run, not one each).
``start(host, port, done)`` runs one and calls ``done(result)`` once, never from inside
``start``; ``abort()`` on its handle stops it without a result. ``run()`` is the awaitable
form of the same machine (tests and one-off checks use it).

``reuse_connection`` (Envoy's health checker does it by default; HAProxy never does) keeps
the connection of a passing check open for the next check of the same target, so a check
costs one request instead of a connect, a request and a close: at 3000 backends checked
every second, most of the prober's CPU was the kernel's TCP set-up and tear-down. The
price is the one HAProxy avoids it for: a backend that still answers on its old connection
but accepts no new ones passes, until the connection is ``REUSE_MAX_AGE_S`` old. So it is
off by default. A connection is kept only after a passing check whose response said
keep-alive and was read to its end with nothing after it (a passing verdict known before
the end waits for the end, inside the budget); never to a host name (a kept connection
would pin the check to an address DNS may have moved away from). Before reuse a one-byte
peek drops a connection the backend closed (or wrote to) while it sat idle; a reused
connection that fails before the first response byte (the backend closed it while our
request was on the way) is retried once on a fresh connection inside the same budget. So
a backend's idle timeout does not fail a check, unless it answers our request with bytes
(a 408) as it closes.

TLS (a pool with ``[pool.tls]``: :class:`ProbeTls`): once TCP is connected the probe does the
handshake itself, in the same state machine: an ``ssl.SSLObject`` from
``SSLContext.wrap_bio`` between two ``ssl.MemoryBIO`` (what arrives on the socket is written
to the incoming one, what OpenSSL writes to the outgoing one is sent), ``SSLWantReadError``
meaning "wait for the socket to be readable". No ``SSLSocket`` (it would block or need the
loop's transports) and no extra file descriptor or task: a TLS probe costs what a plain one
does plus OpenSSL's work. A ``tcp`` check over TLS passes (L4_OK) when the handshake
completes; an ``http`` one then sends its request and parses the response through the
``SSLObject``. The handshake has its own labels: L6_ERROR when it fails (the certificate
does not verify, no common protocol version, a backend that does not speak TLS), with
OpenSSL's reason in ``detail`` ("certificate verify failed: IP address mismatch, ..."), and
L6_TIMEOUT when the budget runs out before it completes (a backend that accepts and says
nothing). A probe ends a TLS connection with close_notify (one non-blocking send, best
effort), so the backend logs no truncated connection.

``reuse_connection`` works over TLS too: the kept connection keeps its ``SSLObject`` and
BIOs, and the next check writes its request into the same session (no handshake at all).
The one-byte peek before reuse reads the raw socket, so it sees TLS records: any byte the
backend sent while the connection sat idle (a close_notify alert before its FIN, a 408, a
late session ticket) drops the connection, as plain bytes do; and a connection whose
incoming BIO or ``SSLObject`` still holds bytes is not kept. The price is the same as for
plain connections (a backend that keeps its old connections but accepts no new ones), and
a certificate replaced on the backend is seen only on the next new connection (at most
``REUSE_MAX_AGE_S`` later).

TLS session resumption (``ProbeTls.resume_s`` > 0, off by default): a probe keeps the last
session the backend gave it (a TLS 1.3 ticket arrives with the response, so an ``http``
check keeps one; a ``tcp`` check closes at the end of the handshake, before a TLS 1.3
ticket, and resumes only with TLS 1.2) and offers it on the next connection, so the backend
skips sending and proving its certificate. A resumed handshake verifies no certificate:
the session is offered only while the last full handshake is at most ``resume_s`` old, so
a certificate that stopped verifying is seen within ``resume_s``.

A host that is not an IP literal is resolved first (``loop.getaddrinfo``, inside the same
budget) and its addresses are tried in order until one accepts the connection; all refused
is L4_REFUSED.

Rules every probe keeps:
- It never raises (``run()`` raises only ``CancelledError``): every failure becomes a labelled
  :class:`CheckResult`. Network errors are expected and only labelled; any other exception
  is a bug, logged with its traceback and still reported as a failed result, so it shows up
  instead of killing the check loop.
- ``timeout_s`` is the whole budget, connect + request + response; the phase reached when it
  runs out picks L4_TIMEOUT or L7_TIMEOUT. If the timer itself ran more than
  ``LOOP_LAG_GRACE_S`` late (the control loop was busy or the process had no CPU, so the
  probe could not read what may already have arrived), the budget is extended once, by as
  long as the timer was late (at least ``LOOP_LAG_GRACE_S``, at most ``timeout_s``): a late
  control loop must not be blamed on the backend.
- Once connected, anything that is not a well-formed HTTP response (garbage, a close or reset
  before the response, oversized headers) is L7_BAD_RESPONSE. Reading is bounded: at most
  ``MAX_HEAD_BYTES`` before the headers end and ``MAX_BODY_BYTES`` of body are looked at, and
  a server that trickles bytes (slowloris) is cut at the deadline like a silent one.

Imports nothing from lb or failover.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import ipaddress
import logging
import math
import os
import re
import select
import socket
import ssl
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httptools

from .state import CheckResult, CheckStatus, HealthConfigError

log = logging.getLogger(__name__)

__all__ = [
    "LOOP_LAG_GRACE_S",
    "MAX_BODY_BYTES",
    "MAX_HEAD_BYTES",
    "HttpProbe",
    "OnDone",
    "Probe",
    "ProbeHandle",
    "ProbeTls",
    "TcpProbe",
]

MAX_BODY_BYTES = 64 * 1024  # body bytes searched for ``expect_body``
MAX_HEAD_BYTES = 64 * 1024  # bytes read before the headers must be complete
LOOP_LAG_GRACE_S = 0.05
"""A deadline timer this late means the loop was late: the probe gets one extension."""
TICK_S = 0.005
"""Slot of the probes' deadline wheel: a timeout is reported up to this much after it."""
IDLE_MAX_S = 60.0
"""A kept connection idle longer than this is closed instead of reused (a firewall or NAT
between may have forgotten it without telling either end)."""
REUSE_MAX_AGE_S = 30.0
"""A kept connection older than this is closed instead of reused: a backend that stopped
accepting connections is found within this (plus ``fall`` checks) even with reuse."""
_RECV_BYTES = 65536

_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)

OnDone = Callable[[CheckResult], None]


class ProbeHandle(Protocol):
    """A probe in flight; ``abort()`` stops it (closing its socket) without a result."""

    def abort(self) -> None: ...


class Probe(Protocol):
    """What the scheduler needs from a probe."""

    def start(self, host: str, port: int, done: OnDone) -> ProbeHandle: ...

    async def run(self, host: str, port: int) -> CheckResult: ...

    def close(self) -> None:
        """Close a connection kept for reuse (the target is retired or checks stop)."""


@dataclass(frozen=True, slots=True)
class ProbeTls:
    """TLS before the check (module docstring): how a probe's handshake is made.

    ``context`` is a client context (``ssl.PROTOCOL_TLS_CLIENT``): it decides what is
    verified (the chain, and the name unless ``check_hostname`` is off) against which CAs,
    and the protocol versions. Share one among the targets of a pool (3000 contexts would
    each hold a CA store). It takes no part in equality; what it does is compared through
    the fields read from it when this object is made: ``verify`` (the chain is checked),
    ``check_hostname``, ``min_version`` and ``ca`` (SHA-256 of the CA certificates it
    holds, sorted; "" for none loaded, e.g. the system store's directory, read lazily).
    ``server_name``: SNI sent and name verified; None means the target's host (an IP
    literal sends no SNI and is verified against the certificate's IP addresses).
    ``resume_s``: offer the last TLS session while the last full handshake is at most this
    old (0: never; module docstring).
    """

    context: ssl.SSLContext = field(compare=False, repr=False)
    server_name: str | None = None
    resume_s: float = 0.0
    verify: bool = field(init=False)
    check_hostname: bool = field(init=False)
    min_version: str = field(init=False)
    ca: str = field(init=False)

    def __post_init__(self) -> None:
        ctx = self.context
        if not isinstance(ctx, ssl.SSLContext) or ctx.protocol is ssl.PROTOCOL_TLS_SERVER:
            raise HealthConfigError("tls.context", ctx, "must be a client ssl.SSLContext")
        if self.server_name is not None and (
            not self.server_name or _has_ctl(self.server_name) or " " in self.server_name
        ):
            raise HealthConfigError(
                "tls.server_name", self.server_name, "must be non-empty, no spaces or controls"
            )
        if not self.resume_s >= 0:
            raise HealthConfigError("tls.resume_s", self.resume_s, "must be >= 0")
        ders = sorted(ctx.get_ca_certs(binary_form=True))
        ca = hashlib.sha256(b"".join(ders)).hexdigest()[:16] if ders else ""
        object.__setattr__(self, "verify", ctx.verify_mode != ssl.CERT_NONE)
        object.__setattr__(self, "check_hostname", ctx.check_hostname)
        object.__setattr__(self, "min_version", ctx.minimum_version.name)
        object.__setattr__(self, "ca", ca)

    def tested(self) -> tuple[object, ...]:
        """What decides whether a handshake passes (``resume_s`` only how often it is full)."""
        return (self.server_name, self.verify, self.check_hostname, self.min_version, self.ca)


@dataclass(frozen=True, slots=True)
class TcpProbe:
    """Healthy when a TCP connection is accepted within ``timeout_s`` (with ``tls``: and the
    TLS handshake completes). One probe object serves one target: it holds that target's
    TLS session (``ProbeTls.resume_s``)."""

    timeout_s: float = 0.5
    tls: ProbeTls | None = None
    _session: list[tuple[ssl.SSLSession, float]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )
    """At most one: the last TLS session and when its full handshake was."""

    def __post_init__(self) -> None:
        _check_timeout(self.timeout_s)

    def start(self, host: str, port: int, done: OnDone) -> ProbeHandle:
        return _launch(_Check, self, host, port, done)

    async def run(self, host: str, port: int) -> CheckResult:
        return await _run(self, host, port)

    def close(self) -> None:
        self._session.clear()


@dataclass(frozen=True, slots=True)
class HttpProbe:
    """One HTTP/1.1 request; healthy on an expected status (and body substring).

    ``host`` is the Host header; None means the target's address (and port unless 80).
    ``expect_status`` is inclusive ranges, default 200-399 like HAProxy's ``httpchk``.
    ``reuse_connection``: keep the connection for the next check (module docstring).
    ``tls``: the check runs over TLS (module docstring). One probe object serves one
    target: it holds that target's kept connection and TLS session.
    """

    method: str = "GET"
    path: str = "/healthz"
    host: str | None = None
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)
    expect_body: str | None = None
    timeout_s: float = 0.5
    reuse_connection: bool = False
    tls: ProbeTls | None = None
    _needle: bytes | None = field(init=False, repr=False, compare=False)
    _idle: list[_Idle] = field(default_factory=list, init=False, repr=False, compare=False)
    """At most one kept connection."""
    _session: list[tuple[ssl.SSLSession, float]] = field(
        default_factory=list, init=False, repr=False, compare=False
    )
    """At most one: the last TLS session and when its full handshake was."""

    def __post_init__(self) -> None:
        _check_timeout(self.timeout_s)
        if not self.method or not set(self.method) <= _TOKEN_CHARS:
            raise HealthConfigError("method", self.method, "must be an HTTP token")
        if not self.path.startswith("/") or _has_ctl(self.path) or " " in self.path:
            raise HealthConfigError(
                "path", self.path, 'must start with "/" and hold no spaces or control characters'
            )
        if self.host is not None and (not self.host or _has_ctl(self.host)):
            raise HealthConfigError("host", self.host, "must be non-empty, no control characters")
        _check_status_ranges(self.expect_status)
        if self.expect_body is not None and not self.expect_body:
            raise HealthConfigError("expect_body", self.expect_body, "must be non-empty or unset")
        needle = None if self.expect_body is None else self.expect_body.encode()
        if needle is not None and len(needle) > MAX_BODY_BYTES:
            raise HealthConfigError(
                "expect_body", self.expect_body, f"must be at most {MAX_BODY_BYTES} bytes"
            )
        if needle is not None and self.method == "HEAD":
            raise HealthConfigError(
                "expect_body", self.expect_body, "needs a method other than HEAD"
            )
        if self.reuse_connection and self.method == "HEAD":
            # llhttp cannot know a response answers HEAD, so it would wait for the body
            # Content-Length announces and the connection could never be reused.
            raise HealthConfigError(
                "reuse_connection", self.reuse_connection, "needs a method other than HEAD"
            )
        object.__setattr__(self, "_needle", needle)

    def request_bytes(self, host: str, port: int) -> bytes:
        """The exact request sent to ``host:port`` (public so tests and docs can show it)."""
        return _request(self.method, self.path, self.host, host, port, self.reuse_connection)

    def start(self, host: str, port: int, done: OnDone) -> ProbeHandle:
        if self.reuse_connection:
            kept = self._take(host, port)
            if kept is not None:
                loop = asyncio.get_running_loop()
                return _HttpCheck.adopt(loop, self, host, port, done, *kept)
        return _launch(_HttpCheck, self, host, port, done)

    async def run(self, host: str, port: int) -> CheckResult:
        return await _run(self, host, port)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().sock.close()
        self._session.clear()

    def _keep(
        self,
        host: str,
        port: int,
        sock: socket.socket,
        born: float,
        now: float,
        tls: _TlsConn | None,
    ) -> None:
        while self._idle:
            self._idle.pop().sock.close()
        self._idle.append(_Idle(sock, host, port, born, now, tls))

    def _take(
        self, host: str, port: int
    ) -> tuple[socket.socket, float, _TlsConn | None] | None:
        """The kept connection to ``host:port``, when it was made and its TLS state, if it
        is still fit for a request."""
        if not self._idle:
            return None
        idle = self._idle.pop()
        sock = idle.sock
        now = asyncio.get_running_loop().time()
        if (
            (idle.host, idle.port) != (host, port)
            or now - idle.since > IDLE_MAX_S
            or now - idle.born > REUSE_MAX_AGE_S
        ):
            sock.close()
            return None
        try:
            sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            # Nothing pending, no FIN: quiet and open (over TLS the peek sees records: a
            # close_notify or a late ticket is a byte like any other).
            return sock, idle.born, idle.tls
        except OSError:
            pass
        # EOF (the backend's idle timeout), a reset, or bytes nobody asked for (a 408):
        # not a connection to send a request on.
        sock.close()
        return None


_TlsConn = tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]
"""A connection's TLS state: the SSLObject, its incoming and its outgoing BIO."""


@dataclass(slots=True)
class _Idle:
    sock: socket.socket
    host: str
    port: int
    born: float
    """When the connection was made (``REUSE_MAX_AGE_S``)."""
    since: float
    """When it was last used (``IDLE_MAX_S``)."""
    tls: _TlsConn | None = None


@functools.lru_cache(maxsize=16384)
def _request(
    method: str, path: str, host_header: str | None, host: str, port: int, keep_alive: bool
) -> bytes:
    if host_header is not None:
        authority = host_header
    else:
        authority = _bracket(host) if port == 80 else f"{_bracket(host)}:{port}"
    connection = "" if keep_alive else "Connection: close\r\n"
    return (
        f"{method} {path} HTTP/1.1\r\n"
        f"Host: {authority}\r\n"
        "User-Agent: pairlb-healthcheck\r\n"
        "Accept: */*\r\n"
        f"{connection}\r\n"
    ).encode("latin-1")


@functools.lru_cache(maxsize=16384)
def _literal_family(host: str) -> int | None:
    """AF_INET/AF_INET6 for an IP literal (checked without a resolver), None for a name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def _resumable(probe: Any, now: float) -> ssl.SSLSession | None:
    """The session to offer on a new connection, if the probe resumes and has a fresh one."""
    tls: ProbeTls = probe.tls
    if tls.resume_s <= 0 or not probe._session:
        return None
    session: ssl.SSLSession
    session, full_at = probe._session[0]
    if now - full_at > tls.resume_s:
        probe._session.clear()
        return None
    return session


def _remember(probe: Any, sslobj: ssl.SSLObject, now: float) -> None:
    """After a connection: keep its session for the next one (``resume_s``)."""
    if probe.tls.resume_s <= 0:
        return
    session = sslobj.session
    if session is None or not (session.has_ticket or session.id):
        return
    full_at = now
    if sslobj.session_reused and probe._session:
        full_at = probe._session[0][1]  # resumed: no certificate was verified this time
    probe._session[:] = [(session, full_at)]


async def _run(probe: TcpProbe | HttpProbe, host: str, port: int) -> CheckResult:
    """The awaitable form of ``probe.start``; cancelling it aborts the probe."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[CheckResult] = loop.create_future()

    def done(result: CheckResult) -> None:
        if not fut.done():
            fut.set_result(result)

    handle = probe.start(host, port, done)
    try:
        return await fut
    finally:
        handle.abort()


def _launch(
    kind: type[_Check], probe: Any, host: str, port: int, done: OnDone, t0: float | None = None
) -> ProbeHandle:
    """A probe on a new connection; ``t0``: when its budget started (a retry keeps it)."""
    loop = asyncio.get_running_loop()
    family = _literal_family(host)
    if family is not None:
        check = kind(loop, probe, host, port, done, t0)
        check.connect(family, (host, port))
        return check
    return _Resolving(loop, kind, probe, host, port, done, t0)


class _Check:
    """One TCP probe on a non-blocking socket: connect, then (subclass) talk; ``_finish``
    reports once. Every callback is an error boundary (module docstring)."""

    __slots__ = (
        "_batch",
        "_born",
        "_connected",
        "_deadline",
        "_done",
        "_eof",
        "_extended",
        "_fd",
        "_finished",
        "_host",
        "_loop",
        "_mask",
        "_out",
        "_poller",
        "_port",
        "_probe",
        "_reading",
        "_secured",
        "_sock",
        "_t0",
        "_tls",
        "_tls_in",
        "_tls_out",
        "_writing",
        "on_connect_failure",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        probe: Any,
        host: str,
        port: int,
        done: OnDone,
        t0: float | None = None,
    ) -> None:
        self._loop = loop
        self._probe = probe
        self._host = host
        self._port = port
        self._done = done
        self._t0 = loop.time() if t0 is None else t0
        self._deadline = self._t0 + probe.timeout_s
        self._born = self._t0  # when our connection was made (an adopted one: earlier)
        self._sock: socket.socket | None = None
        self._fd = -1
        self._finished = False
        self._connected = False
        self._extended = False
        self._reading = False
        self._writing = False
        self._mask = 0
        self._batch = -1
        self._out = b""
        """Bytes for the socket not sent yet (the request, or TLS records)."""
        self._tls: ssl.SSLObject | None = None
        self._tls_in: ssl.MemoryBIO | None = None
        self._tls_out: ssl.MemoryBIO | None = None
        self._secured = False  # the TLS handshake completed (or the kept connection had)
        self._eof = False  # the backend closed its side (TLS: written to the incoming BIO)
        self._poller = _poller(loop)
        self.on_connect_failure: Callable[[CheckStatus, str], bool] | None = None
        """Set by a resolver trying several addresses: True means "handled, stay quiet"."""

    # -- lifecycle ------------------------------------------------------------------------

    def connect(self, family: int, addr: tuple[Any, ...]) -> None:
        loop = self._loop
        self._poller.arm(self, self._deadline)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self._defer(CheckStatus.L4_ERROR, None, _describe(exc))
            return
        self._sock = sock
        self._fd = sock.fileno()
        try:
            sock.setblocking(False)
            err = sock.connect_ex(addr)
        except (OSError, OverflowError, TypeError, ValueError) as exc:
            self._defer(CheckStatus.L4_ERROR, None, _describe(exc))
            return
        if err == errno.EINPROGRESS or err == errno.EAGAIN:
            self._watch(read=False, write=True)
        elif err == 0:
            loop.call_soon(self._on_connected_soon)
        else:
            self._defer(*_connect_failure(err))

    def abort(self) -> None:
        """Stop without reporting (cancellation, a retired target, the scheduler stopping)."""
        self._finished = True
        self._teardown()

    def _teardown(self) -> None:
        # A finished probe stays in the timer wheel until its slot; the wheel skips it.
        self.unlink()
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        keep = self.keepable()
        tls = self._tls
        tls_conn: _TlsConn | None = None
        if tls is not None:
            assert self._tls_in is not None and self._tls_out is not None
            self._tls = None
            if self._secured:
                _remember(self._probe, tls, self._loop.time())
            if keep and (self._tls_in.pending or tls.pending()):
                keep = False  # bytes after the response, still encrypted: not a clean end
            if keep:
                tls_conn = (tls, self._tls_in, self._tls_out)
            else:
                _goodbye(sock, tls, self._tls_out, self._secured)
        if self._mask:
            # Closing the socket takes it out of the epoll set; a kept one must leave it.
            if keep:
                self._poller.ep.unregister(self._fd)
            self._mask = 0
            self._reading = self._writing = False
            if self._poller.checks.get(self._fd) is self:
                del self._poller.checks[self._fd]
        if keep:
            self._probe._keep(
                self._host, self._port, sock, self._born, self._loop.time(), tls_conn
            )
        else:
            sock.close()

    def _watch(self, *, read: bool, write: bool) -> None:
        """Which readiness events of our socket we want (one epoll_ctl when it changes)."""
        mask = (select.EPOLLIN if read else 0) | (select.EPOLLOUT if write else 0)
        old = self._mask
        if mask == old:
            return
        poller = self._poller
        if not old:
            poller.ep.register(self._fd, mask)
            poller.checks[self._fd] = self
            self._batch = poller.batch  # events polled before now are not ours
        elif not mask:
            poller.ep.unregister(self._fd)
            del poller.checks[self._fd]
        else:
            poller.ep.modify(self._fd, mask)
        self._mask = mask
        self._reading = read
        self._writing = write

    def event(self, events: int) -> None:
        """Readiness from the poller (errors and hang-ups are reported whatever we asked)."""
        if self._writing:
            self._on_writable()
        elif self._reading:
            self._on_readable()

    def _finish(self, status: CheckStatus, code: int | None = None, detail: str = "") -> None:
        if self._finished:
            return
        self._finished = True
        self._teardown()
        if (
            self.on_connect_failure is not None
            and not self._connected
            and status in (CheckStatus.L4_REFUSED, CheckStatus.L4_ERROR)
            and self.on_connect_failure(status, detail)
        ):
            return
        self._done(CheckResult(status, self._loop.time() - self._t0, code, detail))

    def _defer(self, status: CheckStatus, code: int | None, detail: str) -> None:
        """A verdict known inside ``start()``: reported on the next loop pass, never inside."""
        self._loop.call_soon(self._finish, status, code, detail)

    # -- callbacks --------------------------------------------------------------------------

    def _on_timeout(self) -> None:
        if self._finished:
            return
        if self.held():
            return
        now = self._loop.time()
        lag = now - self._deadline
        if not self._extended and lag > LOOP_LAG_GRACE_S:
            # The loop was busy (or the process without a CPU) past our deadline: what came
            # meanwhile was not read yet. One more look, after as long again as the loop
            # was late (at least the grace, at most the budget), before blaming the backend.
            self._extended = True
            self._poller.arm(self, now + min(max(lag, LOOP_LAG_GRACE_S), self._probe.timeout_s))
            return
        if self._handshaking():
            self._finish(CheckStatus.L6_TIMEOUT, None, "TLS handshake timeout")
        elif self._connected:
            self._finish(CheckStatus.L7_TIMEOUT, None, "no response within timeout")
        else:
            self._finish(CheckStatus.L4_TIMEOUT, None, "connect timeout")

    def _on_writable(self) -> None:
        if self._finished or self._sock is None:
            return
        try:
            if not self._connected:
                err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._finish(*_connect_failure(err))
                    return
                self._connected = True
                self._tcp_up()
            else:
                self._send()
        except Exception as exc:  # probe boundary: never raise (module docstring)
            self._bug(exc)

    def _on_connected_soon(self) -> None:
        if self._finished or self._sock is None:
            return
        self._connected = True
        try:
            self._tcp_up()
        except Exception as exc:  # probe boundary
            self._bug(exc)

    def _on_readable(self) -> None:
        if self._finished or self._sock is None:
            return
        try:
            data = self._sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.closed(f"connection lost: {_describe(exc)}")
            return
        try:
            if self._tls is not None:
                self._tls_received(data)
            elif data:
                self.received(data)
            else:
                self.closed("connection closed")
        except Exception as exc:  # probe boundary
            self._bug(exc)

    def _bug(self, exc: BaseException) -> None:
        log.error(
            "event=health_probe_bug probe=%s host=%s port=%s",
            type(self._probe).__name__,
            self._host,
            self._port,
            exc_info=exc,
        )
        if self._handshaking():
            status = CheckStatus.L6_ERROR
        elif self._connected:
            status = CheckStatus.L7_BAD_RESPONSE
        else:
            status = CheckStatus.L4_ERROR
        self._finish(status, None, _describe(exc))

    # -- bytes on the wire, and TLS ---------------------------------------------------------

    def _handshaking(self) -> bool:
        return self._connected and self._probe.tls is not None and not self._secured

    def _tcp_up(self) -> None:
        """TCP is connected: the TLS handshake first if the probe has TLS (a kept
        connection had its handshake), then the check itself."""
        tls = self._probe.tls
        if tls is None or self._secured:
            self.connected()
            return
        self._tls_in = ssl.MemoryBIO()
        self._tls_out = ssl.MemoryBIO()
        try:
            self._tls = tls.context.wrap_bio(
                self._tls_in,
                self._tls_out,
                server_hostname=tls.server_name or self._host,
                session=_resumable(self._probe, self._loop.time()),
            )
        except (ssl.SSLError, ValueError) as exc:
            self._finish(CheckStatus.L6_ERROR, None, f"TLS set-up failed: {_tls_reason(exc)}")
            return
        self._handshake()

    def _handshake(self) -> None:
        tls = self._tls
        assert tls is not None
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            if self._eof:
                self._finish(
                    CheckStatus.L6_ERROR, None, "connection closed during TLS handshake"
                )
            else:
                self._send()  # our next flight (the ClientHello first), then wait to read
            return
        except ssl.SSLError as exc:  # SSLCertVerificationError included
            detail = _tls_reason(exc)
            if self._eof and isinstance(exc, ssl.SSLEOFError):
                detail = "connection closed during TLS handshake"
            self._finish(CheckStatus.L6_ERROR, None, detail)
            return
        self._secured = True
        self.connected()

    def _tls_received(self, data: bytes) -> None:
        """Raw bytes (b"": EOF) for the SSLObject: the handshake's, then the plaintext it
        decrypts, which goes to ``received`` like a plain connection's."""
        tls, incoming = self._tls, self._tls_in
        assert tls is not None and incoming is not None
        if data:
            incoming.write(data)
        else:
            self._eof = True
            incoming.write_eof()
        if not self._secured:
            self._handshake()
            if self._finished or not self._secured:
                return
        while not self._finished and (incoming.pending or tls.pending() or self._eof):
            # (Checking for bytes first saves a read that raises SSLWantReadError.)
            try:
                chunk = tls.read(_RECV_BYTES)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # close_notify, or a close without it (many servers skip it after
                # ``Connection: close``): the end of the stream either way.
                self.closed("connection closed")
                return
            except ssl.SSLError as exc:
                self.closed(f"connection lost: TLS error: {_tls_reason(exc)}")
                return
            if not chunk:
                self.closed("connection closed")
                return
            self.received(chunk)
        if self._finished:
            return
        if self._eof:
            self.closed("connection closed")
        elif self._tls_out is not None and self._tls_out.pending:
            self._send()  # OpenSSL answers something (a key update)

    def _write(self, data: bytes) -> None:
        """Queue application bytes (encrypted first over TLS) and send what the socket
        takes."""
        if self._tls is not None:
            try:
                self._tls.write(data)
            except ssl.SSLError as exc:
                self.closed(f"connection lost: TLS error: {_tls_reason(exc)}")
                return
        else:
            self._out += data
        self._send()

    def _send(self) -> None:
        """Send pending bytes (TLS records OpenSSL wrote included); then wait to read, or
        (rare: a full send buffer) to write the rest."""
        sock = self._sock
        assert sock is not None
        out = self._tls_out
        if out is not None and out.pending:
            self._out += out.read()
        if self._out:
            try:
                n = sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._lost(f"connection lost: {_describe(exc)}")
                return
            self._out = self._out[n:]
        self._watch(read=not self._out, write=bool(self._out))

    def _lost(self, why: str) -> None:
        if self._handshaking():
            self._finish(CheckStatus.L6_ERROR, None, f"{why} during TLS handshake")
        else:
            self.closed(why)

    def unlink(self) -> None:
        """Drop references that form a cycle (the HTTP parser points back at us): a probe
        must be freed by reference counting, or 3000 a second feed the cyclic GC, whose
        full passes over a big control process stop the loop for hundreds of ms."""

    # -- what the kind of probe does once connected ---------------------------------------

    def keepable(self) -> bool:
        """At teardown: hand the socket to the probe for the next check instead of closing."""
        return False

    def held(self) -> bool:
        """At the deadline: a verdict already known was reported (the rest of its response
        never came); True means nothing is left to time out."""
        return False

    def connected(self) -> None:
        """TCP connected (and the TLS handshake done): a TCP check has its verdict."""
        if self._tls is not None:
            self._finish(CheckStatus.L4_OK, None, f"TLS handshake done ({self._tls.version()})")
        else:
            self._finish(CheckStatus.L4_OK)

    def received(self, data: bytes) -> None:  # only HTTP reads
        pass

    def closed(self, why: str) -> None:
        self._finish(CheckStatus.L7_BAD_RESPONSE, None, f"{why} before response")


class _HttpCheck(_Check):
    """Sends the request, then feeds the response to llhttp until the verdict is known.

    With ``reuse_connection`` a verdict found inside a chunk is held until llhttp has seen
    the rest of that chunk, so the connection is kept only when the response ended in it,
    said keep-alive and nothing followed it (``_reusable``).
    """

    __slots__ = (
        "_body", "_code", "_ended", "_messages", "_parser", "_reusable", "_reuse",
        "_reused", "_seen", "_successor", "_verdict",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        probe: Any,
        host: str,
        port: int,
        done: OnDone,
        t0: float | None = None,
    ) -> None:
        super().__init__(loop, probe, host, port, done, t0)
        self._parser: Any = None
        self._code: int | None = None  # set once a final (non-1xx) status line is parsed
        self._body: bytearray | None = None
        self._seen = 0
        # Never kept to a host name (module docstring).
        self._reuse: bool = probe.reuse_connection and _literal_family(host) is not None
        self._reused = False  # the socket came from the previous check
        self._ended = False  # llhttp saw the end of the (first) response
        self._verdict: tuple[CheckStatus, int | None, str] | None = None
        self._messages = 0
        self._reusable = False
        self._successor: ProbeHandle | None = None  # the fresh-connection retry

    @classmethod
    def adopt(
        cls,
        loop: asyncio.AbstractEventLoop,
        probe: Any,
        host: str,
        port: int,
        done: OnDone,
        sock: socket.socket,
        born: float,
        tls: _TlsConn | None,
    ) -> _HttpCheck:
        """A check on the connection the previous check kept (connected, and through its
        TLS handshake, already)."""
        check = cls(loop, probe, host, port, done)
        check._born = born
        check._sock = sock
        check._fd = sock.fileno()
        check._reused = True
        if tls is not None:
            check._tls, check._tls_in, check._tls_out = tls
            check._secured = True
        check._poller.arm(check, check._deadline)
        loop.call_soon(check._on_connected_soon)
        return check

    def abort(self) -> None:
        super().abort()
        if self._successor is not None:
            self._successor.abort()

    def unlink(self) -> None:
        self._parser = None

    def keepable(self) -> bool:
        # Only after a pass: a failing backend must meet a new connection next time.
        return (
            self._reusable and self._verdict is not None and self._verdict[0] is CheckStatus.L7_OK
        )

    def held(self) -> bool:
        if self._verdict is None:
            return False
        self._reusable = False  # the response did not end in time: not a connection to keep
        self._finish(*self._verdict)
        return True

    def _decide(self, status: CheckStatus, code: int | None, detail: str = "") -> None:
        """A verdict from inside llhttp's callbacks: at once, or (reusing) once the chunk
        is parsed (class docstring)."""
        if not self._reuse:
            self._finish(status, code, detail)
        elif self._verdict is None:
            self._verdict = (status, code, detail)

    def _retry_fresh(self) -> None:
        """The kept connection died under our request (the backend's idle timeout met it
        on the way): the same check on a new connection, inside the same budget."""
        self._finished = True
        self._teardown()
        successor = _launch(
            _HttpCheck, self._probe, self._host, self._port, self._done, self._t0
        )
        if isinstance(successor, _Check):
            successor._extended = self._extended  # one late-timer extension per check
        self._successor = successor

    def connected(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._write(self._probe.request_bytes(self._host, self._port))

    def received(self, data: bytes) -> None:
        self._seen += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reusable = False
            if self._verdict is None:
                detail = "unexpected protocol upgrade"
                self._finish(CheckStatus.L7_BAD_RESPONSE, self._code, detail)
        except httptools.HttpParserError as exc:
            self._reusable = False  # (bytes after a judged response: its verdict stands)
            if self._verdict is None:
                detail = f"invalid HTTP response: {exc}"
                self._finish(CheckStatus.L7_BAD_RESPONSE, self._code, detail)
        verdict = self._verdict
        if verdict is not None and not self._finished:
            if (
                verdict[0] is CheckStatus.L7_OK
                and not self._ended
                and self._seen < MAX_HEAD_BYTES + MAX_BODY_BYTES
            ):
                return  # a pass whose response goes on: read to its end to keep the conn
            self._finish(*verdict)
        if not self._finished and self._code is None and self._seen > MAX_HEAD_BYTES:
            self._finish(
                CheckStatus.L7_BAD_RESPONSE, None, f"no complete headers in {self._seen} bytes"
            )

    def closed(self, why: str) -> None:
        self._reusable = False
        if self._verdict is not None:
            self._finish(*self._verdict)  # a pass held for the response's end: it stands
        elif self._reused and self._seen == 0 and not self._finished:
            self._retry_fresh()
        elif self._code is None:
            self._finish(CheckStatus.L7_BAD_RESPONSE, None, f"{why} before response")
        else:  # a body delimited by the close ended: judge what arrived
            self._judge_body()
            if self._verdict is not None:
                self._finish(*self._verdict)

    # llhttp callbacks
    def on_message_begin(self) -> None:
        self._messages += 1
        self._reusable = False  # a second message (after a 1xx, or unasked): not reused

    def on_headers_complete(self) -> None:
        if self._finished or self._verdict is not None:
            return
        code = self._parser.get_status_code()
        if 100 <= code < 200 and code != 101:
            return  # interim response (100 Continue, 103 Early Hints): the real one follows
        self._code = code
        if not any(lo <= code <= hi for lo, hi in self._probe.expect_status):
            self._decide(CheckStatus.L7_STATUS, code, f"unexpected status {code}")
        elif self._probe._needle is None:
            self._decide(CheckStatus.L7_OK, code)
        else:
            self._body = bytearray()

    def on_body(self, body: bytes) -> None:
        if self._finished or self._body is None or self._verdict is not None:
            return
        needle: bytes = self._probe._needle
        start = max(0, len(self._body) - len(needle) + 1)
        self._body += body[: MAX_BODY_BYTES - len(self._body)]
        if self._body.find(needle, start) >= 0:
            self._decide(CheckStatus.L7_OK, self._code)
        elif len(self._body) >= MAX_BODY_BYTES:
            self._judge_body()

    def on_message_complete(self) -> None:
        if self._reuse and self._messages == 1 and self._parser is not None:
            self._ended = True
            self._reusable = bool(self._parser.should_keep_alive())
        if self._code is not None:
            self._judge_body()

    def _judge_body(self) -> None:
        if self._verdict is not None:
            return
        needle = self._probe._needle
        body = self._body or b""
        if needle is None or needle in body:
            self._decide(CheckStatus.L7_OK, self._code)
        else:
            self._decide(
                CheckStatus.L7_BODY_MISMATCH,
                self._code,
                f"body substring not found in first {len(body)} bytes",
            )


class _Resolving:
    """A probe of a host name: resolve inside the budget, then try each address in turn."""

    __slots__ = ("_addrs", "_check", "_done", "_finished", "_kind", "_loop", "_probe",
                 "_refused_only", "_t0", "_task", "host", "port")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        kind: type[_Check],
        probe: Any,
        host: str,
        port: int,
        done: OnDone,
        t0: float | None = None,
    ) -> None:
        self._loop = loop
        self._kind = kind
        self._probe = probe
        self.host = host
        self.port = port
        self._done = done
        self._t0 = loop.time() if t0 is None else t0
        self._finished = False
        self._check: _Check | None = None
        self._addrs: list[tuple[int, tuple[Any, ...]]] = []
        self._refused_only = True
        self._task = loop.create_task(self._resolve())

    async def _resolve(self) -> None:
        try:
            async with asyncio.timeout_at(self._t0 + self._probe.timeout_s):
                infos = await self._loop.getaddrinfo(
                    self.host, self.port, type=socket.SOCK_STREAM
                )
        except TimeoutError:
            self._report(CheckStatus.L4_TIMEOUT, "connect timeout (name resolution)")
            return
        except (OSError, UnicodeError, ValueError) as exc:
            self._report(CheckStatus.L4_ERROR, _describe(exc))
            return
        self._addrs = [(fam, addr) for fam, _, _, _, addr in infos]
        if not self._addrs:
            self._report(CheckStatus.L4_ERROR, f"no address for {self.host}")
            return
        self._next()

    def _next(self) -> None:
        family, addr = self._addrs.pop(0)
        check = self._kind(self._loop, self._probe, self.host, self.port, self._done, self._t0)
        check.on_connect_failure = self._failed
        self._check = check
        check.connect(family, addr)

    def _failed(self, status: CheckStatus, detail: str) -> bool:
        """An address refused or failed: try the next one; report when none is left."""
        if status is not CheckStatus.L4_REFUSED:
            self._refused_only = False
        if self._addrs and not self._finished:
            self._next()
            return True
        if not self._refused_only:
            self._report(CheckStatus.L4_ERROR, detail)
            return True
        return False  # all refused: the last check reports L4_REFUSED itself

    def _report(self, status: CheckStatus, detail: str) -> None:
        if not self._finished:
            self._finished = True
            self._done(CheckResult(status, self._loop.time() - self._t0, None, detail))

    def abort(self) -> None:
        self._finished = True
        self._task.cancel()
        if self._check is not None:
            self._check.abort()


class _Poller:
    """One epoll set for every probe running on a loop; the loop watches it as one reader.

    ``batch`` counts polls: a probe that registers its socket while the events of a poll are
    dispatched takes no event of that poll (they may be for a closed socket whose number the
    new one reuses); level-triggered epoll reports what is really pending again next time.
    """

    __slots__ = ("__weakref__", "_loop", "_tick", "_tick_key", "batch", "checks", "ep", "wheel")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ep = select.epoll()
        self.checks: dict[int, _Check] = {}
        self.batch = 0
        self.wheel: dict[int, list[_Check]] = {}
        """Deadline slot (``ceil(deadline / TICK_S)``) -> probes due then."""
        self._loop = weakref.ref(loop)  # the loop keys _POLLERS weakly: no strong ref back
        self._tick: asyncio.TimerHandle | None = None
        self._tick_key = 0
        loop.add_reader(self.ep.fileno(), self._ready)
        weakref.finalize(loop, self.ep.close)

    def arm(self, check: _Check, when: float) -> None:
        """Call ``check._on_timeout()`` at ``when`` (rounded up to the next slot) unless it
        has finished by then."""
        key = math.ceil(when / TICK_S)
        bucket = self.wheel.get(key)
        if bucket is None:
            self.wheel[key] = [check]
        else:
            bucket.append(check)
        if self._tick is None or key < self._tick_key:
            self._schedule(key)

    def _schedule(self, key: int) -> None:
        loop = self._loop()
        if loop is None:
            return
        if self._tick is not None:
            self._tick.cancel()
        self._tick_key = key
        self._tick = loop.call_at(key * TICK_S, self._on_tick)

    def _on_tick(self) -> None:
        self._tick = None
        loop = self._loop()
        if loop is None:
            return
        limit = math.floor((loop.time() + 1e-6) / TICK_S)
        for key in sorted(k for k in self.wheel if k <= limit):
            for check in self.wheel.pop(key):
                if not check._finished:
                    check._on_timeout()
        if self.wheel and self._tick is None:
            self._schedule(min(self.wheel))

    def _ready(self) -> None:
        self.batch += 1
        batch = self.batch
        try:
            events = self.ep.poll(0)
        except InterruptedError:
            return
        checks = self.checks
        for fd, ev in events:
            check = checks.get(fd)
            if check is not None and check._batch != batch:
                check.event(ev)


_POLLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Poller] = (
    weakref.WeakKeyDictionary()
)


def _poller(loop: asyncio.AbstractEventLoop) -> _Poller:
    poller = _POLLERS.get(loop)
    if poller is None:
        poller = _POLLERS[loop] = _Poller(loop)
    return poller


def _connect_failure(err: int) -> tuple[CheckStatus, None, str]:
    if err == errno.ECONNREFUSED:
        return CheckStatus.L4_REFUSED, None, "connection refused"
    return CheckStatus.L4_ERROR, None, f"{errno.errorcode.get(err, err)}: {os.strerror(err)}"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


_SSL_NOISE = re.compile(r"^\[[A-Z0-9_]+: [A-Z0-9_]+\] | \(_ssl\.c:\d+\)$")


def _tls_reason(exc: BaseException) -> str:
    """OpenSSL's reason in words: "certificate verify failed: Hostname mismatch, ...",
    "wrong version number" (without the ``[SSL: ...]`` prefix and the ``_ssl.c`` line)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and len(exc.args) > 1 and isinstance(exc.args[1], str):
        text = _SSL_NOISE.sub("", exc.args[1])
        if exc.reason == "WRONG_VERSION_NUMBER":
            text += " (is the backend speaking TLS?)"
        return text
    return str(exc) or type(exc).__name__


def _goodbye(
    sock: socket.socket, tls: ssl.SSLObject, out: ssl.MemoryBIO, secured: bool
) -> None:
    """Before closing: what OpenSSL still has for the backend (an alert after a failed
    handshake; after a good one, close_notify), in one non-blocking send, best effort."""
    if secured:
        # SSLWantReadError: close_notify is written; the backend's is not awaited.
        with contextlib.suppress(ssl.SSLError):
            tls.unwrap()
    if out.pending:
        with contextlib.suppress(OSError):
            sock.send(out.read())


def _check_timeout(timeout_s: float) -> None:
    if not timeout_s > 0:
        raise HealthConfigError("timeout_s", timeout_s, "must be > 0")


def _check_status_ranges(ranges: Sequence[tuple[int, int]]) -> None:
    if not ranges:
        raise HealthConfigError("expect_status", ranges, "must list at least one range")
    for lo, hi in ranges:
        if not 100 <= lo <= hi <= 599:
            raise HealthConfigError(
                "expect_status", ranges, "each range must be [lo, hi] with 100 <= lo <= hi <= 599"
            )


def _has_ctl(s: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in s)


def _bracket(host: str) -> str:
    """IPv6 literals need brackets in Host; only they contain ':' (cheaper than parsing)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
