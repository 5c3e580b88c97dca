"""Idle-connection memory: argv loop tls port N. Prints RSS with 0 and with N idle keep-alive connections."""
import asyncio, ssl, sys, os, gc
loopname, tls, port, N = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4])
C = "/tmp/tlsexp/certs/"
def rss_kb():
    for l in open("/proc/self/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
conns = set()
class P(asyncio.Protocol):
    def connection_made(self, t): self.t = t; conns.add(self)
    def data_received(self, d):
        if b"\r\n\r\n" in d: self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    def connection_lost(self, e): conns.discard(self)
if os.environ.get("MAXSIZE"):
    import asyncio.sslproto; asyncio.sslproto.SSLProtocol.max_size = int(os.environ["MAXSIZE"])
ctx = None
if tls:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(C + "default.chain.pem", C + "default.key")
    if os.environ.get("NO_TICKET"): ctx.options |= ssl.OP_NO_TICKET
async def main():
    srv = await asyncio.get_running_loop().create_server(P, "127.0.0.1", port, ssl=ctx, backlog=4096)
    # warm up a few connections first so one-time allocations are out of the delta
    gc.collect(); await asyncio.sleep(0.2)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)          # client says: warm-up done
    gc.collect(); r0 = rss_kb(); n0 = len(conns)
    print("base", r0, n0, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)          # client says: N connections made and idle
    await asyncio.sleep(1); gc.collect(); r1 = rss_kb(); n1 = len(conns)
    print(f"RESULT {loopname} tls={int(tls)} conns={n1-n0} rss_delta={(r1-r0)/1024:.1f} MiB per_conn={(r1-r0)*1024/max(1,n1-n0)/1024:.1f} KiB", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
if loopname == "uvloop":
    import uvloop; uvloop.run(main())
else:
    asyncio.run(main())
