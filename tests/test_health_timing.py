"""When checks start: spread first checks, phase kept after a late loop, lateness measured.

The scheduler half runs real probes against one loopback server that records when each
request arrived; the lateness recorder half is pure.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from health_helpers import LOOPBACK, raw_server, run

from healthcheck import CheckSpec, HealthChecker, Target
from healthcheck.lateness import LATENESS_BUCKETS_S, Lateness
from healthcheck.scheduler import FIRST_CHECK_SPACING_S

pytestmark = pytest.mark.timeout(60)


class Arrivals:
    """A raw HTTP server that answers 200 and notes each request's arrival (loop time)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.times.append(asyncio.get_running_loop().time())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()


def targets(n: int, port: int, spec: CheckSpec) -> list[Target]:
    return [Target(("web", f"b{i}"), LOOPBACK, port, spec) for i in range(n)]


def test_first_checks_of_many_targets_are_spread_evenly() -> None:
    n = 150
    spec = CheckSpec(interval_s=1.0, timeout_s=0.5, jitter=0.1)
    window = min(spec.interval_s, max(spec.jitter * spec.interval_s, n * FIRST_CHECK_SPACING_S))

    async def body() -> list[float]:
        srv = Arrivals()
        async with raw_server(srv.handle) as port, HealthChecker() as hc:
            t0 = asyncio.get_running_loop().time()
            hc.set_targets(targets(n, port, spec))
            # Until all n arrived (a full suite once saw 117 of 150 within window + 0.1 s on
            # a busy box); the spread below is judged from the arrival times themselves.
            for _ in range(int((window + 2.0) / 0.01)):
                if len(srv.times) >= n:
                    break
                await asyncio.sleep(0.01)
            return [t - t0 for t in srv.times[:n]]

    first = sorted(run(body()))
    assert len(first) == n
    # Spread over the window, not fired together: no 10 ms slice holds more than its share
    # (n / window * 0.01 = 10) plus noise.
    assert first[-1] >= window * 0.8, first[-1]
    per_slice: dict[int, int] = {}
    for t in first:
        per_slice[int(t / 0.01)] = per_slice.get(int(t / 0.01), 0) + 1
    assert max(per_slice.values()) <= 25, sorted(per_slice.items())


def test_a_single_new_target_is_checked_at_once_even_with_a_long_interval() -> None:
    spec = CheckSpec(interval_s=30, timeout_s=0.5, jitter=0.1)

    async def body() -> float:
        srv = Arrivals()
        async with raw_server(srv.handle) as port, HealthChecker() as hc:
            t0 = asyncio.get_running_loop().time()
            hc.set_targets(targets(1, port, spec))
            for _ in range(100):
                if srv.times:
                    break
                await asyncio.sleep(0.01)
            assert srv.times
            return srv.times[0] - t0

    assert run(body()) < 0.1


class Midpoint(random.Random):
    """Jitter factor always 1: timings become exact."""

    def uniform(self, a: float, b: float) -> float:
        return (a + b) / 2


def test_lateness_is_recorded_and_a_late_loop_shifts_the_phase_only_as_needed() -> None:
    """The loop blocks for 0.35 s: the check due meanwhile starts late (and says so); the
    next one stays on its slot as far as the shortest interval (interval * (1 - jitter))
    after the late start allows, instead of a whole interval after it."""
    spec = CheckSpec(interval_s=0.4, timeout_s=0.2, jitter=0.25, rise=1)

    async def body() -> tuple[list[float], HealthChecker]:
        srv = Arrivals()
        async with raw_server(srv.handle) as port, HealthChecker(rng=Midpoint()) as hc:
            hc.set_targets(targets(1, port, spec))
            await asyncio.sleep(0.2)  # first check at ~0, next due at 0.4
            time.sleep(0.35)  # noqa: ASYNC251 (a busy control loop from 0.2 to 0.55)
            await asyncio.sleep(0.5)  # check at ~0.55 (late by 0.15), then due at 0.85
            return srv.times, hc

    times, hc = run(body())
    assert len(times) >= 3, times
    late = hc.lateness
    assert late.count >= 3
    assert 0.1 <= late.max_s <= 0.3, late.max_s
    assert late.max_over(10, time.monotonic()) == late.max_s
    # Slot 0.8, shortest gap 0.3 after the late start at 0.55: 0.85 (a whole interval: 0.95).
    assert times[2] - times[0] == pytest.approx(0.85, abs=0.05), times
    assert times[2] - times[1] >= 0.3 - 0.01


def test_stop_and_restart_leave_no_timer_behind() -> None:
    spec = CheckSpec(interval_s=0.05, timeout_s=0.05, jitter=0.1)

    async def body() -> int:
        srv = Arrivals()
        async with raw_server(srv.handle) as port:
            hc = HealthChecker()
            hc.set_targets(targets(20, port, spec))
            await hc.start()
            await asyncio.sleep(0.2)
            await hc.stop()
            seen = len(srv.times)
            await asyncio.sleep(0.2)
            assert len(srv.times) <= seen + 20  # at most the probes that were in flight
            loop = asyncio.get_running_loop()
            live = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
            assert not [h for h in live if "HealthChecker" in repr(h)], live
            await hc.start()
            await asyncio.sleep(0.2)
            await hc.stop()
            return len(srv.times) - seen

    assert run(body()) > 20  # it resumed


# -- the recorder (pure) -------------------------------------------------------------------


def test_histogram_buckets_are_le_and_quantiles_interpolate() -> None:
    lat = Lateness()
    for v in (0.0, 0.001, 0.0011, 0.02, 0.3, 7.0):
        lat.observe(v, 100.0)
    bounds = LATENESS_BUCKETS_S
    assert lat.count == 6 and lat.sum_s == pytest.approx(7.3221)
    assert lat.counts[bounds.index(0.001)] == 2  # 0.0 and 0.001 are <= 0.001
    assert lat.counts[bounds.index(0.0025)] == 1
    assert lat.counts[bounds.index(0.025)] == 1
    assert lat.counts[bounds.index(0.3)] == 1  # 0.3 <= 0.3
    assert lat.counts[-1] == 1  # +Inf
    assert lat.quantile(0.5) == pytest.approx(0.0025)
    assert lat.quantile(1.0) == 7.0  # the +Inf bucket answers with the maximum
    assert Lateness().quantile(0.99) == 0.0


def test_maxima_window_rolls_by_the_second() -> None:
    lat = Lateness()
    lat.observe(0.5, 1000.2)
    lat.observe(0.1, 1005.0)
    assert lat.max_over(10, 1005.5) == 0.5
    assert lat.max_over(3, 1005.5) == 0.1
    assert lat.max_over(10, 1011.0) == 0.1  # 1000 has left the 10 s window
    assert lat.max_over(60, 1059.9) == 0.5  # 1000..1059
    assert lat.max_over(60, 1060.0) == 0.1  # 1001..1060
    assert lat.max_over(60, 1066.0) == 0.0  # everything has left
    lat.observe(0.2, 5000.0)  # a jump longer than the window clears it
    assert lat.max_over(60, 5000.0) == 0.2
    assert lat.max_s == 0.5
