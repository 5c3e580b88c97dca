"""Ring 4 on loopback: the UDP transport, and two controllers talking over real sockets.

Each controller runs on its own event loop in its own thread, as two processes would, so
a stall of one loop does not stall the other. The VIP is a fake that records when it was
taken (no root needed). Takeover times and heartbeat send lateness measured here are
printed (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from failover import FailoverController, FailoverSpec, Role, UdpTransport, master_down_s
from failover.adapters.transport import TransportError, parse_peer
from failover.core.codec import Heartbeat, HeartbeatFlags, decode, encode
from failover.core.codec import RejectReason as R
from lab.ports import free_udp_port

KEY = os.urandom(32)
T = TypeVar("T")


# -- parse_peer and the transport ---------------------------------------------------------------


@pytest.mark.parametrize("text,want", [
    ("192.0.2.1", ("192.0.2.1", 5405)),
    ("192.0.2.1:6000", ("192.0.2.1", 6000)),
    ("2001:db8::1", ("2001:db8::1", 5405)),
    ("[2001:db8::1]", ("2001:db8::1", 5405)),
    ("[2001:db8::1]:7000", ("2001:db8::1", 7000)),
    (" 10.0.0.1 ", ("10.0.0.1", 5405)),
])
def test_parse_peer(text: str, want: tuple[str, int]) -> None:
    assert parse_peer(text) == want


@pytest.mark.parametrize("text", ["lb2", "10.0.0.1:0", "10.0.0.1:70000", "[::1", "[::1]x",
                                  "10.0.0.1:x", ""])
def test_parse_peer_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_peer(text)


def test_transport_config_errors_name_the_key() -> None:
    with pytest.raises(TransportError, match=r"failover\.peers"):
        UdpTransport(["nope"])
    with pytest.raises(TransportError, match=r"failover\.bind"):
        UdpTransport(["2001:db8::1"], bind="127.0.0.1")
    with pytest.raises(TransportError, match=r"failover\.multicast_group"):
        UdpTransport([], multicast_group="10.0.0.1", interface="lo")
    with pytest.raises(TransportError, match="bind unset"):
        UdpTransport([], multicast_group="224.0.0.88", bind="127.0.0.1", interface="lo")


@pytest.mark.timeout(20)
def test_transport_delivers_and_survives_a_raising_callback() -> None:
    async def scenario() -> None:
        got: list[tuple[bytes, tuple[str, int]]] = []

        def on_datagram(data: bytes, source: tuple[str, int]) -> None:
            if data == b"boom":
                raise RuntimeError("a bug in the receiver")
            got.append((data, source))

        port = free_udp_port()
        rx = UdpTransport([], port=port, bind="127.0.0.1", multicast_group=None)
        rx._dests = ()  # a pure receiver
        await rx.start(on_datagram)
        tx = UdpTransport([f"127.0.0.1:{port}"], port=0, bind="127.0.0.1")
        await tx.start(lambda d, s: None)
        for payload in (b"one", b"boom", b"two"):
            for dest in tx.destinations():
                tx.send(payload, dest)
        for _ in range(200):
            if len(got) == 2:
                break
            await asyncio.sleep(0.005)
        assert [d for d, _ in got] == [b"one", b"two"]
        assert got[0][1] == tx.local_address
        assert rx.receive_errors == 1 and rx.datagrams_received == 3
        tx.close()
        rx.close()

    asyncio.run(scenario())


@pytest.mark.timeout(20)
def test_dual_stack_socket_reports_plain_ipv4_sources() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def scenario() -> None:
        got: list[tuple[str, int]] = []
        port = free_udp_port()
        rx = UdpTransport([], port=port, bind="::")
        try:
            await rx.start(lambda d, s: got.append(s))
        except TransportError as exc:
            pytest.skip(f"no IPv6 socket here: {exc}")
        tx = UdpTransport([f"127.0.0.1:{port}"], port=0, bind="::")
        await tx.start(lambda d, s: None)
        tx.send(b"x", tx.destinations()[0])
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.005)
        assert got and got[0][0] == "127.0.0.1"
        tx.close()
        rx.close()

    asyncio.run(scenario())


# -- two controllers, two loops ---------------------------------------------------------------


class LoopThread:
    """An event loop in a thread: one 'process' of the pair."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 15.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapped() -> T:
            return fn()

        return self.run(wrapped())

    def stall(self, seconds: float) -> None:
        """Block this loop as a CPU-bound callback or a hung syscall would."""
        self.loop.call_soon_threadsafe(time.sleep, seconds)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class RecordingVip:
    """A VIP that only records (time.monotonic) when it was taken and given back."""
    announcements_sent = 0
    announcement_errors = 0

    def __init__(self) -> None:
        self._holding = False
        self.acquired: list[float] = []
        self.released: list[float] = []
        self.announced: list[float] = []

    @property
    def holding(self) -> bool:
        return self._holding

    async def acquire(self) -> None:
        self._holding = True
        self.acquired.append(time.monotonic())

    async def release(self) -> None:
        self._holding = False
        self.released.append(time.monotonic())

    async def announce(self) -> None:
        self.announced.append(time.monotonic())

    async def remove_stale(self) -> list[str]:
        return []

    async def held(self) -> bool:
        return self._holding


