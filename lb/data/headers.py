"""HTTP/1.1 header rewriting for the proxy: what a request and a response look like on the
other side of pairlb.

Pure: no asyncio, socket, time or logging; bytes in, bytes out. The proxy engine calls
``build_request_head`` once per request and ``filter_response_headers`` once per response,
so both are single passes over the header list with no per-header allocations beyond the
output pieces.

Rules (RFC 9110 §7.6, RFC 9112, RFC 7239):

- hop-by-hop fields are never forwarded: Connection, Keep-Alive, Proxy-Connection, TE,
  Trailer, Transfer-Encoding (re-added by the engine when it re-chunks), Upgrade (except on
  an upgrade request/101), and every field named in Connection;
- forwarding fields (Forwarded, every X-Forwarded-*, and the client-address fields of
  ``CLIENT_ADDRESS_FIELDS``: X-Real-IP, True-Client-IP, X-Client-IP, ...) from a client
  that is not a trusted proxy are dropped and X-Forwarded-For/-Proto and Forwarded are set
  from the connection; from a trusted proxy they are kept and our hop is appended;
- a field whose name has an underscore (``X_Forwarded_For``) is dropped unless the listener
  passes them (``underscores=True``); even then one that reads as a field handled here
  (hop-by-hop, framing, Host, forwarding) once ``_`` becomes ``-`` is dropped, because
  backends that map both to ``HTTP_X_FORWARDED_FOR`` would take it for ours;
- X-Request-ID is added when absent; Via gets our hop appended (requests only: a reverse
  proxy is a gateway, RFC 9110 §7.6.3);
- a request with a transfer coding other than plain ``chunked`` gets 501, a second Host or a
  malformed one 400, an expectation other than 100-continue 417;
- X-Forwarded-Proto and Forwarded's ``proto=`` say ``https`` on a TLS listener (the
  ``ClientContext`` of the connection carries it);
- the Location of an HTTP-to-HTTPS redirect is built from a Host checked more strictly than
  the one forwarded (``https_location``: a DNS name or IP literal, nothing a URL parser could
  read as userinfo, path or another host); Strict-Transport-Security is added to a response
  that has none (``hsts_field``, ``ResponseHeaders.hsts_for``).
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
from typing import Final, Protocol

__all__ = [
    "CLIENT_ADDRESS_FIELDS",
    "HOP_BY_HOP",
    "ClientContext",
    "HeaderError",
    "RequestHead",
    "RequestIds",
    "ResponseHeaders",
    "build_request_head",
    "field_kind",
    "filter_response_block",
    "filter_response_headers",
    "forwarded_node",
    "hsts_field",
    "https_location",
    "is_trusted",
    "parse_networks",
    "split_absolute_form",
    "status_line",
]

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Request header classes (values of _REQ): what build_request_head does with a field.
_DROP: Final = 1  # hop-by-hop: never forwarded
_CONNECTION: Final = 2
_TE: Final = 3
_HOST: Final = 4
_CL: Final = 5
_FWD_XFF: Final = 6
_FWD_FORWARDED: Final = 7
_FWD_OTHER: Final = 8  # other X-Forwarded-*, client-address fields: kept only from trusted proxies
_REQUEST_ID: Final = 9
_VIA: Final = 10
_EXPECT: Final = 11
_UPGRADE: Final = 12
_XFP: Final = 13
_UNDERSCORE: Final = 14  # dropped unless the listener passes underscores
_UA: Final = 15  # forwarded as is; noted for the access log
_REFERER: Final = 16  # likewise
_PLAIN: Final = 0  # forwarded as is

_REQ: Final[dict[bytes, int]] = {
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"transfer-encoding": _TE,
    b"upgrade": _UPGRADE,
    b"host": _HOST,
    b"content-length": _CL,
    b"x-forwarded-for": _FWD_XFF,
    b"forwarded": _FWD_FORWARDED,
    b"x-forwarded-proto": _XFP,
    b"x-forwarded-host": _FWD_OTHER,
    b"x-forwarded-port": _FWD_OTHER,
    b"x-real-ip": _FWD_OTHER,
    b"x-request-id": _REQUEST_ID,
    b"via": _VIA,
    b"expect": _EXPECT,
}

CLIENT_ADDRESS_FIELDS: Final = frozenset(
    {
        b"x-real-ip",
        b"true-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"client-ip",
        b"x-originating-ip",
        b"x-remote-ip",
        b"x-remote-addr",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-forwarded",
        b"forwarded-for",
        b"x-original-forwarded-for",
        # Found by an outside review: vendor and platform names backends also read.
        b"wl-proxy-client-ip",
        b"proxy-client-ip",
        b"x-proxyuser-ip",
        b"x-envoy-external-address",
        b"remote-addr",
        b"cloudfront-viewer-address",
        b"x-appengine-user-ip",
        b"x-azure-clientip",
        b"x-azure-socketip",
        b"x-vercel-forwarded-for",
        b"z-forwarded-for",
        b"x.forwarded.for",
        # Routing fields some frameworks obey as the request's real target or host.
        b"x-host",
        b"x-original-url",
        b"x-rewrite-url",
    }
)
"""Fields other than Forwarded and X-Forwarded-* that backends read as the client's
address: kept only from trusted proxies (as X-Forwarded-Host and the like)."""

_KINDS: Final[dict[bytes, int]] = {}
"""Field name as sent -> its class (memoised: clients send the same few names)."""


_NOTED: Final[dict[bytes, int]] = {b"user-agent": _UA, b"referer": _REFERER}
"""Plain fields the access log records (kept apart from _REQ: an underscore alias of
these is no field of ours, so it is no reason to drop)."""


def _kind_of(name: bytes) -> int:
    low = name.lower()
    kind = _REQ.get(low)
    if kind is not None:
        return kind
    kind = _NOTED.get(low)
    if kind is not None:
        return kind
    if b"_" in low:
        alias = low.replace(b"_", b"-")
        if alias in _REQ or alias in CLIENT_ADDRESS_FIELDS or alias.startswith(b"x-forwarded-"):
            return _DROP  # passes for one of ours at a backend that reads _ as -
        return _UNDERSCORE
    if low in CLIENT_ADDRESS_FIELDS or low.startswith(b"x-forwarded-"):
        return _FWD_OTHER
    return _PLAIN


def field_kind(name: bytes) -> int:
    """The class of a request field name (memoised, bounded)."""
    kind = _KINDS.get(name)
    if kind is None:
        kind = _kind_of(name)
        if len(_KINDS) >= 4096:
            _KINDS.clear()  # a client inventing names: start over rather than grow
        _KINDS[name] = kind
    return kind


_HOST_RE: Final = re.compile(
    rb"(?:[A-Za-z0-9._~!$&'()*+;=%-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?"
)
_GOOD_HOSTS: Final[set[bytes]] = set()
"""Host values _HOST_RE accepted (clients send the same few: one set lookup instead of a
regex match per request); cleared when it reaches _GOOD_HOSTS_MAX, so a client inventing
names cannot grow it."""
_GOOD_HOSTS_MAX: Final = 1024
_GOOD_HOST_LEN: Final = 260
"""Only values up to this long are remembered (a DNS name's 253 bytes and a port): a client
sending long ones must not make a worker keep 1,024 of them (up to max_header_bytes each)."""


class HeaderError(Exception):
    """A request the proxy refuses: ``status`` goes to the client, ``reason`` to the stats."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


def forwarded_node(ip: str) -> bytes:
    """An RFC 7239 node for ``for=``: IPv6 in brackets and quotes, IPv4 bare."""
    if ":" in ip:
        return b'"[' + ip.encode("ascii") + b']"'
    return ip.encode("ascii")


class ClientContext:
    """What the rewrite needs to know about one client connection, computed once per
    connection (the peer address does not change between its requests)."""

    __slots__ = ("fixed_block", "forwarded_elem", "ip", "proto", "trusted", "xff_ip")

    def __init__(self, ip: str, trusted: bool, proto: str = "http") -> None:
        self.ip = ip
        self.trusted = trusted
        self.proto = proto.encode("ascii")
        self.xff_ip = ip.encode("ascii")
        self.forwarded_elem = b"for=" + forwarded_node(ip) + b";proto=" + self.proto
        # For an untrusted peer every request gets the same forwarding block.
        self.fixed_block = (
            b"X-Forwarded-For: " + self.xff_ip + b"\r\nX-Forwarded-Proto: " + self.proto
            + b"\r\nForwarded: " + self.forwarded_elem + b"\r\n"
        )

    @staticmethod
    def for_peer(ip: str, trusted_proxies: tuple[str, ...], proto: str = "http") -> ClientContext:
        """Context for a peer; ``trusted_proxies`` are CIDRs (validated by the config)."""
        return ClientContext(ip, is_trusted(ip, parse_networks(trusted_proxies)), proto)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def is_trusted(ip: str, networks: tuple[Network, ...]) -> bool:
    """Is the peer ``ip`` inside one of ``networks``? (IPv4-mapped IPv6 counts as IPv4.)"""
    if not networks:
        return False
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)


