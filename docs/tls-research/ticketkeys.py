"""Set the TLS session ticket key of a Python ssl.SSLContext through ctypes (OpenSSL >= 1.1.0).

ssl has no API for SSL_CTX_set_tlsext_ticket_keys. The SSL_CTX* is the first field after
PyObject_HEAD in _ssl's PySSLContext (CPython 3.7 .. 3.13 at least), i.e. at offset
object.__basicsize__ of the SSLContext instance. The key is 80 bytes: 16 name + 32 HMAC + 32 AES.
Every call is guarded: the libssl must be the one _ssl uses (found in /proc/self/maps) and report the
same version as ssl.OPENSSL_VERSION_NUMBER; the pointer is validated by reading the context's
options through OpenSSL and comparing with ctx.options, and the key is read back after setting.
"""
from __future__ import annotations
import ctypes, ssl, _ssl

SSL_CTRL_GET_TLSEXT_TICKET_KEYS = 58
SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
KEY_LEN = 80

class TicketKeyUnsupported(RuntimeError):
    pass

_lib = None

def _libssl() -> ctypes.CDLL:
    """The libssl that _ssl is linked against (already loaded in this process)."""
    global _lib
    if _lib is not None:
        return _lib
    path = None
    with open("/proc/self/maps") as f:
        for line in f:
            p = line.split()[-1] if len(line.split()) >= 6 else ""
            if "/libssl.so" in p:
                path = p
                break
    if path is None:
        raise TicketKeyUnsupported("no shared libssl mapped (is _ssl statically linked?)")
    lib = ctypes.CDLL(path)  # same soname+path: dlopen returns the already-loaded handle
    lib.OpenSSL_version_num.restype = ctypes.c_ulong
    if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
        raise TicketKeyUnsupported(f"{path} is {lib.OpenSSL_version_num():#x}, _ssl reports {ssl.OPENSSL_VERSION_NUMBER:#x}")
    if ssl.OPENSSL_VERSION_INFO < (1, 1, 0):
        raise TicketKeyUnsupported("OpenSSL < 1.1.0 uses 48-byte keys")
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    lib.SSL_CTX_get_options.restype = ctypes.c_uint64
    lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
    lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
    lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
    _lib = lib
    return lib

def ssl_ctx_ptr(ctx: ssl.SSLContext) -> int:
    if not isinstance(ctx, _ssl._SSLContext):
        raise TypeError("not an SSLContext")
    lib = _libssl()
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        raise TicketKeyUnsupported("SSL_CTX pointer is NULL")
    # Validate: OpenSSL's view of options/verify mode must equal Python's.
    if lib.SSL_CTX_get_options(ptr) != int(ctx.options) or lib.SSL_CTX_get_verify_mode(ptr) != int(ctx.verify_mode):
        raise TicketKeyUnsupported("SSL_CTX pointer does not look like this SSLContext's")
    # With keys=NULL, SSL_CTRL_GET/SET_TLSEXT_TICKET_KEYS only return the key length they expect.
    if lib.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, 0, None) != KEY_LEN:
        raise TicketKeyUnsupported("this OpenSSL does not take 80-byte ticket keys")
    return ptr

def get_ticket_key(ctx: ssl.SSLContext) -> bytes:
    lib = _libssl(); ptr = ssl_ctx_ptr(ctx)
    buf = ctypes.create_string_buffer(KEY_LEN)
    if lib.SSL_CTX_ctrl(ptr, SSL_CTRL_GET_TLSEXT_TICKET_KEYS, KEY_LEN, buf) != 1:
        raise TicketKeyUnsupported("SSL_CTRL_GET_TLSEXT_TICKET_KEYS refused an 80-byte buffer")
    return buf.raw

def set_ticket_key(ctx: ssl.SSLContext, key: bytes) -> None:
    """Make ctx encrypt and decrypt session tickets with ``key`` (80 bytes)."""
    if len(key) != KEY_LEN:
        raise ValueError(f"ticket key must be {KEY_LEN} bytes, got {len(key)}")
    lib = _libssl(); ptr = ssl_ctx_ptr(ctx)
    buf = ctypes.create_string_buffer(key, KEY_LEN)
    if lib.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, KEY_LEN, buf) != 1:
        raise TicketKeyUnsupported("SSL_CTRL_SET_TLSEXT_TICKET_KEYS refused an 80-byte key")
    if get_ticket_key(ctx) != key:
        raise TicketKeyUnsupported("ticket key did not read back")
