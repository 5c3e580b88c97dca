"""Ring 3: real FailoverControllers wired through an in-memory network on a virtual clock.

The event loop's clock is virtual: when nothing is ready, the loop jumps to the next timer
instead of sleeping, so every scenario is deterministic and takes milliseconds of real time
while the controllers run exactly their production code (timers, send loop, executor,
codec, replay guard). The network delivers each datagram after `LATENCY_S`; the VIP is a
fake that takes `ACQUIRE_S` to appear (the kernel poll) and records who held it when.

What a user would notice, and what is asserted: who answers the VIP, from when to when; the
time from a fault to the new holder; whether there was ever a moment with no holder, or two.
The notify hooks are tested at the end on the real loop with real scripts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import selectors
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from failover import FailoverController, FailoverSpec, Role, master_down_s, skew_s
from failover.adapters.hooks import HookRunner
from failover.adapters.track import ProbeFn, ProbeResult, Target
from failover.core.codec import Heartbeat, HeartbeatFlags, encode, key_id
from failover.core.codec import RejectReason as R
from failover.core.ports import Address, DatagramCallback

KEY = b"pair-test-key-0123456789abcdef"
INTERVAL_S = 0.05
LATENCY_S = 0.0005
ACQUIRE_S = 0.002
VIP = "192.0.2.100/24"


# -- the virtual clock --------------------------------------------------------------------------


class _VirtualSelector(selectors.BaseSelector):
    """Never blocks: a wait for `timeout` moves the clock forward by `timeout`."""

    def __init__(self) -> None:
        self._inner = selectors.DefaultSelector()
        self.now = 1000.0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._inner.select(0)
        if ready:
            return ready
        if timeout is None:
            raise RuntimeError("virtual loop: nothing scheduled, would wait forever")
        self.now += max(0.0, timeout)
        return []

    def get_map(self) -> Any:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()


class VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.vsel = _VirtualSelector()
        super().__init__(self.vsel)

    def time(self) -> float:
        return self.vsel.now


def run_virtual(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = VirtualLoop()
    try:
        loop.run_until_complete(asyncio.wait_for(scenario(), timeout=600))
    finally:
        pending = asyncio.all_tasks(loop)
        for task in pending:  # a failed scenario leaves controllers running
            task.cancel()
        if pending:
            loop.run_until_complete(_settle(pending))
        loop.close()


async def _settle(tasks: set[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


def now() -> float:
    return asyncio.get_running_loop().time()


# -- the fake world -----------------------------------------------------------------------------


@dataclass
class World:
    """Who holds the VIP, over time, as clients would see it."""

    events: list[tuple[float, str, str]] = field(default_factory=list)
    holders: set[str] = field(default_factory=set)
    timeline: list[tuple[float, frozenset[str]]] = field(default_factory=list)

    def mark(self, node: str, what: str) -> None:
        t = now()
        self.events.append((t, node, what))
        if what == "acquired":
            self.holders.add(node)
        elif what == "release_started":
            self.holders.discard(node)
        self.timeline.append((t, frozenset(self.holders)))

    def first(self, node: str, what: str, after: float = 0.0) -> float:
        return min(t for t, n, w in self.events if n == node and w == what and t >= after)

    def count(self, node: str, what: str) -> int:
        return sum(1 for _, n, w in self.events if n == node and w == what)

    def gaps_after(self, t0: float) -> list[float]:
        """Moments (after the VIP was first held, from t0 on) at which nobody held it."""
        return [t for t, h in self.timeline if t >= t0 and not h]

    def max_overlap_s(self, t0: float) -> float:
        """Longest time two nodes held it at once, from t0 on."""
        longest, since = 0.0, None
        for t, h in self.timeline:
            if t < t0:
                continue
            if len(h) > 1 and since is None:
                since = t
            elif len(h) <= 1 and since is not None:
                longest, since = max(longest, t - since), None
        return longest


class FakeVip:
    announcements_sent = 0
    announcement_errors = 0
    def __init__(self, node: str, world: World, stale: bool = False) -> None:
        self.node = node
        self.world = world
        self.stale = stale
        self._holding = False

    @property
    def holding(self) -> bool:
        return self._holding

    async def acquire(self) -> None:
        await asyncio.sleep(ACQUIRE_S)
        self._holding = True
        self.world.mark(self.node, "acquired")

    async def release(self) -> None:
        self.world.mark(self.node, "release_started")
        self._holding = False
        await asyncio.sleep(ACQUIRE_S)

    async def announce(self) -> None:
        self.world.mark(self.node, "announced")

    async def remove_stale(self) -> list[str]:
        self.world.mark(self.node, "remove_stale")
        if self.stale:
            self.stale = False
            return [VIP]
        return []

    async def held(self) -> bool:
        return self._holding


class FakeNet:
    """Datagrams between fake transports, after LATENCY_S, unless a path is cut."""

    def __init__(self) -> None:
        self.by_ip: dict[str, FakeTransport] = {}
        self.cut: set[str] = set()  # destination IPs that nothing reaches
        self.cut_pairs: set[tuple[str, str]] = set()
        self.taps: list[Callable[[bytes, str, str], None]] = []

    def transport(self, ips: Sequence[str], peers: Sequence[str]) -> FakeTransport:
        t = FakeTransport(self, list(ips), [(p, 5405) for p in peers])
        for ip in ips:
            self.by_ip[ip] = t
        return t

    def deliver(self, src: str, dst: str, data: bytes) -> None:
        for tap in self.taps:
            tap(data, src, dst)
        target = self.by_ip.get(dst)
        if target is None or dst in self.cut or src in self.cut or (src, dst) in self.cut_pairs:
            return
        asyncio.get_running_loop().call_later(LATENCY_S, target.receive, data, (src, 5405))

    def partition(self, a: FakeTransport, b: FakeTransport) -> None:
        for x in a.ips:
            for y in b.ips:
                self.cut_pairs |= {(x, y), (y, x)}


class FakeTransport:
    def __init__(self, net: FakeNet, ips: list[str], dests: list[Address]) -> None:
        self.net = net
        self.ips = ips
        self._dests = dests
        self._cb: DatagramCallback | None = None
        self.send_errors = 0

    async def start(self, on_datagram: DatagramCallback) -> None:
        self._cb = on_datagram

    def destinations(self) -> Sequence[Address]:
        return self._dests

    def send(self, data: bytes, dest: Address) -> None:
        if self._cb is None:
            self.send_errors += 1
            return
        # The source is our address on the destination's network (same first three octets).
        prefix = dest[0].rsplit(".", 1)[0]
        src = next((ip for ip in self.ips if ip.startswith(prefix + ".")), self.ips[0])
        self.net.deliver(src, dest[0], data)

    def receive(self, data: bytes, source: Address) -> None:
        if self._cb is not None:
            self._cb(data, source)

    def close(self) -> None:
        self._cb = None


@dataclass
class Node:
    ctl: FailoverController
    vip: FakeVip
    roles: list[tuple[float, Role, Role]]


def node(net: FakeNet, world: World, name: str, ips: Sequence[str], peers: Sequence[str],
         priority: int, healthy: bool = True, stale: bool = False, *,
         interval_s: float = INTERVAL_S, wall_offset_s: float = 0.0,
         gateway_probe: ProbeFn | None = None, **kw: Any) -> Node:
    loop = asyncio.get_running_loop()
    kw.setdefault("key", KEY)
    spec = FailoverSpec(node_name=name, interface="eth0", vips=(VIP,), priority=priority,
                        peers=tuple(peers), address=ips[0], interval_s=interval_s, **kw)
    vip = FakeVip(name, world, stale=stale)
    roles: list[tuple[float, Role, Role]] = []
    ctl = FailoverController(
        spec, vip, transport=net.transport(ips, peers),
        on_role_change=lambda old, new: roles.append((loop.time(), old, new)),
        wall_clock=lambda: 1.75e9 + wall_offset_s + loop.time(), gateway_probe=gateway_probe)
    ctl.set_local_health(healthy, 3 if healthy else 0, 3)
    return Node(ctl, vip, roles)


async def pair(world: World, net: FakeNet, *, a_kw: dict[str, Any] | None = None,
               b_kw: dict[str, Any] | None = None, start: bool = True) -> tuple[Node, Node]:
    a = node(net, world, "lb1", ["10.0.0.1"], ["10.0.0.2"], 200, **(a_kw or {}))
    b = node(net, world, "lb2", ["10.0.0.2"], ["10.0.0.1"], 100, **(b_kw or {}))
    if start:
        await a.ctl.start()
        await b.ctl.start()
    return a, b


async def wait_for(cond: Callable[[], bool], timeout_s: float = 5.0, step_s: float = 0.0005
                   ) -> float:
    t0 = now()
    while not cond():
        if now() - t0 > timeout_s:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(step_s)
    return now()


async def stop_all(*nodes: Node) -> None:
    for n in nodes:
        await n.ctl.stop(graceful=False)


MD_B = master_down_s(100, INTERVAL_S, 3)  # 0.1805 s: what the backup (priority 100) waits
MD_A = master_down_s(200, INTERVAL_S, 3)


# -- scenarios -------------------------------------------------------------------------------


def test_election_higher_priority_wins_and_stale_vip_removed_first() -> None:
    async def scenario() -> None:
        world, net = World(), FakeNet()
        a, b = await pair(world, net, a_kw={"stale": True})
        await asyncio.sleep(1.0)
        assert (a.ctl.role, b.ctl.role) == (Role.MASTER, Role.BACKUP)
        assert world.holders == {"lb1"} and world.count("lb2", "acquired") == 0
        # kill -9 leftovers go before the node joins: remove_stale is its first VIP call.
        assert world.events[0][1:] == ("lb1", "remove_stale")
        t_master = world.first("lb1", "acquired")
        assert t_master - 1000.0 == pytest.approx(MD_A + ACQUIRE_S, abs=0.002)
        st = a.ctl.status()
        assert st.peers[0].name == "lb2" and st.peers[0].role is Role.BACKUP
        assert st.peers[0].alive and st.peers[0].config_digest_match
        assert st.peers[0].healthy_count == 3 and st.peers[0].total_count == 3
        assert st.counters.rejected == {} and st.counters.heartbeats_received >= 19
        await stop_all(a, b)

    run_virtual(scenario)


@pytest.mark.parametrize("phase", [0.0, 0.013, 0.029, 0.049])
def test_kill_master_takeover_within_master_down(phase: float) -> None:
    async def scenario() -> None:
        world, net = World(), FakeNet()
        a, b = await pair(world, net)
        await asyncio.sleep(1.0 + phase)
        t_kill = now()
        await a.ctl.stop(graceful=False)  # kill -9: no goodbye, the VIP stays where it is
        t_b = await wait_for(lambda: b.vip.holding)
        takeover = t_b - t_kill
        # B hears A's last heartbeat at most one interval before the kill; it waits
        # master_down from that heartbeat, then acquires.
        assert MD_B - INTERVAL_S <= takeover <= MD_B + ACQUIRE_S + 2 * LATENCY_S, takeover
        assert b.ctl.role is Role.MASTER
        await stop_all(b)

    run_virtual(scenario)


def test_graceful_stop_hands_over_after_skew_with_no_gap() -> None:
    async def scenario() -> None:
        world, net = World(), FakeNet()
        a, b = await pair(world, net)
        await asyncio.sleep(1.0)
        t0 = now()
        await a.ctl.stop()
        assert not a.vip.holding and b.vip.holding and b.ctl.role is Role.MASTER
        took = world.first("lb2", "acquired", t0) - t0
        # Priority 0: the backup waits Skew_Time only (RFC 5798 6.4.2), not master_down.
        assert took == pytest.approx(skew_s(100, INTERVAL_S) + ACQUIRE_S + LATENCY_S, abs=1e-3)
        assert world.gaps_after(t0) == []  # somebody held the VIP at every moment
        assert world.max_overlap_s(t0) <= 2 * LATENCY_S + 1e-6
        assert a.ctl.role is Role.INIT
        await stop_all(b)

    run_virtual(scenario)


def test_planned_switchover_no_gap_and_no_preempt_back() -> None:
    async def scenario() -> None:
        world, net = World(), FakeNet()
        a, b = await pair(world, net)  # preempt on (default)
        await asyncio.sleep(1.0)
        t0 = now()
        assert a.ctl.request_switchover()
        assert not b.ctl.request_switchover()  # only a MASTER can hand over
        await wait_for(lambda: a.ctl.role is Role.BACKUP)
        assert b.ctl.role is Role.MASTER
        assert world.first("lb2", "acquired", t0) - t0 <= LATENCY_S + ACQUIRE_S + 1e-6
        assert world.gaps_after(t0) == []
        assert world.max_overlap_s(t0) <= 2 * LATENCY_S + 1e-6
        await asyncio.sleep(3.0)  # A outranks B, yet must not take the VIP back
        assert (a.ctl.role, b.ctl.role) == (Role.BACKUP, Role.MASTER)
        assert a.ctl.status().preempt_suppressed
        t1 = now()
        assert b.ctl.request_switchover()  # the way back
        await wait_for(lambda: a.ctl.role is Role.MASTER and b.ctl.role is Role.BACKUP)
        assert world.gaps_after(t1) == []
        await stop_all(a, b)

    run_virtual(scenario)


class FakeHandover:
    """Records what the controller asks of failover.adapters.handover, into the world's timeline."""

    def __init__(self, name: str, world: World) -> None:
        self.name, self.world = name, world
        self.calls: list[tuple[str, str | None]] = []
        self.enabled, self.forwarding_to, self.forwards = True, None, 0

    async def start(self) -> bool:
        self.calls.append(("start", None))
        return True

    async def forward_to(self, peer: str, for_s: float) -> None:
        self.calls.append(("forward_to", peer))
        self.world.mark(self.name, "forward")

    async def stop_forwarding(self) -> None:
        self.calls.append(("stop_forwarding", None))

    async def close(self) -> None:
        self.calls.append(("close", None))


