"""The PROXY protocol (versions 1 and 2): the header a proxy puts at the start of a
connection to tell the next hop the addresses of the connection it relays.

Sending: ``encode_v1(src, dst)`` / ``encode_v2(src, dst)``, ``src`` the client's address and
``dst`` the address it connected to. Two IPv4 addresses (IPv4-mapped IPv6 counts as IPv4)
make TCP4 / TCP-over-IPv4; two IPv6, TCP6. Mixed families (an IPv4 client relayed to an IPv6
listener) are sent as TCP6 with the IPv4 side IPv4-mapped (``::ffff:a.b.c.d``), which keeps
the client's address; only an address that is not an IP address at all (None, a Unix path)
gives the spec's "cannot tell": ``PROXY UNKNOWN`` (v1) or the LOCAL command with the UNSPEC
family and no address (v2, what HAProxy sends then). IPv6 is written without dotted quads.

Receiving: ``HeaderReader`` takes the connection's first bytes as they arrive (any split:
fed byte by byte or at once, the answer is the same) and answers ``NEED_MORE`` or a
``Header`` (``source`` None = keep the real peer; ``rest`` = the bytes after the header), or
raises ``ProxyProtocolError(reason)``:

- ``proxy_protocol_missing``: the bytes do not start with a signature, v1's ``PROXY `` or
  v2's 12 bytes ``\\r\\n\\r\\n\\0\\r\\nQUIT\\n`` (also a connection that ends, or times out,
  before a whole signature);
- ``proxy_protocol_invalid``: a signature, then anything the rules below refuse (also a
  header cut short).

``Gate`` is the per-connection step an engine runs first on a listener that accepts the
protocol: from a trusted proxy it is a ``HeaderReader`` (a header is required); from anyone
else it only looks whether the first bytes are a signature (``looks_like_header``), then
lets every byte through unchanged, or refuses (``proxy_protocol_untrusted``): a client
cannot choose the address it is seen with.

Rules enforced on version 1 (the spec's section 2.1):

- one line of US-ASCII: ``PROXY``, exactly one space, ``TCP4``, ``TCP6`` or ``UNKNOWN``,
  then for TCP4/TCP6 exactly four fields (source address, destination address, source
  port, destination port), each after exactly one space, nothing else; ended by CRLF;
- the CRLF must be within the first 107 bytes (the longest legal line, CRLF included);
  a line ended by a lone LF, or holding a CR not followed by LF, is invalid;
- IPv4 addresses: four decimal numbers 0-255 with one dot between, no leading zero
  (``010`` would read as octal elsewhere); IPv6 addresses: hex groups, colons, at most one
  ``::`` (as inet_pton reads them, a dotted-quad tail included), no zone; the family
  must be the one announced (IPv6 under TCP4 is invalid, and the reverse);
- ports: decimal 0-65535, no leading zero;
- ``UNKNOWN``: whatever precedes the CRLF is ignored and the real peer is kept.

Rules enforced on version 2 (section 2.2):

- the 13th byte: version 2 (high nibble) and command LOCAL (0) or PROXY (1); anything else
  is invalid, decided as soon as that byte is in;
- PROXY: the 14th byte's family is UNSPEC, INET, INET6 or UNIX and its transport UNSPEC,
  STREAM or DGRAM (else invalid); the declared length must hold the family's address block
  (12, 36 or 216 bytes); after it, TLVs (type, 2-byte length, value) must fill the rest
  exactly, and a CRC32C TLV (type 0x03, 4 bytes) must match the header's checksum; other
  TLVs are skipped unread;
- the header is 16 bytes plus the declared length, at most ``V2_MAX_BYTES`` in all: a longer
  declared length is invalid at once (without waiting for the bytes);
- LOCAL (a proxy's own health check): the real endpoints are kept, the block is skipped
  whatever it holds; PROXY with TCP over IPv4/IPv6: the source (and destination) are used;
  PROXY with any other family or transport (UNSPEC, UDP, UNIX): the real peer is kept, as the
  spec lets a receiver fall back to UNSPEC.

Pure: no I/O, no clock, no logging.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import struct
from typing import Final, NamedTuple, TypeAlias

Address: TypeAlias = tuple[str, int]
"""(IP address text, port)."""

V1_SIGNATURE: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX_BYTES: Final = 107
"""The longest v1 line, CRLF included (``PROXY UNKNOWN`` + two full IPv6 + two ports)."""
V2_MAX_BYTES: Final = 4096
"""Largest v2 header accepted, its 16 fixed bytes included: the largest address block
(AF_UNIX, 216 bytes) with room for every registered TLV (authority, unique id, SSL
details, ...), bounded so a pending header costs little memory."""

MISSING: Final = "proxy_protocol_missing"
INVALID: Final = "proxy_protocol_invalid"
UNTRUSTED: Final = "proxy_protocol_untrusted"
REASONS: Final = (MISSING, INVALID, UNTRUSTED)
"""The reasons a connection is refused, as counted (``Stats.bad_request``)."""

_CMD_LOCAL: Final = 0x0
_CMD_PROXY: Final = 0x1
_TCP4: Final = 0x11
_TCP6: Final = 0x21
_ADDR_LEN: Final = {0x1: 12, 0x2: 36, 0x3: 216}
"""Address block length by family nibble (INET, INET6, UNIX)."""
_TLV_CRC32C: Final = 0x03

_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4_RE: Final = re.compile(_OCTET + rb"(?:\." + _OCTET + rb"){3}")
_IPV6_RE: Final = re.compile(rb"[0-9A-Fa-f:.]{2,45}")
_PORT_RE: Final = re.compile(rb"0|[1-9][0-9]{0,4}")


class ProxyProtocolError(Exception):
    """A connection to refuse; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Status(enum.Enum):
    NEED_MORE = "need_more"
    DONE = "done"


