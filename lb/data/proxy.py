"""The HTTP/1.1 reverse proxy engine: one ``ProxyServer`` per listener in a worker process.

The hot path is asyncio Protocols and httptools (llhttp, strict: no leniency flag is ever
set) on both sides; no streams, no tasks per request, no per-request timers. A request is
parsed into a ``_Request``, dispatched to a backend picked from the ``Pool`` (an idle
keep-alive connection when there is one), its body streamed with backpressure, and the
response relayed as it arrives. Output produced while handling one read is corked and
written once (``_Conn.send`` + ``ProxyServer.flush``), so a small response costs one write.

Timeouts are deadlines on connections, checked by one ticker per server (interval a tenth
of the shortest timeout, 10-500 ms): header (408 once a byte of a head has arrived; a silent
new connection is closed quietly), keep-alive idle (closed quietly), body read gap and
client-not-reading (client_idle_timeout_s), whole body (client_body_timeout_s, 408), backend
connect, backend first byte and read gap (response_timeout_s), whole backend exchange
(exchange_timeout_s, 504 or a cut), idle pooled backend connections (idle_timeout_s),
upgraded tunnels idle both ways (client_idle_timeout_s, as TCP mode).

A refused request (400/405/408/413/414/417/431/501/505) is answered in its turn with
``Connection: close``, counted by reason, and the connection lingers briefly reading and
dropping input so the answer is not destroyed by a reset. A body limit crossed mid-stream
cuts the backend connection, so a backend never holds a complete invalid request.

Choices worth knowing (docs/configuration.md repeats them for operators):

- ``Expect: 100-continue`` is forwarded; the backend's ``100 Continue`` is relayed.
- Pipelined requests are parsed ahead but sent upstream one at a time, answered in order.
  Reading pauses while one is waiting, and a big read is parsed in 16 KiB slices that stop
  once PIPELINE_MAX requests wait (the rest stays unparsed bytes), so a pipelining client
  gets at most a few hundred small requests parsed ahead, never a whole read's worth.
- Absolute-form targets (``GET http://host/path``) are turned into origin-form and their
  authority replaces Host (RFC 9112 §3.2.2); CONNECT gets 405; ``OPTIONS *`` passes.
- Request trailers are dropped; chunked bodies are re-chunked with the same data. What is
  not body data in a chunked body is counted per read as it arrives (never per completed
  line: llhttp keeps a partial trailer line in memory): trailers past max_header_bytes get
  431, chunk framing (size lines, extensions) past 16 bytes per chunk plus twice the data
  plus max_header_bytes gets 400 (the overhead rule of Go's net/http).
- A request with ``Connection: close`` (or HTTP/1.0 without keep-alive) is the last one
  read (RFC 9112 §9.6): bytes after it are dropped unanswered; likewise after any response
  we send with ``Connection: close``, the connection closes once it is written.
- A response that starts before its request body is complete closes the client connection
  after it; the backend connection is not reused.
- Retries: connect failures on another backend (``retries``); an idempotent request whose
  reused keep-alive connection closed before any response byte once more on a fresh one;
  an idempotent request reset before any response byte, or timed out with
  ``retry_on_timeout``, on another backend, only while all of its body sent so far is still
  held (<= 64 KiB). A non-idempotent request that reached a backend is never sent again;
  it is sent on a reused connection only when that connection was idle < 1 s.
- Header limits (max_headers, max_header_bytes) are checked once the head is parsed; while
  it is still arriving, the bytes it may take are bounded per read (request line + header
  limits), so a slow or endless head never grows without bound.
- A backend connection goes back to the keep-alive pool only when nothing follows its
  response: bytes after it in the same read, bytes arriving while it is idle, or bytes
  already in the kernel's buffer when it is taken again (FIONREAD, one ioctl per reuse)
  each discard it, so stray bytes (a body after HEAD/204/304, a second response) are never
  read as the answer to the next request.
- Response header blocks are filtered by a pure function whose results are memoised for
  identical blocks (a backend's answers usually differ only by Date, once a second).
- 502/503/504 are logged at WARNING as ``event=proxy_error`` key=value lines, at most
  LOG_ERRORS_PER_S per second per listener (the rest counted in ``suppressed_before``);
  refused requests are counted in the stats and logged at DEBUG only.

TLS and the answers pairlb gives itself (issue 15):

- A TLS listener (``self.tls``, set by the worker before start) gets connections already
  decrypted by the event loop's SSL transport: the engine is the same, with three changes
  decided once per connection or per listener, never per request: X-Forwarded-Proto and
  Forwarded's ``proto=`` say https (the per-peer ClientContext carries it); with
  ``hsts_max_age_s`` a Strict-Transport-Security line (built once, ``self.hsts``) is added
  to every final response without one (the backend's own is kept, never doubled; the check
  is memoised with the response head) and to the answers pairlb makes itself; and EOF from
  the client is not a half-close (an SSL transport closes on it whatever the protocol says,
  so ``_TlsClient.eof_received`` never asks to stay open; a request sent before the
  client's close_notify is cut, as asyncio's SSL has no half-close).
- ``[pool.tls]``: backend connections are opened with ``self.backend_tls[pool]``
  (``server_hostname`` = ``server_name`` or the backend's host; an IP host is checked
  against the certificate's IP addresses). A handshake or verification failure is a
  connect failure (502, retried on another backend like a refused connect, counted as
  ``tls_verify`` or ``tls_handshake``). An idle TLS connection is reused only when its
  SSLObject holds no decrypted byte and the kernel holds no byte (FIONREAD on the raw
  socket): a record there may be application data (stray) or a close_notify, so it is
  discarded as stray. TLS 1.3 session tickets arrive with the first response and are
  consumed by the loop before the connection goes idle; measured against Python and nginx
  TLS backends, keep-alive reuse stays whole (see tests/test_proxy_tls.py). Idle backend
  connections are dropped when the pool's TLS settings or context change (a reload).
- ``redirect_to_https`` (plain listener): every request but an ACME challenge is answered
  ``301`` (GET, HEAD) or ``308`` (others, which keep method and body) with ``Location:
  https://HOST[:https_port]TARGET``, ``Content-Length: 0``; HOST is the request's Host (or
  absolute-form authority) without its port, checked strictly (``H.https_location``: a DNS
  name or bracketed IPv6 literal, else 400 ``bad_redirect_host`` and no redirect); a request
  without a usable Host (HTTP/1.0 without one, an empty one) names the address the client
  connected to. Nothing reaches a backend. Keep-alive as for the engine's own errors: a
  request whose body has not all arrived is answered at once with ``Connection: close``
  (the rest of the body is read and dropped while lingering), as is an upgrade request.
- ``acme_challenge_dir``: ``GET``/``HEAD /.well-known/acme-challenge/TOKEN`` with TOKEN of
  1-255 base64url characters (RFC 8555 §8.3: ``[A-Za-z0-9_-]``) is answered 200 with the
  file DIR/TOKEN (``application/octet-stream``, at most ACME_MAX_BYTES), on every listener
  with the setting, plain (also with redirect_to_https: challenges are not redirected) or
  TLS. Anything else under that prefix is answered 404 here, never forwarded: another
  method, a token with other characters (``.``, ``%``, so no ``..`` and no encoded slash),
  a query string, a trailing slash, a missing or unreadable file, a symlink, a file that is
  not regular or is too big. The file is opened with O_NOFOLLOW relative to a descriptor of
  DIR (opened per challenge, so a directory recreated by certbot is seen), synchronously (a
  few requests per renewal). The worker runs unprivileged: DIR and its files must be
  readable by the worker user (``certbot --webroot`` writes 0644 files in 0755 dirs).
  Counted in ``ProxyServer.acme_served`` / ``acme_missing``; redirects in ``redirects``.

Imports no control-plane module: the engine is fed a Pool and configs, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import ssl
import stat
import termios
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Final, cast

import httptools

from lb.config import ListenerConfig, PoolConfig
from lb.data import accesslog as A
from lb.data import headers as H
from lb.data import proxyproto as pp
from lb.data.listener import ListenerServer, unread_bytes
from lb.data.pool import Backend, Ejection, Outcome, Pool
from lb.maglev import key_hash
from lb.stats import Stats

logger: Final = logging.getLogger(__name__)

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
"""RFC 9110 §9.2.2."""
REPLAY_LIMIT: Final = 64 * 1024
"""Body bytes kept for a possible retry; a bigger body makes the request non-replayable."""
BODY_BUFFER_LIMIT: Final = 64 * 1024
"""Body bytes buffered while no backend connection is ready before reading pauses."""
SAFE_REUSE_S: Final = 1.0
"""A non-idempotent request reuses an idle connection only when it was idle less than this
(a backend's own keep-alive timeout is the usual cause of the stale-connection race)."""
FEED_SLICE: Final = 16 * 1024
"""Reads bigger than this are parsed in slices (see PIPELINE_MAX)."""
PIPELINE_MAX: Final = 8
"""Pipelined requests parsed ahead before the rest of a read is left unparsed."""
MAX_RESPONSE_HEAD: Final = 64 * 1024
"""A backend response head larger than this is a bad response (502)."""
PASS_BODY_MIN: Final = 16 * 1024
"""A Content-Length response body at least this large goes to the client as the reads
bring it, without the parser: no copy of each piece by it (a new parser for the next
response costs about one 16 KiB copy)."""
WRITE_LATER_BYTES: Final = 64 * 1024
"""Output above this, queued by one event, is written once the loop's ready events have all
run (``ProxyServer.flush``), not at once. uvloop holds writes up to a transport's high-water
mark (64 KiB) until then, and writes larger ones at once: one write per large response
between events wakes the client's reader each time (a sleeping peer on another core is an
interprocessor interrupt); written together, the reader takes several per wakeup."""
WRITE_NOW_BYTES: Final = 128 * 1024
"""...but output above this is written at the end of the event that queued it, as before:
a stream, not a response. Held back, it would keep the transport from telling us to pause
(``pause_writing``), and libuv reads a ready socket up to 32 times per event (256,000 bytes
each): a stalled client would make the proxy hold megabytes of the backend's body."""
LOG_ERRORS_PER_S: Final = 20
LINGER_S: Final = 2.0
LINGER_BYTES: Final = 1 << 20
CHUNK_ALLOWANCE: Final = 16
"""Framing bytes allowed per chunk (besides twice its data) before they count as excess."""
ACME_PREFIX: Final = b"/.well-known/acme-challenge/"
ACME_MAX_BYTES: Final = 64 * 1024
"""A challenge file larger than this is not served (404): a key authorization is ~90 bytes."""
_ACME_TOKEN: Final = re.compile(rb"[A-Za-z0-9_-]{1,255}")
INF: Final = float("inf")
_RETIRED: Final = ("", 0)
"""The idle-pool key of a backend connection that must not be reused (see ProxyServer)."""
# What a maglev pool hashes (``hash_on``): decided once per pool, read per request.
_H_NONE: Final = 0
_H_SOURCE: Final = 1
_H_URI: Final = 2
_H_HEADER: Final = 3
_H_COOKIE: Final = 4
_FIONREAD: Final = termios.FIONREAD
_FIONREAD_BUF: Final = bytearray(4)
_NOTHING: Final = bytes(4)


# Client read pause reasons (bit mask).
_P_UPSTREAM: Final = 1  # the backend connection's write buffer is full
_P_BUFFER: Final = 2  # body buffered while waiting for a backend connection
_P_QUEUE: Final = 4  # a pipelined request is waiting its turn
_P_STOP: Final = 8  # no more parsing (error queued, upgrade waiting for 101)
_P_BACKLOG: Final = 16  # part of a read is kept unparsed while the pipeline queue is full

# Answers the proxy makes itself (``_Request.local``).
_L_REDIRECT: Final = 1
_L_ACME: Final = 2

# Client parse states.
_IDLE: Final = 0
_HEAD: Final = 1
_BODY: Final = 2

_ERROR_TEXT: Final = {
    400: b"Bad request.\n",
    404: b"Not found.\n",
    405: b"Method not allowed.\n",
    408: b"Request timeout: the request was not received in time.\n",
    413: b"Request body too large.\n",
    414: b"Request line too long.\n",
    417: b"Expectation failed.\n",
    431: b"Request header fields too large.\n",
    501: b"Not implemented.\n",
    502: b"Bad gateway: the backend failed to answer.\n",
    503: b"Service unavailable: no backend is available.\n",
    504: b"Gateway timeout: the backend did not answer in time.\n",
    505: b"HTTP version not supported.\n",
}

# llhttp error text -> (status, reason label). Matched by substring, lower case.
_PARSE_ERRORS: Final[tuple[tuple[str, int, str], ...]] = (
    ("invalid http version", 505, "bad_version"),
    ("pri/upgrade", 505, "http2_preface"),
    ("can't be present with content-length", 400, "content_length_and_transfer_encoding"),
    ("duplicate content-length", 400, "duplicate_content_length"),
    ("content-length", 400, "bad_content_length"),
    ("request has invalid `transfer-encoding`", 501, "unsupported_transfer_coding"),
    ("transfer-encoding", 400, "bad_transfer_encoding"),
    ("whitespace", 400, "bad_header_whitespace"),
    ("header value char", 400, "bad_header_value"),
    ("header token", 400, "bad_header_name"),
    ("header field char", 400, "bad_header_name"),
    ("chunk", 400, "bad_chunk"),
    ("lf after header value", 400, "bad_line_ending"),
    ("crlf", 400, "bad_line_ending"),
    ("expected lf", 400, "bad_line_ending"),
    ("expected cr", 400, "bad_line_ending"),
    ("http/", 400, "bad_request_line"),
)


_RESP_CACHE: Final[dict[bytes, H.ResponseHeaders]] = {}


class _Reject(Exception):
    """Raised from a parser callback to refuse the request being parsed."""


class _Stop(Exception):
    """Raised from a parser callback to stop parsing (connection is going away). A new
    one each time: one shared instance raised again and again grew its traceback by every
    raise, and the frames it held kept whole requests and connections alive."""


class _HeadDone(Exception):
    """Raised from the response parser when a response to HEAD has ended at its head (a
    new one each time, as _Stop)."""


class _BodyNext(Exception):
    """Raised from the response parser at the head of a large Content-Length response: its
    body bypasses the parser (_Upstream.pass_body; a new one each time, as _Stop)."""


def error_response(
    status: int, *, close: bool, extra: bytes = b"", with_body: bool = True
) -> bytes:
    """A short text response the proxy answers itself (``with_body=False``: to HEAD)."""
    body = _ERROR_TEXT.get(status, b"Error.\n")
    return b"".join(
        (
            H.status_line(status, b""),
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: ",
            str(len(body)).encode(),
            b"\r\n",
            b"Connection: close\r\n" if close else b"",
            extra,
            b"Cache-Control: no-store\r\n\r\n",
            body if with_body else b"",
        )
    )


class _PoolKnobs:
    """The pool settings a request reads as it goes, copied out of the pool's config once
    per reload: an attribute of the pydantic model is a generic lookup (through the model's
    ``__getattr__``), a few of them per request."""

    __slots__ = ("count_5xx", "exchange_timeout_s", "idle_timeout_s", "max_idle_per_backend",
                 "passive_enabled", "response_timeout_s", "retries", "retry_on_timeout")

    def __init__(self, cfg: PoolConfig) -> None:
        self.response_timeout_s = cfg.response_timeout_s
        self.exchange_timeout_s = cfg.exchange_timeout_s
        self.retries = cfg.retries
        self.retry_on_timeout = cfg.retry_on_timeout
        self.passive_enabled = cfg.passive.enabled
        self.count_5xx = cfg.passive.count_5xx
        self.max_idle_per_backend = cfg.max_idle_per_backend
        self.idle_timeout_s = cfg.idle_timeout_s


class _Request(H.RequestHead):
    """One request and the state of its exchange with a backend.

    No __slots__ on purpose: most fields keep their class-level default for the whole
    request, and an instance dict with a handful of entries is cheaper to make than thirty
    slot assignments per request.
    """

    method = b""
    keep_alive = True
    http10 = False
    upgrade = False
    idempotent = True
    head_only = False
    complete = False
    body_seen = 0
    pending: list[bytes] | None = None
    """Body pieces (already framed) not yet sent upstream."""
    pending_bytes = 0
    replay: list[bytes] | tuple[()] | None = ()
    """Every body piece sent upstream so far, for a retry; None once over REPLAY_LIMIT."""
    replay_bytes = 0
    error: tuple[int, str] | None = None
    backend: Backend | None = None
    upstream: _Upstream | None = None
    excluded: list[Backend] | None = None
    stale_retried = False
    retried = 0
    """Attempts after the first (the access log's retries)."""
    force_fresh = False
    last_failure: tuple[int, str, str] | None = None
    resp_started = False
    finished = False
    conn_gen = 0
    t0 = 0.0
    tunnel_buf: list[bytes] | None = None
    local = 0
    """_L_REDIRECT or _L_ACME: answered by the proxy (with ``error`` set, see dispatch)."""
    local_arg = b""
    """The redirect's Location, or the ACME token (b"": not a valid one, 404)."""
    hkey: int | None = None
    """A maglev pool's key hash (None: no key, or not a maglev pool)."""
    sticky: bytes | None = None
    """The sticky cookie's value the request came with."""
    set_cookie = b""
    """The sticky cookie's Set-Cookie line, when the backend it names is not this one."""
    end_reason: str | None = None
    """Why pairlb answered or cut it (an error reason): the access log's termination."""
    rid: bytes | None = None
    lg: _LogState | None = None
    """The access log's facts about the request (only when the log is on)."""

    def __init__(self, pool: Pool, pool_cfg: PoolConfig, knobs: _PoolKnobs) -> None:
        self.pool = pool
        self.pool_cfg = pool_cfg
        self.knobs = knobs
        self.attempts_left = knobs.retries


class _LogState:
    """What the access log needs of a request besides its head: in slots of their own
    object, because nine more keys in the request's instance dict cost it a resize (about
    3x the time of this object, measured)."""

    __slots__ = ("connect_s", "logged", "referer", "resp_status", "t_first", "t_pick",
                 "t_sent", "target", "ua")

    def __init__(self, target: bytes) -> None:
        self.target = target
        self.ua: bytes | None = None
        self.referer: bytes | None = None
        self.logged = False
        self.resp_status = 0
        self.t_pick = -1.0
        self.t_sent = -1.0
        self.t_first = -1.0
        self.connect_s = -1.0


def _header(hdrs: list[tuple[bytes, bytes]], lname: bytes) -> bytes | None:
    """The first field named ``lname`` (lower case), or None."""
    for name, value in hdrs:
        if len(name) == len(lname) and name.lower() == lname:
            return value
    return None


def _cookie(hdrs: list[tuple[bytes, bytes]], cname: bytes) -> bytes | None:
    """The value of cookie ``cname`` in the request's Cookie fields (RFC 6265: pairs split
    by ";", the first of a name wins), or None."""
    for name, value in hdrs:
        if len(name) == 6 and name.lower() == b"cookie":
            for pair in value.split(b";"):
                k, eq, v = pair.strip().partition(b"=")
                if eq and k == cname:
                    return v.strip(b'"')
    return None


def _phase(req: _Request) -> str:
    """What an unfinished request was doing (the access log's second termination char)."""
    if not req.complete:
        return A.PHASE_REQUEST
    if req.resp_started:
        return A.PHASE_DATA
    if req.upstream is not None:
        return A.PHASE_HEADERS
    if req.backend is not None:
        return A.PHASE_CONNECT
    return A.PHASE_QUEUE


def _keep_for_replay(req: _Request, pieces: list[bytes]) -> None:
    replay = req.replay
    if replay is None:
        return
    n = req.replay_bytes
    for piece in pieces:
        n += len(piece)
    req.replay_bytes = n
    if n > REPLAY_LIMIT:
        req.replay = None
    elif replay:
        replay.extend(pieces)
    else:
        req.replay = list(pieces)


class _Conn:
    """Corked output: ``send`` queues bytes, the server's ``flush`` writes them once.

    An asyncio protocol by duck typing (every callback is defined on the subclasses), not by
    inheritance: that keeps the hot-path classes compilable by mypyc, whose native classes
    cannot derive from asyncio.Protocol.
    """

    __slots__ = ("closed", "nout", "nsent", "out", "srv", "transport")

    def __init__(self, srv: ProxyServer) -> None:
        self.srv = srv
        self.transport: Any = None
        self.out: list[bytes | memoryview] | None = None
        self.closed = False
        self.nsent = 0
        """Bytes given to ``send`` so far, written or still queued, less what a close threw
        away (the access log's bytes out: counted here, so the log never sums the queue)."""
        self.nout = 0
        """Bytes in ``out``."""

    def send(self, data: bytes) -> None:
        self._queue(data, len(data))

    def send_view(self, data: memoryview) -> None:
        """``send`` for a slice of a read, not copied out of it."""
        self._queue(data, len(data))

    def _queue(self, data: bytes | memoryview, n: int) -> None:
        self.nsent += n
        nout = self.nout + n
        self.nout = nout
        out = self.out
        if out is None:
            self.out = [data]
            self.srv.dirty.append(self)
        else:
            out.append(data)
            if nout > WRITE_NOW_BYTES >= nout - n:
                # Waiting for the end of the turn (ProxyServer.later) and now a stream:
                # flushed with the event that queued it (once, as it crosses the line).
                self.srv.dirty.append(self)

    def flush_out(self) -> None:
        out = self.out
        if out is None:
            return
        self.out = None
        self.nout = 0
        if self.closed:
            self.nsent -= sum(map(len, out))  # thrown away: never sent
            return
        if len(out) == 1:
            self.transport.write(out[0])
        else:
            # uvloop hands the pieces to one writev: a large body is not copied to join it
            self.transport.writelines(out)

    def close(self) -> None:
        """Graceful: what was sent is flushed first."""
        self.flush_out()
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        out = self.out
        if out is not None:
            self.out = None
            self.nout = 0
            self.nsent -= sum(map(len, out))  # thrown away: never sent
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()


def _write_out(c: _Conn) -> None:
    """``c.flush_out()`` for the server's lists: a transport that refuses the write (none is
    known to) ends that connection and no other, so no queued output is left stranded."""
    try:
        c.flush_out()
    except Exception as exc:  # any refusal: this connection cannot go on
        logger.warning("event=proxy_write_failed error=%r", exc)
        c.abort()


class _Upstream(_Conn):
    """A connection to a backend; idle in the server's pool or serving one request."""

    __slots__ = (
        "backend_keep",
        "body_left",
        "client",
        "deadline",
        "eof_body",
        "fd",
        "got_eof",
        "head_buf",
        "head_rest",
        "idle_since",
        "interim",
        "key",
        "parser",
        "rechunk",
        "req",
        "resp_done",
        "reusable",
        "rpaused",
        "rx_at",
        "served",
        "status",
        "tunnel",
        "wpaused",
        "xdeadline",
        "xleft",
    )

    def __init__(self, srv: ProxyServer, key: tuple[str, int]) -> None:
        super().__init__(srv)
        self.key = key
        self.parser = httptools.HttpResponseParser(self)
        self.req: _Request | None = None
        self.client: _Client | None = None
        self.deadline = INF
        self.xdeadline = INF
        """The whole exchange's deadline (exchange_timeout_s); INF while idle, and while we
        stop reading because the client does not (a slow download is not the backend's)."""
        self.xleft = -1.0
        """Time left of xdeadline while reading is paused; -1 when not paused."""
        self.fd = -1
        self.idle_since = 0.0
        self.served = 0
        self.status = 0
        self.head_buf: bytes | None = None
        self.head_rest = 0
        self.interim = False
        self.resp_done = False
        self.reusable = True
        self.backend_keep = True
        self.rechunk = False
        self.eof_body = False
        self.got_eof = False
        self.tunnel = False
        self.rpaused = False
        self.wpaused = False
        self.rx_at = 0.0
        """The loop's time when the bytes being parsed arrived (the log's first byte)."""
        self.body_left = -1
        """Bytes of a passed-through body still to come (-1: the parser reads the bytes)."""

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.fd = sock.fileno()
        self.srv.upstreams.add(self)

    def has_stray_bytes(self) -> bool:
        """Bytes already in the kernel's receive buffer of an idle connection (not read by the
        loop yet): whatever they are, they are not the answer to the next request."""
        if self.fd < 0:
            return False
        try:
            fcntl.ioctl(self.fd, _FIONREAD, _FIONREAD_BUF)
        except OSError:
            return True
        return _FIONREAD_BUF != _NOTHING

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        srv = self.srv
        srv.upstreams.discard(self)
        req = self.req
        if req is None:
            srv.forget_idle(self)
            return
        client = self.client
        assert client is not None
        if self.tunnel:
            self.req = None
            client.tunnel_closed(req)
        elif self.resp_done:
            self._complete()
        elif req.resp_started and self.eof_body and self.status >= 200:
            # A close-delimited body ends here, successfully.
            if self.rechunk:
                client.send(b"0\r\n\r\n")
            self.reusable = False
            self._complete()
        else:
            self.detach()
            client.upstream_failed(req, self, "reset" if req.resp_started else "closed")
        srv.flush()

    def eof_received(self) -> bool:
        self.got_eof = True
        client = self.client
        if self.tunnel and client is not None and not client.closed and not client.eof:
            # Half-close passes through; the tunnel ends when both sides have said EOF.
            t = client.transport
            if t.can_write_eof():
                client.flush_out()
                t.write_eof()
                return True
        return False

    def pause_writing(self) -> None:
        self.wpaused = True
        client = self.client
        if client is not None:
            client.pause(_P_UPSTREAM)
            if self.req is not None and not self.req.complete:
                # The backend is not taking the body: its progress is now what we time.
                self.deadline = self.srv.time() + self.req.knobs.response_timeout_s

    def resume_writing(self) -> None:
        self.wpaused = False
        client = self.client
        if client is not None:
            client.unpause(_P_UPSTREAM)
            self.srv.flush()

    def data_received(self, data: bytes) -> None:
        req = self.req
        if req is None:
            # Bytes on an idle connection: the backend broke the protocol. Never reuse it.
            self.srv.forget_idle(self)
            self.abort()
            self.srv.stray_bytes(self)
            return
        client = self.client
        assert client is not None
        if self.tunnel:
            client.deadline = self.srv.time() + self.srv.idle_timeout_s
            client.send(data)
            client.flush_out()
            return
        now = self.rx_at = self.srv.time()
        if not self.rpaused:
            self.deadline = now + req.knobs.response_timeout_s
        if self.body_left >= 0:
            self.pass_body(data, client)
            if self.resp_done:
                self._complete()
            if self.srv.dirty:
                self.srv.flush()
            return
        hb = self.head_buf
        if hb is not None:
            # Still waiting for the response head: keep its bytes (usually one read; a
            # large one not copied: compiled, ``b"" + data`` copies all of it).
            self.head_buf = hb + data if hb else data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._start_tunnel(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _BodyNext):
                # The parser stopped at the head: what follows it in this read is body.
                n = self.head_rest
                if n:
                    self.pass_body(memoryview(data)[len(data) - n :] if n >= 4096
                                   else data[len(data) - n :], client)
            elif self.resp_done:
                if isinstance(exc.__context__, _HeadDone):
                    # A new parser for the next response; bytes after the head are junk.
                    self.parser = httptools.HttpResponseParser(self)
                    if self.head_rest:
                        self.reusable = False
                else:
                    self.reusable = False
            elif self.req is req:
                self._bad_response(req, str(exc))
        else:
            hb = self.head_buf
            if hb is not None and len(hb) > MAX_RESPONSE_HEAD and self.req is req:
                self._bad_response(req, "response head too large")
        if self.resp_done:
            self._complete()
        if self.srv.dirty:
            self.srv.flush()

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.resp_done:
            self.reusable = False  # more than one response to one request
            raise _Stop()

    def on_headers_complete(self) -> None:
        req = self.req
        client = self.client
        assert req is not None and client is not None
        status = self.parser.get_status_code()
        self.status = status
        lg = req.lg
        if lg is not None and (status >= 200 or status == 101):
            lg.resp_status = status  # what the client got, if the response is cut later
            if lg.t_first < 0:
                lg.t_first = self.rx_at
        # The raw head: llhttp has validated it (strict), so lines end in CRLF.
        buf = self.head_buf
        assert buf is not None
        end = buf.find(b"\r\n\r\n")
        if end > MAX_RESPONSE_HEAD:
            raise _Reject("response head too large")  # arrived whole, in one read
        sl = buf.find(b"\r\n")
        line = buf[: sl + 2]
        block = buf[sl + 2 : end + 2] if end > sl else b""
        if not line.startswith(b"HTTP/1.1 "):
            line = H.status_line(status, buf[13:sl])
        if status < 200:
            self.interim = True
            self.head_buf = buf[end + 4 :]  # the next head starts right after this one
            if status == 101:
                if not req.upgrade or not req.complete:
                    raise _Reject("101 to a request that did not ask for an upgrade")
                rh = H.filter_response_block(block, keep_upgrade=True)
                client.send(line + rh.fields + req.set_cookie
                            + b"Connection: upgrade\r\n\r\n")
                req.resp_started = True
                return
            if not req.http10:
                client.send(line + H.filter_response_block(block).fields + b"\r\n")
            return
        self.head_buf = None
        self.head_rest = len(buf) - (end + 4)  # counted, not sliced off: the body goes on
        self.interim = False
        self.backend_keep = self.parser.should_keep_alive()
        # filter_response_block is pure: a backend that answers alike (within the second
        # its Date stays the same) costs one dict lookup instead of a scan.
        cached = _RESP_CACHE.get(block)
        if cached is not None:
            rh = cached
        else:
            rh = H.filter_response_block(block)
            if len(block) <= 1024:
                if len(_RESP_CACHE) >= 512:
                    _RESP_CACHE.clear()
                _RESP_CACHE[block] = rh
        keep = req.keep_alive and req.complete and not client.closing and not self.srv.draining
        head_only = req.head_only or status == 204 or status == 304
        extra = b""
        self.rechunk = False
        self.eof_body = False
        if head_only:
            if rh.te_value is not None and not req.http10:
                # No body follows, but the field describes the one a GET would get.
                extra = b"Transfer-Encoding: " + rh.te_value + b"\r\n"
        else:
            if rh.chunked:
                if req.http10:
                    keep = False  # the body goes raw, delimited by our close
                else:
                    self.rechunk = True
                    extra = b"Transfer-Encoding: " + rh.te_value + b"\r\n"  # type: ignore[operator]
            elif rh.content_length < 0:
                self.eof_body = True
                keep = False
                if rh.te_value is not None:
                    extra = b"Transfer-Encoding: " + rh.te_value + b"\r\n"
        if req.upgrade:
            keep = False  # the client asked to switch and was refused: start afresh
        if req.http10:
            extra += b"Connection: keep-alive\r\n" if keep else b"Connection: close\r\n"
        elif not keep:
            extra += b"Connection: close\r\n"
        if not keep:
            client.closing = True
        hsts = self.srv.hsts
        if hsts:
            extra += rh.hsts_for(hsts)
        if req.set_cookie:
            extra += req.set_cookie
        client.send(line + rh.fields + extra + b"\r\n")
        req.resp_started = True
        backend = req.backend
        assert backend is not None
        if status >= 500 and req.knobs.count_5xx:
            self.srv.observe(req, backend, Outcome.HTTP_5XX)
        elif backend.failures_in_row:
            self.srv.observe(req, backend, Outcome.OK)
        if req.head_only:
            self.resp_done = True
            raise _HeadDone()
        if (rh.content_length >= PASS_BODY_MIN and not head_only and rh.te_value is None
                and not self.eof_body):
            self.body_left = rh.content_length
            raise _BodyNext()

    def pass_body(self, data: bytes | memoryview, client: _Client) -> None:
        """Body bytes of a Content-Length response, relayed as they came (no parser);
        at its end a new parser for the next response. Bytes past the end are the
        backend's error: not relayed, and the connection is not reused."""
        n = len(data)
        left = self.body_left
        if n >= left:
            if n > left:
                self.reusable = False
                data = data[:left]
            self.body_left = -1
            self.parser = httptools.HttpResponseParser(self)
            self.resp_done = True
        else:
            self.body_left = left - n
        if isinstance(data, bytes):
            if data:
                client.send(data)
        elif data:
            client.send_view(data)

    def on_body(self, data: bytes) -> None:
        client = self.client
        assert client is not None
        if self.rechunk:
            client.send(b"%x\r\n" % len(data))
            client.send(data)
            client.send(b"\r\n")
        else:
            client.send(data)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.rechunk:
            assert self.client is not None
            self.client.send(b"0\r\n\r\n")
        self.resp_done = True

    # -- exchange -----------------------------------------------------------------------------

    def attach(self, req: _Request, client: _Client, now: float) -> None:
        """Start sending ``req`` on this connection (``now``: the loop's time, read by the
        caller in this turn; the request is sent in it)."""
        self.req = req
        self.client = client
        req.upstream = self
        self.resp_done = False
        self.interim = False
        self.status = 0
        self.reusable = True
        self.head_buf = b""
        self.body_left = -1
        lg = req.lg
        if lg is not None:
            lg.t_sent = now
            if lg.connect_s < 0:
                lg.connect_s = 0.0  # an idle connection, reused
        pending = req.pending
        if pending:
            req.pending = None
            req.pending_bytes = 0
            self.send(req.head)
            for piece in pending:
                self.send(piece)
            _keep_for_replay(req, pending)
            client.unpause(_P_BUFFER)
        elif req.complete and self.out is None:
            self.transport.write(req.head)  # nothing follows: no need to cork
        else:
            self.send(req.head)
        if req.complete:
            self.deadline = now + req.knobs.response_timeout_s
            xt = req.knobs.exchange_timeout_s
            if xt:
                self.xdeadline = now + xt
        else:
            self.deadline = INF  # the body's pace is the client's (client_body_timeout_s)
        if client.wpaused:
            self.pause_reading()

    def send_body(self, req: _Request, piece: bytes) -> None:
        self.send(piece)
        if req.replay is not None:
            _keep_for_replay(req, [piece])

    def request_complete(self, req: _Request) -> None:
        now = self.srv.time()
        if not self.rpaused and not req.resp_started:
            self.deadline = now + req.knobs.response_timeout_s
        xt = req.knobs.exchange_timeout_s
        if xt:
            if self.rpaused:
                self.xleft = xt
            else:
                self.xdeadline = now + xt

    def pause_reading(self) -> None:
        if not self.rpaused and not self.closed:
            self.rpaused = True
            self.transport.pause_reading()
            self.deadline = INF
            if self.xdeadline < INF:
                self.xleft = max(0.0, self.xdeadline - self.srv.time())
                self.xdeadline = INF

    def resume_reading(self) -> None:
        if self.rpaused and not self.closed:
            self.rpaused = False
            self.transport.resume_reading()
            req = self.req
            if req is not None:
                now = self.srv.time()
                self.deadline = now + req.knobs.response_timeout_s
                if self.xleft >= 0:
                    self.xdeadline = now + self.xleft
            self.xleft = -1.0

    def detach(self) -> None:
        client = self.client
        req = self.req
        self.req = None
        self.client = None
        if req is not None:
            req.upstream = None
        if self.rpaused:
            self.resume_reading()
        if self.wpaused and client is not None:
            client.unpause(_P_UPSTREAM)
        self.deadline = INF
        self.xdeadline = INF
        self.xleft = -1.0

    def _complete(self) -> None:
        """The response has ended; hand the connection back, finish the exchange."""
        req = self.req
        client = self.client
        assert req is not None and client is not None
        reusable = (
            self.reusable
            and self.backend_keep
            and req.complete
            and not self.closed
            and not self.wpaused
            and not self.transport.get_write_buffer_size()
        )
        self.resp_done = False
        self.detach()
        self.served += 1
        now = self.srv.time()
        if reusable:
            self.srv.put_idle(self, now)
        else:
            self.close()
        client.response_done(req, self.status, now=now)

    def _start_tunnel(self, rest: bytes) -> None:
        req = self.req
        client = self.client
        assert req is not None and client is not None
        if self.status != 101:
            self._bad_response(req, "upgrade without 101")
            return
        self.tunnel = True
        self.deadline = INF
        self.xdeadline = INF
        self.xleft = -1.0
        client.start_tunnel(req, self, rest)

    def _bad_response(self, req: _Request, why: str) -> None:
        client = self.client
        assert client is not None
        self.detach()
        self.abort()
        logger.debug("event=bad_response detail=%r", why)
        client.upstream_failed(req, self, "bad_response")

    def on_deadline(self, now: float) -> None:
        req = self.req
        if req is None:
            # Idle too long in the pool.
            self.srv.forget_idle(self)
            self.close()
            return
        client = self.client
        assert client is not None
        why = "exchange_timeout" if now >= self.xdeadline else "timeout"
        self.detach()
        self.abort()
        client.upstream_failed(req, self, why)


class _TlsUpstream(_Upstream):
    """A backend connection over TLS (``[pool.tls]``)."""

    __slots__ = ("sslobj",)

    def __init__(self, srv: ProxyServer, key: tuple[str, int]) -> None:
        super().__init__(srv, key)
        self.sslobj: Any = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.sslobj = transport.get_extra_info("ssl_object")

    def has_stray_bytes(self) -> bool:
        """Decrypted bytes the SSLObject holds, or any byte in the kernel's buffer: a TLS
        record there may be data (stray) or a close_notify; either way not reused."""
        sslobj = self.sslobj
        if sslobj is not None and sslobj.pending():
            return True
        return super().has_stray_bytes()

    def eof_received(self) -> bool:
        super().eof_received()
        return False  # an SSL transport closes on EOF whatever we return (and warns)


class _Client(_Conn):
    """One client connection: parses requests, dispatches them in order, relays answers."""

    __slots__ = (
        "backlog",
        "backlog_scheduled",
        "body_deadline",
        "body_left",
        "chunk_len",
        "chunk_mark",
        "chunks",
        "closing",
        "cport",
        "ctx",
        "cur",
        "cut",
        "deadline",
        "dropping",
        "eof",
        "framing",
        "fresh",
        "gate",
        "hdrs",
        "head_cont",
        "head_deadline",
        "head_first",
        "head_new",
        "last_call",
        "last_in",
        "linger",
        "linger_bytes",
        "nmark",
        "parser",
        "paused",
        "queue",
        "src_key",
        "state",
        "stopped",
        "tunnel",
        "url",
        "wpaused",
    )

    def __init__(self, srv: ProxyServer) -> None:
        super().__init__(srv)
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[_Request] = deque()
        self.cur: _Request | None = None
        self.state = _IDLE
        self.deadline = INF
        self.head_deadline = INF
        self.head_new = False
        self.paused = 0
        self.wpaused = False
        self.closing = False
        self.stopped = False
        self.dropping = False
        self.eof = False
        self.fresh = True
        self.last_call = False
        self.last_in = False
        """A request with Connection: close (or HTTP/1.0 without keep-alive) was read: no
        request after it is."""
        self.linger = False
        self.linger_bytes = 0
        self.tunnel: _Upstream | None = None
        self.backlog: bytes | None = None
        self.backlog_scheduled = False
        self.url = b""
        self.hdrs: list[tuple[bytes, bytes]] = []
        self.chunk_len = 0
        self.head_cont = 0
        self.head_first = 0
        self.body_deadline = INF
        self.body_left = -1.0
        """Time left of body_deadline while reading is paused (the client is not the one
        waiting: a pipelined request's turn, a backend not taking the body); -1 otherwise."""
        self.framing = 0
        """Chunk framing and trailer bytes of the current body beyond its allowance."""
        self.chunks = 0
        self.chunk_mark = -1
        """body_seen at the last chunk header: equal to it now means we are in trailers."""
        self.ctx: H.ClientContext | None = None
        self.src_key: int | None = None
        """The client address's key hash (maglev ``hash_on = "source_ip"``), once."""
        self.nmark = 0
        """``nsent`` when the previous response ended (the access log's bytes out)."""
        self.cport = 0
        self.cut = ""
        """The cause letter (lb.data.accesslog) when pairlb cut this connection itself: the
        requests still queued behind the cut one are logged with it, not as the client's."""
        self.gate: pp.Gate | None = None
        """accept_proxy_protocol: the PROXY header's reader, until it decided."""

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        srv = self.srv
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            ip, self.cport = peer[0], peer[1]
        else:
            ip = "unknown"
        self.ctx = srv.client_context(ip)
        if srv.accept_proxy:
            self.gate = pp.Gate(self.ctx.trusted)
        srv.client_opened(self)
        self.deadline = srv.time() + srv.header_timeout_s

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        srv = self.srv
        srv.client_gone(self)
        tunnel = self.tunnel
        if tunnel is not None:
            self.tunnel = None
            req = tunnel.req
            tunnel.detach()
            tunnel.close()
            if req is not None:
                srv.release(req)
        alog = srv.alog
        for req in self.queue:
            if req.finished:
                continue
            if alog is not None:
                self.log(req, 0, (self.cut or A.END_CLIENT_ABORT) + _phase(req), srv.time())
            req.finished = True
            up = req.upstream
            if up is not None:
                up.detach()
                up.abort()
                if req.backend is not None:
                    srv.stats.error(req.pool.name, req.backend.name, "client_closed")
            srv.release(req)
        self.queue.clear()
        srv.flush()

    def eof_received(self) -> bool:
        self.eof = True
        gate = self.gate
        if gate is not None:
            reason = gate.cut()
            if reason is not None:
                self._refuse_proxy(reason)
                return False
        if self.linger:
            return False
        tunnel = self.tunnel
        if tunnel is not None:
            t = tunnel.transport
            if not tunnel.closed and not tunnel.got_eof and t.can_write_eof():
                tunnel.flush_out()
                t.write_eof()
                return True
            return False
        # A request cut short, or nothing to answer: done. Else answer, then close.
        return self.state == _IDLE and (bool(self.queue) or self.backlog is not None)

    def pause_writing(self) -> None:
        self.wpaused = True
        req = self.queue[0] if self.queue else None
        up = self.tunnel or (req.upstream if req is not None else None)
        if up is not None:
            up.pause_reading()
        self.deadline = self.srv.time() + self.srv.idle_timeout_s

    def resume_writing(self) -> None:
        self.wpaused = False
        req = self.queue[0] if self.queue else None
        up = self.tunnel or (req.upstream if req is not None else None)
        if up is not None:
            up.resume_reading()
        self._rearm()

    def _through_gate(self, data: bytes) -> bytes:
        """accept_proxy_protocol: the connection's bytes after its PROXY header (b"" while
        it is not whole; the client's address from then on is the header's)."""
        gate = self.gate
        assert gate is not None
        try:
            res = gate.feed(data)
        except pp.ProxyProtocolError as exc:
            self._refuse_proxy(exc.reason)
            return b""
        if res.state is pp.NEED_MORE:
            return b""
        self.gate = None
        src = res.source
        if src is not None:
            self.ctx = self.srv.client_context(src[0])
            self.cport = src[1]
            self.src_key = None
        return res.rest

    def _refuse_proxy(self, reason: str) -> None:
        """Close without a byte (as HAProxy does): the PROXY header was refused."""
        srv = self.srv
        self.gate = None
        srv.stats.bad_request(srv.listener.name, reason, 0)
        logger.debug("event=bad_request status=0 listener=%s peer=%s reason=%s",
                     srv.listener.name, self.ctx.ip if self.ctx else "-", reason)
        self.stopped = True
        self.close()

    def data_received(self, data: bytes) -> None:
        if self.gate is not None:
            data = self._through_gate(data)
            if not data:
                return
        if self.tunnel is not None:
            up = self.tunnel
            self.deadline = self.srv.time() + self.srv.idle_timeout_s
            up.send(data)
            up.flush_out()
            return
        if self.linger:
            self.linger_bytes += len(data)
            if self.linger_bytes > LINGER_BYTES:
                self.close()
            return
        if self.stopped:
            req = self.queue[-1] if self.queue else None
            if req is not None and req.tunnel_buf is not None:
                req.tunnel_buf.append(data)
            return
        srv = self.srv
        if len(data) > FEED_SLICE:
            self._parse_sliced(data)
        else:
            self._parse(data)
        if not self.closed:
            if self.queue and self.state == _IDLE and not (
                self.paused or self.wpaused or self.linger
            ):
                self.deadline = INF  # the common case: request read, answer pending
            else:
                self._rearm()
        if srv.dirty:
            srv.flush()

    def _parse_sliced(self, data: bytes) -> None:
        """Feed a big read in slices, stopping while too many pipelined requests wait: what
        is left is kept (one read at most) and reading pauses until the queue drains."""
        n = len(data)
        pos = 0
        while pos < n:
            end = pos + FEED_SLICE
            self._parse(data[pos:end])
            pos = end
            if pos >= n or self.closed:
                return
            if self.stopped:
                req = self.cur
                if req is not None and req.tunnel_buf is not None:
                    req.tunnel_buf.append(data[pos:])  # the rest belongs to the tunnel
                return
            if len(self.queue) >= PIPELINE_MAX:
                self.backlog = data[pos:]
                self.pause(_P_BACKLOG)
                return

    def _feed_backlog(self) -> None:
        self.backlog_scheduled = False
        data = self.backlog
        if data is None or self.closed:
            return
        self.backlog = None
        self.data_received(data)
        if self.backlog is None:
            self.unpause(_P_BACKLOG)
            self.srv.flush()

    def _parse(self, data: bytes) -> None:
        srv = self.srv
        state = self.state
        in_head = state == _HEAD
        self.chunk_len = len(data)
        body_req = self.cur if state == _BODY else None
        if body_req is not None:
            if body_req.chunked:
                seen0 = body_req.body_seen
                chunks0 = self.chunks
            else:
                body_req = None  # a Content-Length body has no framing to count
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_data(data[exc.args[0] :])
        except httptools.HttpParserError as exc:
            ctx = exc.__context__
            if isinstance(ctx, _Reject):
                self.reject(ctx.args[0], ctx.args[1])
            elif isinstance(ctx, H.HeaderError):
                self.reject(ctx.status, ctx.reason)
            elif isinstance(ctx, _Stop) or (
                    (self.closing or self.last_in) and self.state == _IDLE):
                # No more requests on this connection (after Connection: close, llhttp
                # refuses any byte): the rest is dropped unanswered, never a 400.
                self._stop_reading()
            else:
                self.reject(*_classify(exc))
        else:
            if body_req is not None:
                if self.state == _BODY and self.cur is body_req:
                    # Still inside the same chunked body: what this read held that is not
                    # body data is framing or trailer. Counted now, not per completed line.
                    body = body_req.body_seen - seen0
                    excess = (self.framing + len(data) - 3 * body
                              - CHUNK_ALLOWANCE * (self.chunks - chunks0))
                    if excess <= 0:
                        self.framing = 0
                    elif excess > srv.max_header_bytes:
                        self._framing_too_large(body_req)
                    else:
                        self.framing = excess
            elif self.state == _HEAD:
                # The head is still incomplete after this read: time it, bound its size.
                if self.head_new:  # the head began in this read
                    self.head_new = False
                    self.head_deadline = srv.time() + srv.header_timeout_s
                    self.head_first = len(data)
                elif in_head:
                    self.head_cont += len(data)
                lst = srv.listener
                if self.head_cont > lst.max_header_bytes + lst.max_request_line_bytes:
                    if not self.hdrs:
                        self.reject(414, "request_line_too_long")
                    else:
                        self.reject(431, "headers_too_large")

    def _framing_too_large(self, req: _Request) -> None:
        if self.chunks and self.chunk_mark == req.body_seen:
            self.reject(431, "trailers_too_large")  # after the last chunk: the trailer section
        else:
            self.reject(400, "chunk_framing_too_large")  # size lines, extensions

    def _stop_reading(self) -> None:
        """Parse nothing more (the parser has stopped for good); answers already due go out,
        then the connection closes (lingering: unread input must not reset the answer)."""
        self.stopped = True
        self.closing = True
        self.dropping = True
        if self.linger:
            return  # answered already (before the body ended): keep reading and dropping
        self.pause(_P_STOP)
        if not self.queue and self.state == _IDLE:
            self._linger()

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.stopped or self.closing or self.last_in:
            raise _Stop()
        self.fresh = False
        if self.last_call:
            self.closing = True  # answer this one (with Connection: close), then close
        self.state = _HEAD
        self.url = b""
        self.hdrs = []
        self.head_cont = 0
        self.head_first = 0
        self.head_new = True

    def on_url(self, url: bytes) -> None:
        if self.url:
            url = self.url + url
        self.url = url
        if len(url) > self.srv.max_line_bytes:
            raise _Reject(414, "request_line_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Limits are checked at the end of the head (and the bytes a head may grow to are
        # bounded per read in data_received), so this stays one append per field.
        if self.state == _HEAD:
            self.hdrs.append((name, value))
        else:
            # Trailers of a chunked body: dropped, but bounded all the same.
            self.head_cont += len(name) + len(value)
            if self.head_cont > self.srv.max_header_bytes:
                raise _Reject(431, "trailers_too_large")

    def on_headers_complete(self) -> None:
        if self.state != _HEAD:
            return  # trailers of a chunked body: dropped
        srv = self.srv
        hdrs = self.hdrs
        if len(hdrs) > srv.max_headers:
            raise _Reject(431, "too_many_headers")
        limit = srv.max_header_bytes
        if self.chunk_len + self.head_first + self.head_cont > limit and (
            sum(len(n) + len(v) + 4 for n, v in hdrs) > limit  # exactly
        ):
            raise _Reject(431, "headers_too_large")
        self.head_cont = 0  # from here on it counts trailer bytes
        parser = self.parser
        version = parser.get_http_version()
        if version != "1.1":
            if version == "0.9":
                raise _Reject(400, "http09")
            if version != "1.0":
                raise _Reject(505, "bad_version")
        method = parser.get_method()
        if method == b"CONNECT":
            raise _Reject(405, "connect_method")
        target = self.url
        host_override = None
        if target[:1] != b"/":
            if target == b"*":
                if method != b"OPTIONS":
                    raise _Reject(400, "bad_target")
            else:
                host_override, target = H.split_absolute_form(target)
        req = _Request(srv.pool, srv.pool_cfg, srv.knobs)
        req.method = method
        if srv.affinity:
            self._affinity(req, target)
        if srv.alog is not None:
            req.lg = _LogState(self.url)  # User-Agent, Referer: noted by build_request_head
        http10 = version == "1.0"
        if http10:
            req.http10 = True
        rid = srv.next_request_id
        request_id = rid() if rid is not None else None
        req.rid = request_id
        H.build_request_head(
            method, target, self.hdrs, self.ctx,  # type: ignore[arg-type]
            http10=http10, request_id=request_id,
            via=srv.via, host_override=host_override, default_host=srv.local_host,
            into=req, underscores=srv.pass_underscores, note=req.lg,
        )
        if http10 and req.chunked:
            # Transfer-Encoding did not exist in HTTP/1.0: such a message has been mangled
            # on its way (RFC 9112 §6.1), and framing disagreements are how smuggling starts.
            raise _Reject(400, "http10_transfer_encoding")
        if not parser.should_keep_alive():
            req.keep_alive = False
        if method not in IDEMPOTENT:
            req.idempotent = False
        elif method == b"HEAD":
            req.head_only = True
        if req.upgrade_value is not None and parser.should_upgrade():
            if req.chunked or req.content_length > 0:
                raise _Reject(400, "upgrade_with_body")
            H.build_request_head(
                method, target, self.hdrs, self.ctx,  # type: ignore[arg-type]
                http10=http10, upgrade=True, request_id=request_id,
                via=srv.via, host_override=host_override,
                default_host=srv.local_host, into=req, underscores=srv.pass_underscores,
            )
            req.upgrade = True
            req.tunnel_buf = []
        max_body = srv.max_body_bytes
        if max_body and req.content_length > max_body:
            raise _Reject(413, "body_too_large")
        if srv.local_answers:
            self._local_answer_for(req, method, target)
        if req.chunked or req.content_length > 0:
            self.state = _BODY
            body = True
        else:
            req.complete = True
            self.state = _IDLE
            body = False
        self.cur = req
        queue = self.queue
        queue.append(req)
        req.t0 = now = srv.time()
        if body:
            self.body_deadline = now + srv.listener.client_body_timeout_s
            self.body_left = -1.0
            if req.chunked:
                self.framing = 0
                self.chunks = 0
                self.chunk_mark = -1
        if len(queue) == 1:
            self.dispatch(req, now)
        else:
            self.pause(_P_QUEUE)

    def _affinity(self, req: _Request, target: bytes) -> None:
        """The request's maglev key and sticky cookie (only for pools that use them)."""
        srv = self.srv
        if srv.sticky:
            req.sticky = _cookie(self.hdrs, srv.sticky)
        kind = srv.hash_kind
        if kind == _H_SOURCE:
            key = self.src_key
            if key is None:
                ctx = self.ctx
                key = self.src_key = key_hash(ctx.ip.encode() if ctx is not None else b"")
            req.hkey = key
        elif kind == _H_URI:
            q = target.find(b"?")
            req.hkey = key_hash(target if q < 0 else target[:q])
        elif kind == _H_HEADER:
            v = _header(self.hdrs, srv.hash_name)
            if v is not None:
                req.hkey = key_hash(v)
        elif kind == _H_COOKIE:
            v = _cookie(self.hdrs, srv.hash_name)
            if v is not None:
                req.hkey = key_hash(v)

    def on_body(self, data: bytes) -> None:
        req = self.cur
        if req is None or req.finished:
            if self.stopped or self.closing:
                raise _Stop()
            return
        n = len(data)
        req.body_seen += n
        max_body = self.srv.max_body_bytes
        if max_body and req.body_seen > max_body:
            raise _Reject(413, "body_too_large")
        piece = b"%x\r\n%b\r\n" % (n, data) if req.chunked else data
        up = req.upstream
        if up is not None:
            up.send_body(req, piece)
        else:
            if req.pending is None:
                req.pending = [piece]
            else:
                req.pending.append(piece)
            req.pending_bytes += len(piece)
            if req.pending_bytes > BODY_BUFFER_LIMIT:
                self.pause(_P_BUFFER)

    def on_chunk_header(self) -> None:
        self.chunks += 1
        self.chunk_mark = self.cur.body_seen  # type: ignore[union-attr]  # set in a body

    def on_message_complete(self) -> None:
        req = self.cur
        self.state = _IDLE
        if req is None:
            return
        if not req.keep_alive:
            # RFC 9112 §9.6: the last request on this connection; llhttp refuses what follows.
            # Not ``closing``: the answers still due before it go out as keep-alive ones, and
            # its own answer (keep_alive False) closes the connection.
            self.last_in = True
        if req.complete:
            return
        req.complete = True
        if req.finished:
            return
        if req.chunked:
            if req.upstream is not None:
                req.upstream.send_body(req, b"0\r\n\r\n")
            elif req.pending is None:
                req.pending = [b"0\r\n\r\n"]
            else:
                req.pending.append(b"0\r\n\r\n")
        if req.upstream is not None:
            req.upstream.request_complete(req)

    # -- flow control -------------------------------------------------------------------------

    def pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
            if self.state == _BODY:
                self.body_left = max(0.0, self.body_deadline - self.srv.time())
        self.paused |= reason

    def unpause(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.transport.resume_reading()
                if self.body_left >= 0:
                    self.body_deadline = self.srv.time() + self.body_left
                    self.body_left = -1.0
                self._rearm()

    def _rearm(self) -> None:
        """Recompute this connection's deadline from its state."""
        if self.linger:
            return
        srv = self.srv
        if self.wpaused:
            return  # set by pause_writing: the client is not reading our answer
        if self.tunnel is not None:
            self.deadline = srv.time() + srv.idle_timeout_s
        elif self.paused:
            self.deadline = INF
        elif self.state == _HEAD:
            self.deadline = self.head_deadline if not self.queue else INF
        elif self.state == _BODY:
            deadline = srv.time() + srv.idle_timeout_s
            body_deadline = self.body_deadline
            self.deadline = deadline if deadline < body_deadline else body_deadline
        elif self.queue:
            self.deadline = INF
        else:
            self.deadline = srv.time() + srv.idle_timeout_s

    # -- dispatch -----------------------------------------------------------------------------

    def dispatch(self, req: _Request, now: float | None = None) -> None:
        """Send the request at the head of the queue to a backend (or answer it ourselves)."""
        srv = self.srv
        if req.error is not None:
            if req.local:
                self._answer_local(req)
                return
            status, reason = req.error
            self._answer_error(req, status, reason, close=True)
            return
        if req.upgrade:
            self.pause(_P_STOP)
        if now is None:
            now = srv.time()
        if srv.sticky:
            backend = self._sticky_pick(req, now)
        else:
            backend = req.pool.pick(now, req.excluded or (), req.hkey)
        if backend is None:
            if req.last_failure is not None:
                status, reason, bname = req.last_failure
                self.fail(req, status, reason, bname, counted=True)
            else:
                self.fail(req, 503, "no_backend", "-")
            return
        req.backend = backend
        lg = req.lg
        if lg is not None and lg.t_pick < 0:
            lg.t_pick = now
        up = srv.take_idle(backend, req, now)
        if up is not None:
            up.attach(req, self, now)
        else:
            req.conn_gen += 1
            srv.open_upstream(req, self, backend, req.conn_gen)

    def _sticky_pick(self, req: _Request, now: float) -> Backend | None:
        """The backend the sticky cookie names, while it is in rotation (and not already
        tried); else the pool's pick, and a Set-Cookie naming it on the response."""
        pool = req.pool
        excluded = req.excluded or ()
        tok = req.sticky
        srv = self.srv
        if tok is not None:
            b = pool.take_token(tok, now, excluded)
            if b is not None:
                req.set_cookie = b""
                srv.stats.sticky(pool.name, "hit")
                return b
        b = pool.pick(now, excluded, req.hkey)
        if b is not None:
            req.set_cookie = srv.sticky_line(pool.token_of(b))
            srv.stats.sticky(pool.name, "set")
        return b

    def connect_failed(self, req: _Request, backend: Backend, exc: BaseException) -> None:
        srv = self.srv
        if isinstance(exc, TimeoutError):
            reason, status, outcome = "connect_timeout", 504, Outcome.TIMEOUT
        elif isinstance(exc, ConnectionRefusedError):
            reason, status, outcome = "connect_refused", 502, Outcome.CONNECT_FAILED
        elif isinstance(exc, ssl.SSLCertVerificationError):
            reason, status, outcome = "tls_verify", 502, Outcome.CONNECT_FAILED
            logger.debug("event=backend_tls_verify_failed backend=%s detail=%r",
                         backend.name, exc.verify_message)
        elif isinstance(exc, ssl.SSLError):
            reason, status, outcome = "tls_handshake", 502, Outcome.CONNECT_FAILED
            logger.debug("event=backend_tls_handshake_failed backend=%s detail=%r",
                         backend.name, exc.reason)
        else:
            reason, status, outcome = "connect_failed", 502, Outcome.CONNECT_FAILED
        srv.observe(req, backend, outcome)
        srv.stats.error(req.pool.name, backend.name, reason)
        req.last_failure = (status, reason, backend.name)
        if req.attempts_left > 0:
            req.attempts_left -= 1
            req.retried += 1
            self._retry(req, reason, exclude=True)
        else:
            self.fail(req, status, reason, backend.name, counted=True)

    def upstream_failed(self, req: _Request, up: _Upstream, why: str) -> None:
        """The backend connection serving ``req`` closed, timed out or misbehaved."""
        srv = self.srv
        if req.finished:
            return
        backend = req.backend
        assert backend is not None
        bname = backend.name
        if req.resp_started:
            if why == "timeout" or why == "exchange_timeout":
                srv.observe(req, backend, Outcome.TIMEOUT)
                self._abort(req, "response_timeout" if why == "timeout" else why, bname)
            else:
                srv.observe(req, backend, Outcome.RESET)
                self._abort(req, "backend_" + why, bname)
            return
        replayable = req.idempotent and req.replay is not None and not req.upgrade
        if why == "closed" and up.served > 0 and replayable and not req.stale_retried:
            # The stale keep-alive race: the backend closed an idle connection just as we
            # reused it. Not the backend's fault; once more on a fresh connection.
            req.stale_retried = True
            req.retried += 1
            req.force_fresh = True
            self._retry(req, "stale_keepalive", exclude=False)
            return
        if why == "timeout":
            srv.observe(req, backend, Outcome.TIMEOUT)
            status, reason = 504, "response_timeout"
            may_retry = replayable and req.knobs.retry_on_timeout
        elif why == "exchange_timeout":
            srv.observe(req, backend, Outcome.TIMEOUT)
            status, reason = 504, why
            may_retry = False  # the exchange's whole budget is spent
        elif why == "bad_response":
            srv.observe(req, backend, Outcome.RESET)
            status, reason = 502, "bad_response"
            may_retry = False
        else:
            srv.observe(req, backend, Outcome.RESET)
            status, reason = 502, "backend_closed"
            may_retry = replayable
        srv.stats.error(req.pool.name, bname, reason)
        req.last_failure = (status, reason, bname)
        if may_retry and req.attempts_left > 0:
            req.attempts_left -= 1
            req.retried += 1
            self._retry(req, reason, exclude=True)
        else:
            self.fail(req, status, reason, bname, counted=True)

    def _retry(self, req: _Request, reason: str, *, exclude: bool) -> None:
        srv = self.srv
        backend = req.backend
        srv.release(req)
        if exclude and backend is not None:
            if req.excluded is None:
                req.excluded = []
            req.excluded.append(backend)
        srv.stats.retry(req.pool.name, reason)
        if req.lg is not None:
            req.lg.t_first = -1.0  # the log times the answer of the backend that gives it
        if req.replay:
            req.pending = list(req.replay) + (req.pending or [])
            req.pending_bytes = sum(map(len, req.pending))
        req.replay = ()
        req.replay_bytes = 0
        self.dispatch(req)

    def fail(
        self, req: _Request, status: int, reason: str, bname: str, *, counted: bool = False
    ) -> None:
        """No response byte has reached the client: answer ``status`` ourselves."""
        srv = self.srv
        pool = req.pool.name
        srv.log_error(str(status), pool, bname, reason)
        if not counted:
            srv.stats.error(pool, bname, reason)
        self._answer_error(req, status, reason, close=not req.complete or req.upgrade,
                           bname=bname)

    def _answer_error(
        self, req: _Request, status: int, reason: str, *, close: bool, bname: str = "-"
    ) -> None:
        srv = self.srv
        req.end_reason = reason
        up = req.upstream
        if up is not None:
            up.detach()
            up.abort()
        srv.release(req)
        self._drop_pending(req)
        keep = req.keep_alive and not close and not self.closing and not srv.draining
        extra = b"Connection: keep-alive\r\n" if (keep and req.http10) else b""
        self.send(error_response(status, close=not keep, extra=extra + srv.hsts,
                                 with_body=not req.head_only))
        if not keep:
            self.closing = True
        if req.error is None:
            srv.stats.request(req.pool.name, bname, status, srv.time() - req.t0)
        self.response_done(req, status, counted=True)

    def _drop_pending(self, req: _Request) -> None:
        """Body buffered for a backend that will never get it: let go (and read again)."""
        if req.pending is not None:
            req.pending = None
            req.pending_bytes = 0
            self.unpause(_P_BUFFER)

    # -- answers of our own ---------------------------------------------------------------

    def _local_answer_for(self, req: _Request, method: bytes, target: bytes) -> None:
        """On a listener with redirect_to_https or acme_challenge_dir: mark the request the
        proxy answers itself (dispatch does, in its turn). Raises _Reject for a Host that
        cannot go into a Location."""
        srv = self.srv
        if srv.acme_dir is not None and target.startswith(ACME_PREFIX):
            token = target[len(ACME_PREFIX):]
            ok = (method == b"GET" or method == b"HEAD") and _ACME_TOKEN.fullmatch(token)
            req.local = _L_ACME
            req.local_arg = token if ok else b""
            req.error = (200, "acme_challenge")
            return
        if not srv.redirect:
            return
        host = req.host
        if not host or host is srv.local_host:
            host = self._local_address()  # no Host: the address the client connected to
        location = H.https_location(host, target, srv.https_port)
        if location is None:
            raise _Reject(400, "bad_redirect_host")
        req.local = _L_REDIRECT
        req.local_arg = location
        req.error = (301, "redirect")

    def _local_address(self) -> bytes:
        sockname = self.transport.get_extra_info("sockname")
        ip = sockname[0] if isinstance(sockname, tuple) else self.srv.listener.host_port[0]
        return ("[" + ip + "]" if ":" in ip else ip).encode("ascii")

    def _answer_local(self, req: _Request) -> None:
        """A redirect or an ACME challenge: answered here, in the request's turn."""
        srv = self.srv
        srv.release(req)
        self._drop_pending(req)
        keep = (req.keep_alive and req.complete and not req.upgrade and not self.closing
                and not srv.draining)
        if keep:
            conn = b"Connection: keep-alive\r\n" if req.http10 else b""
        else:
            conn = b"Connection: close\r\n"
        head_only = req.head_only
        if req.local == _L_REDIRECT:
            status = 301 if req.method == b"GET" or head_only else 308
            srv.redirects += 1
            srv.stats.local_answer(srv.listener.name, "https_redirect")
            out = b"".join((H.status_line(status, b""), b"Location: ", req.local_arg,
                            b"\r\nContent-Length: 0\r\n", conn, b"\r\n"))
        else:
            body = srv.acme_file(req.local_arg)
            if body is None:
                status = 404
                out = error_response(404, close=not keep,
                                     extra=(conn if keep else b"") + srv.hsts,
                                     with_body=not head_only)
            else:
                status = 200
                out = b"".join((
                    H.status_line(200, b""),
                    b"Content-Type: application/octet-stream\r\nContent-Length: ",
                    str(len(body)).encode(), b"\r\n", conn, srv.hsts,
                    b"Cache-Control: no-store\r\n\r\n", b"" if head_only else body,
                ))
        logger.debug("event=local_answer listener=%s status=%d peer=%s",
                     srv.listener.name, status, self.ctx.ip if self.ctx else "-")
        req.end_reason = "https_redirect" if req.local == _L_REDIRECT else (
            "acme_served" if status == 200 else "acme_missing")
        self.send(out)
        if not keep:
            self.closing = True
        self.response_done(req, status, counted=True)

    def _abort(self, req: _Request, reason: str, bname: str) -> None:
        """The response had started: the client sees a cut connection, never a wrong body."""
        srv = self.srv
        srv.log_error("cut", req.pool.name, bname, reason)
        srv.stats.error(req.pool.name, bname, reason)
        up = req.upstream
        if srv.alog is not None and not req.finished:
            term = A.termination(reason, A.PHASE_DATA)
            self.cut = term[0]
            self.log(req, req.lg.resp_status if req.lg is not None else 0, term, srv.time())
        if up is not None:
            up.detach()
            up.abort()
        req.finished = True
        srv.release(req)
        self.flush_out()
        self.abort()

    def response_done(
        self, req: _Request, status: int, *, counted: bool = False, now: float = 0.0
    ) -> None:
        """The exchange at the head of the queue is over; move to the next one."""
        srv = self.srv
        queue = self.queue
        if queue and queue[0] is req:
            queue.popleft()
        req.finished = True
        if srv.alog is not None:
            reason = req.end_reason
            self.log(req, status, A.TERM_NORMAL if reason is None else A.termination(reason),
                     now or srv.time())
        if not counted:
            backend = req.backend
            srv.stats.request(
                req.pool.name, backend.name if backend is not None else "-", status,
                (now or srv.time()) - req.t0,
            )
            srv.release(req)
        if self.closed:
            return
        if self.closing or not req.complete:
            if self.queue and self.queue[0].error is not None:
                pass  # an error answer is still due
            else:
                self._close_after_answer(req.complete)
                return
        if self.backlog is not None and not self.backlog_scheduled and len(queue) < PIPELINE_MAX:
            # Never re-enter the parser from its own callbacks: feed the rest next turn.
            self.backlog_scheduled = True
            srv.loop.call_soon(self._feed_backlog)
        if queue:
            nxt = queue[0]
            if len(queue) < 2 and self.paused:
                self.unpause(_P_QUEUE)
            self.dispatch(nxt)
            return
        if self.paused:
            self.unpause(_P_QUEUE)
        if self.eof and self.backlog is None:
            self.close()
            return
        if self.state == _HEAD:
            self.head_deadline = srv.time() + srv.header_timeout_s
        elif self.state == _IDLE and not (self.paused or self.wpaused or self.linger):
            # Keep-alive idle (the common case, inlined from _rearm).
            self.deadline = (now or srv.time()) + srv.idle_timeout_s
            return
        if self.stopped:
            return
        self._rearm()

    def _close_after_answer(self, clean: bool) -> None:
        if clean and self.state == _IDLE and not self.queue and not self.dropping:
            self.close()
        else:
            self._linger()

    # -- refusals -------------------------------------------------------------------------

    def reject(self, status: int, reason: str) -> None:
        """Refuse the request being parsed; nothing more is read from this connection."""
        srv = self.srv
        srv.stats.bad_request(srv.listener.name, reason, status)
        logger.debug(
            "event=bad_request status=%d listener=%s peer=%s reason=%s",
            status, srv.listener.name, self.ctx.ip if self.ctx else "-", reason,
        )
        # Stop parsing; the answers already due go out first (without a premature
        # "Connection: close"), then this one, with close.
        self.stopped = True
        self.pause(_P_STOP)
        cur = self.cur
        if cur is not None and not cur.complete and not cur.finished and cur in self.queue:
            # Mid-body (chunked over the limit, bad chunk): the backend holds an incomplete
            # request; cut that connection so it can never be completed.
            if cur.resp_started:
                self._abort(cur, reason, cur.backend.name if cur.backend else "-")
                return
            cur.error = (status, reason)
            cur.local = 0
            if self.queue[0] is cur:
                srv.release_upstream(cur)
                self._answer_error(cur, status, reason, close=True)
            return
        err = _Request(srv.pool, srv.pool_cfg, srv.knobs)
        err.error = (status, reason)
        err.keep_alive = False
        err.complete = False
        err.t0 = srv.time()
        self.queue.append(err)
        if len(self.queue) == 1:
            self.dispatch(err)

    def _linger(self) -> None:
        """Close after the answer without losing it: shut our side, read and drop the rest
        for a while (closing with unread input would send RST and destroy the answer)."""
        if self.closed or self.linger:
            return
        self.linger = True
        self.flush_out()
        t = self.transport
        try:
            if t.can_write_eof():
                t.write_eof()
        except OSError:
            self.abort()
            return
        self.paused = 0
        t.resume_reading()
        self.deadline = self.srv.time() + LINGER_S

    def on_deadline(self, now: float) -> None:
        if self.linger:
            self.close()
            return
        gate = self.gate
        if gate is not None:
            reason = gate.cut()
            if reason is not None:
                self._refuse_proxy(reason)  # no whole header within client_header_timeout_s
                return
        tunnel = self.tunnel
        if tunnel is not None:
            # An upgraded connection idle both ways for client_idle_timeout_s (as TCP mode).
            self.tunnel = None
            req = tunnel.req
            tunnel.detach()
            tunnel.close()
            if req is not None:
                req.finished = True
                self.srv.release(req)
            self.close()
            return
        if self.wpaused:
            # The client stopped reading what we send.
            req = self.queue[0] if self.queue else None
            if req is not None and not req.finished:
                self._abort(req, "client_write_timeout",
                            req.backend.name if req.backend else "-")
            else:
                self.abort()
            return
        if self.state == _HEAD and not self.queue:
            untouched = self.head_cont == 0 and not self.hdrs and not self.url
            if untouched and not self.paused and unread_bytes(self.transport):
                # The request arrived while the loop was stalled: read it first (this
                # happens at most once per request, since reading it makes it touched).
                self.deadline = now + self.srv.tick_interval()
                return
            if self.srv.draining and untouched:
                self.close()
                return
            self.reject(408, "header_timeout")
            return
        if self.state == _BODY and self.queue:
            req = self.cur
            if req is not None and not req.finished:
                if req.resp_started:
                    self._abort(req, "client_body_timeout",
                                req.backend.name if req.backend else "-")
                    return
                reason = "body_total_timeout" if now >= self.body_deadline else "body_timeout"
                self.srv.stats.bad_request(self.srv.listener.name, reason, 408)
                self.stopped = True
                self.closing = True
                req.error = (408, reason)
                req.local = 0
                if self.queue[0] is req:
                    self.srv.release_upstream(req)
                    self._answer_error(req, 408, reason, close=True)
                return
        if not self.queue and self.state == _IDLE:
            if not self.paused and unread_bytes(self.transport):
                # The next request arrived while the loop was stalled: serve it (reading it
                # leaves the idle state, so this cannot repeat without a new request).
                self.deadline = now + self.srv.tick_interval()
                return
            self.close()  # keep-alive idle: close quietly
            return
        self.deadline = INF

    # -- upgrade --------------------------------------------------------------------------

    def _upgrade_data(self, rest: bytes) -> None:
        req = self.cur
        if req is None or not req.upgrade:
            self.reject(400, "bad_upgrade")
            return
        self.stopped = True
        self.pause(_P_STOP)
        assert req.tunnel_buf is not None
        if rest:
            req.tunnel_buf.append(rest)

    def log(self, req: _Request, status: int, term: str, now: float) -> None:
        """One access log record (lb.data.accesslog.FIELDS): the request is over, answered
        (status), cut or abandoned: its facts go to AccessLog.http (C when built), which
        makes the line at once."""
        lg = req.lg
        if lg is None:
            lg = req.lg = _LogState(b"")  # made before the log was on
        elif lg.logged:
            return  # a tunnel is logged when it starts; its end is not another request
        lg.logged = True
        srv = self.srv
        alog = srv.alog
        assert alog is not None
        ctx = self.ctx
        b = req.backend
        sent = self.nsent
        nbytes, self.nmark = max(0, sent - self.nmark), sent
        r = alog.http(  # lb.data.accesslog.http_record's facts: one C call, no tuple
            None, ctx.ip if ctx is not None else None, self.cport, srv.listener.name,
            req.method, lg.target, req.http10, status,
            len(req.head) + req.body_seen if req.head else req.body_seen, nbytes,
            req.pool.name, b.name if b is not None else None,
            req.retried,
            req.t0, lg.t_pick, lg.connect_s, lg.t_sent, lg.t_first, now, term, req.rid,
            lg.ua, lg.referer,
        )
        if r:
            alog.due_http(r)

    def start_tunnel(self, req: _Request, up: _Upstream, rest: bytes) -> None:
        """The backend said 101: from now on both connections are a byte pipe."""
        self.tunnel = up
        self.stopped = True
        srv = self.srv
        self.deadline = srv.time() + srv.idle_timeout_s
        srv.stats.request(req.pool.name, req.backend.name if req.backend else "-", 101,
                          srv.time() - req.t0)
        if srv.alog is not None:
            self.log(req, 101, A.TERM_NORMAL, srv.time())
        if rest:
            self.send(rest)
        self.flush_out()
        if req.tunnel_buf:
            for piece in req.tunnel_buf:
                up.send(piece)
            up.flush_out()
        req.tunnel_buf = None
        self.paused = 0
        if not self.closed:
            self.transport.resume_reading()

    def tunnel_closed(self, req: _Request) -> None:
        self.srv.release(req)
        req.finished = True
        self.tunnel = None
        self.close()


class _TlsClient(_Client):
    """A client connection on a TLS listener."""

    __slots__ = ()

    def eof_received(self) -> bool:
        # An SSL transport closes on EOF (close_notify or a bare FIN) whatever this returns:
        # no half-close, and asking for one only logs a warning per connection.
        super().eof_received()
        return False


def _classify(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return 400, "bad_method"
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return 400, "bad_target"
    text = str(exc).lower()
    for needle, status, reason in _PARSE_ERRORS:
        if needle in text:
            return status, reason
    return 400, "bad_request"


class ProxyServer(ListenerServer["_Client"]):
    """The HTTP proxy for one listener (lifecycle: lb.data.listener)."""

    TICK_FAILED: ClassVar[str] = "proxy_tick_failed"

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
        self.dirty: list[_Conn] = []
        self.later: list[_Conn] = []
        """Connections with WRITE_LATER_BYTES to WRITE_NOW_BYTES queued, written by
        ``_write_later`` once the turn's events have run."""
        self.upstreams: set[_Upstream] = set()
        self.idle: dict[tuple[str, int], list[_Upstream]] = {}
        self.request_ids = H.RequestIds()
        self.draining = False
        self._ctx_cache: dict[str, H.ClientContext] = {}
        self._log_t0 = 0.0
        self._log_n = 0
        self._log_dropped = 0
        host, port = listener.host_port
        self.local_host = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()
        """Host for HTTP/1.0 requests that carry none."""
        # Decided once per listener (the hot path reads flags, never the config).
        self.hsts = b""
        """The Strict-Transport-Security line of a TLS listener (b"": none); see _tls_set."""
        self._listener_set(listener)
        self.redirects = 0
        """Requests answered with a redirect to https."""
        self.acme_served = 0
        """ACME challenges answered from acme_challenge_dir (200)."""
        self.acme_missing = 0
        """Requests under /.well-known/acme-challenge/ answered 404."""
        self._acme_warned = -INF
        self._backend_ctx: ssl.SSLContext | None = None
        self._pool_set()
        self.open_upstream: Callable[[_Request, _Client, Backend, int], None] = self.connect
        """How a request's backend connection is opened (``connect``). An attribute, not a
        method call, so a test harness can put its own in: compiled (mypyc) code calls a
        method directly, never an instance's replacement."""

    def _listener_set(self, listener: ListenerConfig) -> None:
        """Flags that follow the listener's settings (decided once per listener and reload:
        the hot path reads flags, never the config)."""
        self.next_request_id = self.request_ids.next if listener.add_request_id else None
        self.pass_underscores = listener.underscores_in_headers == "pass"
        self._trusted = H.parse_networks(listener.trusted_proxies)
        self._ctx_cache = {}  # trust is decided per client address from _trusted
        self.accept_proxy = listener.accept_proxy_protocol
        self.redirect = listener.redirect_to_https
        self.https_port = listener.https_port
        self.acme_dir = listener.acme_challenge_dir
        self.local_answers = self.redirect or self.acme_dir is not None
        """Requests may be answered here (checked once per request when set)."""
        self.idle_timeout_s = listener.client_idle_timeout_s
        self.header_timeout_s = listener.client_header_timeout_s
        self.max_line_bytes = listener.max_request_line_bytes
        self.max_header_bytes = listener.max_header_bytes
        self.max_body_bytes = listener.max_body_bytes
        self.max_headers = listener.max_headers
        self.via = listener.via

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self, sock: socket.socket) -> None:
        self._tls_set()
        await super().start(sock)

    def listener_changed(self, listener: ListenerConfig) -> None:
        super().listener_changed(listener)
        self._listener_set(listener)

    def _tls_set(self) -> None:
        """Flags that follow the listener's TLS settings (at start and on every reload)."""
        tls = self.tls
        if tls is None:
            self.hsts = b""
        else:
            st = tls.settings
            self.hsts = H.hsts_field(st.hsts_max_age_s, st.hsts_include_subdomains)

    def update(self, pool: Pool, pool_cfg: PoolConfig) -> None:
        if pool_cfg.tls != self.pool_cfg.tls:
            self._retire_upstreams()
        super().update(pool, pool_cfg)
        self._pool_set()

    def _pool_set(self) -> None:
        """Flags that follow the pool's settings: a maglev pool's key, the sticky cookie."""
        pc = self.pool_cfg
        self.knobs = _PoolKnobs(pc)
        kind, name = _H_NONE, b""
        if pc.balance == "maglev":
            h = pc.hash_on
            if h == "source_ip":
                kind = _H_SOURCE
            elif h == "uri":
                kind = _H_URI
            elif h.startswith("header:"):
                kind, name = _H_HEADER, h[7:].lower().encode("ascii")
            else:
                kind, name = _H_COOKIE, h[7:].encode("ascii")
        self.hash_kind = kind
        self.hash_name = name
        self.sticky = pc.sticky_cookie.encode("ascii") if pc.sticky_cookie else b""
        self.affinity = kind != _H_NONE or bool(self.sticky)
        """Requests need a key or the sticky cookie looked at (checked once per request)."""

    def sticky_line(self, token: str) -> bytes:
        """The Set-Cookie line that sends a client back to the backend of ``token``."""
        secure = b"; Secure" if self.tls is not None else b""
        return (b"Set-Cookie: " + self.sticky + b"=" + token.encode("ascii")
                + b"; Path=/; HttpOnly; SameSite=Lax" + secure + b"\r\n")

    def routes_changed(
        self, pools: Mapping[str, Pool], pool_cfgs: Mapping[str, PoolConfig],
        backend_tls: Mapping[str, ssl.SSLContext],
    ) -> None:
        super().routes_changed(pools, pool_cfgs, backend_tls)
        ctx = backend_tls.get(self.pool.name)
        if ctx is not self._backend_ctx:
            if self._backend_ctx is not None:
                self._retire_upstreams()  # verified with another CA or settings
            self._backend_ctx = ctx
        self._tls_set()

    def _retire_upstreams(self) -> None:
        """The pool's backend TLS changed: no connection made before is pooled again (a
        plain one must never carry a request meant for TLS). Idle ones close now; busy ones
        finish their exchange and then idle under a key nobody takes until they time out."""
        for up in self.upstreams:
            up.key = _RETIRED
        self._drop_idle()

    def _drop_idle(self) -> None:
        for lst in self.idle.values():
            for up in lst:
                up.close()
        self.idle.clear()

    def protocol(self) -> asyncio.Protocol:
        if self.tls is not None:
            return cast(asyncio.Protocol, _TlsClient(self))
        return cast(asyncio.Protocol, _Client(self))

    def close_idle(self, *, spare_fresh: bool = False) -> None:
        """Close idle keep-alive clients now and busy ones after their current response
        (the VIP moved away: their next request would reach the new holder as a reset).
        With ``spare_fresh``, connections still waiting for their first request get it
        answered first (see below); a draining worker closes them too."""
        for c in list(self.clients):
            if spare_fresh and c.fresh and c.state == _IDLE and not c.queue:
                # Accepted, first request not parsed yet: it may be in the socket buffer or
                # on its way (sent before the client took the new holder's ARP). Closing now
                # would reset it; answer it instead, then close.
                c.last_call = True
                continue
            c.closing = True
            if not c.queue and c.state == _IDLE and not c.linger:
                c.close()

    def begin_drain(self) -> None:
        """Finish in-flight requests, close idle keep-alive clients and idle backends."""
        self.draining = True
        self.close_idle()
        self._drop_idle()

    def abort_more(self) -> None:
        for up in list(self.upstreams):
            up.abort()
        self.idle.clear()

    # -- connections ----------------------------------------------------------------------------

    def client_context(self, ip: str) -> H.ClientContext:
        ctx = self._ctx_cache.get(ip)
        if ctx is None:
            ctx = H.ClientContext(ip, H.is_trusted(ip, self._trusted),
                                  "https" if self.tls is not None else "http")
            if len(self._ctx_cache) > 4096:
                self._ctx_cache.clear()
            self._ctx_cache[ip] = ctx
        return ctx

    def flush(self) -> None:
        """Write what the event queued: small output at once (uvloop gathers it until its
        ready events have run), large output once they have (WRITE_LATER_BYTES)."""
        dirty = self.dirty
        while dirty:
            self.dirty = []
            for c in dirty:
                n = c.nout
                if WRITE_LATER_BYTES < n <= WRITE_NOW_BYTES:
                    later = self.later
                    if not later:
                        self.loop.call_soon(self._write_later)
                    later.append(c)
                else:
                    _write_out(c)
            dirty = self.dirty

    def _write_later(self) -> None:
        later = self.later
        self.later = []
        for c in later:
            _write_out(c)  # nothing if a close or a crossing wrote it, or threw it away
        if self.dirty:
            self.flush()

    def release(self, req: _Request) -> None:
        """Give back the pick: exactly once per ``pool.pick``."""
        b = req.backend
        if b is not None:
            req.backend = None
            req.pool.release(b)

    def release_upstream(self, req: _Request) -> None:
        up = req.upstream
        if up is not None:
            up.detach()
            up.abort()

    def log_error(self, status: str, pool: str, backend: str, reason: str) -> None:
        """One WARNING line per error, at most LOG_ERRORS_PER_S a second per listener (a
        dead pool under load must not turn the log into the bottleneck); the rest are
        counted and summed up in the next line that gets through."""
        now = self.time()
        if now - self._log_t0 >= 1.0:
            self._log_t0 = now
            self._log_n = 0
        self._log_n += 1
        if self._log_n > LOG_ERRORS_PER_S:
            self._log_dropped += 1
            return
        dropped, self._log_dropped = self._log_dropped, 0
        logger.warning(
            "event=proxy_error status=%s listener=%s pool=%s backend=%s reason=%s%s",
            status, self.listener.name, pool, backend, reason,
            f" suppressed_before={dropped}" if dropped else "",
        )

    def observe(self, req: _Request, backend: Backend, outcome: Outcome) -> None:
        if outcome is Outcome.OK and backend.failures_in_row == 0:
            return  # nothing to reset: skip the call on the hot path
        if req.knobs.passive_enabled:
            self.eject_on(req.pool, backend, outcome)

    # -- backend connections ----------------------------------------------------------------

    def take_idle(self, backend: Backend, req: _Request, now: float) -> _Upstream | None:
        if req.force_fresh:
            return None
        lst = self.idle.get((backend.host, backend.port))
        while lst:
            up = lst[-1]
            if up.closed:
                lst.pop()
                continue
            if not req.idempotent and now - up.idle_since > SAFE_REUSE_S:
                return None
            lst.pop()
            if up.has_stray_bytes():
                up.abort()
                self.stray_bytes(up)
                continue
            return up
        return None

    def stray_bytes(self, up: _Upstream) -> None:
        """An idle backend connection had bytes to read: discarded, counted (rare path)."""
        host, port = up.key
        for b in self.pool.backends:
            if b.host == host and b.port == port:
                self.stats.error(self.pool.name, b.name, "stray_bytes")
                break
        logger.debug("event=stray_backend_bytes listener=%s backend=%s:%d",
                     self.listener.name, host, port)

    def put_idle(self, up: _Upstream, now: float = 0.0) -> None:
        cfg = self.knobs
        lst = self.idle.get(up.key)
        if lst is None:
            lst = self.idle[up.key] = []
        if self.draining or len(lst) >= cfg.max_idle_per_backend or up.closed:
            up.close()
            return
        if not now:
            now = self.time()
        up.idle_since = now
        up.deadline = now + cfg.idle_timeout_s
        lst.append(up)

    def forget_idle(self, up: _Upstream) -> None:
        lst = self.idle.get(up.key)
        if lst is not None:
            with contextlib.suppress(ValueError):
                lst.remove(up)

    def connect(self, req: _Request, client: _Client, backend: Backend, gen: int) -> None:
        self.spawn(self._connect(req, client, backend, gen))

    async def _connect(self, req: _Request, client: _Client, backend: Backend, gen: int) -> None:
        key = (backend.host, backend.port)
        cfg = req.pool_cfg
        tls = cfg.tls
        ctx: ssl.SSLContext | None = None
        started = self.time()
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                if tls is None:
                    _, up = await self.loop.create_connection(
                        lambda: cast(asyncio.Protocol, _Upstream(self, key)),
                        backend.host, backend.port,
                    )
                else:
                    ctx = self.backend_tls.get(req.pool.name)
                    if ctx is None:
                        raise ssl.SSLError(f"no TLS context for pool {req.pool.name!r}")
                    _, up = await self.loop.create_connection(
                        lambda: cast(asyncio.Protocol, _TlsUpstream(self, key)),
                        backend.host, backend.port, ssl=ctx,
                        server_hostname=tls.server_name or backend.host,
                        ssl_handshake_timeout=cfg.connect_timeout_s,
                    )
        except (OSError, TimeoutError) as exc:
            if req.conn_gen == gen and req.backend is backend and not req.finished:
                client.connect_failed(req, backend, exc)
                self.flush()
            return
        except Exception as exc:  # an error boundary: the request must still be answered
            logger.exception("event=connect_crashed backend=%s", backend.name)
            if req.conn_gen == gen and req.backend is backend and not req.finished:
                client.connect_failed(req, backend, exc)
                self.flush()
            return
        if tls != self.pool_cfg.tls or (
            tls is not None and self.backend_tls.get(req.pool.name) is not ctx
        ):
            up.key = _RETIRED  # made with settings a reload has since changed
        if req.conn_gen == gen and req.backend is backend and not req.finished:
            now = self.time()
            if req.lg is not None:
                req.lg.connect_s = now - started
            up.attach(req, client, now)
        else:
            self.put_idle(up)
        self.flush()

    # -- ACME challenges ------------------------------------------------------------------------

    def acme_file(self, token: bytes) -> bytes | None:
        """The challenge file DIR/TOKEN (``token`` already checked: base64url, no ``/`` or
        ``.``), or None (404). O_NOFOLLOW relative to a descriptor of DIR: a symlink is
        never followed out of it; a FIFO does not block (O_NONBLOCK, then not regular)."""
        if not token:
            self.acme_missing += 1
            self.stats.local_answer(self.listener.name, "acme_missing")
            return None
        assert self.acme_dir is not None
        data: bytes | None = None
        try:
            dfd = os.open(self.acme_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fd = os.open(token, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=dfd)
            finally:
                os.close(dfd)
            try:
                st = os.fstat(fd)
                if stat.S_ISREG(st.st_mode) and st.st_size <= ACME_MAX_BYTES:
                    chunks = []
                    n = 0
                    while n <= ACME_MAX_BYTES:
                        chunk = os.read(fd, ACME_MAX_BYTES + 1 - n)
                        if not chunk:
                            break
                        chunks.append(chunk)
                        n += len(chunk)
                    if n <= ACME_MAX_BYTES:
                        data = b"".join(chunks)
                if data is None:
                    self._acme_warn(token, "not a regular file of at most 64 KiB")
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                logger.debug("event=acme_challenge_missing listener=%s token=%s",
                             self.listener.name, token.decode("ascii"))
            elif exc.errno == errno.ELOOP:
                self._acme_warn(token, "a symbolic link (not followed)")
            else:
                self._acme_warn(token, f"unreadable: {exc.strerror} (the worker user must "
                                       "be able to read the directory and its files)")
        if data is None:
            self.acme_missing += 1
            self.stats.local_answer(self.listener.name, "acme_missing")
        else:
            self.acme_served += 1
            self.stats.local_answer(self.listener.name, "acme_served")
            logger.info("event=acme_challenge_served listener=%s token=%s",
                        self.listener.name, token.decode("ascii"))
        return data

    def _acme_warn(self, token: bytes, why: str) -> None:
        now = self.time()
        if now - self._acme_warned < 60.0:
            return  # at most one a minute: anyone can ask for any token
        self._acme_warned = now
        logger.warning("event=acme_challenge_refused listener=%s dir=%s token=%s reason=%r",
                       self.listener.name, self.acme_dir, token.decode("ascii"), why)

    # -- timers ---------------------------------------------------------------------------------

    def tick_interval(self) -> float:
        lst, cfg = self.listener, self.pool_cfg
        shortest = min(
            lst.client_header_timeout_s, lst.client_idle_timeout_s, lst.client_body_timeout_s,
            cfg.response_timeout_s, cfg.exchange_timeout_s or INF, cfg.idle_timeout_s, LINGER_S,
        )
        return min(0.5, max(0.01, shortest / 10))

    def on_tick(self, now: float) -> None:
        for c in [c for c in self.clients if c.deadline <= now]:
            if not c.closed:
                c.on_deadline(now)
        for up in [u for u in self.upstreams if u.deadline <= now or u.xdeadline <= now]:
            if not up.closed:
                up.on_deadline(now)
        self.flush()


# Re-exported for tests that need to classify a reason the way the engine does.
classify_parse_error = _classify

__all__ = [
    "IDEMPOTENT",
    "ProxyServer",
    "classify_parse_error",
    "error_response",
]
