"""TLS 1.3 cipher suites and key-exchange groups have no Python 3.11 API: try them through ctypes."""
import ssl, ctypes, sys
sys.path.insert(0, "/tmp/tlsexp")
from ticketkeys import _libssl, ssl_ctx_ptr
from selftest import connect, C
lib = _libssl()
lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
SSL_CTRL_SET_GROUPS_LIST = 92
s = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); s.load_cert_chain(C + "default.chain.pem", C + "default.key")
print("set_ciphersuites:", lib.SSL_CTX_set_ciphersuites(ssl_ctx_ptr(s), b"TLS_CHACHA20_POLY1305_SHA256"))
print("set groups P-256:", lib.SSL_CTX_ctrl(ssl_ctx_ptr(s), SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.c_char_p(b"P-256")))
print("bad suite name ->", lib.SSL_CTX_set_ciphersuites(ssl_ctx_ptr(s), b"NOPE"))
c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
cli = connect(s, c); print("negotiated:", cli.cipher(), cli.version())
# python-level alternative for 1.2: set_ciphers + set_ecdh_curve
s2 = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); s2.load_cert_chain(C + "default.chain.pem", C + "default.key")
s2.set_ecdh_curve("prime256v1"); s2.set_ciphers("ECDHE+AESGCM"); c.maximum_version = ssl.TLSVersion.TLSv1_2
print("1.2 via python API:", connect(s2, c).cipher())
print("default cipher list (first 4):", [x["name"] for x in s2.get_ciphers()][:4])
