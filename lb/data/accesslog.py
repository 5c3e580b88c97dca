"""The access log of a proxy worker: one line per HTTP request (per connection in TCP mode).

A worker's event loop must never wait for its log, and a request's share of the log must stay
a small part of its CPU. The hot path formats the request's record (a tuple in the order of
``FIELDS``) at once with a per-record formatter (``json_formatter`` / ``combined_formatter``)
and appends the line to one buffer (``Sink``, in C when built): nothing outlives the request. That
buffer goes to ONE writer thread when it reaches 256 KiB, or every
``flush_interval`` s; the thread only writes it: one ``os.write`` (a regular file) or writes
of at most PIPE_BUF bytes cut at line ends (a pipe or socket, e.g. stdout shared by every
worker: no line is split by another worker's). Keeping raw records for the thread to format
cost the loop more than formatting them (docs/performance.md, "Access log cost").

A slow disk or a full pipe blocks only that thread. Lines logged while the thread is behind
by more than ``buffer_bytes`` are dropped (whole lines) and counted (``stats()``), so memory
stays bounded and the loop never waits. The formatters are built for speed: one C-level
check that a record's untrusted strings need no escaping (then they go in raw), a per-second
time cache, a template per combination of the few distinct listener/pool/backend names
(bench/accesslog.py measures them).

``reopen()`` (SIGUSR1, logrotate) asks the thread to reopen the path between two writes.

No control-plane import (only the standard library): the worker owns one ``AccessLog``; tests
and bench/accesslog.py use the formatters directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json.encoder
import logging
import os
import queue
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Literal, Protocol, cast

logger = logging.getLogger(__name__)


def _load_fast() -> Any:
    """lb.data._fastlog (setup.py builds it when a C compiler is there), or None: the
    Python formatters then do all the work. PAIRLB_PURE_PYTHON=1 forces them."""
    if os.environ.get("PAIRLB_PURE_PYTHON", "") not in ("", "0"):  # lb.pure_python_requested
        return None
    try:
        return importlib.import_module("lb.data._fastlog")
    except ImportError:
        return None


_fastlog: Any = _load_fast()
FAST: Final = _fastlog is not None
"""Whether the common-case formatter in C is in use (tests/test_fastlog.py needs it)."""

FIELDS: Final = (
    "time",  # 0  float: epoch seconds (wall clock) when the request (connection) started
    "client_ip",  # 1  str
    "client_port",  # 2  int
    "listener",  # 3  str
    "mode",  # 4  "http" | "tcp"
    "method",  # 5  bytes | str | None (TCP: None)
    "target",  # 6  bytes | str | None: the request target as sent
    "protocol",  # 7  "HTTP/1.1" | "HTTP/1.0" | None (TCP)
    "status",  # 8  int: status sent to the client, 0 when none was sent
    "bytes_in",  # 9  int: from the client: the request head as forwarded + the body
    "bytes_out",  # 10 int: bytes sent to the client (head + body)
    "pool",  # 11 str | None
    "backend",  # 12 str | None: the last backend tried
    "retries",  # 13 int
    "queue_ms",  # 14 float, -1 when not reached: start -> backend picked
    "connect_ms",  # 15 float, -1: connection to the backend made (0 when reused)
    "first_byte_ms",  # 16 float, -1: backend's first response byte, since the request was sent
    "total_ms",  # 17 float: start -> last byte to the client (or the close)
    "termination",  # 18 str: two characters, see CAUSES and PHASES
    "request_id",  # 19 bytes | str | None
    "user_agent",  # 20 bytes | str | None: raw header value
    "referer",  # 21 bytes | str | None: raw header value
)
"""Order of a record's fields. Strings may be ``bytes`` (the fast path: pass the parser's raw
bytes, decoding is not the loop's job; the writer reads them as UTF-8, invalid bytes kept as
``\\xNN`` text), ``str`` or ``None`` (absent: ``""`` in JSON, ``-`` in combined). A field
of the wrong type costs that line's accuracy (``sanitize``), never the line."""

Record = tuple[Any, ...]
"""A tuple of ``len(FIELDS)`` values, in that order."""

(TIME, CLIENT_IP, CLIENT_PORT, LISTENER, MODE, METHOD, TARGET, PROTOCOL, STATUS, BYTES_IN,
 BYTES_OUT, POOL, BACKEND, RETRIES, QUEUE_MS, CONNECT_MS, FIRST_BYTE_MS, TOTAL_MS, TERMINATION,
 REQUEST_ID, USER_AGENT, REFERER) = range(len(FIELDS))

# --------------------------------------------------------------------------- termination

# First character: who or what ended the request (HAProxy's termination state, first char).
END_NORMAL: Final = "-"
END_CLIENT_ABORT: Final = "C"
END_SERVER_ABORT: Final = "S"
END_PROXY: Final = "P"
END_RESOURCE: Final = "R"
END_CLIENT_TIMEOUT: Final = "c"
END_SERVER_TIMEOUT: Final = "s"
END_DOWN: Final = "D"
END_LOCAL: Final = "L"

CAUSES: Final[dict[str, str]] = {
    END_NORMAL: "normal end",
    END_CLIENT_ABORT: "the client closed or reset the connection",
    END_SERVER_ABORT: "the backend refused, closed, reset or answered garbage",
    END_PROXY: "pairlb refused the request or answered it with an error (4xx, 503 no backend)",
    END_RESOURCE: "a pairlb limit or resource ran out (descriptors, memory, ports)",
    END_CLIENT_TIMEOUT: "the client was too slow (request head, body, or reading the answer)",
    END_SERVER_TIMEOUT: "the backend was too slow (connect, response headers, data)",
    END_DOWN: "the backend went down, was removed or drained while serving",
    END_LOCAL: "pairlb served it locally (redirect, ACME challenge, local answer)",
}