class RequestIds:
    """X-Request-ID values: a random per-process prefix and a counter, unique across workers
    and restarts without the cost of uuid4 per request."""

    __slots__ = ("_count", "_prefix")

    def __init__(self, prefix: str | None = None) -> None:
        self._prefix = (prefix if prefix is not None else os.urandom(6).hex()).encode() + b"-"
        self._count = itertools.count(1)

    def next(self) -> bytes:
        return b"%s%08x" % (self._prefix, next(self._count))


class Noted(Protocol):
    """What ``build_request_head`` notes for the access log."""

    ua: bytes | None
    referer: bytes | None


class RequestHead:
    """The head to send upstream and the facts about the request the engine acts on.

    Class-level defaults: ``build_request_head`` sets only what differs, and the engine's
    per-request object subclasses this, so the builder fills it in place (no extra object
    per request).
    """

    head = b""
    host: bytes | None = None
    content_length = -1
    """-1 when absent."""
    chunked = False
    expect_continue = False
    upgrade_value: bytes | None = None
    """The client's Upgrade value (forwarded only when ``upgrade`` was asked for)."""


def split_absolute_form(target: bytes) -> tuple[bytes, bytes]:
    """``http://host:port/path?q`` -> (``host:port``, ``/path?q``).

    RFC 9112 §3.2.2: the authority of an absolute-form target replaces Host. Userinfo and
    schemes other than http/https are refused (400).
    """
    low = target[:8].lower()
    if low.startswith(b"http://"):
        rest = target[7:]
    elif low.startswith(b"https://"):
        rest = target[8:]
    else:
        raise HeaderError(400, "bad_target")
    slash = len(rest)
    for sep in (b"/", b"?"):
        i = rest.find(sep)
        if 0 <= i < slash:
            slash = i
    authority, path = rest[:slash], rest[slash:]
    if not authority or b"@" in authority or not _HOST_RE.fullmatch(authority):
        raise HeaderError(400, "bad_target")
    if not path:
        path = b"/"
    elif path[:1] == b"?":
        path = b"/" + path
    return authority, path


