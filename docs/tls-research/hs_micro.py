"""In-memory handshake micro-benchmark (client+server in one process, no sockets): overhead of ticket key
variants and of the counting SSLObject subclass. Reports min-of-5 CPU time per handshake (client+server)."""
import ssl, os, sys, time
sys.path.insert(0, "/tmp/tlsexp")
from selftest import pump, C
import ticketkeys
from ticketkeys_multi import TicketKeyRing

class CountingSSLObject(ssl.SSLObject):
    _hs = 0
    def do_handshake(self):
        try: super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError): raise
        except ssl.SSLError: self._hs = 2; raise
        self._hs = 1

def server(variant):
    s = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); s.load_cert_chain(C + "default.chain.pem", C + "default.key")
    s.set_alpn_protocols(["http/1.1"])
    if variant == "key": ticketkeys.set_ticket_key(s, os.urandom(80))
    if variant == "ring": s._ring = TicketKeyRing([os.urandom(80), os.urandom(80)]); s._ring.attach(s)
    if variant == "no_ticket": s.options |= ssl.OP_NO_TICKET
    if variant == "one_ticket": s.num_tickets = 1
    if variant == "counting+sni":
        s.sslobject_class = CountingSSLObject
        other = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); other.load_cert_chain(C + "default.chain.pem", C + "default.key")
        other.set_alpn_protocols(["http/1.1"])
        def cb(so, name, c): so.sni = name; so.context = other
        s.sni_callback = cb
    return s

def one(s, c, session=None):
    cin, cout, sin, sout = (ssl.MemoryBIO() for _ in range(4))
    cli = c.wrap_bio(cin, cout, server_hostname="default.test", session=session)
    srv = s.wrap_bio(sin, sout, server_side=True)
    pump(cli, srv, cin, cout, sin, sout)
    srv.write(b"x"); cin.write(sout.read()); cli.read(1)
    return cli

for ver in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
    for variant in ("base", "key", "ring", "no_ticket", "one_ticket", "counting+sni"):
        s = server(variant)
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE; c.maximum_version = ver
        best = best_r = 1e9
        for rep in range(5):
            t0 = time.process_time()
            for _ in range(150): one(s, c)
            best = min(best, (time.process_time() - t0) / 150)
            if variant != "no_ticket":
                sess = one(s, c).session
                t0 = time.process_time()
                for _ in range(150):
                    r = one(s, c, sess)
                best_r = min(best_r, (time.process_time() - t0) / 150)
        res = f"resumed {best_r*1e6:6.0f} us (reused={r.session_reused})" if variant != "no_ticket" else ""
        print(f"{ver.name} {variant:13} full {best*1e6:6.0f} us  {res}")