NEED_MORE: Final = Status.NEED_MORE
DONE: Final = Status.DONE


class Header(NamedTuple):
    """A complete, valid header."""

    version: int
    """1 or 2."""
    source: Address | None
    """The client's address it carries; None: keep the real peer (v1 UNKNOWN, v2 LOCAL,
    a family other than TCP over IPv4/IPv6)."""
    dest: Address | None
    """The address the client connected to; None when ``source`` is None."""
    rest: bytes
    """The bytes that followed the header in what was fed (the connection's own data)."""


# -- encoding ---------------------------------------------------------------------------------

_IP: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(host: object) -> _IP | None:
    if not isinstance(host, str):
        return None
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range: {port}")
    return port


def _pair(src: Address | None, dst: Address | None) -> tuple[_IP, int, _IP, int] | None:
    """Both endpoints as addresses of one family (mixed: both IPv6), or None."""
    if src is None or dst is None:
        return None
    s, d = _ip(src[0]), _ip(dst[0])
    if s is None or d is None:
        return None
    sp, dp = _port(src[1]), _port(dst[1])
    if s.version != d.version:
        if isinstance(s, ipaddress.IPv4Address):
            s = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + s.packed)
        else:
            d = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + d.packed)
    return s, sp, d, dp


def _v6_text(addr: ipaddress.IPv6Address) -> str:
    """Hex groups only, compressed (an IPv4-mapped address in hex too, not
    ``::ffff:1.2.3.4``, whatever the Python version's own choice): sent and read alike."""
    if addr.ipv4_mapped is not None:
        hi, lo = struct.unpack(">HH", addr.packed[12:])
        return f"::ffff:{hi:x}:{lo:x}"
    return addr.compressed


def encode_v1(src: Address | None, dst: Address | None) -> bytes:
    """The v1 line for a TCP connection from ``src`` to ``dst``."""
    pair = _pair(src, dst)
    if pair is None:
        return b"PROXY UNKNOWN\r\n"
    s, sp, d, dp = pair
    if isinstance(s, ipaddress.IPv4Address):
        return f"PROXY TCP4 {s} {d} {sp} {dp}\r\n".encode("ascii")
    assert isinstance(d, ipaddress.IPv6Address)
    return f"PROXY TCP6 {_v6_text(s)} {_v6_text(d)} {sp} {dp}\r\n".encode("ascii")