class Member:
    def __init__(self, name: str, priority: int, port: int, peers: list[str],
                 interval_s: float) -> None:
        self.lt = LoopThread(name)
        self.vip = RecordingVip()
        spec = FailoverSpec(node_name=name, interface="lo", vips=("192.0.2.100/24",),
                            priority=priority, peers=tuple(peers), key=KEY, port=port,
                            bind="127.0.0.1", interval_s=interval_s)
        self.ctl = FailoverController(spec, self.vip)
        self.ctl.set_local_health(True, 1, 1)
        self.lt.run(self.ctl.start())

    @property
    def role(self) -> Role:
        return self.lt.call(lambda: self.ctl.role)

    def close(self) -> None:
        self.lt.run(self.ctl.stop(graceful=False))
        self.lt.close()


def wait_until(cond: Callable[[], bool], timeout_s: float = 5.0) -> float:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.001)
    return time.monotonic()


def make_pair(interval_s: float, extra_peer: int | None = None) -> tuple[Member, Member]:
    pa, pb = free_udp_port(), free_udp_port()
    a_peers = [f"127.0.0.1:{pb}"] + ([f"127.0.0.1:{extra_peer}"] if extra_peer else [])
    a = Member("lb1", 200, pa, a_peers, interval_s)
    b = Member("lb2", 100, pb, [f"127.0.0.1:{pa}"], interval_s)
    return a, b


@pytest.mark.timeout(60)
@pytest.mark.parametrize("interval_s", [0.05, 0.01])
def test_real_udp_election_and_kill_takeover_time(interval_s: float) -> None:
    md_b = master_down_s(100, interval_s, 3)
    takeovers: list[float] = []
    lags = []
    for _ in range(3):
        a, b = make_pair(interval_s)
        try:
            wait_until(lambda a=a: a.vip.holding)  # type: ignore[misc]
            time.sleep(20 * interval_s)
            assert (a.role, b.role) == (Role.MASTER, Role.BACKUP)
            assert not b.vip.acquired
            lags.append(a.lt.call(a.ctl.status).send_lag)
            t_kill = time.monotonic()
            a.lt.run(a.ctl.stop(graceful=False))  # kill -9: silent, VIP left in place
            wait_until(lambda b=b: b.vip.holding)  # type: ignore[misc]
            takeovers.append(b.vip.acquired[0] - t_kill)
        finally:
            a.close()
            b.close()
    med = statistics.median(takeovers)
    print(f"\ninterval {interval_s * 1000:.0f} ms: master_down {md_b * 1000:.1f} ms, "
          f"takeover after kill: {', '.join(f'{t * 1000:.1f}' for t in takeovers)} ms "
          f"(median {med * 1000:.1f}); send lag p50/p99/max "
          + "; ".join(f"{x.p50_s * 1000:.2f}/{x.p99_s * 1000:.2f}/{x.max_s * 1000:.2f} ms "
                      f"over {x.samples}" for x in lags))
    for t in takeovers:
        # The last heartbeat was heard at most ~one interval before the kill.
        assert md_b - interval_s - 0.02 <= t <= md_b + 0.05, t
    for x in lags:
        # Heartbeats leave on time (the peer allows 3 missed); slack for a loaded 2-core box.
        assert x.p99_s < max(interval_s, 0.02)


