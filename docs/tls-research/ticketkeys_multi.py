"""Several session ticket keys (rotation without a resumption gap), OpenSSL 3.x only, via
SSL_CTX_set_tlsext_ticket_key_evp_cb and a ctypes callback. Tickets are encrypted with keys[0]
and accepted under any key in the list (renewed when not keys[0]). Same AES-256-CBC + HMAC-SHA256
construction as OpenSSL's built-in ticket keys. Key layout (ours): name 16 | hmac 32 | aes 32."""
from __future__ import annotations
import ctypes, ssl
from ticketkeys import _libssl, ssl_ctx_ptr, TicketKeyUnsupported

class OSSL_PARAM(ctypes.Structure):
    _fields_ = [("key", ctypes.c_char_p), ("data_type", ctypes.c_uint), ("data", ctypes.c_void_p),
                ("data_size", ctypes.c_size_t), ("return_size", ctypes.c_size_t)]
OSSL_PARAM_UTF8_STRING, OSSL_PARAM_OCTET_STRING = 4, 5
CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int)
_crypto = None

def _libcrypto():
    global _crypto
    if _crypto is None:
        path = next((l.split()[-1] for l in open("/proc/self/maps") if "/libcrypto.so" in l), None)
        if path is None: raise TicketKeyUnsupported("no shared libcrypto mapped")
        c = ctypes.CDLL(path)
        c.EVP_aes_256_cbc.restype = ctypes.c_void_p
        c.EVP_EncryptInit_ex.argtypes = c.EVP_DecryptInit_ex.argtypes = [ctypes.c_void_p] * 5
        c.EVP_MAC_CTX_set_params.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        c.RAND_bytes.argtypes = [ctypes.c_void_p, ctypes.c_int]
        _crypto = c
    return _crypto

class TicketKeyRing:
    """Holds the keys and the C callback for one or more SSLContexts. Replace keys with set_keys()."""
    def __init__(self, keys: list[bytes]):
        if ssl.OPENSSL_VERSION_INFO < (3, 0): raise TicketKeyUnsupported("needs OpenSSL 3")
        self.crypto = _libcrypto(); self.ssl = _libssl()
        self.ssl.SSL_CTX_set_tlsext_ticket_key_evp_cb.argtypes = [ctypes.c_void_p, CB]
        self.cipher = self.crypto.EVP_aes_256_cbc()
        self._cb = CB(self._callback)       # must stay referenced as long as any context uses it
        self.set_keys(keys)
        self.calls = {"enc": 0, "dec_ok": 0, "dec_renew": 0, "dec_unknown": 0, "error": 0}

    def set_keys(self, keys: list[bytes]) -> None:
        if not keys or any(len(k) != 80 for k in keys): raise ValueError("80-byte keys")
        table = {}
        for k in keys:
            name, hmac, aes = k[:16], k[16:48], k[48:]
            # Pre-build the OSSL_PARAM array for the HMAC key (kept alive in the table).
            hbuf = ctypes.create_string_buffer(hmac, 32); dg = ctypes.c_char_p(b"SHA256")
            params = (OSSL_PARAM * 3)(
                OSSL_PARAM(b"key", OSSL_PARAM_OCTET_STRING, ctypes.cast(hbuf, ctypes.c_void_p), 32, 0),
                OSSL_PARAM(b"digest", OSSL_PARAM_UTF8_STRING, ctypes.cast(dg, ctypes.c_void_p), 6, 0),
                OSSL_PARAM(None, 0, None, 0, 0))
            table[name] = (ctypes.create_string_buffer(aes, 32), hbuf, dg, params)
        self.table = table; self.current = keys[0][:16]     # one assignment each: atomic for the callback

    def attach(self, ctx: ssl.SSLContext) -> None:
        if self.ssl.SSL_CTX_set_tlsext_ticket_key_evp_cb(ssl_ctx_ptr(ctx), self._cb) != 1:
            raise TicketKeyUnsupported("SSL_CTX_set_tlsext_ticket_key_evp_cb failed")

    def _callback(self, s, key_name, iv, cctx, hctx, enc):
        try:
            c = self.crypto
            if enc:
                name = self.current; aes, hbuf, dg, params = self.table[name]
                ctypes.memmove(key_name, name, 16)
                if c.RAND_bytes(iv, 16) != 1: return -1
                if c.EVP_EncryptInit_ex(cctx, self.cipher, None, aes, iv) != 1: return -1
                if c.EVP_MAC_CTX_set_params(hctx, params) != 1: return -1
                self.calls["enc"] += 1
                return 1
            name = ctypes.string_at(key_name, 16)
            entry = self.table.get(name)
            if entry is None:
                self.calls["dec_unknown"] += 1
                return 0                                   # unknown key: full handshake, new ticket
            aes, hbuf, dg, params = entry
            if c.EVP_MAC_CTX_set_params(hctx, params) != 1: return -1
            if c.EVP_DecryptInit_ex(cctx, self.cipher, None, aes, iv) != 1: return -1
            if name != self.current:
                self.calls["dec_renew"] += 1
                return 2                                   # valid, but re-issue under the current key
            self.calls["dec_ok"] += 1
            return 1
        except BaseException:
            self.calls["error"] += 1
            return -1