def encode_v2(src: Address | None, dst: Address | None) -> bytes:
    """The v2 header (command PROXY, no TLV) for a TCP connection from ``src`` to ``dst``."""
    pair = _pair(src, dst)
    if pair is None:
        return V2_SIGNATURE + b"\x20\x00\x00\x00"  # LOCAL, UNSPEC, no address
    s, sp, d, dp = pair
    fam = _TCP4 if s.version == 4 else _TCP6
    block = s.packed + d.packed + struct.pack(">HH", sp, dp)
    return V2_SIGNATURE + struct.pack(">BBH", 0x20 | _CMD_PROXY, fam, len(block)) + block


# -- decoding ---------------------------------------------------------------------------------


def looks_like_header(prefix: bytes) -> bool | None:
    """Do these first bytes of a connection start a PROXY header? True: they begin with a
    whole signature; False: they cannot; None: they are a proper prefix of a signature
    (nothing yet, or e.g. ``PRO``): wait for more."""
    undecided = False
    for sig in (V1_SIGNATURE, V2_SIGNATURE):
        n = min(len(prefix), len(sig))
        if prefix[:n] == sig[:n]:
            if n == len(sig):
                return True
            undecided = True
    return None if undecided else False


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C: Final = _crc32c_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C (Castagnoli, RFC 4960 appendix B), as the v2 checksum TLV carries it."""
    c = 0xFFFFFFFF
    table = _CRC32C
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _v1_ip(text: bytes, proto: bytes) -> str:
    if proto == b"TCP4":
        if _IPV4_RE.fullmatch(text) is None:
            raise ProxyProtocolError(INVALID)
        return text.decode("ascii")
    if _IPV6_RE.fullmatch(text) is None:
        raise ProxyProtocolError(INVALID)
    try:
        return _v6_text(ipaddress.IPv6Address(text.decode("ascii")))
    except ValueError:
        raise ProxyProtocolError(INVALID) from None


def _v1_port(text: bytes) -> int:
    if _PORT_RE.fullmatch(text) is None:
        raise ProxyProtocolError(INVALID)
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(INVALID)
    return port


def _parse_v1(line: bytes) -> tuple[Address | None, Address | None]:
    """``line`` without its CRLF, starting with ``PROXY ``."""
    fields = line.split(b" ")
    proto = fields[1]
    if proto == b"UNKNOWN":
        return None, None
    if proto not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise ProxyProtocolError(INVALID)
    src = (_v1_ip(fields[2], proto), _v1_port(fields[4]))
    dst = (_v1_ip(fields[3], proto), _v1_port(fields[5]))
    return src, dst


def _check_v2_fixed(buf: bytearray) -> None:
    """The 13th to 16th bytes, as far as they are in (invalid as soon as one is wrong)."""
    n = len(buf)
    if n > 12:
        ver_cmd = buf[12]
        if ver_cmd >> 4 != 2 or ver_cmd & 0xF not in (_CMD_LOCAL, _CMD_PROXY):
            raise ProxyProtocolError(INVALID)
        proxy = ver_cmd & 0xF == _CMD_PROXY
        if n > 13 and proxy:
            fam = buf[13]
            if fam >> 4 > 3 or fam & 0xF > 2:
                raise ProxyProtocolError(INVALID)
        if n >= 16:
            length = (buf[14] << 8) | buf[15]
            if 16 + length > V2_MAX_BYTES:
                raise ProxyProtocolError(INVALID)
            fam = buf[13]
            if proxy and fam & 0xF and fam >> 4 and length < _ADDR_LEN[fam >> 4]:
                raise ProxyProtocolError(INVALID)  # too short for its own addresses


def _parse_v2(hdr: bytearray) -> tuple[Address | None, Address | None]:
    """A whole v2 header whose fixed part passed ``_check_v2_fixed``."""
    if hdr[12] & 0xF == _CMD_LOCAL:
        return None, None
    fam = hdr[13]
    if not (fam >> 4 and fam & 0xF):
        return None, None  # UNSPEC family or transport: the real peer
    end = len(hdr)
    off = 16 + _ADDR_LEN[fam >> 4]
    crc_at = -1
    while off < end:
        if off + 3 > end:
            raise ProxyProtocolError(INVALID)
        tlen = (hdr[off + 1] << 8) | hdr[off + 2]
        if off + 3 + tlen > end:
            raise ProxyProtocolError(INVALID)
        if hdr[off] == _TLV_CRC32C:
            if tlen != 4 or crc_at >= 0:
                raise ProxyProtocolError(INVALID)
            crc_at = off + 3
        off += 3 + tlen
    if crc_at >= 0:
        sent = int.from_bytes(hdr[crc_at:crc_at + 4], "big")
        zeroed = bytearray(hdr)
        zeroed[crc_at:crc_at + 4] = b"\0\0\0\0"
        if crc32c(zeroed) != sent:
            raise ProxyProtocolError(INVALID)
    if fam == _TCP4:
        s, d = ipaddress.IPv4Address(bytes(hdr[16:20])), ipaddress.IPv4Address(bytes(hdr[20:24]))
        sp, dp = struct.unpack(">HH", hdr[24:28])
        return (str(s), sp), (str(d), dp)
    if fam == _TCP6:
        s6 = ipaddress.IPv6Address(bytes(hdr[16:32]))
        d6 = ipaddress.IPv6Address(bytes(hdr[32:48]))
        sp, dp = struct.unpack(">HH", hdr[48:52])
        return (_v6_text(s6), sp), (_v6_text(d6), dp)
    return None, None  # UDP, UNIX: the real peer


class HeaderReader:
    """Reads one PROXY header (v1 or v2) from the first bytes of a connection, fed as they
    arrive. Holds at most ``V2_MAX_BYTES`` (v1: ``V1_MAX_BYTES``) of them. Once it answered
    a ``Header`` or raised, it is done: feeding it again raises the same or RuntimeError."""

    __slots__ = ("_buf", "_error", "_header", "_version")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._version = 0
        """1 or 2 once a whole signature is in; 0 before."""
        self._error: ProxyProtocolError | None = None
        self._header: Header | None = None

    @property
    def signature_seen(self) -> bool:
        return self._version != 0

    def feed(self, data: bytes) -> Status | Header:
        if self._error is not None:
            raise ProxyProtocolError(self._error.reason)
        if self._header is not None:
            raise RuntimeError("the header was read already")
        try:
            result = self._feed(data)
        except ProxyProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            raise
        if isinstance(result, Header):
            self._header = result
            self._buf = bytearray()
        return result

    def cut_reason(self) -> str:
        """Why to refuse a connection that ended (or ran out of time) before its header was
        whole: ``proxy_protocol_invalid`` once a signature came (a partial header),
        ``proxy_protocol_missing`` before."""
        return INVALID if self._version else MISSING

    def _feed(self, data: bytes) -> Status | Header:
        if not self._version:
            held = bytes(self._buf) + data
            seen = looks_like_header(held[:len(V2_SIGNATURE)])
            if seen is None:
                self._buf = bytearray(held)  # a signature's proper prefix: < 12 bytes
                return NEED_MORE
            if seen is False:
                raise ProxyProtocolError(MISSING)
            self._version = 1 if held.startswith(V1_SIGNATURE) else 2
            self._buf = bytearray()
            data = held
        if self._version == 1:
            return self._feed_v1(data)
        return self._feed_v2(data)

    def _feed_v1(self, data: bytes) -> Status | Header:
        buf = self._buf
        old = len(buf)
        start = max(0, old - 1)  # a CR at the end may meet its LF now
        buf += data[:V1_MAX_BYTES - old]
        lf = buf.find(b"\n", start)
        if lf < 0:
            if buf.find(b"\r", start, len(buf) - 1) >= 0 or len(buf) >= V1_MAX_BYTES:
                raise ProxyProtocolError(INVALID)  # a CR alone, or no CRLF in 107 bytes
            return NEED_MORE
        if buf[lf - 1] != 0x0D or buf.find(b"\r", start, lf - 1) >= 0:
            raise ProxyProtocolError(INVALID)  # a lone LF, or a CR alone before it
        source, dest = _parse_v1(bytes(buf[:lf - 1]))
        return Header(1, source, dest, data[lf + 1 - old:])

    def _feed_v2(self, data: bytes) -> Status | Header:
        buf = self._buf
        before = len(buf)
        if before < 16:
            buf += data[:16 - before]
            _check_v2_fixed(buf)
            if len(buf) < 16:
                return NEED_MORE
            data = data[16 - before:]
        total = 16 + ((buf[14] << 8) | buf[15])
        take = total - len(buf)
        buf += data[:take]
        if len(buf) < total:
            return NEED_MORE
        source, dest = _parse_v2(buf)
        return Header(2, source, dest, data[take:])


class GateResult(NamedTuple):
    state: Status
    """NEED_MORE (hold the connection: nothing to pass on yet) or DONE."""
    source: Address | None
    """With DONE: the client's address from an accepted header; None = the real peer."""
    rest: bytes
    """With DONE: the bytes to treat as the connection's data (after the header, or every
    byte held so far from a client that sent none)."""


