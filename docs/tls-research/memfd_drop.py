import os, ssl, sys, ctypes
data = open("/tmp/tlsexp/certs/wild.chain.pem","rb").read() + open("/tmp/tlsexp/certs/wild.key","rb").read()
os.setgroups([]); os.setgid(65534); os.setuid(65534)          # in-process drop, like the worker
libc = ctypes.CDLL(None); PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
print("uid", os.getuid(), "dumpable", libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
def load():
    fd = os.memfd_create("tls", os.MFD_CLOEXEC); os.write(fd, data)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(f"/proc/self/fd/{fd}", password=lambda: b""); return "OK"
    except Exception as e: return repr(e)
    finally: os.close(fd)
print("memfd via /proc/self/fd:", load())
print("same via /dev/fd:", end=" ")
fd = os.memfd_create("tls", 0); os.write(fd, data)
try: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(f"/dev/fd/{fd}"); print("OK")
except Exception as e: print(repr(e))
