"""The partition guard: is this node's gateway (or another anchor) reachable?

A node cut off from the network its clients come through must not hold the VIP, even when
it stops hearing its peer: without this check a node isolated with its carrier up stays (or
becomes) MASTER, and once the network heals clients split between the two. keepalived's
`track_script` with a ping and Pacemaker's ping resource / quorum device are the models.

`GatewayTracker` probes every target each `interval_s`, all at once, each bounded by
`timeout_s`; the gateway is *reachable* when at least one target answered in the round.
`fall` unreachable rounds in a row make it down, `rise` reachable ones up again; before the
first answer it is unknown, and one answer makes it up (a start-up must not wait `rise`
rounds). The controller treats "not up" as the fault `gateway`: a BACKUP does not claim the
VIP, a MASTER releases it at once and its FAULT heartbeat lets the peer take over.

Targets (IP literals only: a DNS lookup would be one more thing that can hang):

- `tcp:HOST:PORT` or `HOST:PORT` (`[v6]:PORT`): a TCP connect. An accepted connection and a
  refused one (TCP RST, or ICMP port unreachable) both prove the host answered; a timeout,
  "no route" or "host unreachable" (ARP failed) does not. Pick a port the host answers or
  rejects rather than one a firewall silently drops. Closed with RST (SO_LINGER 0), so an
  open port sees no half-closed connections and nothing stays in TIME_WAIT. A RST sent by
  a firewall in between proves only that the firewall is reachable.
- `arp:IPV4`: an ARP request on the VIP interface from an AF_PACKET socket (needs
  CAP_NET_RAW, which the unit grants); any ARP reply from that address is an answer. Works
  for any host on the segment whatever its firewall says; it proves L2 reachability only.

The probes run in a task of their own, never on the heartbeat path: each is non-blocking
(asyncio sockets, a reader callback for ARP replies) and bounded by its deadline; a round
that raises counts as unreachable and is logged. Imports nothing from lb or healthcheck.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import ipaddress
import logging
import math
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from failover.core.frames import ETH_P_ARP, arp_request, parse_arp_reply
from failover.core.ports import FailoverError

log = logging.getLogger(__name__)

GATEWAY_FAULT = "gateway"
"""The fault reason while the tracked gateway is not known to be reachable."""

_SIOCGIFADDR = 0x8915


class TrackError(FailoverError):
    """A track target is malformed or cannot be probed here; the message names the key."""


@dataclass(frozen=True)
class Target:
    kind: Literal["tcp", "arp"]
    host: str
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "arp":
            return f"arp:{self.host}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_target(text: str) -> Target:
    """`tcp:HOST:PORT`, `HOST:PORT`, `[v6]:PORT` or `arp:IPV4`; ValueError says the rule."""
    raw = text.strip()
    if raw.startswith("arp:"):
        try:
            ip = ipaddress.ip_address(raw[4:])
        except ValueError:
            raise ValueError("arp: needs an IPv4 address") from None
        if ip.version != 4:
            raise ValueError("arp: IPv4 only; probe an IPv6 gateway with tcp:")
        return Target("arp", str(ip))
    rest = raw.removeprefix("tcp:")
    if rest.startswith("["):
        end = rest.find("]")
        host, sep, port_s = rest[1:end], rest[end + 1:end + 2], rest[end + 2:]
        if end < 0 or sep != ":":
            raise ValueError("expected [v6]:port")
    else:
        host, sep, port_s = rest.rpartition(":")
        if not sep or ":" in host:
            raise ValueError("expected host:port, [v6]:port or arp:IPV4")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError("the host must be an IP address") from None
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError("port must be 1..65535")
    return Target("tcp", str(ip), int(port_s))


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str
    """open, refused, reply; or timeout, unreachable, an errno name, an error."""
    rtt_s: float | None = None


@dataclass(frozen=True)
class TargetStatus:
    target: str
    ok: bool | None
    """The last probe answered (None before the first)."""
    detail: str
    rtt_s: float | None
    successes: int
    failures: int


@dataclass(frozen=True)
class GatewayStatus:
    up: bool | None
    """Reachable (None: no answer yet; then the node is in FAULT too)."""
    targets: tuple[TargetStatus, ...]
    interval_s: float
    timeout_s: float
    fall: int
    rise: int
    transitions: int
    """Times it went down or came back up."""


ProbeFn = Callable[[Target, float], Awaitable[ProbeResult]]


# -- probes ------------------------------------------------------------------------------------


async def tcp_probe(host: str, port: int, timeout_s: float) -> ProbeResult:
    """One TCP connect, closed with RST; an RST in answer proves the host is there too."""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    t0 = time.monotonic()
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, (host, port))
        return ProbeResult(True, "open", time.monotonic() - t0)
    except ConnectionRefusedError:
        return ProbeResult(True, "refused", time.monotonic() - t0)
    except TimeoutError:
        return ProbeResult(False, "timeout")
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "error")
        detail = "unreachable" if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH,
                                                errno.EHOSTDOWN) else name.lower()
        return ProbeResult(False, detail)
    finally:
        sock.close()


class ArpProber:
    """ARP requests from one AF_PACKET socket, replies matched by a reader callback.

    The socket stays open (closing an AF_PACKET socket waits for an RCU grace period, which
    would block the loop); open() raises TrackError when it cannot be had (no CAP_NET_RAW,
    no such interface), so a config that cannot work fails at start-up, not silently.
    """

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self._sock: socket.socket | None = None
        self._mac = bytes(6)
        self._waiting: dict[bytes, list[asyncio.Future[None]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        except PermissionError:
            raise TrackError("failover.track_gateway: arp: targets need CAP_NET_RAW") from None
        except OSError as exc:
            raise TrackError(f"failover.track_gateway: arp: {exc.strerror}") from None
        try:
            sock.bind((self.interface, ETH_P_ARP))
            sock.setblocking(False)
            self._mac = bytes(sock.getsockname()[4])[:6]
        except OSError as exc:
            sock.close()
            raise TrackError(f"failover.track_gateway: arp: interface {self.interface!r}: "
                             f"{exc.strerror}") from None
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for futures in self._waiting.values():
            for fut in futures:
                fut.cancel()
        self._waiting.clear()

    def _sender_ip(self) -> bytes:
        """Our primary IPv4 address on the interface (0.0.0.0, an RFC 5227 probe, if none)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                req = struct.pack("256s", self.interface.encode()[:15])
                return fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24]
            except OSError:
                return bytes(4)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(256):  # bounded: a flood of ARP must not hold the loop
            try:
                frame = sock.recv(128)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sender = parse_arp_reply(frame)
            if sender is None:
                continue
            for fut in self._waiting.pop(sender, []):
                if not fut.done():
                    fut.set_result(None)

    async def probe(self, ip: str, timeout_s: float) -> ProbeResult:
        if self._sock is None or self._loop is None:
            return ProbeResult(False, "not open")
        target = socket.inet_aton(ip)
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiting.setdefault(target, []).append(fut)
        t0 = time.monotonic()
        try:
            self._sock.send(arp_request(self._mac, self._sender_ip(), target))
            async with asyncio.timeout(timeout_s):
                await fut
            return ProbeResult(True, "reply", time.monotonic() - t0)
        except TimeoutError:
            return ProbeResult(False, "timeout")
        except OSError as exc:
            return ProbeResult(False, errno.errorcode.get(exc.errno or 0, "error").lower())
        finally:
            waiting = self._waiting.get(target)
            if waiting is not None and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del self._waiting[target]


