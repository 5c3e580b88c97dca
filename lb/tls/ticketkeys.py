"""Session ticket keys shared between processes and nodes, set through OpenSSL directly.

Python's ssl has no API for ``SSL_CTX_set_tlsext_ticket_keys``: without it every context
(every worker, every node) encrypts tickets with its own random key, and a client resumes
only when it happens to reach the same worker again. This sets the key through ctypes on the
libssl ``_ssl`` is already linked against. The ``SSL_CTX *`` is the first field after
``PyObject_HEAD`` of CPython's ``PySSLContext`` (3.7 to 3.13), at ``object.__basicsize__``.

Every step is checked (the libssl is the one ``_ssl`` uses and reports the same version; the
pointer's options and verify mode read back equal to Python's; the key length probe answers
80; the key reads back), and the daemon first runs ``selftest`` in a throwaway subprocess
(``python -m lb.tls.ticketkeys``): a crash there turns sharing off with one warning, never
takes a listener down. The fallback is OpenSSL's own per-context key.

The key is 80 bytes in OpenSSL's order: name 16 | HMAC 32 | AES 32.
"""

from __future__ import annotations

import _ssl
import ctypes
import hashlib
import hmac
import os
import ssl
import sys
from collections.abc import Callable

KEY_LEN = 80
_GET_KEYS = 58  # SSL_CTRL_GET_TLSEXT_TICKET_KEYS
_SET_KEYS = 59  # SSL_CTRL_SET_TLSEXT_TICKET_KEYS


class TicketKeyUnsupported(RuntimeError):
    """This Python/OpenSSL cannot take a shared key (the reason is the message)."""


_lib: ctypes.CDLL | None = None


def libssl() -> ctypes.CDLL:
    """The libssl ``_ssl`` uses (already mapped into this process). Called before a worker
    drops its privileges, while the interpreter's files are still readable."""
    global _lib
    if _lib is not None:
        return _lib
    path = None
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and "/libssl.so" in parts[-1]:
                path = parts[-1]
                break
    if path is None:
        raise TicketKeyUnsupported("no shared libssl in this process (_ssl linked statically?)")
    lib = ctypes.CDLL(path)
    lib.OpenSSL_version_num.restype = ctypes.c_ulong
    if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise TicketKeyUnsupported(
            f"{path} is {lib.OpenSSL_version_num():#x}, _ssl reports "
            f"{ssl.OPENSSL_VERSION_NUMBER:#x}")
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    _lib = lib
    return lib


def _ctx_ptr(ctx: ssl.SSLContext) -> int:
    if not isinstance(ctx, _ssl._SSLContext):
        raise TypeError("not an SSLContext")
    lib = libssl()
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        raise TicketKeyUnsupported("SSL_CTX pointer is NULL")
    if (lib.SSL_CTX_get_options(ptr) != int(ctx.options)
            or lib.SSL_CTX_get_verify_mode(ptr) != int(ctx.verify_mode)):
        raise TicketKeyUnsupported("the SSL_CTX pointer is not this SSLContext's (layout?)")
    if lib.SSL_CTX_ctrl(ptr, _SET_KEYS, 0, None) != KEY_LEN:
        raise TicketKeyUnsupported("this OpenSSL does not take 80-byte ticket keys")
    return int(ptr)


def get_ticket_key(ctx: ssl.SSLContext) -> bytes:
    ptr = _ctx_ptr(ctx)
    buf = ctypes.create_string_buffer(KEY_LEN)
    if libssl().SSL_CTX_ctrl(ptr, _GET_KEYS, KEY_LEN, buf) != 1:
        raise TicketKeyUnsupported("reading the ticket key failed")
    return buf.raw


