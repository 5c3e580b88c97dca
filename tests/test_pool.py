"""Worker-side balancing: proportions, eligibility, in-flight accounting, local ejection."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from lb.pool import BackendEntry, Outcome, build_pool


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
