import os, ssl, sys
data = sys.stdin.buffer.read()            # cert chain + key, as the control process would send it
fd = os.memfd_create("tls", os.MFD_CLOEXEC)
os.write(fd, data)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(f"/proc/self/fd/{fd}", password=lambda: b"")
os.close(fd)
print("uid", os.getuid(), "loaded from memfd OK")
try:
    open("/tmp/tlsexp/certs/wild.key").read(); print("can read key file directly")
except PermissionError: print("cannot read the key file itself (expected)")
