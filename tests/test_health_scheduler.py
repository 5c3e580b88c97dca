"""Ring 4: the check scheduler against real aiohttp backends on 127.0.0.1.

Timings are small (tens of ms) so the file runs in a few seconds; bounds are the documented
worst case plus a slack for a loaded CI machine.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field

import pytest
from health_helpers import LOOPBACK, FlipApp, aiohttp_server, raw_server, run, wait_for

from healthcheck import (
    CheckResult,
    CheckSpec,
    CheckStatus,
    Health,
    HealthChecker,
    HealthConfigError,
    HealthCounter,
    Target,
    TargetKey,
)

pytestmark = pytest.mark.timeout(60)

SLACK_S = 0.15  # scheduling noise allowed on a busy 2-core CI box
UP, DOWN = Health.UP, Health.DOWN


@dataclass
class Recorder:
    """Collects callbacks with their monotonic time."""

    results: list[tuple[float, TargetKey, CheckResult, HealthCounter]] = field(default_factory=list)
    transitions: list[tuple[float, TargetKey, Health, Health, CheckResult]] = field(
        default_factory=list
    )

    def on_result(self, key: TargetKey, result: CheckResult, counter: HealthCounter) -> None:
        self.results.append((time.monotonic(), key, result, counter))

    def on_transition(self, key: TargetKey, old: Health, new: Health, result: CheckResult) -> None:
        self.transitions.append((time.monotonic(), key, old, new, result))

    def checker(self) -> HealthChecker:
        return HealthChecker(on_result=self.on_result, on_transition=self.on_transition)

    def results_for(self, key: TargetKey, since: float = 0.0) -> list[CheckResult]:
        return [r for t, k, r, _ in self.results if k == key and t >= since]

    def transitions_for(self, key: TargetKey, since: float = 0.0) -> list[tuple[Health, Health]]:
        return [(o, n) for t, k, o, n, _ in self.transitions if k == key and t >= since]


def in_flight_dropped(results: list[CheckResult], now_seen: CheckStatus) -> list[CheckResult]:
    """Results since the backend changed, without the one probe that was in flight at the
    change: it ends after it but may report what it saw before (at most one can)."""
    if results and results[0].status is not now_seen:
        return results[1:]
    return results


FAST = CheckSpec(
    interval_s=0.1,
    fast_interval_s=0.05,
    down_interval_s=0.2,
    timeout_s=0.05,
    rise=2,
    fall=3,
    jitter=0.1,
)
KEY: TargetKey = ("web", "a")


def test_backend_goes_down_after_fall_failures_and_up_after_rise_passes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = FAST
    rec = Recorder()
    backend = FlipApp()
    timings: dict[str, float] = {}

    async def body() -> None:
        async with aiohttp_server(backend.app) as port, rec.checker() as hc:
            hc.set_targets([Target(KEY, LOOPBACK, port, spec)])
            # default initial state: DOWN, no traffic before the first passing check
            first = hc.state(KEY)
            assert first is not None and first.health is DOWN and first.last_result is None
            assert await wait_for(lambda: rec.transitions_for(KEY) == [(DOWN, UP)], 1.0)
            assert len(rec.results_for(KEY)) == 1  # ONE pass brings a new backend up
            # stable UP: checks at interval_s
            await asyncio.sleep(0.5)
            backend.healthy = False
            t0 = time.monotonic()
            assert await wait_for(lambda: len(rec.transitions_for(KEY)) == 2, 2.0)
            t_down = rec.transitions[-1][0]
            timings["down_s"] = t_down - t0
            failing = in_flight_dropped(rec.results_for(KEY, since=t0), CheckStatus.L7_STATUS)
            assert [r.status for r in failing] == [CheckStatus.L7_STATUS] * spec.fall
            assert rec.transitions[-1][4].code == 503
            # stable DOWN: slower checks at down_interval_s
            await asyncio.sleep(0.7)
            backend.healthy = True
            t1 = time.monotonic()
            assert await wait_for(lambda: len(rec.transitions_for(KEY)) == 3, 2.0)
            timings["up_s"] = rec.transitions[-1][0] - t1
            passing = in_flight_dropped(rec.results_for(KEY, since=t1), CheckStatus.L7_OK)
            assert [r.status for r in passing] == [CheckStatus.L7_OK] * spec.rise
            state = hc.state(KEY)
            assert state is not None and state.health is UP and state.last_result == passing[-1]
            timings["t0"], timings["t_down"], timings["t1"] = t0, t_down, t1

    with caplog.at_level(logging.INFO, logger="healthcheck"):
        run(body())

    assert rec.transitions_for(KEY) == [(DOWN, UP), (UP, DOWN), (DOWN, UP)]
    j = 1 + spec.jitter
    assert spec.fast_interval_s is not None and spec.down_interval_s is not None
    worst_down = spec.interval_s * j + (spec.fall - 1) * spec.fast_interval_s * j
    best_down = (spec.fall - 1) * spec.fast_interval_s * (1 - spec.jitter)
    assert best_down - 0.01 <= timings["down_s"] <= worst_down + spec.fall * 0.01 + SLACK_S
    worst_up = spec.down_interval_s * j + (spec.rise - 1) * spec.fast_interval_s * j
    assert timings["up_s"] <= worst_up + SLACK_S
    print(
        f"\nDOWN detected {timings['down_s'] * 1000:.0f} ms after the backend turned 503 "
        f"(documented bound {worst_down * 1000:.0f} ms + probe time); "
        f"UP {timings['up_s'] * 1000:.0f} ms after recovery (bound {worst_up * 1000:.0f} ms)"
    )

    # cadence: probes while stable UP are ~interval_s apart, while stable DOWN ~down_interval_s
    hits = backend.hits
    up_gaps = [b - a for a, b in itertools.pairwise(hits) if b < timings["t0"]][1:]
    down_gaps = [
        b - a for a, b in itertools.pairwise(hits) if timings["t_down"] < a and b < timings["t1"]
    ]
    assert len(up_gaps) >= 2 and len(down_gaps) >= 2
    for gap in up_gaps:
        assert spec.interval_s * (1 - spec.jitter) - 0.01 <= gap <= spec.interval_s * j + 0.05
    for gap in down_gaps:
        lo, hi = spec.down_interval_s * (1 - spec.jitter), spec.down_interval_s * j
        assert lo - 0.01 <= gap <= hi + 0.05

    # only the three state changes are logged at INFO, with the result that caused them
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(info) == 3
    assert (
        info[1].startswith("event=health_transition pool=web backend=a addr=127.0.0.1:")
        and " from=UP to=DOWN status=L7_STATUS code=503 duration_ms=" in info[1]
    )


def test_killed_backend_is_down_with_l4_refused() -> None:
    rec = Recorder()
    spec = CheckSpec(interval_s=0.05, timeout_s=0.05, rise=1, fall=2, jitter=0.0)

    async def body() -> None:
        async with rec.checker() as hc:
            async with aiohttp_server(FlipApp().app) as port:
                hc.set_targets([Target(KEY, LOOPBACK, port, spec)])
                assert await wait_for(lambda: rec.transitions_for(KEY) == [(DOWN, UP)], 1.0)
            # server gone: nothing listens on the port any more
            assert await wait_for(lambda: len(rec.transitions_for(KEY)) == 2, 1.0)

    run(body())
    _, _, old, new, result = rec.transitions[-1]
    assert (old, new, result.status) == (UP, DOWN, CheckStatus.L4_REFUSED)


def test_set_targets_keeps_unchanged_and_resets_changed() -> None:
    rec = Recorder()
    spec = CheckSpec(interval_s=0.03, timeout_s=0.05, rise=2, fall=3, jitter=0.1)
    a, b, c, d = (("web", n) for n in "abcd")

    async def body() -> None:
        apps = [FlipApp() for _ in range(3)]
        async with (
            aiohttp_server(apps[0].app) as p0,
            aiohttp_server(apps[1].app) as p1,
            aiohttp_server(apps[2].app) as p2,
            rec.checker() as hc,
        ):
            hc.set_targets([Target(k, LOOPBACK, p0, spec) for k in (a, b, c)])
            assert await wait_for(lambda: all(_up(hc, k) for k in (a, b, c)), 1.0)
            await asyncio.sleep(0.1)
            before_a = hc.state(a)
            assert before_a is not None
            # reload: a rebuilt from equal config (lists, as TOML gives them), b moves to
            # another port, c is removed, d is new
            same_spec = CheckSpec(
                interval_s=0.03,
                timeout_s=0.05,
                rise=2,
                fall=3,
                jitter=0.1,
                expect_status=[[200, 399]],  # type: ignore[arg-type]
            )
            hc.set_targets(
                [
                    Target(a, LOOPBACK, p0, same_spec),
                    Target(b, LOOPBACK, p1, spec),
                    Target(d, LOOPBACK, p2, spec),
                ]
            )
            t_reload = time.monotonic()
            after_a, after_b, after_d = hc.state(a), hc.state(b), hc.state(d)
            assert after_a is not None and after_b is not None and after_d is not None
            assert (after_a.health, after_a.counter) == (UP, before_a.counter)
            assert after_a.checks == before_a.checks and after_a.since == before_a.since
            assert (after_b.health, after_b.checks, after_b.last_result) == (DOWN, 0, None)
            assert after_d.health is DOWN
            assert hc.state(c) is None
            assert await wait_for(lambda: _up(hc, b) and _up(hc, d), 1.0)
            await asyncio.sleep(0.1)
            a_now = hc.state(a)
            assert a_now is not None and a_now.checks > before_a.checks  # kept running
            assert len(apps[1].hits) >= 1 and len(apps[2].hits) >= 1
            assert rec.results_for(c, since=t_reload) == []
            assert rec.transitions_for(a, since=t_reload) == []
            assert rec.transitions_for(b, since=t_reload) == [(DOWN, UP)]

    run(body())


def _up(hc: HealthChecker, key: TargetKey) -> bool:
    s = hc.state(key)
    return s is not None and s.health is UP


def test_initial_up_serves_before_first_check() -> None:
    async def body() -> None:
        hc = HealthChecker()
        hc.set_targets([Target(KEY, LOOPBACK, 9, CheckSpec(initial="up"))])
        s = hc.state(KEY)
        assert s is not None and s.health is UP and s.checks == 0

    run(body())


def test_duplicate_keys_rejected_without_change() -> None:
    hc = HealthChecker()
    hc.set_targets([Target(KEY, LOOPBACK, 1)])
    with pytest.raises(HealthConfigError, match="duplicate"):
        hc.set_targets(
            [Target(("web", "b"), LOOPBACK, 2), Target(KEY, LOOPBACK, 3), Target(KEY, LOOPBACK, 4)]
        )
    assert hc.state(("web", "b")) is None
    assert set(hc.states()) == {KEY}


def test_raising_callback_does_not_stop_checks_or_siblings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transitions: list[TargetKey] = []
    calls: dict[TargetKey, int] = {}
    spec = CheckSpec(interval_s=0.02, timeout_s=0.05, rise=1, fall=1, jitter=0.0)
    bad, good = ("web", "bad"), ("web", "good")

    def on_result(key: TargetKey, result: CheckResult, counter: HealthCounter) -> None:
        calls[key] = calls.get(key, 0) + 1
        if key == bad:
            raise RuntimeError("metrics exporter bug")

    def on_transition(key: TargetKey, old: Health, new: Health, result: CheckResult) -> None:
        transitions.append(key)

    async def body() -> None:
        backend = FlipApp()
        async with (
            aiohttp_server(backend.app) as port,
            HealthChecker(on_result=on_result, on_transition=on_transition) as hc,
        ):
            hc.set_targets([Target(bad, LOOPBACK, port, spec), Target(good, LOOPBACK, port, spec)])
            assert await wait_for(lambda: calls.get(bad, 0) >= 5 and calls.get(good, 0) >= 5, 2)

    with caplog.at_level(logging.ERROR, logger="healthcheck"):
        run(body())
    assert sorted(transitions) == [bad, good]  # on_transition still ran after on_result raised
    errors = [r for r in caplog.records if "callback=on_result" in r.getMessage()]
    assert len(errors) >= 5 and all(r.exc_info for r in errors)


def test_stop_cancels_hung_probes_promptly() -> None:
    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(10)

    async def body() -> float:
        rec = Recorder()
        spec = CheckSpec(interval_s=10, timeout_s=5, jitter=0.0)
        async with raw_server(hang) as port:
            hc = rec.checker()
            await hc.start()
            hc.set_targets([Target(KEY, LOOPBACK, port, spec)])
            await asyncio.sleep(0.1)  # probe is now waiting for a response
            t = time.monotonic()
            await hc.stop()
            elapsed = time.monotonic() - t
            assert rec.results == []  # cancelled, not reported as a result
            return elapsed

    assert run(body()) < 0.1


def test_force_check_probes_now() -> None:
    async def body() -> None:
        backend = FlipApp()
        spec = CheckSpec(interval_s=30, timeout_s=0.5, rise=1, jitter=0.0)
        async with aiohttp_server(backend.app) as port, HealthChecker() as hc:
            hc.set_targets([Target(KEY, LOOPBACK, port, spec)])
            assert await wait_for(lambda: len(backend.hits) == 1, 1.0)
            assert hc.force_check(KEY) is True
            assert await wait_for(lambda: len(backend.hits) == 2, 0.5)
            assert hc.force_check(("web", "nope")) is False

    run(body())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"interval_s": 0}, "interval_s"),
        ({"fast_interval_s": -1.0}, "fast_interval_s"),
        ({"down_interval_s": 0.0}, "down_interval_s"),
        ({"jitter": 1.0}, "jitter"),
        ({"rise": 0}, "rise"),
        ({"fall": 0}, "fall"),
        ({"initial": "sideways"}, "initial"),
        ({"probe": "icmp"}, "probe"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"path": "x"}, "path"),
    ],
)
def test_invalid_spec_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(HealthConfigError) as err:
        CheckSpec(**kwargs)  # type: ignore[arg-type]
    assert err.value.field == field


def test_interval_choice() -> None:
    spec = CheckSpec(interval_s=1, fast_interval_s=0.2, down_interval_s=5, rise=2, fall=3)
    assert spec.base_interval_s(HealthCounter(2, 3, 4)) == 1  # stable UP
    assert spec.base_interval_s(HealthCounter(2, 3, 3)) == 0.2  # UP, going down
    assert spec.base_interval_s(HealthCounter(2, 3, 1)) == 0.2  # DOWN, going up
    assert spec.base_interval_s(HealthCounter(2, 3, 0)) == 5  # stable DOWN
    defaults = CheckSpec()
    assert defaults.base_interval_s(HealthCounter(2, 3, 1)) == defaults.interval_s
    assert defaults.base_interval_s(HealthCounter(2, 3, 0)) == defaults.interval_s