# Second character: what the connection was doing then.
PHASE_REQUEST: Final = "R"
PHASE_QUEUE: Final = "Q"
PHASE_CONNECT: Final = "C"
PHASE_HEADERS: Final = "H"
PHASE_DATA: Final = "D"
PHASE_LAST: Final = "L"
PHASE_NONE: Final = "-"

PHASES: Final[dict[str, str]] = {
    PHASE_REQUEST: "waiting for (reading) the client's request",
    PHASE_QUEUE: "picking a backend",
    PHASE_CONNECT: "connecting to the backend",
    PHASE_HEADERS: "waiting for the backend's response headers",
    PHASE_DATA: "transferring data (body, tunnel, TCP stream)",
    PHASE_LAST: "sending the last bytes to the client",
    PHASE_NONE: "normal end",
}

TERM_NORMAL: Final = "--"

_REQUEST_REFUSED = (
    # llhttp parse errors (proxy._PARSE_ERRORS, proxy._classify) and pairlb's own checks
    "bad_version", "http2_preface", "content_length_and_transfer_encoding",
    "duplicate_content_length", "bad_content_length", "unsupported_transfer_coding",
    "bad_transfer_encoding", "bad_header_whitespace", "bad_header_value", "bad_header_name",
    "bad_chunk", "bad_line_ending", "bad_request_line", "bad_method", "bad_target",
    "bad_request", "request_line_too_long", "headers_too_large", "too_many_headers",
    "trailers_too_large", "chunk_framing_too_large", "http09", "connect_method",
    "http10_transfer_encoding", "upgrade_with_body", "body_too_large", "bad_upgrade",
    "bad_redirect_host",
)

REASON_TERMINATION: Final[dict[str, str]] = {
    **dict.fromkeys(_REQUEST_REFUSED, "PR"),
    "no_backend": "PQ",
    "header_timeout": "cR",
    "body_timeout": "cD",
    "idle_timeout": "cD",  # TCP: no byte either way for client_idle_timeout_s
    "body_total_timeout": "cD",
    "client_body_timeout": "cD",
    "client_write_timeout": "cD",
    "client_closed": "CD",
    "connect_timeout": "sC",
    "connect_refused": "SC",
    "connect_failed": "SC",
    "tls_verify": "SC",
    "tls_handshake": "SC",
    "response_timeout": "sH",
    "exchange_timeout": "sH",
    "bad_response": "SH",
    "backend_closed": "SH",
    "backend_reset": "SD",
    "backend_bad_response": "SD",
    "https_redirect": "LR",
    "acme_served": "LR",
    "acme_missing": "LR",
}
"""pairlb's error/answer reasons (the ``reason`` labels of lb/data/proxy.py and tcpproxy.py)
-> termination code in its usual phase. Override the phase where the caller knows better
(``termination("client_closed", PHASE_HEADERS)`` -> ``CH``; ``response_timeout`` after the
response started -> ``sD``)."""


SNI_TERMINATION: Final[dict[str, str]] = {
    "no_match": "PR",
    "no_sni": "PR",
    "not_tls": "PR",
    "oversize": "PR",
    "timeout": "cR",
    "eof": "CR",
    "closed": "CR",
}
"""A TCP connection to a listener with SNI routes that never got a pool: its SNI decision
(lb.data.tcpproxy.SNI_DECISIONS, all but ``route``) -> termination code."""


def termination(reason: str | None, phase: str | None = None) -> str:
    """Two-char termination code for a pairlb reason (None: a normal end, ``--``); an
    unknown reason is pairlb's refusal (``P``). ``phase`` replaces the table's phase."""
    if reason is None:
        return TERM_NORMAL if phase is None else END_NORMAL + phase
    code = REASON_TERMINATION.get(reason)
    if code is None:
        code = END_PROXY + (PHASE_REQUEST if phase is None else phase)
    return code if phase is None else code[0] + phase


# --------------------------------------------------------------------------- formatting
#
# A batch is formatted in one loop over its records into bytes: per-second time caches kept
# in locals, one C-level test for "nothing to escape" over the concatenated untrusted fields
# (the common case: then they go in raw), small caches for the few distinct names. Strings
# may be bytes (raw, preferred), str (encoded as UTF-8) or None (empty).

_esc_json: Callable[[str], str] = json.encoder.encode_basestring_ascii  # C: escapes all but
# printable ASCII (control chars, DEL, non-ASCII, U+2028, lone surrogates): output is ASCII

_SAFE: Final = bytes(i for i in range(0x20, 0x7F) if i not in b'"\\')
"""Bytes that go in as they are, in both formats: printable ASCII but '"' and '\\'."""
_SAFE_TOK: Final = _SAFE.replace(b" ", b"")
"""The same for a bare combined field: no space either."""


def _as_bytes(v: Any) -> bytes:
    if v.__class__ is bytes:
        return v
    if v is None:
        return b""
    if isinstance(v, str):
        return v.encode("utf-8", "surrogatepass")
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    return str(v).encode("utf-8", "surrogatepass")


def json_text(v: Any) -> str:
    """The text a JSON line holds for ``v``: bytes decoded as UTF-8 with invalid bytes as
    ``\\xNN`` text, None as "" (what a reader gets back from ``json.loads``)."""
    return _as_bytes(v).decode("utf-8", "backslashreplace")


def _json_raw(b: bytes) -> bytes:
    """``b`` escaped for the inside of a JSON string (ASCII)."""
    if not b.translate(None, _SAFE):
        return b
    return _esc_json(b.decode("utf-8", "backslashreplace"))[1:-1].encode("ascii")


