"""The link-layer frames the VIP adapter and the gateway tracker send and read, byte by byte."""

from __future__ import annotations

import pytest

from failover.core import frames as fr

MAC = bytes.fromhex("020000000001")
VIP = bytes([192, 0, 2, 100])


@pytest.mark.parametrize("op,tha", [(fr.ARPOP_REQUEST, bytes(6)), (fr.ARPOP_REPLY, MAC)])
def test_gratuitous_arp_layout(op: int, tha: bytes) -> None:
    f = fr.arp_announcement(MAC, "192.0.2.100", op)
    assert len(f) == fr.ETH_MIN_FRAME  # padded: strict switches drop runts
    assert f[:6] == b"\xff" * 6 and f[6:12] == MAC and f[12:14] == b"\x08\x06"
    assert f[14:22] == bytes([0, 1, 8, 0, 6, 4, 0, op])
    # sender = target = the VIP; a reply names our MAC as target too (Linux arp_is_garp)
    assert f[22:28] == MAC and f[28:32] == VIP and f[32:38] == tha and f[38:42] == VIP
    assert f[42:] == bytes(18)


def test_arp_request_asks_for_the_target_and_pads() -> None:
    f = fr.arp_request(MAC, bytes(4), VIP)
    assert len(f) == fr.ETH_MIN_FRAME and f[20:22] == b"\x00\x01"
    assert f[28:32] == bytes(4) and f[32:38] == bytes(6) and f[38:42] == VIP


def test_parse_arp_reply_reads_the_sender_and_refuses_the_rest() -> None:
    reply = fr.arp_frame(fr.ARPOP_REPLY, MAC, VIP, MAC, bytes([192, 0, 2, 1]))
    assert fr.parse_arp_reply(reply) == VIP
    assert fr.parse_arp_reply(reply[:42]) == VIP  # unpadded, as a veth delivers it
    assert fr.parse_arp_reply(reply[:41]) is None
    assert fr.parse_arp_reply(fr.arp_request(MAC, VIP, VIP)) is None  # a request
    assert fr.parse_arp_reply(reply[:12] + b"\x08\x00" + reply[14:]) is None  # IPv4, not ARP
    assert fr.parse_arp_reply(reply[:16] + b"\x86\xdd" + reply[18:]) is None  # not IPv4 ARP
    assert fr.parse_arp_reply(b"") is None


def test_unsolicited_neighbour_advertisement_layout() -> None:
    na = fr.neighbour_advertisement(MAC, "2001:db8::100")
    assert na[0] == 136 and na[1] == 0 and na[2:4] == b"\x00\x00"  # the kernel sums it
    assert na[4:8] == b"\x20\x00\x00\x00"  # Override only: unsolicited (RFC 4861 7.2.6)
    assert na[8:24] == bytes.fromhex("20010db8000000000000000000000100")
    assert na[24:26] == b"\x02\x01" and na[26:] == MAC and len(na) == 32
