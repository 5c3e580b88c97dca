"""Outside review of snapshot deltas (lb.control.daemon ``_snapshot_delta``, lb.worker_link
``Snap.base``, lb.data.worker ``_apply_snapshot``, lb.data.pool ``Pool.apply_delta``).

In process only: a real ``lb.control.daemon.Daemon`` (admin_helpers.in_process_daemon) whose
supervisor slots hold real ``WorkerHandle`` objects wired to real in-process
``lb.data.worker.Worker`` objects through queues (a FIFO channel each way, delivered when the
test says: "in flight" is a frame not delivered yet). After each step the test compares
every worker's pools with what a whole snapshot of ``daemon.snapshots`` would make them.

Each test is named after what it checks; the docstring of a failing one says what the
review found.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections import Counter
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import free_port, in_process_daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb import worker_link as wl
from lb.control.rotation import AdminState
from lb.control.supervisor import WorkerHandle
from lb.data import worker as worker_mod
from lb.data.pool import Backend, BackendEntry, Outcome, Pool, build_pool

# -- the harness -------------------------------------------------------------------------------

CFG = """\
[node]
name = "t1"
state_dir = "{state}"
worker_nice = 0

[[listener]]
name = "web"
bind = "127.0.0.1:{listen}"
pool = "web"
{routes}
[[pool]]
name = "web"
balance = "{balance}"
drain_timeout_s = {drain}
panic_percent = {panic_percent}
panic_mode = "{panic_mode}"
backends = [ {backends} ]
[pool.health]
enabled = {health}
initial = "up"
rise = 1
fall = 1
[pool.passive]
max_eject_percent = {max_eject}
{more}
"""

OTHER_POOL = """
[[pool]]
name = "api"
backends = [ { name = "api1", address = "127.0.0.1:7001" } ]
[pool.health]
enabled = false
"""


def backends_toml(names: list[str], port0: int = 9001) -> str:
    return ", ".join(f'{{ name = "{n}", address = "127.0.0.1:{port0 + i}" }}'
                     for i, n in enumerate(names))


class Chan:
    """A worker's end of the channel: what it sends waits in ``out`` for the control."""

    def __init__(self) -> None:
        self.out: list[dict[str, Any]] = []
        self.transport = None

    def send(self, frame: dict[str, Any]) -> bool:
        self.out.append(json.loads(json.dumps(frame)))
        return True


class CtlChan:
    """The control's end: frames wait in ``inbox`` until the test delivers them."""

    def __init__(self) -> None:
        self.inbox: list[dict[str, Any]] = []
        self.transport = None

    def send(self, frame: dict[str, Any]) -> bool:
        frame = json.loads(json.dumps(frame))
        if frame.get("t") == "config":
            frame["fds"] = {}  # the listening sockets stay the daemon's: no server starts here
        self.inbox.append(frame)
        return True


class Link:
    """One worker slot: the real handle in the supervisor and the real in-process Worker."""

    def __init__(self, rig: Rig, index: int) -> None:
        self.rig = rig
        self.index = index
        self.worker = worker_mod.Worker(-1, index)
        self.chan = Chan()
        self.worker.chan = self.chan  # type: ignore[assignment]
        self.handle = WorkerHandle(index, rig.d.supervisor.generation)
        self.ctl = CtlChan()
        self.handle.chan = self.ctl  # type: ignore[assignment]
        self.received: list[wl.Message] = []

    def deliver(self, n: int | None = None) -> int:
        """Frames control -> worker (all, or the first n); worker -> control after each."""
        done = 0
        while self.ctl.inbox and (n is None or done < n):
            frame = self.ctl.inbox.pop(0)
            self.received.append(wl.decode(frame))
            self.worker._on_message(frame)
            done += 1
            self.back()
        return done

    def back(self) -> None:
        while self.chan.out:
            frame = self.chan.out.pop(0)
            self.rig.d.supervisor._on_message(self.handle, frame)

    def sent(self) -> list[wl.Message]:
        return list(self.rig.worker_sent[self.index])


