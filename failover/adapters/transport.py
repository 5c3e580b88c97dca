"""UDP heartbeat transport: one socket, unicast to the listed peers, optional multicast.

Carries opaque datagrams (the codec signs and checks them). Implements
`failover.core.ports.HeartbeatTransport` on an asyncio DatagramProtocol of the stdlib loop.
Imports nothing from lb or healthcheck.

- Peers are "ip", "ip:port", "[v6]" or "[v6]:port"; several addresses of one node are
  simply several destinations (the heartbeat carries the node name).
- The socket family follows `bind`, or IPv6 dual-stack when any peer or the group is IPv6,
  else IPv4. Sources are reported as plain IPs (never v4-mapped).
- Heartbeats are marked CS6 (DSCP 48, "network control", as VRRP), so a loaded link
  queues them ahead of bulk traffic where the network honours it.
- A multicast group is joined on `interface` with TTL/hop limit 1 and loopback off; it
  needs a wildcard bind, since a socket bound to a unicast address never sees the group.
- Nothing raised by the receive callback escapes into the event loop, and send() never
  raises: failures are counted (`receive_errors`, `send_errors`) and logged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from collections.abc import Sequence

from failover.core.ports import Address, DatagramCallback, FailoverError

log = logging.getLogger(__name__)

DEFAULT_PORT = 5405
_TOS_CS6 = 0xC0


class TransportError(FailoverError):
    """The transport cannot be set up as configured; the message names the setting."""


def parse_peer(text: str, default_port: int = DEFAULT_PORT) -> Address:
    """"ip", "ip:port", "[v6]" or "[v6]:port" -> (ip, port); ValueError names the rule."""
    text = text.strip()
    host, port = text, default_port
    try:
        ipaddress.ip_address(text)  # bare IPv4 or IPv6
    except ValueError:
        if text.startswith("["):
            end = text.find("]")
            rest = text[end + 1:] if end > 0 else "?"
            host = text[1:end]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"expected [v6]:port (got {text!r})") from None
                port = _port(rest[1:], text)
        else:
            host, sep, port_s = text.rpartition(":")
            if not sep:
                raise ValueError(f"expected an IP address (got {text!r})") from None
            port = _port(port_s, text)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"expected an IP address (got {text!r})") from None
    return str(ipaddress.ip_address(host)), port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"port must be 1..65535 (got {whole!r})")
    return int(text)


def _plain(host: str) -> str:
    """'::ffff:10.0.0.1' -> '10.0.0.1'; anything else unchanged."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return host


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: UdpTransport) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        owner = self.owner
        owner.datagrams_received += 1
        try:
            owner.deliver(data, (_plain(str(addr[0])), int(addr[1])))
        except Exception:  # the receive loop is an error boundary: a bad packet never escapes
            owner.receive_errors += 1
            log.exception("heartbeat_receive_failed source=%s", addr[0])

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier sends (peer down: port unreachable) land here.
        self.owner.send_errors += 1
        log.debug("heartbeat_socket_error error=%s", exc)


