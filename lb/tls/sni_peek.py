"""The server name of a TLS ClientHello, read without terminating TLS (SNI routing of a TCP
listener, HAProxy's ``req.ssl_sni``).

``peek_sni(buf)`` looks at the bytes a client sent so far and answers one of:

- ``NEED_MORE``: a valid beginning of a ClientHello; read more (the caller bounds how many
  bytes and how long);
- ``NOT_TLS``: not a TLS ClientHello, or a malformed one, or one declaring more than
  ``MAX_HELLO`` bytes (decided as soon as the length is known, without waiting for them);
- ``Hello(server_name)``: a complete ClientHello; ``server_name`` is its ``host_name`` SNI
  entry, lower case without a trailing dot, or None when it has none.

``SniPeeker`` is the same parser fed piece by piece (each byte looked at once, however the
hello is split into TCP segments); ``peek_sni(buf) == SniPeeker().feed(buf)``.

The hello may span several TLS records (reassembled; only handshake records may come before
its end) and any number of reads. Every length is checked against what is there: malformed
input gives NOT_TLS, never an exception. Unknown extensions (GREASE, ECH, ...) are skipped;
a duplicate extension is NOT_TLS (RFC 8446 §4.2), as is a name that is not an ASCII DNS name
(letters, digits, ``-``, ``_``; labels of 1-63, at most 253 in all). An SSLv2-compatible
hello (first byte 0x80) is NOT_TLS. With real ECH the name seen is the outer (public) one.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import re
from typing import Final, NamedTuple, TypeAlias

MAX_HELLO: Final = 16 * 1024
"""Largest ClientHello body accepted (post-quantum hellos are about 1.9 KiB)."""
MAX_RECORD: Final = 16384 + 2048
"""Largest record length accepted (RFC 8446 §5.1 allows 2^14 of plaintext; OpenSSL is lenient)."""

_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_EXT_SERVER_NAME: Final = 0
_HOST_NAME: Final = 0
_LABEL: Final = rb"[a-z0-9_][a-z0-9_-]{0,62}"
_HOST_RE: Final = re.compile(rb"(?=.{1,253}\Z)" + _LABEL + rb"(?:\." + _LABEL + rb")*")


class Status(enum.Enum):
    NEED_MORE = "need_more"
    NOT_TLS = "not_tls"


NEED_MORE: Final = Status.NEED_MORE
NOT_TLS: Final = Status.NOT_TLS


class Hello(NamedTuple):
    """A complete ClientHello."""

    server_name: str | None
    """Its SNI host name (lower case, no trailing dot), or None without one."""


PeekResult: TypeAlias = Status | Hello


class SniPeeker:
    """Reads one ClientHello from the bytes fed to it; the answer stays once it is not
    NEED_MORE. Holds at most ``MAX_HELLO`` + 4 bytes of the handshake message."""

    __slots__ = ("_header", "_hs", "_need", "_record_left", "result")

    def __init__(self) -> None:
        self._header = bytearray()
        """The record header read so far (fewer than 5 bytes) while between records."""
        self._record_left = 0
        """Body bytes of the current record still to come."""
        self._hs = bytearray()
        """The handshake message reassembled from the records' bodies."""
        self._need = 0
        """The handshake message's full length once its header is in (0 before)."""
        self.result: PeekResult = NEED_MORE

    def feed(self, data: bytes) -> PeekResult:
        """Take the next bytes the client sent; the answer so far."""
        if self.result is not NEED_MORE:
            return self.result
        self.result = self._feed(data)
        return self.result

    def _feed(self, data: bytes) -> PeekResult:
        pos, end = 0, len(data)
        header, hs = self._header, self._hs
        while pos < end:
            if self._record_left == 0:
                # A record header: type 22, version 3.0-3.4, length 1..MAX_RECORD, checked
                # byte by byte so a stranger is turned away at its first wrong byte.
                b = data[pos]
                pos += 1
                k = len(header)
                if (k == 0 and b != _HANDSHAKE) or (k == 1 and b != 3) or (k == 2 and b > 4):
                    return NOT_TLS
                header.append(b)
                if k == 4:
                    rlen = (header[3] << 8) | b
                    if rlen == 0 or rlen > MAX_RECORD:
                        return NOT_TLS
                    self._record_left = rlen
                    header.clear()
                continue
            take = min(self._record_left, end - pos)
            if self._need:
                take = min(take, self._need - len(hs))
                # Bytes after the hello (in its record or the next) are not looked at.
            hs += data[pos:pos + take]
            pos += take
            self._record_left -= take
            if not self._need:
                if hs and hs[0] != _CLIENT_HELLO:
                    return NOT_TLS
                if len(hs) < 4:
                    continue
                length = (hs[1] << 16) | (hs[2] << 8) | hs[3]
                if length > MAX_HELLO:
                    return NOT_TLS
                self._need = 4 + length
                del hs[self._need:]
            if len(hs) >= self._need:
                return _parse_hello(bytes(hs), 4, self._need)
        return NEED_MORE