def build_request_head(
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    ctx: ClientContext,
    *,
    http10: bool = False,
    upgrade: bool = False,
    request_id: bytes | None = None,
    via: bool = True,
    host_override: bytes | None = None,
    default_host: bytes | None = None,
    into: RequestHead | None = None,
    underscores: bool = False,
    note: Noted | None = None,
) -> RequestHead:
    """Rewrite a client's request head for the backend (always HTTP/1.1, keep-alive).

    ``request_id`` is used only when the client sent none. ``host_override`` is the
    authority of an absolute-form target. ``default_host`` is sent for an HTTP/1.0 request
    without Host (the backend gets HTTP/1.1, which requires one): the address the client
    connected to. ``into`` is filled in and returned (a new RequestHead when None).
    ``underscores``: pass fields whose name has an underscore (else they are dropped).
    ``note``: where the first User-Agent and Referer go (the access log's; this loop sees
    every field anyway, a second scan for them cost the log a few percent per request).
    Raises HeaderError for requests to refuse.
    """
    res = RequestHead() if into is None else into
    out = [method, b" ", target, b" HTTP/1.1\r\n"]
    host: bytes | None = None
    hosts = 0
    chunked = False
    has_rid = False
    xff: bytes | None = None
    fwd: bytes | None = None
    xfp = False
    vias: bytes | None = None
    conn_tokens: list[bytes] | None = None
    upgrade_value: bytes | None = None
    trusted = ctx.trusted
    kinds = _KINDS
    for name, value in headers:
        kind = kinds.get(name)
        if kind is None:
            kind = field_kind(name)
        if not kind:
            out += (name, b": ", value, b"\r\n")
            continue
        if kind >= _UA:
            out += (name, b": ", value, b"\r\n")
            if note is not None:
                if kind == _UA:
                    if note.ua is None:
                        note.ua = value
                elif note.referer is None:
                    note.referer = value
            continue
        if kind == _UNDERSCORE:
            if underscores:
                out += (name, b": ", value, b"\r\n")
            continue
        if kind == _HOST:
            hosts += 1
            host = value
            continue
        if kind == _CL:
            # llhttp has already refused duplicates, signs and non-digits.
            res.content_length = int(value)
            out += (name, b": ", value, b"\r\n")
        elif kind == _TE:
            if value.strip().lower() != b"chunked":
                raise HeaderError(501, "unsupported_transfer_coding")
            chunked = True
        elif kind == _CONNECTION:
            for tok in value.split(b","):
                tok = tok.strip().lower()
                if tok and tok not in (b"close", b"keep-alive", b"upgrade"):
                    if conn_tokens is None:
                        conn_tokens = []
                    conn_tokens.append(tok)
        elif kind == _UPGRADE:
            upgrade_value = value
        elif kind == _EXPECT:
            if http10:
                continue  # RFC 9110 §10.1.1: ignore 100-continue from HTTP/1.0
            if value.strip().lower() != b"100-continue":
                raise HeaderError(417, "bad_expect")
            res.expect_continue = True
            out += (name, b": ", value, b"\r\n")
        elif kind == _REQUEST_ID:
            has_rid = True
            out += (name, b": ", value, b"\r\n")
        elif kind == _VIA:
            vias = value if vias is None else vias + b", " + value
        elif not trusted:
            continue  # forwarding fields from an untrusted peer are lies until proven
        elif kind == _FWD_XFF:
            xff = value if xff is None else xff + b", " + value
        elif kind == _FWD_FORWARDED:
            fwd = value if fwd is None else fwd + b", " + value
        elif kind == _XFP:
            xfp = True
            out += (name, b": ", value, b"\r\n")
        elif kind == _FWD_OTHER:
            out += (name, b": ", value, b"\r\n")
        # _DROP: nothing
    if host_override is not None:
        host = host_override
    elif hosts > 1:
        raise HeaderError(400, "multiple_host")
    elif hosts == 0:
        if not http10:
            raise HeaderError(400, "missing_host")
        host = default_host
    if host is not None:
        if host not in _GOOD_HOSTS:
            if not _HOST_RE.fullmatch(host):
                raise HeaderError(400, "bad_host")
            if len(host) <= _GOOD_HOST_LEN:
                if len(_GOOD_HOSTS) >= _GOOD_HOSTS_MAX:
                    _GOOD_HOSTS.clear()
                _GOOD_HOSTS.add(host)
        out += (b"Host: ", host, b"\r\n")
    if chunked:
        res.chunked = True
        out.append(b"Transfer-Encoding: chunked\r\n")
    if upgrade_value is not None:
        res.upgrade_value = upgrade_value
        if upgrade:
            out += (b"Connection: upgrade\r\nUpgrade: ", upgrade_value, b"\r\n")
    elif upgrade:
        raise HeaderError(400, "bad_upgrade")
    if trusted:
        out += (b"X-Forwarded-For: ", ctx.xff_ip if xff is None else xff + b", " + ctx.xff_ip,
                b"\r\n")
        if not xfp:
            out += (b"X-Forwarded-Proto: ", ctx.proto, b"\r\n")
        out += (b"Forwarded: ", ctx.forwarded_elem if fwd is None
                else fwd + b", " + ctx.forwarded_elem, b"\r\n")
    else:
        out.append(ctx.fixed_block)
    if not has_rid and request_id is not None:
        out += (b"X-Request-ID: ", request_id, b"\r\n")
    if via:
        if vias is None:
            out.append(b"Via: 1.0 pairlb\r\n\r\n" if http10 else b"Via: 1.1 pairlb\r\n\r\n")
        else:
            hop = b"1.0 pairlb" if http10 else b"1.1 pairlb"
            out += (b"Via: ", vias, b", ", hop, b"\r\n\r\n")
    else:
        out.append(b"\r\n")
    if conn_tokens is not None:
        out = _drop_named(out, conn_tokens)
    if host is not None:
        res.host = host
    res.head = b"".join(out)
    return res


