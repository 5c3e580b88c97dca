"""The node-to-node sync channel over real sockets on 127.0.0.1 (ports from the kernel).

What a user would notice: a backend added on one node is applied on the other and acked; a
refusal comes back with its reason; a peer that is down is reported "pending" and catches
up by a state exchange when it returns; a key rotation keeps the pair talking; a stranger,
a replayed recording or a flood of garbage connections is refused, counted, and never gets
in the way of the real peer; stop() leaves nothing running.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from lab.ports import free_port
from lb.control import sync
from lb.control.sync import SyncChannel

pytestmark = pytest.mark.timeout(60)

T = TypeVar("T")
K1 = b"1" * 32
K2 = b"2" * 32
KX = b"x" * 32
LOCAL = "127.0.0.1"


class FakeHandler:
    """A tiny LWW map standing in for the overlay: entries[key] = [lamport, node, value]."""

    def __init__(self, node: str, pools: tuple[str, ...] = ("web",)) -> None:
        self.node = node
        self.pools = set(pools)
        self.entries: dict[str, list[Any]] = {}
        self.lamport = 0
        self.ops: list[dict[str, Any]] = []
        self.acks: list[tuple[str, int, str, str]] = []
        self.peer_events: list[str | None] = []
        self.states = 0
        self.offers: list[tuple[str, str]] = []

    def config_digest(self) -> str:
        return "cfg-1"

    def overlay_digest(self) -> str:
        raw = json.dumps(self.entries, sort_keys=True).encode()
        return hashlib.sha256(raw).hexdigest()[:16]

    def state(self) -> dict[str, Any]:
        return {"entries": self.entries}

    def local(self, pool: str, backend: str, value: str) -> dict[str, Any]:
        """A change made here (as the admin API would): applied locally, returned as an op."""
        self.lamport += 1
        entry = [self.lamport, self.node, value]
        self._merge(f"{pool}/{backend}", entry)
        return {"pool": pool, "backend": backend, "entry": entry}

    def _merge(self, key: str, entry: list[Any]) -> None:
        cur = self.entries.get(key)
        if cur is None or tuple(entry[:2]) > tuple(cur[:2]):
            self.entries[key] = list(entry)
        self.lamport = max(self.lamport, int(entry[0]))

    def on_op(self, op: dict[str, Any]) -> tuple[str, str]:
        self.ops.append(op)
        if op["pool"] not in self.pools:
            return "refused", f"pool {op['pool']}: no such pool"
        self._merge(f"{op['pool']}/{op['backend']}", op["entry"])
        return "applied", ""

    async def on_state(self, state: dict[str, Any]) -> None:
        self.states += 1
        for key, entry in state["entries"].items():
            self._merge(key, entry)

    def on_ack(self, origin: str, seq: int, result: str, reason: str) -> None:
        self.acks.append((origin, seq, result, reason))

    def on_peer(self, node: str | None) -> None:
        self.peer_events.append(node)


class OfferingHandler(FakeHandler):
    async def on_config_offer(self, toml: str, digest: str) -> tuple[str, list[str]]:
        self.offers.append((toml, digest))
        if "bad" in toml:
            return "refused", ["line 1: bad"]
        return "applied", []


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
    """Run a test body with a deadline, then check the loop has nothing left running."""

    async def main() -> T:
        result = await asyncio.wait_for(coro, timeout_s)
        me = asyncio.current_task()
        left = [t for t in asyncio.all_tasks() if t is not me]
        assert not left, f"tasks left behind: {left}"
        return result

    return asyncio.run(main())


async def until(cond: Callable[[], bool], timeout_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.01)


def channel(node: str, handler: FakeHandler, keys: tuple[bytes, ...] = (K1,),
            peers: list[tuple[str, int]] | None = None, port: int = 0,
            **kw: Any) -> SyncChannel:
    ch = SyncChannel(node, keys, (LOCAL, port), peers or [], handler, **kw)
    ch.start()
    return ch


async def pair(ka: tuple[bytes, ...] = (K1,), kb: tuple[bytes, ...] = (K1,), **kw: Any
               ) -> tuple[SyncChannel, SyncChannel, FakeHandler, FakeHandler]:
    ha, hb = FakeHandler("lb-a"), FakeHandler("lb-b")
    a = channel("lb-a", ha, ka, **kw)
    b = channel("lb-b", hb, kb, **kw)
    assert a.address is not None and b.address is not None
    a.set_peers([b.address])
    b.set_peers([a.address])
    await until(lambda: a.connected() == ["lb-b"] and b.connected() == ["lb-a"],
                what="the pair to connect")
    return a, b, ha, hb


async def stop_all(*channels: SyncChannel) -> None:
    for ch in channels:
        await ch.stop()


async def drain(r: asyncio.StreamReader) -> bytes:
    """What the other side sent before it closed (a reset ends it too: a refused
    connection is aborted)."""
    got = bytearray()
    with contextlib.suppress(ConnectionError):
        while data := await asyncio.wait_for(r.read(65536), 5):
            got += data
    return bytes(got)


# -- ops --------------------------------------------------------------------------------------


def test_op_on_a_is_applied_on_b_and_acked() -> None:
    async def body() -> None:
        a, b, ha, hb = await pair()
        try:
            op = ha.local("web", "web4", "10.0.0.4:8080")
            t0 = time.perf_counter()
            ack = await a.send_op(op)
            rtt_ms = (time.perf_counter() - t0) * 1000
            assert ack.peers == {"lb-b": "applied"} and ack.applied
            assert hb.ops == [op]
            assert hb.entries == ha.entries
            assert ha.acks == [("lb-a", ack.seq, "applied", "")]
            assert rtt_ms < 500
            st = a.status()
            json.dumps(st)  # JSON-serialisable
            (peer,) = st["peers"]
            assert peer["node"] == "lb-b" and peer["connected"] and peer["key_id"]
            assert peer["overlay_digest"] and peer["config_digest"] == "cfg-1"
            assert st["counters"]["ops_applied"] == 1
            assert b.status()["counters"]["ops_received_applied"] == 1
            assert st["key_id"] == sync.key_id(sync.derive_key(K1))
            assert ha.peer_events == ["lb-b"] and hb.peer_events == ["lb-a"]
            # one session between them, whoever dialled first (the dedup rule)
            total = sum(ch.status()["counters"]["handshakes"] for ch in (a, b))
            assert total >= 1
            assert not a.rejected and not b.rejected
        finally:
            await stop_all(a, b)

    run(body())


def test_refusal_comes_back_with_the_reason_on_both_sides() -> None:
    async def body() -> None:
        a, b, ha, hb = await pair()
        try:
            op = ha.local("api", "x1", "10.0.0.9:80")  # b has no pool "api"
            ack = await a.send_op(op)
            assert ack.peers == {"lb-b": "refused: pool api: no such pool"}
            assert not ack.applied
            assert ha.acks == [("lb-a", ack.seq, "refused", "pool api: no such pool")]
            assert hb.ops == [op] and "api/x1" not in hb.entries
            assert a.status()["counters"]["ops_refused"] == 1
            assert b.status()["counters"]["ops_received_refused"] == 1
        finally:
            await stop_all(a, b)

    run(body())


def test_a_handler_exception_is_a_refusal_not_a_crash() -> None:
    async def body() -> None:
        a, b, _ha, hb = await pair()

        def boom(op: dict[str, Any]) -> tuple[str, str]:
            raise RuntimeError("disk full")

        hb.on_op = boom  # type: ignore[method-assign]
        try:
            ack = await a.send_op({"pool": "web"})
            assert ack.peers == {"lb-b": "refused: handler error: RuntimeError: disk full"}
            assert b.status()["counters"]["handler_errors"] == 1
            assert a.connected() == ["lb-b"]  # still up
        finally:
            await stop_all(a, b)

    run(body())


def test_op_without_an_ack_in_time_is_pending_and_the_late_ack_is_reported() -> None:
    async def body() -> None:
        a, b, ha, hb = await pair(op_timeout_s=0.2)

        async def slow(op: dict[str, Any]) -> tuple[str, str]:
            await asyncio.sleep(0.5)
            return "applied", ""

        hb.on_op = slow  # type: ignore[method-assign]
        try:
            ack = await a.send_op({"pool": "web"})
            assert ack.peers == {"lb-b": "pending"}
            await until(lambda: len(ha.acks) == 1, what="the late ack")
            assert ha.acks == [("lb-a", ack.seq, "applied", "")]
            assert a.status()["counters"]["ops_late_acks"] == 1
        finally:
            await stop_all(a, b)

    run(body())


def test_config_offer_travels_and_the_handler_decides() -> None:
    async def body() -> None:
        ha, hb = FakeHandler("lb-a"), OfferingHandler("lb-b")
        a = channel("lb-a", ha)
        b = channel("lb-b", hb)
        assert a.address and b.address
        a.set_peers([b.address])
        b.set_peers([a.address])
        try:
            await until(lambda: a.connected() == ["lb-b"] and b.connected() == ["lb-a"])
            assert await a.offer_config("[node]\n", "d1") == {"lb-b": "applied"}
            assert await a.offer_config("bad", "d2") == {"lb-b": "refused: line 1: bad"}
            assert hb.offers == [("[node]\n", "d1"), ("bad", "d2")]
            # a handler without on_config_offer refuses
            got = await b.offer_config("[node]\n", "d3")
            assert got == {"lb-a": "refused: lb-a does not take config offers"}
        finally:
            await stop_all(a, b)

    run(body())


def test_oversize_op_is_refused_before_sending() -> None:
    async def body() -> None:
        a, b, ha, _hb = await pair(max_frame=4096)
        try:
            with pytest.raises(sync.FrameTooLarge):
                await a.send_op({"pool": "web", "blob": "x" * 5000})
            with pytest.raises(ValueError):
                await a.send_op({"pool": "web", "nan": float("nan")})
            assert (await a.send_op(ha.local("web", "w1", "a"))).applied
            # a state too large for a frame is not sent, and counted
            for i in range(100):
                ha.local("web", f"w{i}", "x" * 50)
            assert a.send_state() == []
            assert a.status()["counters"]["states_oversize"] == 1
            assert a.connected() == ["lb-b"]
        finally:
            await stop_all(a, b)

    run(body())


def test_a_frame_above_the_receivers_max_frame_is_refused_there_too() -> None:
    async def body() -> None:
        ha, hb = FakeHandler("lb-a"), FakeHandler("lb-b")
        a = channel("lb-a", ha, max_frame=1 << 20)
        b = channel("lb-b", hb, max_frame=4096)  # a peer configured with a smaller limit
        assert a.address and b.address
        a.set_peers([b.address])
        b.set_peers([a.address])
        try:
            await until(lambda: a.connected() == ["lb-b"] and b.connected() == ["lb-a"])
            ack = await a.send_op({"pool": "web", "blob": "x" * 10_000})
            assert ack.peers == {"lb-b": "pending"}  # the session closed: no wait
            assert b.rejected == {"oversize": 1} and hb.ops == []
            await until(lambda: a.connected() == ["lb-b"], what="the reconnect")
            assert (await a.send_op(ha.local("web", "w1", "v"))).applied
        finally:
            await stop_all(a, b)

    run(body())


# -- peer down, catch-up ------------------------------------------------------------------------


def test_peer_down_is_pending_then_state_is_exchanged_on_reconnect() -> None:
    async def body() -> None:
        a, b, ha, hb = await pair(ping_interval_s=0.2)
        b_port = b.address[1] if b.address else 0
        b2: SyncChannel | None = None
        try:
            assert (await a.send_op(ha.local("web", "web1", "v1"))).applied
            await b.stop()
            await until(lambda: a.connected() == [], what="a to see b gone")
            assert ha.peer_events == ["lb-b", None]
            t0 = time.perf_counter()
            ack = await a.send_op(ha.local("web", "web2", "v2"))
            assert ack.peers == {"lb-b": "pending"}
            assert time.perf_counter() - t0 < 0.1  # not connected: no wait
            # b comes back from its own disk with a change a never saw
            hb.lamport += 10
            hb.entries["web/web3"] = [hb.lamport, "lb-b", "v3"]
            assert ha.overlay_digest() != hb.overlay_digest()
            assert a.address is not None
            b2 = channel("lb-b", hb, peers=[a.address], port=b_port, ping_interval_s=0.2)
            await until(lambda: ha.overlay_digest() == hb.overlay_digest(),
                        what="digests to converge")
            assert set(ha.entries) == {"web/web1", "web/web2", "web/web3"}
            assert ha.states >= 1 and hb.states >= 1
            assert a.status()["counters"]["reconnects"] == 1
            assert ha.peer_events == ["lb-b", None, "lb-b"]
            assert (await a.send_op(ha.local("web", "web4", "v4"))).applied
        finally:
            await stop_all(a, *(c for c in (b2,) if c is not None))

    run(body())


def test_a_silent_peer_is_disconnected_after_three_pings() -> None:
    async def body() -> None:
        a, b, _ha, _hb = await pair(ping_interval_s=0.1)
        try:
            assert b.address is not None
            # b's process is alive but stops reading and sending (stalled): a sees
            # silence, not an EOF
            b._ticker.cancel()  # type: ignore[union-attr]
            for conn in b._conns:
                conn.writer.transport.pause_reading()
            t0 = time.monotonic()
            await until(lambda: a.connected() == [], timeout_s=5, what="silence")
            assert 0.25 <= time.monotonic() - t0 <= 3.0
            assert a.disconnects.get("silent") == 1
        finally:
            await stop_all(a, b)

    run(body())


# -- keys -----------------------------------------------------------------------------------------


def test_key_rotation_new_key_first_on_one_side_old_only_on_the_other() -> None:
    async def body() -> None:
        a, b, ha, hb = await pair(ka=(K2, K1), kb=(K1,))
        try:
            assert (await a.send_op(ha.local("web", "w1", "v"))).applied
            assert (await b.send_op(hb.local("web", "w2", "v"))).applied
            k1_id = sync.key_id(sync.derive_key(K1))
            assert a.status()["peers"][0]["key_id"] == k1_id
            assert a.status()["key_id"] == sync.key_id(sync.derive_key(K2))
            # b learns k2 (second), then a drops k1: the k1 sessions close, k2 ones open
            b.rekey([K1, K2])
            a.rekey([K2])
            k2_id = sync.key_id(sync.derive_key(K2))
            await until(lambda: a.connected() == ["lb-b"]
                        and a.status()["peers"][0]["key_id"] == k2_id, what="rekeyed session")
            assert a.disconnects.get("rekey") == 1
            assert (await a.send_op(ha.local("web", "w3", "v"))).applied
            assert not a.rejected and not b.rejected
        finally:
            await stop_all(a, b)

    run(body())


def test_a_stranger_with_the_wrong_key_is_rejected_and_counted() -> None:
    async def body() -> None:
        a, b, ha, hb = await pair()
        assert b.address is not None
        hx = FakeHandler("lb-x")
        x = channel("lb-x", hx, (KX,), peers=[b.address])
        # and one that uses the failover key itself instead of the derived one
        raw = sync.HelloMsg("lb-y", "dial", os.urandom(16), os.urandom(8))
        try:
            await until(lambda: b.rejected.get("bad_mac", 0) >= 1, what="x rejected")
            r, w = await asyncio.open_connection(*b.address)
            w.write(sync.encode_hello(raw, [K1]))
            assert await drain(r) == b""  # closed without a word
            w.close()
            await until(lambda: b.rejected.get("bad_mac", 0) >= 2, what="raw key rejected")
            assert x.connected() == [] and b.connected() == ["lb-a"]
            assert hb.peer_events == ["lb-a"]
            assert (await a.send_op(ha.local("web", "w1", "v"))).applied
            # on x's side it is the peer that hung up: not a rejection of x's own
            assert x.rejected == {}
            assert "peer" in x.status()["addresses"][0]["last_error"]  # hung up or reset
        finally:
            await stop_all(a, b, x)

    run(body())


def test_connections_from_other_addresses_are_dropped_before_any_crypto() -> None:
    async def body() -> None:
        hb = FakeHandler("lb-b")
        b = channel("lb-b", hb, peers=[("127.0.0.2", free_port())])
        assert b.address is not None
        try:
            r, w = await asyncio.open_connection(*b.address, local_addr=("127.0.0.1", 0))
            w.write(b"PLBS" + os.urandom(100))
            assert await drain(r) == b""
            w.close()
            await until(lambda: b.rejected.get("unknown_source") == 1)
            assert set(b.rejected) == {"unknown_source"}
            # from the listed address, a real peer gets in
            ha = FakeHandler("lb-a")
            a = SyncChannel("lb-a", (K1,), ("127.0.0.2", 0), [b.address], ha)
            a.start()
            try:
                await until(lambda: b.connected() == ["lb-a"])
            finally:
                await a.stop()
        finally:
            await b.stop()

    run(body())


def test_our_own_name_in_a_hello_is_looped() -> None:
    async def body() -> None:
        h1, h2 = FakeHandler("lb-a"), FakeHandler("lb-a")
        a1 = channel("lb-a", h1)
        assert a1.address is not None
        a2 = channel("lb-a", h2, peers=[a1.address])
        assert a2.address is not None
        a1.set_peers([a2.address])
        try:
            await until(lambda: a1.rejected.get("looped", 0) >= 1)
            assert a1.connected() == [] and a2.connected() == []
        finally:
            await stop_all(a1, a2)

    run(body())


# -- replay ---------------------------------------------------------------------------------------


class Recorder:
    """A TCP relay that records what the dialer sends."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sent = bytearray()
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._conn, LOCAL, 0)
        addr: tuple[str, int] = self.server.sockets[0].getsockname()[:2]
        return addr

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)  # type: ignore[arg-type]
        ur, uw = await asyncio.open_connection(*self.target)
        self.writers += [w, uw]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, rec: bool) -> None:
            while data := await src.read(65536):
                if rec:
                    self.sent += data
                dst.write(data)
            dst.close()

        try:
            await asyncio.gather(pump(r, uw, True), pump(ur, w, False))
        except (ConnectionError, OSError):
            pass
        finally:
            self.tasks.discard(task)  # type: ignore[arg-type]

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