FIELD_MAX: Final = 2048
"""Bytes kept of each field a client controls in length (target, request id, user agent,
referer); a longer one is cut and ends with ``...``. Escaping can make a byte 5-6
characters, so an unbounded field would let one client write 5x its header size per
request (a full disk, everyone else's lines dropped). HAProxy cuts whole lines at 1 KiB."""
STREAM_FIELD_MAX: Final = 128
"""The same on a pipe or socket (stdout) for a line that came out over PIPE_BUF: cut
again so it fits one atomic write (another worker's line can never land inside it)."""


_CACHE_MAX: Final = 4096
_jq_cache: dict[Any, bytes] = {}
_cq_cache: dict[Any, bytes] = {}
_ct_cache: dict[Any, bytes] = {}


_NAME_TYPES: Final = (str, bytes, type(None))
"""What the name caches hold: values of other types may be equal across types (True == 1 ==
1.0) and would be written as another's text."""


def _cached(cache: dict[Any, bytes], v: Any, fn: Callable[[bytes], bytes]) -> bytes:
    """``fn(v)`` for the few distinct values of a name field (listener, pool, backend...)."""
    if v.__class__ not in _NAME_TYPES:
        return fn(_as_bytes(v))
    try:
        s = cache.get(v)
    except TypeError:  # unhashable (bytearray): not cached
        return fn(_as_bytes(v))
    if s is None:
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        s = cache[v] = fn(_as_bytes(v))
    return s


def _jq(b: bytes) -> bytes:
    return b'"' + _json_raw(b) + b'"'


def _jq_miss(v: Any) -> bytes:
    return _cached(_jq_cache, v, _jq)


def _iso_prefix(sec: int) -> bytes:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)).encode("ascii")


_JSON_LINE: Final = (
    b'{"time":"%s.%03dZ","client_ip":"%s","client_port":%d,"listener":%s,"mode":%s,'
    b'"method":"%s","target":"%s","protocol":%s,"status":%d,"bytes_in":%d,"bytes_out":%d,'
    b'"pool":%s,"backend":%s,"retries":%d,"queue_ms":%.3f,"connect_ms":%.3f,'
    b'"first_byte_ms":%.3f,"total_ms":%.3f,"termination":%s,"request_id":"%s",'
    b'"user_agent":"%s","referer":"%s"}\n'
)


_JSON_PARTS: Final = _JSON_LINE.split(b"%s")
_JSON_NAMES: Final = (3, 4, 7, 8, 9, 10)
"""Which %s of _JSON_LINE hold the names (listener, mode, protocol, pool, backend,
termination): a line's template has them filled in (few distinct combinations)."""
_jtpl_cache: dict[Any, bytes] = {}
_NO_LIMIT: Final = 1 << 62


def _json_tpl(key: tuple[Any, ...]) -> bytes:
    """_JSON_LINE with the names of ``key`` in it (their %% doubled)."""
    names = iter(_jq(_as_bytes(v)).replace(b"%", b"%%") for v in key)
    out = [_JSON_PARTS[0]]
    for i, part in enumerate(_JSON_PARTS[1:], 1):
        out.append(next(names) if i in _JSON_NAMES else b"%s")
        out.append(part)
    tpl = b"".join(out)
    if all(v.__class__ in _NAME_TYPES for v in key):
        if len(_jtpl_cache) >= _CACHE_MAX:
            _jtpl_cache.clear()
        _jtpl_cache[key] = tpl
    return tpl


def _clip4(tg: bytes, rid: bytes, ua: bytes, rf: bytes, limit: int) -> tuple[bytes, ...]:
    return tuple(v[:limit] + b"..." if len(v) > limit else v for v in (tg, rid, ua, rf))


def py_json_formatter(limit: int = FIELD_MAX) -> Callable[[Record], bytes]:
    """A function that makes one record its JSON line: one object, keys in FIELDS order,
    ASCII and valid whatever the values hold (time: ISO 8601 UTC with ms; durations: ms,
    -1.000 when not reached; strings: "" when absent; client-sized fields cut at
    ``limit`` bytes). It raises on a record of the wrong shape (``sanitize`` fixes it)."""
    sec0: int | None = None  # not -1: a time in 1969's last second is a second like any
    pre = b""
    tpl_of = _jtpl_cache.get
    safe = _SAFE
    cut = limit or _NO_LIMIT

    def json_line(r: Record) -> bytes:
        nonlocal sec0, pre
        (t, ip, port, lst, mode, m, tg, proto, st, n_in, n_out, pool, be, retries, q_ms,
         c_ms, f_ms, t_ms, term, rid, ua, rf) = r
        sec = int(t)
        if sec != sec0:
            pre = _iso_prefix(sec)
            sec0 = sec
        ip = ip.encode("utf-8", "surrogatepass") if ip.__class__ is str else _as_bytes(ip)
        if m.__class__ is not bytes:
            m = _as_bytes(m)
        if tg.__class__ is not bytes:
            tg = _as_bytes(tg)
        if rid.__class__ is not bytes:
            rid = _as_bytes(rid)
        if ua.__class__ is not bytes:
            ua = _as_bytes(ua)
        if rf.__class__ is not bytes:
            rf = _as_bytes(rf)
        raw = b"".join((ip, m, tg, rid, ua, rf))
        if len(raw) > cut or raw.translate(None, safe):
            if len(raw) > cut:  # client-sized fields cut (as clip() does)
                tg, rid, ua, rf = _clip4(tg, rid, ua, rf, cut)
            ip, m, tg = _json_raw(ip), _json_raw(m), _json_raw(tg)
            rid, ua, rf = _json_raw(rid), _json_raw(ua), _json_raw(rf)
        key = (lst, mode, proto, pool, be, term)
        tpl = tpl_of(key) or _json_tpl(key)
        return tpl % (pre, int((t - sec) * 1000), ip, port, m, tg, st, n_in, n_out, retries,
                      q_ms, c_ms, f_ms, t_ms, rid, ua, rf)

    return json_line