def peek_sni(buf: bytes) -> PeekResult:
    """The answer for the bytes a client sent so far (see the module's docstring)."""
    return SniPeeker().feed(buf)


def _parse_hello(b: bytes, p: int, end: int) -> PeekResult:
    """The ClientHello body ``b[p:end]`` (RFC 8446 §4.1.2, the same layout for 1.0-1.2)."""
    p += 2 + 32  # legacy_version, random
    if p >= end:
        return NOT_TLS
    sid = b[p]
    p += 1 + sid  # legacy_session_id
    if sid > 32 or p + 2 > end:
        return NOT_TLS
    cs = (b[p] << 8) | b[p + 1]
    p += 2 + cs  # cipher_suites
    if cs == 0 or cs % 2 or p >= end:
        return NOT_TLS
    comp = b[p]
    p += 1 + comp  # legacy_compression_methods
    if comp == 0 or p > end:
        return NOT_TLS
    if p == end:
        return Hello(None)  # no extensions (SSL 3.0-era clients)
    if p + 2 > end:
        return NOT_TLS
    elen = (b[p] << 8) | b[p + 1]
    p += 2
    if p + elen != end:
        return NOT_TLS
    name: bytes | None = None
    seen: set[int] = set()
    while p < end:
        if p + 4 > end:
            return NOT_TLS
        etype = (b[p] << 8) | b[p + 1]
        dlen = (b[p + 2] << 8) | b[p + 3]
        p += 4
        dend = p + dlen
        if dend > end or etype in seen:
            return NOT_TLS
        seen.add(etype)
        if etype == _EXT_SERVER_NAME:
            found = _server_name(b, p, dend)
            if found is None:
                return NOT_TLS
            name = found or None
        p = dend
    if name is None:
        return Hello(None)
    host = name.rstrip(b".").lower()
    if _HOST_RE.fullmatch(host) is None:
        return NOT_TLS
    return Hello(host.decode("ascii"))


def _server_name(b: bytes, p: int, end: int) -> bytes | None:
    """The host_name of a server_name extension's data ``b[p:end]`` (RFC 6066 §3): b"" when
    the list has none, None when the data is malformed."""
    if p + 2 > end:
        return None
    llen = (b[p] << 8) | b[p + 1]
    p += 2
    if llen == 0 or p + llen != end:
        return None
    host = b""
    while p < end:
        if p + 3 > end:
            return None
        ntype = b[p]
        nlen = (b[p + 1] << 8) | b[p + 2]
        p += 3
        if nlen == 0 or p + nlen > end:
            return None
        if ntype == _HOST_NAME and not host:
            host = b[p:p + nlen]
        p += nlen
    return host


__all__ = [
    "MAX_HELLO",
    "MAX_RECORD",
    "NEED_MORE",
    "NOT_TLS",
    "Hello",
    "PeekResult",
    "SniPeeker",
    "Status",
    "peek_sni",
]
