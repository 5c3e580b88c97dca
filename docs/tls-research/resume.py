"""Exp 2: two server processes, each with its own SSLContext, same 80-byte ticket key.
Client gets a ticket from A, resumes on B. TLS 1.3 and 1.2, asyncio and uvloop servers."""
import asyncio, os, ssl, socket, sys, subprocess, time
sys.path.insert(0, "/tmp/tlsexp")
import ticketkeys
C = "/tmp/tlsexp/certs/"
PY = "/work/main/.venv/bin/python"

def server_main(port, loopname, keyhex, sni):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(C + "default.chain.pem", C + "default.key")
    if sni:  # switch to a second context (also keyed) to see whose key matters
        other = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); other.set_alpn_protocols(["http/1.1"])
        other.load_cert_chain(C + "other.chain.pem", C + "other.key")
        if sni == "both":
            ticketkeys.set_ticket_key(other, bytes.fromhex(keyhex))
        ctx.sni_callback = lambda so, name, c: setattr(so, "context", other) if name == "a.other.test" else None
    if keyhex != "none" and os.environ.get("RING"):
        from ticketkeys_multi import TicketKeyRing
        global _ring; _ring = TicketKeyRing([bytes.fromhex(keyhex)]); _ring.attach(ctx)
    elif keyhex != "none":
        ticketkeys.set_ticket_key(ctx, bytes.fromhex(keyhex))
    class P(asyncio.Protocol):
        def connection_made(self, t): self.t = t
        def data_received(self, d):
            so = self.t.get_extra_info("ssl_object")
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n" + (b"R" if so.session_reused else b"F") + str(port % 10).encode() + b"\n")
    async def main():
        srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", port, ssl=ctx)
        print("ready", flush=True)
        await asyncio.sleep(3600)
    if loopname == "uvloop":
        import uvloop; uvloop.run(main())
    else:
        asyncio.run(main())

def get(port, cctx, session=None, host="default.test"):
    with socket.create_connection(("127.0.0.1", port)) as s:
        with cctx.wrap_socket(s, server_hostname=host, session=session) as ts:
            ts.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(b"\n"):
                data += ts.recv(100)
            return ts.session, ts.session_reused, data.split(b"\r\n\r\n")[1].strip().decode(), ts.version()

def scenario(loopname, key_a, key_b, sni=None, host="default.test"):
    procs = []
    for port, key in ((18441, key_a), (18442, key_b)):
        p = subprocess.Popen([PY, __file__, "serve", str(port), loopname, key, sni or ""], stdout=subprocess.PIPE)
        assert p.stdout.readline().strip() == b"ready"; procs.append(p)
    out = []
    try:
        for maxv in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
            cctx = ssl.create_default_context(cafile=C + "ca.pem"); cctx.maximum_version = maxv
            sess, reused, body, ver = get(18441, cctx, host=host)
            _, reused2, body2, _ = get(18442, cctx, sess, host=host)
            _, reused3, body3, _ = get(18441, cctx, sess, host=host)
            out.append(f"{ver}: A:{body} ->B:{body2}(reused={reused2}) ->A:{body3}(reused={reused3})")
    finally:
        for p in procs: p.kill(); p.wait()
    return out

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        server_main(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]); sys.exit()
    k = os.urandom(80).hex(); k2 = os.urandom(80).hex()
    for loopname in ("asyncio", "uvloop"):
        print("==", loopname)
        print(" same key    :", scenario(loopname, k, k))
        print(" diff keys   :", scenario(loopname, k, k2))
        print(" no key set  :", scenario(loopname, "none", "none"))
        print(" SNI->other, key on default ctx only:", scenario(loopname, k, k, sni="default-only", host="a.other.test"))
        print(" SNI->other, key on both ctxs      :", scenario(loopname, k, k, sni="both", host="a.other.test"))
