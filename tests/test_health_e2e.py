"""Issue 3 with real processes: the scenarios of lab.health_scenarios (real backends, a real
``pairlb run`` with 2 workers, steady clients, one backend broken the way production does),
each asserting that every promise held. bench/health.py reruns them with more load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lab.health_scenarios import (
    Knobs,
    Outcome,
    scenario_all_down,
    scenario_drain,
    scenario_hang,
    scenario_health_500,
    scenario_kill,
    scenario_reload,
    scenario_reload_check_change,
    scenario_restart_ends_ejection,
    scenario_traffic_503,
)

pytestmark = pytest.mark.slow


# -- tests -------------------------------------------------------------------------------------


def _run(scenario: Callable[..., Any], tmp_path: Path, **kw: Any) -> Outcome:
    out: Outcome = asyncio.run(scenario(tmp_path, Knobs(), **kw))
    print(out.row())
    return out


@pytest.mark.timeout(60)
def test_kill_9_costs_no_client_an_error_and_comes_back_ramped(tmp_path: Path) -> None:
    out = _run(scenario_kill, tmp_path)
    assert not out.problems, out.explain()


@pytest.mark.timeout(60)
def test_kill_9_never_delivers_a_post_twice(tmp_path: Path) -> None:
    out = _run(scenario_kill, tmp_path, posts=True)
    assert not out.problems, out.explain()


@pytest.mark.timeout(60)
def test_hung_backend_is_ejected_and_gets_requests_retried(tmp_path: Path) -> None:
    out = _run(scenario_hang, tmp_path)
    assert not out.problems, out.explain()


@pytest.mark.timeout(60)
def test_failing_health_check_drains_backend(tmp_path: Path) -> None:
    out = _run(scenario_health_500, tmp_path)
    assert not out.problems, out.explain()


@pytest.mark.timeout(60)
def test_backend_failing_traffic_is_ejected_passively(tmp_path: Path) -> None:
    out = _run(scenario_traffic_503, tmp_path)
    assert not out.problems, out.explain()


@pytest.mark.timeout(60)
def test_drain_finishes_in_flight_and_sends_nothing_new(tmp_path: Path) -> None:
    out = _run(scenario_drain, tmp_path)
    assert not out.problems, out.explain()


@pytest.mark.timeout(60)
def test_all_backends_down_answers_503_at_once_and_recovers(tmp_path: Path) -> None:
    out = _run(scenario_all_down, tmp_path)
    assert not out.problems, out.explain()


@pytest.mark.timeout(60)
def test_reload_keeps_health_state_of_unchanged_backends(tmp_path: Path) -> None:
    out = _run(scenario_reload, tmp_path)
    assert not out.problems, out.explain()


@pytest.mark.timeout(60)
def test_reload_changing_checks_follows_the_new_checks(tmp_path: Path) -> None:
    out = _run(scenario_reload_check_change, tmp_path)
    assert not out.problems, out.explain()


@pytest.mark.timeout(60)
def test_passing_checks_end_an_ejection_early(tmp_path: Path) -> None:
    out = _run(scenario_restart_ends_ejection, tmp_path)
    assert not out.problems, out.explain()


