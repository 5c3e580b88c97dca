"""lb.tls.sni_peek: the server name of a ClientHello, read without terminating TLS.

Real hellos: a corpus captured from openssl s_client, curl and headless Chromium
(tests/corpus/client_hello/*.hex), hellos of Python's own ssl module, and hellos captured live
from the openssl and curl on this machine. Then every prefix, re-framing into small records,
any split into reads, malformed and hostile input, and fuzzing (it never raises).
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.tls.sni_peek import (
    MAX_HELLO,
    NEED_MORE,
    NOT_TLS,
    Hello,
    PeekResult,
    SniPeeker,
    Status,
    peek_sni,
)

CORPUS = Path(__file__).parent / "corpus" / "client_hello"
EXPECTED = {
    "openssl": "s-client.example.test",
    "openssl_noservername": None,
    "curl": "curl.example.test",
    "chromium": "chrome.example.test",
}


def corpus(name: str) -> bytes:
    lines = (CORPUS / f"{name}.hex").read_text().splitlines()
    return bytes.fromhex("".join(x for x in lines if not x.startswith("#")))


def python_hello(host: str | None, maxv: ssl.TLSVersion | None = None) -> bytes:
    """The first flight of Python's ssl module (OpenSSL) for ``host``."""
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname = False
    c.verify_mode = ssl.CERT_NONE
    if maxv is not None:
        c.maximum_version = maxv
    c.set_alpn_protocols(["h2", "http/1.1"])
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = c.wrap_bio(inc, out, server_hostname=host)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def reframe(hello: bytes, size: int) -> bytes:
    """The handshake message of a one-record hello re-framed into records of ``size`` bytes."""
    assert hello[0] == 22 and int.from_bytes(hello[3:5], "big") == len(hello) - 5
    return records(hello[5:], size)


def records(body: bytes, size: int) -> bytes:
    """Handshake bytes ``body`` framed into records of ``size`` bytes."""
    out = bytearray()
    for k in range(0, len(body), size):
        chunk = body[k:k + size]
        out += bytes([22, 3, 1]) + len(chunk).to_bytes(2, "big") + chunk
    return bytes(out)


def record(hs_body: bytes, msg_type: int = 1) -> bytes:
    hs = bytes([msg_type]) + len(hs_body).to_bytes(3, "big") + hs_body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def ext(etype: int, data: bytes) -> bytes:
    return etype.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


def sni_ext(*entries: tuple[int, bytes]) -> bytes:
    lst = b"".join(bytes([t]) + len(n).to_bytes(2, "big") + n for t, n in entries)
    return ext(0, len(lst).to_bytes(2, "big") + lst)


def hand_hello(exts: bytes, *, trailing: bytes = b"", sid: bytes = b"") -> bytes:
    """A ClientHello built field by field around the extension block ``exts``."""
    body = (b"\x03\x03" + bytes(range(32)) + bytes([len(sid)]) + sid
            + b"\x00\x04\x13\x01\x13\x02" + b"\x01\x00"
            + len(exts).to_bytes(2, "big") + exts + trailing)
    return record(body)


def chunked_feed(data: bytes, cuts: list[int]) -> PeekResult:
    peeker = SniPeeker()
    prev = 0
    result: PeekResult = NEED_MORE
    for c in [*sorted(cuts), len(data)]:
        result = peeker.feed(data[prev:c])
        prev = c
    return result


# -- real hellos ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_hellos(name: str) -> None:
    h = corpus(name)
    assert peek_sni(h) == Hello(EXPECTED[name])
    for n in range(len(h)):
        assert peek_sni(h[:n]) is NEED_MORE, n
    # One byte per read, as a slow network would deliver it.
    peeker = SniPeeker()
    for i in range(len(h) - 1):
        assert peeker.feed(h[i:i + 1]) is NEED_MORE
    assert peeker.feed(h[-1:]) == Hello(EXPECTED[name])
    # What follows the hello in the same read (early data, the rest of the flight) is not read.
    assert peek_sni(h + b"\x17\x03\x03\x00\x10" + b"x" * 16) == Hello(EXPECTED[name])
    assert peek_sni(h + b"garbage") == Hello(EXPECTED[name])