class UdpTransport:
    """Heartbeat datagrams over one UDP socket (see the module docstring)."""

    def __init__(
        self,
        peers: Sequence[str],
        *,
        port: int = DEFAULT_PORT,
        bind: str | None = None,
        multicast_group: str | None = None,
        interface: str | None = None,
    ) -> None:
        if not 0 <= port < 65536:
            raise TransportError(f"failover.port: must be 0..65535 (got {port})")
        self.port = port
        dests: list[Address] = []
        for text in peers:
            try:
                dests.append(parse_peer(text, port or DEFAULT_PORT))
            except ValueError as exc:
                raise TransportError(f"failover.peers: {exc}") from None
        self._group: Address | None = None
        if multicast_group is not None:
            try:
                group = ipaddress.ip_address(multicast_group)
            except ValueError:
                raise TransportError(
                    f"failover.multicast_group: not an IP address (got {multicast_group!r})"
                ) from None
            if not group.is_multicast:
                raise TransportError(
                    f"failover.multicast_group: not a multicast address (got {group})")
            if bind is not None and not ipaddress.ip_address(bind).is_unspecified:
                raise TransportError("failover.multicast_group: needs bind unset (a socket "
                                     f"bound to {bind} never receives the group)")
            if interface is None:
                raise TransportError("failover.multicast_group: needs an interface")
            self._group = (str(group), port or DEFAULT_PORT)
            dests.append(self._group)
        hosts = [ipaddress.ip_address(h) for h, _ in dests]
        if bind is not None:
            try:
                bind_ip = ipaddress.ip_address(bind)
            except ValueError:
                raise TransportError(f"failover.bind: not an IP address (got {bind!r})") from None
            if bind_ip.version == 4 and any(h.version == 6 for h in hosts):
                raise TransportError(f"failover.bind: {bind} is IPv4 but a peer is IPv6")
            self._family = socket.AF_INET if bind_ip.version == 4 else socket.AF_INET6
            self._bind = str(bind_ip)
        elif any(h.version == 6 for h in hosts):
            self._family, self._bind = socket.AF_INET6, "::"
        else:
            self._family, self._bind = socket.AF_INET, "0.0.0.0"
        self.interface = interface
        self._dests: tuple[Address, ...] = tuple(dests)
        self._on_datagram: DatagramCallback | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self.datagrams_received = 0
        self.receive_errors = 0
        self.send_errors = 0

    def __repr__(self) -> str:
        return f"UdpTransport(bind={self._bind!r}, port={self.port}, peers={self._dests!r})"

    @property
    def local_address(self) -> Address:
        """The bound (ip, port); with port=0 the kernel's choice."""
        if self._transport is None:
            raise TransportError("transport not started")
        name = self._transport.get_extra_info("sockname")
        return _plain(str(name[0])), int(name[1])

    def destinations(self) -> Sequence[Address]:
        return self._dests

    def deliver(self, data: bytes, source: Address) -> None:
        if self._on_datagram is not None:
            self._on_datagram(data, source)

    async def start(self, on_datagram: DatagramCallback) -> None:
        if self._transport is not None:
            raise TransportError("transport already started")
        self._on_datagram = on_datagram
        sock = self._socket()
        try:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._transport = transport
        log.info("heartbeat_transport_started bind=%s port=%s peers=%s", self._bind,
                 self.local_address[1], ",".join(f"{h}:{p}" for h, p in self._dests))

    def _socket(self) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            if self._family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                _try_setsockopt(sock, socket.IPPROTO_IPV6, socket.IPV6_TCLASS, _TOS_CS6)
            else:
                _try_setsockopt(sock, socket.IPPROTO_IP, socket.IP_TOS, _TOS_CS6)
            sock.setblocking(False)
            try:
                sock.bind((self._bind, self.port))
            except OSError as exc:
                raise TransportError(f"failover: cannot bind heartbeat socket to "
                                     f"{self._bind} port {self.port}: {exc.strerror}") from None
            if self._group is not None:
                self._join(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _join(self, sock: socket.socket) -> None:
        assert self._group is not None and self.interface is not None
        try:
            ifindex = socket.if_nametoindex(self.interface)
        except OSError:
            raise TransportError(
                f"failover.interface: no such interface {self.interface!r}") from None
        group = ipaddress.ip_address(self._group[0])
        try:
            if group.version == 4:
                if self._family == socket.AF_INET6:
                    raise TransportError("failover.multicast_group: IPv4 group on an IPv6 "
                                         "socket; set bind to 0.0.0.0 or use an IPv6 group")
                mreqn = struct.pack("4s4si", group.packed, bytes(4), ifindex)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            else:
                if self._family != socket.AF_INET6:
                    raise TransportError("failover.multicast_group: IPv6 group needs an IPv6 "
                                         "bind")
                mreq = group.packed + struct.pack("@I", ifindex)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        except OSError as exc:
            raise TransportError(f"failover.multicast_group: cannot join {group} on "
                                 f"{self.interface}: {exc.strerror}") from None

    def send(self, data: bytes, dest: Address) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            self.send_errors += 1
            return
        host, port = dest
        if self._family == socket.AF_INET6 and ":" not in host:
            host = f"::ffff:{host}"
        try:
            transport.sendto(data, (host, port))
        except (OSError, ValueError, RuntimeError) as exc:
            self.send_errors += 1
            log.debug("heartbeat_send_failed dest=%s:%s error=%s", host, port, exc)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._on_datagram = None


def _try_setsockopt(sock: socket.socket, level: int, option: int, value: int) -> None:
    try:
        sock.setsockopt(level, option, value)
    except OSError as exc:  # marking is an optimisation; an odd kernel must not stop us
        log.debug("heartbeat_socket_option_failed option=%s error=%s", option, exc)
