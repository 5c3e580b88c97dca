"""Outside review of issue 16 across the pair: two real nodes in network namespaces
(tests/test_elastic_pair.py's ElasticRig: lab.pair_rig, a client probing the VIP every
10 ms). Both nodes change the same names at once, and both change things while partitioned;
the overlays must converge to one winner per name and both nodes must end up serving it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_elastic_pair import ElasticRig

from lab import netns
from lab import pair_rig as fe
from lab.pair import LBS

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(netns.skip_reason() is not None, reason=netns.skip_reason() or ""),
    pytest.mark.timeout(240),
]


@pytest.fixture(scope="module")
def rig() -> Iterator[ElasticRig]:
    with ElasticRig() as r:
        r.steady(r.settings)
        r.wait_for("the sync channel up on both nodes", lambda: all(
            any(p["connected"] for p in (r.runtime(n)["sync"] or {}).get("peers", []))
            for n in LBS), 10.0)
        yield r


def both(rig: ElasticRig, calls: dict[str, tuple[str, str, Any]]) -> dict[str, tuple[int, Any]]:
    """The calls of each node at the same moment (one thread each, released together)."""
    out: dict[str, tuple[int, Any]] = {}
    go = threading.Barrier(len(calls))

    def one(node: str, method: str, path: str, body: Any) -> None:
        go.wait(5)
        out[node] = rig.call(node, method, path, body)

    threads = [threading.Thread(target=one, args=(n, *c)) for n, c in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def view(rig: ElasticRig, node: str) -> dict[str, str]:
    """name -> address of the pool on ``node``, leaving backends out once they drain."""
    return {n: b["address"] for n, b in rig.members(node).items() if not b.get("removing")}


def converged(rig: ElasticRig) -> bool:
    rt = [rig.runtime(n) for n in LBS]
    return (rt[0]["overlay"]["digest"] == rt[1]["overlay"]["digest"]
            and view(rig, "lb1") == view(rig, "lb2")
            and not any(rig.members(n)[b].get("removing") for n in LBS
                        for b in rig.members(n)))


def addr(rig: ElasticRig, backend: str) -> str:
    return f"{rig.addr[backend]}:{fe.BACKEND_PORT}"


def test_one_name_added_on_both_nodes_at_once_converges_to_one_winner(
        rig: ElasticRig) -> None:
    rig.steady(rig.settings)
    t0 = time.monotonic()
    got = both(rig, {
        "lb1": ("POST", "/pools/web/backends", {"name": "dup", "address": addr(rig, "web1")}),
        "lb2": ("POST", "/pools/web/backends", {"name": "dup", "address": addr(rig, "web2")}),
    })
    assert {n: s for n, (s, _) in got.items()} == {"lb1": 201, "lb2": 201}, got
    rig.wait_for("both nodes on one winner for dup", lambda: converged(rig), 40.0, 0.2)
    winner = view(rig, "lb1")["dup"]
    assert winner in (addr(rig, "web1"), addr(rig, "web2"))
    rig.wait_for("dup in rotation on both", lambda: all(
        rig.members(n)["dup"]["in_rotation"] for n in LBS), 10.0)
    assert rig.runtime("lb1")["changes"]["conflicts"] + \
        rig.runtime("lb2")["changes"]["conflicts"] >= 1
    failed = [a for a in rig.attempts(t0) if not a.ok]
    assert failed == [], failed[:5]
    for node in LBS:
        assert rig.call(node, "DELETE", "/pools/web/backends/dup")[0] in (202, 404)
    rig.wait_for("dup gone on both", lambda: all("dup" not in rig.members(n) for n in LBS),
                 40.0, 0.2)


def test_changes_on_both_sides_of_a_partition_converge_after_it_heals(
        rig: ElasticRig) -> None:
    rig.steady(rig.settings)
    rig.topo.isolate("lb1")
    rig.topo.isolate("lb2")
    try:
        # No wait for the channel to notice (three silent pings, 15 s): a change made now is
        # "pending" either way (no ack within op_timeout_s), and reaches the peer after
        # the heal by the TCP retransmit or the state exchange of a new session.
        time.sleep(0.3)
        answers = [
            rig.call("lb1", "POST", "/pools/web/backends",
                     {"name": "p1", "address": addr(rig, "web1")}),
            rig.call("lb2", "POST", "/pools/web/backends",
                     {"name": "p2", "address": addr(rig, "web2")}),
            rig.call("lb1", "POST", "/pools/web/backends",
                     {"name": "pp", "address": addr(rig, "web1")}),
            rig.call("lb2", "POST", "/pools/web/backends",
                     {"name": "pp", "address": addr(rig, "web2")}),
            rig.call("lb2", "DELETE", "/pools/web/backends/web1", None),
        ]
        assert [s for s, _ in answers] == [201, 201, 201, 201, 202], answers
        assert all(list(b["peer"].values()) == ["pending"] for _, b in answers), answers
    finally:
        rig.topo.isolate("lb1", False)
        rig.topo.isolate("lb2", False)
    rig.wait_for("both overlays and pools equal after the heal", lambda: converged(rig),
                 60.0, 0.2)
    v = view(rig, "lb1")
    assert {"p1", "p2", "pp", "web2"} <= set(v) and "web1" not in v, v
    # put things back for the other tests
    for name in ("p1", "p2", "pp"):
        rig.call("lb1", "DELETE", f"/pools/web/backends/{name}")
    rig.call("lb1", "POST", "/pools/web/backends", {"name": "web1",
                                                    "address": addr(rig, "web1")})
    rig.wait_for("cleaned up", lambda: converged(rig) and "web1" in view(rig, "lb1"), 60.0, 0.2)
