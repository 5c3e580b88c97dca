"""Link-layer frames the failover adapters put on the wire: ARP and IPv6 neighbour adverts.

Pure byte builders and parsers, so both users share one layout and a table test checks it:
the VIP adapter announces a VIP it took (gratuitous ARP, unsolicited NA), the gateway
tracker asks who has the gateway (an ARP request) and reads the replies.

    Ethernet: dst (6) | src (6) | ethertype 0x0806
    ARP:      htype 1 | ptype 0x0800 | hlen 6 | plen 4 | op | sha (6) | spa (4) | tha (6) | tpa (4)

Frames are padded to the 60-byte Ethernet minimum (without FCS): strict NICs and switches
drop runts. No I/O here (tests/test_imports.py).
"""

from __future__ import annotations

import ipaddress
import struct

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
BROADCAST_MAC = b"\xff" * 6
ETH_MIN_FRAME = 60
ND_NEIGHBOR_ADVERT = 136
ND_NA_FLAG_OVERRIDE = 0x20000000
ND_OPT_TARGET_LINKADDR = 2

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_ARP_AT = _ETH.size


def arp_frame(op: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    """A broadcast Ethernet frame carrying one IPv4-over-Ethernet ARP message."""
    frame = (_ETH.pack(BROADCAST_MAC, sha, ETH_P_ARP)
             + _ARP.pack(1, ETH_P_IP, 6, 4, op, sha, spa, tha, tpa))
    return frame.ljust(ETH_MIN_FRAME, b"\x00")


def arp_announcement(mac: bytes, ipv4: str, op: int = ARPOP_REQUEST) -> bytes:
    """A gratuitous ARP for `ipv4`: sender = target = the VIP.

    tha is zero in a request and our MAC in a reply: Linux treats a reply as gratuitous only
    if tha == sha (arp_is_garp).
    """
    ip = ipaddress.IPv4Address(ipv4).packed
    return arp_frame(op, mac, ip, mac if op == ARPOP_REPLY else bytes(6), ip)


def arp_request(sender_mac: bytes, sender_ip: bytes, target_ip: bytes) -> bytes:
    """Who has `target_ip`? (sender_ip 0.0.0.0 makes it an RFC 5227 probe)."""
    return arp_frame(ARPOP_REQUEST, sender_mac, sender_ip, bytes(6), target_ip)


def parse_arp_reply(frame: bytes) -> bytes | None:
    """The sender IPv4 (4 bytes) of an IPv4-over-Ethernet ARP reply frame, else None."""
    if len(frame) < _ARP_AT + _ARP.size:
        return None
    if _ETH.unpack_from(frame)[2] != ETH_P_ARP:
        return None
    htype, ptype, hlen, plen, op, _sha, spa, _tha, _tpa = _ARP.unpack_from(frame, _ARP_AT)
    if (htype, ptype, hlen, plen, op) != (1, ETH_P_IP, 6, 4, ARPOP_REPLY):
        return None
    return bytes(spa)


def neighbour_advertisement(mac: bytes, ipv6: str) -> bytes:
    """ICMPv6 unsolicited NA for `ipv6` (the kernel fills in the checksum).

        type 136 | code 0 | checksum | R=0 S=0 O=1, reserved | target (16) |
        option 2 (target link-layer address) | length 1 (x8 bytes) | MAC

    Solicited must be 0 (RFC 4861 7.2.6); Override makes receivers replace a cached MAC.
    """
    target = ipaddress.IPv6Address(ipv6).packed
    return (struct.pack("!BBHI", ND_NEIGHBOR_ADVERT, 0, 0, ND_NA_FLAG_OVERRIDE) + target
            + struct.pack("!BB", ND_OPT_TARGET_LINKADDR, 1) + mac)