class Gate:
    """The first step of a connection on a listener with ``accept_proxy_protocol``.

    ``trusted`` (the peer is one of ``trusted_proxies``): a header is required and read.
    Otherwise: the first bytes are held until they cannot start a header (then all pass
    on unchanged) or are a whole signature (refused: ``proxy_protocol_untrusted``).

    ``feed(data)`` answers a ``GateResult`` or raises ``ProxyProtocolError``; after DONE the
    engine stops feeding it. ``cut()`` says whether (and why) to refuse a connection that
    ends, or outlasts ``client_header_timeout_s``, while the gate has not decided: always
    from a trusted peer (missing or invalid); from another one only when it holds a
    signature's beginning (None: it holds nothing, no PROXY matter).
    """

    __slots__ = ("done", "header", "held", "reader", "trusted")

    def __init__(self, trusted: bool) -> None:
        self.trusted = trusted
        self.reader: HeaderReader | None = HeaderReader() if trusted else None
        self.held = b""
        self.done = False
        self.header: Header | None = None
        """The accepted header (trusted peers), once DONE."""

    def feed(self, data: bytes) -> GateResult:
        reader = self.reader
        if reader is not None:
            result = reader.feed(data)
            if isinstance(result, Status):
                return GateResult(NEED_MORE, None, b"")
            self.done = True
            self.header = result
            return GateResult(DONE, result.source, result.rest)
        held = self.held + data if self.held else data
        seen = looks_like_header(held[:len(V2_SIGNATURE)])
        if seen is None:
            self.held = held
            return GateResult(NEED_MORE, None, b"")
        self.held = b""
        if seen:
            raise ProxyProtocolError(UNTRUSTED)
        self.done = True
        return GateResult(DONE, None, held)

    @property
    def waiting(self) -> bool:
        """Undecided and holding the connection back (a header's beginning, or a trusted
        peer's header not whole yet)?"""
        return not self.done and (self.trusted or bool(self.held))

    def cut(self) -> str | None:
        if self.done:
            return None
        if self.reader is not None:
            return self.reader.cut_reason()
        return UNTRUSTED if self.held else None


__all__ = [
    "DONE", "INVALID", "MISSING", "NEED_MORE", "REASONS", "UNTRUSTED", "V1_MAX_BYTES",
    "V1_SIGNATURE", "V2_MAX_BYTES", "V2_SIGNATURE", "Address", "Gate", "GateResult", "Header",
    "HeaderReader", "ProxyProtocolError", "Status", "crc32c", "encode_v1", "encode_v2",
    "looks_like_header",
]
