"""Ring 1: the rise/fall health counter (tables + properties) and check-result labels."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import healthcheck
from healthcheck import (
    CheckResult,
    CheckStatus,
    Health,
    HealthConfigError,
    HealthCounter,
    Transition,
)

UP, DOWN = Health.UP, Health.DOWN
P, F = True, False


def run_seq(c: HealthCounter, seq: list[bool]) -> tuple[HealthCounter, list[Transition]]:
    seen = []
    for ok in seq:
        c, t = c.step(ok)
        if t is not None:
            seen.append(t)
    return c, seen


def test_result_ok_only_for_passing_labels() -> None:
    passing = {s for s in CheckStatus if CheckResult(s, 0.0).ok}
    assert passing == {CheckStatus.L4_OK, CheckStatus.L7_OK}
    assert str(CheckStatus.L7_STATUS) == "L7_STATUS"  # StrEnum: usable as a metric label


@pytest.mark.parametrize(
    ("initial", "rise", "fall", "health", "state"),
    [
        ("down", 2, 3, 1, DOWN),  # one pass away from UP
        ("down", 1, 3, 0, DOWN),
        ("up", 2, 3, 2, UP),  # one failure away from DOWN
        ("up", 5, 1, 5, UP),
    ],
)
def test_initial_state(initial: str, rise: int, fall: int, health: int, state: Health) -> None:
    c = HealthCounter.initial(rise, fall, initial)  # type: ignore[arg-type]
    assert (c.health, c.state) == (health, state)


def test_new_backend_needs_exactly_one_pass_by_default() -> None:
    c = HealthCounter.initial(rise=3, fall=2)
    assert c.state is DOWN
    c, t = c.step(P)
    assert t == Transition(DOWN, UP)
    assert c.health == c.top  # snapped to fully UP


def test_initial_up_leaves_on_first_failure() -> None:
    c, t = HealthCounter.initial(2, 3, "up").step(F)
    assert (t, c.state) == (Transition(UP, DOWN), DOWN)


# (rise, fall, start health, results, end health, transitions)
TABLE = [
    # rise=2 fall=3: health 0..4, UP at >=2
    (2, 3, 4, [F, F], 2, []),  # going down but still UP
    (2, 3, 4, [F, F, F], 0, [(UP, DOWN)]),  # fall failures from full UP
    (2, 3, 0, [P], 1, []),
    (2, 3, 0, [P, P], 4, [(DOWN, UP)]),  # rise passes from full DOWN, snap to top
    (2, 3, 4, [P, P], 4, []),  # capped
    (2, 3, 0, [F, F], 0, []),  # floored
    (2, 3, 3, [P], 4, []),  # UP and recovering, no transition
    (2, 3, 4, [F, F, P, F, F], 0, [(UP, DOWN)]),  # a pass in between only delays it
    (2, 3, 1, [F, P, P], 4, [(DOWN, UP)]),
    (1, 1, 1, [F], 0, [(UP, DOWN)]),  # rise=fall=1: every result decides
    (1, 1, 0, [P], 1, [(DOWN, UP)]),
    (1, 1, 1, [F, P, F], 0, [(UP, DOWN), (DOWN, UP), (UP, DOWN)]),
    # just went DOWN from the threshold: one pass does not bring it back (hysteresis)
    (2, 3, 2, [F, P], 1, [(UP, DOWN)]),
]


@pytest.mark.parametrize(("rise", "fall", "start", "seq", "end", "transitions"), TABLE)
def test_table(
    rise: int,
    fall: int,
    start: int,
    seq: list[bool],
    end: int,
    transitions: list[tuple[Health, Health]],
) -> None:
    c, seen = run_seq(HealthCounter(rise, fall, start), seq)
    assert c.health == end
    assert [(t.old, t.new) for t in seen] == transitions


@pytest.mark.parametrize(
    ("health", "changing"), [(0, False), (1, True), (2, True), (3, True), (4, False)]
)
def test_changing_is_strictly_between_extremes(health: int, changing: bool) -> None:
    assert HealthCounter(2, 3, health).changing is changing


@pytest.mark.parametrize(
    ("args", "field"),
    [((0, 3, 0), "rise"), ((2, 0, 0), "fall"), ((2, 3, 5), "health"), ((2, 3, -1), "health")],
)
def test_invalid_counter_names_field(args: tuple[int, int, int], field: str) -> None:
    with pytest.raises(HealthConfigError) as err:
        HealthCounter(*args)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")


def test_invalid_initial() -> None:
    with pytest.raises(HealthConfigError, match="initial"):
        HealthCounter.initial(2, 3, "maybe")  # type: ignore[arg-type]


rise_fall = st.tuples(st.integers(1, 10), st.integers(1, 10))


@st.composite
def counters(draw: st.DrawFn) -> HealthCounter:
    rise, fall = draw(rise_fall)
    return HealthCounter(rise, fall, draw(st.integers(0, rise + fall - 1)))


@given(counters(), st.lists(st.booleans(), max_size=60))
def test_counter_stays_in_bounds_and_state_matches_threshold(
    c: HealthCounter, seq: list[bool]
) -> None:
    for ok in seq:
        before = c.state
        c, t = c.step(ok)
        assert 0 <= c.health <= c.top
        assert c.state is (UP if c.health >= c.rise else DOWN)
        # a transition is reported exactly when the state changed, and in the right direction
        assert (t is not None) == (c.state is not before)
        if t is not None:
            assert (t.old, t.new) == (before, c.state)
            assert t.new is (UP if ok else DOWN)


@given(counters())
def test_fall_failures_always_mean_down(c: HealthCounter) -> None:
    c, _ = run_seq(c, [F] * c.fall)
    assert c.state is DOWN


@given(counters())
def test_rise_passes_always_mean_up(c: HealthCounter) -> None:
    c, _ = run_seq(c, [P] * c.rise)
    assert c.state is UP


@given(rise_fall)
def test_from_full_up_fall_minus_one_failures_keep_it_up(rf: tuple[int, int]) -> None:
    c = HealthCounter(rf[0], rf[1], rf[0] + rf[1] - 1)
    c, seen = run_seq(c, [F] * (c.fall - 1))
    assert (c.state, seen) == (UP, [])


@given(rise_fall)
def test_from_full_down_rise_minus_one_passes_keep_it_down(rf: tuple[int, int]) -> None:
    c, seen = run_seq(HealthCounter(rf[0], rf[1], 0), [P] * (rf[0] - 1))
    assert (c.state, seen) == (DOWN, [])


@given(st.integers(1, 10), st.integers(2, 10), st.booleans(), st.integers(1, 100))
def test_alternating_results_from_full_up_never_flap(
    rise: int, fall: int, fail_first: bool, n: int
) -> None:
    c = HealthCounter(rise, fall, rise + fall - 1)
    seq = [(i % 2 == 1) == fail_first for i in range(n)]
    c, seen = run_seq(c, seq)
    assert seen == []
    assert c.state is UP


@given(st.integers(2, 10), st.integers(1, 10), st.integers(1, 100))
def test_alternating_results_from_full_down_never_flap(rise: int, fall: int, n: int) -> None:
    c, seen = run_seq(HealthCounter(rise, fall, 0), [i % 2 == 0 for i in range(n)])
    assert seen == []
    assert c.state is DOWN


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_healthcheck_imports_neither_lb_nor_failover_and_state_is_pure() -> None:
    package = Path(healthcheck.__file__).parent
    for path in package.glob("*.py"):
        assert not _imported_modules(path) & {"lb", "failover"}, path.name
    assert not _imported_modules(package / "state.py") & {"asyncio", "socket", "time", "logging"}