def test_a_recorded_session_replayed_to_b_is_rejected_and_displaces_nothing() -> None:
    async def body() -> None:
        ha, hb = FakeHandler("lb-a"), FakeHandler("lb-b")
        # b dials nowhere useful, so the only session is a -> recorder -> b
        b = channel("lb-b", hb, peers=[(LOCAL, free_port())])
        assert b.address is not None
        rec = Recorder(b.address)
        via = await rec.start()
        a = channel("lb-a", ha, peers=[via])
        try:
            await until(lambda: b.connected() == ["lb-a"])
            ack = await a.send_op(ha.local("web", "w1", "v1"))
            assert ack.applied
            await until(lambda: len(rec.sent) > 0)
            recording = bytes(rec.sent)
            assert b"w1" in recording
            ops_before = len(hb.ops)
            # replay the whole recording on a fresh connection, while the real one lives
            r, w = await asyncio.open_connection(*b.address)
            w.write(recording)
            tail = await drain(r)
            w.close()
            # b answers the (valid) HELLO with a fresh one (unless the reset overtook it)...
            assert tail == b"" or tail.startswith(b"PLBS")
            await until(lambda: b.rejected.get("bad_mac", 0) == 1)  # ...and the frames fail
            assert len(hb.ops) == ops_before
            assert hb.peer_events == ["lb-a"]  # the live session was never displaced
            assert (await a.send_op(ha.local("web", "w2", "v2"))).applied
            # and once a is gone, the replay still gets nowhere
            await a.stop()
            await until(lambda: b.connected() == [])
            r, w = await asyncio.open_connection(*b.address)
            w.write(recording)
            await drain(r)
            w.close()
            await until(lambda: b.rejected.get("bad_mac", 0) == 2)
            assert len(hb.ops) == ops_before + 1
            assert hb.peer_events == ["lb-a", None]
        finally:
            await stop_all(a, b)
            await rec.close()

    run(body())