def test_handover_armed_before_a_planned_takeover_and_never_toward_a_dead_peer() -> None:
    """The new holder passes the old holder's connections back to it: armed before the
    gratuitous ARP of a switchover, toward the old holder's address; disarmed when it lets
    the VIP go; not armed when it takes over from a node that died."""
    async def scenario() -> None:
        world, net = World(), FakeNet()
        a, b = await pair(world, net, start=False)
        hos = {}
        for n, name in ((a, "lb1"), (b, "lb2")):
            hos[name] = FakeHandover(name, world)
            n.ctl._handover = hos[name]
            await n.ctl.start()
        await asyncio.sleep(1.0)
        assert hos["lb2"].calls == [("start", None)]
        t0 = now()
        assert a.ctl.request_switchover()
        await wait_for(lambda: a.ctl.role is Role.BACKUP)
        assert ("forward_to", "10.0.0.1") in hos["lb2"].calls
        assert world.first("lb2", "forward", t0) <= world.first("lb2", "acquired", t0)
        await asyncio.sleep(0.1)  # the release runs after the role change
        assert ("stop_forwarding", None) in hos["lb1"].calls  # it released the VIP
        await asyncio.sleep(1.0)
        calls = len(hos["lb1"].calls)
        await b.ctl.stop(graceful=False)  # lb2 dies: lb1 takes over with nobody to pass packets to
        await wait_for(lambda: a.ctl.role is Role.MASTER, 2.0)
        await asyncio.sleep(0.2)
        assert [c for c in hos["lb1"].calls[calls:] if c[0] == "forward_to"] == []
        await stop_all(a)

    run_virtual(scenario)