@pytest.mark.timeout(60)
def test_real_udp_forged_and_replayed_heartbeats_are_counted_and_change_nothing() -> None:
    sniff = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sniff.bind(("127.0.0.1", 0))
    sniff.settimeout(2.0)
    a, b = make_pair(0.05, extra_peer=sniff.getsockname()[1])
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        wait_until(lambda: a.vip.holding)
        captured = [sniff.recv(2048) for _ in range(10)]  # A's genuine heartbeats (to "C")
        assert decode(captured[-1], KEY).role is Role.MASTER
        time.sleep(0.2)
        b_port = b.ctl.spec.port
        forged = encode(Heartbeat(name="lb1", role=Role.MASTER, priority=255, epoch=42, seq=1,
                                  timestamp_ms=int(time.time() * 1000),
                                  flags=HeartbeatFlags.HEALTHY), b"x" * 32)
        # A forged MASTER with the top priority would make B... nothing, without the key.
        evil_master = encode(Heartbeat(name="lb9", role=Role.MASTER, priority=255, epoch=42,
                                       seq=1, timestamp_ms=int(time.time() * 1000),
                                       flags=HeartbeatFlags.HEALTHY), os.urandom(32))
        for pkt in ([forged, evil_master] * 10 + [c[:50] for c in captured]
                    + captured + [os.urandom(120) for _ in range(10)] + [b""]):
            attacker.sendto(pkt, ("127.0.0.1", b_port))
        time.sleep(0.3)
        st = b.lt.call(b.ctl.status)
        rej = st.counters.rejected
        assert rej[R.BAD_MAC] == 20 and rej[R.TRUNCATED] >= 11 and rej[R.REPLAYED] == 10
        assert rej.get(R.BAD_MAGIC, 0) + rej.get(R.TRUNCATED, 0) >= 20
        assert st.counters.internal_errors == 0
        assert [p.name for p in st.peers] == ["lb1"]  # no "lb9" ever appeared
        assert (a.role, b.role) == (Role.MASTER, Role.BACKUP) and not b.vip.acquired
        assert st.counters.transitions == {(Role.INIT, Role.BACKUP): 1}
    finally:
        attacker.close()
        sniff.close()
        a.close()
        b.close()


@pytest.mark.timeout(60)
def test_real_udp_stall_of_the_backup_is_no_false_failover() -> None:
    """B's loop is blocked for longer than master_down while A keeps sending."""
    a, b = make_pair(0.05)
    try:
        wait_until(lambda: a.vip.holding)
        time.sleep(0.3)
        md = master_down_s(100, 0.05, 3)
        b.lt.stall(md + 0.2)
        time.sleep(md + 0.5)
        assert (a.role, b.role) == (Role.MASTER, Role.BACKUP) and not b.vip.acquired
        assert b.lt.call(b.ctl.status).counters.late_sends >= 1  # the stall was real
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(60)
def test_real_udp_hung_master_is_replaced_and_pair_converges_when_it_wakes() -> None:
    a, b = make_pair(0.05)
    try:
        wait_until(lambda: a.vip.holding)
        time.sleep(0.3)
        short = master_down_s(100, 0.05, 3) - 0.1
        a.lt.stall(short)  # shorter than master_down: nobody notices
        time.sleep(short + 0.3)
        assert not b.vip.acquired
        t_hang = time.monotonic()
        a.lt.stall(1.0)  # SIGSTOP-like: B takes over within master_down
        wait_until(lambda: b.vip.holding)
        took = b.vip.acquired[0] - t_hang
        assert took <= master_down_s(100, 0.05, 3) + 0.03
        t_wake = t_hang + 1.0  # the stall began a little after t_hang, never before
        wait_until(lambda: not b.vip.holding, timeout_s=3)
        converged = b.vip.released[0] - t_wake
        assert (a.role, b.role) == (Role.MASTER, Role.BACKUP)
        assert a.vip.announced and a.vip.announced[-1] >= t_wake - 0.01  # clients told again
        print(f"\nhung master: B took over after {took * 1000:.1f} ms; "
              f"one holder again {converged * 1000:.1f} ms after A woke")
        assert converged < 0.05  # one interval, plus scheduling slack
    finally:
        a.close()
        b.close()


