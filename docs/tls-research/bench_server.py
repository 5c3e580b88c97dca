"""Trivial keep-alive HTTP/1.1 server for TLS benchmarks. argv: loop(asyncio|uvloop) tls(0|1) port [ticketkey]"""
import asyncio, ssl, sys, os
loopname, tls, port = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
C = "/tmp/tlsexp/certs/"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
RESP_CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\nContent-Type: text/plain\r\n\r\nok"
class P(asyncio.Protocol):
    __slots__ = ("t", "buf")
    def connection_made(self, t): self.t = t; self.buf = b""
    def data_received(self, d):
        buf = self.buf + d
        while True:
            i = buf.find(b"\r\n\r\n")
            if i < 0: break
            req, buf = buf[:i], buf[i + 4:]
            if b"onnection: close" in req or b"onnection: Close" in req:
                self.t.write(RESP_CLOSE); self.t.close(); return
            self.t.write(RESP)
        self.buf = buf
ctx = None
if tls:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(C + "default.chain.pem", C + "default.key")
    if os.environ.get("NO_TICKET"): ctx.options |= ssl.OP_NO_TICKET
    sys.path.insert(0, "/tmp/tlsexp")
    if os.environ.get("TICKET") == "key":
        import ticketkeys; ticketkeys.set_ticket_key(ctx, os.urandom(80))
    elif os.environ.get("TICKET") == "ring":
        from ticketkeys_multi import TicketKeyRing; ring = TicketKeyRing([os.urandom(80), os.urandom(80)]); ring.attach(ctx)
    if os.environ.get("COUNTING"):
        class CountingSSLObject(ssl.SSLObject):
            _hs = 0
            def do_handshake(self):
                try: super().do_handshake()
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError): raise
                except ssl.SSLError as e: self._hs = 2; raise
                self._hs = 1
        ctx.sslobject_class = CountingSSLObject
        ctx.sni_callback = lambda so, name, c: setattr(so, "sni", name)
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", port, ssl=ctx, backlog=1024)
    print("ready", os.getpid(), flush=True)
    await asyncio.sleep(float(os.environ.get("LIFETIME", "120")))
if loopname == "uvloop":
    import uvloop; uvloop.run(main())
else:
    asyncio.run(main())
