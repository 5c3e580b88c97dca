"""Each worker reports the rotation snapshot it routes by (``wl.SnapApplied``), with real
processes: ``/status`` workers[].rotation_version and rotation_lag_s, and the metric
``pairlb_worker_rotation_lag_seconds``, against rotation.version; how long pushes took to be
applied (``rotation.apply_ms``, ``pairlb_rotation_apply_seconds``).

A real ``pairlb run`` (control process + 2 workers, admin on, /metrics scraped every 0.25 s)
in front of three real backends: at rest every worker has the last snapshot; a backend dies
while one worker is stopped (SIGSTOP): the other applies the change, the stopped one is seen
behind, by how long, until it runs again and catches up.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from test_accept_balance import AdminNode, node  # noqa: F401 (the fixture)


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
