"""The PROXY protocol codec (lb.data.proxyproto): the corpus of good and hostile headers
(tests/corpus/proxyproto, made by its make_corpus.py), every split of every item, the
encoders (families, IPv4-mapped, mixed, unknown), a round trip for any addresses, random
bytes, and the Gate an engine runs per connection. Pure: no sockets."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.data.proxyproto import (
    DONE,
    INVALID,
    MISSING,
    NEED_MORE,
    UNTRUSTED,
    V1_MAX_BYTES,
    V2_MAX_BYTES,
    V2_SIGNATURE,
    Gate,
    Header,
    HeaderReader,
    ProxyProtocolError,
    crc32c,
    encode_v1,
    encode_v2,
    looks_like_header,
)

CORPUS = Path(__file__).resolve().parent / "corpus" / "proxyproto"
GOOD = sorted(CORPUS.glob("good/*.bin"))
BAD = sorted(CORPUS.glob("bad/*.bin"))

Outcome = tuple[str, Any]
"""("done", (version, source, dest, rest)) or ("refused", reason)."""


def outcome(chunks: list[bytes]) -> Outcome:
    """Feed ``chunks`` in order as a connection delivers them, then end the connection."""
    r = HeaderReader()
    for i, chunk in enumerate(chunks):
        try:
            res = r.feed(chunk)
        except ProxyProtocolError as exc:
            return ("refused", exc.reason)
        if isinstance(res, Header):
            rest = res.rest + b"".join(chunks[i + 1:])
            return ("done", (res.version, res.source, res.dest, rest))
        assert res is NEED_MORE
    return ("refused", r.cut_reason())


def _load_corpus_module() -> Any:
    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_corpus_on_disk_is_what_make_corpus_writes() -> None:
    made = _load_corpus_module().build()
    on_disk = {str(p.relative_to(CORPUS)): p.read_bytes()
               for p in CORPUS.glob("*/*") if p.is_file()}
    assert on_disk == made
    assert len(GOOD) >= 20 and len(BAD) >= 70


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_good_header_is_read_the_same_at_every_split(path: Path) -> None:
    data = path.read_bytes()
    expect = json.loads(path.with_suffix(".json").read_text())
    want: Outcome = ("done", (
        expect["version"],
        tuple(expect["source"]) if expect["source"] else None,
        tuple(expect["dest"]) if expect["dest"] else None,
        bytes.fromhex(expect["rest"]),
    ))
    assert outcome([data]) == want
    assert outcome([data[i:i + 1] for i in range(len(data))]) == want
    for cut in range(len(data) + 1):
        assert outcome([data[:cut], data[cut:]]) == want, cut


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_hostile_header_is_refused_for_its_reason_at_every_split(path: Path) -> None:
    data = path.read_bytes()
    want = ("refused", "proxy_protocol_" + path.stem.rsplit(".", 1)[1])
    assert outcome([data]) == want
    assert outcome([data[i:i + 1] for i in range(len(data))]) == want
    for cut in range(len(data) + 1):
        assert outcome([data[:cut], data[cut:]]) == want, cut


def test_oversize_v2_length_is_refused_as_soon_as_it_is_read() -> None:
    head = V2_SIGNATURE + struct.pack(">BBH", 0x21, 0x11, V2_MAX_BYTES)
    with pytest.raises(ProxyProtocolError, match=INVALID):
        HeaderReader().feed(head)  # the 16 fixed bytes only: no waiting for 4 KiB
    r = HeaderReader()
    assert r.feed(V2_SIGNATURE) is NEED_MORE
    with pytest.raises(ProxyProtocolError, match=INVALID):
        r.feed(b"\x11")  # version 1 in a v2 header: known from the 13th byte


def test_v1_is_refused_at_107_bytes_without_crlf_not_later() -> None:
    r = HeaderReader()
    assert r.feed(b"PROXY UNKNOWN " + b"x" * (V1_MAX_BYTES - 15)) is NEED_MORE
    with pytest.raises(ProxyProtocolError, match=INVALID):
        r.feed(b"x")
    with pytest.raises(ProxyProtocolError, match=INVALID):
        r.feed(b"\r\n")  # an answer is final


def test_a_reader_holds_no_more_than_its_bound_and_then_is_done() -> None:
    r = HeaderReader()
    res = r.feed(encode_v1(("1.2.3.4", 1), ("5.6.7.8", 2)) + b"x" * 100_000)
    assert isinstance(res, Header) and len(res.rest) == 100_000
    with pytest.raises(RuntimeError):
        r.feed(b"more")


def test_crc32c_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # RFC 3720 B.4 / the usual check value


# -- encoding ---------------------------------------------------------------------------------


def test_encode_v1_families() -> None:
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n")
    assert encode_v1(("2001:db8::1", 1), ("2001:db8:0::2", 65535)) == (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n")
    # IPv4-mapped (a dual-stack listener): IPv4
    assert encode_v1(("::ffff:10.0.0.1", 5), ("::ffff:10.0.0.2", 6)) == (
        b"PROXY TCP4 10.0.0.1 10.0.0.2 5 6\r\n")
    # mixed: the IPv4 side mapped, in hex (the spec's v1 IPv6 is hex groups)
    assert encode_v1(("10.0.0.1", 5), ("2001:db8::2", 6)) == (
        b"PROXY TCP6 ::ffff:a00:1 2001:db8::2 5 6\r\n")
    assert encode_v1(("2001:db8::1", 5), ("::ffff:10.0.0.2", 6)) == (
        b"PROXY TCP6 2001:db8::1 ::ffff:a00:2 5 6\r\n")
    # zone index dropped
    assert encode_v1(("fe80::1%eth0", 5), ("fe80::2%eth0", 6)) == (
        b"PROXY TCP6 fe80::1 fe80::2 5 6\r\n")
    # not an IP address: UNKNOWN
    assert encode_v1(None, ("1.2.3.4", 1)) == b"PROXY UNKNOWN\r\n"
    assert encode_v1(("/run/x.sock", 0), ("1.2.3.4", 1)) == b"PROXY UNKNOWN\r\n"
    with pytest.raises(ValueError):
        encode_v1(("1.2.3.4", 65536), ("1.2.3.4", 1))


def test_encode_v2_families() -> None:
    h = encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert h == (V2_SIGNATURE + b"\x21\x11\x00\x0c" + bytes([192, 168, 0, 1, 192, 168, 0, 11])
                 + struct.pack(">HH", 56324, 443))
    h6 = encode_v2(("2001:db8::1", 1), ("10.0.0.2", 2))
    assert h6[12:16] == b"\x21\x21\x00\x24" and len(h6) == 16 + 36
    assert h6[32:48] == ipaddress.IPv6Address("::ffff:10.0.0.2").packed
    assert encode_v2(("::ffff:1.2.3.4", 1), ("5.6.7.8", 2))[13] == 0x11
    # nothing to tell: LOCAL, UNSPEC, no address (what HAProxy sends then)
    assert encode_v2(None, None) == V2_SIGNATURE + b"\x20\x00\x00\x00"
    with pytest.raises(ValueError):
        encode_v2(("1.2.3.4", -1), ("1.2.3.4", 1))


_v4 = st.ip_addresses(v=4).map(str)
_v6 = st.ip_addresses(v=6).map(str)
_port = st.integers(0, 65535)


@settings(max_examples=300, deadline=None)
@given(src=st.one_of(_v4, _v6), sp=_port, dst=st.one_of(_v4, _v6), dp=_port,
       tail=st.binary(max_size=40), v=st.sampled_from([1, 2]))
def test_round_trip_any_addresses(src: str, sp: int, dst: str, dp: int, tail: bytes,
                                  v: int) -> None:
    data = (encode_v1 if v == 1 else encode_v2)((src, sp), (dst, dp)) + tail
    res = HeaderReader().feed(data)
    assert isinstance(res, Header) and res.version == v and res.rest == tail
    assert res.source is not None and res.dest is not None
    s, d = ipaddress.ip_address(res.source[0]), ipaddress.ip_address(res.dest[0])
    assert s.version == d.version

    def same(sent: str, read: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        a = ipaddress.ip_address(sent)
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
            a = a.ipv4_mapped
        if isinstance(read, ipaddress.IPv6Address) and read.ipv4_mapped is not None:
            return a == read.ipv4_mapped
        return a == read

    assert same(src, s) and same(dst, d)
    assert (res.source[1], res.dest[1]) == (sp, dp)
    # byte by byte: the same
    assert outcome([data[i:i + 1] for i in range(len(data))]) == outcome([data])


@settings(max_examples=500, deadline=None)
@given(data=st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: b"PROXY " + b),
    st.binary(max_size=200).map(lambda b: V2_SIGNATURE + b),
    st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 300),
              st.binary(max_size=300)).map(
        lambda t: V2_SIGNATURE + struct.pack(">BBH", *t[:3]) + t[3]),
))
def test_random_bytes_give_an_answer_never_a_crash(data: bytes) -> None:
    at_once = outcome([data])
    assert outcome([data[i:i + 1] for i in range(len(data))]) == at_once
    if at_once[0] == "refused":
        assert at_once[1] in (MISSING, INVALID)


# -- the untrusted path and the gate ----------------------------------------------------------


@pytest.mark.parametrize(("prefix", "want"), [
    (b"", None), (b"P", None), (b"PROXY", None), (b"PROXY ", True), (b"PROXY TCP4", True),
    (b"PO", False), (b"PROXYZ", False), (b"GET / HTTP/1.1", False), (b"\x16\x03\x01", False),
    (b"\r\n", None), (V2_SIGNATURE[:11], None), (V2_SIGNATURE, True),
    (V2_SIGNATURE + b"\x21", True), (b"\r\n\r\nGET", False), (b"proxy ", False),
])
def test_looks_like_header(prefix: bytes, want: bool | None) -> None:
    assert looks_like_header(prefix) is want


def test_gate_trusted_requires_and_reads_a_header() -> None:
    g = Gate(trusted=True)
    assert g.feed(b"PROXY TCP4 1.2.3.4 ").state is NEED_MORE and g.waiting
    res = g.feed(b"5.6.7.8 10 20\r\nhello")
    assert res == (DONE, ("1.2.3.4", 10), b"hello") and g.done and not g.waiting
    assert g.header is not None and g.header.dest == ("5.6.7.8", 20)
    assert g.cut() is None

    g = Gate(trusted=True)
    assert g.cut() == MISSING and g.waiting  # nothing came
    with pytest.raises(ProxyProtocolError, match=MISSING):
        Gate(trusted=True).feed(b"GET / HTTP/1.1\r\n")
    g = Gate(trusted=True)
    g.feed(b"PROXY TCP4")
    assert g.cut() == INVALID  # a header cut short
    res = Gate(trusted=True).feed(encode_v2(None, None) + b"x")
    assert res == (DONE, None, b"x")  # LOCAL: keep the real peer


def test_gate_untrusted_passes_clients_and_refuses_headers() -> None:
    g = Gate(trusted=False)
    assert g.cut() is None and not g.waiting  # nothing held: no PROXY matter
    assert g.feed(b"GET / HTTP/1.1\r\n") == (DONE, None, b"GET / HTTP/1.1\r\n")

    g = Gate(trusted=False)
    assert g.feed(b"PR").state is NEED_MORE and g.waiting
    assert g.cut() == UNTRUSTED  # ended (or timed out) on a signature's beginning
    assert g.feed(b"IVATE") == (DONE, None, b"PRIVATE")  # held bytes pass unchanged

    for header in (encode_v1(("6.6.6.6", 1), ("1.1.1.1", 2)), encode_v2(("6.6.6.6", 1),
                                                                        ("1.1.1.1", 2))):
        g = Gate(trusted=False)
        with pytest.raises(ProxyProtocolError, match=UNTRUSTED):
            for i in range(len(header)):
                g.feed(header[i:i + 1])
        with pytest.raises(ProxyProtocolError, match=UNTRUSTED):
            Gate(trusted=False).feed(header[:12])  # the signature alone is enough