class Rig:
    """A daemon with its elastic layer composed (as startup does) and in-process workers."""

    def __init__(self, tmp: Path, *, names: list[str] | None = None, balance: str = "round_robin",
                 drain: float = 5.0, health: bool = False, panic_percent: int = 50,
                 panic_mode: str = "spread", max_eject: int = 50, more: str = "",
                 routes: str = "") -> None:
        self.tmp = tmp
        self.path = tmp / "pairlb.toml"
        self.params: dict[str, Any] = {
            "state": tmp / "state", "listen": free_port(), "balance": balance, "drain": drain,
            "backends": backends_toml(names or ["web1", "web2", "web3"]),
            "health": "true" if health else "false", "panic_percent": panic_percent,
            "panic_mode": panic_mode, "max_eject": max_eject, "more": more, "routes": routes}
        self.d = in_process_daemon(CFG.format(**self.params), self.path)
        self.e = self.d.elastic
        self.e.load()
        self.d.table.apply(self.e.compose(self.d.cfg)[0])
        self.d.health.set_targets(self.d.table.targets())
        self.d.push_snapshots()
        self.links: dict[int, Link] = {}
        self.worker_sent: dict[int, list[wl.Message]] = {}
        self.broadcasts: list[wl.Message] = []
        sup = self.d.supervisor
        real_broadcast = sup.broadcast

        def spy(msg: wl.Message) -> None:
            self.broadcasts.append(msg)
            real_broadcast(msg)

        sup.broadcast = spy  # type: ignore[method-assign]
        real_on_message = sup._on_message

        def on_message(handle: WorkerHandle, frame: dict[str, Any]) -> None:
            self.worker_sent.setdefault(handle.index, []).append(wl.decode(frame))
            real_on_message(handle, frame)

        sup._on_message = on_message  # type: ignore[method-assign]

    def rewrite(self, **changes: Any) -> None:
        self.params.update(changes)
        self.path.write_text(CFG.format(**self.params))

    def spawn(self, index: int) -> Link:
        """What Supervisor._spawn does once the process runs: the slot, then the welcome."""
        link = Link(self, index)
        self.worker_sent[index] = []
        sup = self.d.supervisor
        sup.slots[index] = link.handle
        for msg in sup.welcome(link.handle):
            link.handle.send(msg)
        self.links[index] = link
        return link

    async def pump(self, rounds: int = 3) -> None:
        """Deliver everything both ways, letting the workers' tasks run."""
        for _ in range(rounds):
            for link in list(self.links.values()):
                link.deliver()
            await asyncio.sleep(0)
            for link in list(self.links.values()):
                link.back()

    async def settle(self) -> None:
        """Let pending pushes (push_soon, the push gap) fire, then deliver everything."""
        for _ in range(4):
            await asyncio.sleep(max(0.02, self.d._push_gap_s * 1.5))
            await self.pump()

    async def reload(self, readers: list[Link] | None = None) -> Any:
        """Daemon.reload(), the workers in ``readers`` (default all) reading meanwhile (the
        reload waits for their ConfigApplied)."""
        task = asyncio.get_running_loop().create_task(self.d.reload())
        while not task.done():
            for link in (self.links.values() if readers is None else readers):
                link.deliver()
            await asyncio.sleep(0.005)
            for link in (self.links.values() if readers is None else readers):
                link.back()
        return task.result()

    def mark(self, pool: str, name: str, up: bool) -> None:
        """One active-check result (rise = fall = 1: it decides at once)."""
        import time

        from healthcheck.state import CheckResult, CheckStatus

        status = CheckStatus.L4_OK if up else CheckStatus.L4_REFUSED
        self.d.health.book.record((pool, name), CheckResult(status, 0.001), time.monotonic())


def expected(d: Any) -> dict[str, dict[str, tuple[bool, float]]]:
    """What a whole snapshot of the control's rotation says, pool -> backend -> entry."""
    return {p: {b: (e.eligible, e.weight) for b, e in s.entries.items()}
            for p, s in d.snapshots.items()}


def worker_view(w: worker_mod.Worker, now: float = 0.0
                ) -> dict[str, dict[str, tuple[bool, float]]]:
    out: dict[str, dict[str, tuple[bool, float]]] = {}
    for name, pool in w.pools.items():
        out[name] = {b.name: ((True, b.weight) if b.usable(now) else (False, 0.0))
                     for b in pool.backends}
    return out


def mismatches(rig: Rig, link: Link) -> list[str]:
    """Where a worker's pools differ from the control's whole rotation (membership,
    eligibility, weight, panic), empty when they agree."""
    want = expected(rig.d)
    have = worker_view(link.worker)
    out = []
    for pool, entries in want.items():
        if pool not in have:
            out.append(f"worker {link.index}: no pool {pool}")
            continue
        if set(have[pool]) != set(entries):
            out.append(f"worker {link.index} {pool}: members {sorted(have[pool])} != "
                       f"{sorted(entries)}")
        for b, e in entries.items():
            got = have[pool].get(b)
            if got is not None and got != ((True, e[1]) if e[0] and e[1] > 0 else (False, 0.0)):
                out.append(f"worker {link.index} {pool}/{b}: {got} != control {e}")
        if link.worker.pools[pool].panic != rig.d.snapshots[pool].panic:
            out.append(f"worker {link.index} {pool}: panic {link.worker.pools[pool].panic} != "
                       f"{rig.d.snapshots[pool].panic}")
    for pool in have:
        if pool not in want:
            out.append(f"worker {link.index}: extra pool {pool}")
    return out


def all_mismatches(rig: Rig) -> list[str]:
    return [m for link in rig.links.values() for m in mismatches(rig, link)]


@pytest.fixture(autouse=True)
def _in_process_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_mod.log, "setup", lambda *a, **k: None)  # not this process's
    monkeypatch.setattr(worker_mod.os, "nice", lambda n: 0)


def run(coro: Any) -> None:
    asyncio.run(coro)


# -- the protocol: a real control process and real workers ----------------------------------------


