"""VIP adapter against the real kernel: addresses appear and go, clients follow the VIP to its
new holder because of our gratuitous ARP / unsolicited NA, leftovers of a kill -9 are removed,
and link cuts are reported.

Topology: client, lb1, lb2 (IPv4 + IPv6) and be1 (IPv4 only) on one bridge, in namespaces
(lab/netns.py). Needs root; skipped otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from failover.adapters.vip import VipAdapter, VipError
from failover.core.ports import FailoverError, VipPort
from lab import netns

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns.skip_reason() is not None, reason=netns.skip_reason() or ""),
    pytest.mark.timeout(30),
]

ETH_P_ALL = 0x0003

Make = Callable[..., tuple[netns.NetnsLoop, VipAdapter]]


@pytest.fixture
def topo() -> Iterator[netns.Topology]:
    with netns.build(["client", "lb1", "lb2", "be1"], ipv6=["client", "lb1", "lb2"]) as t:
        yield t


def vip4(topo: netns.Topology) -> str:
    return f"{topo.host4(100)}/24"


def vip6(topo: netns.Topology) -> str:
    return f"{topo.host6(100)}/64"


@pytest.fixture
def make(topo: netns.Topology) -> Iterator[Make]:
    """make(node, **kwargs) -> (loop in that node, VipAdapter for eth0 with both VIPs)."""
    made: list[tuple[netns.NetnsLoop, VipAdapter]] = []

    def _make(node: str, vips: list[str] | None = None, **kwargs: Any
              ) -> tuple[netns.NetnsLoop, VipAdapter]:
        loop = topo.loop(node)
        adapter = VipAdapter("eth0", vips or [vip4(topo), vip6(topo)], **kwargs)
        made.append((loop, adapter))
        return loop, adapter

    yield _make
    for loop, adapter in made:
        with contextlib.suppress(Exception):
            loop.run(adapter.close())


def timed(coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, float]:
    """Wrap a coroutine so it returns how long it took, measured on its own loop."""
    async def run() -> float:
        started = time.perf_counter()
        await coro
        return time.perf_counter() - started
    return run()


def wait_for(pred: Callable[[], bool], timeout_s: float = 2.0) -> float:
    """Seconds until pred() held; fails the test after timeout_s."""
    started = time.perf_counter()
    while not pred():
        if time.perf_counter() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(0.002)
    return time.perf_counter() - started


def addr_info(topo: netns.Topology, node: str) -> list[dict[str, Any]]:
    info: list[dict[str, Any]] = topo.ip_json(node, "addr", "show", "dev", "eth0")[0]["addr_info"]
    return info


def cidrs(topo: netns.Topology, node: str) -> list[str]:
    return [f"{a['local']}/{a['prefixlen']}" for a in addr_info(topo, node)]


# -- addresses -----------------------------------------------------------------------------


def test_acquire_adds_both_vips_idempotently_and_release_removes_them(
    topo: netns.Topology, make: Make, record_property: Callable[[str, object], None],
) -> None:
    loop, vip = make("lb1")
    own = set(cidrs(topo, "lb1"))

    took_s = loop.run(timed(vip.acquire()))
    record_property("acquire_s", round(took_s, 4))
    assert took_s < 0.5
    assert loop.run(vip.held()) and vip.holding
    info = {f"{a['local']}/{a['prefixlen']}": a for a in addr_info(topo, "lb1")}
    assert vip4(topo) in info and vip6(topo) in info
    assert info[vip6(topo)].get("nodad") is True, "IPv6 VIP must skip DAD"
    assert "tentative" not in info[vip6(topo)]

    loop.run(vip.acquire())  # already there: fine, and still there once
    assert sorted(cidrs(topo, "lb1")) == sorted(own | {vip4(topo), vip6(topo)})

    loop.run(vip.release())
    loop.run(vip.release())  # already gone: fine
    assert set(cidrs(topo, "lb1")) == own
    assert not loop.run(vip.held()) and not vip.holding


def test_remove_stale_removes_the_vips_a_killed_node_left_behind(
    topo: netns.Topology, make: Make,
) -> None:
    own = set(cidrs(topo, "lb1"))
    script = (
        "import asyncio, sys\n"
        "from failover.adapters.vip import VipAdapter\n"
        "async def main():\n"
        f"    await VipAdapter('eth0', {[vip4(topo), vip6(topo)]!r}).acquire()\n"
        "    print('held', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    proc = topo.popen("lb1", [sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"held\n"
    proc.kill()  # kill -9: no chance to clean up
    proc.wait(timeout=5)
    proc.stdout.close()
    # A leftover at another prefix length (an older config) is ours too.
    topo.run("lb1", ["ip", "addr", "add", f"{topo.host4(100)}/32", "dev", "eth0"])
    left = set(cidrs(topo, "lb1"))
    assert left == own | {vip4(topo), vip6(topo), f"{topo.host4(100)}/32"}

    loop, vip = make("lb1")
    removed = loop.run(vip.remove_stale())
    assert sorted(removed) == sorted(left - own)
    assert set(cidrs(topo, "lb1")) == own, "the node's own addresses must stay"
    assert loop.run(vip.remove_stale()) == []


# -- announcements ---------------------------------------------------------------------------


def learn_vip(topo: netns.Topology) -> None:
    """Make the client talk to the VIP so its neighbour table holds the holder's MAC."""
    assert topo.tcp_probe("client", topo.host4(100), 9).reachable
    assert topo.tcp_probe("client", topo.host6(100), 9).reachable


