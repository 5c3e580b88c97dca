"""A worker's side of runtime pool changes (lb.data.worker): a ``PoolEdit`` and a reload
that changes only a pool's members edit the pool in place (the same Pool object: loads and
places kept), anything else rebuilds it; an edit for another generation is refused with a
``pool_edit`` error, which makes the control process resend the whole config."""

from __future__ import annotations

from typing import Any

import pytest

from lb import worker_link as wl
from lb.config import Config
from lb.data.pool import BackendEntry
from lb.data.worker import Worker


class Chan:
    def __init__(self) -> None:
        self.sent: list[wl.Message] = []

    def send(self, frame: dict[str, Any]) -> bool:
        self.sent.append(wl.decode(frame))
        return True


def config(backends: list[tuple[str, str]], **pool: Any) -> dict[str, Any]:
    return Config.model_validate({
        "node": {"name": "w", "worker_nice": 0},
        "listener": [{"name": "web", "bind": "127.0.0.1:1", "pool": "web"}],
        "pool": [{"name": "web", "backends": [{"name": n, "address": a} for n, a in backends],
                  **pool}],
    }).wire()


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> Worker:
    from lb.data import worker as worker_mod

    monkeypatch.setattr(worker_mod.log, "setup", lambda *a, **k: None)  # not this process's
    w = Worker(-1, 0)
    w.chan = Chan()  # type: ignore[assignment]
    return w


def sent(w: Worker) -> list[wl.Message]:
    chan: Any = w.chan
    return list(chan.sent)


def test_pool_edit_adds_and_removes_in_place_and_keeps_loads(worker: Worker) -> None:
    assert worker._apply_config(wl.Config(1, config([("a", "10.0.0.1:80"), ("b", "10.0.0.2:80")]),
                                          {}))
    pool = worker.pools["web"]
    pool.apply(1, {"a": BackendEntry(True, 1.0), "b": BackendEntry(True, 1.0)}, False)
    a = pool.pick(0.0)
    assert a is not None
    worker._apply_edit(wl.PoolEdit(1, "web", add=(("c", "10.0.0.3:80", 2),), remove=("b",)))
    assert worker.pools["web"] is pool
    assert [b.name for b in pool.backends] == ["a", "c"]
    assert a.in_flight == 1 and not pool.get("c").eligible  # type: ignore[union-attr]
    assert worker.config is not None
    assert [b.name for b in worker.config.pool_by_name("web").backends] == ["a", "c"]
    # The next reload carries the same members: nothing is rebuilt or changed.
    assert worker._apply_config(wl.Config(2, config([("a", "10.0.0.1:80"), ("c", "10.0.0.3:80")]),
                                          {}))
    assert worker.pools["web"] is pool and a.in_flight == 1


def test_a_reload_that_only_changes_members_edits_the_pool(worker: Worker) -> None:
    assert worker._apply_config(wl.Config(1, config([("a", "10.0.0.1:80"), ("b", "10.0.0.2:80")]),
                                          {}))
    pool = worker.pools["web"]
    b_before = pool.get("b")
    assert worker._apply_config(wl.Config(2, config([("a", "10.0.0.1:80"), ("b", "10.0.0.9:80"),
                                                     ("d", "10.0.0.4:80")]), {}))
    assert worker.pools["web"] is pool
    assert pool.get("b") is not b_before and pool.get("b").host == "10.0.0.9"  # type: ignore[union-attr]
    assert [b.name for b in pool.backends] == ["a", "b", "d"]
    # Another setting of the pool: rebuilt.
    assert worker._apply_config(wl.Config(3, config([("a", "10.0.0.1:80")],
                                                    balance="least_connections"), {}))
    assert worker.pools["web"] is not pool


def test_an_edit_for_another_generation_is_refused_as_pool_edit(worker: Worker) -> None:
    assert worker._apply_config(wl.Config(4, config([("a", "10.0.0.1:80")]), {}))
    worker._apply_edit(wl.PoolEdit(5, "web", add=(("c", "10.0.0.3:80", 1),)))
    worker._apply_edit(wl.PoolEdit(4, "nope", remove=("x",)))
    failed = [m for m in sent(worker) if isinstance(m, wl.ConfigFailed)]
    assert len(failed) == 2 and all(m.error.startswith("pool_edit") for m in failed), failed
    assert [b.name for b in worker.pools["web"].backends] == ["a"]


def test_an_emptied_pool_is_a_valid_effective_config(worker: Worker) -> None:
    cfg = config([("a", "10.0.0.1:80")])
    cfg["pool"][0]["backends"] = []
    assert worker._apply_config(wl.Config(1, cfg, {}))
    assert worker.pools["web"].backends == []
    assert worker.pools["web"].pick(0.0) is None


def test_snapshot_deltas_apply_on_top_and_a_gap_asks_for_everything(worker: Worker) -> None:
    assert worker._apply_config(wl.Config(1, config([("a", "10.0.0.1:80"), ("b", "10.0.0.2:80")]),
                                          {}))
    worker.started = True  # (no servers to start here)
    worker._apply_snapshot(wl.Snap(5, {"web": wl.PoolSnap(False, {"a": (True, 1.0),
                                                                   "b": (False, 0.0)})}))
    pool = worker.pools["web"]
    assert [b.name for b in pool.backends if b.usable(0.0)] == ["a"]
    worker._apply_snapshot(wl.Snap(6, {"web": wl.PoolSnap(False, {"b": (True, 2.0)})}, base=5))
    assert {b.name: b.weight for b in pool.backends if b.usable(0.0)} == {"a": 1.0, "b": 2.0}
    assert worker.last_snap is not None and worker.last_snap.ver == 6
    assert worker.last_snap.pools["web"].entries == {"a": (True, 1.0), "b": (True, 2.0)}
    # A delta on top of a version this worker never had: refused as a pool_edit problem
    # (the control process then resends the config and the whole snapshot), nothing applied.
    worker._apply_snapshot(wl.Snap(9, {"web": wl.PoolSnap(False, {"a": (False, 0.0)})}, base=8))
    assert pool.get("a").usable(0.0)  # type: ignore[union-attr]
    failed = [m for m in sent(worker) if isinstance(m, wl.ConfigFailed)]
    assert failed and failed[-1].error.startswith("pool_edit: snapshot 9 builds on 8")