def test_partition_then_heal_one_master_within_an_interval_and_winner_reannounces() -> None:
    async def scenario() -> None:
        world, net = World(), FakeNet()
        a, b = await pair(world, net)
        await asyncio.sleep(1.0)
        net.partition(a.ctl._transport, b.ctl._transport)  # type: ignore[arg-type]
        await wait_for(lambda: b.ctl.role is Role.MASTER)
        await asyncio.sleep(0.5)
        assert a.ctl.role is Role.MASTER  # split brain is expected while they cannot talk
        announced = world.count("lb1", "announced")
        t_heal = now()
        net.cut_pairs.clear()
        t_one = await wait_for(lambda: b.ctl.role is Role.BACKUP)
        assert t_one - t_heal <= INTERVAL_S + 2 * LATENCY_S
        await wait_for(lambda: world.holders == {"lb1"})
        assert world.first("lb2", "release_started", t_heal) - t_one < 0.001
        assert a.ctl.role is Role.MASTER
        # The winner told the clients again, right when it heard the other MASTER.
        assert world.count("lb1", "announced") >= announced + 1
        t_ann = world.first("lb1", "announced", t_heal)
        assert t_ann - t_heal <= INTERVAL_S + 2 * LATENCY_S
        last = max(t for t, n, w in world.events if w == "announced")
        assert [n for t, n, w in world.events if w == "announced" and t == last] == ["lb1"]
        assert last >= world.first("lb2", "release_started", t_heal)
        await asyncio.sleep(1.0)
        # Once more on b's first BACKUP heartbeat (its yield is an edge), then no GARP storm.
        assert world.count("lb1", "announced") == announced + 2
        await stop_all(a, b)

    run_virtual(scenario)