@pytest.mark.timeout(60)
def test_workers_follow_admin_changes_by_deltas_alone(tmp_path: Path) -> None:
    """Drain, maintenance, enable, weight changes, adds and removes at runtime: after the
    welcome every push is a delta (base = the previous version), and each worker's rotation
    is exactly what a whole snapshot of the control's rotation makes it."""

    async def main() -> None:
        rig = Rig(tmp_path, drain=0.05)
        a, b = rig.spawn(0), rig.spawn(1)
        await rig.pump()
        assert not all_mismatches(rig), all_mismatches(rig)
        rig.broadcasts.clear()
        d = rig.d
        steps = [
            lambda: d.set_admin_state("web", "web2", AdminState.DRAINING),
            lambda: d.set_admin_state("web", "web3", AdminState.MAINTENANCE),
            lambda: d.set_admin_state("web", "web2", AdminState.ENABLED),
        ]
        for step in steps:
            step()
            await rig.settle()
            assert not all_mismatches(rig), all_mismatches(rig)
        await d.add_backend("web", "web4", "127.0.0.1:9104", 3)
        await rig.settle()
        assert not all_mismatches(rig), all_mismatches(rig)
        await d.remove_backend("web", "web1")
        await asyncio.sleep(0.7)  # the drain's settle time, then it leaves
        await rig.settle()
        assert d.table.backend("web", "web1") is None
        assert not all_mismatches(rig), all_mismatches(rig)
        snaps = [m for m in rig.broadcasts if isinstance(m, wl.Snap)]
        assert snaps and all(s.base for s in snaps), snaps  # deltas only
        for x in (a, b):
            assert not [m for m in x.sent() if isinstance(m, wl.ConfigFailed)]

    run(main())


@pytest.mark.timeout(60)
def test_a_replacement_whose_entry_did_not_change_joins_the_workers_rotation(
        tmp_path: Path) -> None:
    """A name at a new address (discovery here; the peer or the overlay go the same way) is
    a new server: the old one drains and leaves (PoolEdit remove), the new one joins
    (PoolEdit add: out of rotation on every worker until a snapshot entry puts it in).
    With checks off and a drain that ends before the coalesced push (drain_timeout_s = 0, or
    any drain shorter than the push gap), the new server's entry (True, 1.0) is the very
    Entry object the workers last got for the old one, so ``_snapshot_delta`` sends nothing
    for it: every worker keeps the new server out of rotation for good while the control
    process (and /status) has it in."""

    async def main() -> None:
        rig = Rig(tmp_path, drain=0)
        a = rig.spawn(0)
        await rig.pump()
        rig.e.on_discovered("web", [("d1", "127.0.0.1:9201", 1)], "file")
        await rig.settle()
        assert not all_mismatches(rig), all_mismatches(rig)
        assert a.worker.pools["web"].get("d1").usable(0.0)  # type: ignore[union-attr]
        rig.d.push_snapshots()  # a push just went out (any change): the next one waits the gap
        rig.e.on_discovered("web", [("d1", "127.0.0.1:9202", 1)], "file")
        await rig.settle()
        assert rig.d.table.backend("web", "d1").address == "127.0.0.1:9202"  # type: ignore[union-attr]
        assert rig.d.snapshots["web"].entries["d1"].eligible
        assert not all_mismatches(rig), all_mismatches(rig)
        # (Not a moment's lag: any later change goes as a delta that leaves d1 out too.)
        rig.d.set_admin_state("web", "web2", AdminState.MAINTENANCE)
        await rig.settle()
        assert not all_mismatches(rig), all_mismatches(rig)

    run(main())


@pytest.mark.timeout(60)
def test_delete_then_post_of_the_same_name_puts_it_back_in_the_workers_rotation(
        tmp_path: Path) -> None:
    """The admin API's DELETE then POST of one name (an operator re-registering a server;
    drain_timeout_s = 0: do not wait for requests in flight). The workers get PoolEdit
    remove, then PoolEdit add (a new Backend, out of rotation until an entry comes), and no
    snapshot at all: the rotation after the round trip equals the one before it, so
    ``_compute_snapshots`` sees no change and ``_snapshot_delta`` would find none either.
    Before deltas the next push of anything (a whole snapshot) healed this; now every later
    push is a delta that never names web1, so web1 gets no request from any worker until a
    reload or a worker restart, while /status shows it in rotation."""

    async def main() -> None:
        rig = Rig(tmp_path, drain=0)
        rig.spawn(0)
        rig.spawn(1)
        await rig.pump()
        rig.d.push_snapshots()  # some push just went out: the next one waits the push gap
        await rig.d.remove_backend("web", "web1")
        for _ in range(50):
            if ("web", "web1") not in rig.e.removing:
                break
            await asyncio.sleep(0)
        await rig.d.add_backend("web", "web1", "127.0.0.1:9001", 1)
        await rig.settle()
        rig.d.set_admin_state("web", "web3", AdminState.DRAINING)  # any later change
        await rig.settle()
        assert rig.d.snapshots["web"].entries["web1"].eligible
        assert not all_mismatches(rig), all_mismatches(rig)

    run(main())