# -- real namespaces: multicast heartbeats, the real VIP adapter, a cut link ------------------


def _netns_skip() -> str | None:
    try:
        from lab import netns
    except ImportError:
        return "lab/netns.py not importable"
    return netns.skip_reason()


@pytest.mark.netns
@pytest.mark.timeout(90)
@pytest.mark.skipif(_netns_skip() is not None, reason=_netns_skip() or "")
def test_netns_multicast_pair_moves_the_real_vip_on_link_cut_and_removes_stale() -> None:
    from failover.adapters.vip import VipAdapter
    from lab import netns

    group = "224.0.0.88"
    with netns.build(["lb1", "lb2"]) as topo:
        vip = f"{topo.host4(100)}/24"
        running: dict[str, tuple[FailoverController, asyncio.Task[None]]] = {}

        def start(name: str, priority: int) -> None:
            async def go() -> None:
                adapter = VipAdapter("eth0", [vip], garp_count=1, garp_repeat_after_s=None)
                spec = FailoverSpec(node_name=name, interface="eth0", vips=(vip,),
                                    priority=priority, peers=(), multicast_group=group,
                                    key=KEY, address=topo[name].ipv4, interval_s=0.05)
                ctl = FailoverController(spec, adapter)
                ctl.set_local_health(True, 1, 1)
                await ctl.start()
                watch = asyncio.create_task(adapter.watch_carrier(["eth0"], ctl.carrier_changed))
                running[name] = (ctl, watch)

            loops[name].run(go())

        def role(name: str) -> Role:
            return loops[name].run(_get_role(running[name][0]))

        def has_vip(name: str) -> bool:
            return vip in topo.addresses(name)

        loops = {"lb1": topo.loop("lb1"), "lb2": topo.loop("lb2")}
        start("lb1", 200)
        start("lb2", 100)
        wait_until(lambda: has_vip("lb1") and role("lb2") is Role.BACKUP, timeout_s=5)
        time.sleep(0.3)
        assert not has_vip("lb2")
        assert role("lb1") is Role.MASTER
        st = loops["lb2"].run(_get_status(running["lb2"][0]))
        assert [p.name for p in st.peers] == ["lb1"]  # heard over multicast
        assert st.peers[0].paths[0].address == topo["lb1"].ipv4

        # Cable cut: lb1 sees no carrier -> FAULT, drops the VIP; lb2 takes it.
        t_cut = time.monotonic()
        topo.cut_link("lb1")
        wait_until(lambda: has_vip("lb2"), timeout_s=5)
        took = time.monotonic() - t_cut
        wait_until(lambda: not has_vip("lb1"), timeout_s=5)
        assert role("lb1") is Role.FAULT
        # Link back: BACKUP first, then preempt (healthy, priority 200).
        topo.restore_link("lb1")
        wait_until(lambda: role("lb1") is Role.MASTER and not has_vip("lb2"), timeout_s=5)
        assert has_vip("lb1")
        print(f"\nnetns link cut: VIP on lb2 after {took * 1000:.0f} ms (includes ip polling)")

        # kill -9 of lb1: the VIP stays on its interface; a new start removes it first.
        ctl1, watch1 = running.pop("lb1")
        loops["lb1"].run(_abort(ctl1, watch1))
        assert has_vip("lb1")
        wait_until(lambda: has_vip("lb2"), timeout_s=5)  # lb2 took over meanwhile
        start("lb1", 200)
        wait_until(lambda: role("lb1") is Role.MASTER and not has_vip("lb2"), timeout_s=5)
        for name, (ctl, watch) in running.items():
            loops[name].run(_abort(ctl, watch, release=True))


async def _get_role(ctl: FailoverController) -> Role:
    return ctl.role


async def _get_status(ctl: FailoverController) -> Any:
    return ctl.status()


async def _abort(ctl: FailoverController, watch: asyncio.Task[None],
                 release: bool = False) -> None:
    watch.cancel()
    await asyncio.gather(watch, return_exceptions=True)
    if release:
        await ctl.stop()
    else:
        await ctl.stop(graceful=False)
