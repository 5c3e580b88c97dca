import socket, subprocess, sys
from sni_peek import peek_sni, NEED_MORE
ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(4); port = ls.getsockname()[1]
p = subprocess.Popen(["chromium", "--headless=new", "--no-sandbox", "--disable-gpu", "--user-data-dir=/tmp/tlsexp/chr",
    f"--host-resolver-rules=MAP chrome.example.test 127.0.0.1", "--dump-dom", f"https://chrome.example.test:{port}/"],
    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
ls.settimeout(20)
try:
    c, _ = ls.accept(); c.settimeout(5); buf = b""; segs = []
    while peek_sni(buf) == NEED_MORE:
        d = c.recv(65536)
        if not d: break
        segs.append(len(d)); buf += d
    exts = []
    # list extension types for the record
    print("result", peek_sni(buf), "hello bytes", len(buf), "recv sizes", segs)
    import struct
    h = buf[5:]; i = 4 + 2 + 32; i += 1 + h[i]; cs = struct.unpack(">H", h[i:i+2])[0]; i += 2 + cs; i += 1 + h[i]
    el = struct.unpack(">H", h[i:i+2])[0]; i += 2; end = i + el
    while i < end:
        t, l = struct.unpack(">HH", h[i:i+4]); exts.append(hex(t)); i += 4 + l
    print("extensions", exts)
    # key_share groups
finally:
    p.kill(); p.wait()