# -- hostile traffic -----------------------------------------------------------------------------


def test_a_flood_of_garbage_connections_does_not_stop_a_legit_op() -> None:
    async def body() -> None:
        a, b, ha, hb = await pair()
        assert b.address is not None
        writers: list[asyncio.StreamWriter] = []
        kinds: list[Callable[[], bytes]] = [
            lambda: os.urandom(64),                              # random bytes
            lambda: b"",                                         # silence
            lambda: b"PLBS\x01\x01\xff\xff",                     # HELLO too long
            lambda: b"PLBS\x02\x01\x00\x10" + os.urandom(48),    # other version
            lambda: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",        # lost HTTP client
        ]
        try:
            async def garbage(i: int) -> None:
                with contextlib.suppress(OSError):
                    _, w = await asyncio.open_connection(*b.address)
                    w.write(kinds[i % len(kinds)]())
                    writers.append(w)

            flood = asyncio.gather(*(garbage(i) for i in range(200)))
            await asyncio.sleep(0.02)  # the flood is under way
            t0 = time.perf_counter()
            ack = await a.send_op(ha.local("web", "w1", "v"))
            op_s = time.perf_counter() - t0
            assert ack.applied, ack
            assert op_s < 1.5
            await flood
            await until(lambda: sum(b.rejected.values()) >= 200
                        and b.status()["pending_handshakes"] == 0, timeout_s=10,
                        what="the garbage to be counted")
            print(f"flood: op applied after {op_s * 1000:.0f} ms; rejected {b.rejected}")
            assert {"bad_magic", "oversize", "bad_version"} <= set(b.rejected)
            assert b.connected() == ["lb-a"] and hb.peer_events == ["lb-a"]
        finally:
            for w in writers:
                w.transport.abort()
            await stop_all(a, b)

    run(body())



