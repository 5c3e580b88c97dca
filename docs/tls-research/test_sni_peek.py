import ssl, os, random, subprocess, socket, threading
from hypothesis import given, settings, strategies as st
from sni_peek import peek_sni, NEED_MORE, NOT_TLS, MAX_HELLO

def python_hello(host, maxv=None):
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE
    if maxv: c.maximum_version = maxv
    c.set_alpn_protocols(["h2", "http/1.1"])
    i, o = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = c.wrap_bio(i, o, server_hostname=host)
    try: obj.do_handshake()
    except ssl.SSLWantReadError: pass
    return o.read()

def split_records(hello, size):
    """Re-frame one ClientHello record into several records of <= size bytes each."""
    body = hello[5:]
    out = b""
    for k in range(0, len(body), size):
        chunk = body[k:k + size]
        out += bytes([22, 3, 1]) + len(chunk).to_bytes(2, "big") + chunk
    return out

def test_basic():
    h = python_hello("Www.Example.TEST.")
    assert peek_sni(h) == ("sni", "www.example.test")
    assert peek_sni(python_hello("a.b", ssl.TLSVersion.TLSv1_2)) == ("sni", "a.b")
    assert peek_sni(python_hello(None)) == ("sni", None)
    # IP literal: Python sends no SNI for IPs
    assert peek_sni(python_hello("127.0.0.1")) == ("sni", None)

def test_every_prefix_need_more():
    h = python_hello("x.example.test")
    for n in range(len(h)):
        assert peek_sni(h[:n]) == NEED_MORE, n
    assert peek_sni(h + b"\x17\x03\x03\x00\x10" + b"x" * 16) == ("sni", "x.example.test")  # early data after: fine

def test_split_records():
    h = python_hello("x.example.test")
    for size in (1, 2, 3, 7, 100, 511):
        f = split_records(h, size)
        assert peek_sni(f) == ("sni", "x.example.test"), size
        for n in range(0, len(f), 13):
            assert peek_sni(f[:n]) == NEED_MORE

def test_not_tls():
    assert peek_sni(b"GET / HTTP/1.1\r\n") == NOT_TLS
    assert peek_sni(b"\x80\x2e\x01\x03\x01") == NOT_TLS            # SSLv2 hello
    assert peek_sni(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") == NOT_TLS   # ServerHello type
    big = bytes([22, 3, 1, 0x40, 0x00, 1]) + (MAX_HELLO + 1).to_bytes(3, "big")
    assert peek_sni(big) == NOT_TLS                                 # over size limit: decided early
    assert peek_sni(b"\x16\x03\x01\x00\x00") == NOT_TLS             # empty record

def test_grease_and_ech_like_extensions():
    # Build a hello by hand: GREASE ext, fake ECH ext (0xfe0d), then SNI.
    def ext(t, d): return t.to_bytes(2, "big") + len(d).to_bytes(2, "big") + d
    sni = b"\x00" + (9).to_bytes(2, "big") + b"a.example"
    sni_ext = ext(0, len(sni).to_bytes(2, "big") + sni)
    exts = ext(0x0a0a, b"") + ext(0xfe0d, os.urandom(200)) + sni_ext
    body = b"\x03\x03" + os.urandom(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00" + len(exts).to_bytes(2, "big") + exts
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    rec = b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs
    assert peek_sni(rec) == ("sni", "a.example")
    bad = rec.replace(b"a.example", b"a.ex\xffmple")
    assert peek_sni(bad) == NOT_TLS

@settings(max_examples=3000, deadline=None)
@given(st.data())
def test_fuzz_never_raises(data):
    h = bytearray(python_hello("fuzz.example.test"))
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(0, len(h) - 1)); h[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(h)))
    r = peek_sni(bytes(h[:cut]))
    assert r in (NEED_MORE, NOT_TLS) or (isinstance(r, tuple) and r[0] == "sni")

@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_random(b):
    peek_sni(b"\x16\x03\x01" + b)

def _capture(cmd_for_port):
    """Real-tool ClientHello: listen, let the tool connect, read what it sends first."""
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1); port = ls.getsockname()[1]
    p = subprocess.Popen(cmd_for_port(port), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c, _ = ls.accept(); c.settimeout(3); buf = b""
    try:
        while peek_sni(buf) == NEED_MORE:
            d = c.recv(1)            # one byte at a time: worst-case segmentation
            if not d: break
            buf += d
    finally:
        c.close(); ls.close(); p.kill(); p.wait()
    return peek_sni(buf), len(buf)

def test_real_clients():
    r1 = _capture(lambda p: ["openssl", "s_client", "-connect", f"127.0.0.1:{p}", "-servername", "s-client.example.test"])
    r2 = _capture(lambda p: ["curl", "-sk", "--max-time", "2", "--resolve", f"curl.example.test:{p}:127.0.0.1", f"https://curl.example.test:{p}/"])
    r3 = _capture(lambda p: ["openssl", "s_client", "-connect", f"127.0.0.1:{p}", "-noservername"])
    print(r1, r2, r3)
    assert r1[0] == ("sni", "s-client.example.test") and r2[0] == ("sni", "curl.example.test") and r3[0] == ("sni", None)
