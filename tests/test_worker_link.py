"""The control <-> worker messages (lb.worker_link): every message survives the channel
exactly (through JSON, as lb.channel sends it), what is not a message of this version is
refused, and a worker or the control process that gets such a frame logs it and goes on."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from lb import worker_link as wl


def through_the_channel(msg: wl.Message) -> wl.Message:
    return wl.decode(json.loads(json.dumps(wl.encode(msg))))


EVERY = [
    wl.Config(3, {"node": {"name": "lb1"}, "pool": []}, {"web": (7, 9), "tcp": (8,)}),
    wl.Snap(9, {"web": wl.PoolSnap(False, {"b1": (True, 1.0), "b2": (False, 0.25)}),
                "empty": wl.PoolSnap(True, {})}),
    wl.Snap(10, {"web": wl.PoolSnap(False, {"b2": (True, 0.5)})}, base=9),
    wl.PoolEdit(4, "web", add=(("web9", "10.0.0.9:8080", 2),), remove=("web1", "web2")),
    wl.PoolEdit(5, "web"),
    wl.HashTable("web", ("b1", "b2"), 5, "H", bytes([0, 0, 1, 0, 0, 0, 1, 0, 0, 0]), "ab12"),
    wl.Ping(),
    wl.CloseIdle(),
    wl.ReopenLogs(),
    wl.Help({"web": (0, 2)}),
    wl.Help({}),
    wl.Stop(2.5),
    wl.Hello(1234, 0),
    wl.Ready(1234, ("tcp", "web")),
    wl.Pong(),
    wl.Paused("web", True),
    wl.SnapApplied(42),
    wl.Stats({"requests": {"web": {"b1": {"2xx": 3}}}, "connections": {"web": {"active": 1}}},
             {"web/b1": 2}),
    wl.Eject("web", "b1", "connect_failure"),
    wl.ConfigApplied(3),
    wl.ConfigFailed(3, "boom"),
    wl.Stopped(1234),
]


@pytest.mark.parametrize("msg", EVERY, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_json(msg: wl.Message) -> None:
    assert through_the_channel(msg) == msg


def test_every_message_type_is_covered() -> None:
    assert {type(m) for m in EVERY} == set(wl._CODEC.types.values()), "a type is untested"


def test_the_wire_shape_is_the_documented_one() -> None:
    """What an strace shows: a snapshot's backend is [eligible, weight]."""
    frame = wl.encode(wl.Snap(4, {"web": wl.PoolSnap(False, {"b1": (True, 2.0)})}))
    assert frame == {"t": "snap", "v": wl.VERSION, "ver": 4, "base": 0,
                     "pools": {"web": {"panic": False, "e": {"b1": [True, 2.0]}}}}


@pytest.mark.parametrize("frame,why", [
    ({"t": "stop", "v": wl.VERSION + 1, "timeout_s": 1.0}, "version"),
    ({"t": "stop", "timeout_s": 1.0}, "version"),
    ({"t": "nope", "v": wl.VERSION}, "unknown"),
    ({"t": "stop", "v": wl.VERSION, "timeout_s": "soon"}, "number"),
    ({"t": "eject", "v": wl.VERSION, "pool": "web", "backend": "b1"}, "reason"),
    ({"t": "snap", "v": wl.VERSION, "ver": "9", "pools": {}}, "snap"),
    ({"t": "snap", "v": wl.VERSION, "ver": 9, "pools": {"web": {"panic": False}}}, "'e'"),
    ({"t": "hello", "v": wl.VERSION, "pid": True, "index": 0}, "int"),
    ({"t": "stats", "v": wl.VERSION, "d": [], "inflight": {}}, "stats"),
    ({"t": "stats", "v": wl.VERSION, "d": {}}, "stats"),
])
def test_what_is_not_a_message_of_this_version_is_refused(frame: dict[str, Any],
                                                          why: str) -> None:
    with pytest.raises(wl.WorkerLinkError, match=why):
        wl.decode(frame)


def test_a_snapshot_of_3000_backends_decodes_fast() -> None:
    """Pushed to every worker on each health change: the bulk path keeps it cheap."""
    snap = wl.Snap(1, {"big": wl.PoolSnap(False, {f"b{i}": (True, 1.0) for i in range(3000)})})
    frame = json.loads(json.dumps(wl.encode(snap)))
    t0 = time.perf_counter()
    for _ in range(20):
        assert wl.decode(frame) == snap
    per_decode = (time.perf_counter() - t0) / 20
    assert per_decode < 0.02, f"{per_decode * 1000:.1f} ms per 3000-backend snapshot"
