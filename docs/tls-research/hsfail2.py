"""Exp 1d: handshake outcome by reason with create_server(ssl=ctx) and ctx.sslobject_class (public API)."""
import asyncio, ssl, socket, sys, collections, gc
C = "/tmp/tlsexp/certs/"
outcomes = collections.Counter()

class CountingSSLObject(ssl.SSLObject):
    """Made by ctx.wrap_bio() for every connection, in stdlib sslproto and uvloop alike."""
    _hs_state = "new"          # class attrs: no per-instance cost until set
    sni = None
    def do_handshake(self):
        if self._hs_state == "new": self._hs_state = "started"
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as e:
            self._hs_state = "failed"; outcomes["fail:" + (e.reason or type(e).__name__).lower()] += 1
            raise
        except OSError as e:
            self._hs_state = "failed"; outcomes["fail:" + type(e).__name__] += 1
            raise
        self._hs_state = "done"; outcomes["ok:" + str(self.context.cert_name)] += 1
    def __del__(self):
        if self._hs_state == "started": outcomes["fail:aborted"] += 1    # reset/EOF/timeout mid-handshake
        elif self._hs_state == "new": outcomes["fail:no_client_hello"] += 1

def mk(name):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(C + name + ".chain.pem", C + name + ".key"); ctx.cert_name = name
    ctx.sslobject_class = CountingSSLObject
    return ctx
ctx = mk("default"); other = mk("other")
def cb(so, name, c):
    so.sni = name
    if name == "a.other.test": so.context = other
ctx.sni_callback = cb

class App(asyncio.Protocol):
    def connection_made(self, t): t.write(b"hi"); t.close()

async def clients(port):
    async def one(kind):
        try:
            if kind == "plain-http":
                r, w = await asyncio.open_connection("127.0.0.1", port); w.write(b"GET / HTTP/1.1\r\n\r\n"); await r.read(); w.close()
            elif kind == "tls1.1":
                c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname=False; c.verify_mode=ssl.CERT_NONE
                c.minimum_version = c.maximum_version = ssl.TLSVersion.TLSv1_1; c.set_ciphers("ALL:@SECLEVEL=0")
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=c); await r.read(); w.close()
            elif kind == "tls1.2-no-shared-cipher":
                c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname=False; c.verify_mode=ssl.CERT_NONE
                c.maximum_version = ssl.TLSVersion.TLSv1_2; c.set_ciphers("AES128-SHA")
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=c); await r.read(); w.close()
            elif kind == "tls1.2-untrusted":
                c = ssl.create_default_context(); c.maximum_version = ssl.TLSVersion.TLSv1_2
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=c, server_hostname="default.test"); await r.read()
            elif kind == "tls1.3-untrusted":
                c = ssl.create_default_context()
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=c, server_hostname="default.test"); await r.read()
            elif kind == "idle":
                r, w = await asyncio.open_connection("127.0.0.1", port); await asyncio.sleep(1.3); w.close()
            elif kind == "partial-hello-reset":
                s = socket.create_connection(("127.0.0.1", port)); s.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"); await asyncio.sleep(0.1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0"); s.close()
            elif kind == "connect-close":
                s = socket.create_connection(("127.0.0.1", port)); s.close()
            elif kind.startswith("ok"):
                c = ssl.create_default_context(cafile=C+"ca.pem")
                host = "a.other.test" if kind == "ok-other" else "default.test"
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=c, server_hostname=host); await r.read(); w.close()
        except Exception as e:
            return f"{kind}: client {type(e).__name__}"
        return f"{kind}: client ok"
    res = [await one(k) for k in ("plain-http", "tls1.1", "tls1.2-no-shared-cipher", "tls1.2-untrusted", "tls1.3-untrusted",
                                  "idle", "partial-hello-reset", "connect-close", "ok", "ok-other")]
    await asyncio.sleep(0.3); gc.collect()
    return res

async def main():
    loop = asyncio.get_running_loop()
    outcomes.clear()
    srv = await loop.create_server(App, "127.0.0.1", 0, ssl=ctx, ssl_handshake_timeout=1.0)
    res = await clients(srv.sockets[0].getsockname()[1]); srv.close()
    print("  clients:", "; ".join(res)); print("  server outcomes:", dict(outcomes))
import uvloop, warnings; warnings.simplefilter("ignore")
print("== asyncio"); asyncio.run(main())
print("== uvloop"); uvloop.run(main())
