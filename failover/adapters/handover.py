"""Connection handover: packets of connections the other node still serves reach it.

When the VIP moves between two live nodes (switchover, graceful stop, preempt, a healed
partition, a hung node waking up), clients follow the new holder's gratuitous ARP at once,
but connections the old holder accepted are not over: a client whose SYN reached the old
holder a moment before sends the rest of its handshake to the new one, and clients with a
request in flight keep sending ACKs. The new holder would answer those with a reset.

Netfilter state in this node's network namespace fixes that (``nft`` table
``pairlb_<node>`` per address family, one policy rule and route per family):

- **Receiving (always installed):** the old holder must accept packets for the VIP after
  it removed the address. Its listeners and the connections they accept are
  IP_TRANSPARENT; the TPROXY recipe delivers a packet for the VIP that matches such a
  socket locally: nft marks it (``socket transparent 1``) and ``ip rule fwmark`` sends it
  to a table whose only route is ``local default dev lo``. While this node holds the VIP
  the address is local anyway, so the rule changes nothing.
- **Flagging (always installed, so conntrack tracks every flow from the start):** a flow to
  the VIP whose first packet here is not a SYN began on another node; its conntrack entry
  gets FOREIGN_MARK (``ct state new`` with loose pick-up, the kernel default).
- **Forwarding (armed for a while after the VIP moved here from a live peer):** packets of
  flagged flows are sent unchanged to the peer's MAC (``dup to PEER`` + ``drop``), where
  the receiving half delivers them. Flows that began here with a SYN stay here. Disarmed
  when this node releases the VIP (a packet must never bounce between the two).

The cost: conntrack runs in the namespace (a few hundred bytes per connection; size
``nf_conntrack_max`` for the connection rate times the TCP timeouts).

Driven with the ``nft`` command (Debian package nftables) and rtnetlink
(failover.adapters.rtnl); when nft is missing or either is not permitted, handover is
disabled with one warning and the VIP still moves as before. Imports nothing from lb or healthcheck.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import shutil
import socket
from collections.abc import Sequence

from failover.adapters.rtnl import SCOPE_HOST, AsyncIPRoute, NetlinkError, Rtnl
from failover.core.ports import FailoverError

log = logging.getLogger(__name__)

FOREIGN_MARK = 0x504C4201
"""Conntrack mark of a flow to the VIP whose first packet here was not a SYN: its
connection began on the other node."""
TPROXY_MARK = 0x504C4202
"""fwmark of packets for the VIP that belong to one of our transparent sockets."""
TPROXY_TABLE = 0x504C
"""Routing table holding ``local default dev lo`` for TPROXY_MARK (IPv4 and IPv6)."""
RULE_PRIORITY = 9000
_TIMEOUT_S = 5.0
CONNTRACK_SYSCTLS = {
    "net/netfilter/nf_conntrack_tcp_timeout_time_wait": "1",
    "net/netfilter/nf_conntrack_tcp_timeout_close": "1",
}
"""Forget finished flows at once. A client that reuses a source port within the default
120 s would otherwise match the finished flow's entry here: not "new", so not flagged, and
its packets would reach our TCP stack instead of the node that has the connection.
Per network namespace; deploy/sysctl/90-pairlb.conf sets them where pairlb may not."""


class HandoverError(FailoverError):
    """A netfilter command or a netlink request failed; the message says which and why."""


def _family(vip: str) -> int:
    return ipaddress.ip_interface(vip).version


def table_name(node: str) -> str:
    """One nft table per node and family (tests run several nodes, one per namespace)."""
    return "pairlb_" + "".join(c if c.isalnum() else "_" for c in node)[:40]


def _families(vips: Sequence[str]) -> dict[str, list[str]]:
    """nft family ("ip", "ip6") -> the VIP addresses of that family. `dup to` exists only
    in the ip and ip6 families, so each gets its own table."""
    out: dict[str, list[str]] = {}
    for vip in vips:
        ip = ipaddress.ip_interface(vip).ip
        out.setdefault("ip" if ip.version == 4 else "ip6", []).append(str(ip))
    return out


def base_ruleset(node: str, vips: Sequence[str], ports: Sequence[int]) -> str:
    """The nft script that (re)creates the tables: receiving, and flagging foreign flows."""
    t = table_name(node)
    port_set = ", ".join(str(p) for p in sorted(set(ports)))
    lines = []
    for fam, addrs in _families(vips).items():
        lines += [f"table {fam} {t}", f"delete table {fam} {t}", f"table {fam} {t} {{",
                  "  chain pre {",
                  "    type filter hook prerouting priority mangle; policy accept;"]
        for ip in addrs:
            match = f"{fam} daddr {ip} tcp dport {{ {port_set} }}"
            lines += [
                f"    {match} ct state new tcp flags & syn == 0 ct mark set {FOREIGN_MARK:#x} "
                "comment \"a flow that began elsewhere\"",
                f"    {match} socket transparent 1 meta mark set {TPROXY_MARK:#x} "
                "comment \"ours: deliver locally\"",
            ]
        lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


def forward_rules(node: str, vips: Sequence[str], interface: str, peer: str) -> str:
    """The nft script that adds the forwarding half toward ``peer`` (its family's VIPs)."""
    t = table_name(node)
    peer_ip = ipaddress.ip_address(peer)
    fam = "ip" if peer_ip.version == 4 else "ip6"
    # Appended after the flagging rule: a flow's first packet is flagged, then passed on.
    lines = [f"add rule {fam} {t} pre {fam} daddr {ip} ct mark {FOREIGN_MARK:#x} "
             f"dup to {peer_ip} device \"{interface}\" drop comment \"theirs: to {peer_ip}\""
             for ip in _families(vips).get(fam, [])]
    return "\n".join(lines) + "\n" if lines else ""


class Handover:
    """The two halves for one node (see the module docstring). One event loop."""

    def __init__(self, node: str, interface: str, vips: Sequence[str],
                 ports: Sequence[int]) -> None:
        self.node = node
        self.interface = interface
        self.vips = tuple(vips)
        self.ports = tuple(sorted(set(ports)))
        self.enabled = False
        self.forwarding_to: str | None = None
        self.forwards = 0
        self._expiry: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()
        self._rtnl = Rtnl(_TIMEOUT_S, HandoverError)

    async def start(self) -> bool:
        """Install the receiving half; False (and one warning) if it cannot be."""
        if not self.ports:
            return False
        if shutil.which("nft") is None:
            log.warning("handover_disabled node=%s reason='nft not installed' effect='a VIP "
                        "move resets connections still open on the old holder'", self.node)
            return False
        try:
            await _run(["nft", "-f", "-"], base_ruleset(self.node, self.vips, self.ports))
            for family in self._families():
                await self._route_marked_locally(family)
        except HandoverError as exc:
            log.warning("handover_disabled node=%s reason=%r", self.node, str(exc))
            await self.close()
            return False
        finally:
            await self._rtnl.close()  # needed again only at close(): no socket held meanwhile
        self.enabled = True
        unset = _set_sysctls(CONNTRACK_SYSCTLS)
        log.info("handover_ready node=%s vips=%s ports=%s", self.node, ",".join(self.vips),
                 ",".join(map(str, self.ports)))
        if unset:
            log.warning("handover_conntrack_timeouts_unset node=%s keys=%s effect='a client "
                        "reusing a port within 2 min of a finished connection may be reset "
                        "at a VIP move' fix='sysctl -p /etc/sysctl.d/90-pairlb.conf'",
                        self.node, ",".join(unset))
        return True

    async def forward_to(self, peer: str, for_s: float) -> None:
        """Send packets of connections we do not have to ``peer`` for ``for_s`` seconds."""
        if not self.enabled or for_s <= 0:
            return
        script = forward_rules(self.node, self.vips, self.interface, peer)
        if not script:
            return
        async with self._lock:
            if self.forwarding_to != peer:
                try:  # one nft transaction: this runs before the ARP, on the takeover path
                    await _run(["nft", "-f", "-"],
                               base_ruleset(self.node, self.vips, self.ports) + script)
                except HandoverError as exc:
                    log.error("handover_forward_failed node=%s peer=%s error=%r", self.node,
                              peer, str(exc))
                    return
                self.forwarding_to = peer
                self.forwards += 1
                log.info("handover_forwarding node=%s peer=%s for_s=%g", self.node, peer,
                         for_s)
            if self._expiry is not None:  # armed again (e.g. a re-announce): extend
                self._expiry.cancel()
            loop = asyncio.get_running_loop()
            self._expiry = loop.call_later(for_s, lambda: loop.create_task(self.stop_forwarding()))

    async def stop_forwarding(self) -> None:
        async with self._lock:
            if self.forwarding_to is None:
                return
            peer, self.forwarding_to = self.forwarding_to, None
            try:
                await self._reset()
            except HandoverError as exc:
                log.error("handover_unforward_failed node=%s error=%r", self.node, str(exc))
                return
        log.info("handover_forwarding_ended node=%s peer=%s", self.node, peer)

    async def _reset(self) -> None:
        """Back to the receiving half only (atomically: one nft transaction)."""
        await _run(["nft", "-f", "-"], base_ruleset(self.node, self.vips, self.ports))

    async def close(self) -> None:
        """Remove this node's nft tables, and the fwmark rule and route (idempotent).

        The rule and route are the same for every pairlb in a network namespace, so a second
        instance in the same namespace loses its receiving half here; one node per namespace
        is the supported layout (each node of a pair is a host of its own)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self.enabled = False
        self.forwarding_to = None
        t = table_name(self.node)
        script = "".join(f"table {fam} {t}\ndelete table {fam} {t}\n"
                         for fam in _families(self.vips))
        await _run(["nft", "-f", "-"], script, check=False)
        for family in self._families():
            with contextlib.suppress(HandoverError):
                await self._unroute_marked(family)
        await self._rtnl.close()

    # -- the TPROXY rule and route (rtnetlink) ---------------------------------------------

    def _families(self) -> list[int]:
        return sorted({socket.AF_INET if _family(v) == 4 else socket.AF_INET6
                       for v in self.vips})

    async def _route_marked_locally(self, family: int) -> None:
        """``ip rule add priority 9000 fwmark TPROXY_MARK lookup TPROXY_TABLE`` and
        ``ip route replace local default dev lo table TPROXY_TABLE``, idempotently."""
        name = "IPv4" if family == socket.AF_INET else "IPv6"
        async with self._rtnl.exchange(f"handover: {name} fwmark rule") as ipr:
            await _delete_rules(ipr, family)
            await ipr.rule("add", family=family, priority=RULE_PRIORITY, fwmark=TPROXY_MARK,
                           table=TPROXY_TABLE)
        async with self._rtnl.exchange(f"handover: {name} local route in table "
                                       f"{TPROXY_TABLE}") as ipr:
            await ipr.route("replace", family=family, type="local", dst="default",
                            scope=SCOPE_HOST, oif=await _loopback(ipr), table=TPROXY_TABLE)

    async def _unroute_marked(self, family: int) -> None:
        async with self._rtnl.exchange("handover: remove the fwmark rule and route") as ipr:
            await _delete_rules(ipr, family)
            with contextlib.suppress(NetlinkError):
                await ipr.route("del", family=family, type="local", dst="default",
                                scope=SCOPE_HOST, oif=await _loopback(ipr),
                                table=TPROXY_TABLE)


async def _delete_rules(ipr: AsyncIPRoute, family: int) -> None:
    """Remove pairlb's rule (an earlier run may have left it): only a rule with our priority,
    mark and table, so an operator's other rule at the same priority stays."""
    for _ in range(8):
        try:
            await ipr.rule("del", family=family, priority=RULE_PRIORITY, fwmark=TPROXY_MARK,
                           table=TPROXY_TABLE)
        except NetlinkError as e:
            if e.code == errno.ENOENT:
                return
            raise


async def _loopback(ipr: AsyncIPRoute) -> int:
    found = await ipr.link_lookup(ifname="lo")
    if not found:
        raise HandoverError("handover: no loopback interface")
    return int(found[0])


def _set_sysctls(values: dict[str, str]) -> list[str]:
    """Write each /proc/sys key that differs; return the keys that could not be set."""
    unset = []
    for key, value in values.items():
        path = f"/proc/sys/{key}"
        try:
            with open(path) as f:
                if f.read().strip() == value:
                    continue
            with open(path, "w") as f:
                f.write(value)
        except OSError:
            unset.append(key.replace("/", "."))
    return unset


async def _run(argv: Sequence[str], stdin: str | None = None, *, check: bool = True) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else None,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        async with asyncio.timeout(_TIMEOUT_S):
            out, _ = await proc.communicate(stdin.encode() if stdin is not None else None)
    except (OSError, TimeoutError) as exc:
        if check:
            raise HandoverError(f"{argv[0]}: {exc}") from None
        return
    if check and proc.returncode != 0:
        raise HandoverError(f"{' '.join(argv)}: exit {proc.returncode}: "
                            f"{out.decode(errors='replace').strip()[:400]}")