def client_macs(topo: netns.Topology) -> tuple[str | None, str | None]:
    return topo.neighbour("client", topo.host4(100)), topo.neighbour("client", topo.host6(100))


def test_client_follows_the_vip_to_the_new_holder_without_sending_anything(
    topo: netns.Topology, make: Make, record_property: Callable[[str, object], None],
) -> None:
    loop1, vip1 = make("lb1")
    loop2, vip2 = make("lb2")
    lb1, lb2 = topo["lb1"].mac, topo["lb2"].mac
    loop1.run(vip1.acquire())
    learn_vip(topo)
    assert client_macs(topo) == (lb1, lb1)

    loop1.run(vip1.release())
    started = time.perf_counter()
    loop2.run(vip2.acquire())
    flipped_s = started + wait_for(lambda: client_macs(topo) == (lb2, lb2), 1.0)
    record_property("neighbour_flip_s", round(flipped_s - started, 4))
    # Without a single packet from the client: only our GARP and NA can have done this.
    assert topo.tcp_probe("client", topo.host4(100), 9).reachable


def test_without_announcements_the_client_stays_on_the_old_mac_until_announce(
    topo: netns.Topology, make: Make,
) -> None:
    loop1, vip1 = make("lb1")
    loop2, silent = make("lb2", garp_count=0)
    lb1, lb2 = topo["lb1"].mac, topo["lb2"].mac
    loop1.run(vip1.acquire())
    learn_vip(topo)
    loop1.run(vip1.release())

    loop2.run(silent.acquire())
    time.sleep(0.3)
    assert client_macs(topo) == (lb1, lb1), "the client should still point at lb1"

    # The loser must not announce what it no longer holds (that would steal the VIP back).
    sent = vip1.announcements_sent
    loop1.run(vip1.announce())
    assert vip1.announcements_sent == sent

    # The winner's announce() (a healed partition) moves the client at once.
    _, loud = make("lb2", garp_count=3)
    loop2.run(loud.announce())
    wait_for(lambda: client_macs(topo) == (lb2, lb2), 1.0)


@dataclass(frozen=True)
class Seen:
    """One announcement as the client received it."""

    at_s: float
    kind: str  # "arp-request", "arp-reply", "na"
    mac: str
    address: str


def _mac(raw: bytes) -> str:
    return raw.hex(":")


