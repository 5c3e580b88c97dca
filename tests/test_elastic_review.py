"""Outside review of issue 16 (elastic pools): hostile input, reloads and restarts in the
middle of runtime changes, journal damage, workers dying. Each test is named after what it
guarantees now. Where a docstring describes a failure, that was the review's finding
(19 of them, all fixed since); the others document what held under attack.

Two kinds of tests:

- in process: a real ``lb.control.daemon.Daemon`` (admin_helpers.in_process_daemon: pools,
  table, health book, elastic, overlay store in tmp_path; no workers, no probes), its admin
  app served on 127.0.0.1, reloads through ``Daemon.reload()`` with a real config file.
  Deterministic: in-flight counts are set by hand where a drain is the point.
- on loopback: ``pairlb run`` (admin_helpers.Pairlb) with real backends, as
  tests/test_elastic_e2e.py drives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import (
    LOOPBACK,
    PYTHON,
    ROOT,
    Backends,
    Pairlb,
    free_port,
    get_json,
    http,
    in_process_daemon,
    serve,
    wait_until,
    write_token,
)

from lb import channel
from lb import worker_link as wl
from lb.control import elastic as elastic_mod
from lb.control import overlay as ov

# -- in-process harness ------------------------------------------------------------------------

CFG = """\
[node]
name = "t1"
state_dir = "{state}"

[[listener]]
name = "web"
bind = "127.0.0.1:{listen}"
pool = "web"