# -- the tracker -----------------------------------------------------------------------------


@dataclass
class _TargetState:
    target: Target
    last: ProbeResult | None = None
    successes: int = 0
    failures: int = 0


class GatewayTracker:
    """Probes the targets on its own cadence; calls `on_change(up)` on every up/down change.

    `probe` replaces the real probes (tests). Call start() from the event loop, then run()
    as a task of its own; close() at the end.
    """

    def __init__(
        self,
        targets: Sequence[str],
        *,
        interface: str,
        interval_s: float = 0.5,
        timeout_s: float = 0.5,
        fall: int = 3,
        rise: int = 2,
        on_change: Callable[[bool], None] | None = None,
        probe: ProbeFn | None = None,
    ) -> None:
        if not targets:
            raise TrackError("failover.track_gateway: at least one target")
        parsed = []
        for text in targets:
            try:
                parsed.append(parse_target(text))
            except ValueError as exc:
                raise TrackError(f"failover.track_gateway: {exc} (got {text!r})") from None
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise TrackError(f"failover.track_gateway_interval_s: must be > 0 (got {interval_s})")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise TrackError(f"failover.track_gateway_timeout_s: must be > 0 (got {timeout_s})")
        if fall < 1 or rise < 1:
            raise TrackError(f"failover.track_gateway_fall/rise: must be >= 1 "
                             f"(got {fall}/{rise})")
        self._targets = [_TargetState(t) for t in parsed]
        self.interface = interface
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.fall = fall
        self.rise = rise
        self._on_change = on_change
        self._probe = probe
        self._arp: ArpProber | None = None
        self.up: bool | None = None
        self._streak = 0
        """Rounds in a row that disagree with `up` (or, while unknown, failed rounds)."""
        self.transitions = 0
        self.rounds = 0

    def start(self) -> None:
        """Open what the probes need; raises TrackError if that cannot work here."""
        if self._probe is None and any(t.target.kind == "arp" for t in self._targets):
            self._arp = ArpProber(self.interface)
            self._arp.open()

    def close(self) -> None:
        if self._arp is not None:
            self._arp.close()
            self._arp = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            try:
                reachable = await self.round()
            except Exception:
                log.exception("gateway_probe_failed interface=%s", self.interface)
                reachable = False
            self.record(reachable)
            due += self.interval_s
            now = loop.time()
            if due <= now:  # a round longer than the interval: resume the cadence, no burst
                due = now + self.interval_s
            await asyncio.sleep(due - now)

    async def round(self) -> bool:
        """Probe every target at once; True when at least one answered."""
        results = await asyncio.gather(*(self._one(s.target) for s in self._targets),
                                       return_exceptions=True)
        for state, res in zip(self._targets, results, strict=True):
            if isinstance(res, BaseException):
                res = ProbeResult(False, f"error: {type(res).__name__}")
            state.last = res
            if res.ok:
                state.successes += 1
            else:
                state.failures += 1
        self.rounds += 1
        return any(s.last is not None and s.last.ok for s in self._targets)

    async def _one(self, target: Target) -> ProbeResult:
        if self._probe is not None:
            async with asyncio.timeout(self.timeout_s * 2 + 1):  # a fake that hangs
                return await self._probe(target, self.timeout_s)
        if target.kind == "arp":
            if self._arp is None:
                return ProbeResult(False, "not open")
            return await self._arp.probe(target.host, self.timeout_s)
        return await tcp_probe(target.host, target.port, self.timeout_s)

    def record(self, reachable: bool) -> None:
        """Apply one round's verdict to the fall/rise state."""
        if self.up is None:
            if reachable:
                self._set(True)
            else:
                self._streak += 1
                if self._streak >= self.fall:
                    self._set(False)
            return
        if reachable == self.up:
            self._streak = 0
            return
        self._streak += 1
        if self._streak >= (self.rise if reachable else self.fall):
            self._set(reachable)

    def _set(self, up: bool) -> None:
        was = self.up
        self.up = up
        self._streak = 0
        if was is not None:
            self.transitions += 1
        detail = ", ".join(f"{s.target}={s.last.detail if s.last else '-'}"
                           for s in self._targets)
        if up:
            log.info("gateway_reachable interface=%s targets=%s", self.interface, detail)
        else:
            log.warning("gateway_unreachable interface=%s targets=%s rounds=%d", self.interface,
                        detail, self.fall)
        if self._on_change is not None:
            self._on_change(up)

    def status(self) -> GatewayStatus:
        return GatewayStatus(
            up=self.up,
            targets=tuple(TargetStatus(
                target=str(s.target), ok=None if s.last is None else s.last.ok,
                detail="" if s.last is None else s.last.detail,
                rtt_s=None if s.last is None else s.last.rtt_s,
                successes=s.successes, failures=s.failures,
            ) for s in self._targets),
            interval_s=self.interval_s, timeout_s=self.timeout_s, fall=self.fall,
            rise=self.rise, transitions=self.transitions,
        )

    def __repr__(self) -> str:
        return f"GatewayTracker({[str(s.target) for s in self._targets]}, up={self.up})"