def test_chromium_hello_is_longer_than_one_segment() -> None:
    h = corpus("chromium")
    assert len(h) > 1460  # two TCP segments on a real network (MSS 1460)
    assert peek_sni(h[:1460]) is NEED_MORE
    assert chunked_feed(h, [1460]) == Hello("chrome.example.test")


@pytest.mark.parametrize("size", [1, 2, 3, 7, 100, 511, 4096])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_hello_reframed_into_small_records(name: str, size: int) -> None:
    f = reframe(corpus(name), size)
    assert peek_sni(f) == Hello(EXPECTED[name])
    for n in range(0, len(f), 13):
        assert peek_sni(f[:n]) is NEED_MORE


def test_python_ssl_hellos() -> None:
    assert peek_sni(python_hello("Www.Example.TEST.")) == Hello("www.example.test")
    assert peek_sni(python_hello("a.b", ssl.TLSVersion.TLSv1_2)) == Hello("a.b")
    assert peek_sni(python_hello(None)) == Hello(None)
    assert peek_sni(python_hello("127.0.0.1")) == Hello(None)  # no SNI for an IP address


def _capture(cmd: Callable[[int], list[str]]) -> bytes:
    """What a real client sends first, read from a 127.0.0.1 socket one byte per recv."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    ls.settimeout(10)
    port = ls.getsockname()[1]
    p = subprocess.Popen(cmd(port), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    buf = b""
    try:
        c, _ = ls.accept()
        with c:
            c.settimeout(5)
            while peek_sni(buf) is NEED_MORE:
                d = c.recv(1)
                if not d:
                    break
                buf += d
    finally:
        ls.close()
        p.kill()
        p.wait()
    return buf


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI")
def test_live_openssl_s_client() -> None:
    h = _capture(lambda p: ["openssl", "s_client", "-connect", f"127.0.0.1:{p}",
                            "-servername", "live.example.test"])
    assert peek_sni(h) == Hello("live.example.test")
    assert all(peek_sni(h[:n]) is NEED_MORE for n in range(len(h)))
    h = _capture(lambda p: ["openssl", "s_client", "-connect", f"127.0.0.1:{p}",
                            "-noservername"])
    assert peek_sni(h) == Hello(None)


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_live_curl() -> None:
    h = _capture(lambda p: ["curl", "-sk", "--max-time", "5", "--resolve",
                            f"Curl.Example.Test:{p}:127.0.0.1", f"https://Curl.Example.Test:{p}/"])
    assert peek_sni(h) == Hello("curl.example.test")


# -- not TLS, malformed, hostile -----------------------------------------------------------------


def test_not_tls_decided_at_the_first_wrong_byte() -> None:
    assert peek_sni(b"") is NEED_MORE
    assert peek_sni(b"G") is NOT_TLS
    assert peek_sni(b"GET / HTTP/1.1\r\n") is NOT_TLS
    assert peek_sni(b"SSH-2.0-OpenSSH_9.2\r\n") is NOT_TLS
    assert peek_sni(b"\x80\x2e\x01\x03\x01") is NOT_TLS  # SSLv2-compatible hello
    assert peek_sni(b"\x16\x02") is NOT_TLS  # major version 2
    assert peek_sni(b"\x16\x03\x05") is NOT_TLS  # minor version past 1.3
    assert peek_sni(b"\x15\x03\x03\x00\x02\x02\x28") is NOT_TLS  # an alert record
    assert peek_sni(b"\x16\x03\x01\x00\x00") is NOT_TLS  # an empty record
    assert peek_sni(b"\x16\x03\x01\x48\x01") is NOT_TLS  # record over MAX_RECORD
    assert peek_sni(b"\x16\x03\x01\x00\x05\x02") is NOT_TLS  # ServerHello, at its type byte


def test_oversized_hello_refused_as_soon_as_its_length_is_known() -> None:
    head = b"\x16\x03\x01\x40\x00\x01" + (MAX_HELLO + 1).to_bytes(3, "big")
    assert peek_sni(head) is NOT_TLS
    ok = b"\x16\x03\x01\x40\x00\x01" + MAX_HELLO.to_bytes(3, "big")
    assert peek_sni(ok) is NEED_MORE
    # Split into 1-byte records, the length is still known after 4 of them.
    assert peek_sni(records(head[5:], 1)) is NOT_TLS


def test_non_handshake_record_inside_the_hello() -> None:
    h = reframe(corpus("curl"), 100)
    ccs = b"\x14\x03\x03\x00\x01\x01"
    assert peek_sni(h[:105] + ccs + h[105:]) is NOT_TLS


def test_grease_and_ech_extensions_are_skipped() -> None:
    exts = ext(0x0A0A, b"") + ext(0xFE0D, os.urandom(200)) + sni_ext((0, b"a.example"))
    h = hand_hello(exts)
    assert peek_sni(h) == Hello("a.example")
    assert peek_sni(hand_hello(exts, sid=os.urandom(32))) == Hello("a.example")


@pytest.mark.parametrize("name", [b"a.ex\xffmple", b"a..example", b".example", b"a b.example",
                                  b"-" * 0 + b"x" * 64 + b".example", b"a." * 127 + b"ab",
                                  b"a.example/", b"\x00"])
def test_names_that_are_not_dns_names(name: bytes) -> None:
    assert peek_sni(hand_hello(sni_ext((0, name)))) is NOT_TLS


@pytest.mark.parametrize(("raw", "name"), [
    (b"A.Example.", "a.example"), (b"_acme.x-y.example", "_acme.x-y.example"),
    (b"x" * 63 + b".example", "x" * 63 + ".example"), (b"a." * 126 + b"a", "a." * 126 + "a"),
    (b"localhost", "localhost"), (b"10.0.0.1", "10.0.0.1"),
])
def test_names_accepted(raw: bytes, name: str) -> None:
    assert peek_sni(hand_hello(sni_ext((0, raw)))) == Hello(name)


def test_malformed_hellos() -> None:
    good = sni_ext((0, b"a.example"))
    assert peek_sni(hand_hello(good)) == Hello("a.example")
    assert peek_sni(hand_hello(good + good)) is NOT_TLS  # duplicate extension
    assert peek_sni(hand_hello(good, trailing=b"\x00")) is NOT_TLS  # bytes after extensions
    assert peek_sni(hand_hello(good, sid=bytes(33))) is NOT_TLS  # session id over 32
    assert peek_sni(hand_hello(ext(0, b"\x00\x00"))) is NOT_TLS  # empty server name list
    assert peek_sni(hand_hello(ext(0, b"\x00\x05\x00\x00\x01a"))) is NOT_TLS  # list too long
    assert peek_sni(hand_hello(sni_ext((0, b"")))) is NOT_TLS  # empty name
    assert peek_sni(hand_hello(ext(0x0A0A, b"xy")[:-1])) is NOT_TLS  # extension cut short
    # A name type other than host_name is skipped; the host_name after it counts.
    assert peek_sni(hand_hello(sni_ext((7, b"zz"), (0, b"b.example")))) == Hello("b.example")
    assert peek_sni(hand_hello(sni_ext((7, b"zz")))) == Hello(None)
    assert peek_sni(hand_hello(b"")) == Hello(None)  # an empty extension block
    # No extensions at all (an SSL 3.0-era hello).
    assert peek_sni(record(b"\x03\x00" + bytes(32) + b"\x00\x00\x02\x00\x2f\x01\x00")) \
        == Hello(None)
    assert peek_sni(record(b"\x03\x03" + bytes(32) + b"\x00\x00\x00\x01\x00")) is NOT_TLS
    assert peek_sni(record(b"\x03\x03" + bytes(32) + b"\x00\x00\x03\x00\x2f\x00\x01\x00")) \
        is NOT_TLS  # odd cipher suite length
    assert peek_sni(record(b"\x03\x03" + bytes(32) + b"\x00\x00\x02\x00\x2f\x00")) is NOT_TLS
    assert peek_sni(record(b"\x03\x03" + bytes(10))) is NOT_TLS


def test_answer_stays_once_given() -> None:
    peeker = SniPeeker()
    assert peeker.feed(b"G") is NOT_TLS
    assert peeker.feed(corpus("curl")) is NOT_TLS
    peeker = SniPeeker()
    assert peeker.feed(corpus("curl")) == Hello("curl.example.test")
    assert peeker.feed(b"anything") == Hello("curl.example.test")
    assert peeker.result == Hello("curl.example.test")


def test_buffered_handshake_bytes_are_bounded() -> None:
    # A hello declaring MAX_HELLO bytes in huge records: nothing past the hello is kept.
    body = bytes(MAX_HELLO)
    hs = b"\x01" + MAX_HELLO.to_bytes(3, "big") + body + bytes(2000)
    data = b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs
    peeker = SniPeeker()
    assert peeker.feed(data) is NOT_TLS  # all zeros: not a valid hello, but parsed in bounds
    assert len(peeker._hs) == 4 + MAX_HELLO


# -- fuzzing -------------------------------------------------------------------------------------

VALID = (Status.NEED_MORE, Status.NOT_TLS)


def check(r: PeekResult) -> None:
    assert r in VALID or (isinstance(r, Hello) and (r.server_name is None
                                                     or isinstance(r.server_name, str)))


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(sorted(EXPECTED)), st.lists(st.tuples(st.integers(0, 1 << 16),
                                                             st.integers(0, 255)), max_size=6),
       st.integers(0, 4000), st.lists(st.integers(0, 4000), max_size=5),
       st.sampled_from([0, 1, 5, 64]))
def test_fuzz_mutated_hellos(name: str, edits: list[tuple[int, int]], cut: int,
                             cuts: list[int], size: int) -> None:
    h = bytearray(reframe(corpus(name), size) if size else corpus(name))
    for i, v in edits:
        h[i % len(h)] = v
    data = bytes(h[:cut])
    whole = peek_sni(data)
    check(whole)
    # However the bytes are split into reads, the answer is the same.
    assert chunked_feed(data, [c % (len(data) + 1) for c in cuts]) == whole
    # A final answer does not change with more bytes.
    if whole is not NEED_MORE:
        assert peek_sni(bytes(h)) == whole


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=400), st.sampled_from([b"", b"\x16", b"\x16\x03\x01",
                                                 b"\x16\x03\x03\x01\x00\x01\x00\x00\xfc"]))
def test_fuzz_random_bytes(tail: bytes, head: bytes) -> None:
    data = head + tail
    r = peek_sni(data)
    check(r)
    assert chunked_feed(data, [len(data) // 3, len(data) // 2]) == r


def test_seeded_mutation_loop() -> None:
    """Many more mutations than hypothesis runs, cheaply: never an exception."""
    rnd = random.Random(15)
    hellos = [corpus(n) for n in sorted(EXPECTED)] + [reframe(corpus("curl"), 7)]
    for _ in range(20000):
        h = bytearray(rnd.choice(hellos))
        for _ in range(rnd.randint(1, 8)):
            op = rnd.random()
            i = rnd.randrange(len(h))
            if op < 0.6:
                h[i] = rnd.randrange(256)
            elif op < 0.8:
                del h[i:i + rnd.randint(1, 8)]
            else:
                h[i:i] = rnd.randbytes(rnd.randint(1, 8))
        check(peek_sni(bytes(h[:rnd.randint(0, len(h))])))
