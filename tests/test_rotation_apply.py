"""The supervisor's book of which rotation snapshot each worker applied
(lb.control.supervisor.WorkerHandle): the lag it reports and the propagation times it
records, for any order of pushes and answers."""

from __future__ import annotations

import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from healthcheck import Lateness
from lb.control.supervisor import WorkerHandle


def test_the_welcome_snapshot_shows_as_lag_but_is_no_propagation_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    h, delays = WorkerHandle(0, 1), Lateness()
    assert h.rotation_lag_s(clock[0]) == 0.0
    h.snap_sent(1, push=False)  # the welcome: the process is still starting
    clock[0] = 100.8
    h.snap_sent(2)
    clock[0] = 101.0
    assert h.rotation_lag_s(clock[0]) == 1.0  # since the oldest not applied
    h.snap_applied(1, clock[0], delays)
    assert (h.snap_ver, delays.count) == (1, 0)
    assert abs(h.rotation_lag_s(clock[0]) - 0.2) < 1e-9
    h.snap_sent(3)
    clock[0] = 101.05
    h.snap_applied(3, clock[0], delays)  # 2 and 3 at once: two pushes applied
    assert (h.snap_ver, delays.count, h.rotation_lag_s(clock[0])) == (3, 2, 0.0)
    assert abs(delays.max_s - 0.25) < 1e-9


@given(st.lists(st.tuples(st.booleans(), st.floats(0, 2)), max_size=60))
def test_lag_is_the_age_of_the_oldest_push_not_applied(steps: list[tuple[bool, float]]) -> None:
    """Any interleaving: a push (a new version) or the worker applying the newest it has
    (its answers come in order), ``dt`` apart."""
    h, delays = WorkerHandle(0, 1), Lateness()
    now, ver = 0.0, 0
    pending: list[tuple[int, float]] = []
    pushes_applied = 0
    for push, dt in steps:
        now += dt
        if push:
            ver += 1
            h.snaps_sent.append((ver, now, True))  # snap_sent at ``now``
            pending.append((ver, now))
        elif pending:
            top = pending[-1][0]
            h.snap_applied(top, now, delays)
            pushes_applied += len(pending)
            pending.clear()
            assert h.snap_ver == top
        want = now - pending[0][1] if pending else 0.0
        assert h.rotation_lag_s(now) == want
        assert delays.count == pushes_applied
