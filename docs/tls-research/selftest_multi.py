import ssl, os, sys
sys.path.insert(0, "/tmp/tlsexp")
from selftest import connect, C
from ticketkeys_multi import TicketKeyRing
k1, k2, k3 = (os.urandom(80) for _ in range(3))
for ver in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
    def srv(ring):
        s = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); s.load_cert_chain(C + "default.chain.pem", C + "default.key"); ring.attach(s); return s
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE; c.maximum_version = ver
    ringA = TicketKeyRing([k1]); ringB = TicketKeyRing([k2, k1])     # B already rotated: k2 current, k1 accepted
    ringC = TicketKeyRing([k3])
    A, B, Cc = srv(ringA), srv(ringB), srv(ringC)
    first = connect(A, c)
    onB = connect(B, c, first.session)
    onC = connect(Cc, c, first.session)
    again = connect(B, c, onB.session)        # ticket renewed by B under k2: still resumes on B
    print(ver.name, "A->B (old key accepted):", onB.session_reused, "| A->C (unknown key):", onC.session_reused,
          "| renewed ticket on B:", again.session_reused, "| calls A", ringA.calls, "B", ringB.calls, "C", ringC.calls)
