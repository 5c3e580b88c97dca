import asyncio, ssl, sys, uvloop
C = "/tmp/tlsexp/certs/"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(C + "default.chain.pem", C + "default.key")
class App(asyncio.Protocol):
    def connection_made(self, t): self.t = t
    def data_received(self, d): self.t.write(b"echo:" + d); self.t.close()
class Raw(asyncio.Protocol):
    def __init__(self, mode): self.mode = mode
    def connection_made(self, t):
        if self.mode == "pause": t.pause_reading()
        asyncio.get_running_loop().create_task(self.up(t))
    def data_received(self, d): print("   RAW got", len(d), "bytes (lost)")
    async def up(self, t):
        app = App()
        try:
            tls = await asyncio.get_running_loop().start_tls(t, app, ctx, server_side=True, ssl_handshake_timeout=1)
            app.connection_made(tls)
        except Exception as e: print("   server:", repr(e))
async def main(mode):
    srv = await asyncio.get_running_loop().create_server(lambda: Raw(mode), "127.0.0.1", 0)
    c = ssl.create_default_context(cafile=C+"ca.pem")
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", srv.sockets[0].getsockname()[1], ssl=c, server_hostname="default.test"), 2)
        w.write(b"hello"); print("  ", mode, await asyncio.wait_for(r.read(), 2))
    except Exception as e: print("  ", mode, "client:", repr(e))
    srv.close()
for mode in ("nopause", "pause"):
    print("asyncio"); asyncio.run(main(mode))
    print("uvloop"); uvloop.run(main(mode))
