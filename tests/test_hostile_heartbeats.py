"""Hostile heartbeats through the real receive loop, every packet accounted for (issue 8).

The last tests: heartbeats from an address `peers` does not list are dropped before the HMAC
(issue 12), so a flood from elsewhere costs no HMAC CPU.

What tests/test_failover_codec.py (the codec alone: random, truncated, bit-flipped, wrong-key
packets, hypothesis) and tests/test_failover_transport.py (forged, truncated, replayed and
random packets over UDP, counted with lower bounds) leave open: a seeded fuzz of over a
thousand packets of every kind at once, bit flips included, sent over a real UDP socket into
a controller that is a BACKUP of a live MASTER. Each packet must show up as exactly one
counted rejection (so none slipped through as a heartbeat, none vanished uncounted), with no
internal error, no new peer, no transition and no VIP taken.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from failover import (
    FailoverController,
    FailoverSpec,
    FailoverStatus,
    Heartbeat,
    HeartbeatFlags,
    RejectReason,
    Role,
    encode,
)
from lab.ports import free_udp_port

pytestmark = pytest.mark.timeout(60)
KEY = os.urandom(32)
T = TypeVar("T")


class RecordingVip:
    """A VIP that only records: no root, no interface touched."""
    announcements_sent = 0
    announcement_errors = 0

    def __init__(self) -> None:
        self._holding = False
        self.acquired: list[float] = []

    @property
    def holding(self) -> bool:
        return self._holding

    async def acquire(self) -> None:
        self._holding = True
        self.acquired.append(time.monotonic())

    async def release(self) -> None:
        self._holding = False

    async def announce(self) -> None:
        pass

    async def remove_stale(self) -> list[str]:
        return []

    async def held(self) -> bool:
        return self._holding


class Node:
    """One controller on its own event loop thread, as in a process of its own."""

    def __init__(self, name: str, priority: int, port: int, peers: list[str]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
        self.thread.start()
        self.vip = RecordingVip()
        spec = FailoverSpec(node_name=name, interface="lo", vips=("192.0.2.100/24",),
                            priority=priority, peers=tuple(peers), key=KEY, port=port,
                            bind="127.0.0.1", interval_s=0.05)
        self.ctl = FailoverController(spec, self.vip)
        self.ctl.set_local_health(True, 1, 1)
        self.run(self.ctl.start())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(15)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapped() -> T:
            return fn()

        return self.run(wrapped())

    def status(self) -> FailoverStatus:
        return self.call(self.ctl.status)

    def close(self) -> None:
        self.run(self.ctl.stop(graceful=False))

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.005)


def fuzz(rng: random.Random, genuine: list[bytes], n: int) -> list[tuple[str, bytes]]:
    """`n` hostile packets of every kind, built from real heartbeats of the MASTER."""
    now_ms = int(time.time() * 1000)
    evil = Heartbeat(name="lb1", role=Role.MASTER, priority=255, epoch=rng.getrandbits(64),
                     seq=1 << 40, timestamp_ms=now_ms, interval_ms=50,
                     flags=HeartbeatFlags.HEALTHY, healthy_count=3, total_count=3)
    stranger = Heartbeat(name="lb9", role=Role.MASTER, priority=255, epoch=7, seq=1,
                         timestamp_ms=now_ms, interval_ms=50, flags=HeartbeatFlags.HEALTHY)
    out: list[tuple[str, bytes]] = []
    for i in range(n):
        g = rng.choice(genuine)
        kind = ("random", "truncated", "bitflip", "substituted", "wrong_key", "zero_mac",
                "replayed", "trailing")[i % 8]
        if kind == "random":
            data = rng.randbytes(rng.randint(0, 400))
        elif kind == "truncated":
            data = g[: rng.randrange(len(g))]
        elif kind == "bitflip":
            b = bytearray(g)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            data = bytes(b)
        elif kind == "substituted":
            b = bytearray(g)
            pos = rng.randrange(len(b))
            b[pos] = (b[pos] + rng.randint(1, 255)) % 256
            data = bytes(b)
        elif kind == "wrong_key":
            data = encode(rng.choice([evil, stranger]), rng.randbytes(32))
        elif kind == "zero_mac":
            data = encode(evil, KEY)[:-32] + bytes(32)
        elif kind == "replayed":
            data = g
        else:
            data = g + rng.randbytes(rng.randint(1, 16))
        out.append((kind, data))
    return out


def test_a_fuzzed_flood_changes_nothing_and_every_packet_is_one_counted_rejection() -> None:
    pa, pb, sniff_port = free_udp_port(), free_udp_port(), free_udp_port()
    sniff = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sniff.bind(("127.0.0.1", sniff_port))
    sniff.settimeout(2.0)
    a = Node("lb1", 200, pa, [f"127.0.0.1:{pb}", f"127.0.0.1:{sniff_port}"])
    b = Node("lb2", 100, pb, [f"127.0.0.1:{pa}"])
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        wait_until(lambda: a.vip.holding and b.status().role is Role.BACKUP, 5.0, "a pair")
        genuine = [sniff.recv(2048) for _ in range(20)]  # lb1's real heartbeats (to "lb3")
        time.sleep(0.2)  # every captured one is now older than lb1's newest: a replay
        before = b.status()
        packets = fuzz(random.Random(20260), genuine, 1200)
        sent = 0
        for start in range(0, len(packets), 40):
            for _, data in packets[start:start + 40]:
                attacker.sendto(data, ("127.0.0.1", pb))
                sent += 1

            def counted(target: int = sent) -> bool:
                rej = b.status().counters.rejected
                return sum(rej.values()) - sum(before.counters.rejected.values()) >= target

            # Paced so the socket buffer never overflows: each batch is counted first.
            wait_until(counted, 3.0, f"rejections for the first {sent} packets")
        time.sleep(0.2)
        after = b.status()
        delta = {r: after.counters.rejected.get(r, 0) - before.counters.rejected.get(r, 0)
                 for r in RejectReason}
        kinds = Counter(k for k, _ in packets)
        print(f"\n{len(packets)} hostile packets {dict(kinds)} -> rejections "
              f"{ {str(k): v for k, v in delta.items() if v} }")
        assert sum(delta.values()) == len(packets)  # each exactly once, none taken as real
        assert delta[RejectReason.REPLAYED] >= kinds["replayed"]
        assert delta[RejectReason.BAD_MAC] >= kinds["wrong_key"] + kinds["zero_mac"]
        assert after.counters.internal_errors == 0
        assert after.counters.transitions == before.counters.transitions
        assert (a.status().role, after.role) == (Role.MASTER, Role.BACKUP)
        assert [p.name for p in after.peers] == ["lb1"]  # no "lb9" appeared
        assert {p.address for peer in after.peers for p in peer.paths} == {"127.0.0.1"}
        assert b.vip.acquired == []
    finally:
        attacker.close()
        sniff.close()
        a.close()
        b.close()


def test_a_flood_from_an_address_not_in_peers_is_dropped_before_any_hmac(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Correctly signed heartbeats of a stranger (priority 255, MASTER) sent from 127.0.0.2,
    which no `peers` entry names, over real UDP: each is one `unknown_source` rejection and
    not one HMAC is computed for them (decode_any is never called for such a datagram)."""
    import failover.controller as controller

    calls = Counter[str]()
    real_decode = controller.decode_any
    forged_sent: set[bytes] = set()

    def counting(data: bytes, keys: Any) -> Any:
        calls["decode"] += 1
        calls["forged"] += data in forged_sent
        return real_decode(data, keys)

    monkeypatch.setattr(controller, "decode_any", counting)
    pa, pb = free_udp_port(), free_udp_port()
    a = Node("lb1", 200, pa, [f"127.0.0.1:{pb}"])
    b = Node("lb2", 100, pb, [f"127.0.0.1:{pa}"])
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.bind(("127.0.0.2", 0))
    try:
        wait_until(lambda: a.vip.holding and b.status().role is Role.BACKUP, 5.0, "a pair")
        before, a_before, decodes_before = b.status(), a.status(), calls["decode"]
        now_ms = int(time.time() * 1000)
        n = 3000
        for start in range(0, n, 100):
            for i in range(start, start + 100):
                forged = encode(Heartbeat(name="lb9", role=Role.MASTER, priority=255, epoch=9,
                                          seq=i + 1, timestamp_ms=now_ms, interval_ms=50,
                                          flags=HeartbeatFlags.HEALTHY), KEY)
                forged_sent.add(forged)
                attacker.sendto(forged, ("127.0.0.1", pb))

            def counted(target: int = start + 100) -> bool:
                rej = b.status().counters.rejected
                return (rej.get(RejectReason.UNKNOWN_SOURCE, 0)
                        - before.counters.rejected.get(RejectReason.UNKNOWN_SOURCE, 0)
                        >= target)

            wait_until(counted, 3.0, f"{start + 100} unknown_source rejections")
        after, a_after, decodes = b.status(), a.status(), calls["decode"] - decodes_before
        unknown = (after.counters.rejected[RejectReason.UNKNOWN_SOURCE]
                   - before.counters.rejected.get(RejectReason.UNKNOWN_SOURCE, 0))
        verified = sum(x.counters.verified[k] - y.counters.verified.get(k, 0)
                       for x, y in ((after, before), (a_after, a_before))
                       for k in x.counters.verified)
        others = sum(after.counters.rejected.values()) - sum(before.counters.rejected.values())
        assert unknown == n and others == n  # nothing else was rejected meanwhile
        # Not one HMAC for a forged datagram; the pair's own heartbeats went on (either
        # node, one process: a real one may be decoded between the reads, so <= 2 apart).
        assert calls["forged"] == 0
        assert verified > 0 and abs(decodes - verified) <= 2, (decodes, verified)
        assert [p.name for p in after.peers] == ["lb1"] and b.vip.acquired == []
        assert after.counters.transitions == before.counters.transitions
    finally:
        attacker.close()
        a.close()
        b.close()