@pytest.mark.timeout(60)
def test_old_workers_keep_following_the_rotation_during_a_rolling_replacement(
        tmp_path: Path) -> None:
    """A reload that rebinds a listener and changes the rotation (here web1's weight)
    replaces every worker (Supervisor.replace_all): new workers are spawned one slot at a
    time, and an old worker stays in its slot (getting broadcasts, accepting connections)
    until its slot's new process is spawned. The first new worker's welcome
    (``_snapshot_message``) moves ``_pushed_ver`` to the version the reload computed, which
    no old worker got (the replace path broadcasts no snapshot), so every later delta names
    a base the old workers do not have: they answer ConfigFailed("pool_edit: ..."), which
    the control process ignores for a retiring worker. They serve the rest of the spawn
    loop with a frozen rotation (a backend put in maintenance or gone DOWN keeps getting
    their requests); with whole snapshots each push reached them. (Once out of the slots,
    during wait_ready and the drain, old workers got nothing before deltas either.)"""

    async def main() -> None:
        from lb.listen import make_listen_socket

        rig = Rig(tmp_path, health=True)
        rig.d.sockets["web"] = [make_listen_socket(rig.d.cfg.listener[0])]  # as startup binds
        for i in range(2):
            rig.spawn(i)
        await rig.pump()
        old = dict(rig.links)
        sup = rig.d.supervisor
        gate = asyncio.Event()
        spawned = asyncio.Event()

        async def replace_all(drain_s: float) -> None:  # Supervisor.replace_all's steps
            sup.generation += 1
            before = list(sup.slots.values())
            for h in before:
                h.retiring = True
                sup.retiring.add(h)
            rig.spawn(0)
            spawned.set()
            await gate.wait()  # worker 1's new process is starting
            rig.spawn(1)
            for h in before:
                h.send(wl.Stop(drain_s))

        sup.replace_all = replace_all  # type: ignore[method-assign]
        # A new port for the listener (new workers), and web1's weight 1 -> 2 (the rotation
        # changes: the reload computes a snapshot version no old worker gets).
        rig.rewrite(listen=free_port(), backends=rig.params["backends"].replace(
            '"127.0.0.1:9001" }', '"127.0.0.1:9001", weight = 2 }'))
        reload = asyncio.get_running_loop().create_task(rig.d.reload())
        waiting = asyncio.get_running_loop().create_task(spawned.wait())
        await asyncio.wait({reload, waiting}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert spawned.is_set(), reload.result() if reload.done() else "reload hangs"
        await rig.pump()
        assert rig.links[1] is old[1] and old[1].handle in sup.slots.values()
        rig.d.set_admin_state("web", "web2", AdminState.MAINTENANCE)
        rig.mark("web", "web3", False)
        rig.d.push_snapshots()
        await rig.pump()
        refused = [m for m in old[1].sent() if isinstance(m, wl.ConfigFailed)]
        serving = sorted(b.name for b in old[1].worker.pools["web"].backends if b.usable(0.0))
        gate.set()
        result = await reload
        for socks in rig.d.sockets.values():
            for sock in socks:
                sock.close()
        assert result.ok, result
        await rig.pump()
        assert serving == ["web1"], (serving, refused)

    run(main())


@pytest.mark.timeout(60)
def test_a_worker_whose_config_and_snapshot_arrive_together_sends_ready_once() -> None:
    """Commit 234a31e: "a worker whose config and first snapshot arrive in one read starts
    its servers once". With one listener it does. With two, both ``_config_done`` and
    ``_apply_snapshot`` start ``_start_servers``; each registers the listener it reaches
    first before awaiting its start (``create_server`` yields once), so the first task
    starts listener a, the second finds a taken and starts b, and each sends Ready and logs
    event=worker_serving: twice per worker, what the commit meant to stop (a test counting
    those lines per worker miscounts again as soon as a node has two listeners)."""
    from lb.config import Config

    async def main() -> None:
        socks = []
        for _ in range(2):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(8)
            s.setblocking(False)
            socks.append(s)
        cfg = Config.model_validate({
            "node": {"name": "w", "worker_nice": 0},
            "listener": [{"name": f"l{i}", "bind": f"127.0.0.1:{s.getsockname()[1]}",
                          "pool": "web"} for i, s in enumerate(socks)],
            "pool": [{"name": "web", "backends": [{"name": "a", "address": "127.0.0.1:9"}]}],
        }).wire()
        w = worker_mod.Worker(-1, 0)
        chan = Chan()
        w.chan = chan  # type: ignore[assignment]
        fds = {f"l{i}": (os.dup(s.fileno()),) for i, s in enumerate(socks)}
        # One read: both frames handled before the loop runs anything else.
        w._on_message(wl.encode(wl.Config(1, cfg, fds)))
        w._on_message(wl.encode(wl.Snap(1, {"web": wl.PoolSnap(False, {"a": (True, 1.0)})})))
        for _ in range(20):
            await asyncio.sleep(0.01)
        try:
            ready = [f for f in chan.out if f["t"] == "ready"]
            assert sorted(w.servers) == ["l0", "l1"]
            assert len(ready) == 1, ready
        finally:
            for server in w.servers.values():
                await server.stop_accepting()
                server.close()
            for s in w.socks.values():
                s.close()
            for s in socks:
                s.close()

    run(main())


# -- Pool.apply_delta against Pool.apply (hypothesis) ---------------------------------------------

MODES = ("round_robin", "least_connections", "random_two")
WEIGHTS = st.sampled_from([0.25, 0.5, 1.0, 2.0, 3.0, 5.0])
_IN, _OUT, _EJECTED = 1, 0, 2


def _load(b: Backend) -> Fraction:
    return Fraction(b.in_flight) / Fraction(b.weight)


def _structures_ok(pool: Pool, now: float) -> None:
    """The rotation's derived structures agree with the backends (one live heap entry or
    array slot per backend in rotation, none for the others), and the heap is compacted."""
    inside = [b for b in pool.backends if b._where == _IN]
    assert pool._live == len(inside)
    for b in inside:
        assert b.eligible and b.weight > 0
        assert b.ejected_until <= now
    for b in pool.backends:
        if b._where == _EJECTED:
            assert b.ejected_until > 0
    if pool.balance == "random_two":
        assert sorted(map(id, pool._arr)) == sorted(map(id, inside))
        assert all(pool._arr[b._pos] is b for b in inside)
        return
    live = Counter(id(e[3]) for e in pool._heap if e[2] == e[3]._ver)
    assert live == Counter(map(id, inside)), (live, [b.name for b in inside])
    if pool.balance == "round_robin":
        for d, _, v, b in pool._heap:
            if v == b._ver:
                assert d == b._deadline
    assert len(pool._heap) <= max(pool._cap, 2 * pool._live + 64) + 1


def _same(a: Pool, b: Pool, now: float) -> None:
    assert [x.name for x in a.backends] == [x.name for x in b.backends]
    for x, y in zip(a.backends, b.backends, strict=True):
        assert (x.name, x.eligible, x.usable(now), x.ejected_until) == \
            (y.name, y.eligible, y.usable(now), y.ejected_until), (x, y)
        if x.eligible:
            assert x.weight == y.weight
        if a.balance == "round_robin" and x._where == _IN:
            assert (x._deadline, x._w) == (y._deadline, y._w), (x.name,)
    assert a.panic == b.panic and a.version == b.version
    assert a._ejected_n == b._ejected_n


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(MODES), n=st.integers(1, 8), data=st.data())
@pytest.mark.timeout(60)
def test_deltas_make_the_pool_a_whole_snapshot_makes(mode: str, n: int, data: st.DataObject
                                                     ) -> None:
    """Two pools get the same history: picks (with and without retries' exclusions),
    releases, failures (local ejections, consecutive_failures = 1), time, backends added,
    removed and re-added under an old name, and snapshots: A gets each one whole
    (``apply``), B only the entries that differ from what it got last plus the backends
    ejected locally since (the control process's forced entries), as ``_snapshot_delta``
    makes them. A forced push reaches the worker before the local ejection would end.
    After every step both have the same backends in rotation at the same weights, the same
    ejections and ejection budget, and sound structures; round robin makes the very same
    picks (same deadlines); least connections picks exactly a least loaded backend; a pick
    is only ever a usable backend; with no retry in the history, round robin's shares over
    any run of picks are within 1 + n*w/W of the weights' after all those changes."""
    weights = data.draw(st.lists(WEIGHTS, min_size=n, max_size=n))
    specs = [(f"b{i}", "127.0.0.1", 9000 + i, w) for i, w in enumerate(weights)]

    def make() -> Pool:
        return build_pool("web", mode, specs, consecutive_failures=1, local_eject_s=1.0,
                          max_eject_percent=50, eligible=False, seed=7)

    a, b = make(), make()
    truth: dict[str, BackendEntry] = {
        name: BackendEntry(True, w) for name, _, _, w in specs}
    sent: dict[str, BackendEntry] = {}
    forced: set[str] = set()
    held: dict[int, list[Backend]] = {id(a): [], id(b): []}
    now, version, added, panic, retried = 0.0, 0, 0, False, False

    def push(changes: int = 0) -> None:
        nonlocal version, panic
        for _ in range(changes):
            names = sorted(x.name for x in a.backends)
            if names:
                truth[data.draw(st.sampled_from(names))] = BackendEntry(
                    data.draw(st.integers(0, 3)) > 0, data.draw(WEIGHTS))
        if data.draw(st.integers(0, 5)) == 0:
            panic = not panic
        version += 1
        delta = {k: e for k, e in truth.items() if sent.get(k) != e or k in forced}
        a.apply(version, truth, panic)
        b.apply_delta(version, delta, panic)
        for k in delta:
            got = b.get(k)
            assert got is not None and got.ejected_until == 0
        sent.clear()
        sent.update(truth)
        forced.clear()
        assert len(b._heap) <= b._cap or mode == "random_two"

    push()
    for _ in range(data.draw(st.integers(10, 80))):
        op = data.draw(st.sampled_from(["pick", "pick", "pick", "retry", "release", "release",
                                        "fail", "fail", "ok", "push", "push", "time", "add",
                                        "remove", "readd"]))
        if op == "push":
            push(data.draw(st.integers(0, 3)))
        elif op in ("pick", "retry"):
            names = []
            if op == "retry" and a.backends:
                names = data.draw(st.lists(st.sampled_from([x.name for x in a.backends]),
                                           max_size=n, unique=True))
            retried = retried or bool(names)
            picked = []
            for pool in (a, b):
                excl = [pool.get(x) for x in names]
                usable = [x for x in pool.backends if x.usable(now) and x not in excl]
                best = min((_load(x) for x in usable), default=None)
                got = pool.pick(now, excl)
                if not usable:
                    assert got is None
                    picked.append(None)
                    continue
                assert got is not None and got.usable(now) and got not in excl
                assert pool.get(got.name) is got
                if mode == "least_connections":
                    got.in_flight -= 1
                    assert _load(got) == best
                    got.in_flight += 1
                held[id(pool)].append(got)
                picked.append(got.name)
            if mode == "round_robin":
                assert picked[0] == picked[1]
        elif op == "release":
            for pool in (a, b):
                if held[id(pool)]:
                    i = data.draw(st.integers(0, len(held[id(pool)]) - 1))
                    pool.release(held[id(pool)].pop(i))
        elif op in ("fail", "ok") and a.backends:
            name = data.draw(st.sampled_from([x.name for x in a.backends]))
            outcome = Outcome.CONNECT_FAILED if op == "fail" else Outcome.OK
            ejs = [pool.observe(pool.get(name), outcome, now) for pool in (a, b)]  # type: ignore[arg-type]
            assert (ejs[0] is None) == (ejs[1] is None)
            if ejs[0] is not None:
                forced.add(name)
        elif op == "time":
            if forced:
                push()  # the control process answers the Eject before the ejection ends
            now += data.draw(st.sampled_from([0.25, 0.5, 1.0, 2.0]))
        elif op in ("add", "readd"):
            gone = sorted({s[0] for s in specs} - {x.name for x in a.backends})
            if op == "readd" and gone:
                name = data.draw(st.sampled_from(gone))
            else:
                added += 1
                name = f"new{added}"
            w = data.draw(WEIGHTS)
            for pool in (a, b):
                assert pool.add_backend(Backend("web", name, "127.0.0.1", 9500, w))
            # The control process names a (re-)added backend in its next delta.
            truth.pop(name, None)
            sent.pop(name, None)
            if data.draw(st.booleans()):
                truth[name] = BackendEntry(True, w)
        elif op == "remove" and a.backends:
            name = data.draw(st.sampled_from([x.name for x in a.backends]))
            for pool in (a, b):
                assert pool.remove_backend(name) is not None  # in flight: released into it
            truth.pop(name, None)
            sent.pop(name, None)
            forced.discard(name)
        _structures_ok(a, now)
        _structures_ok(b, now)
        _same(a, b, now)
    if mode == "round_robin" and not retried:  # (retries: see the burst test below)
        # Shares after the history: within 1 + n*w/W of the weight's share over any M picks.
        live = {x.name: x.weight for x in b.backends if x.usable(now)}
        if live:
            total = sum(live.values())
            m = data.draw(st.integers(1, 100))
            seen = Counter(b.pick(now).name for _ in range(m))  # type: ignore[union-attr]
            for name, w in live.items():
                assert abs(seen[name] - w * m / total) <= 1 + len(live) * w / total + 1e-9