def _drop_named(out: list[bytes], names: list[bytes]) -> list[bytes]:
    """Remove header lines whose names the client listed in Connection (rare path).

    ``out`` holds the request line pieces, then one ``name, ': ', value, CRLF`` run per
    forwarded client field, then whole-line blocks we added (none of which may be removed:
    a client cannot make us drop X-Forwarded-For by naming it in Connection).
    """
    drop = set(names)
    # Fields we add ourselves are protected.
    drop -= {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"forwarded", b"via",
             b"x-request-id", b"content-length", b"transfer-encoding"}
    if not drop:
        return out
    res = out[:4]
    i = 4
    n = len(out)
    while i < n:
        if i + 3 < n and out[i + 1] == b": " and out[i + 3] == b"\r\n":
            if out[i].lower() not in drop:
                res += out[i : i + 4]
            i += 4
        else:
            res.append(out[i])
            i += 1
    return res


class ResponseHeaders:
    """A backend's response head filtered for the client, plus its framing."""

    __slots__ = ("chunked", "content_length", "fields", "has_hsts", "te_value")

    def __init__(self, fields: bytes, content_length: int, chunked: bool,
                 te_value: bytes | None) -> None:
        self.fields = fields
        """The forwarded header lines, each ending in CRLF, without the final CRLF."""
        self.content_length = content_length
        self.chunked = chunked
        self.te_value = te_value
        """The backend's Transfer-Encoding value (None when absent)."""
        self.has_hsts: bool | None = None
        """Whether ``fields`` has Strict-Transport-Security (None: not looked at yet)."""

    def hsts_for(self, hsts: bytes) -> bytes:
        """``hsts`` (a whole header line), or nothing when the backend sent its own. Looked
        up once per object: the engine memoises these per identical header block."""
        has = self.has_hsts
        if has is None:
            has = self.has_hsts = b"\nstrict-transport-security:" in b"\n" + self.fields.lower()
        return b"" if has else hsts