def _lines(
    one: Callable[[Record], bytes], batch: Iterable[Record]
) -> tuple[list[bytes], int]:
    out: list[bytes] = []
    bad = 0
    for r in batch:
        try:
            out.append(one(r))
        except Exception:
            bad += 1
            with contextlib.suppress(Exception):  # sanitize() makes any record formattable
                out.append(one(sanitize(r)))
    return out, bad


def _with_c(
    py: Callable[[Record], bytes], name: str, limit: int
) -> Callable[[Record], bytes]:
    """The C formatter ``name`` of lb.data._fastlog in front of ``py`` (when built)."""
    if _fastlog is None:
        return py
    _fastlog.reset()  # a new formatter reads the time zone anew, as the Python one does
    return functools.partial(getattr(_fastlog, name), py, limit)


def json_formatter(limit: int = FIELD_MAX) -> Callable[[Record], bytes]:
    """``py_json_formatter(limit)``, in C for the common record when lb.data._fastlog is
    built (same bytes; any other record goes to the Python one)."""
    return _with_c(py_json_formatter(limit), "json_line", limit)


def json_lines(batch: Iterable[Record], *, limit: int = 0) -> tuple[list[bytes], int]:
    """``json_formatter`` over a batch: (lines, records that needed ``sanitize``; their
    lines are there all the same)."""
    return _lines(json_formatter(limit), batch)


# Combined: like nginx's escape=default and Apache: '"' and '\\' backslashed, every byte
# outside printable ASCII as \xHH (non-ASCII text as its UTF-8 bytes); "-" when empty. A
# bare field (those after the combined part) escapes spaces too: each one matches \S+.
_CLF_UNSAFE_B = re.compile(rb'[^ !#-\[\]-~]')
_TOK_UNSAFE_B = re.compile(rb'[^!#-\[\]-~]')
_BYTE_ESC: dict[int, bytes] = {i: b"\\x%02x" % i for i in range(256)}
_BYTE_ESC[0x22] = b'\\"'
_BYTE_ESC[0x5C] = b"\\\\"


def _byte_repl(m: re.Match[bytes]) -> bytes:
    return _BYTE_ESC[m.group()[0]]


def _clf_q(b: bytes) -> bytes:
    """``b`` for a double-quoted combined field."""
    if not b:
        return b"-"
    if not b.translate(None, _SAFE):
        return b
    return _CLF_UNSAFE_B.sub(_byte_repl, b)


def _clf_t(b: bytes) -> bytes:
    """``b`` for a bare (space-separated) combined field."""
    if not b:
        return b"-"
    if not b.translate(None, _SAFE_TOK):
        return b
    return _TOK_UNSAFE_B.sub(_byte_repl, b)


def clf_text(v: Any, bare: bool = False) -> str:
    """What a combined line holds for ``v`` (tests: the expected escaped text)."""
    return (_clf_t if bare else _clf_q)(_as_bytes(v)).decode("ascii")


def _cq_miss(v: Any) -> bytes:
    return _cached(_cq_cache, v, _clf_q)


def _ct_miss(v: Any) -> bytes:
    return _cached(_ct_cache, v, _clf_t)


_MONTHS: Final = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                  "Nov", "Dec")


def clf_time(sec: int) -> bytes:
    """``10/Oct/2000:13:55:36 -0700``: local time, English months whatever the locale."""
    tm = time.localtime(sec)
    off = tm.tm_gmtoff // 60
    sign = "-" if off < 0 else "+"
    off = abs(off)
    return (f"{tm.tm_mday:02d}/{_MONTHS[tm.tm_mon - 1]}/{tm.tm_year:04d}:{tm.tm_hour:02d}:"
            f"{tm.tm_min:02d}:{tm.tm_sec:02d} {sign}{off // 60:02d}{off % 60:02d}").encode()


_CLF_LINE: Final = (
    b'%s - - [%s] "%s %s %s" %d %s "%s" "%s" %s %s %s %d %.3f %.3f %.3f %.3f %s %s %d %d\n'
)
_CLF_LINE_TCP: Final = (
    b'%s - - [%s] "-" %d %s "%s" "%s" %s %s %s %d %.3f %.3f %.3f %.3f %s %s %d %d\n'
)
COMBINED_FIELDS: Final = (
    "client_ip", "-", "-", "[time]", '"method target protocol"', "status", "bytes_out",
    '"referer"', '"user_agent"', "listener", "pool", "backend", "retries", "queue_ms",
    "connect_ms", "first_byte_ms", "total_ms", "termination", "request_id", "bytes_in",
    "client_port",
)
"""The space-separated fields of a combined line (a TCP connection's request is "-";
``bytes_out`` is ``-`` when 0 as in Apache; an empty or absent string is ``-``)."""


