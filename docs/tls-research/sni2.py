"""Exp 1b: ALPN after context switch (with/without ALPN on the switched ctx), attaching SNI to SSLObject,
which settings come from the original ctx (min version) vs the switched one."""
import asyncio, ssl, sys
C = "/tmp/tlsexp/certs/"
def mkctx(name, alpn=True, minv=ssl.TLSVersion.TLSv1_2):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minv
    if alpn: ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(C + name + ".chain.pem", C + name + ".key")
    return ctx

async def run(default, other, client_max=None, client_alpn=("h2", "http/1.1")):
    def cb(sslobj, name, ctx):
        sslobj.sni_name = name            # attribute on ssl.SSLObject: allowed?
        if name == "a.other.test": sslobj.context = other
    default.sni_callback = cb
    got = {}
    class P(asyncio.Protocol):
        def connection_made(self, t):
            so = t.get_extra_info("ssl_object")
            got.update(sni=getattr(so, "sni_name", "?"), alpn=so.selected_alpn_protocol(), ver=so.version(), cipher=so.cipher()[0])
            t.close()
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(P, "127.0.0.1", 0, ssl=default)
    port = srv.sockets[0].getsockname()[1]
    c = ssl.create_default_context(cafile=C + "ca.pem")
    if client_max: c.maximum_version = client_max
    c.set_alpn_protocols(list(client_alpn))
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=c, server_hostname="a.other.test")
        calpn = w.get_extra_info("ssl_object").selected_alpn_protocol()
        await r.read(); w.close()
        res = (got, calpn)
    except Exception as e:
        res = ("client error", repr(e))
    srv.close(); await srv.wait_closed()
    return res

async def main():
    print("both ALPN:", await run(mkctx("default"), mkctx("other")))
    print("switched ctx w/o ALPN:", await run(mkctx("default"), mkctx("other", alpn=False)))
    print("default w/o ALPN, switched with:", await run(mkctx("default", alpn=False), mkctx("other")))
    print("default min 1.3, other min 1.2; client max 1.2:", await run(mkctx("default", minv=ssl.TLSVersion.TLSv1_3), mkctx("other"), client_max=ssl.TLSVersion.TLSv1_2))
    print("default min 1.2, other min 1.3; client max 1.2:", await run(mkctx("default"), mkctx("other", minv=ssl.TLSVersion.TLSv1_3), client_max=ssl.TLSVersion.TLSv1_2))
    print("client only h2:", await run(mkctx("default"), mkctx("other"), client_alpn=("h2",)))

import uvloop
print("== asyncio"); asyncio.run(main())
print("== uvloop"); uvloop.run(main())