def hsts_field(max_age_s: int, include_subdomains: bool) -> bytes:
    """The Strict-Transport-Security line (RFC 6797) a TLS listener adds; b"" when off."""
    if max_age_s <= 0:
        return b""
    sub = b"; includeSubDomains" if include_subdomains else b""
    return b"Strict-Transport-Security: max-age=%d%s\r\n" % (max_age_s, sub)


_REDIRECT_HOST_RE: Final = re.compile(
    rb"([A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})|\[([0-9A-Fa-f:.]{2,45})\])(?::[0-9]{0,5})?"
)


def https_location(host: bytes, target: bytes, port: int) -> bytes | None:
    """``https://HOST[:port]TARGET`` for a redirect, or None when ``host`` will not do.

    ``host`` is a Host value (already past the forwarding check): its port is dropped, and
    only a DNS name (letters, digits, ``-``, ``_``, ``.``) or a bracketed IPv6 literal is
    taken, so nothing in it can end the authority (``/``, ``?``, ``#``, ``@``, ``\\``),
    split a header (CR, LF) or be decoded into either (``%``). ``port`` 443 is omitted.
    ``target`` is the origin-form target (kept as is: llhttp allows no CR, LF or space in
    it); ``*`` (OPTIONS) becomes ``/``.
    """
    m = _REDIRECT_HOST_RE.fullmatch(host)
    if m is None:
        return None
    v6 = m.group(2)
    if v6 is not None:
        try:
            ipaddress.IPv6Address(v6.decode("ascii"))
        except ValueError:
            return None
    if target[:1] != b"/":
        target = b"/"
    authority = m.group(1) if port == 443 else b"%s:%d" % (m.group(1), port)
    return b"https://" + authority + target


