"""Peek the SNI host name from a TLS ClientHello without terminating TLS (TCP-mode routing).

peek_sni(buf) looks at the bytes received so far from the client and returns one of:
  NEED_MORE            -- a valid prefix of a ClientHello; read more (bounded by MAX_HELLO and a timeout)
  NOT_TLS              -- not a TLS handshake (or malformed / over the size limit): route to default or close
  ("sni", None)        -- a complete ClientHello without a host_name server_name
  ("sni", "host.name") -- lower-cased, trailing dot removed, validated as an ASCII DNS name
The ClientHello may span several TCP segments and several TLS records; records are reassembled
(only handshake records, content type 22, may precede the end of the ClientHello).
"""
from __future__ import annotations
import re

NEED_MORE = "need_more"
NOT_TLS = "not_tls"
MAX_HELLO = 16 * 1024        # handshake body bytes we are willing to buffer (PQ hellos are ~1.8 KiB)
_MAX_RECORD = 16384 + 2048   # RFC 8446 5.1 plaintext limit is 2^14; be lenient like OpenSSL
_HOST_RE = re.compile(rb"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?))*$")

def _reassemble(buf: bytes) -> bytes | str:
    """The ClientHello handshake message from consecutive TLS records, or NEED_MORE / NOT_TLS."""
    hs = bytearray()
    pos = 0
    while True:
        if len(hs) >= 4:
            if hs[0] != 1:                                   # not a ClientHello
                return NOT_TLS
            need = 4 + int.from_bytes(hs[1:4], "big")
            if need - 4 > MAX_HELLO:                         # decided as soon as the length is known
                return NOT_TLS
            if len(hs) >= need:
                return bytes(hs[:need])
        if pos >= len(buf) or len(buf) - pos < 5:
            return NEED_MORE
        ctype, major, minor = buf[pos], buf[pos + 1], buf[pos + 2]
        rlen = int.from_bytes(buf[pos + 3:pos + 5], "big")
        if ctype != 22 or major != 3 or minor > 4 or rlen == 0 or rlen > _MAX_RECORD:
            return NOT_TLS
        chunk = buf[pos + 5:pos + 5 + rlen]
        hs += chunk
        if len(chunk) < rlen:                                # partial record: check what we have, then wait
            if len(hs) >= 4 and (hs[0] != 1 or int.from_bytes(hs[1:4], "big") > MAX_HELLO):
                return NOT_TLS
            return NEED_MORE
        pos += 5 + rlen

class _R:
    __slots__ = ("b", "p", "end")
    def __init__(self, b: bytes, p: int, end: int): self.b, self.p, self.end = b, p, end
    def take(self, n: int) -> bytes:
        if n < 0 or self.p + n > self.end: raise ValueError("truncated")
        v = self.b[self.p:self.p + n]; self.p += n; return v
    def u8(self) -> int: return self.take(1)[0]
    def u16(self) -> int: return int.from_bytes(self.take(2), "big")
    def sub(self, n: int) -> "_R":
        if n < 0 or self.p + n > self.end: raise ValueError("truncated")
        r = _R(self.b, self.p, self.p + n); self.p += n; return r

def peek_sni(buf: bytes):
    if not buf:
        return NEED_MORE
    if buf[0] != 22:                 # also refuses SSLv2-compatible hellos (0x80..)
        return NOT_TLS
    hs = _reassemble(buf)
    if isinstance(hs, str):
        return hs
    try:
        r = _R(hs, 4, len(hs))
        r.take(2)                    # legacy_version
        r.take(32)                   # random
        r.take(r.u8())               # legacy_session_id (0..32)
        cs = r.u16()
        if cs % 2 or cs == 0: return NOT_TLS
        r.take(cs)                   # cipher_suites
        r.take(r.u8())               # legacy_compression_methods
        if r.p == r.end:
            return ("sni", None)     # no extensions at all (very old clients)
        exts = r.sub(r.u16())
        name = None
        seen = set()
        while exts.p < exts.end:
            etype = exts.u16(); edata = exts.sub(exts.u16())
            if etype in seen: return NOT_TLS     # duplicate extension: illegal (RFC 8446 4.2)
            seen.add(etype)
            if etype != 0:           # unknown/GREASE/ECH (0xfe0d) etc. are skipped
                continue
            lst = edata.sub(edata.u16())
            while lst.p < lst.end:
                ntype = lst.u8(); n = lst.take(lst.u16())
                if ntype == 0 and name is None:
                    name = n
        if name is None:
            return ("sni", None)
        host = name.rstrip(b".").lower()
        if not _HOST_RE.match(host):
            return NOT_TLS           # non-ASCII, empty labels, too long: do not route on it
        return ("sni", host.decode("ascii"))
    except ValueError:
        return NOT_TLS               # lengths inconsistent inside a complete hello