@pytest.mark.parametrize("preempt", [True, False])
def test_preempt_on_and_off(preempt: bool) -> None:
    async def scenario() -> None:
        world, net = World(), FakeNet()
        a, b = await pair(world, net, start=False,
                          a_kw={"preempt": preempt, "preempt_delay_s": 0.3})
        await b.ctl.start()
        await asyncio.sleep(1.0)
        assert b.ctl.role is Role.MASTER
        t0 = now()
        await a.ctl.start()
        await asyncio.sleep(2.0)
        if preempt:
            assert (a.ctl.role, b.ctl.role) == (Role.MASTER, Role.BACKUP)
            took = world.first("lb1", "acquired", t0) - t0
            # It hears B within an interval; then the preempt delay runs.
            assert 0.3 <= took <= 0.3 + INTERVAL_S + ACQUIRE_S + 2 * LATENCY_S
            assert world.gaps_after(t0) == []
        else:
            assert (a.ctl.role, b.ctl.role) == (Role.BACKUP, Role.MASTER)
            assert world.count("lb1", "acquired") == 0
        await stop_all(a, b)

    run_virtual(scenario)


def test_link_fault_releases_and_rejoins_as_backup_first() -> None:
    async def scenario() -> None:
        world, net = World(), FakeNet()
        a, b = await pair(world, net)
        await asyncio.sleep(1.0)
        t0 = now()
        a.ctl.carrier_changed("eth0", False)
        await wait_for(lambda: not a.vip.holding)
        assert a.ctl.role is Role.FAULT
        assert world.first("lb1", "release_started", t0) == t0  # at once
        # B hears A say FAULT (other paths still work here), so it need not wait master_down.
        t_b = await wait_for(lambda: b.vip.holding)
        assert t_b - t0 <= INTERVAL_S + ACQUIRE_S + 2 * LATENCY_S
        await asyncio.sleep(1.0)
        assert a.ctl.role is Role.FAULT and a.ctl.status().faults == ("carrier:eth0",)
        t1 = now()
        a.ctl.carrier_changed("eth0", True)
        await wait_for(lambda: a.vip.holding)  # preempt, after passing BACKUP
        after = [(o, n) for t, o, n in a.roles if t >= t1]
        assert after == [(Role.FAULT, Role.BACKUP), (Role.BACKUP, Role.MASTER)]
        assert world.gaps_after(t1) == []
        await stop_all(a, b)

    run_virtual(scenario)


def test_carrier_down_before_start_starts_in_fault() -> None:
    async def scenario() -> None:
        world, net = World(), FakeNet()
        a = node(net, world, "lb1", ["10.0.0.1"], ["10.0.0.2"], 200)
        a.ctl.carrier_changed("eth0", False)  # the carrier watch reports before start()
        await a.ctl.start()
        await asyncio.sleep(1.0)
        assert a.ctl.role is Role.FAULT and world.count("lb1", "acquired") == 0
        a.ctl.carrier_changed("eth0", True)
        await wait_for(lambda: a.vip.holding)
        assert [(o, n) for _, o, n in a.roles] == [
            (Role.INIT, Role.FAULT), (Role.FAULT, Role.BACKUP), (Role.BACKUP, Role.MASTER)]
        await stop_all(a)

    run_virtual(scenario)


def test_no_takeover_before_local_health_and_takeover_when_healthy() -> None:
    async def scenario() -> None:
        world, net = World(), FakeNet()
        a, b = await pair(world, net, start=False, a_kw={"healthy": False})
        await b.ctl.start()
        await asyncio.sleep(1.0)
        await a.ctl.start()  # better priority, preempt on, but its checks have not passed
        await asyncio.sleep(3.0)
        assert world.count("lb1", "acquired") == 0
        assert a.ctl.role is Role.FAULT and a.ctl.status().faults == ("no_healthy_backends",)
        t0 = now()
        a.ctl.set_local_health(True, 3, 3)
        await wait_for(lambda: a.ctl.role is Role.MASTER and b.ctl.role is Role.BACKUP)
        assert world.gaps_after(t0) == []
        # And a MASTER that loses every backend hands over to the healthy peer, then FAULT.
        t1 = now()
        a.ctl.set_local_health(False, 0, 3)
        await wait_for(lambda: a.ctl.role is Role.FAULT and b.ctl.role is Role.MASTER)
        assert world.gaps_after(t1) == []
        await stop_all(a, b)

    run_virtual(scenario)


