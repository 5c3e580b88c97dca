import asyncio, subprocess, time, sys, uvloop
sys.path.insert(0, "/tmp/tlsexp"); from mem_client import open_many
def rss(pid): return int([l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")][0].split()[1])
hp = subprocess.Popen(["haproxy", "-f", "haproxy.cfg", "-db"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); time.sleep(1)
async def go():
    out = []
    for tls, port in ((False, 18580), (True, 18543)):
        warm = await open_many(port, tls, 200); await asyncio.sleep(0.5); r0 = rss(hp.pid)
        conns = await open_many(port, tls, 2000); await asyncio.sleep(1); r1 = rss(hp.pid)
        out.append(f"haproxy tls={int(tls)} conns=2000 rss_delta={(r1-r0)/1024:.1f} MiB per_conn={(r1-r0)/2000:.1f} KiB")
        for w in warm + conns: w.close()
        await asyncio.sleep(0.5)
    return out
try:
    print("\n".join(uvloop.run(go())))
finally:
    hp.terminate(); hp.wait()
