"""In-memory self-test (no sockets): a ticket from server context A resumes on a separate server context B
given the same key -- for TLS 1.3 and 1.2. Meant to run in a throwaway subprocess at startup, so a crash
(wrong struct layout) disables the feature instead of killing the daemon."""
import ssl, os, sys
sys.path.insert(0, "/tmp/tlsexp")
import ticketkeys
C = "/tmp/tlsexp/certs/"

def pump(cli, srv, cin, cout, sin, sout):
    """Drive a client and server SSLObject to completion of the handshake."""
    for _ in range(20):
        done = 0
        for obj in (cli, srv):
            try: obj.do_handshake(); done += 1
            except ssl.SSLWantReadError: pass
        if cout.pending: sin.write(cout.read())
        if sout.pending: cin.write(sout.read())
        if done == 2: return
    raise RuntimeError("handshake did not finish")

def connect(server_ctx, client_ctx, session=None):
    cin, cout, sin, sout = (ssl.MemoryBIO() for _ in range(4))
    cli = client_ctx.wrap_bio(cin, cout, server_hostname="default.test", session=session)
    srv = server_ctx.wrap_bio(sin, sout, server_side=True)
    pump(cli, srv, cin, cout, sin, sout)
    srv.write(b"x")                      # TLS 1.3 tickets are sent after the handshake; read them
    cin.write(sout.read())
    assert cli.read(1) == b"x"
    return cli

def selftest(cert, key) -> dict:
    k = os.urandom(80)
    out = {}
    for ver in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        a = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); a.load_cert_chain(cert, key)
        b = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); b.load_cert_chain(cert, key)
        ticketkeys.set_ticket_key(a, k); ticketkeys.set_ticket_key(b, k)
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
        c.maximum_version = ver
        first = connect(a, c)
        second = connect(b, c, first.session)
        out[ver.name] = (second.session_reused, first.session.timeout)
    return out

if __name__ == "__main__":
    r = selftest(C + "default.chain.pem", C + "default.key")
    print(r)
    sys.exit(0 if all(v[0] for v in r.values()) else 1)