def test_three_nodes_next_best_healthy_takes_over_and_never_two() -> None:
    async def scenario() -> None:
        world, net = World(), FakeNet()
        ips = {"lb1": "10.0.0.1", "lb2": "10.0.0.2", "lb3": "10.0.0.3"}
        prio = {"lb1": 200, "lb2": 150, "lb3": 100}
        nodes = {n: node(net, world, n, [ip], [p for m, p in ips.items() if m != n], prio[n])
                 for n, ip in ips.items()}
        nodes["lb2"].ctl.set_local_health(False)  # second best by priority, but no backends
        for x in nodes.values():
            await x.ctl.start()
        await asyncio.sleep(1.0)
        assert [n for n, x in nodes.items() if x.ctl.role is Role.MASTER] == ["lb1"]
        t0 = now()
        await nodes["lb1"].ctl.stop(graceful=False)
        await wait_for(lambda: nodes["lb3"].vip.holding)
        assert now() - t0 <= master_down_s(100, INTERVAL_S, 3) + ACQUIRE_S + 0.002
        await asyncio.sleep(1.0)
        assert world.count("lb2", "acquired") == 0
        assert world.max_overlap_s(t0) == 0.0
        await stop_all(nodes["lb2"], nodes["lb3"])

    run_virtual(scenario)


def test_two_paths_are_one_peer_dead_only_when_both_are_silent() -> None:
    async def scenario() -> None:
        world, net = World(), FakeNet()
        a = node(net, world, "lb1", ["10.0.0.1", "10.0.1.1"], ["10.0.0.2", "10.0.1.2"], 200)
        b = node(net, world, "lb2", ["10.0.0.2", "10.0.1.2"], ["10.0.0.1", "10.0.1.1"], 100)
        await a.ctl.start()
        await b.ctl.start()
        await asyncio.sleep(1.0)
        paths = b.ctl.status().peers[0].paths
        assert [p.address for p in paths] == ["10.0.0.1", "10.0.1.1"]
        net.cut |= {"10.0.0.1", "10.0.0.2"}  # first network down
        await asyncio.sleep(2.0)
        assert (a.ctl.role, b.ctl.role) == (Role.MASTER, Role.BACKUP)
        st = b.ctl.status()
        assert st.peers[0].paths[0].last_heard_age_s > 1.9  # the operator sees which path
        assert st.peers[0].paths[1].last_heard_age_s < INTERVAL_S + 0.01
        assert st.counters.duplicates > 0 and st.counters.rejected == {}
        t0 = now()
        net.cut |= {"10.0.1.1", "10.0.1.2"}  # second one too: now the peer is dead
        await wait_for(lambda: b.vip.holding)
        assert MD_B - INTERVAL_S <= now() - t0 <= MD_B + ACQUIRE_S + 0.002
        await stop_all(a, b)

    run_virtual(scenario)


def test_forged_truncated_replayed_packets_are_counted_and_change_nothing() -> None:
    async def scenario() -> None:
        world, net = World(), FakeNet()
        captured: list[bytes] = []
        net.taps.append(lambda data, src, dst: captured.append(data) if src == "10.0.0.1"
                        else None)
        a, b = await pair(world, net)
        await asyncio.sleep(1.0)
        from failover.core.codec import Heartbeat, HeartbeatFlags, encode
        forged = encode(Heartbeat(name="lb1", role=Role.MASTER, priority=255, epoch=1, seq=1,
                                  timestamp_ms=int((1.75e9 + now()) * 1000),
                                  flags=HeartbeatFlags.HEALTHY), b"wrong-key-wrong-key!")
        target: FakeTransport = b.ctl._transport  # type: ignore[assignment]
        old = captured[5]
        for _ in range(20):
            target.receive(forged, ("10.0.0.1", 5405))  # spoofs the peer: the MAC catches it
            target.receive(forged, ("10.0.0.66", 5405))  # not a peer: dropped before the MAC
            target.receive(old, ("10.0.0.1", 5405))
            target.receive(old[:40], ("10.0.0.1", 5405))
            target.receive(os.urandom(120), ("10.0.0.1", 5405))
            target.receive(b"", ("10.0.0.1", 5405))
        # Stop A's real heartbeats: replays of them must not keep A alive either.
        t0 = now()
        await a.ctl.stop(graceful=False)
        for _ in range(20):
            await asyncio.sleep(INTERVAL_S)
            target.receive(captured[-1], ("10.0.0.1", 5405))
        assert b.vip.holding
        assert world.first("lb2", "acquired", t0) - t0 <= MD_B + ACQUIRE_S + 0.002
        rejected = b.ctl.status().counters.rejected
        assert rejected[R.BAD_MAC] == 20 and rejected[R.TRUNCATED] >= 40
        assert rejected[R.REPLAYED] >= 20 and rejected.get(R.BAD_MAGIC, 0) >= 19
        assert rejected[R.UNKNOWN_SOURCE] == 20
        await stop_all(b)

    run_virtual(scenario)


# -- key rotation -----------------------------------------------------------------------------

NEW_KEY = b"pair-test-NEW-key-9876543210fedcba"


def _reload_keys(n: Node, keys: Sequence[bytes]) -> None:
    """What a reload with failover.key_files = [...] does to the running controller."""
    spec = dataclasses.replace(n.ctl.spec, key=keys[0], verify_keys=tuple(keys[1:]))
    assert n.ctl.reconfigure(spec) == ()  # nothing that waits for a restart