def parse_announcement(frame: bytes, at_s: float) -> Seen | None:
    """Decode a GARP or unsolicited NA and check every field receivers care about."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == 0x0806:
        htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, 14)
        sha, spa, tha, tpa = frame[22:28], frame[28:32], frame[32:38], frame[38:42]
        if spa != tpa:
            return None  # ordinary resolution traffic, not an announcement
        assert (htype, ptype, hlen, plen) == (1, 0x0800, 6, 4)
        assert frame[0:6] == b"\xff" * 6, "GARP must be broadcast"
        assert frame[6:12] == sha
        if op == 2:
            assert tha == sha, "Linux ignores a gratuitous reply unless tha == sha"
        return Seen(at_s, "arp-request" if op == 1 else "arp-reply", _mac(sha),
                    socket.inet_ntoa(spa))
    if ethertype == 0x86DD and frame[20] == 58 and frame[54] == 136:
        hop_limit = frame[21]
        dst = socket.inet_ntop(socket.AF_INET6, frame[38:54])
        flags = struct.unpack_from("!I", frame, 58)[0]
        target = socket.inet_ntop(socket.AF_INET6, frame[62:78])
        opt_type, opt_len = frame[78], frame[79]
        assert hop_limit == 255, "receivers drop ND with hop limit != 255"
        assert dst == "ff02::1"
        assert flags & 0x20000000, "Override flag must be set"
        assert not flags & 0x40000000, "Solicited flag must be clear"
        assert (opt_type, opt_len) == (2, 1)
        assert frame[80:86] == frame[6:12], "target link-layer address is the sender's MAC"
        return Seen(at_s, "na", _mac(frame[80:86]), target)
    return None


class Capture:
    """A raw packet socket on the client's eth0: what the client's NIC actually receives."""

    def __init__(self, topo: netns.Topology) -> None:
        def open_socket() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            s.bind(("eth0", 0))
            s.setblocking(False)
            return s

        self.sock = topo.call("client", open_socket)  # lives in the client namespace
        self.t0 = time.perf_counter()

    def collect(self, until_s: float) -> list[Seen]:
        """Announcements seen until `until_s` after the capture started."""
        out: list[Seen] = []
        while (left := self.t0 + until_s - time.perf_counter()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                continue
            frame = self.sock.recv(2048)
            seen = parse_announcement(frame, time.perf_counter() - self.t0)
            if seen is not None:
                out.append(seen)
        return out

    def close(self) -> None:
        self.sock.close()


def test_announcements_on_the_wire_burst_then_repeat_and_stop_on_release(
    topo: netns.Topology, make: Make,
) -> None:
    loop, vip = make("lb2", garp_count=3, garp_interval_s=0.02, garp_repeat_after_s=0.4)
    mac, v4, v6 = topo["lb2"].mac, topo.host4(100), topo.host6(100)
    cap = Capture(topo)
    try:
        loop.run(vip.acquire())
        seen = cap.collect(0.7)
        loop.run(vip.release())
        assert {(s.mac, s.address) for s in seen} == {(mac, v4), (mac, v6)}
        kinds = [s.kind for s in seen]
        # Per round: ARP request + ARP reply for the IPv4 VIP, one NA for the IPv6 VIP.
        assert kinds.count("arp-request") == kinds.count("arp-reply") == kinds.count("na") == 6
        burst = [s for s in seen if s.at_s < 0.3]
        repeat = [s for s in seen if s.at_s >= 0.3]
        assert len(burst) == len(repeat) == 9, [(round(s.at_s, 3), s.kind) for s in seen]
        assert burst[-1].at_s - burst[0].at_s >= 0.03, "rounds are spaced by garp_interval_s"
        assert repeat[0].at_s - burst[0].at_s >= 0.38, "the repeat comes garp_repeat_after_s later"

        # release() cancels what is still scheduled: nothing after it.
        cap.t0 = time.perf_counter()
        loop.run(vip.acquire())
        loop.run(vip.release())
        released_at = time.perf_counter() - cap.t0
        late = [s for s in cap.collect(0.6) if s.at_s > released_at + 0.01]
        assert late == [], late
    finally:
        cap.close()


# -- link state ----------------------------------------------------------------------------


def test_carrier_watcher_reports_link_cut_and_restore(
    topo: netns.Topology, make: Make, record_property: Callable[[str, object], None],
) -> None:
    loop, vip = make("lb1")
    events: queue.Queue[tuple[str, bool, float]] = queue.Queue()
    calls = 0

    async def on_change(ifname: str, up: bool) -> None:
        nonlocal calls
        calls += 1
        events.put((ifname, up, time.perf_counter()))
        if calls == 1:
            raise RuntimeError("a broken callback must not stop the watcher")

    async def start() -> asyncio.Task[None]:
        return asyncio.create_task(vip.watch_carrier(["eth0", "nope0"], on_change))

    def next_event() -> tuple[str, bool, float]:
        return events.get(timeout=2.0)

    task = loop.run(start())
    assert {next_event()[:2], next_event()[:2]} == {("eth0", True), ("nope0", False)}
    assert loop.run(vip.carrier()) is True
    assert loop.run(vip.carrier("nope0")) is False

    cut_at = time.perf_counter()
    topo.cut_link("lb1")  # the switch port goes dark: lb1 loses carrier
    ifname, up, seen_at = next_event()
    assert (ifname, up) == ("eth0", False)
    record_property("carrier_down_event_s", round(seen_at - cut_at, 4))
    assert loop.run(vip.carrier()) is False

    topo.restore_link("lb1")
    assert next_event()[:2] == ("eth0", True)
    topo.cut_link("lb1", side="node")  # an operator downs the interface
    assert next_event()[:2] == ("eth0", False)
    topo.restore_link("lb1", side="node")
    assert next_event()[:2] == ("eth0", True)
    assert events.empty(), "one event per change, no repeats"

    async def stop() -> bool:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert loop.run(stop())


def test_a_regained_carrier_forgets_unresolved_neighbours_so_the_peer_hears_us_at_once(
    topo: netns.Topology, make: Make, record_property: Callable[[str, object], None],
) -> None:
    """Heartbeats sent while the link was down wait behind an address resolution the kernel
    retries once a second: in the chaos runs the peer heard the restored node up to 1 s
    late, the whole stale queue at once, and both held the VIP meanwhile."""
    loop, vip = make("lb1")
    rx_loop = topo.loop("lb2")
    peer = topo.nodes["lb2"].ipv4
    arrivals: queue.Queue[tuple[float, float]] = queue.Queue()

    async def receive() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((peer, 7777))
        sock.setblocking(False)

        def readable() -> None:
            with contextlib.suppress(BlockingIOError):
                while True:
                    data = sock.recv(64)
                    arrivals.put((struct.unpack("!d", data)[0], time.monotonic()))
        asyncio.get_running_loop().add_reader(sock.fileno(), readable)
        return sock

    async def send_every(interval_s: float) -> asyncio.Task[None]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)

        async def beat() -> None:
            while True:
                with contextlib.suppress(OSError):  # no carrier: ENOBUFS and friends
                    sock.sendto(struct.pack("!d", time.monotonic()), (peer, 7777))
                await asyncio.sleep(interval_s)
        return asyncio.create_task(beat())

    async def watch() -> asyncio.Task[None]:
        return asyncio.create_task(
            vip.watch_carrier(["eth0"], lambda _n, _u: None, peers=lambda: [peer]))

    rx_sock = rx_loop.run(receive())
    loop.run(watch())
    loop.run(send_every(0.03))
    arrivals.get(timeout=2.0)
    topo.cut_link("lb1")
    time.sleep(1.3)  # past the first retry: the entry is INCOMPLETE, heartbeats queued
    while not arrivals.empty():
        arrivals.get_nowait()
    restored = time.monotonic()
    topo.restore_link("lb1")
    sent, first = arrivals.get(timeout=3.0)
    record_property("first_heard_after_restore_s", round(first - restored, 3))
    assert first - restored < 0.3, f"the peer heard us {first - restored:.3f} s after restore"
    stale = [s for s, _ in [(sent, first), *iter_queue(arrivals)] if s < restored]
    record_property("stale_delivered", len(stale))
    assert len(stale) <= 1, f"{len(stale)} heartbeats queued while the link was down arrived"
    rx_loop.run(asyncio.sleep(0))
    rx_sock.close()


def test_forget_unresolved_deletes_only_the_peers_entries(topo: netns.Topology, make: Make) -> None:
    """Deleting an entry fails whatever waits on it (a connect gets EHOSTUNREACH): a
    backend's or the gateway's entry must survive; only the heartbeat peers' go."""
    loop, vip = make("lb1")
    peer, other = topo.nodes["lb2"].ipv4, topo.nodes["be1"].ipv4
    topo.cut_link("lb1")

    def send(to: str) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"x", (to, 9))

    topo.call("lb1", send, peer)
    topo.call("lb1", send, other)
    states = {e["dst"]: e.get("state") for e in topo.ip_json("lb1", "neigh", "show", "dev", "eth0")}
    assert peer in states and other in states, states
    assert loop.run(vip.forget_unresolved("eth0", [peer, "not an address"])) == 1
    left = {e["dst"] for e in topo.ip_json("lb1", "neigh", "show", "dev", "eth0")}
    assert peer not in left and other in left
    assert loop.run(vip.forget_unresolved("eth0", [])) == 0
    topo.restore_link("lb1")