def set_ticket_key(ctx: ssl.SSLContext, key: bytes) -> None:
    """Make ``ctx`` encrypt and decrypt session tickets with ``key``."""
    if len(key) != KEY_LEN:
        raise ValueError(f"a ticket key is {KEY_LEN} bytes, got {len(key)}")
    ptr = _ctx_ptr(ctx)
    buf = ctypes.create_string_buffer(key, KEY_LEN)
    if libssl().SSL_CTX_ctrl(ptr, _SET_KEYS, KEY_LEN, buf) != 1:
        raise TicketKeyUnsupported("OpenSSL refused the ticket key")
    if get_ticket_key(ctx) != key:
        raise TicketKeyUnsupported("the ticket key did not read back")


def derive(secret: bytes, listener: str, epoch: int = 0) -> bytes:
    """A listener's ticket key from a secret both nodes have (HKDF-SHA256, RFC 5869): one
    per listener, so a ticket of one listener never resumes on another, and one per
    ``epoch``, so the key rotates on both nodes at once without a word between them."""
    prk = hmac.new(b"pairlb tls ticket key", secret, hashlib.sha256).digest()
    info = b"pairlb tls ticket key v1\x00" + listener.encode() + b"\x00" + str(epoch).encode()
    out, block = b"", b""
    for i in range(1, 4):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
    return out[:KEY_LEN]


def parse_key_file(raw: bytes, path: str) -> bytes:
    """An 80-byte key from a key file: 160 hex digits (as ``pairlb keygen --tls-ticket``
    writes), whitespace ignored."""
    text = b"".join(raw.split())
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path}: not hex (expected {KEY_LEN * 2} hex digits)") from None
    if len(key) != KEY_LEN:
        raise ValueError(f"{path}: {len(key)} bytes, a ticket key is {KEY_LEN} "
                         f"({KEY_LEN * 2} hex digits; `pairlb keygen --tls-ticket PATH`)")
    return key


# -- self-test -------------------------------------------------------------------------------


def memory_handshake(
    server: ssl.SSLContext, client: ssl.SSLContext, server_name: str | None = "selftest.invalid",
    session: ssl.SSLSession | None = None, exchange: bool = True,
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A TLS handshake between two contexts in memory (no socket): (client, server).
    ``exchange``: then one byte from the server, which carries TLS 1.3's tickets. Raises
    what either side raises (an SSLError for a refused handshake)."""
    cin, cout, sin, sout = (ssl.MemoryBIO() for _ in range(4))
    cli = client.wrap_bio(cin, cout, server_hostname=server_name, session=session)
    srv = server.wrap_bio(sin, sout, server_side=True)
    for _ in range(30):
        done = 0
        for obj in (cli, srv):
            try:
                obj.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        if cout.pending:
            sin.write(cout.read())
        if sout.pending:
            cin.write(sout.read())
        if done == 2:
            break
    else:
        raise RuntimeError("the in-memory handshake did not finish")
    if exchange:
        srv.write(b"x")
        cin.write(sout.read())
        if cli.read(1) != b"x":
            raise RuntimeError("the in-memory exchange failed")
    return cli, srv


def selftest(load: Callable[[ssl.SSLContext], None]) -> None:
    """A ticket issued by one context resumes on another given the same key (TLS 1.3 and
    1.2). ``load(ctx)`` loads a certificate into a server context. Raises on failure."""
    key = os.urandom(KEY_LEN)
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        a, b = (ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) for _ in range(2))
        for ctx in (a, b):
            load(ctx)
            set_ticket_key(ctx, key)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        client.maximum_version = version
        first, _ = memory_handshake(a, client)
        if first.session is None:
            raise RuntimeError(f"{version.name}: no session ticket issued")
        if not memory_handshake(b, client, session=first.session)[0].session_reused:
            raise RuntimeError(f"{version.name}: the ticket did not resume on the second context")


def main() -> int:
    """``python -m lb.tls.ticketkeys`` with a PEM chain and key on stdin: exit 0 when a
    shared key works here; else the reason on stderr and exit 1 (or a crash)."""
    from lb.tls.contexts import load_pem

    pem = sys.stdin.buffer.read()
    try:
        selftest(lambda ctx: load_pem(ctx, pem))
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