# -- lifecycle -------------------------------------------------------------------------------------


def test_simultaneous_dials_end_with_one_session_the_smaller_name_dialled() -> None:
    async def body() -> None:
        for _ in range(3):
            a, b, ha, hb = await pair()
            try:
                await asyncio.sleep(0.3)  # let both dials land
                assert a.connected() == ["lb-b"] and b.connected() == ["lb-a"]
                pa, pb = a.status()["peers"][0], b.status()["peers"][0]
                if a.disconnects.get("duplicate") or b.disconnects.get("duplicate"):
                    assert pa["direction"] == "dialed" and pb["direction"] == "accepted"
                assert ha.peer_events == ["lb-b"] and hb.peer_events == ["lb-a"]
                assert (await a.send_op(ha.local("web", "w", "v"))).applied
            finally:
                await stop_all(a, b)

    run(body())


def test_stop_leaves_no_task_even_mid_handshake() -> None:
    async def body() -> None:
        a, b, _ha, _hb = await pair()
        assert b.address is not None
        _, w = await asyncio.open_connection(*b.address)  # a handshake b is waiting on
        await asyncio.sleep(0.05)
        await stop_all(a, b)
        w.transport.abort()
        await a.stop()  # idempotent

    run(body())  # run() asserts that no task is left


def test_measure_state_encode_at_3000_entries() -> None:
    entries = {f"web/b{i}": {"state": "present", "address": f"10.{i // 250}.{i % 250}.1:8080",
                             "weight": 1, "stamp": [i, "lb-a"], "via": "api",
                             "at": "2026-05-10T10:01:02Z"} for i in range(3000)}
    msg = sync.StateMsg({"entries": entries, "seen": {"lb-a": 3000}})
    sealer = sync.FrameSealer(b"k" * 32, sync.DIALER)
    best = 1e9
    for _ in range(5):
        t0 = time.perf_counter()
        frame = sealer.seal(msg)
        best = min(best, time.perf_counter() - t0)
    dec = sync.FrameDecoder(sync.FrameOpener(b"k" * 32, sync.DIALER))
    t0 = time.perf_counter()
    (got,) = dec.feed(sync.FrameSealer(b"k" * 32, sync.DIALER).seal(msg))
    decode_s = time.perf_counter() - t0
    assert got == msg
    print(f"state frame {len(frame)} bytes: encode+seal {best * 1000:.1f} ms, "
          f"seal+open+decode {decode_s * 1000:.1f} ms")
    assert 250_000 < len(frame) < sync.DEFAULT_MAX_FRAME
    assert best < 0.1  # a few ms on any box; a whole-loop stall would be 10x that