def py_combined_formatter(limit: int = FIELD_MAX) -> Callable[[Record], bytes]:
    """A function that makes one record its combined line: Apache's combined format then
    pairlb's fields (COMBINED_FIELDS), printable ASCII, quotes and backslashes escaped.
    It raises on a record of the wrong shape (``sanitize`` fixes it)."""
    cq = _cq_cache.get
    ct = _ct_cache.get
    safe = _SAFE
    safe_tok = _SAFE_TOK
    cut = limit or _NO_LIMIT
    sec0: int | None = None
    when = b""

    def combined_line(r: Record) -> bytes:
        nonlocal sec0, when
        sec = int(r[0])
        if sec != sec0:
            when = clf_time(sec)
            sec0 = sec
        ip = (r[1].encode("utf-8", "surrogatepass") if r[1].__class__ is str
              else _as_bytes(r[1])) or b"-"
        m = r[5] if r[5].__class__ is bytes else _as_bytes(r[5])
        tg = (r[6] if r[6].__class__ is bytes else _as_bytes(r[6])) or b"-"
        rid = (r[19] if r[19].__class__ is bytes else _as_bytes(r[19])) or b"-"
        ua = (r[20] if r[20].__class__ is bytes else _as_bytes(r[20])) or b"-"
        rf = (r[21] if r[21].__class__ is bytes else _as_bytes(r[21])) or b"-"
        quoted = b"".join((m, tg, ua, rf))
        if len(quoted) + len(rid) > cut:  # client-sized fields cut (as clip() does)
            tg, rid, ua, rf = _clip4(tg, rid, ua, rf, cut)
            quoted = b"".join((m, tg, ua, rf))
        if (ip + rid).translate(None, safe_tok) or quoted.translate(None, safe):
            ip, rid = _clf_t(ip), _clf_t(rid)
            m, tg, ua, rf = _clf_q(m), _clf_q(tg), _clf_q(ua), _clf_q(rf)
        nout = b"%d" % r[10] if r[10] else b"-"
        if r[5]:
            return _CLF_LINE % (
                ip, when, m, tg, cq(r[7]) or _cq_miss(r[7]), r[8], nout, rf, ua,
                ct(r[3]) or _ct_miss(r[3]), ct(r[11]) or _ct_miss(r[11]),
                ct(r[12]) or _ct_miss(r[12]), r[13], r[14], r[15], r[16], r[17],
                ct(r[18]) or _ct_miss(r[18]), rid, r[9], r[2],
            )
        return _CLF_LINE_TCP % (
            ip, when, r[8], nout, rf, ua,
            ct(r[3]) or _ct_miss(r[3]), ct(r[11]) or _ct_miss(r[11]),
            ct(r[12]) or _ct_miss(r[12]), r[13], r[14], r[15], r[16], r[17],
            ct(r[18]) or _ct_miss(r[18]), rid, r[9], r[2],
        )

    return combined_line


def combined_formatter(limit: int = FIELD_MAX) -> Callable[[Record], bytes]:
    """``py_combined_formatter(limit)``, in C for the common record when lb.data._fastlog
    is built (same bytes; any other record goes to the Python one)."""
    return _with_c(py_combined_formatter(limit), "combined_line", limit)


def combined_lines(batch: Iterable[Record], *, limit: int = 0) -> tuple[list[bytes], int]:
    """``combined_formatter`` over a batch: (lines, records that needed ``sanitize``)."""
    return _lines(combined_formatter(limit), batch)


def _num(v: Any, default: float) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return default
    return f if f == f and abs(f) != float("inf") else default


def sanitize(r: Sequence[Any]) -> Record:
    """A record every formatter takes: numbers coerced (bad ones: 0 or -1), strings made
    bytes, missing fields empty. The slow path for a record a formatter raised on: a
    caller's bug costs that line's accuracy, never the writer thread."""
    try:
        v = list(r)
    except TypeError:
        v = []
    v = v[: len(FIELDS)] + [None] * (len(FIELDS) - len(v))
    t = _num(v[TIME], 0.0)
    v[TIME] = t if 0 <= t < 253402300800 else 0.0  # 1970..9999: what gmtime/localtime take
    for i in (CLIENT_PORT, STATUS, BYTES_IN, BYTES_OUT, RETRIES):
        n = _num(v[i], 0)
        v[i] = int(n) if abs(n) < 1 << 62 else 0
    for i in (QUEUE_MS, CONNECT_MS, FIRST_BYTE_MS, TOTAL_MS):
        v[i] = _num(v[i], -1.0)
    for i in (CLIENT_IP, LISTENER, MODE, METHOD, TARGET, PROTOCOL, POOL, BACKEND, TERMINATION,
              REQUEST_ID, USER_AGENT, REFERER):
        try:
            v[i] = _as_bytes(v[i])
        except Exception:
            v[i] = b"?"
    return tuple(v)


Format = Literal["json", "combined"]
FORMATTERS: Final[dict[str, Callable[..., tuple[list[bytes], int]]]] = {
    "json": json_lines,
    "combined": combined_lines,
}
_PY_FORMATTERS: Final[dict[str, Callable[[int], Callable[[Record], bytes]]]] = {
    "json": py_json_formatter,
    "combined": py_combined_formatter,
}
LINE_FORMATTERS: Final[dict[str, Callable[[int], Callable[[Record], bytes]]]] = {
    "json": json_formatter,
    "combined": combined_formatter,
}


def format_line(rec: Record, fmt: Format = "json") -> str:
    """One record as its line (with the newline): for tests and tools; the writer formats
    whole batches."""
    return FORMATTERS[fmt]((rec,))[0][0].decode("ascii")


# --------------------------------------------------------------------------- the writer


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP: Final = object()
_WAKE: Final = object()

