"""Worker-side balancing: proportions, eligibility, in-flight accounting, local ejection."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lb
from lb.data.pool import Backend, BackendEntry, Outcome, Pool, build_pool


def make(balance: str = "round_robin", weights: tuple[float, ...] = (1, 2, 1), **kw: int):
    return build_pool(
        "web", balance, [(f"b{i}", "127.0.0.1", 9000 + i, w) for i, w in enumerate(weights)], **kw
    )


def test_smooth_round_robin_is_exact_and_interleaved() -> None:
    pool = make(weights=(1, 2, 1))
    order = []
    for _ in range(8):
        b = pool.pick(0.0)
        assert b is not None
        order.append(b.name)
        pool.release(b)
    assert Counter(order) == {"b0": 2, "b1": 4, "b2": 2}
    # Smooth: the heavy backend never gets two in a row within a cycle of 4.
    assert order[:4].count("b1") == 2 and "b1b1" not in "".join(order[:4])


@given(st.lists(st.integers(min_value=1, max_value=10), min_size=1, max_size=8))
def test_round_robin_proportional_to_weight(weights: list[int]) -> None:
    pool = make(weights=tuple(float(w) for w in weights))
    total = sum(weights)
    seen: Counter[str] = Counter()
    for _ in range(total * 3):
        b = pool.pick(0.0)
        assert b is not None
        seen[b.name] += 1
        pool.release(b)
    assert seen == {f"b{i}": 3 * w for i, w in enumerate(weights)}


def test_ineligible_and_zero_weight_get_nothing() -> None:
    pool = make(weights=(1, 1, 1))
    pool.apply(
        1,
        {
            "b0": BackendEntry(True, 1.0),
            "b1": BackendEntry(False, 0.0),
            "b2": BackendEntry(True, 0.0),
        },
        False,
    )
    names = {pool.pick(0.0).name for _ in range(10)}  # type: ignore[union-attr]
    assert names == {"b0"}


def test_missing_from_snapshot_means_out() -> None:
    pool = make(weights=(1, 1))
    pool.apply(1, {"b1": BackendEntry(True, 1.0)}, False)
    assert {pool.pick(0.0).name for _ in range(4)} == {"b1"}  # type: ignore[union-attr]


def test_old_snapshot_is_ignored() -> None:
    pool = make(weights=(1, 1))
    pool.apply(5, {"b0": BackendEntry(True, 1.0), "b1": BackendEntry(True, 1.0)}, False)
    pool.apply(4, {"b0": BackendEntry(False, 1.0)}, False)
    assert pool.get("b0").eligible  # type: ignore[union-attr]


def test_nothing_eligible_returns_none() -> None:
    pool = make(weights=(1,))
    pool.apply(1, {"b0": BackendEntry(False, 1.0)}, False)
    assert pool.pick(0.0) is None


def test_exclude_for_retries() -> None:
    pool = make(weights=(1, 1, 1))
    first = pool.pick(0.0)
    assert first is not None
    second = pool.pick(0.0, exclude=[first])
    assert second is not None and second is not first
    third = pool.pick(0.0, exclude=[first, second])
    assert third is not None and third not in (first, second)
    assert pool.pick(0.0, exclude=[first, second, third]) is None


def test_least_connections_prefers_idle() -> None:
    pool = make("least_connections", weights=(1, 1, 1))
    held = [pool.pick(0.0) for _ in range(3)]
    assert {b.name for b in held if b} == {"b0", "b1", "b2"}
    b0 = pool.get("b0")
    assert b0 is not None
    pool.release(b0)
    assert pool.pick(0.0) is b0


def test_least_connections_respects_weight() -> None:
    pool = make("least_connections", weights=(1, 3))
    for _ in range(8):
        pool.pick(0.0)
    b0, b1 = pool.get("b0"), pool.get("b1")
    assert b0 is not None and b1 is not None
    assert (b0.in_flight, b1.in_flight) == (2, 6)


def test_random_two_balances_load() -> None:
    pool = make("random_two", weights=(1, 1, 1, 1), seed=7)  # type: ignore[arg-type]
    for _ in range(400):
        pool.pick(0.0)
    loads = [b.in_flight for b in pool.backends]
    assert max(loads) - min(loads) <= 2


def test_local_ejection_after_consecutive_failures() -> None:
    pool = make(weights=(1, 1, 1, 1), consecutive_failures=3)
    b0 = pool.get("b0")
    assert b0 is not None
    assert pool.observe(b0, Outcome.CONNECT_FAILED, 0.0) is None
    assert pool.observe(b0, Outcome.OK, 0.0) is None  # a success resets the streak
    assert pool.observe(b0, Outcome.TIMEOUT, 0.0) is None
    assert pool.observe(b0, Outcome.HTTP_5XX, 0.0) is None
    ej = pool.observe(b0, Outcome.CONNECT_FAILED, 0.0)
    assert ej is not None and ej.backend == "b0"
    assert all(pool.pick(0.1).name != "b0" for _ in range(6))  # type: ignore[union-attr]
    # The local ejection lapses, and a snapshot clears it at once.
    pool.apply(1, {b.name: BackendEntry(True, 1.0) for b in pool.backends}, False)
    assert b0.usable(0.2)


def test_local_ejection_respects_max_percent() -> None:
    pool = make(weights=(1, 1), consecutive_failures=1, max_eject_percent=50)
    b0, b1 = pool.backends
    assert pool.observe(b0, Outcome.CONNECT_FAILED, 0.0) is not None
    assert pool.observe(b1, Outcome.CONNECT_FAILED, 0.0) is None
    assert b1.usable(0.0)


# -- properties of the O(log N) structures (hypothesis) --------------------------------------
#
# Integer weights and dyadic fractions of them (slow start) keep float ratios exact, so the
# oracles below can compare in-flight per weight with Fractions.

MODES = ("round_robin", "least_connections", "random_two")
WEIGHT = st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0])


def _load(b: Backend) -> Fraction:
    return Fraction(b.in_flight) / Fraction(b.weight)


def _reference_may_eject(pool: Pool) -> bool:
    """The ejection budget as a scan of every backend (what the pool counts incrementally)."""
    ejected = sum(1 for b in pool.backends if b.ejected_until > 0 and b.eligible)
    return (ejected + 1) * 100 <= pool.max_eject_percent * len(pool.backends)


@settings(max_examples=150, deadline=None)
@given(mode=st.sampled_from(MODES), n=st.integers(1, 12), data=st.data())
def test_random_operations_keep_every_promise(mode: str, n: int, data: st.DataObject) -> None:
    """Snapshots, local ejections, time, picks with and without retries' exclusions, releases,
    backends added and removed at runtime, snapshot deltas: a pick is always usable, in the
    pool and never
    excluded, None only when nothing is, least connections
    picks exactly a least-loaded backend, and the ejection budget matches a full scan."""
    weights = data.draw(st.lists(WEIGHT, min_size=n, max_size=n))
    pool = build_pool(
        "web", mode, [(f"b{i}", "127.0.0.1", 9000 + i, w) for i, w in enumerate(weights)],
        consecutive_failures=2, local_eject_s=1.0, max_eject_percent=60, seed=3,
    )
    now, version, added = 0.0, 0, 0
    held: list[Backend] = []
    removed: list[Backend] = []
    for _ in range(data.draw(st.integers(20, 120))):
        op = data.draw(st.sampled_from(["pick", "pick", "pick", "retry", "release", "release",
                                        "fail", "ok", "snapshot", "time", "add", "remove",
                                        "delta", "delta"]))
        if op == "delta":
            version += 1
            entries = {
                b.name: BackendEntry(data.draw(st.booleans()), data.draw(WEIGHT))
                for b in pool.backends if data.draw(st.integers(0, 3)) == 0  # a few change
            }
            pool.apply_delta(version, entries, False)
            for b in pool.backends:
                if b.name in entries:
                    assert b.ejected_until == 0  # the control process's verdict wins
                    assert (b._where == 1) == (b.eligible and b.weight > 0)  # _IN
            assert pool._live == sum(1 for b in pool.backends if b._where == 1)
            continue
        if op == "add":
            added += 1
            b = Backend("web", f"new{added}", "127.0.0.1", 9500 + added, data.draw(WEIGHT))
            assert pool.add_backend(b)
            assert not pool.add_backend(Backend("web", b.name, "127.0.0.1", 1))
            assert not b.usable(now)  # out until a snapshot says otherwise
            continue
        if op == "remove":
            if pool.backends:
                b = data.draw(st.sampled_from(pool.backends))
                flying = b.in_flight
                assert pool.remove_backend(b.name) is b
                assert b.in_flight == flying and pool.get(b.name) is None
                removed.append(b)
            continue
        if not pool.backends and op in ("fail", "ok"):
            continue
        if op in ("pick", "retry"):
            exclude: list[Backend] = []
            if op == "retry" and pool.backends:
                exclude = data.draw(st.lists(st.sampled_from(pool.backends), max_size=n,
                                             unique_by=id))
            usable = [b for b in pool.backends if b.usable(now) and b not in exclude]
            best = min((_load(b) for b in usable), default=None)
            b = pool.pick(now, exclude)
            if not usable:
                assert b is None
                continue
            assert b is not None and b.usable(now) and b not in exclude
            assert b in pool.backends and b not in removed
            b.in_flight -= 1  # compare the load it was picked at
            if mode == "least_connections":
                assert _load(b) == best, (b.name, _load(b), best)
            b.in_flight += 1
            held.append(b)
        elif op == "release" and held:
            pool.release(held.pop(data.draw(st.integers(0, len(held) - 1))))
        elif op in ("fail", "ok"):
            b = data.draw(st.sampled_from(pool.backends))
            outcome = Outcome.CONNECT_FAILED if op == "fail" else Outcome.OK
            will_cross = (op == "fail" and b.failures_in_row + 1 >= pool.consecutive_failures
                          and b.ejected_until <= now)
            allowed = _reference_may_eject(pool)
            ej = pool.observe(b, outcome, now)
            assert (ej is not None) == (will_cross and allowed)
            if ej is not None:
                assert not b.usable(now)
        elif op == "snapshot":
            version += 1
            entries = {
                b.name: BackendEntry(data.draw(st.booleans()), data.draw(WEIGHT))
                for b in pool.backends if data.draw(st.integers(0, 5)) > 0  # some left out
            }
            pool.apply(version, entries, False)
            assert not any(b.ejected_until and b.eligible for b in pool.backends)
        elif op == "time":
            now += data.draw(st.sampled_from([0.1, 0.5, 1.0, 2.0]))
    if mode == "least_connections":
        assert len(pool._heap) <= 2 * len(pool.backends) + 64  # compacted, bounded


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=1, max_size=10), st.data())
def test_round_robin_cycle_is_exact_after_first_snapshot(weights: list[int], data: st.DataObject
                                                        ) -> None:
    """From a fresh pool, with integer weights, every cycle of sum(weights) consecutive picks
    gives each backend in rotation exactly its weight (the others nothing)."""
    pool = build_pool("web", "round_robin",
                      [(f"b{i}", "127.0.0.1", 9000 + i, 1.0) for i in range(len(weights))],
                      eligible=False)
    inside = data.draw(st.lists(st.booleans(), min_size=len(weights), max_size=len(weights)))
    pool.apply(1, {f"b{i}": BackendEntry(inside[i], float(w)) for i, w in enumerate(weights)},
               False)
    want = {f"b{i}": w for i, w in enumerate(weights) if inside[i]}
    total = sum(want.values())
    if not total:
        assert pool.pick(0.0) is None
        return
    for _ in range(3):
        seen = Counter(pool.pick(0.0).name for _ in range(total))  # type: ignore[union-attr]
        assert seen == want


@settings(max_examples=100, deadline=None)
@given(st.lists(WEIGHT, min_size=2, max_size=10), st.data())
def test_round_robin_share_and_spread_after_changes(weights: list[float], data: st.DataObject
                                                   ) -> None:
    """After any history of snapshots, whole or deltas (weights changed, backends in and
    out: everyone keeps its place), while the rotation stays the same: over any M picks
    each backend gets its weight's share within 1 + n*w/W, and never more than 1 + w/w'
    picks in a row (w' the heaviest other backend): no bursts."""
    n = len(weights)
    pool = build_pool("web", "round_robin",
                      [(f"b{i}", "127.0.0.1", 9000 + i, w) for i, w in enumerate(weights)])
    for v in range(1, data.draw(st.integers(1, 4)) + 1):
        for _ in range(data.draw(st.integers(0, 25))):
            pool.pick(0.0)
        entries = {b.name: BackendEntry(data.draw(st.integers(0, 3)) > 0, data.draw(WEIGHT))
                   for b in pool.backends}
        if data.draw(st.booleans(), label="as a delta"):  # only some entries change
            pool.apply_delta(v, {k: e for k, e in entries.items() if data.draw(st.booleans())},
                             False)
        else:
            pool.apply(v, entries, False)
    live = {b.name: b.weight for b in pool.backends if b.usable(0.0)}
    if not live:
        assert pool.pick(0.0) is None
        return
    total_w = sum(live.values())
    m = data.draw(st.integers(1, 200))
    order = [pool.pick(0.0).name for _ in range(m)]  # type: ignore[union-attr]
    seen = Counter(order)
    for name, w in live.items():
        assert abs(seen[name] - w * m / total_w) <= 1 + len(live) * w / total_w + 1e-9
    for name, w in live.items():
        others = [x for k, x in live.items() if k != name]
        if not others:
            continue
        run = longest = 0
        for x in order:
            run = run + 1 if x == name else 0
            longest = max(longest, run)
        assert longest <= 1 + w / max(others), (name, longest, live)
    assert n == len(pool.backends)


@pytest.mark.parametrize("mode", MODES)
def test_local_ejection_ends_by_itself(mode: str) -> None:
    """A locally ejected backend comes back when its ejection ends, without a snapshot."""
    pool = make(mode, weights=(1, 1, 1), consecutive_failures=1, max_eject_percent=50,
                local_eject_s=1.0, seed=5)  # type: ignore[arg-type]
    b0 = pool.get("b0")
    assert b0 is not None and pool.observe(b0, Outcome.RESET, 0.0) is not None
    picked = []
    for _ in range(30):
        b = pool.pick(0.5)
        assert b is not None
        picked.append(b)
        pool.release(b)
    assert b0 not in picked
    back = []
    for _ in range(30):
        b = pool.pick(1.0)
        assert b is not None
        back.append(b)
        pool.release(b)
    assert b0 in back


class _CountingList(list):  # type: ignore[type-arg]
    scans = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        _CountingList.scans += 1
        return super().__iter__()


@pytest.mark.parametrize("mode", MODES)
def test_hot_path_never_scans_the_pool(mode: str) -> None:
    """Picks, retries (picks excluding the backends tried), releases, failures, a local
    ejection and its end never walk the pool's backend list (the old code did on every pick):
    only a snapshot does (O(N) per snapshot, never per request). Pure path only: compiled
    code walks a list without its __iter__ (tests/test_compiled.py runs this file pure)."""
    if lb.compiled_in_use() and "lb.data.pool" in lb.COMPILED:
        pytest.skip("compiled: a list subclass's __iter__ is not called (run pure)")
    pool = build_pool("web", mode, [(f"b{i}", "127.0.0.1", 1, 1.0 + i % 3) for i in range(500)],
                      consecutive_failures=2, local_eject_s=1.0, seed=1)
    pool.backends = _CountingList(pool.backends)
    _CountingList.scans = 0
    for i in range(2000):
        now = i * 0.01
        b = pool.pick(now)
        assert b is not None
        c = pool.pick(now, [b])
        assert c is not None and c is not b
        pool.observe(c, Outcome.CONNECT_FAILED if i % 7 == 0 else Outcome.OK, now)
        pool.release(b)
        pool.release(c)
    assert _CountingList.scans == 0
    pool.apply(1, {b.name: BackendEntry(True, 2.0) for b in pool.backends[:5]}, False)
    assert _CountingList.scans >= 1