# -- network namespaces ---------------------------------------------------------------------------


def _netns_skip() -> str | None:
    from lab import netns

    return netns.skip_reason()


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.skipif(_netns_skip() is not None, reason=_netns_skip() or "")
def test_netns_link_cut_then_restored_reconnects_and_converges() -> None:
    """Two namespaces on a bridge; lb1's bridge port goes down while both nodes change their
    pools; when it comes back the channel reconnects by itself and both states converge."""
    from lab import netns

    port = 7471

    async def make(node: str, handler: FakeHandler, bind: str, peer: str) -> SyncChannel:
        ch = SyncChannel(node, (K1,), (bind, port), [(peer, port)], handler,
                         ping_interval_s=0.2, op_timeout_s=0.5)
        ch.start()
        return ch

    async def call(fn: Callable[[], T]) -> T:
        return fn()

    def wait(loop: netns.NetnsLoop, cond: Callable[[], bool], timeout_s: float, what: str
             ) -> float:
        t0 = time.monotonic()
        while not loop.run(call(cond)):
            if time.monotonic() - t0 > timeout_s:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)
        return time.monotonic() - t0

    with netns.build(["lb1", "lb2"]) as topo:
        l1, l2 = topo.loop("lb1"), topo.loop("lb2")
        ip1, ip2 = topo["lb1"].ipv4, topo["lb2"].ipv4
        h1, h2 = FakeHandler("lb1"), FakeHandler("lb2")
        a = l1.run(make("lb1", h1, ip1, ip2))
        b = l2.run(make("lb2", h2, ip2, ip1))
        try:
            wait(l1, lambda: a.connected() == ["lb2"], 5, "the pair to connect")
            wait(l2, lambda: b.connected() == ["lb1"], 5, "the pair to connect")
            op = l1.run(call(lambda: h1.local("web", "w1", "v1")))
            assert l1.run(a.send_op(op)).applied
            assert l1.run(call(lambda: a.status()["peers"][0]["address"])).startswith(ip2)

            topo.cut_link("lb1")
            silent_s = wait(l1, lambda: a.connected() == [], 5, "lb1 to notice")
            wait(l2, lambda: b.connected() == [], 5, "lb2 to notice")
            op = l1.run(call(lambda: h1.local("web", "w2", "v2")))
            ack = l1.run(a.send_op(op))
            assert ack.peers == {"lb2": "pending"}
            l2.run(call(lambda: h2.local("web", "w3", "v3")))
            time.sleep(1.0)  # a few failed dials on both sides

            t_restore = time.monotonic()
            topo.restore_link("lb1")
            wait(l1, lambda: a.connected() == ["lb2"], 15, "reconnect")
            reconnect_s = time.monotonic() - t_restore

            def digests() -> tuple[str, str]:
                return (l1.run(call(h1.overlay_digest)), l2.run(call(h2.overlay_digest)))

            deadline = time.monotonic() + 5
            while len(set(digests())) != 1:
                assert time.monotonic() < deadline, "digests did not converge"
                time.sleep(0.05)
            assert set(l1.run(call(lambda: dict(h1.entries)))) == {"web/w1", "web/w2",
                                                                     "web/w3"}
            op = l2.run(call(lambda: h2.local("web", "w4", "v4")))
            assert l2.run(b.send_op(op)).applied
            st = l1.run(call(a.status))
            assert st["counters"]["reconnects"] == 1 and not st["rejected"]
            print(f"\nnetns: silence noticed after {silent_s:.2f} s, reconnected "
                  f"{reconnect_s:.2f} s after the link came back")
        finally:
            l1.run(a.stop())
            l2.run(b.stop())