PIPE_BUF: Final = 4096  # Linux: writes up to this size to a pipe are atomic
_BIG_FIELDS = (TARGET, REQUEST_ID, USER_AGENT, REFERER)
def clip(r: Record, limit: int = FIELD_MAX) -> Record:
    """``r`` with its client-sized fields cut to ``limit`` bytes (``...`` at the end);
    ``r`` itself when none is longer."""
    out: list[Any] | None = None
    for i in _BIG_FIELDS:
        v = r[i]
        if v and v.__class__ in (bytes, str) and len(v) > limit:
            if out is None:
                out = list(r)
            b = v if isinstance(v, bytes) else v.encode("utf-8", "surrogatepass")
            out[i] = b[:limit] + b"..."
    return r if out is None else tuple(out)
def http_record(
    wall_now: float | None, ip: Any, port: int, listener: Any, method: Any, target: Any,
    http10: bool, status: int, bytes_in: int, bytes_out: int, pool: Any, backend: Any,
    retries: int, t0: float, t_pick: float, connect_s: float, t_sent: float,
    t_first: float, now: float, term: str, rid: Any, ua: Any, referer: Any,
) -> Record:
    """An HTTP request's record (FIELDS) from its raw facts: times on the loop's clock,
    -1 for a stage not reached; ``wall_now`` is the wall clock at ``now`` (None: read it
    here, as the C sink does without a call to time.time in the hot path). What
    ``Sink.http`` computes in C (the same float operations: the same values)."""
    if wall_now is None:
        wall_now = time.time()
    total = now - t0
    return (
        wall_now - total, ip, port, listener, "http", method, target,
        "HTTP/1.0" if http10 else "HTTP/1.1", status, bytes_in, bytes_out, pool, backend,
        retries, (t_pick - t0) * 1000 if t_pick >= 0 else -1.0,
        connect_s * 1000 if connect_s >= 0 else -1.0,
        (t_first - t_sent) * 1000 if t_first >= 0 and t_sent >= 0 else -1.0,
        total * 1000, term, rid, ua, referer,
    )


class Sink(Protocol):
    """The loop-side line buffer of an AccessLog: lb.data._fastlog.Sink, or PySink."""

    len: int
    nlines: int
    room: int
    handover_at: int
    chunked: int

    def add(self, rec: Record) -> int: ...

    def http(self, *facts: Any) -> int | Record: ...

    def take(self) -> tuple[bytes, int]: ...

    def clear(self) -> int: ...


class PySink:
    """lb.data._fastlog.Sink in Python (no C compiler, or PAIRLB_PURE_PYTHON=1): ``add``
    formats a record and appends its line; returns 0, 1 when the caller has work (a new
    batch, the hand-over size reached), 2 when the line would take the buffer past ``room``
    (not appended)."""

    def __init__(self, fmt: str, limit: int, fallback: Callable[[Record], bytes],
                 stream_fallback: Callable[[Record], bytes],
                 http_fallback: Callable[..., Record] = http_record) -> None:
        if fmt not in _PY_FORMATTERS:
            raise ValueError("fmt: json or combined")
        self._fmt = _PY_FORMATTERS[fmt](limit)
        self._fallback = fallback
        self._stream = stream_fallback
        self._http = http_fallback
        self._lines: list[bytes] = []
        self.len = 0
        self.nlines = 0
        self.room = 1 << 62
        self.handover_at = 64 << 10
        self.chunked = 0

    def add(self, rec: Record) -> int:
        try:
            line = self._fmt(rec)
        except Exception:
            line = self._fallback(rec)
        if self.chunked and len(line) > PIPE_BUF:
            line = self._stream(rec)
        n = len(line)
        if self.len + n > self.room:
            return 2
        self._lines.append(line)
        self.len += n
        self.nlines += 1
        return int(self.nlines == 1 or self.len >= self.handover_at)

    def http(self, *facts: Any) -> int | Record:
        """``add(http_record(*facts))``; the record itself when it found no room."""
        rec = self._http(*facts)
        r = self.add(rec)
        return rec if r == 2 else r

    def take(self) -> tuple[bytes, int]:
        data, n = b"".join(self._lines), self.nlines
        self._lines = []
        self.len = self.nlines = 0
        return data, n

    def clear(self) -> int:
        n = self.nlines
        self._lines = []
        self.len = self.nlines = 0
        return n


_HANDOVER_MAX: Final = 256 << 10
"""Bytes of lines after which the loop hands its buffer to the writer without waiting for
the timer: a busy worker's lines stay in a small, cache-warm buffer."""


