"""The supervisor's book of which rotation snapshot each worker applied
(lb.control.supervisor.WorkerHandle): the lag it reports, the propagation times it records
and the answers it refuses, for any order of pushes and answers; and the lab's wait for
every worker to route by what /status shows, on replayed answers."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from healthcheck import Lateness
from lab.node_rig import StatusWatch
from lb import worker_link as wl
from lb.control import supervisor as sup
from lb.control.supervisor import WorkerHandle


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def started(clock: Clock, delays: Lateness) -> WorkerHandle:
    """A handle whose worker applied its welcome snapshot (version 1)."""
    h = WorkerHandle(0, 1)
    h.chan = mock.Mock()
    h.snap_sent(1, push=False)
    assert h.snap_applied(1, clock.t, delays)
    return h


def test_the_start_shows_as_lag_but_is_no_propagation_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    h, delays = WorkerHandle(0, 1), Lateness()
    assert h.rotation_lag_s(clock.t) == 0.0
    h.snap_sent(1, push=False)  # the welcome: the process is still starting
    clock.t = 100.8
    h.snap_sent(2)  # a push while it starts: it waits for the start too
    clock.t = 101.0
    assert h.rotation_lag_s(clock.t) == 1.0  # since the oldest not applied
    assert h.snap_applied(2, clock.t, delays)
    assert (h.snap_ver, delays.count, h.rotation_lag_s(clock.t)) == (2, 0, 0.0)
    h.snap_sent(3)
    clock.t = 101.2
    h.snap_sent(4)
    clock.t = 101.25
    assert abs(h.rotation_lag_s(clock.t) - 0.25) < 1e-9
    assert h.snap_applied(4, clock.t, delays)  # 3 and 4 at once: two pushes applied
    assert (h.snap_ver, delays.count, h.rotation_lag_s(clock.t)) == (4, 2, 0.0)
    assert abs(delays.max_s - 0.25) < 1e-9


@pytest.mark.parametrize("ver", [-5, 0, 1, 4, 10**30])
def test_an_answer_for_a_snapshot_never_sent_or_going_back_is_refused(
    monkeypatch: pytest.MonkeyPatch, ver: int,
) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    delays = Lateness()
    h = started(clock, delays)
    h.snap_sent(2)
    h.snap_sent(3)
    assert h.snap_applied(2, clock.t, delays)
    assert not h.snap_applied(ver, clock.t, delays)  # behind 2, or beyond 3: never sent
    assert h.snap_ver == 2  # unchanged by a refused answer
    assert h.rotation_lag_s(clock.t + 1) == 1.0  # 3 still on its way


def test_pushes_past_the_kept_ones_fold_and_the_lag_is_never_under_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    delays = Lateness()
    h = started(clock, delays)
    t0 = clock.t
    for v in range(2, 2 + sup.SNAPS_KEPT + 500):  # a worker that answers nothing
        clock.t += 0.01
        h.snap_sent(v)
    assert len(h.snaps_sent) == sup.SNAPS_KEPT and h.snaps_folded == 500
    assert abs(h.rotation_lag_s(clock.t) - (clock.t - t0 - 0.01)) < 1e-6  # the oldest's age
    last = 1 + sup.SNAPS_KEPT + 500
    assert h.snap_applied(last, clock.t, delays)
    assert h.rotation_lag_s(clock.t) == 0.0 and h.snap_ver == last
    assert delays.count == sup.SNAPS_KEPT  # the folded ones are not observed


def test_a_gone_worker_has_no_lag(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    h = started(clock, Lateness())
    h.snap_sent(2)
    assert h.rotation_lag_s(clock.t + 3) == 3.0
    h.stopped.set()  # exited: it routes nothing (its slot is in its restart backoff)
    assert h.rotation_lag_s(clock.t + 3) == 0.0
    assert not h.alive


@given(st.lists(st.tuples(st.sampled_from(["push", "apply", "bogus"]), st.floats(0, 2)),
                max_size=60))
def test_lag_is_the_age_of_the_oldest_push_not_applied(steps: list[tuple[str, float]]) -> None:
    """Any interleaving after the start: a push (a new version), the worker applying the
    newest it has (its answers come in order), or an answer it cannot give, ``dt`` apart."""
    clock = Clock(0.0)
    with mock.patch.object(time, "monotonic", clock):
        delays = Lateness()
        h = started(clock, delays)
        ver = 1
        pending: list[tuple[int, float]] = []
        observed = 0
        for what, dt in steps:
            clock.t += dt
            if what == "push":
                ver += 1
                h.snap_sent(ver)
                pending.append((ver, clock.t))
            elif what == "apply" and pending:
                assert h.snap_applied(pending[-1][0], clock.t, delays)
                observed += len(pending)
                pending.clear()
            elif what == "bogus":
                assert not h.snap_applied(ver + 1, clock.t, delays)
                assert not h.snap_applied(h.snap_ver - 1, clock.t, delays)
            want = clock.t - pending[0][1] if pending else 0.0
            assert h.rotation_lag_s(clock.t) == want
            assert h.snap_ver == (pending[0][0] - 1 if pending else ver)
            assert delays.count == observed


# -- lab.node_rig.StatusWatch.wait_rotation_applied, on replayed /status answers ------------


class ReplayWatch(StatusWatch):
    """A StatusWatch whose polls answer from a list (the last one repeated)."""

    def __init__(self, answers: list[dict[str, Any]]) -> None:
        super().__init__(0, interval_s=0.02)
        self.answers = answers
        self.polls = 0

    async def poll(self) -> dict[str, Any]:
        self.polls += 1
        st = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        self.history.append((0.0, st))
        return st


def status(ver: int, pending: bool, *workers: int, retiring: tuple[int, ...] = ()
           ) -> dict[str, Any]:
    return {"rotation": {"version": ver, "pending": pending},
            "workers": [{"rotation_version": w} for w in workers],
            "workers_retiring": [{"rotation_version": w} for w in retiring]}


@pytest.mark.parametrize("answers, polls", [
    # The pending push changed nothing (a drained backend's health went DOWN): 7 it is.
    ([status(7, True, 7, 7), status(7, False, 7, 7)], 2),
    # It did: 8, and a worker behind at first.
    ([status(7, True, 7, 7), status(8, False, 8, 7), status(8, False, 8, 8)], 3),
    # A retiring worker of a rolling reload routes too.
    ([status(5, False, 5, 5, retiring=(4,)), status(5, False, 5, 5, retiring=(5,))], 2),
])
def test_wait_rotation_applied_waits_for_the_version_of_the_first_settled_answer(
    answers: list[dict[str, Any]], polls: int,
) -> None:
    w = ReplayWatch(answers)
    asyncio.run(w.wait_rotation_applied(timeout_s=2.0))
    assert w.polls == polls


def test_wait_rotation_applied_times_out_on_a_worker_that_stays_behind() -> None:
    w = ReplayWatch([status(9, False, 9, 8)])
    with pytest.raises(TimeoutError):
        asyncio.run(w.wait_rotation_applied(timeout_s=0.3))


# -- Supervisor.broadcast of a rotation change -------------------------------------------


def frames_of(h: WorkerHandle) -> list[Any]:
    return [wl.decode(c.args[0]) for c in h.chan.send.call_args_list]  # type: ignore[union-attr]


def test_a_push_reaches_each_live_worker_once_and_retiring_ones_only_take_backends_out(
) -> None:
    s = sup.Supervisor(2, dict, lambda h: [], lambda h, m: None)
    new, both, gone, retiring = (WorkerHandle(i, 2) for i in range(4))
    for h in (new, both, gone, retiring):
        h.chan = mock.Mock()
        h.snap_sent(4, push=False)
    gone.stopped.set()  # in its restart backoff
    s.slots = {0: new, 1: both}
    s.retiring = {both, retiring, gone}  # ``both``: retired, its slot not replaced yet
    msg = wl.Snap(5, {"web": wl.PoolSnap(False, {"a": (False, 1.0), "b": (True, 2.0)})}, 4)
    s.broadcast(msg)
    assert frames_of(new) == [msg] and frames_of(both) == [msg]  # once, whole
    assert frames_of(gone) == []
    (r,) = frames_of(retiring)
    assert r == wl.Snap(5, {"web": wl.PoolSnap(False, {"a": (False, 1.0)})}, 4)
    assert [h.snap_max for h in (new, both, retiring, gone)] == [5, 5, 5, 4]
    assert [w.pid for w in s.retiring_status()] == [None]  # ``retiring`` alone


def test_the_time_is_the_workers_own_when_it_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker says when it applied (one monotonic clock): the control loop's delay in
    reading the answer is not the worker's; a time outside send..now is clamped."""
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    delays = Lateness()
    h = started(clock, delays)
    for ver, at in ((2, 100.004), (3, 99.0), (4, 500.0)):
        h.snap_sent(ver)
        assert h.snap_applied(ver, clock.t + 0.3, delays, at=at)  # read 300 ms later
    assert delays.count == 3
    assert abs(delays.sum_s - (0.004 + 0.0 + 0.3)) < 1e-9
