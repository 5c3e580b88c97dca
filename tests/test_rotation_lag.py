"""Each worker reports the rotation snapshot it routes by (``wl.SnapApplied``), with real
processes: ``/status`` workers[].rotation_version and rotation_lag_s, and the metric
``pairlb_worker_rotation_lag_seconds``, against rotation.version; how long pushes took to be
applied (``rotation.apply_ms``, ``pairlb_rotation_apply_seconds``).

A real ``pairlb run`` (control process + 2 workers, admin on, /metrics scraped every 0.25 s)
in front of three real backends: at rest every worker has the last snapshot; a backend dies
while one worker is stopped (SIGSTOP): the other applies the change, the stopped one is seen
behind, by how long, until it runs again and catches up. The old workers of a rolling reload
get every change too, and a slow start's steps are pending in /status until pushed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from test_accept_balance import AdminNode, Scraper, node  # noqa: F401 (the fixture)
from test_process_model import PY, ROOT, free_port, wait_http

from lab import backend_app


def wait_status(n: AdminNode, cond: Callable[[dict[str, Any]], bool], timeout_s: float,
                what: str) -> dict[str, Any]:
    end = time.monotonic() + timeout_s
    while True:
        st = n.status()
        if cond(st):
            return st
        assert time.monotonic() < end, (what, st["rotation"], st["workers"])
        time.sleep(0.02)


def caught_up(st: dict[str, Any]) -> bool:
    v = st["rotation"]["version"]
    return not st["rotation"]["pending"] and all(
        w["rotation_version"] == v and w["rotation_lag_s"] == 0 for w in st["workers"])


def web3_out(st: dict[str, Any]) -> bool:
    (b,) = [b for b in st["pools"][0]["backends"] if b["name"] == "web3"]
    return not b["in_rotation"]


def test_a_stopped_worker_is_seen_behind_the_rotation_until_it_runs(
    node: AdminNode,  # noqa: F811 (the imported fixture)
) -> None:
    st = wait_status(node, caught_up, 5.0, "every worker has the last snapshot at rest")
    v0 = st["rotation"]["version"]
    assert v0 > 0 and len(st["workers"]) == 2
    assert node.metric("pairlb_worker_rotation_lag_seconds", 'worker="1"') == 0.0
    pid = node.slot_pid(1)
    os.kill(pid, signal.SIGSTOP)
    try:
        t_kill = time.monotonic()
        node.backends[2].terminate()  # web3 goes down: the rotation changes
        st = wait_status(node, lambda s: web3_out(s) and s["rotation"]["version"] > v0, 5.0,
                         "web3 out of rotation")
        w0 = wait_status(node, lambda s: s["workers"][0]["rotation_version"]
                         >= s["rotation"]["version"], 2.0, "worker 0 applies it")["workers"][0]
        assert w0["rotation_lag_s"] == 0, w0
        time.sleep(0.5)
        st = node.status()
        w1 = st["workers"][1]
        assert w1["rotation_version"] == v0 < st["rotation"]["version"], st["workers"]
        assert w1["rotation_lag_s"] >= 0.5, w1
        assert w1["rotation_lag_s"] <= time.monotonic() - t_kill, w1  # pushed after the kill
        lag = node.metric("pairlb_worker_rotation_lag_seconds", 'worker="1"')
        assert lag >= 0.5, lag
        assert node.metric("pairlb_worker_rotation_lag_seconds", 'worker="0"') == 0.0
    finally:
        os.kill(pid, signal.SIGCONT)
    st = wait_status(node, caught_up, 2.0, "worker 1 catches up once it runs")
    t_caught = time.monotonic()
    assert node.metric("pairlb_worker_rotation_lag_seconds", 'worker="1"') == 0.0
    # Its wait is one observation of the propagation time: over 0.5 s, under the whole stop.
    rot = st["rotation"]
    assert rot["applied"] >= 2, rot  # this push, by both workers
    assert 500 <= rot["apply_ms"]["max_10s"] <= (t_caught - t_kill) * 1000, rot
    assert rot["apply_ms"]["p50"] < 500, rot  # worker 0's was not slow
    count = node.metric("pairlb_rotation_apply_seconds_count", "")
    assert count >= rot["applied"], (count, rot)
    over = count - node.metric("pairlb_rotation_apply_seconds_bucket", 'le="0.5"')
    assert over >= 1, (count, over)
    assert node.slot_pid(1) == pid  # behind, not killed (ping timeout 5 s)


TOKEN = "rotation-test-token-0123456789abcdef"


class TokenNode(AdminNode):
    """AdminNode with an admin token (actions need one) and pool settings of the test."""

    def __init__(self, tmp: Path, pool_extra: str = "") -> None:
        super().__init__(tmp)
        self.extra_pool = pool_extra
        self.token = tmp / "admin.token"
        self.token.write_text(TOKEN + "\n")
        self.token.chmod(0o600)
        self.listeners_extra = ""

    def config(self, backends: int = 3, extra: str = "") -> str:
        text = super().config(backends, extra).replace(
            f'bind = "127.0.0.1:{self.admin_port}"',
            f'bind = "127.0.0.1:{self.admin_port}"\ntoken_file = "{self.token}"')
        return text.replace("[[pool]]", self.listeners_extra + "[[pool]]", 1)

    def post(self, path: str, port: int | None = None, token: bool = True) -> int:
        c = http.client.HTTPConnection("127.0.0.1", port or self.admin_port, timeout=5)
        c.request("POST", path, headers={"Authorization": f"Bearer {TOKEN}"} if token else {})
        r = c.getresponse()
        r.read()
        return r.status


@contextlib.contextmanager
def token_node(tmp: Path, pool_extra: str = "") -> Iterator[TokenNode]:
    n = TokenNode(tmp, pool_extra)
    try:
        n.start()
        wait_http(n.admin_port, "/healthz")
        wait_status(n, lambda s: all(w["ready"] for w in s["workers"]), 10.0, "workers ready")
        with Scraper(n) as scraper:
            n.scraper = scraper
            yield n
        assert set(scraper.results) == {200}, scraper.results
    finally:
        n.stop()


def backend_of(port: int) -> str:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", "/")
    r = c.getresponse()
    r.read()
    c.close()
    return r.getheader("X-Backend") or str(r.status)


def test_retiring_workers_of_a_rolling_reload_get_every_rotation_change(
    tmp_path: Path,
) -> None:
    """A reload that adds a listener replaces the workers; the old ones accept until every
    new one is Ready. One new worker is held before it is Ready (SIGSTOP) while a backend
    is drained: the old workers apply the drain too (they are shown, caught up, in
    workers_retiring) and no new connection reaches the drained backend."""
    with token_node(tmp_path) as n:
        old, held = hold_a_rolling_reload(n)
        try:
            st = wait_status(n, lambda s: len(s["workers_retiring"]) == 2, 5.0,
                             "the old workers listed as retiring")
            assert {w["pid"] for w in st["workers_retiring"]} == old
            assert n.post("/backends/web/web2/drain") == 200
            st = wait_status(n, lambda s: not s["rotation"]["pending"] and all(
                w["rotation_version"] >= s["rotation"]["version"]
                for w in s["workers_retiring"]), 2.0, "the retiring workers apply the drain")
            assert len(st["workers_retiring"]) == 2, st["workers_retiring"]
            got = [backend_of(n.port) for _ in range(60)]
            assert "web2" not in got, got
            assert set(got) <= {"web1", "web3"}, got
            assert {w["pid"] for w in n.status()["workers_retiring"]} == old  # still there
        finally:
            os.kill(held, signal.SIGCONT)
        wait_status(n, lambda s: not s["workers_retiring"], 10.0, "the old workers leave")
        wait_status(n, caught_up, 2.0, "every new worker has the rotation")


def test_a_time_driven_change_is_pending_until_pushed(tmp_path: Path) -> None:
    """Slow start (1 s) changes web3's weight in steps that only a timer pushes: /status
    never shows a new weight under a version every worker applied with nothing pending."""
    with token_node(tmp_path, "slow_start_s = 1.0") as n:
        bad, steps = [], 0
        for _ in range(2):
            assert n.post("/admin/health/500", n.bports[2], token=False) == 200
            wait_status(n, lambda s: not web3_in(s), 5.0, "web3 out")
            assert n.post("/admin/health/200", n.bports[2], token=False) == 200
            wait_status(n, web3_in, 5.0, "web3 back")
            prev = None
            end = time.monotonic() + 1.2
            while time.monotonic() < end:
                st = n.status()
                (b,) = [b for b in st["pools"][0]["backends"] if b["name"] == "web3"]
                cur = (st["rotation"]["version"], st["rotation"]["pending"],
                       b["effective_weight"])
                if prev is not None and prev[2] != cur[2]:
                    steps += 1
                    if prev[0] == cur[0] and not prev[1] and not cur[1]:
                        bad.append((prev, cur))
                prev = cur
        assert steps >= 5, steps  # the steps were seen
        assert not bad, bad[:5]


def web3_in(st: dict[str, Any]) -> bool:
    return not web3_out(st)


def admin(n: TokenNode, method: str, path: str, body: Any = None) -> tuple[int, str]:
    c = http.client.HTTPConnection("127.0.0.1", n.admin_port, timeout=10)
    data = None if body is None else json.dumps(body).encode()
    c.request(method, path, body=data, headers={"Authorization": f"Bearer {TOKEN}",
                                                "Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, r.read().decode()


def hold_a_rolling_reload(n: TokenNode) -> tuple[set[int], int]:
    """SIGHUP with a listener added (the workers are replaced); the new worker of slot 1
    is stopped before it is Ready, so the old ones keep accepting: (old pids, held pid)."""
    assert n.proc is not None
    old = {w["pid"] for w in n.status()["workers"]}
    n.listeners_extra = (f'[[listener]]\nname = "extra"\nbind = "127.0.0.1:{free_port()}"\n'
                         f'pool = "web"\n')
    n.cfg.write_text(n.config())
    os.kill(n.proc.pid, signal.SIGHUP)
    end = time.monotonic() + 10
    while True:
        assert time.monotonic() < end, "missed the new worker's start"
        for w in n.status()["workers"]:
            if w["index"] == 1 and w["pid"] not in old and not w["ready"]:
                os.kill(w["pid"], signal.SIGSTOP)
                return old, w["pid"]


def test_retiring_workers_never_put_a_name_back_in(tmp_path: Path) -> None:
    """While the old workers retire, web2 is removed at runtime and added again under the
    same name at another server: the old workers know web2 at the old address (they get no
    runtime edits), so the change that puts the name in is not theirs; nothing reaches the
    removed server."""
    port = free_port()
    newb = subprocess.Popen([PY, "-m", "lab.backend_app", "web2new", f"127.0.0.1:{port}"],
                            cwd=ROOT)
    try:
        backend_app.wait_answering("127.0.0.1", port, "web2new", 15.0)
        with token_node(tmp_path) as n:
            old, held = hold_a_rolling_reload(n)
            try:
                wait_status(n, lambda s: len(s["workers_retiring"]) == 2, 5.0, "retiring")
                assert admin(n, "DELETE", "/pools/web/backends/web2")[0] in (200, 202)
                wait_status(n, lambda s: "web2" not in {
                    b["name"] for b in s["pools"][0]["backends"]}, 10.0, "web2 removed")
                code, body = admin(n, "POST", "/pools/web/backends", {
                    "name": "web2", "address": f"127.0.0.1:{port}", "weight": 1})
                assert code == 201, body
                wait_status(n, lambda s: any(
                    b["name"] == "web2" and b["in_rotation"] for b in s["pools"][0]["backends"])
                    and not s["rotation"]["pending"] and all(
                    w["rotation_version"] >= s["rotation"]["version"]
                    for w in s["workers_retiring"]), 5.0, "the new web2 in rotation")
                got = [backend_of(n.port) for _ in range(90)]
                assert {w["pid"] for w in n.status()["workers_retiring"]} == old  # still there
            finally:
                os.kill(held, signal.SIGCONT)
        assert "web2" not in got, {k: got.count(k) for k in set(got)}
        assert "web2new" in got  # the new workers' share
    finally:
        newb.terminate()
        newb.wait(10)


def test_pushes_go_on_through_a_stops_drain(tmp_path: Path) -> None:
    """SIGTERM while a request is in flight: the workers drain (their requests may still
    retry on other backends); web3 fails its checks meanwhile: the workers get it."""
    with token_node(tmp_path) as n:
        assert n.proc is not None and n.scraper is not None
        done: list[Any] = []

        def slow() -> None:
            try:
                c = http.client.HTTPConnection("127.0.0.1", n.port, timeout=20)
                c.request("GET", "/sleep/3")
                done.append(c.getresponse().status)
            except OSError as exc:
                done.append(repr(exc))

        v0 = wait_status(n, caught_up, 2.0, "settled")["rotation"]["version"]
        th = threading.Thread(target=slow)
        th.start()
        time.sleep(0.3)
        n.scraper.stopped_at = time.monotonic()  # scrapes from now on may fail: it stops
        os.kill(n.proc.pid, signal.SIGTERM)
        time.sleep(0.2)
        assert n.post("/admin/health/500", n.bports[2], token=False) == 200
        st = wait_status(n, web3_out, 5.0, "web3 out during the drain")

        def pushed(s: dict[str, Any]) -> bool:
            rot = s["rotation"]
            return not rot["pending"] and rot["version"] > v0 and all(
                w["rotation_version"] >= rot["version"] for w in s["workers"] if w["alive"])

        st = wait_status(n, pushed, 2.0, "the draining worker gets the change")
        # The worker with the slow request drains; the idle one may have exited already.
        assert any(w["alive"] for w in st["workers"]), st["workers"]
        th.join(20)
        assert done == [200], done