def test_key_rotation_step_by_step_with_reloads_never_changes_a_role() -> None:
    """docs/operations.md, "Rotating the failover key": new key second on both, reload
    both; new key first on both, reload both; old key removed, reload both. Between any two
    reloads the nodes run with different key lists for longer than master_down, and at no
    step may a heartbeat be rejected or a role change."""
    async def scenario() -> None:
        world, net = World(), FakeNet()
        a, b = await pair(world, net)
        await asyncio.sleep(1.0)
        assert (a.ctl.role, b.ctl.role) == (Role.MASTER, Role.BACKUP)
        t0 = now()
        roles = (len(a.roles), len(b.roles))
        old_id, new_id = key_id(KEY), key_id(NEW_KEY)
        steps = [(a, [KEY, NEW_KEY]), (b, [KEY, NEW_KEY]),   # 1. accept the new key
                 (a, [NEW_KEY, KEY]), (b, [NEW_KEY, KEY]),   # 2. sign with it
                 (a, [NEW_KEY]), (b, [NEW_KEY])]             # 3. forget the old one
        for i, (n, keys) in enumerate(steps):
            _reload_keys(n, keys)
            await asyncio.sleep(3 * MD_B)  # the other node reloads much later
            for x in (a, b):
                st = x.ctl.status()
                assert st.counters.rejected == {}, (i, x.ctl.spec.node_name, st.counters)
                assert [k.key_id for k in st.keys] == [key_id(k) for k in x.ctl.spec.keys]
                assert st.peers[0].alive
            assert (len(a.roles), len(b.roles)) == roles, i
            assert (a.ctl.role, b.ctl.role) == (Role.MASTER, Role.BACKUP), i
        assert world.holders == {"lb1"} and world.max_overlap_s(t0) == 0.0
        assert world.gaps_after(t0) == []
        for x in (a, b):
            st = x.ctl.status()
            assert [(k.key_id, k.signing) for k in st.keys] == [(new_id, True)]
            assert st.peers[0].key_id == new_id  # the peer signs with the new key now
            assert st.counters.verified[old_id] > 0 and st.counters.verified[new_id] > 0
        await stop_all(a, b)

    run_virtual(scenario)


def test_a_key_swapped_on_one_node_only_is_a_split_brain() -> None:
    """The control experiment: the shortcut the procedure avoids (replace the key on one
    node, then the other) rejects every heartbeat in between, and both become MASTER."""
    async def scenario() -> None:
        world, net = World(), FakeNet()
        a, b = await pair(world, net)
        await asyncio.sleep(1.0)
        t0 = now()
        _reload_keys(a, [NEW_KEY])
        await wait_for(lambda: b.ctl.role is Role.MASTER, 2 * MD_B)
        assert a.ctl.role is Role.MASTER and world.max_overlap_s(t0) == 0.0  # still both
        assert b.ctl.status().counters.rejected[R.BAD_MAC] > 0
        _reload_keys(b, [NEW_KEY])
        await wait_for(lambda: b.ctl.role is Role.BACKUP)
        await stop_all(a, b)

    run_virtual(scenario)


# -- the advertised interval ------------------------------------------------------------------


def test_a_peer_interval_far_longer_than_ours_is_clamped_and_bounds_the_takeover() -> None:
    async def scenario() -> None:
        world, net = World(), FakeNet()
        # lb1 advertises 0.6 s: 12 x lb2's 0.05 s. lb2 uses 10 x = 0.5 s for it.
        a, b = await pair(world, net, a_kw={"interval_s": 0.6})
        await asyncio.sleep(5.0)
        assert (a.ctl.role, b.ctl.role) == (Role.MASTER, Role.BACKUP)  # no false failover
        st = b.ctl.status()
        assert st.counters.interval_clamped.get("too_long", 0) >= 5
        assert st.peers[0].interval_s == pytest.approx(0.5)
        # And lb1 sees lb2's 0.05 s as below 0.6 / 10: clamped up to 0.06 s.
        assert a.ctl.status().peers[0].interval_s == pytest.approx(0.06)
        await wait_for(lambda: b.ctl.status().peers[0].last_heard_age_s < 0.001, 2.0)
        t_kill = now()
        await a.ctl.stop(graceful=False)
        await wait_for(lambda: b.vip.holding, 5.0)
        took = now() - t_kill
        clamped, advertised = master_down_s(100, 0.5, 3), master_down_s(100, 0.6, 3)
        assert took == pytest.approx(clamped, abs=0.01), (took, clamped, advertised)
        await stop_all(b)

    run_virtual(scenario)


