"""Exp 1c: seeing handshake failures (reason) with create_server(ssl=) vs plain accept + loop.start_tls."""
import asyncio, ssl, socket, sys, logging
C = "/tmp/tlsexp/certs/"
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.minimum_version = ssl.TLSVersion.TLSv1_2
ctx.load_cert_chain(C + "default.chain.pem", C + "default.key")
fails = []
class App(asyncio.Protocol):
    def connection_made(self, t): t.write(b"hi"); t.close()

class Raw(asyncio.Protocol):
    """Accepts the TCP connection, then upgrades with start_tls and learns the outcome."""
    def connection_made(self, t):
        t.pause_reading()   # else the ClientHello may reach this protocol (and be lost) before start_tls
        asyncio.get_running_loop().create_task(self.upgrade(t))
    async def upgrade(self, t):
        app = App()
        try:
            tls = await asyncio.get_running_loop().start_tls(t, app, ctx, server_side=True, ssl_handshake_timeout=1.0)
        except ssl.SSLError as e:
            fails.append(("SSLError", e.reason)); t.close(); return
        except Exception as e:
            fails.append((type(e).__name__, str(e)[:40])); t.close(); return
        app.connection_made(tls)
    def data_received(self, d): pass  # not called: start_tls swaps protocol before data is read

async def clients(port):
    loop = asyncio.get_running_loop()
    async def one(kind):
        try:
            if kind == "plain-http":
                r, w = await asyncio.open_connection("127.0.0.1", port); w.write(b"GET / HTTP/1.1\r\n\r\n"); await r.read(); w.close()
            elif kind == "tls1.1":
                c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname=False; c.verify_mode=ssl.CERT_NONE
                c.minimum_version = c.maximum_version = ssl.TLSVersion.TLSv1_1; c.set_ciphers("ALL:@SECLEVEL=0")
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=c); await r.read(); w.close()
            elif kind == "untrusted-client":  # client rejects server cert -> server sees alert
                c = ssl.create_default_context()
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=c, server_hostname="default.test"); await r.read()
            elif kind == "idle":
                r, w = await asyncio.open_connection("127.0.0.1", port); await asyncio.sleep(1.5); w.close()
            elif kind == "reset":
                s = socket.create_connection(("127.0.0.1", port)); s.send(b"\x16\x03\x01\x00\x50\x01"); s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0"); s.close()
            elif kind == "ok":
                c = ssl.create_default_context(cafile=C+"ca.pem")
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=c, server_hostname="default.test"); await r.read(); w.close()
        except Exception as e:
            return f"client {kind}: {type(e).__name__}"
        return f"client {kind}: ok"
    for k in ("plain-http", "tls1.1", "untrusted-client", "ok", "idle", "reset", "ok"):
        print(" ", await one(k))
    await asyncio.sleep(0.3)

async def main():
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda l, c: fails.append(("exc_handler", c.get("message"))))
    srv = await loop.create_server(App, "127.0.0.1", 0, ssl=ctx, ssl_handshake_timeout=1.0)
    print(" create_server(ssl=):"); fails.clear(); await clients(srv.sockets[0].getsockname()[1]); print("  seen by app:", fails); srv.close()
    srv = await loop.create_server(Raw, "127.0.0.1", 0)
    print(" accept + start_tls:"); fails.clear(); await clients(srv.sockets[0].getsockname()[1]); print("  seen by app:", fails); srv.close()
import uvloop
print("== asyncio"); asyncio.run(main())
print("== uvloop"); uvloop.run(main())