@pytest.mark.timeout(60)
def test_a_worker_restarted_between_deltas_and_one_with_deltas_in_flight_both_converge(
        tmp_path: Path) -> None:
    """Worker 0 has two deltas not yet read when worker 1 restarts (its welcome is a whole
    snapshot, which moves ``_pushed``/``_pushed_ver``); more deltas follow on top of the
    welcome's version. Worker 0 reads everything in order and applies every delta (each
    builds on the previous: no gap, no ConfigFailed); worker 1 applies the deltas after its
    welcome. Both end as a whole snapshot makes them."""

    async def main() -> None:
        rig = Rig(tmp_path, names=[f"w{i}" for i in range(6)], health=True)
        w0 = rig.spawn(0)
        rig.spawn(1)
        await rig.pump()
        d = rig.d
        d.set_admin_state("web", "w1", AdminState.MAINTENANCE)
        rig.mark("web", "w2", False)
        d.push_snapshots()
        assert len(w0.ctl.inbox) == 2  # in flight
        w1 = rig.spawn(1)  # restarted: a new process in slot 1
        d.set_admin_state("web", "w1", AdminState.ENABLED)
        rig.mark("web", "w3", False)
        d.push_snapshots()
        w0.deliver()
        w1.deliver()
        await rig.pump()
        assert not all_mismatches(rig), all_mismatches(rig)
        for link in (w0, w1):
            assert not [m for m in link.sent() if isinstance(m, wl.ConfigFailed)]
        assert next(m.base for m in w1.received if isinstance(m, wl.Snap)) == 0

    run(main())


