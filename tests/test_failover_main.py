"""The failover process's own pieces, in one process with fakes for the OS adapters: its
heartbeat meter and the order in which it takes the control process's messages.

Found by an outside review: the meter timed every datagram, a stranger's too (unbounded
state, real gaps overwritten), and a reload read while the controller was being built was
never applied to it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

import failover
from failover import FailoverSpec, key_id
from lb import channel
from lb.failoverd import link
from lb.failoverd import main as fm


class Inner:
    """The controller's transport as the meter sees it."""

    send_errors = 0

    def __init__(self) -> None:
        self.on_datagram: Callable[[bytes, Any], None] | None = None

    async def start(self, on_datagram: Callable[[bytes, Any], None]) -> None:
        self.on_datagram = on_datagram

    def destinations(self) -> list[Any]:
        return []

    def send(self, data: bytes, dest: Any) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_meter_times_only_the_peers_and_its_table_is_bounded() -> None:
    clock = [0.0]
    inner = Inner()
    peer = "10.0.0.13"
    meter = fm.HeartbeatMeter(inner, lambda: clock[0], lambda host: host == peer)
    delivered: list[Any] = []
    asyncio.run(meter.start(lambda data, source: delivered.append(source)))
    receive = inner.on_datagram
    assert receive is not None
    for _ in range(20):
        clock[0] += 0.05
        receive(b"x", (peer, 5405))
    clock[0] += 0.9  # the peer was silent once
    receive(b"x", (peer, 5405))
    for i in range(5000):  # a flood from strangers, many sources and one busy one
        clock[0] += 1e-4
        receive(b"x", (f"192.0.2.{i % 250}", 5405))
    clock[0] += 3600
    receive(b"x", ("192.0.2.9", 5405))  # a stranger an hour later: no "gap" of an hour
    assert meter.gaps().received_max_s == pytest.approx(0.9)
    assert set(meter._last_received) == {peer}
    assert len(delivered) == 21 + 5000 + 1  # the controller still sees (and counts) all


def test_without_a_peer_list_the_table_stays_bounded() -> None:
    clock = [0.0]
    inner = Inner()
    meter = fm.HeartbeatMeter(inner, lambda: clock[0])  # multicast: anyone is timed
    asyncio.run(meter.start(lambda data, source: None))
    assert inner.on_datagram is not None
    for i in range(20000):
        clock[0] += 1e-5
        inner.on_datagram(b"x", (f"fd00::{i:x}", 5405))
    assert len(meter._last_received) <= fm.MAX_TIMED_SOURCES


class FakeVip:
    announcements_sent = 0
    announcement_errors = 0
    holding = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def remove_stale(self) -> list[str]:
        return []

    async def acquire(self) -> None:
        self.holding = True

    async def release(self) -> None:
        self.holding = False

    async def announce(self) -> None:
        pass

    async def watch_carrier(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(3600)


class FakeHandover:
    enabled = False
    forwarding_to = None
    forwards = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


K1, K2 = b"1" * 32, b"2" * 32


def spec(generation: int, key: bytes, verify: tuple[bytes, ...] = ()) -> link.Spec:
    fs = FailoverSpec(node_name="a", interface="lo", vips=("127.9.9.9/32",), priority=100,
                      peers=("127.0.0.2",), key=key, verify_keys=verify, port=0,
                      bind="127.0.0.1")
    return link.Spec(generation=generation, failover=fs)


def test_a_reload_read_while_the_controller_is_built_reaches_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What the control process wrote while a restarted failover process still imported:
    its start spec, its health, then a reload (key rotation, step 2: sign with K2)."""
    monkeypatch.setattr(failover, "VipAdapter", FakeVip, raising=False)
    monkeypatch.setattr(failover, "Handover", FakeHandover)
    monkeypatch.setattr(fm, "setup_logging", lambda *a: None)
    monkeypatch.setattr(fm, "apply_scheduling", lambda *a: "")
    monkeypatch.setattr(fm, "drop_privileges", lambda: None)
    parent, child = socket.socketpair()
    with parent:
        parent.sendall(channel.encode(link.encode(spec(1, K1)))
                       + channel.encode(link.encode(link.LocalHealth(True, 1, 1)))
                       + channel.encode(link.encode(spec(2, K2, (K1,)))))
        main = fm.FailoverMain(child.detach(), 1)

        async def run() -> list[str]:
            task = asyncio.create_task(main.run())
            for _ in range(200):
                await asyncio.sleep(0.01)
                if main.ctl is not None:
                    break
            assert main.ctl is not None
            keys = [key_id(k) for k in main.ctl.spec.keys]
            main._finish(0)
            await task
            return keys

        assert asyncio.run(run()) == [key_id(K2), key_id(K1)]