def test_a_peer_interval_far_shorter_than_ours_is_clamped_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The peer advertises 4 ms, below what our config allows (another build, or a forged
    # but signed value): lift the local bound for it alone.
    monkeypatch.setattr("failover.controller.INTERVAL_MIN_S", 0.001)

    async def scenario() -> None:
        world, net = World(), FakeNet()
        a, b = await pair(world, net, a_kw={"interval_s": 0.004})
        await asyncio.sleep(1.0)
        st = b.ctl.status()
        assert st.counters.interval_clamped.get("too_short", 0) > 0
        assert st.peers[0].interval_s == pytest.approx(0.005)
        assert (a.ctl.role, b.ctl.role) == (Role.MASTER, Role.BACKUP)
        await stop_all(a, b)

    run_virtual(scenario)


def test_an_interval_no_config_can_send_is_rejected_and_changes_nothing() -> None:
    async def scenario() -> None:
        world, net = World(), FakeNet()
        a, b = await pair(world, net)
        await asyncio.sleep(1.0)
        target: FakeTransport = b.ctl._transport  # type: ignore[assignment]
        absurd = encode(Heartbeat(name="lb3", role=Role.MASTER, priority=255, epoch=5, seq=1,
                                  timestamp_ms=int((1.75e9 + now()) * 1000),
                                  interval_ms=3_600_000, flags=HeartbeatFlags.HEALTHY), KEY)
        target.receive(absurd, ("10.0.0.1", 5405))
        await asyncio.sleep(0.5)
        st = b.ctl.status()
        assert st.counters.rejected == {R.BAD_INTERVAL: 1}
        assert [p.name for p in st.peers] == ["lb1"] and b.ctl.role is Role.BACKUP
        await stop_all(a, b)

    run_virtual(scenario)


# -- clocks -----------------------------------------------------------------------------------


def test_peer_clock_offset_is_measured_and_warned_past_half_the_window(
        caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        world, net = World(), FakeNet()
        # lb2's clock is 20 s behind lb1's: inside the 30 s window, past half of it.
        a, b = await pair(world, net, b_kw={"wall_offset_s": -20.0})
        await asyncio.sleep(2.0)
        sa, sb = a.ctl.status(), b.ctl.status()
        assert (a.ctl.role, b.ctl.role) == (Role.MASTER, Role.BACKUP)
        # Its clock minus ours, less the one-way delay (LATENCY_S).
        assert sa.peers[0].clock_offset_s == pytest.approx(-20.0 - LATENCY_S, abs=0.0011)
        assert sb.peers[0].clock_offset_s == pytest.approx(20.0 - LATENCY_S, abs=0.0011)
        assert sa.clock_skew_warning and sb.clock_skew_warning
        assert sa.peers[0].clock_skew_warning and sa.max_clock_skew_s == 30.0
        await stop_all(a, b)

    with caplog.at_level("WARNING", logger="failover.controller"):
        run_virtual(scenario)
    warnings = [r for r in caplog.records if "failover_peer_clock_skew " in r.getMessage()]
    assert len(warnings) == 2  # one per node: rate-limited, not one per heartbeat


@pytest.mark.parametrize("window_s", [30.0, 60.0])
def test_clocks_apart_beyond_the_window_are_two_masters_and_the_setting_fixes_it(
        window_s: float) -> None:
    """40 s apart: with the default 30 s window each rejects the other's start as STALE and
    both hold the VIP (the issue-12 failure); with max_clock_skew_s = 60 they pair up."""
    async def scenario() -> None:
        world, net = World(), FakeNet()
        kw = {"max_clock_skew_s": window_s}
        a, b = await pair(world, net, a_kw=kw, b_kw={**kw, "wall_offset_s": 40.0})
        await asyncio.sleep(2.0)
        sa, sb = a.ctl.status(), b.ctl.status()
        if window_s == 30.0:
            assert (a.ctl.role, b.ctl.role) == (Role.MASTER, Role.MASTER)
            assert sa.counters.rejected[R.STALE] > 0 and sa.peers == ()
            assert [(c.name, round(c.offset_s)) for c in sa.rejected_clocks] == [("lb2", 40)]
            assert [(c.name, round(c.offset_s)) for c in sb.rejected_clocks] == [("lb1", -40)]
        else:
            assert (a.ctl.role, b.ctl.role) == (Role.MASTER, Role.BACKUP)
            assert sa.rejected_clocks == () and sa.counters.rejected == {}
            assert sa.peers[0].clock_offset_s == pytest.approx(40.0, abs=0.002)
            assert sa.clock_skew_warning  # 40 > 60 / 2
        await stop_all(a, b)

    run_virtual(scenario)


# -- the partition guard (failover.track_gateway) ---------------------------------------------


class FakeGateway:
    """Which nodes reach the gateway; probes answer after GW_RTT_S or time out."""

    def __init__(self) -> None:
        self.reachable: dict[str, bool] = {}
        self.probes: dict[str, int] = {}

    def probe_for(self, name: str) -> ProbeFn:
        async def probe(target: Target, timeout_s: float) -> ProbeResult:
            self.probes[name] = self.probes.get(name, 0) + 1
            if self.reachable.get(name, True):
                await asyncio.sleep(GW_RTT_S)
                return ProbeResult(True, "refused", GW_RTT_S)
            await asyncio.sleep(timeout_s)
            return ProbeResult(False, "timeout")

        return probe


GW_RTT_S = 0.0003
GW = {"track_gateway": ("192.0.2.254:22",), "track_gateway_interval_s": 0.1,
      "track_gateway_timeout_s": 0.1, "track_gateway_fall": 2, "track_gateway_rise": 2}
GUARD_S = 2 * 0.1 + 0.1  # fall rounds (the second one's timeout included)


async def guarded_pair(world: World, net: FakeNet, gw: FakeGateway) -> tuple[Node, Node]:
    return await pair(world, net, a_kw={**GW, "gateway_probe": gw.probe_for("lb1")},
                      b_kw={**GW, "gateway_probe": gw.probe_for("lb2")})


def test_gateway_lost_by_the_master_moves_the_vip_and_comes_back() -> None:
    async def scenario() -> None:
        world, net, gw = World(), FakeNet(), FakeGateway()
        a, b = await guarded_pair(world, net, gw)
        await asyncio.sleep(1.0)
        assert (a.ctl.role, b.ctl.role) == (Role.MASTER, Role.BACKUP)
        # Joined through FAULT: not one moment as a candidate before the first answer.
        assert [(o, n) for _, o, n in a.roles][:2] == [(Role.INIT, Role.FAULT),
                                                        (Role.FAULT, Role.BACKUP)]
        assert a.ctl.status().gateway is not None and a.ctl.status().gateway.up
        t0 = now()
        gw.reachable["lb1"] = False
        await wait_for(lambda: a.ctl.role is Role.FAULT)
        t_fault = now()
        assert t_fault - t0 <= GUARD_S + 0.1 + 0.001
        assert a.ctl.status().faults == ("gateway",)
        # lb2 hears lb1 say FAULT: it takes over at once, not after master_down.
        t_b = await wait_for(lambda: b.vip.holding)
        assert t_b - t_fault <= INTERVAL_S + ACQUIRE_S + 2 * LATENCY_S
        assert world.max_overlap_s(t0) == 0.0
        await asyncio.sleep(1.0)
        assert a.ctl.role is Role.FAULT and world.holders == {"lb2"}
        gw.reachable["lb1"] = True
        await wait_for(lambda: a.ctl.role is Role.MASTER, 2.0)  # rise, BACKUP, preempt
        await asyncio.sleep(0.1)
        assert world.holders == {"lb1"}
        st = a.ctl.status().gateway
        assert st is not None and st.transitions == 2 and st.targets[0].failures >= 2
        await stop_all(a, b)

    run_virtual(scenario)


def test_a_master_cut_off_from_peer_and_gateway_gives_the_vip_up() -> None:
    """Without the guard an isolated MASTER whose link stays up keeps the VIP and the pair
    has two MASTERs for as long as the cut lasts; with it, the overlap ends after the
    guard's fall rounds."""
    async def scenario() -> None:
        world, net, gw = World(), FakeNet(), FakeGateway()
        a, b = await guarded_pair(world, net, gw)
        await asyncio.sleep(1.0)
        t0 = now()
        net.partition(a.ctl._transport, b.ctl._transport)  # type: ignore[arg-type]
        gw.reachable["lb1"] = False
        await wait_for(lambda: b.vip.holding)
        await wait_for(lambda: a.ctl.role is Role.FAULT)
        await asyncio.sleep(2.0)
        assert world.holders == {"lb2"} and a.ctl.role is Role.FAULT
        assert world.max_overlap_s(t0) <= GUARD_S + 0.1 - MD_B + 0.01
        await stop_all(a, b)

    run_virtual(scenario)


def test_a_backup_cut_off_from_the_gateway_never_claims() -> None:
    async def scenario() -> None:
        world, net, gw = World(), FakeNet(), FakeGateway()
        gw.reachable["lb2"] = False  # from the start: it never had an answer
        a, b = await guarded_pair(world, net, gw)
        await asyncio.sleep(1.0)
        assert b.ctl.role is Role.FAULT and b.ctl.status().gateway.up is False  # type: ignore[union-attr]
        await a.ctl.stop(graceful=False)  # the MASTER dies: the only candidate is cut off
        await asyncio.sleep(2.0)
        assert world.count("lb2", "acquired") == 0 and b.ctl.role is Role.FAULT
        gw.reachable["lb2"] = True  # one answer after start-up is enough
        await wait_for(lambda: b.vip.holding, 1.0)
        await stop_all(b)

    run_virtual(scenario)


def test_a_dead_tracker_keeps_the_node_out_of_the_election() -> None:
    async def scenario() -> None:
        world, net, gw = World(), FakeNet(), FakeGateway()
        a, b = await guarded_pair(world, net, gw)
        await asyncio.sleep(1.0)
        assert a.ctl._tracker_task is not None
        a.ctl._tracker_task.cancel()  # only stop() cancels it; here: make room for a broken one
        await asyncio.sleep(0.5)
        assert a.ctl.role is Role.MASTER

        async def broken() -> None:
            raise RuntimeError("a bug in the tracker")

        a.ctl._tracker_task = asyncio.create_task(broken())
        a.ctl._tracker_task.add_done_callback(a.ctl._tracker_done)
        await wait_for(lambda: a.ctl.role is Role.FAULT and b.vip.holding, 1.0)
        await stop_all(a, b)

    run_virtual(scenario)


# -- hooks (real loop, real scripts) ---------------------------------------------------------


def _script(path: str, body: str) -> str:
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, stat.S_IRWXU)
    return path


def _lines(path: str) -> list[str]:
    with open(path) as f:
        return f.read().splitlines()


def test_hooks_run_in_order_with_timeout_and_never_block(tmp_path: Any) -> None:
    out = os.path.join(tmp_path, "out")
    first = _script(os.path.join(tmp_path, "first"),
                    f'echo "first $1 $2 $3 $PAIRLB_REASON" >> {out}')
    slow = _script(os.path.join(tmp_path, "slow"), f"echo slow-$2 >> {out}; sleep 30")
    failing = _script(os.path.join(tmp_path, "failing"), "echo boom >&2; exit 3")

    async def scenario() -> None:
        runner = HookRunner([first, slow, failing, os.path.join(tmp_path, "missing")],
                            node="lb1", timeout_s=0.3)
        task = asyncio.create_task(runner.run())
        t0 = time.monotonic()
        runner.notify("backup", "master", "no master")
        runner.notify("master", "backup", "yielded")
        assert time.monotonic() - t0 < 0.01  # enqueue only
        assert await runner.drain(5.0)
        task.cancel()
        lines = _lines(out)
        assert lines == ["first backup master lb1 no master", "slow-master",
                         "first master backup lb1 yielded", "slow-backup"]
        assert runner.runs == 8 and runner.timeouts == 2 and runner.failures == 6
        results = list(runner.recent)
        assert results[1].timed_out and 0.3 <= results[1].duration_s < 2.0
        assert results[2].returncode == 3 and results[2].output_tail == "boom"
        assert results[3].returncode is None and results[3].error

    asyncio.run(scenario())


def test_controller_runs_hooks_on_transitions(tmp_path: Any) -> None:
    out = os.path.join(tmp_path, "out")
    hook = _script(os.path.join(tmp_path, "hook"), f'echo "$1 $2 $3" >> {out}')

    async def scenario() -> None:
        world, net = World(), FakeNet()
        a = node(net, world, "lb1", ["10.0.0.1"], ["10.0.0.2"], 200, notify=(hook,))
        await a.ctl.start()
        await wait_for(lambda: a.ctl.role is Role.MASTER, step_s=0.01)
        await a.ctl.stop()
        assert _lines(out) == [
            "init backup lb1", "backup master lb1", "master init lb1"]

    asyncio.run(scenario())

