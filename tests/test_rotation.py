"""Control-side rotation: health, admin states, ejection growth and budget, panic, slow start."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.rotation import AdminState, PoolRotation


def rot(n: int = 4, healthy: bool = True, **rules: float | int | str) -> PoolRotation:
    return PoolRotation.create(
        "web", [(f"b{i}", 1) for i in range(n)], initially_healthy=healthy, **rules
    )


def eligible(r: PoolRotation, now: float) -> set[str]:
    return {n for n, e in r.snapshot(now).entries.items() if e.eligible}


def test_health_moves_backends_in_and_out() -> None:
    r = rot(2, healthy=False)
    assert eligible(r, 0) == set()
    assert r.set_health("b0", True, 0)
    assert not r.set_health("b0", True, 0)
    assert eligible(r, 0) == {"b0"}


def test_draining_and_maintenance_are_out() -> None:
    r = rot(4)
    r.set_admin("b0", AdminState.DRAINING)
    r.set_admin("b1", AdminState.MAINTENANCE)
    assert eligible(r, 0) == {"b2", "b3"}
    r.set_admin("b0", AdminState.ENABLED)
    assert eligible(r, 0) == {"b0", "b2", "b3"}


def test_ejection_grows_and_is_capped() -> None:
    r = rot(4, eject_s=10, max_eject_s=25)
    first = r.eject("b0", "connect_failed", 0)
    assert first is not None and first.duration_s == 10
    assert r.eject("b0", "connect_failed", 5) is None  # already out
    assert eligible(r, 9.9) == {"b1", "b2", "b3"}
    assert "b0" in eligible(r, 10.1)
    second = r.eject("b0", "timeout", 11)
    third = r.eject("b0", "timeout", 40)
    assert second is not None and second.duration_s == 20
    assert third is not None and third.duration_s == 25
    # After max_eject_s without ejection the streak resets.
    fourth = r.eject("b0", "timeout", 40 + 25 + 26)
    assert fourth is not None and fourth.duration_s == 10


def test_ejected_backend_needs_health_to_come_back() -> None:
    r = rot(4, eject_s=1)
    r.eject("b0", "http_5xx", 0)
    r.set_health("b0", False, 0.5)
    assert "b0" not in eligible(r, 2)
    r.set_health("b0", True, 3)
    assert "b0" in eligible(r, 3)


def test_never_eject_more_than_max_percent() -> None:
    r = rot(4, max_eject_percent=50)
    assert r.eject("b0", "x", 0) and r.eject("b1", "x", 0)
    assert r.eject("b2", "x", 0) is None
    assert eligible(r, 0) == {"b2", "b3"}


def test_panic_spreads_over_all_enabled() -> None:
    r = rot(4, panic_percent=50, panic_mode="spread")
    for b in ("b0", "b1", "b2"):
        r.set_health(b, False, 0)
    snap = r.snapshot(0)
    assert snap.panic and snap.usable == 1
    assert eligible(r, 0) == {"b0", "b1", "b2", "b3"}
    r.set_admin("b0", AdminState.MAINTENANCE)
    assert "b0" not in eligible(r, 0)


def test_panic_fail_mode_answers_503() -> None:
    r = rot(4, panic_percent=50, panic_mode="fail")
    for b in ("b0", "b1", "b2"):
        r.set_health(b, False, 0)
    assert r.snapshot(0).panic and eligible(r, 0) == set()


def test_all_down_is_empty_even_in_spread_mode() -> None:
    r = rot(3, healthy=False, panic_mode="spread")
    assert eligible(r, 0) == set()


def test_drained_backends_do_not_cause_panic() -> None:
    r = rot(4, panic_percent=50)
    for b in ("b0", "b1", "b2"):
        r.set_admin(b, AdminState.MAINTENANCE)
    snap = r.snapshot(0)
    assert not snap.panic and eligible(r, 0) == {"b3"}


def test_slow_start_ramps_weight() -> None:
    r = rot(2, healthy=False, slow_start_s=10)
    r.set_health("b0", True, 100)
    w = [r.snapshot(100 + t).entries["b0"].weight for t in (0, 2.5, 5, 9.9, 10, 50)]
    assert w[0] == pytest.approx(0.05)
    assert w[1] == pytest.approx(0.25) and w[2] == pytest.approx(0.5)
    assert w[3] < 1 and w[4] == w[5] == 1
    nxt = r.next_change(100)
    assert nxt is not None and 100 < nxt <= 100.5 + 1e-9


def test_reconcile_keeps_state_of_unchanged() -> None:
    r = rot(3)
    r.set_admin("b0", AdminState.DRAINING)
    r.set_health("b1", False, 0)
    r.reconcile([("b0", 1), ("b1", 5), ("new", 1)], initially_healthy=False)
    assert r.records["b0"].admin is AdminState.DRAINING
    assert not r.records["b1"].healthy and r.records["b1"].weight == 5
    assert "b2" not in r.records and not r.records["new"].healthy


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["health", "admin", "eject"]),
            st.integers(0, 5),
            st.booleans(),
            st.floats(0, 100),
        ),
        max_size=60,
    )
)
def test_snapshot_invariants(ops: list[tuple[str, int, bool, float]]) -> None:
    r = rot(6, max_eject_percent=50, panic_percent=30)
    now = 0.0
    for kind, i, flag, dt in ops:
        now += dt
        name = f"b{i}"
        if kind == "health":
            r.set_health(name, flag, now)
        elif kind == "admin":
            r.set_admin(name, AdminState.ENABLED if flag else AdminState.MAINTENANCE)
        else:
            r.eject(name, "x", now)
        ejected = sum(1 for rec in r.records.values() if rec.ejected(now))
        assert ejected * 100 <= 50 * 6
        snap = r.snapshot(now)
        for n, e in snap.entries.items():
            rec = r.records[n]
            if rec.admin is not AdminState.ENABLED:
                assert not e.eligible
            if e.eligible:
                assert e.weight > 0
            if not snap.panic:
                assert e.eligible == rec.usable(now)
