"""Drives mem_server: opens warm-up conns, then N idle keep-alive connections (one request each)."""
import asyncio, ssl, sys, subprocess, os
PY = "/work/main/.venv/bin/python"
async def open_many(port, tls, n):
    ctx = None
    if tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
    conns = []
    sem = asyncio.Semaphore(100)
    async def one():
        async with sem:
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="default.test" if tls else None)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"); await r.readuntil(b"ok")
            conns.append(w)
    await asyncio.gather(*(one() for _ in range(n)))
    return conns
def run(loopname, tls, n, env=None):
    p = subprocess.Popen([PY, "mem_server.py", loopname, str(int(tls)), "18700", str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    assert p.stdout.readline().startswith("ready")
    async def go():
        warm = await open_many(18700, tls, 200)
        p.stdin.write("\n"); p.stdin.flush(); p.stdout.readline()
        conns = await open_many(18700, tls, n)
        p.stdin.write("\n"); p.stdin.flush(); line = p.stdout.readline()
        for w in warm + conns: w.close()
        return line
    import uvloop
    line = uvloop.run(go())
    p.stdin.write("\n"); p.stdin.flush(); p.wait()
    return line.strip()
if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    if len(sys.argv) > 2:
        print(run("asyncio", True, n, {"MAXSIZE": sys.argv[2]}), "(stdlib SSLProtocol.max_size =", sys.argv[2], ")"); sys.exit()
    for loopname in ("asyncio", "uvloop"):
        for tls in (False, True):
            print(run(loopname, tls, n), flush=True)
    print(run("uvloop", True, n, {"NO_TICKET": "1"}), "(OP_NO_TICKET)")