_RESP_SPECIAL: Final = re.compile(
    rb"\n(c(?:onnection|ontent-length)|keep-alive|proxy-connection"
    rb"|t(?:e|railer|ransfer-encoding)|upgrade):[ \t]*([^\r]*)\r"
)


def filter_response_block(block: bytes, *, keep_upgrade: bool = False) -> ResponseHeaders:
    """Drop hop-by-hop fields from a response's raw header block; report its framing.

    ``block`` is the header lines exactly as the backend sent them (each ending in CRLF,
    already validated by llhttp in strict mode: no obs-fold, no bare LF, no space before
    the colon). Fields that stay are passed on byte for byte, so the common response costs
    one lower(), one regex scan and a slice or two. Transfer-Encoding is taken out and
    returned (lower-cased) in ``te_value``: the engine decides whether to re-chunk
    (HTTP/1.1 client) or not (HTTP/1.0 client).
    """
    low = b"\n" + block.lower()
    found = _RESP_SPECIAL.findall(low)
    if not found:
        return ResponseHeaders(block, -1, False, None)
    content_length = -1
    te_value: bytes | None = None
    cuts: list[tuple[int, int]] | None = None
    conn_tokens: list[bytes] | None = None
    pos = 0
    for name, value in found:
        if name == b"content-length":
            content_length = int(value)
            continue
        if name == b"upgrade" and keep_upgrade:
            continue
        if name == b"transfer-encoding":
            value = value.rstrip()
            te_value = value if te_value is None else te_value + b", " + value
        elif name == b"connection" and value != b"keep-alive" and value != b"close":
            for tok in value.split(b","):
                tok = tok.strip()
                if tok and tok not in (b"close", b"keep-alive", b"upgrade"):
                    if conn_tokens is None:
                        conn_tokens = []
                    conn_tokens.append(tok)
        # Matches come in order: find this one's line again for its position. In ``low``
        # the line starting at block[a] begins at low[a + 1] (one byte of prefix).
        a = low.find(b"\n" + name + b":", pos)
        pos = block.index(b"\r\n", a) + 2
        if cuts is None:
            cuts = []
        cuts.append((a, pos))
    if conn_tokens is not None:
        # Rare: fields named in Connection are hop-by-hop too (never Content-Length).
        drop = set(conn_tokens) - {b"content-length"}
        pos = 0
        while pos < len(block):
            eol = block.index(b"\r\n", pos) + 2
            colon = block.find(b":", pos, eol)
            if block[pos:colon].lower() in drop:
                if cuts is None:
                    cuts = []
                cuts.append((pos, eol))
            pos = eol
        if cuts is not None:
            cuts.sort()
    if cuts:
        if len(cuts) == 1:
            a, b = cuts[0]
            block = block[:a] + block[b:]
        else:
            parts = []
            pos = 0
            for a, b in cuts:
                parts.append(block[pos:a])
                pos = max(pos, b)
            parts.append(block[pos:])
            block = b"".join(parts)
    chunked = te_value is not None and te_value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
    return ResponseHeaders(block, content_length, chunked, te_value)


def filter_response_headers(
    headers: list[tuple[bytes, bytes]], *, keep_upgrade: bool = False
) -> ResponseHeaders:
    """``filter_response_block`` for a parsed (name, value) list."""
    block = b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    return filter_response_block(block, keep_upgrade=keep_upgrade)


_REASONS: Final = {
    100: b"Continue", 101: b"Switching Protocols", 200: b"OK", 204: b"No Content",
    301: b"Moved Permanently", 302: b"Found", 304: b"Not Modified", 307: b"Temporary Redirect",
    308: b"Permanent Redirect", 400: b"Bad Request",
    404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Content Too Large", 414: b"URI Too Long", 417: b"Expectation Failed",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 502: b"Bad Gateway", 503: b"Service Unavailable",
    504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
}
_STATUS_LINES: Final[dict[tuple[int, bytes], bytes]] = {}


def status_line(status: int, reason: bytes) -> bytes:
    """``HTTP/1.1 200 OK\\r\\n``; cached, since a handful of lines cover nearly all traffic."""
    key = (status, reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        if not reason:
            reason = _REASONS.get(status, b"")
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[key] = line
    return line