@pytest.mark.timeout(60)
def test_a_refused_ejection_is_undone_by_a_delta_naming_the_backend(tmp_path: Path) -> None:
    """A worker ejects a backend locally and reports it; the control process refuses (its
    budget: one of three backends may be ejected, one is already) and its rotation does
    not change, yet the forced push is a delta carrying that backend's entry, which ends
    the local ejection on that worker (and on the others that ejected it too). An ejection
    the control process accepts goes out as a changed entry and takes it out everywhere."""

    async def main() -> None:
        rig = Rig(tmp_path, max_eject=34)
        w0, w1 = rig.spawn(0), rig.spawn(1)
        await rig.pump()
        rig.broadcasts.clear()

        def eject_locally(link: Link, name: str) -> None:
            pool = link.worker.pools["web"]
            pool.consecutive_failures = 1
            b = pool.get(name)
            assert b is not None
            ej = pool.observe(b, Outcome.CONNECT_FAILED, __import__("time").monotonic())
            assert ej is not None and not b.usable(0.0)
            link.worker._on_ejection(ej)

        eject_locally(w0, "web1")  # accepted: web1 out everywhere
        w0.back()
        await rig.settle()
        assert not rig.d.snapshots["web"].entries["web1"].eligible
        assert not all_mismatches(rig), all_mismatches(rig)
        eject_locally(w0, "web2")  # refused: the budget is spent
        eject_locally(w1, "web2")
        w0.back()
        w1.back()
        assert rig.d.snapshots["web"].entries["web2"].eligible
        await rig.settle()
        snaps = [m for m in rig.broadcasts if isinstance(m, wl.Snap)]
        assert snaps[-1].base and snaps[-1].pools["web"].entries == {"web2": (True, 1.0)}
        for link in (w0, w1):
            b = link.worker.pools["web"].get("web2")
            assert b is not None and b.usable(0.0) and b.ejected_until == 0
        assert not all_mismatches(rig), all_mismatches(rig)

    run(main())


