"""VIP adapter: put the virtual IPs on the interface, tell the segment, take them off again.

Netlink goes through failover.adapters.rtnl (pyroute2), so it runs on stdlib asyncio.
Imports nothing from lb or healthcheck; the controller reaches it only through the `VipPort`
protocol (failover/core/ports.py, whose contract this class implements), so pure tests use
a fake and the real thing is tested in network namespaces.

What it does, and why:

- acquire(): add every VIP (IPv6 with IFA_F_NODAD: duplicate address detection would keep
  the address tentative, unusable, for a second or more), idempotently, then poll until the
  kernel lists them, then announce: gratuitous ARP for IPv4 (an ARP request and an ARP reply
  with sender = target = VIP, broadcast, from an AF_PACKET socket) and an unsolicited
  neighbour advertisement for IPv6 (ICMPv6 type 136, Override set, to ff02::1, hop limit 255,
  target link-layer address option; RFC 4861 7.2.6). Clients keep sending to the old MAC
  until they hear this, so the first round goes out before acquire() returns; the rest of
  the burst (`garp_count` rounds, `garp_interval_s` apart) and one repeat burst after
  `garp_repeat_after_s` (keepalived's vrrp_garp_master_delay/repeat: 5 at once, 5 more after
  5 s) run in a background task that release() cancels.
- announce(): one more burst now, for the VIPs the kernel shows on the interface (never an
  address we do not hold). The winning MASTER calls it when it hears another MASTER, because
  a healed partition otherwise leaves clients on the loser's MAC (53 s with keepalived).
- release(): cancel announcements, delete the VIPs, poll until gone. Idempotent.
- remove_stale(): at start-up, delete any of our VIPs (any prefix length) still on the
  interface, e.g. after kill -9, before the node joins as BACKUP.
- carrier()/watch_carrier(): link state from netlink (IFF_UP and IFF_LOWER_UP), so a cut
  cable moves the node to FAULT.

Every netlink request runs under a deadline; failures surface as VipError naming the step,
interface and address. pyroute2 exceptions never leak out of this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import inspect
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from failover.adapters.rtnl import AsyncIPRoute, NetlinkError, Rtnl, close_quietly
from failover.core.frames import (
    ARPOP_REPLY,
    ARPOP_REQUEST,
    arp_announcement,
    neighbour_advertisement,
)
from failover.core.ports import FailoverError

log = logging.getLogger(__name__)
STALL_S = 0.5
"""A sleep that overran by more than this means the process was stopped or starved."""

CarrierCallback = Callable[[str, bool], Awaitable[None] | None]

# <linux/if.h>, <linux/if_addr.h>, <linux/rtnetlink.h>, <linux/neighbour.h>
IFF_UP = 0x1
IFF_NOARP = 0x80
IFF_LOWER_UP = 0x10000
IFA_F_NODAD = 0x02
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
RTMGRP_LINK = 0x1
RTM_NEWLINK = 16
RTM_DELLINK = 17
NUD_INCOMPLETE = 0x01
NUD_FAILED = 0x20
NTF_EXT_LEARNED = 0x10
NTF_EXT_MANAGED = 0x01  # in NDA_FLAGS_EXT

ICMP6_FILTER = 1  # <netinet/icmp6.h>, level IPPROTO_ICMPV6
ALL_NODES = "ff02::1"

_GONE_ON_DELETE = frozenset({errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH, errno.ENODEV})
_POLL_FIRST_S = 0.001
_POLL_MAX_S = 0.02


class VipError(FailoverError):
    """A VIP or link operation failed; the message names the step, interface and address."""


@dataclass(frozen=True)
class _Vip:
    ip: ipaddress.IPv4Interface | ipaddress.IPv6Interface

    @property
    def address(self) -> str:
        return str(self.ip.ip)

    @property
    def prefixlen(self) -> int:
        return self.ip.network.prefixlen

    @property
    def family(self) -> int:
        return socket.AF_INET if self.ip.version == 4 else socket.AF_INET6

    def __str__(self) -> str:
        return f"{self.address}/{self.prefixlen}"


@dataclass(frozen=True)
class _Link:
    index: int
    ifname: str
    flags: int
    mac: bytes | None  # None: no Ethernet address, so no ARP/NA (e.g. a tun device)

    @property
    def carrier(self) -> bool:
        return bool(self.flags & IFF_UP) and bool(self.flags & IFF_LOWER_UP)


def _valid_ifname(name: str) -> bool:
    return 0 < len(name) <= 15 and not any(c in name for c in "/: \t\n") and name not in (
        ".", "..")


class VipAdapter:
    """Owns the VIPs of one interface. One instance per interface, one event loop.

    `garp_count` rounds (each round: for every IPv4 VIP an ARP request and reply, for every
    IPv6 VIP one NA) are sent `garp_interval_s` apart; `garp_repeat_after_s` later acquire()
    sends the burst once more (None or 0 disables the repeat, garp_count=0 disables
    announcing). `label` is an IPv4 address label such as "eth0:vip" (must start with the
    interface name) so operators see which addresses pairlb owns.
    """

    def __init__(
        self,
        interface: str,
        vips: Sequence[str],
        *,
        garp_count: int = 5,
        garp_interval_s: float = 0.01,
        garp_repeat_after_s: float | None = 5.0,
        label: str | None = None,
        netlink_timeout_s: float = 1.0,
        settle_timeout_s: float = 1.0,
    ) -> None:
        if not _valid_ifname(interface):
            raise ValueError(f"vip.interface: not an interface name (got {interface!r})")
        if not vips:
            raise ValueError("vip.vips: at least one VIP is required")
        parsed: list[_Vip] = []
        for text in vips:
            try:
                vip = _Vip(ipaddress.ip_interface(text))
            except ValueError as e:
                raise ValueError(f"vip.vips: not an address/prefix (got {text!r})") from e
            if vip in parsed:
                raise ValueError(f"vip.vips: duplicate VIP {text!r}")
            parsed.append(vip)
        if garp_count < 0:
            raise ValueError(f"vip.garp_count: must be >= 0 (got {garp_count})")
        if garp_interval_s < 0:
            raise ValueError(f"vip.garp_interval_s: must be >= 0 (got {garp_interval_s})")
        if garp_repeat_after_s is not None and garp_repeat_after_s < 0:
            raise ValueError(
                f"vip.garp_repeat_after_s: must be >= 0 or None (got {garp_repeat_after_s})")
        if label is not None and (not label.startswith(interface) or len(label) > 15):
            raise ValueError(
                f"vip.label: must start with {interface!r} and have at most 15 characters "
                f"(got {label!r})")
        for name, value in (("netlink_timeout_s", netlink_timeout_s),
                            ("settle_timeout_s", settle_timeout_s)):
            if value <= 0:
                raise ValueError(f"vip.{name}: must be > 0 (got {value})")
        self.interface = interface
        self.vips: tuple[str, ...] = tuple(str(v) for v in parsed)
        self._vips = tuple(parsed)
        self.garp_count = garp_count
        self.garp_interval_s = garp_interval_s
        self.garp_repeat_after_s = garp_repeat_after_s or None
        self.label = label
        self.netlink_timeout_s = netlink_timeout_s
        self.settle_timeout_s = settle_timeout_s
        #: Announcement packets sent / failed to send, for metrics.
        self.announcements_sent = 0
        self.announcement_errors = 0
        self._holding = False
        self._rtnl = Rtnl(netlink_timeout_s, VipError)
        self._op_lock = asyncio.Lock()
        self._repeat_task: asyncio.Task[None] | None = None
        self._burst_task: asyncio.Task[None] | None = None
        self._raw: dict[tuple[int, int, str], socket.socket] = {}

    def __repr__(self) -> str:
        return f"VipAdapter(interface={self.interface!r}, vips={list(self.vips)!r})"

    @property
    def holding(self) -> bool:
        """What this adapter last did: True after acquire(), False after release().

        Cheap and synchronous; held() asks the kernel.
        """
        return self._holding

    # -- the port ----------------------------------------------------------------------------

    async def acquire(self) -> None:
        """Add every VIP, wait until the kernel shows them, then announce them.

        Returns once the addresses are usable and the first announcement round is out.
        On VipError the VIPs may be partly added: call release().
        """
        async with self._op_lock:
            await self._cancel_announcements()
            link = await self._link(self.interface, "acquire")
            for vip in self._vips:
                await self._add(link, vip)
            await self._settle(link, present=True, step="acquire")
            self._holding = True
            log.info("vip_acquired interface=%s vips=%s", self.interface, ",".join(self.vips))
            if self.garp_count > 0:
                self._send_round(link, self._vips)
                self._repeat_task = asyncio.create_task(
                    self._announce_later(link, self._vips, with_repeat=True),
                    name=f"vip-announce-{self.interface}",
                )

    async def release(self) -> None:
        """Stop announcing, delete every VIP, wait until the kernel no longer shows them."""
        async with self._op_lock:
            self._holding = False
            await self._cancel_announcements()
            link = await self._find_link(self.interface, "release")
            if link is None:
                # The interface is gone and its addresses with it.
                log.info("vip_released interface=%s vips=%s reason=no_interface",
                         self.interface, ",".join(self.vips))
                return
            for vip in self._vips:
                await self._delete(link, vip, "release")
            await self._settle(link, present=False, step="release")
            log.info("vip_released interface=%s vips=%s", self.interface, ",".join(self.vips))

    async def announce(self) -> None:
        """Send a GARP/NA burst now for the VIPs the kernel shows on the interface.

        The first round goes out before this returns; the rest follows in the background.
        Announcing an address we do not hold would steal it, so absent VIPs are skipped.
        """
        if self.garp_count == 0:
            return
        # Under the operation lock: a release() running now must not be overtaken by a
        # burst announcing the address it just deleted.
        async with self._op_lock:
            link = await self._link(self.interface, "announce")
            vips = await self._held_vips(link, "announce")
            if not vips:
                log.warning("vip_announce_skipped interface=%s reason=not_held", self.interface)
                return
            self._send_round(link, vips)
            if self._burst_task is not None:
                self._burst_task.cancel()
            if self.garp_count > 1:
                self._burst_task = asyncio.create_task(
                    self._announce_later(link, vips, with_repeat=False),
                    name=f"vip-reannounce-{self.interface}",
                )

    async def remove_stale(self) -> list[str]:
        """Delete our VIPs (at any prefix length) left on the interface; return what went.

        A node killed with -9 leaves its VIP behind; it must not join as BACKUP with it.
        """
        async with self._op_lock:
            link = await self._link(self.interface, "remove_stale")
            ours = {v.address for v in self._vips}
            present = await self._present(link, "remove_stale", include_tentative=True)
            stale = [
                _Vip(ipaddress.ip_interface(f"{addr}/{plen}"))
                for addr, plen in sorted(present) if addr in ours
            ]
            for vip in stale:
                await self._delete(link, vip, "remove_stale")
            if stale:
                await self._wait(
                    link, "remove_stale",
                    lambda p: not any((v.address, v.prefixlen) in p for v in stale),
                )
                log.warning("vip_stale_removed interface=%s vips=%s", self.interface,
                            ",".join(str(v) for v in stale))
            return [str(v) for v in stale]

    async def held(self) -> bool:
        """Does the kernel show every VIP (usable, not tentative) on the interface?"""
        link = await self._find_link(self.interface, "held")
        if link is None:
            return False
        present = await self._present(link, "held")
        return all((v.address, v.prefixlen) in present for v in self._vips)

    async def close(self) -> None:
        """Stop announcing and close the sockets. Leaves the addresses as they are."""
        await self._cancel_announcements()
        self._close_raw_sockets()
        await self._rtnl.close()

    # -- link state ---------------------------------------------------------------------------

    async def carrier(self, ifname: str | None = None) -> bool:
        """Is the link administratively up with carrier? A missing interface has none."""
        link = await self._find_link(ifname or self.interface, "carrier")
        return link is not None and link.carrier

    async def watch_carrier(
        self, interfaces: Sequence[str], callback: CarrierCallback,
        peers: Callable[[], Collection[str]] | None = None,
    ) -> None:
        """Call callback(ifname, up) with each interface's state, then on every change.

        Runs until cancelled. Subscribes to RTM_NEWLINK/RTM_DELLINK first and reads the
        current state second, so no change is lost in between; after a socket error (e.g.
        ENOBUFS when events arrive faster than we read) it reconnects with backoff and reads
        the state again. A callback may be sync or async; its exceptions are logged, not fatal.
        With `peers` (the heartbeat peers' addresses, asked at each event), a regained
        carrier first forgets their unresolved neighbour entries (forget_unresolved).
        """
        names = list(dict.fromkeys(interfaces))
        for name in names:
            if not _valid_ifname(name):
                raise ValueError(f"watch_carrier: not an interface name (got {name!r})")
        last: dict[str, bool] = {}

        async def report(name: str, up: bool) -> None:
            if last.get(name) == up:
                return
            regained = up and last.get(name) is False
            last[name] = up
            log.info("link_carrier interface=%s up=%s", name, up)
            if regained and peers is not None:
                await self.forget_unresolved(name, peers())
            try:
                result = callback(name, up)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("carrier_callback_failed interface=%s up=%s", name, up)

        backoff_s = 0.05
        while True:
            ipr: AsyncIPRoute | None = None
            try:
                ipr = AsyncIPRoute()
                async with asyncio.timeout(self.netlink_timeout_s):
                    await ipr.bind(groups=RTMGRP_LINK)
                    links = {}
                    async for msg in await ipr.link("dump"):
                        links[msg.get("ifname")] = _link_from(msg)
                for name in names:
                    link = links.get(name)
                    await report(name, link is not None and link.carrier)
                backoff_s = 0.05
                while True:
                    got = 0
                    async for msg in ipr.get():
                        got += 1
                        name = msg.get("ifname")
                        if name not in names:
                            continue
                        kind = msg["header"]["type"]
                        if kind == RTM_DELLINK:
                            await report(name, False)
                        elif kind == RTM_NEWLINK:
                            await report(name, _link_from(msg).carrier)
                    if got == 0:
                        raise VipError("netlink event socket closed")
            except asyncio.CancelledError:
                raise
            except (OSError, NetlinkError, VipError, TimeoutError) as e:
                log.warning("carrier_watch_error error=%r retry_in_s=%.2f", e, backoff_s)
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 2.0)
            finally:
                if ipr is not None:
                    close_quietly(ipr)

    async def forget_unresolved(self, ifname: str, addresses: Collection[str]) -> int:
        """Delete the link's neighbour entries of `addresses` that are still resolving or
        failed; return how many went.

        While the carrier was down, heartbeats to the peer queued behind an address
        resolution the kernel retries only every second (`retrans_time`): after the link
        came back the peer heard this node up to 1 s late, the whole queue at once, and both
        nodes held the VIP meanwhile (seen in the link-cut chaos runs). Without the entry
        the next heartbeat resolves at once, and the stale queue goes with it. Only the
        peers' entries: deleting one fails whatever else waits on it (a connect gets
        EHOSTUNREACH). Entries other software manages (externally learned or managed) are
        left alone. Errors are logged, never raised: this only shortens a delay.
        """
        wanted = set()
        for a in addresses:
            with contextlib.suppress(ValueError):
                wanted.add(ipaddress.ip_address(a).compressed)
        if not wanted:
            return 0
        gone = 0
        try:
            link = await self._find_link(ifname, "forget_unresolved")
            if link is None:
                return 0
            async with self._rtnl.exchange(f"forget_unresolved: neighbours on {ifname}") as ipr:
                msgs = [m async for m in await ipr.neigh("dump", ifindex=link.index)]
                for m in msgs:
                    dst = m.get("NDA_DST")
                    if m.get("ifindex") != link.index or not isinstance(dst, str):
                        continue
                    if ipaddress.ip_address(dst).compressed not in wanted:
                        continue
                    if not m.get("state", 0) & (NUD_INCOMPLETE | NUD_FAILED):
                        continue
                    if m.get("flags", 0) & NTF_EXT_LEARNED or (
                            (m.get("NDA_FLAGS_EXT") or 0) & NTF_EXT_MANAGED):
                        continue
                    try:
                        await ipr.neigh("del", dst=dst, ifindex=link.index,
                                        family=m.get("family"))
                    except NetlinkError as e:
                        if e.code != errno.ENOENT:  # gone meanwhile is fine
                            raise
                    else:
                        gone += 1
        except VipError as e:
            log.warning("neighbours_forget_failed interface=%s error=%s", ifname, e)
            return gone
        if gone:
            log.info("neighbours_forgotten interface=%s peers=%d", ifname, gone)
        return gone

    # -- netlink -------------------------------------------------------------------------------

    async def _find_link(self, ifname: str, step: str) -> _Link | None:
        """The interface's index, flags and MAC, or None if there is no such interface."""
        async with self._rtnl.exchange(f"{step}: look up interface {ifname}") as ipr:
            try:
                msgs = list(await ipr.link("get", ifname=ifname))
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise
                return None
        return _link_from(msgs[0]) if msgs else None

    async def _link(self, ifname: str, step: str) -> _Link:
        link = await self._find_link(ifname, step)
        if link is None:
            raise VipError(f"{step}: interface {ifname} not found")
        return link

    async def _present(
        self, link: _Link, step: str, *, include_tentative: bool = False,
    ) -> set[tuple[str, int]]:
        """(address, prefixlen) of the usable addresses on the link, as the kernel lists them."""
        async with self._rtnl.exchange(f"{step}: list addresses on {link.ifname}") as ipr:
            msgs = [m async for m in await ipr.addr("dump", index=link.index)]
        out: set[tuple[str, int]] = set()
        for m in msgs:
            if m.get("index") != link.index:
                continue
            flags = m.get("IFA_FLAGS") or m.get("flags") or 0
            if not include_tentative and flags & (IFA_F_TENTATIVE | IFA_F_DADFAILED):
                continue
            addr = m.get("address")
            if isinstance(addr, str):
                out.add((ipaddress.ip_address(addr).compressed, int(m["prefixlen"])))
        return out

    async def _held_vips(self, link: _Link, step: str) -> tuple[_Vip, ...]:
        present = await self._present(link, step)
        return tuple(v for v in self._vips if (v.address, v.prefixlen) in present)

    async def _add(self, link: _Link, vip: _Vip) -> None:
        spec: dict[str, Any] = {
            "index": link.index, "address": vip.address, "prefixlen": vip.prefixlen,
        }
        if vip.family == socket.AF_INET6:
            spec["flags"] = IFA_F_NODAD
        elif self.label is not None:
            spec["label"] = self.label
        async with self._rtnl.exchange(f"acquire: add {vip} on {link.ifname}") as ipr:
            try:
                await ipr.addr("add", **spec)
            except NetlinkError as e:
                if e.code == errno.EEXIST:  # already there: that is what we want
                    return
                if e.code == errno.EACCES and vip.family == socket.AF_INET6:
                    raise VipError(
                        f"acquire: add {vip} on {link.ifname}: IPv6 is disabled there "
                        f"(net.ipv6.conf.{link.ifname}.disable_ipv6=1)") from e
                raise

    async def _delete(self, link: _Link, vip: _Vip, step: str) -> None:
        async with self._rtnl.exchange(f"{step}: delete {vip} from {link.ifname}") as ipr:
            try:
                await ipr.addr("del", index=link.index, address=vip.address,
                               prefixlen=vip.prefixlen)
            except NetlinkError as e:
                if e.code not in _GONE_ON_DELETE:  # already gone: that is what we want
                    raise

    async def _settle(self, link: _Link, *, present: bool, step: str) -> None:
        want = {(v.address, v.prefixlen) for v in self._vips}
        if present:
            await self._wait(link, step, lambda p: want <= p)
        else:
            await self._wait(link, step, lambda p: not (want & p), include_tentative=True)

    async def _wait(
        self, link: _Link, step: str, done: Callable[[set[tuple[str, int]]], bool],
        *, include_tentative: bool = False,
    ) -> None:
        """Poll the kernel's address list until done(it) or settle_timeout_s passes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settle_timeout_s
        pause_s = _POLL_FIRST_S
        while True:
            present = await self._present(link, step, include_tentative=include_tentative)
            if done(present):
                return
            if loop.time() >= deadline:
                listed = ",".join(f"{a}/{p}" for a, p in sorted(present)) or "none"
                raise VipError(
                    f"{step}: kernel did not settle on {link.ifname} within "
                    f"{self.settle_timeout_s}s (addresses now: {listed})")
            await asyncio.sleep(pause_s)
            pause_s = min(pause_s * 2, _POLL_MAX_S)

    # -- announcements -------------------------------------------------------------------------

    async def _cancel_announcements(self) -> None:
        tasks = [t for t in (self._repeat_task, self._burst_task) if t is not None]
        self._repeat_task = self._burst_task = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    async def _announce_later(
        self, link: _Link, vips: tuple[_Vip, ...], *, with_repeat: bool,
    ) -> None:
        """Rounds 2..garp_count of a burst, then (acquire only) the repeat burst.

        A task boundary: failures are logged, never raised into nobody's hands.
        """
        try:
            for _ in range(self.garp_count - 1):
                if not await self._slept(self.garp_interval_s):
                    return
                self._send_round(link, vips)
            if not with_repeat or self.garp_repeat_after_s is None:
                return
            if not await self._slept(self.garp_repeat_after_s):
                return
            # The link may have been re-created (new index or MAC) in the meantime, and an
            # operator may have removed an address: announce only what is still there.
            link = await self._link(self.interface, "announce")
            vips = await self._held_vips(link, "announce")
            for i in range(self.garp_count if vips else 0):
                if i:
                    await asyncio.sleep(self.garp_interval_s)
                self._send_round(link, vips)
        except asyncio.CancelledError:
            raise
        except VipError as e:
            log.warning("vip_announce_failed interface=%s error=%s", self.interface, e)
        except Exception:
            log.exception("vip_announce_failed interface=%s", self.interface)

    async def _slept(self, delay_s: float) -> bool:
        """Sleep; False if we woke far too late. A process that was stopped (SIGSTOP, a
        hung host) must not announce a VIP the peer has meanwhile taken: the controller
        announces again if this node is still MASTER once it has heard its peers."""
        loop = asyncio.get_running_loop()
        due = loop.time() + delay_s
        await asyncio.sleep(delay_s)
        late = loop.time() - due
        if late > STALL_S:
            log.warning("vip_announce_skipped interface=%s reason=stalled late_s=%.3f",
                        self.interface, late)
            return False
        return True

    def _send_round(self, link: _Link, vips: Sequence[_Vip]) -> None:
        """One round: GARP request + reply per IPv4 VIP, one unsolicited NA per IPv6 VIP.

        A failed send is counted and logged, not raised: the addresses are held regardless,
        and the next round or the repeat burst may get through.
        """
        if link.mac is None or link.flags & IFF_NOARP:
            log.debug("vip_announce_skipped interface=%s reason=no_arp", link.ifname)
            return
        sent = 0
        try:
            for vip in vips:
                if vip.family == socket.AF_INET:
                    s = self._raw_socket(link, socket.AF_INET)
                    for op in (ARPOP_REQUEST, ARPOP_REPLY):
                        s.send(arp_announcement(link.mac, vip.address, op))
                        sent += 1
                else:
                    s = self._raw_socket(link, socket.AF_INET6)
                    s.sendto(neighbour_advertisement(link.mac, vip.address),
                             (ALL_NODES, 0, 0, link.index))
                    sent += 1
        except OSError as e:
            self.announcement_errors += 1
            self._close_raw_sockets()  # the interface may have gone; reopen next round
            log.warning("vip_announce_error interface=%s error=%s", link.ifname, e)
        finally:
            self.announcements_sent += sent
        log.debug("vip_announced interface=%s packets=%d", link.ifname, sent)

    def _raw_socket(self, link: _Link, family: int) -> socket.socket:
        """The sending socket for `family` on `link`, opened once and kept.

        Kept open because closing an AF_PACKET socket waits for an RCU grace period
        (synchronize_net, ~10 ms measured) and would stall the event loop on every round.
        Neither socket receives anything, so nothing queues on them.
        """
        key = (family, link.index, link.ifname)
        s = self._raw.get(key)
        if s is not None:
            return s
        for old in [k for k in self._raw if k[0] == family]:
            self._raw.pop(old).close()
        if family == socket.AF_INET:
            # Protocol 0: a send-only packet socket, no receive hook is registered.
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                s.setblocking(False)
                s.bind((link.ifname, 0))
            except OSError:
                s.close()
                raise
        else:
            s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
            try:
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, b"\xff" * 32)  # block all
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, link.index)
                # RFC 4861 7.1.2: receivers drop ND packets whose hop limit is not 255.
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
                # Our own NA looped back would make the kernel log a duplicate address.
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            except OSError:
                s.close()
                raise
        self._raw[key] = s
        return s

    def _close_raw_sockets(self) -> None:
        for s in self._raw.values():
            s.close()
        self._raw.clear()


# -- helpers -----------------------------------------------------------------------------------


def _link_from(msg: Any) -> _Link:
    mac_text = msg.get("address")
    mac: bytes | None = None
    if isinstance(mac_text, str):
        raw = bytes.fromhex(mac_text.replace(":", ""))
        if len(raw) == 6 and raw != b"\x00" * 6:
            mac = raw
    return _Link(index=int(msg["index"]), ifname=str(msg.get("ifname")),
                 flags=int(msg["flags"]), mac=mac)
