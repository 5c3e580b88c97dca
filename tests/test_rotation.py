"""Control-side rotation: admin states, ejection growth and budget, panic, slow start.

The rotation keeps no health of its own: each test holds the checks' verdicts in a dict
(standing in for the health book) and passes them in, as ``lb.control.backends`` does.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.control.rotation import AdminState, OutReason, PoolRotation, Verdict

UP = Verdict(True)
DOWN = Verdict(False)


class Rot:
    """A rotation plus the verdicts it is shown."""

    def __init__(self, n: int = 4, healthy: bool = True, **rules: float | int | str) -> None:
        self.r = PoolRotation.create("web", [(f"b{i}", 1) for i in range(n)], **rules)
        self.v = {f"b{i}": UP if healthy else DOWN for i in range(n)}

    def set_health(self, name: str, up: bool, now: float) -> None:
        if self.v[name].up != up:
            self.v[name] = Verdict(True, now) if up else DOWN

    def snapshot(self, now: float):  # type: ignore[no-untyped-def]
        return self.r.snapshot(now, self.v)

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.r, name)


def rot(n: int = 4, healthy: bool = True, **rules: float | int | str) -> Rot:
    return Rot(n, healthy, **rules)


def eligible(r: Rot, now: float) -> set[str]:
    return {n for n, e in r.snapshot(now).entries.items() if e.eligible}


def test_health_moves_backends_in_and_out() -> None:
    r = rot(2, healthy=False)
    assert eligible(r, 0) == set()
    r.set_health("b0", True, 0)
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
    nxt = r.next_change(100, r.v)
    assert nxt is not None and 100 < nxt <= 100.5 + 1e-9


def test_reconcile_keeps_admin_and_ejection_of_unchanged() -> None:
    r = rot(3)
    r.set_admin("b0", AdminState.DRAINING)
    r.eject("b1", "x", 0)
    r.eject("b2", "x", 0)
    r.reconcile([("b0", 1), ("b1", 5), ("b2", 1), ("new", 1)], fresh={"b2"})
    assert r.records["b0"].admin is AdminState.DRAINING
    assert r.records["b1"].ejected(1) and r.records["b1"].weight == 5
    assert not r.records["b2"].ejected(1)  # another server now: starts over
    assert "new" in r.records and not r.records["new"].ejected(0)


def test_end_ejection_keeps_the_streak() -> None:
    r = rot(4, eject_s=10)
    r.eject("b0", "x", 0)
    assert r.end_ejection("b0", 2)
    assert not r.end_ejection("b0", 3)
    assert "b0" in eligible(r, 2)
    again = r.eject("b0", "x", 5)
    assert again is not None and again.duration_s == 20


def test_explain_names_every_reason() -> None:
    r = rot(5, slow_start_s=10, panic_percent=0)
    r.set_health("b0", False, 0)
    r.set_admin("b1", AdminState.DRAINING)
    r.eject("b2", "x", 0)
    r.set_health("b3", False, 0)
    r.set_health("b3", True, 100)
    snap = r.snapshot(101)
    why = {n: r.explain(n, 101, r.v[n], snap) for n in r.records}
    assert why["b0"] == [OutReason.HEALTH]
    assert why["b1"] == [OutReason.ADMIN]
    assert why["b2"] == []  # ejection over at t=10
    assert why["b3"] == [OutReason.SLOW_START]
    assert why["b4"] == []
    snap = r.snapshot(5)
    assert r.explain("b2", 5, r.v["b2"], snap) == [OutReason.EJECTED]


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
                assert e.eligible == rec.usable(now, r.v[n])
            if not e.eligible:
                assert r.explain(n, now, r.v[n], snap), "out of rotation without a reason"


def test_panic_is_named_where_it_overrides_the_verdict() -> None:
    r = rot(4, panic_percent=50, panic_mode="spread")
    for b in ("b0", "b1", "b2"):
        r.set_health(b, False, 0)
    snap = r.snapshot(0)
    assert snap.panic and snap.entries["b0"].eligible
    assert r.explain("b0", 0, r.v["b0"], snap) == [OutReason.HEALTH, OutReason.PANIC]
    assert r.explain("b3", 0, r.v["b3"], snap) == []
    f = rot(4, panic_percent=50, panic_mode="fail")
    for b in ("b0", "b1", "b2"):
        f.set_health(b, False, 0)
    snap = f.snapshot(0)
    assert f.explain("b3", 0, f.v["b3"], snap) == [OutReason.PANIC]