def test_what_an_unlisted_datagram_costs_against_a_bad_mac_one() -> None:
    """The receive path's cost per datagram, measured in-process (no socket): dropped by
    source, against a wrong-key packet from a listed peer that costs an HMAC."""
    pb = free_udp_port()
    b = Node("lb2", 100, pb, ["127.0.0.1:9"])
    try:
        forged = encode(Heartbeat(name="lb9", role=Role.MASTER, priority=255, epoch=9, seq=1,
                                  timestamp_ms=int(time.time() * 1000), interval_ms=50),
                        os.urandom(32))
        n = 20000

        def per_packet(source: str) -> float:
            def burst() -> float:
                t0 = time.perf_counter()
                for _ in range(n):
                    b.ctl._on_datagram(forged, (source, 5405))
                return (time.perf_counter() - t0) / n

            return min(b.call(burst) for _ in range(3))

        unlisted, listed = per_packet("127.0.0.2"), per_packet("127.0.0.1")
        print(f"\nreceive path per datagram: unknown source {unlisted * 1e6:.2f} us, "
              f"bad MAC from a peer {listed * 1e6:.2f} us")
        rejected = b.status().counters.rejected
        assert rejected[RejectReason.UNKNOWN_SOURCE] == 3 * n
        assert rejected[RejectReason.BAD_MAC] == 3 * n
        assert unlisted < listed
    finally:
        b.close()


def test_who_may_send_heartbeats() -> None:
    """`peers` are the accepted sources (IPv4-mapped and scoped forms are the same host);
    only a multicast node with no peers listed verifies any source on its link."""
    def spec(peers: tuple[str, ...], group: str | None = None) -> FailoverSpec:
        return FailoverSpec(node_name="lb1", interface="lo", vips=("192.0.2.100/24",),
                            priority=100, peers=peers, key=KEY, multicast_group=group)

    allowed = FailoverController._allowed_sources(
        spec(("192.0.2.2", "192.0.2.3:6000", "[fe80::2]:5405")))
    assert allowed == {"192.0.2.2", "192.0.2.3", "fe80::2"}
    assert FailoverController._allowed_sources(spec((), "224.0.0.88")) is None
    assert FailoverController._allowed_sources(spec(("192.0.2.2",), "224.0.0.88")) == {
        "192.0.2.2"}