@pytest.mark.timeout(60)
def test_a_panic_change_with_no_entry_change_reaches_the_workers(tmp_path: Path) -> None:
    """Every backend DOWN: panic (nothing healthy to spread over: every entry out). All
    put in maintenance: no enabled backend, no panic, and every entry is still (False, 0):
    the delta carries no entry, only the pool's panic flag, and the workers take it."""

    async def main() -> None:
        rig = Rig(tmp_path, health=True, routes="")
        rig.spawn(0)
        await rig.pump()
        for n in ("web1", "web2", "web3"):
            rig.mark("web", n, False)
        rig.d.push_snapshots()
        await rig.pump()
        assert rig.d.snapshots["web"].panic
        assert not all_mismatches(rig), all_mismatches(rig)
        rig.broadcasts.clear()
        for n in ("web1", "web2", "web3"):
            rig.d.table.set_admin("web", n, AdminState.MAINTENANCE)
        rig.d.push_snapshots()
        await rig.pump()
        assert not rig.d.snapshots["web"].panic
        snap = [m for m in rig.broadcasts if isinstance(m, wl.Snap)][-1]
        assert snap.pools["web"].entries == {} and snap.pools["web"].panic is False
        assert not all_mismatches(rig), all_mismatches(rig)

    run(main())


@pytest.mark.timeout(60)
def test_reloads_that_add_and_drop_pools_and_members_then_deltas(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload is a whole config and a whole snapshot to every worker (base 0), whatever
    deltas were in flight before it; a pool the reload adds then follows by deltas, a pool
    it drops leaves the workers, members it adds or drops follow. Worker 1 reads nothing
    until the end (everything in flight at once)."""

    async def main() -> None:
        from lb.control import daemon as daemon_mod

        # Worker 1 reads nothing during the reloads: it does not confirm them.
        monkeypatch.setattr(daemon_mod, "WORKER_APPLY_TIMEOUT_S", 0.3)
        rig = Rig(tmp_path, health=True)
        w0, w1 = rig.spawn(0), rig.spawn(1)
        await rig.pump()
        d = rig.d
        d.set_admin_state("web", "web2", AdminState.DRAINING)
        w0.deliver()
        rig.rewrite(more=OTHER_POOL, backends=backends_toml(["web1", "web2", "web4"]))
        r = await rig.reload([w0])
        assert r.errors == ["worker 1 did not confirm the config within 0.3 s"], r
        w0.deliver()
        assert set(w0.worker.pools) == {"web", "api"}
        d.set_admin_state("web", "web4", AdminState.MAINTENANCE)
        d.set_admin_state("api", "api1", AdminState.DRAINING)
        w0.deliver()
        assert not mismatches(rig, w0), mismatches(rig, w0)
        rig.rewrite(more="", backends=backends_toml(["web1", "web2", "web3"]))
        r = await rig.reload([w0])
        assert r.errors == ["worker 1 did not confirm the config within 0.3 s"], r
        d.set_admin_state("web", "web2", AdminState.ENABLED)
        rig.mark("web", "web3", False)
        d.push_snapshots()
        await rig.pump()
        assert set(w1.worker.pools) == {"web"}
        assert not all_mismatches(rig), all_mismatches(rig)
        for link in (w0, w1):
            assert not [m for m in link.sent() if isinstance(m, wl.ConfigFailed)]

    run(main())


# -- lb.control.elastic with workers attached ------------------------------------------------------


async def _until(cond: Any, timeout_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.timeout(60)
def test_drains_across_a_reload_a_second_delete_and_a_replacement(tmp_path: Path) -> None:
    """An API backend drains (a request in flight) across a reload and a second DELETE
    (answered as removing, no second drain); a discovered backend moved to a new address
    drains as the old server, a DELETE during that drain removes the name for good (the
    new server never joins). When the in-flight counts fall to 0 both leave, and every
    worker's pool ends as the control's whole rotation, by deltas and PoolEdits alone."""

    async def main() -> None:
        rig = Rig(tmp_path, drain=10.0)
        w0, w1 = rig.spawn(0), rig.spawn(1)
        await rig.pump()
        d, e = rig.d, rig.e
        await d.add_backend("web", "a1", "127.0.0.1:9301", 2)
        e.on_discovered("web", [("d1", "127.0.0.1:9401", 1)], "file")
        await rig.settle()
        assert not all_mismatches(rig), all_mismatches(rig)
        d.inflight[0] = {"web/a1": 1, "web/d1": 1}
        answer = await d.remove_backend("web", "a1")
        assert answer["removing"]
        e.on_discovered("web", [("d1", "127.0.0.1:9402", 1)], "file")  # d1: a new server
        assert ("web", "d1") in e.removing
        await rig.settle()
        assert not all_mismatches(rig), all_mismatches(rig)
        r = await rig.reload()
        assert r.ok, r
        assert ("web", "a1") in e.removing and d.table.backend("web", "a1") is not None
        again = await d.remove_backend("web", "a1")
        assert again["removing"]
        gone = await d.remove_backend("web", "d1")  # during the replacement's drain
        assert gone["removing"]
        await rig.settle()
        assert not all_mismatches(rig), all_mismatches(rig)
        d.inflight[0] = {}
        await _until(lambda: not e.removing)
        await rig.settle()
        assert d.table.backend("web", "a1") is None and d.table.backend("web", "d1") is None
        for link in (w0, w1):
            names = [b.name for b in link.worker.pools["web"].backends]
            assert "a1" not in names and "d1" not in names, names
        assert not all_mismatches(rig), all_mismatches(rig)

    run(main())


@pytest.mark.timeout(60)
def test_a_workers_snapshot_forgets_backends_that_left(tmp_path: Path) -> None:
    """What a worker keeps as its last snapshot (``last_snap``) is the base of the next
    delta and what a reload's config re-applies before the reload's own snapshot. Every
    delta is merged into it (``Snap.merged``: entries are only ever added or overwritten),
    so a backend that left at runtime stays in it for good: with discovery churning names
    (an autoscaled group) it grows by one entry per server that ever existed until the
    next reload or worker restart, and each delta copies all of it (``merged`` is O(every
    name ever seen), not O(changed)). Before deltas it was the control's current
    rotation."""

    async def main() -> None:
        rig = Rig(tmp_path, drain=0)
        w0 = rig.spawn(0)
        await rig.pump()
        for i in range(12):
            rig.e.on_discovered("web", [(f"asg-{i}", f"127.0.0.1:{9500 + i}", 1)], "file")
            await _until(lambda: not rig.e.removing)
            await rig.settle()
        assert not all_mismatches(rig), all_mismatches(rig)
        assert w0.worker.last_snap is not None
        kept = set(w0.worker.last_snap.pools["web"].entries)
        members = {b.name for b in w0.worker.pools["web"].backends}
        assert kept == members, sorted(kept - members)

    run(main())


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest.mark.timeout(60)
def test_any_interleaving_of_changes_and_reads_ends_as_a_whole_snapshot(
        tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """Random histories: admin changes, health results, runtime adds and removes (new names
    only: a name re-used within a push gap is the replacement finding above), local
    ejections reported by a worker, worker restarts, reloads that change the config's
    members, each worker reading a random number of its frames at random moments. Once
    everything is read, every worker's pools are exactly the control's whole rotation and
    no worker ever saw a gap (ConfigFailed)."""
    tmp = tmp_path_factory.mktemp("hist")

    async def main() -> None:
        rig = Rig(tmp, names=["web1", "web2", "web3", "web4"], health=True, drain=0,
                  max_eject=50)
        for i in range(3):
            rig.spawn(i)
        await rig.pump()
        d = rig.d
        added = 0
        config_names = ["web1", "web2", "web3", "web4"]
        for _ in range(data.draw(st.integers(5, 25))):
            op = data.draw(st.sampled_from(["admin", "mark", "mark", "add", "remove", "eject",
                                            "restart", "reload", "read", "read", "read",
                                            "sleep"]))
            names = sorted(d.table.rotations["web"].records)
            if op == "admin" and names:
                d.set_admin_state("web", data.draw(st.sampled_from(names)),
                                  data.draw(st.sampled_from(list(AdminState))))
            elif op == "mark" and names:
                rig.mark("web", data.draw(st.sampled_from(names)), data.draw(st.booleans()))
                d.push_soon()
            elif op == "add":
                added += 1
                await d.add_backend("web", f"n{added}", f"127.0.0.1:{9600 + added}",
                                    data.draw(st.integers(1, 4)))
            elif op == "remove" and names:
                name = data.draw(st.sampled_from(names))
                if not d.is_removing("web", name):
                    await d.remove_backend("web", name)
            elif op == "eject":
                link = rig.links[data.draw(st.integers(0, 2))]
                pool = link.worker.pools.get("web")
                live = [b for b in pool.backends if b.usable(0.0)] if pool else []
                if live:
                    b = data.draw(st.sampled_from(live))
                    pool.consecutive_failures = 1  # type: ignore[union-attr]
                    ej = pool.observe(b, Outcome.RESET, 0.0)  # type: ignore[union-attr]
                    if ej is not None:
                        link.worker._on_ejection(ej)
                        link.back()
            elif op == "restart":
                rig.spawn(data.draw(st.integers(0, 2)))
            elif op == "reload":
                keep = data.draw(st.lists(st.sampled_from(config_names), min_size=1,
                                          unique=True))
                rig.rewrite(backends=", ".join(
                    f'{{ name = "{n}", address = "127.0.0.1:{9001 + config_names.index(n)}" }}'
                    for n in sorted(keep)))
                await rig.reload()
            elif op == "read":
                link = rig.links[data.draw(st.integers(0, 2))]
                link.deliver(data.draw(st.integers(0, 4)))
                await asyncio.sleep(0)
            elif op == "sleep":
                await asyncio.sleep(0.02)
        await _until(lambda: not rig.e.removing)
        await rig.settle()
        assert not all_mismatches(rig), all_mismatches(rig)
        for link in rig.links.values():
            assert not [m for m in link.sent() if isinstance(m, wl.ConfigFailed)], link.index

    run(main())
