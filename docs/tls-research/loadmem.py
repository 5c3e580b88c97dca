"""Exp 5a: load cert+key from bytes via memfd (no file on disk), mismatch / bad-file error messages."""
import os, ssl
C = "/tmp/tlsexp/certs/"
def ctx_from_bytes(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    fd = os.memfd_create("pairlb-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, cert_pem + b"\n" + key_pem)   # chain and key in one "file": load_cert_chain reads both
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return ctx
rd = lambda n: open(C + n, "rb").read()
ctx = ctx_from_bytes(rd("wild.chain.pem"), rd("wild.key")); print("memfd load ok", ctx.get_ca_certs())
for label, cert, key in [("mismatch", "wild.chain.pem", "other.key"), ("key missing", "wild.chain.pem", "nope.key"),
                         ("garbage key", "wild.chain.pem", "wild.ext"), ("garbage cert", "wild.ext", "wild.key"),
                         ("key as cert", "wild.key", "wild.key"), ("empty cert", "/dev/null", "wild.key")]:
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        c.load_cert_chain(cert if cert.startswith("/") else C + cert, C + key); print(label, "-> loaded?!")
    except Exception as e:
        print(f"{label:12} -> {type(e).__name__} errno={getattr(e,'errno',None)} reason={getattr(e,'reason',None)} lib={getattr(e,'library',None)} str={e}")
# expired cert?  _test_decode_cert on a chain file returns first cert only
d = ssl._ssl._test_decode_cert(C + "wild.chain.pem"); print("decode chain ->", d["subject"], d["notAfter"])
try: ssl._ssl._test_decode_cert(C + "wild.key")
except Exception as e: print("decode key ->", repr(e))
# encrypted key with no password
os.system(f"openssl ec -in {C}wild.key -aes256 -passout pass:x -out /tmp/tlsexp/enc.key 2>/dev/null")
c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
try: c.load_cert_chain(C + "wild.chain.pem", "/tmp/tlsexp/enc.key", password=lambda: (_ for _ in ()).throw(RuntimeError("no passphrase")))
except Exception as e: print("encrypted key ->", repr(e))
