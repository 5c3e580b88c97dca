"""Exp 1: SNI context switch under asyncio stdlib loop and uvloop; cert name/expiry parsing."""
import asyncio, ssl, sys, socket, fnmatch, time
C = "/tmp/tlsexp/certs/"

def decode(path):
    d = ssl._ssl._test_decode_cert(path)
    names = [v for k, v in d.get("subjectAltName", ()) if k == "DNS"]
    return names, d["notAfter"], ssl.cert_time_to_seconds(d["notAfter"]), d

def mkctx(name):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(C + name + ".chain.pem", C + name + ".key")
    return ctx

certs = {n: mkctx(n) for n in ("default", "wild", "other")}
names = {n: decode(C + n + ".pem")[0] for n in certs}
counts = {}
seen = []

def match(host):
    host = host.lower().rstrip(".")
    for n, pats in names.items():
        for p in pats:
            if p == host: return n
    for n, pats in names.items():
        for p in pats:
            if p.startswith("*.") and "." in host and host.split(".", 1)[1] == p[2:]:
                return n
    return None

def sni_cb(sslobj, server_name, ctx):
    chosen = match(server_name) if server_name else None
    chosen = chosen or "default"
    if chosen != "default":
        sslobj.context = certs[chosen]
    # record on the SSLObject for later lookup: sslobj is the SSLObject (memory BIO) here
    seen.append((type(sslobj).__name__, server_name, chosen, sslobj.context is certs[chosen]))
    counts[chosen] = counts.get(chosen, 0) + 1
    return None

certs["default"].sni_callback = sni_cb

class P(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
        so = t.get_extra_info("ssl_object")
        self.info = (so.server_hostname if so else None, so.selected_alpn_protocol(), so.version(), so.context is certs["default"])
    def data_received(self, d):
        self.t.write(repr(self.info).encode()); self.t.close()

async def main():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(P, "127.0.0.1", 0, ssl=certs["default"])
    port = srv.sockets[0].getsockname()[1]
    cctx = ssl.create_default_context(cafile=C + "ca.pem")
    cctx.set_alpn_protocols(["http/1.1"])
    out = []
    for host in ["default.test", "x.example.test", "example.test", "a.other.test", "nomatch.test", "a.b.example.test", None]:
        c = ssl.create_default_context(cafile=C + "ca.pem"); c.check_hostname = False
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=c, server_hostname=host or "")
        so = w.get_extra_info("ssl_object")
        peer = so.getpeercert()
        san = [v for k, v in peer["subjectAltName"]]
        w.write(b"x"); data = await r.read()
        out.append((host, san[0], data.decode()))
        w.close()
    srv.close()
    return out

if __name__ == "__main__":
    print(decode(C + "wild.pem")[:3])
    for loopname in ("asyncio", "uvloop"):
        seen.clear(); counts.clear()
        if loopname == "uvloop":
            import uvloop; res = uvloop.run(main())
        else:
            res = asyncio.run(main())
        print("==", loopname)
        for r in res: print(r)
        print("cb seen:", seen); print("counts:", counts)