[[pool]]
name = "web"
drain_timeout_s = {drain}
backends = [ {backends} ]
{discovery}
[admin]
bind = "127.0.0.1:{admin}"
token_file = "{token}"
"""


class Node:
    """An in-process daemon with its overlay loaded and composed, as startup does."""

    def __init__(self, tmp: Path, *, drain: float = 5.0, discovery: str = "",
                 backends: str = '{ name = "web1", address = "127.0.0.1:9" }') -> None:
        self.tmp = tmp
        self.token_file = write_token(tmp)
        self.token = self.token_file.read_text().strip()
        self.path = tmp / "pairlb.toml"
        self.params = {"state": tmp / "state", "listen": free_port(), "admin": free_port(),
                       "token": self.token_file, "drain": drain, "backends": backends,
                       "discovery": discovery}
        self.d = in_process_daemon(CFG.format(**self.params), self.path)
        self.e = self.d.elastic
        self.e.load()
        self.d.table.apply(self.e.compose(self.d.cfg)[0])
        self.d.health.set_targets(self.d.table.targets())
        self.edits: list[wl.PoolEdit] = []
        broadcast = self.d.supervisor.broadcast

        def spy(msg: wl.Message) -> None:
            if isinstance(msg, wl.PoolEdit):
                self.edits.append(msg)
            broadcast(msg)

        self.d.supervisor.broadcast = spy

    def rewrite(self, **changes: Any) -> None:
        self.params.update(changes)
        self.path.write_text(CFG.format(**self.params))

    def has(self, name: str, pool: str = "web") -> str | None:
        b = self.d.table.backend(pool, name)
        return None if b is None else b.address


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro_fn())


async def call(url: str, token: str, method: str, path: str, body: bytes | None
               ) -> tuple[int, bytes]:
    status, _, raw = await asyncio.to_thread(
        http, method, url + path, token=token, body=body,
        headers={"Content-Type": "application/json"})
    return status, raw


# -- the admin API's input -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_concurrent_adds_cannot_race_past_the_pool_cap(tmp_path: Path, monkeypatch: Any) -> None:
    """MAX_BACKENDS_PER_POOL is checked before the journal's await and counted only after
    it: every add that starts while others are being journaled passes the check. With the
    cap lowered to 3 (10,000 in production: a runaway script firing in parallel), ten
    concurrent adds of distinct names all get 201 and the pool holds 11 backends."""
    monkeypatch.setattr(elastic_mod, "MAX_BACKENDS_PER_POOL", 3)

    async def main() -> None:
        n = Node(tmp_path)
        results = await asyncio.gather(
            *[n.e.add("web", f"n{i}", f"127.0.0.1:{1000 + i}", 1) for i in range(10)],
            return_exceptions=True)
        accepted = [r for r in results if isinstance(r, dict)]
        records = len(n.d.table.rotations["web"].records)
        assert records <= 3 and len(accepted) <= 2, (
            f"cap 3: {len(accepted)} concurrent adds accepted, the pool holds {records}")

    run(main)


@pytest.mark.timeout(60)
def test_an_address_of_271_to_300_characters_is_a_400(tmp_path: Path) -> None:
    """The admin handler lets addresses up to 300 characters through, BackendConfig has no
    length limit, and the overlay refuses more than ADDRESS_MAX (270) with an OverlayError
    that nobody turns into a ChangeRefused: a plain-text 500 instead of a 400 naming the
    field (the CLI prints a traceback-less 'Server got itself in trouble')."""

    async def main() -> None:
        from lb.admin.server import make_app

        n = Node(tmp_path)
        async with serve(make_app(n.d)) as url:
            body = json.dumps({"name": "long", "address": "a" * 280 + ":80"}).encode()
            status, raw = await call(url, n.token, "POST", "/pools/web/backends", body)
            assert status == 400 and b"address" in raw, (status, raw[:200])

    run(main)


@pytest.mark.timeout(60)
def test_a_deeply_nested_json_body_is_a_400(tmp_path: Path) -> None:
    """A 4,000-byte body of nested arrays (under the 4 KiB cap) makes json.loads raise
    RecursionError, which _json_body does not catch (it catches ValueError): 500."""

    async def main() -> None:
        from lb.admin.server import make_app

        n = Node(tmp_path)
        async with serve(make_app(n.d)) as url:
            body = b"[" * 2000 + b"]" * 2000
            status, raw = await call(url, n.token, "POST", "/pools/web/backends", body)
            assert status == 400, (status, raw[:200])

    run(main)


@pytest.mark.timeout(60)
def test_addresses_with_whitespace_or_control_characters_are_refused(tmp_path: Path) -> None:
    """parse_hostport checks the port and the brackets, never the host: ' 127.0.0.1:80',
    'a event=forged:80' (key=value log lines: 'address=a event=forged:80'), a newline or a
    label of 70 characters are all accepted with 201, journaled, sent to the peer and
    probed for ever. Expected: 400 for a host that is neither an IP address nor a DNS name."""

    async def main() -> None:
        from lb.admin.server import make_app

        n = Node(tmp_path)
        bad = [" 127.0.0.1:80", "a event=forged:80", "x\ny:80", "a" * 70 + ".example:80",
               "a..b:80"]
        got = {}
        async with serve(make_app(n.d)) as url:
            for i, address in enumerate(bad):
                body = json.dumps({"name": f"b{i}", "address": address}).encode()
                got[address] = (await call(url, n.token, "POST", "/pools/web/backends",
                                           body))[0]
        assert all(s == 400 for s in got.values()), got

    run(main)


@pytest.mark.timeout(60)
def test_odd_but_valid_input_is_handled(tmp_path: Path) -> None:
    """Holds: weight bool/float/negative/huge, port 0, unbracketed IPv6, unicode names and
    unknown keys are 400 with the field named; [::1]:80 is accepted; the same name POSTed
    twice is 409; duplicate JSON keys take the last value (json.loads), consistently."""

    async def main() -> None:
        from lb.admin.server import make_app

        n = Node(tmp_path)
        async with serve(make_app(n.d)) as url:
            async def post(body: Any) -> tuple[int, bytes]:
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                return await call(url, n.token, "POST", "/pools/web/backends", raw)

            for body, field in [
                ({"name": "w", "address": "127.0.0.1:80", "weight": True}, b"weight"),
                ({"name": "w", "address": "127.0.0.1:80", "weight": 1.0}, b"weight"),
                ({"name": "w", "address": "127.0.0.1:80", "weight": -1}, b"weight"),
                ({"name": "w", "address": "127.0.0.1:80", "weight": 10**30}, b"weight"),
                ({"name": "w", "address": "127.0.0.1:0"}, b"port"),
                ({"name": "w", "address": "a:b:c"}, b"brackets"),
                ({"name": "w\u00e9", "address": "127.0.0.1:80"}, b"name"),
                ({"name": "w" * 65, "address": "127.0.0.1:80"}, b"name"),
                ({"name": "w", "address": "x" * 301 + ":80"}, b"address"),
            ]:
                status, raw = await post(body)
                assert status == 400 and field in raw, (body, status, raw)
            assert (await post({"name": "v6", "address": "[::1]:80"}))[0] == 201
            assert (await post({"name": "v6", "address": "[::1]:81"}))[0] == 409
            dup = b'{"name": "d", "address": "127.0.0.1:81", "address": "127.0.0.1:82"}'
            assert (await post(dup))[0] == 201
            assert n.has("d") == "127.0.0.1:82"
            assert n.e.overlay.entries[("web", "d")].address == "127.0.0.1:82"
            status, raw = await post(b"x" * 5000)
            assert status == 413, (status, raw)

    run(main)


# -- the journal ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_failed_journal_write_answers_503_and_the_change_is_not_made(
        tmp_path: Path) -> None:
    """Overlay.local applies the intent before the journal write; when the write fails
    (disk full, EIO) Elastic.add lets OverlayStoreError escape: a bare 500, the overlay keeps
    the intent (its digest changed: the peer will get it at the next state exchange) and
    the table does not. The next reload composes it in: the backend the API answered 500
    for starts serving. Expected: either the intent is withdrawn and the answer says the
    change was not made, or it is applied and the answer says it is not durable."""

    async def main() -> None:
        from lb.admin.server import make_app
        from lb.control.overlay_store import OverlayStoreError

        n = Node(tmp_path)
        store = n.e.store
        digest = n.e.overlay.digest()

        def disk_full(data: bytes, lines: int) -> None:
            raise OverlayStoreError(str(tmp_path / "state" / "overlay.log"),
                                    "cannot append: No space left on device")

        store._write_log = disk_full
        async with serve(make_app(n.d)) as url:
            body = json.dumps({"name": "n1", "address": "127.0.0.1:1001"}).encode()
            status, raw = await call(url, n.token, "POST", "/pools/web/backends", body)
        del store._write_log
        made = (n.has("n1"), ("web", "n1") in n.e.overlay.entries,
                n.e.overlay.digest() != digest)
        res = await n.d.reload()
        assert res.ok
        after = n.has("n1")
        if status == 201:  # applied (and said so)
            assert made[0] == after == "127.0.0.1:1001"
        else:  # refused: then nothing of it may remain, here or at the next reload
            assert made == (None, False, False) and after is None, (
                f"answered {status} {raw[:80]!r}; in the table {made[0]}, in the overlay "
                f"{made[1]}, digest changed {made[2]}; after a reload: {after}")

    run(main)


# -- reloads in the middle of runtime changes ---------------------------------------------------


@pytest.mark.timeout(60)
def test_a_reload_during_a_drain_keeps_the_backend_until_it_drained(
        tmp_path: Path) -> None:
    """DELETE promises: drained (the requests in flight finish), then gone from /status.
    A reload while it drains composes the tombstone, so the table drops the backend at
    once and Elastic.reconfigured cancels the drain: /status no longer lists it while the
    workers still have a request in flight there (an operator waiting for it to leave
    /status stops the server and cuts that request)."""

    async def main() -> None:
        n = Node(tmp_path, drain=30.0,
                 backends='{ name = "web1", address = "127.0.0.1:9" }, '
                          '{ name = "web2", address = "127.0.0.1:10" }')
        n.d.inflight = {0: {"web/web1": 1}}  # a worker reports one request at web1
        answer = await n.e.remove("web", "web1")
        assert answer["removing"] and answer["in_flight"] == 1
        res = await n.d.reload()
        assert res.ok, res.errors
        st = n.d.status()
        listed = {b.name for p in st.pools for b in p.backends}
        assert "web1" in listed and ("web", "web1") in n.e.removing, (
            "web1 left /status with a request in flight: the reload cut its drain short")

    run(main)


@pytest.mark.timeout(60)
def test_a_delete_during_a_replacement_drain_removes_the_name_for_good(
        tmp_path: Path) -> None:
    """Discovery (or the peer) moves backend x to a new address: the old x drains and the
    new one waits in _after_leave. DELETE x then finds x in ``removing`` and answers 202
    {"removing": true} without recording a tombstone; once the old x has drained the new
    one joins. The operator was told x is being removed; x serves on."""

    async def main() -> None:
        n = Node(tmp_path, drain=1.0)
        n.e.on_discovered("web", [("x", "127.0.0.1:1001", 1)], "file")
        n.e.on_discovered("web", [("x", "127.0.0.1:1002", 1)], "file")
        assert ("web", "x") in n.e.removing
        answer = await n.e.remove("web", "x")
        assert answer["removing"] is True
        await asyncio.sleep(1.0)  # the old x's drain ends (drain_timeout_s = 1)
        assert n.has("x") is None, (
            f"DELETE answered {answer}, yet x is back at {n.has('x')}; overlay entries: "
            f"{list(n.e.overlay.entries)}")

    run(main)


@pytest.mark.timeout(60)
def test_a_reload_during_a_replacement_drain_keeps_the_old_server_until_it_left(
        tmp_path: Path) -> None:
    """x moves to a new address (discovery): the old x drains. A reload meanwhile composes
    the new x straight into the table (the table's record is reset for the new address);
    the old drain is not cancelled (the name still exists), so when it ends leave_now
    removes the *new* x everywhere and _after_leave joins it again: a PoolEdit remove + add,
    the health state dropped, and x DOWN until its next passing check."""

    async def main() -> None:
        disc = f'[pool.discovery]\ntype = "file"\npath = "{tmp_path / "none.json"}"\n'
        n = Node(tmp_path, drain=1.0, discovery=disc)  # (its runner is not started)
        n.e.on_discovered("web", [("x", "127.0.0.1:1001", 1)], "file")
        n.e.on_discovered("web", [("x", "127.0.0.1:1002", 1)], "file")
        res = await n.d.reload()
        # Fixed: the reload keeps the old x draining; the new one joins once it has left,
        # and is never taken out again.
        assert res.ok and n.has("x") == "127.0.0.1:1001" and n.d.is_removing("web", "x")
        n.edits.clear()
        await asyncio.sleep(1.0)
        assert n.has("x") == "127.0.0.1:1002" and not n.d.is_removing("web", "x")
        assert [(e.add, e.remove) for e in n.edits] == [
            ((), ("x",)), ((("x", "127.0.0.1:1002", 1),), ())], n.edits

    run(main)


@pytest.mark.timeout(60)
def test_a_reload_that_removes_pool_discovery_drops_the_discovered_backends(
        tmp_path: Path) -> None:
    """_reload composes the pools (discovery's last set still in Elastic.discovered) before
    Elastic.reconfigured stops the runner and forgets the set. So after a reload that
    removes [pool.discovery] the discovered backends keep serving (source "file" in
    /status) until some later reload; the reload's answer says 'discovery stopped'."""

    async def main() -> None:
        f = tmp_path / "web.json"
        f.write_text(json.dumps([{"name": "x", "address": "127.0.0.1:1001"}]))
        disc = f'[pool.discovery]\ntype = "file"\npath = "{f}"\ninterval_s = 0.05\n'
        n = Node(tmp_path, discovery=disc)
        n.e.start()
        try:
            for _ in range(100):
                if n.has("x"):
                    break
                await asyncio.sleep(0.05)
            assert n.has("x") == "127.0.0.1:1001"
            n.rewrite(discovery="")
            res = await n.d.reload()
            assert res.ok and "pool web: discovery stopped" in res.changes, res.changes
            assert n.has("x") is None, (
                f"x still in the pool after discovery was removed (origin "
                f"{n.e.origin('web', 'x')})")
        finally:
            await n.e.stop()

    run(main)


@pytest.mark.timeout(60)
def test_a_pool_removed_by_a_reload_and_brought_back_keeps_its_runtime_backends(
        tmp_path: Path) -> None:
    """Holds: the runtime entries of a pool the config drops are kept (note: orphans) and
    applied again when a reload brings the pool back."""

    async def main() -> None:
        extra = ('\n[[pool]]\nname = "other"\nbackends = [ { name = "o1", address = '
                 '"127.0.0.1:11" } ]\n\n[[listener]]\nname = "other"\nbind = '
                 f'"127.0.0.1:{free_port()}"\npool = "other"\n')
        n = Node(tmp_path, discovery=extra)
        # Listeners come and go with the pool: no workers here to replace, no sockets bound.
        n.d.sockets = {"web": [socket.socket()], "other": [socket.socket()]}

        async def no_workers(drain_s: float) -> None:
            return None

        n.d.supervisor.replace_all = no_workers
        await n.e.add("other", "o2", "127.0.0.1:12", 1)
        await n.e.remove("other", "o1")
        n.rewrite(discovery="")
        res = await n.d.reload()
        assert res.ok, res.errors
        assert any("pool other: not in the config; 2 runtime entries kept" in c
                   for c in res.changes), res.changes
        n.rewrite(discovery=extra)
        res = await n.d.reload()
        assert res.ok, res.errors
        assert n.has("o2", "other") == "127.0.0.1:12" and n.has("o1", "other") is None

    run(main)


# -- the pair's LWW registers --------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_tombstone_waits_for_the_peer_cursor_so_the_peer_cannot_resurrect_the_backend(
        tmp_path: Path, monkeypatch: Any) -> None:
    """overlay.compose retires an aged tombstone only once the peer's cursor covers it
    *when the caller passes peer_seen* (its docstring: otherwise the next state exchange
    merges the peer's older 'present' into the empty register and resurrects the backend).
    Elastic.compose never passes peer_seen: a peer that was away for the grace (7 days:
    a long partition, a node restored from an old disk) brings the removed backend back."""

    async def main() -> None:
        n = Node(tmp_path, drain=0.1)
        peer = ov.Overlay("t2")
        await n.e.add("web", "x", "127.0.0.1:1001", 1)
        peer.merge(n.e.overlay.entries[("web", "x")])  # the peer saw the add
        await n.e.remove("web", "x")                     # ... not the removal
        await asyncio.sleep(1.0)
        assert n.has("x") is None
        # A node of a pair ([failover] with [sync]): removals wait for the peer's cursor.
        monkeypatch.setattr(elastic_mod.Elastic, "_paired", lambda self, cfg: True)
        later = time.time() + 8 * 24 * 3600
        monkeypatch.setattr(elastic_mod.time, "time", lambda: later)
        n.e.compose(n.d.cfg)  # what any reload 8 days later does
        await n.e.on_state({"entries": ov.entries_to_wire(peer.entries.values()),
                            "seen": dict(peer.seen)})
        assert n.has("x") is None, "the removed backend x came back from the peer's state"

    run(main)


# -- on loopback: real daemons -------------------------------------------------------------------


def api(node: Pairlb, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    status, _, raw = http(method, node.admin + path, body=data, token=node.token,
                          headers={"Content-Type": "application/json"}, timeout_s=15.0)
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw


def members(node: Pairlb, pool: str = "web") -> dict[str, dict[str, Any]]:
    return {b["name"]: b for p in node.status()["pools"] if p["name"] == pool
            for b in p["backends"]}


def worker_pids(node: Pairlb) -> list[int]:
    return [w["pid"] for w in node.status()["workers"] if w["pid"]]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def kill9_control(node: Pairlb) -> None:
    """kill -9 the control process, then wait for its workers (they drain and go once their
    channel closes; killed by PID if they linger) so the next start can bind."""
    assert node.proc is not None
    workers = worker_pids(node)
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait(10)
    deadline = time.monotonic() + 8
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    for p in workers:
        if alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)


def restart(tmp_path: Path, be: Backends) -> Pairlb:
    """A new node on the same state_dir (tmp_path/state), new ports."""
    return Pairlb(tmp_path, be)


@pytest.mark.timeout(180)
def test_kill_9_mid_burst_loses_no_acknowledged_change_and_resurrects_nothing(
        tmp_path: Path) -> None:
    with Backends(["web1"]) as be:
        node = Pairlb(tmp_path, be).__enter__()
        try:
            for i in range(20):
                assert api(node, "POST", "/pools/web/backends",
                           {"name": f"d{i}", "address": f"127.0.0.1:{20000 + i}"})[0] == 201
            answers: dict[str, int] = {}
            started = time.monotonic()

            def one(job: tuple[str, str]) -> None:
                kind, name = job
                try:
                    if kind == "add":
                        s = api(node, "POST", "/pools/web/backends",
                                {"name": name, "address": f"127.0.0.1:{21000 + int(name[1:])}"})
                    else:
                        s = api(node, "DELETE", f"/pools/web/backends/{name}")
                    answers[f"{kind} {name}"] = s[0]
                except OSError:
                    answers[f"{kind} {name}"] = -1

            jobs = [("add", f"a{i}") for i in range(150)]
            jobs[::8] = [("del", f"d{i}") for i in range(len(jobs[::8]))]
            with ThreadPoolExecutor(12) as pool:
                futs = [pool.submit(one, j) for j in jobs]
                wait_until(lambda: sum(1 for s in list(answers.values()) if s in (201, 202))
                           >= 40, 30, "40 answers")
                kill9_control(node)
                for f in futs:
                    f.result(30)
            took = time.monotonic() - started
        finally:
            node.__exit__()
        acked_adds = {k.split()[1] for k, s in answers.items() if k[0] == "a" and s == 201}
        acked_dels = {k.split()[1] for k, s in answers.items() if k[0] == "d" and s == 202}
        unanswered = {k for k, s in answers.items() if s not in (201, 202)}
        assert acked_adds and acked_dels and unanswered, (answers, took)
        with restart(tmp_path, be) as node:
            m = members(node)
            lost = sorted(acked_adds - set(m))
            resurrected = sorted(acked_dels & set(m))
            assert lost == [] and resurrected == [], (lost, resurrected)
            never_removed = {f"d{i}" for i in range(20)} - {k.split()[1] for k in answers
                                                             if k[0] == "d"}
            assert never_removed <= set(m)
            # the overlay on disk says the same as /status
            st = node.status()["runtime"]
            assert st["persistent"] is True


def _journal(tmp_path: Path) -> Path:
    return tmp_path / "state" / "overlay.log"


def _start_fails(tmp_path: Path, be: Backends) -> tuple[int, str]:
    node = Pairlb(tmp_path, be)
    p = subprocess.run([PYTHON, "-m", "lb", "run", "-c", str(node.config)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.timeout(120)
def test_a_corrupt_journal_line_in_the_middle_refuses_startup_naming_file_and_line(
        tmp_path: Path) -> None:
    """Holds: a flipped byte in line 3 of 6 of overlay.log: the start fails (exit 1) and
    the message names overlay.log:3."""
    with Backends(["web1"]) as be:
        with Pairlb(tmp_path, be) as node:
            for i in range(6):
                assert api(node, "POST", "/pools/web/backends",
                           {"name": f"a{i}", "address": f"127.0.0.1:{22000 + i}"})[0] == 201
        log = _journal(tmp_path)
        lines = log.read_bytes().split(b"\n")
        assert len(lines) == 7 and lines[-1] == b""
        lines[2] = lines[2].replace(b"22002", b"22092")
        log.write_bytes(b"\n".join(lines))
        code, out = _start_fails(tmp_path, be)
        assert code != 0, out[-2000:]
        assert f"{log}:3" in out, out[-2000:]


@pytest.mark.timeout(120)
def test_a_bit_flip_in_the_last_journal_line_refuses_startup(
        tmp_path: Path) -> None:
    """The journal's last line, complete (newline-terminated) but with a bad CRC, is taken
    for a torn append and dropped with a warning: an append that was fsynced and answered
    201 is lost and the node starts. A torn append leaves a partial line (no newline); a
    whole line with a wrong CRC is damage, which the same file refuses anywhere else.
    Expected: refuse (as for any other line), or at least not for a line ending in a
    newline."""
    with Backends(["web1"]) as be:
        with Pairlb(tmp_path, be) as node:
            for i in range(3):
                assert api(node, "POST", "/pools/web/backends",
                           {"name": f"a{i}", "address": f"127.0.0.1:{23000 + i}"})[0] == 201
        log = _journal(tmp_path)
        data = log.read_bytes()
        lines = data.split(b"\n")
        lines[2] = lines[2].replace(b"23002", b"23092")
        log.write_bytes(b"\n".join(lines))
        node = Pairlb(tmp_path, be)
        proc = subprocess.Popen([PYTHON, "-m", "lb", "run", "-c", str(node.config)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            def up() -> bool:
                if proc.poll() is not None:
                    return True
                try:
                    return http("GET", node.admin + "/readyz", timeout_s=1)[0] == 200
                except OSError:
                    return False

            wait_until(up, 30, "start or exit", 0.1)
            started = proc.poll() is None
            names = set(members(node)) if started else set()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=20)[0].decode(errors="replace")
        assert not started or "a2" in names, (
            f"started without the acknowledged a2 ({sorted(names)}); log: "
            + "\n".join(ln for ln in out.splitlines() if "overlay" in ln)[:1500])


@pytest.mark.timeout(120)
def test_removing_every_backend_of_a_pool_answers_clients_503(tmp_path: Path) -> None:
    """Holds: a pool emptied at runtime answers 503 (not a hang, not a reset); /readyz
    says not ready; a backend added again serves."""
    with Backends(["web1", "web2"]) as be:
        only = Backends.__new__(Backends)
        only.ports = {"web1": be.ports["web1"]}
        with Pairlb(tmp_path, only) as node:
            assert api(node, "DELETE", "/pools/web/backends/web1")[0] == 202
            wait_until(lambda: "web1" not in members(node), 40, "web1 gone")
            codes = Counter(http("GET", node.url + "/", timeout_s=5)[0] for _ in range(10))
            assert codes == {503: 10}, codes
            assert http("GET", node.admin + "/readyz")[0] == 503
            status, body = api(node, "POST", "/pools/web/backends",
                               {"name": "web2", "address": f"{LOOPBACK}:{be.ports['web2']}"})
            assert status == 201, body
            wait_until(lambda: members(node).get("web2", {}).get("in_rotation"), 10,
                       "web2 in rotation")
            wait_until(lambda: http("GET", node.url + "/", timeout_s=5)[0] == 200, 10,
                       "a 200 from web2")


@pytest.mark.timeout(120)
def test_a_worker_killed_after_runtime_changes_comes_back_with_the_effective_pool(
        tmp_path: Path) -> None:
    """Holds: kill -9 of the only worker after an add and a remove: the new worker's
    welcome carries the effective pool (web2 serves, web1 gets nothing)."""
    with Backends(["web1", "web2"]) as be:
        only = Backends.__new__(Backends)
        only.ports = {"web1": be.ports["web1"]}
        with Pairlb(tmp_path, only, workers=1) as node:
            status, _ = api(node, "POST", "/pools/web/backends",
                            {"name": "web2", "address": f"{LOOPBACK}:{be.ports['web2']}"})
            assert status == 201
            wait_until(lambda: members(node)["web2"]["in_rotation"], 10, "web2 in rotation")
            assert api(node, "DELETE", "/pools/web/backends/web1")[0] == 202
            wait_until(lambda: "web1" not in members(node), 40, "web1 gone")
            (old,) = worker_pids(node)
            os.kill(old, signal.SIGKILL)
            wait_until(lambda: (p := worker_pids(node)) and p[0] != old
                       and node.status()["workers"][0]["ready"], 20, "a new worker")
            before = get_json(f"http://{LOOPBACK}:{be.ports['web1']}/stats")
            codes = Counter(http("GET", node.url + "/", timeout_s=5)[0] for _ in range(20))
            after = get_json(f"http://{LOOPBACK}:{be.ports['web1']}/stats")
            assert codes == {200: 20}, codes
            assert before["by_method"] == after["by_method"]


@pytest.mark.timeout(60)
def test_a_node_restored_from_an_old_state_dir_stamps_anew_and_the_pair_converges(
        tmp_path: Path) -> None:
    """LWW needs a node's (lamport, node) stamps to be unique. A node whose state_dir is
    restored from a backup (a VM snapshot, a replaced disk) restarts with the lamport and
    seq of the backup and issues them again, for other values, before (or without) hearing
    from its peer: the peer holds another intent under the same stamp, Overlay.merge takes
    an equal stamp for a duplicate, and the two overlays hold different values for the same
    key for good (every state exchange changes nothing: digests differ for ever). The 201
    on the restored node is also silently overruled where its stamp is lower."""
    import shutil

    async def main() -> None:
        peer = ov.Overlay("t2")
        (tmp_path / "a").mkdir()
        n = Node(tmp_path / "a")
        await n.e.add("web", "x", "127.0.0.1:1001", 1)
        for it in n.e.overlay.entries.values():
            peer.merge(it)
        backup = tmp_path / "backup"
        shutil.copytree(tmp_path / "a" / "state", backup)
        await n.e.add("web", "y", "127.0.0.1:1002", 1)          # stamp (2, t1)
        peer.merge(n.e.overlay.entries[("web", "y")])
        await n.e.stop()
        shutil.rmtree(tmp_path / "a" / "state")
        shutil.copytree(backup, tmp_path / "a" / "state")       # the restore
        r = Node(tmp_path / "a")
        await r.e.add("web", "y", "127.0.0.1:1009", 1)
        # Fixed: the clock starts at the wall clock in ms, so the restored node's new
        # change is stamped above what it issued before the restore.
        assert r.e.overlay.entries[("web", "y")].stamp > peer.entries[("web", "y")].stamp
        # They meet: whole-state exchange both ways (what a HELLO with differing digests does).
        await r.e.on_state({"entries": ov.entries_to_wire(peer.entries.values()),
                            "seen": dict(peer.seen)})
        peer.merge_state(ov.entries_from_wire(ov.entries_to_wire(
            r.e.overlay.entries.values()), "state.entries"), dict(r.e.overlay.seen))
        assert r.e.overlay.digest() == peer.digest(), (
            f"never converge: y is {r.e.overlay.entries[('web', 'y')].address} on the "
            f"restored node, {peer.entries[('web', 'y')].address} on the peer, same stamp "
            f"{peer.entries[('web', 'y')].stamp}")
        assert peer.entries[("web", "y")].address == "127.0.0.1:1009"  # the 201 holds
        # Equal stamps for different values (a clock set back as well): both keep one.
        a, b = ov.Overlay("t1"), ov.Overlay("t2")
        ia = a.local("web", "z", "present", "127.0.0.1:1", 1, "api", 0.0)
        ib = ov.Intent("web", "z", "present", "127.0.0.1:2", 1, ia.stamp, "t1", 1, "api", 0.0)
        b.merge(ib)
        a.merge(ib)
        b.merge(ia)
        assert a.digest() == b.digest() and a.entries == b.entries

    run(main)


@pytest.mark.timeout(120)
def test_the_state_exchange_works_within_the_advertised_limits() -> None:
    """The catch-up after any disconnect is one ``state`` frame of the whole overlay, and a
    frame above max_frame (4 MiB) is not sent (states_oversize, a log line). At ~164 bytes
    an entry (182 for an add, 145 for a tombstone) that is ~25,000 entries, while a pool may
    hold 10,000 runtime backends
    (MAX_BACKENDS_PER_POOL), any number of pools, tombstones for 7 days on top (not
    counted against the cap: an autoscaler naming instances uniquely leaves one per
    removal), and a snapshot up to MAX_ENTRIES = 100,000. Past that, any op missed while
    disconnected is never caught up: the pair stays diverged."""
    from lb.control.sync import StateMsg, encode_body

    max_frame = elastic_mod.SYNC_MAX_FRAME  # what the daemon's channel is built with

    o = ov.Overlay("lb-a")
    now = time.time()
    for i in range(elastic_mod.MAX_BACKENDS_PER_POOL):  # one pool at its cap
        o.local("web", f"web-i-{i:017x}", "present",
                f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}:8080", 1, "api", now)
    for i in range(20_000):  # a week of churn at one replacement every 30 s
        o.local("web", f"web-i-old-{i:013x}", "removed", None, None, "api", now)
    state = {"entries": ov.entries_to_wire(o.entries.values()), "seen": dict(o.seen)}
    size = len(encode_body(StateMsg(state)))
    assert size <= max_frame, (
        f"{len(o)} entries make a {size}-byte state frame > max_frame {max_frame}")
    # And the largest overlay a snapshot may hold fits too (~190 bytes an entry).
    assert ov.MAX_ENTRIES * size / len(o) <= max_frame


@pytest.mark.timeout(120)
def test_a_reload_during_a_drain_keeps_the_backend_in_status_until_it_drained_e2e(
        tmp_path: Path) -> None:
    """The in-process finding above on a real node: requests of 3 s in flight at web1,
    DELETE web1 (202, draining), POST /reload: web1 is gone from /status at once although
    the workers still have its requests in flight (they finish: the worker keeps the
    backend object). The operator who stops web1 once /status no longer lists it cuts them."""
    with Backends(["web1", "web2"]) as be, Pairlb(tmp_path, be) as node:
        wait_until(lambda: all(b["in_rotation"] for b in members(node).values()), 10,
                   "both in rotation")

        def slow(_: int) -> int:
            return http("GET", node.url + "/sleep/3", headers={"Connection": "close"},
                        timeout_s=20)[0]

        with ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(slow, i) for i in range(6)]
            wait_until(lambda: members(node)["web1"]["in_flight"] > 0, 5, "web1 busy")
            status, body = api(node, "DELETE", "/pools/web/backends/web1")
            assert status == 202 and body["removing"], body
            status, body = api(node, "POST", "/reload")
            assert status == 200, body
            listed = members(node)
            pending = sum(1 for f in futs if not f.done())
            codes = Counter(f.result(30) for f in futs)
        assert codes == {200: 6}, codes
        assert pending > 0
        assert "web1" in listed, (
            f"web1 left /status right after the reload with {pending} request(s) of the "
            f"batch still running")


@pytest.mark.timeout(60)
def test_enable_on_a_backend_being_removed_is_a_409(tmp_path: Path) -> None:
    """DELETE drains the backend through the admin state (DRAINING); POST
    /backends/web/web1/enable (an operator, a script re-enabling 'everything drained')
    sets it ENABLED again while its removal runs: it takes new requests until the drain
    gives up (in flight never reaches 0 under load: drain_timeout_s) and then leaves with
    requests in flight. Expected: 409, the backend is being removed."""

    async def main() -> None:
        from lb.admin.server import make_app
        from lb.control.rotation import AdminState

        n = Node(tmp_path, drain=30.0,
                 backends='{ name = "web1", address = "127.0.0.1:9" }, '
                          '{ name = "web2", address = "127.0.0.1:10" }')
        n.d.inflight = {0: {"web/web1": 1}}
        await n.e.remove("web", "web1")
        async with serve(make_app(n.d)) as url:
            status, raw = await call(url, n.token, "POST", "/backends/web/web1/enable", b"")
        rec = n.d.table.rotations["web"].records["web1"]
        assert ("web", "web1") in n.e.removing
        assert status == 409 and rec.admin == AdminState.DRAINING, (status, raw, rec.admin)

    run(main)


@pytest.mark.timeout(60)
def test_a_peer_change_that_loses_the_lww_merge_is_acked_as_superseded(tmp_path: Path) -> None:
    """Both nodes add x at once (neither saw the other's). On t1, the peer's op loses to
    t1's own (higher stamp): Elastic.on_op counts a conflict and keeps t1's value, yet
    acks ("applied", ""). The peer's API answer therefore says {"t1": "applied"} for a
    change t1 did not apply (and the peer itself is about to be overruled by t1's op).
    Expected: an answer that says the change lost (e.g. "superseded by <stamp>")."""

    async def main() -> None:
        n = Node(tmp_path)
        peer = ov.Overlay("t0")  # sorts before t1: its op loses the tie on lamport 1
        await n.e.add("web", "x", "127.0.0.1:1001", 1)
        op = ov.to_wire(peer.local("web", "x", "present", "127.0.0.1:2002", 1, "api",
                                   time.time()))
        result = await n.e.on_op(op)
        assert n.has("x") == "127.0.0.1:1001" and n.e.counts["conflicts"] == 1
        assert result[0] != "applied", result

    run(main)


@pytest.mark.timeout(60)
def test_metrics_drop_the_counters_of_a_removed_backend(tmp_path: Path) -> None:
    """Gauges of a removed backend go with it (holds); its counters stay in the control
    process's totals and in every /metrics answer for as long as the process runs. With
    discovery or an autoscaler naming backends after instances, the series (and the memory)
    grow with every backend that ever existed. Expected: dropped some time after the
    backend left (Prometheus marks them stale; sum by pool then dips once)."""

    async def main() -> None:
        from lb.admin.server import make_app

        n = Node(tmp_path, drain=0.1)
        names = [f"gone{i}" for i in range(50)]
        for i, name in enumerate(names):
            await n.e.add("web", name, f"127.0.0.1:{3000 + i}", 1)
        n.d.totals = {"requests": {"web": {name: {"2xx": 5} for name in names}}}
        for name in names:
            await n.e.remove("web", name)
        await asyncio.sleep(1.5)
        assert not any(n.has(name) for name in names)
        async with serve(make_app(n.d)) as url:
            status, raw = await call(url, n.token, "GET", "/metrics", None)
        assert status == 200
        gauges = [ln for ln in raw.decode().splitlines()
                  if 'backend="gone' in ln and not ln.startswith("pairlb_requests_total")]
        counters = [ln for ln in raw.decode().splitlines()
                    if 'backend="gone' in ln and ln.startswith("pairlb_requests_total")]
        assert gauges == []
        assert counters == [], f"{len(counters)} series of removed backends, e.g. {counters[0]}"

    run(main)


@pytest.mark.timeout(60)
def test_a_backend_deleted_after_its_pool_came_back_stays_deleted(
        tmp_path: Path) -> None:
    """A replacement in progress (x drains at its old address, the new one waits in
    Elastic._after_leave) when a reload drops x's pool: reconfigured cancels the drain but
    leaves _after_leave behind (Elastic.forget_pool, which would clear it, is never
    called). The pool comes back with x at its new address. Later DELETE x: once x has
    drained, leave_now finds the stale _after_leave entry and joins x again: a backend
    the operator removed (the overlay holds its tombstone) is back in the table, the
    checker and every worker, until some later reload."""

    async def main() -> None:
        extra = ('\n[[pool]]\nname = "other"\ndrain_timeout_s = 1.0\nbackends = [ { name = '
                 '"o1", address = "127.0.0.1:11" } ]\n\n[[listener]]\nname = "other"\n'
                 f'bind = "127.0.0.1:{free_port()}"\npool = "other"\n')
        n = Node(tmp_path, discovery=extra)
        n.d.sockets = {"web": [socket.socket()], "other": [socket.socket()]}

        async def no_workers(drain_s: float) -> None:
            return None

        n.d.supervisor.replace_all = no_workers
        await n.e.add("other", "x", "127.0.0.1:1001", 1)
        # The peer moves x (its op wins: it had seen ours, so its lamport is higher).
        peer = ov.Overlay("t2")
        peer.merge(n.e.overlay.entries[("other", "x")])
        n.d.inflight = {0: {"other/x": 1}}  # the old x is busy: its drain runs
        op = peer.local("other", "x", "present", "127.0.0.1:1002", 1, "api", time.time())
        assert (await n.e.on_op(ov.to_wire(op)))[0] == "applied"
        assert ("other", "x") in n.e.removing
        n.rewrite(discovery="")
        assert (await n.d.reload()).ok          # the pool goes (a config change) ...
        n.d.inflight = {}
        n.d.sockets["other"] = [socket.socket()]
        n.rewrite(discovery=extra)
        assert (await n.d.reload()).ok          # ... and comes back
        assert n.has("x", "other") == "127.0.0.1:1002"
        await n.e.remove("other", "x")          # the operator removes x
        await asyncio.sleep(1.0)                # drained (drain_timeout_s = 1)
        assert n.e.overlay.entries[("other", "x")].state == "removed"
        assert n.has("x", "other") is None, (
            f"x deleted (tombstone in the overlay) but back at {n.has('x', 'other')}")

    run(main)


@pytest.mark.timeout(60)
def test_a_reload_while_an_add_is_being_journaled_leaves_one_consistent_backend(
        tmp_path: Path) -> None:
    """Holds: the journal write is slowed to 0.5 s; a reload runs meanwhile (the overlay
    already holds the intent, so the reload composes it in); the add then answers 201 and
    the backend is in the table once, checked once, at the address asked."""

    async def main() -> None:
        n = Node(tmp_path)
        store = n.e.store
        real = store._write_log

        def slow(data: bytes, lines: int) -> None:
            time.sleep(0.5)
            real(data, lines)

        store._write_log = slow
        add = asyncio.ensure_future(n.e.add("web", "x", "127.0.0.1:1001", 1))
        await asyncio.sleep(0.1)
        res = await n.d.reload()
        answer = await add
        assert res.ok and answer["backend"]["address"] == "127.0.0.1:1001"
        assert [b.name for b in n.d.table.pools["web"].backends].count("x") == 1
        assert n.has("x") == "127.0.0.1:1001"
        assert n.d.health.state(("web", "x")) is not None

    run(main)


@pytest.mark.timeout(60)
def test_a_config_that_now_has_an_api_added_name_at_another_address_is_shadowed_with_a_note(
        tmp_path: Path) -> None:
    """Holds (precedence row 7): the runtime entry wins, the reload's changes say so,
    /status shows source api shadowing config."""

    async def main() -> None:
        n = Node(tmp_path)
        await n.e.add("web", "x", "127.0.0.1:1001", 1)
        n.rewrite(backends='{ name = "web1", address = "127.0.0.1:9" }, '
                           '{ name = "x", address = "127.0.0.1:1999" }')
        res = await n.d.reload()
        assert res.ok
        assert any("x: runtime entry shadows the config backend" in c for c in res.changes)
        assert n.has("x") == "127.0.0.1:1001"
        assert n.e.origin("web", "x") == elastic_mod.Origin("api", "config")

    run(main)


@pytest.mark.timeout(60)
def test_a_discovery_file_flipping_between_valid_and_invalid_keeps_the_last_good_set(
        tmp_path: Path) -> None:
    """Holds: a file replaced by turns with garbage, an empty array, a duplicate address
    and a valid set: the pool only ever follows the valid versions; a discovered name equal
    to an API-added one is shadowed by the API's (the API's address serves)."""

    async def main() -> None:
        f = tmp_path / "web.json"

        def put(text: str) -> None:
            tmp = tmp_path / "web.json.tmp"
            tmp.write_text(text)
            os.replace(tmp, f)

        put(json.dumps([{"name": "d1", "address": "127.0.0.1:1001"}]))
        disc = f'[pool.discovery]\ntype = "file"\npath = "{f}"\ninterval_s = 0.02\n'
        n = Node(tmp_path, discovery=disc)
        await n.e.add("web", "d2", "127.0.0.1:2002", 1)
        n.e.start()
        try:
            async def settle() -> None:
                await asyncio.sleep(0.3)

            await settle()
            assert n.has("d1") == "127.0.0.1:1001"
            good = json.dumps([{"name": "d1", "address": "127.0.0.1:1001"},
                               {"name": "d2", "address": "127.0.0.1:1002"}])
            for bad in ["[{\"name\": \"d1\", \"addr", "[]", json.dumps([
                    {"name": "d1", "address": "127.0.0.1:1001"},
                    {"name": "d3", "address": "127.0.0.1:1001"}]), "null"]:
                put(bad)
                await settle()
                assert n.has("d1") == "127.0.0.1:1001", bad
                put(good)
                await settle()
                assert n.has("d1") == "127.0.0.1:1001" and n.has("d2") == "127.0.0.1:2002"
                assert n.e.origin("web", "d2") == elastic_mod.Origin("api", "file")
        finally:
            await n.e.stop()

    run(main)


@pytest.mark.timeout(120)
def test_a_burst_of_removes_is_one_coalesced_snapshot_not_one_per_removal(
        tmp_path: Path) -> None:
    """Adds are coalesced (join -> push_soon: one snapshot per HEALTH_PUSH_GAP_S), removes
    are not: drain_then_leave calls push_snapshots() synchronously, so each DELETE derives
    every pool's snapshot (O(all backends), ~16-30 ms of control loop at 2,000-3,000
    backends here) and broadcasts the whole snapshot to every worker. 300 concurrent
    DELETEs at 3,000 backends: 300 full snapshots (each ~61 KB on the worker channel, per
    worker) where adds of the same burst send a handful; 3,000 removes took 50 s of loop
    here. Expected: coalesced like the adds (push_soon)."""

    async def main() -> None:
        # Checks off: every backend is in rotation (no probes run here to bring them UP).
        n = Node(tmp_path, drain=30.0, discovery="[pool.health]\nenabled = false\n")
        for b in range(30):
            await asyncio.gather(*[n.e.add("web", f"x{b * 100 + i}", f"10.0.{b}.{i}:80", 1)
                                   for i in range(100)])
        snaps: list[int] = []
        broadcast = n.d.supervisor.broadcast

        def spy(msg: wl.Message) -> None:
            if isinstance(msg, wl.Snap):
                snaps.append(len(channel.encode(wl.encode(msg))) if len(snaps) < 3 else 0)
            broadcast(msg)

        n.d.supervisor.broadcast = spy
        t = time.perf_counter()
        await asyncio.gather(*[n.e.add("web", f"y{i}", f"10.1.{i // 256}.{i % 256}:80", 1)
                               for i in range(300)])
        await asyncio.sleep(0.3)
        adds = (len(snaps), time.perf_counter() - t)
        snaps.clear()
        t = time.perf_counter()
        await asyncio.gather(*[n.e.remove("web", f"x{i}") for i in range(300)])
        removes = (len(snaps), time.perf_counter() - t, snaps[0])
        assert removes[0] <= 10, (
            f"300 removes: {removes[0]} whole snapshots ({removes[2]} bytes each) in "
            f"{removes[1]:.1f} s; 300 adds: {adds[0]} in {adds[1]:.1f} s")

    run(main)


@pytest.mark.timeout(60)
def test_post_delete_post_of_one_name_in_quick_succession(tmp_path: Path) -> None:
    """Holds: POST (201), DELETE (202, draining), POST again while it drains (409 naming
    the removal), DELETE again (202, same drain), POST once it has left (201, the new
    address); the overlay ends with the last add."""

    async def main() -> None:
        from lb.admin.server import make_app

        n = Node(tmp_path, drain=0.5)
        async with serve(make_app(n.d)) as url:
            def body(port: int) -> bytes:
                return json.dumps({"name": "q", "address": f"127.0.0.1:{port}"}).encode()

            got = [
                await call(url, n.token, "POST", "/pools/web/backends", body(1001)),
                await call(url, n.token, "DELETE", "/pools/web/backends/q", None),
                await call(url, n.token, "POST", "/pools/web/backends", body(1002)),
                await call(url, n.token, "DELETE", "/pools/web/backends/q", None),
            ]
            assert [s for s, _ in got] == [201, 202, 409, 202], got
            assert b"being removed" in got[2][1]
            await asyncio.sleep(1.2)
            assert n.has("q") is None
            status, _ = await call(url, n.token, "POST", "/pools/web/backends", body(1003))
            assert status == 201 and n.has("q") == "127.0.0.1:1003"
            assert n.e.overlay.entries[("web", "q")].address == "127.0.0.1:1003"

    run(main)
