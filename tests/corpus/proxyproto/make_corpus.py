"""Writes the PROXY protocol corpus next to this file (run it again after editing the lists:
``.venv/bin/python tests/corpus/proxyproto/make_corpus.py``; tests/test_proxyproto.py checks
the files on disk are what this script makes).

- ``good/NNN-name.bin``: a valid header followed by the connection's own bytes;
  ``good/NNN-name.json`` what reading it gives: ``version``, ``source`` and ``dest``
  (``[ip, port]`` or null = keep the real peer) and ``rest`` (hex of the bytes after it).
- ``bad/NNN-name.REASON.bin``: what a trusted proxy's connection starts with (and then
  ends: a header cut short is refused when the connection ends or its time runs out);
  REASON is ``missing`` or ``invalid`` (``proxy_protocol_<REASON>``).

The bytes are built here by hand (not by lb.data.proxyproto's encoders), so the corpus
checks the reader against the spec, not against our own writer.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
PAYLOAD = b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"
V2_MAX = 4096


def v4(a: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, a)


def v6(a: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, a)


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    return SIG + struct.pack(">BBH", ver_cmd, fam, len(body) if length is None else length) + body


def tlv(t: int, value: bytes) -> bytes:
    return struct.pack(">BH", t, len(value)) + value


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    return c ^ 0xFFFFFFFF


def with_crc(ver_cmd: int, fam: int, addrs: bytes, before: bytes = b"", fix: int = 0) -> bytes:
    body = addrs + before + tlv(0x03, b"\0\0\0\0")
    hdr = v2(ver_cmd, fam, body)
    crc = (crc32c(hdr) + fix) & 0xFFFFFFFF
    return hdr[:-4] + struct.pack(">I", crc)


TCP4_ADDRS = v4("203.0.113.7") + v4("198.51.100.1") + struct.pack(">HH", 40000, 443)
TCP6_ADDRS = v6("2001:db8::7") + v6("2001:db8::1") + struct.pack(">HH", 1, 65535)
FULL6 = ":".join(["ffff"] * 8)

# name -> (bytes, version, source, dest); every good item gets PAYLOAD after it.
GOOD: dict[str, tuple[bytes, int, list[object] | None, list[object] | None]] = {
    "001-v1-tcp4": (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", 1,
                    ["192.168.0.1", 56324], ["192.168.0.11", 443]),
    "002-v1-tcp6": (b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n", 1,
                    ["2001:db8::1", 1], ["2001:db8::2", 65535]),
    "003-v1-tcp6-longest": (f"PROXY TCP6 {FULL6} {FULL6} 65535 65535\r\n".encode(), 1,
                            [FULL6, 65535], [FULL6, 65535]),
    "004-v1-unknown": (b"PROXY UNKNOWN\r\n", 1, None, None),
    "005-v1-unknown-107-bytes": (f"PROXY UNKNOWN {FULL6} {FULL6} 65535 65535\r\n".encode(), 1,
                                 None, None),
    "006-v1-unknown-anything": (b"PROXY UNKNOWN \x00\xff whatever  it says\r\n", 1, None, None),
    "007-v1-zeros-and-max": (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 0\r\n", 1,
                             ["0.0.0.0", 0], ["255.255.255.255", 0]),
    "008-v1-tcp6-dotted-tail": (b"PROXY TCP6 ::ffff:192.0.2.1 ::1 5 6\r\n", 1,
                                ["::ffff:c000:201", 5], ["::1", 6]),
    "009-v1-tcp6-upper-case": (b"PROXY TCP6 2001:DB8::A 2001:0DB8:0000::B 80 81\r\n", 1,
                               ["2001:db8::a", 80], ["2001:db8::b", 81]),
    "010-v2-tcp4": (v2(0x21, 0x11, TCP4_ADDRS), 2,
                    ["203.0.113.7", 40000], ["198.51.100.1", 443]),
    "011-v2-tcp6": (v2(0x21, 0x21, TCP6_ADDRS), 2, ["2001:db8::7", 1], ["2001:db8::1", 65535]),
    "012-v2-local": (v2(0x20, 0x00, b""), 2, None, None),
    "013-v2-local-with-addresses": (v2(0x20, 0x11, TCP4_ADDRS), 2, None, None),
    "014-v2-local-any-family": (v2(0x20, 0xFF, b"12345"), 2, None, None),
    "015-v2-tcp4-tlvs": (v2(0x21, 0x11, TCP4_ADDRS + tlv(0x02, b"example.test")
                            + tlv(0x04, b"") + tlv(0x05, b"u" * 128) + tlv(0xE0, b"custom")), 2,
                         ["203.0.113.7", 40000], ["198.51.100.1", 443]),
    "016-v2-tcp4-crc32c": (with_crc(0x21, 0x11, TCP4_ADDRS, tlv(0x02, b"a.test")), 2,
                           ["203.0.113.7", 40000], ["198.51.100.1", 443]),
    "017-v2-tcp6-ssl-tlv": (v2(0x21, 0x21, TCP6_ADDRS + tlv(0x20, b"\x07\0\0\0\0"
                                                            + tlv(0x21, b"TLSv1.3")
                                                            + tlv(0x22, b"client cn"))), 2,
                            ["2001:db8::7", 1], ["2001:db8::1", 65535]),
    "018-v2-proxy-unspec": (v2(0x21, 0x00, b""), 2, None, None),
    "019-v2-proxy-unspec-with-bytes": (v2(0x21, 0x00, b"anything, ignored"), 2, None, None),
    "020-v2-udp4": (v2(0x21, 0x12, TCP4_ADDRS), 2, None, None),
    "021-v2-unix-stream": (v2(0x21, 0x31, b"/run/a.sock".ljust(108, b"\0")
                              + b"/run/b.sock".ljust(108, b"\0")), 2, None, None),
    "022-v2-largest": (v2(0x21, 0x11, TCP4_ADDRS + tlv(0x04, b"\0" * (V2_MAX - 16 - 12 - 3))),
                       2, ["203.0.113.7", 40000], ["198.51.100.1", 443]),
    "023-v2-tcp4-mapped-in-tcp6": (v2(0x21, 0x21, v6("::ffff:10.1.2.3") + v6("::1")
                                      + struct.pack(">HH", 9, 10)), 2,
                                   ["::ffff:a01:203", 9], ["::1", 10]),
}

# name.reason -> bytes (what arrives, then the connection ends)
BAD: dict[str, bytes] = {
    # no signature
    "100-http-request.missing": PAYLOAD,
    "101-tls-client-hello.missing": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "102-lower-case-proxy.missing": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "103-proxy-without-space.missing": b"PROXY\r\n",
    "104-leading-space.missing": b" PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "105-v2-signature-last-byte-wrong.missing": SIG[:-1] + b"\r" + b"\x21\x11\x00\x0c",
    "106-blank-lines-then-request.missing": b"\r\n\r\nGET / HTTP/1.1\r\n\r\n",
    "107-ssh-banner.missing": b"SSH-2.0-OpenSSH_9.2\r\n",
    "108-nothing.missing": b"",
    "109-v1-signature-prefix-then-end.missing": b"PROX",
    "110-v2-signature-prefix-then-end.missing": SIG[:11],
    # v1
    "200-v1-lf-only.invalid": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + PAYLOAD,
    "201-v1-cr-only.invalid": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r" + PAYLOAD,
    "202-v1-lf-cr.invalid": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n\r" + PAYLOAD,
    "203-v1-two-spaces-after-proxy.invalid": b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "204-v1-two-spaces-between-addresses.invalid": b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
    "205-v1-trailing-space.invalid": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    "206-v1-tab.invalid": b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n",
    "207-v1-port-65536.invalid": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    "208-v1-port-99999.invalid": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
    "209-v1-port-leading-zero.invalid": b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n",
    "210-v1-port-not-numeric.invalid": b"PROXY TCP4 1.2.3.4 5.6.7.8 http 2\r\n",
    "211-v1-port-negative.invalid": b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    "212-v1-port-plus-sign.invalid": b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n",
    "213-v1-port-unicode-digits.invalid": "PROXY TCP4 1.2.3.4 5.6.7.8 ٨٠ 2\r\n".encode(),
    "214-v1-octet-256.invalid": b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    "215-v1-octet-leading-zero.invalid": b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
    "216-v1-three-octets.invalid": b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    "217-v1-ipv4-hostname.invalid": b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n",
    "218-v1-ipv6-in-tcp4.invalid": b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
    "219-v1-ipv4-in-tcp6.invalid": b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
    "220-v1-ipv6-zone.invalid": b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    "221-v1-ipv6-two-double-colons.invalid": b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
    "222-v1-ipv6-five-hex-digits.invalid": b"PROXY TCP6 12345::1 ::1 1 2\r\n",
    "223-v1-ipv6-dotted-leading-zero.invalid": b"PROXY TCP6 ::ffff:01.2.3.4 ::1 1 2\r\n",
    "224-v1-ipv6-brackets.invalid": b"PROXY TCP6 [::1] ::1 1 2\r\n",
    "225-v1-tcp5.invalid": b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    "226-v1-lower-case-tcp4.invalid": b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
    "227-v1-udp4.invalid": b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "228-v1-field-missing.invalid": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    "229-v1-field-extra.invalid": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    "230-v1-tcp4-only.invalid": b"PROXY TCP4\r\n",
    "231-v1-empty-protocol.invalid": b"PROXY \r\n",
    "232-v1-unknownx.invalid": b"PROXY UNKNOWNX\r\n",
    "233-v1-unknown-lf-only.invalid": b"PROXY UNKNOWN\n",
    "234-v1-nul-in-address.invalid": b"PROXY TCP4 1.2.3.4\x00 5.6.7.8 1 2\r\n",
    "235-v1-cr-inside.invalid": b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n",
    "236-v1-no-crlf-in-107-bytes.invalid": b"PROXY UNKNOWN " + b"x" * 93 + b"\r\n",
    "237-v1-108-bytes-no-end.invalid": b"PROXY UNKNOWN " + b"x" * 200,
    "238-v1-cut-short.invalid": b"PROXY TCP4 1.2.3.4 5.6",
    "239-v1-signature-only.invalid": b"PROXY ",
    "240-v1-cr-at-end-then-cut.invalid": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r",
    "241-v1-utf8-address.invalid": "PROXY TCP4 \uff11.2.3.4 5.6.7.8 1 2\r\n".encode(),
    # v2
    "300-v2-version-1.invalid": v2(0x11, 0x11, TCP4_ADDRS),
    "301-v2-version-3.invalid": v2(0x31, 0x11, TCP4_ADDRS),
    "302-v2-version-0.invalid": v2(0x01, 0x11, TCP4_ADDRS),
    "303-v2-command-2.invalid": v2(0x22, 0x11, TCP4_ADDRS),
    "304-v2-command-f.invalid": v2(0x2F, 0x11, TCP4_ADDRS),
    "305-v2-family-4.invalid": v2(0x21, 0x41, TCP4_ADDRS),
    "306-v2-family-f.invalid": v2(0x21, 0xF1, TCP4_ADDRS),
    "307-v2-transport-3.invalid": v2(0x21, 0x13, TCP4_ADDRS),
    "308-v2-tcp4-length-11.invalid": v2(0x21, 0x11, TCP4_ADDRS[:11]),
    "309-v2-tcp4-length-0.invalid": v2(0x21, 0x11, b""),
    "310-v2-tcp6-length-35.invalid": v2(0x21, 0x21, TCP6_ADDRS[:35]),
    "311-v2-tcp6-says-tcp4-length.invalid": v2(0x21, 0x21, TCP4_ADDRS),
    "312-v2-unix-length-100.invalid": v2(0x21, 0x31, b"\0" * 100),
    "313-v2-udp6-length-12.invalid": v2(0x21, 0x22, TCP4_ADDRS),
    "314-v2-length-65535.invalid": v2(0x21, 0x11, TCP4_ADDRS, length=65535),
    "315-v2-one-byte-over-max.invalid": v2(0x21, 0x11, TCP4_ADDRS
                                           + tlv(0x04, b"\0" * (V2_MAX - 16 - 12 - 3 + 1))),
    "316-v2-length-lies-longer.invalid": v2(0x21, 0x11, TCP4_ADDRS, length=40),
    "317-v2-cut-in-fixed-part.invalid": SIG + b"\x21\x11\x00",
    "318-v2-signature-only.invalid": SIG,
    "319-v2-cut-in-addresses.invalid": v2(0x21, 0x11, TCP4_ADDRS)[:22],
    "320-v2-tlv-overruns.invalid": v2(0x21, 0x11, TCP4_ADDRS + struct.pack(">BH", 0x02, 10)
                                      + b"short"),
    "321-v2-tlv-header-cut.invalid": v2(0x21, 0x11, TCP4_ADDRS + b"\x02\x00"),
    "322-v2-tlv-stray-byte.invalid": v2(0x21, 0x11, TCP4_ADDRS + tlv(0x04, b"") + b"\x01"),
    "323-v2-crc32c-wrong.invalid": with_crc(0x21, 0x11, TCP4_ADDRS, fix=1),
    "324-v2-crc32c-3-bytes.invalid": v2(0x21, 0x11, TCP4_ADDRS + tlv(0x03, b"\0\0\0")),
    "325-v2-crc32c-twice.invalid": v2(0x21, 0x11, TCP4_ADDRS + tlv(0x03, b"\0" * 4)
                                      + tlv(0x03, b"\0" * 4)),
    "326-v2-tlv-in-unspec-ok-but-cut.invalid": v2(0x21, 0x00, b"x" * 20)[:30],
    "327-v2-address-bytes-of-http.invalid": SIG + b"GET / HTTP/1.1\r\n",
}


def build() -> dict[str, bytes]:
    """Relative path -> content of every corpus file."""
    out: dict[str, bytes] = {}
    for name, (data, version, source, dest) in GOOD.items():
        out[f"good/{name}.bin"] = data + PAYLOAD
        expect = {"version": version, "source": source, "dest": dest, "rest": PAYLOAD.hex()}
        out[f"good/{name}.json"] = (json.dumps(expect, indent=1) + "\n").encode()
    for name, data in BAD.items():
        out[f"bad/{name}.bin"] = data
    return out


def main() -> int:
    for rel, data in build().items():
        path = HERE / rel
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