def iter_queue(q: queue.Queue[tuple[float, float]]) -> list[tuple[float, float]]:
    time.sleep(0.1)
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


# -- failures ------------------------------------------------------------------------------


def test_failures_surface_as_vip_errors_naming_what_failed(
    topo: netns.Topology, make: Make,
) -> None:
    loop = topo.loop("lb1")
    missing: VipPort = VipAdapter("nope0", [vip4(topo)])  # mypy: the adapter is a VipPort
    with pytest.raises(VipError, match="acquire: interface nope0 not found") as caught:
        loop.run(missing.acquire())
    assert isinstance(caught.value, FailoverError)
    assert loop.run(missing.held()) is False
    loop.run(missing.release())  # nothing to release: fine
    assert isinstance(missing, VipAdapter)
    loop.run(missing.close())

    be1, v6_only = make("be1", vips=[vip6(topo)])
    with pytest.raises(VipError, match=r"add fd.*/64 on eth0: IPv6 is disabled"):
        be1.run(v6_only.acquire())

    for bad, match in (
        ({"interface": "eth0", "vips": ["192.0.2.300/24"]}, "not an address"),
        ({"interface": "eth0", "vips": []}, "at least one"),
        ({"interface": "a-very-long-ifname", "vips": ["192.0.2.1/24"]}, "interface"),
        ({"interface": "eth0", "vips": ["192.0.2.1/24"], "label": "vip0"}, "label"),
        ({"interface": "eth0", "vips": ["192.0.2.1/24"], "garp_count": -1}, "garp_count"),
    ):
        with pytest.raises(ValueError, match=match):
            VipAdapter(**bad)


def test_an_announcement_due_while_the_process_was_stopped_is_skipped() -> None:
    """A node that was SIGSTOPped must not wake up and send the rest of a GARP burst for a
    VIP its peer has taken meanwhile (the controller re-announces if it is still MASTER)."""
    import time as _time

    from failover.adapters import vip as vip_mod

    adapter = VipAdapter("eth0", ["192.0.2.100/24"])

    async def scenario() -> tuple[bool, bool]:
        on_time = await adapter._slept(0.01)
        task = asyncio.create_task(adapter._slept(0.01))
        await asyncio.sleep(0)
        _time.sleep(vip_mod.STALL_S + 0.1)  # noqa: ASYNC251 (the loop stalls, as under SIGSTOP)
        return on_time, await task

    assert asyncio.run(scenario()) == (True, False)
