"""Sequential TLS client: full or resumed handshakes, one HTTP request each (Connection: close). argv: port tls(12|13) mode(new|reuse) seconds"""
import socket, ssl, sys, time
port, ver, mode, secs = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
c.maximum_version = c.minimum_version = ssl.TLSVersion.TLSv1_3 if ver == "13" else ssl.TLSVersion.TLSv1_2
sess = None; n = reused = 0; end = time.monotonic() + secs
while time.monotonic() < end:
    s0 = socket.create_connection(("127.0.0.1", port)); s0.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with s0 as s, c.wrap_socket(s, server_hostname="default.test", session=sess) as t:
        t.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while t.recv(4096): pass
        n += 1; reused += t.session_reused
        if mode == "reuse": sess = t.session
print(n, reused)
