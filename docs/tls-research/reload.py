"""Exp 5: front context (settings, ticket key, sni_callback) + swappable cert contexts.
Open keep-alive connections, swap the cert table (and tighten settings in place), check old conns
still work and new conns get the new cert; dropped cert contexts stay alive while used."""
import asyncio, ssl, gc, weakref, sys
C = "/tmp/tlsexp/certs/"
def cert_ctx(name):
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); c.set_alpn_protocols(["http/1.1"])
    c.load_cert_chain(C + name + ".chain.pem", C + name + ".key", password=lambda: b"")
    return c
front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)      # no certificate of its own
front.minimum_version = ssl.TLSVersion.TLSv1_2
table = {"default": cert_ctx("default")}
def cb(so, name, _ctx):
    so.context = table["default"]                      # always switch: cert comes from the table
    return None
front.sni_callback = cb

class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t
    def data_received(self, d):
        cn = self.t.get_extra_info("ssl_object").context
        self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

async def req(r, w):
    w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"); return (await r.readuntil(b"ok"))[-2:]

async def conn(port, maxv=None):
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
    if maxv: c.maximum_version = maxv
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=c, server_hostname="x.test")
    der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
    subj = ssl._ssl._test_decode_cert  # (needs a file) -> use CN from DER quickly:
    return r, w, (b"default" in der and "default" or b"other" in der and "other" or "?")

async def main():
    front.minimum_version = ssl.TLSVersion.TLSv1_2; table["default"] = cert_ctx("default")
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", 0, ssl=front)
    port = srv.sockets[0].getsockname()[1]
    old = [await conn(port) for _ in range(3)] + [await conn(port, ssl.TLSVersion.TLSv1_2)]
    print("  before swap: certs", [c for *_, c in old], "reqs", [await req(r, w) for r, w, _ in old])
    wr = weakref.ref(table["default"])
    table["default"] = cert_ctx("other")              # reload: new cert table
    front.minimum_version = ssl.TLSVersion.TLSv1_3    # tighten settings in place
    gc.collect()
    print("  old cert ctx still alive (held by open conns):", wr() is not None)
    new = await conn(port)
    print("  new conn cert:", new[2], "req", await req(new[0], new[1]))
    print("  old conns after swap reqs:", [await req(r, w) for r, w, _ in old])
    try:
        await conn(port, ssl.TLSVersion.TLSv1_2); print("  new TLS1.2 conn: accepted (tightening NOT applied)")
    except Exception as e:
        print("  new TLS1.2 conn refused after tightening:", type(e).__name__)
    for r, w, _ in old + [new]: w.close()
    await asyncio.sleep(0.2); del old, new; gc.collect(); await asyncio.sleep(0.1); gc.collect()
    print("  old cert ctx freed after conns closed:", wr() is None)
    srv.close()
import uvloop
print("== asyncio"); asyncio.run(main())
print("== uvloop"); uvloop.run(main())