class AccessLog:
    """A worker's access log. Create it on the worker's running loop; ``write`` per request,
    ``reopen`` on SIGUSR1, ``close`` at exit. Counters in ``stats()``."""

    def __init__(
        self,
        dest: str,
        fmt: Format = "json",
        buffer_bytes: int = 4 << 20,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        flush_interval: float = 0.15,
        retry_open_s: float = 5.0,
    ) -> None:
        """``dest``: "stdout" (fd 1, never reopened nor closed) or an absolute path, opened
        O_APPEND|O_CREAT mode 0640 by the writer thread (an open may block: a FIFO)."""
        if fmt not in FORMATTERS:
            raise ValueError(f"access log format {fmt!r}: not one of {sorted(FORMATTERS)}")
        if dest != "stdout" and not os.path.isabs(dest):
            raise ValueError(f"access log {dest!r}: 'stdout' or an absolute path")
        self.dest = dest
        self.fmt: Format = fmt
        self.buffer_bytes = buffer_bytes
        self.flush_interval = flush_interval
        self.retry_open_s = retry_open_s
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        py_line = _PY_FORMATTERS[fmt](FIELD_MAX)
        py_stream = _PY_FORMATTERS[fmt](STREAM_FIELD_MAX)

        # The fallbacks must not hold self: the C Sink holds them and is not tracked by the
        # garbage collector (a cycle through it would keep every closed log alive).
        bad = self._bad = [0]

        def fallback(rec: Record) -> bytes:
            try:
                return py_line(rec)
            except Exception:
                bad[0] += 1
                return py_line(sanitize(rec))

        def stream_fallback(rec: Record) -> bytes:
            try:
                return py_stream(rec)
            except Exception:
                return py_stream(sanitize(rec))

        # loop: the formatted lines not yet handed over (C when built, else PySink)
        self._sink: Sink = (_fastlog.Sink if _fastlog is not None else PySink)(
            fmt, FIELD_MAX, fallback, stream_fallback, http_record)
        if _fastlog is not None:
            _fastlog.reset()
        self._sink.handover_at = max(PIPE_BUF, min(_HANDOVER_MAX, buffer_bytes // 8))
        self._sink.room = buffer_bytes
        self.add: Callable[[Record], int] = self._sink.add
        """The hot path's ``write``: one C call (Sink.add); when it returns non-zero, the
        caller passes that to ``due`` with the record."""
        self.http: Callable[..., int | Record] = self._sink.http
        """An HTTP request's line from its raw facts (``http_record``'s arguments), with no
        record made in Python: one C call; pass a true result to ``due_http``."""
        self._timer: asyncio.TimerHandle | None = None
        self._idle = True
        self._closed = False
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()
        # Counters: each written by one thread only (no lock, no lost update).
        self._in_bytes = 0  # loop: bytes handed to the thread
        self._out_bytes = 0  # thread: bytes of the buffers it has finished
        self._dropped_loop = 0  # loop: lines refused (the buffer is full)
        self._dropped_thread = 0  # thread: lines lost to a failed open or write
        self._written = 0
        self._errors = 0
        self._batches = 0
        self._reopens = 0
        self._reopen = dest != "stdout"  # the thread opens the path first thing
        self._fd: int | None = 1 if dest == "stdout" else None
        self._chunked = False
        self._failing = False
        self._last_open = -1e9
        if self._fd is not None:
            self._chunked = _is_stream(self._fd)
        else:
            # A FIFO's open blocks until a reader comes: lines logged meanwhile must already
            # be cut for atomic pipe writes (stat does not block).
            with contextlib.suppress(OSError):
                self._chunked = stat.S_ISFIFO(os.stat(dest).st_mode)
        self._sink.chunked = int(self._chunked)
        self._handed_lines = 0  # loop: lines given to the writer
        self._abandoned = 0  # lines left with a writer that did not finish by close
        self._thread = threading.Thread(
            target=self._run, name="pairlb-accesslog", daemon=True
        )
        self._thread.start()
        if self._reopen:
            self._q.put(_WAKE)  # open now: a bad path is logged at start, not at 1st request

    # ------------------------------------------------------------------ loop side

    def write(self, rec: Record) -> None:
        """Log one request: ``rec`` is a tuple in the order of FIELDS. Its line is formatted
        here, at once, and appended to the loop's buffer (one C call when _fastlog is
        built): keeping records for the writer thread to format cost the loop more
        (docs/performance.md, "Access log cost")."""
        r = self.add(rec)
        if r:
            self.due(r, rec)

    def due_http(self, r: int | Record) -> None:
        """``due`` for what ``http`` returned (the record itself: no room)."""
        if isinstance(r, tuple):
            self.due(2, r)
        else:
            self.due(r, ())

    def due(self, r: int, rec: Record) -> None:
        """What the sink asked for (``Sink.add``): 1, a timer for a new batch or a
        hand-over; 2, no room: a fresh look at how far behind the writer is, then the line
        or its drop (counted)."""
        sink = self._sink
        if r == 2:
            sink.room = self.buffer_bytes - max(0, self._in_bytes - self._out_bytes)
            seen = self._bad[0]
            r = sink.add(rec)
            self._bad[0] = seen  # the same record: counted once, when first formatted
            if r == 2:
                self._dropped_loop += 1
                return
            if not r:
                return
        if self._idle:
            if sink.nlines:
                self._arm()
        elif sink.len >= sink.handover_at:
            self._handover()

    def _arm(self) -> None:
        if self._closed:
            return
        self._idle = False
        self._timer = self._loop.call_later(self.flush_interval, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if not self._sink.nlines:
            self._idle = True  # no wakeups on an idle worker
            return
        self._timer = self._loop.call_later(self.flush_interval, self._tick)
        self._handover()

    def _handover(self) -> None:
        """Give the writer the lines so far (one bytes object)."""
        sink = self._sink
        if not sink.nlines:
            return
        data, n = sink.take()
        self._q.put((data, n))
        self._handed_lines += n
        self._in_bytes += len(data)
        sink.room = self.buffer_bytes - max(0, self._in_bytes - self._out_bytes)

    def _mark(self) -> _Flush | None:
        """Hand the pending lines over; a mark the writer sets once past them (None when
        the writer has already stopped)."""
        if self._closed and not self._thread.is_alive():
            return None
        if not self._closed:
            self._handover()
        mark = _Flush()
        self._q.put(mark)
        return mark

    def flush_now(self, timeout: float = 1.0) -> bool:
        """Hand the pending lines to the writer and wait (at most ``timeout`` s, blocking
        the caller) until it has written them. False if it did not finish in time."""
        mark = self._mark()
        return mark is None or mark.done.wait(timeout)

    async def aflush(self, within: float = 1.0) -> bool:
        """``flush_now`` that lets the loop run meanwhile (waits in a helper thread)."""
        mark = self._mark()
        return mark is None or await asyncio.to_thread(mark.done.wait, within)

    def reopen(self) -> None:
        """Reopen the path before the next batch (logrotate has renamed it). Safe from a
        loop signal handler; a no-op for stdout."""
        if self.dest == "stdout" or self._closed:
            return
        self._reopen = True
        self._q.put(_WAKE)

    def close(self, timeout: float = 1.0) -> bool:
        """Write what is pending (waiting at most ``timeout`` s, blocking the loop), then
        stop the thread and close the file. Later writes are discarded. False if lines were
        left behind (a stuck writer: it stays blocked in its daemon thread)."""
        if self._closed:
            return True
        ok = self.flush_now(timeout)
        self._shut()
        if ok:
            self._thread.join(timeout)
        else:
            self._abandon()
        return ok

    async def aclose(self, within: float = 1.0) -> bool:
        """``close`` for a worker's async shutdown: the loop keeps running while the last
        lines are written; requests logged meanwhile are written too."""
        if self._closed:
            return True
        ok = await self.aflush(within)
        if ok and self._sink.nlines:
            ok = await self.aflush(within)
        self._shut()
        if not ok:
            self._abandon()
        return ok

    def _abandon(self) -> None:
        """The writer is stuck at close: what it holds counts as dropped (stats() is read
        once more, at the worker's exit; a late write would not be counted)."""
        self._abandoned = max(0, self._handed_lines - self._written - self._dropped_thread)

    def _shut(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._idle = False
        self._dropped_loop += self._sink.clear()
        self.write = _discard  # type: ignore[method-assign]  # later lines: nothing
        self.add = _discard_true
        self.http = _discard_http
        self._q.put(_STOP)

    def stats(self) -> dict[str, int]:
        """Counters since start: lines ``written``, ``dropped`` (buffer full, file not open,
        write failed), ``errors`` (failed opens and writes), ``bad_records`` (a field of the
        wrong type, logged after coercion), ``queue_bytes`` (handed over, not yet written),
        ``pending`` (lines not yet handed over), ``reopens``, ``open`` (0/1)."""
        return {
            "written": self._written,
            "dropped": self._dropped_loop + self._dropped_thread + self._abandoned,
            "errors": self._errors,
            "bad_records": self._bad[0],
            "queue_bytes": max(0, self._in_bytes - self._out_bytes),
            "pending": self._sink.nlines,
            "batches": self._batches,
            "reopens": self._reopens,
            "open": int(self._fd is not None),
        }

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        get = self._q.get
        while True:
            item = get()
            if self._reopen:
                self._reopen = False
                self._open()
            if item is _STOP:
                break
            if item is _WAKE:
                continue
            if isinstance(item, _Flush):
                item.done.set()
                continue
            data, nlines = cast("tuple[bytes, int]", item)
            try:
                self._write_batch(data, nlines)
            except Exception:  # never let the thread die: the loop would fill the queue
                self._errors += 1
                self._dropped_thread += nlines
                logger.exception("event=access_log_failed dest=%s", self.dest)
            finally:
                self._out_bytes += len(data)
        if self._fd is not None and self.dest != "stdout":
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _open(self) -> None:
        self._last_open = time.monotonic()
        try:
            fd = os.open(self.dest, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o640)
        except OSError as exc:
            self._errors += 1
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None
            if not self._failing:
                self._failing = True
                logger.warning("event=access_log_open_failed path=%s error=%s "
                               "(lines are dropped until it opens; retried every %gs "
                               "and on SIGUSR1)", self.dest, exc, self.retry_open_s)
            return
        old, self._fd = self._fd, fd
        self._chunked = _is_stream(fd)
        self._sink.chunked = int(self._chunked)
        if old is not None:
            self._reopens += 1
            with contextlib.suppress(OSError):
                os.close(old)
        if self._failing:
            self._failing = False
            logger.warning("event=access_log_opened path=%s", self.dest)

    def _write_batch(self, data: bytes, nlines: int) -> None:
        if self._fd is None:
            if time.monotonic() - self._last_open >= self.retry_open_s:
                self._open()
            if self._fd is None:
                self._dropped_thread += nlines
                return
        self._batches += 1
        if self._chunked and len(data) > PIPE_BUF:
            self._write_chunks(data, nlines)
        else:
            self._write_all(data, nlines)

    def _write_chunks(self, data: bytes, nlines: int) -> None:
        """A pipe or socket (stdout, shared by every worker): writes of at most PIPE_BUF
        bytes that end at a line end, so no other writer's bytes land inside a line."""
        view = memoryview(data)
        off = 0
        end = len(data)
        done = 0
        while off < end:
            cut = data.rfind(b"\n", off, off + PIPE_BUF) + 1 if end - off > PIPE_BUF else end
            if cut <= off:  # a line over PIPE_BUF (formatted before the pipe was known)
                cut = data.find(b"\n", off) + 1 or end
            n = data.count(b"\n", off, cut)
            if not self._write_all(view[off:cut], n):
                self._dropped_thread += nlines - done - n
                return
            done += n
            off = cut

    def _write_all(self, data: bytes | bytearray | memoryview, nlines: int) -> bool:
        fd = self._fd
        assert fd is not None
        view = memoryview(data)
        off = 0
        try:
            while off < len(data):
                off += os.write(fd, view[off:])
        except OSError as exc:
            self._errors += 1
            self._dropped_thread += nlines
            if not self._failing:
                self._failing = True
                logger.warning("event=access_log_write_failed dest=%s error=%s", self.dest,
                               exc)
            return False
        self._written += nlines
        if self._failing and self._fd is not None:
            self._failing = False
            logger.warning("event=access_log_writing dest=%s", self.dest)
        return True


def _discard(rec: Record) -> None:
    """``AccessLog.write`` once the log is closed."""


def _discard_true(rec: Record) -> int:
    return 0


def _discard_http(*facts: Any) -> int:
    return 0


def _is_stream(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)
