"""Runs the active checks: one loop per target, results written to the health book.

The daemon maps each pool's ``[pool.health]`` table (plus per-backend overrides) to a
:class:`CheckSpec`, builds one :class:`Target` per backend and calls
:meth:`HealthChecker.set_targets` at start-up and on every config reload. The scheduler
keeps no health state of its own: every result goes to the :class:`~healthcheck.book.HealthBook`
(the one owner; pass the daemon's in), which also decides what a reload keeps. Listeners
learn of results and changes through ``on_result`` / ``on_transition``.

Cadence per target: the next check is due ``interval`` after the previous one was due
(or at once if that time has passed), where ``interval`` is

- ``fast_interval_s`` while the counter is between its extremes (a change may be near),
- ``down_interval_s`` while the target is DOWN and stable,
- ``interval_s`` while it is UP and stable,

each multiplied by a random factor in ``[1 - jitter, 1 + jitter]`` so checks of many targets
drift apart. Counting from the due time rather than from when the check really started
keeps a target's phase when the loop ran late, so a burst of late checks does not stay a
burst; but two checks of a target never start closer than ``interval * (1 - jitter)``.
First checks are spread, not fired together: the ``n`` targets started at once
(start-up, a reload) get evenly spaced deterministic phases over
``min(interval_s, max(jitter * interval_s, n * FIRST_CHECK_SPACING_S))``: a single new
backend is checked at once, 3000 are spread over the whole interval.

Timing costs no task per target: each target has one timer (``loop.call_at``) for its next
check and, while a probe runs, the probe's callback handle (see :mod:`healthcheck.probes`).
Every check start records its lateness (start time minus due time) in :attr:`lateness`.

Worst-case time for a fully UP target to be marked DOWN after it dies:
``interval_s * (1 + jitter) + (fall - 1) * fast_interval_s * (1 + jitter) + fall * timeout_s``.

Each check is an error boundary: a bug or a raising callback is logged with its traceback
and the target is checked again after ``error_backoff_s``. Logging: one INFO
line per state change (with the result that caused it), one DEBUG line per result.

Imports nothing from lb or failover. Call its methods from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import random
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from types import TracebackType

from .book import HealthBook, TargetState
from .lateness import Lateness
from .probes import ProbeHandle
from .state import CheckResult, Health, HealthCounter
from .targets import CheckSpec, ProbeKind, Target, TargetKey

__all__ = [
    "CheckSpec",
    "HealthChecker",
    "OnResult",
    "OnTransition",
    "ProbeKind",
    "Target",
    "TargetKey",
    "TargetState",
]

log = logging.getLogger(__name__)

OnResult = Callable[[TargetKey, CheckResult, HealthCounter], None]
OnTransition = Callable[[TargetKey, Health, Health, CheckResult], None]

FIRST_CHECK_SPACING_S = 0.001
"""First checks of targets started together are at least this far apart (module docstring)."""


class _Runner:
    """The timer and probe of one target; replaced (never reset) when the target changes.
    It holds no health state: results go to the book."""

    __slots__ = ("check", "due", "on_done", "probe", "started", "target", "timer")

    def __init__(self, target: Target) -> None:
        self.target = target
        self.probe = target.spec.make_probe()
        self.timer: asyncio.Handle | None = None
        """The next check, while none is in flight."""
        self.check: ProbeHandle | None = None
        """The probe in flight."""
        self.due = 0.0
        """When the current or next check is (was) due, loop time."""
        self.started = 0.0
        """When the last check really started, loop time."""
        self.on_done: Callable[[CheckResult], None] = lambda result: None

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.check is not None:
            self.check.abort()
            self.check = None
        self.probe.close()


class HealthChecker:
    """Checks every target on its own cadence. ``async with HealthChecker(...)`` starts and
    stops it."""

    def __init__(
        self,
        *,
        on_result: OnResult | None = None,
        on_transition: OnTransition | None = None,
        rng: random.Random | None = None,
        error_backoff_s: float = 1.0,
        book: HealthBook | None = None,
    ) -> None:
        self.book = book if book is not None else HealthBook()
        """The one owner of health state; pass the daemon's so it reads what we write."""
        self._on_result = on_result
        self._on_transition = on_transition
        self._rng = rng or random.Random()
        self._error_backoff_s = error_backoff_s
        self._runners: dict[TargetKey, _Runner] = {}
        self._running = False
        self.lateness = Lateness()
        """Start time minus due time of every check (see :mod:`healthcheck.lateness`)."""

    async def __aenter__(self) -> HealthChecker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start checking every target set so far (and those set later)."""
        if self._running:
            return
        self._running = True
        self._spawn_all(list(self._runners.values()))

    async def stop(self) -> None:
        """Cancel every check (probes in flight report nothing). State is kept; start()
        resumes."""
        self._running = False
        for runner in self._runners.values():
            runner.cancel()

    @property
    def in_flight(self) -> int:
        """Probes running now."""
        return sum(1 for r in self._runners.values() if r.check is not None)

    def set_targets(
        self, targets: Iterable[Target], in_service: Collection[TargetKey] = ()
    ) -> None:
        """Replace the target set (see :mod:`healthcheck.book` for what each target keeps):
        start new ones, stop removed ones, restart changed ones; unchanged targets keep
        their schedule. ``in_service``: keys newly checked whose backend was serving
        without checks (they start "UP, going down").

        Raises HealthConfigError on a duplicate key, before changing anything.
        """
        done = self.book.reconcile(targets, time.monotonic(), in_service)
        for key in done.removed + done.changed:
            runner = self._runners.pop(key, None)
            if runner is not None:
                runner.cancel()
            if key in done.removed:
                log.debug("event=health_target_removed pool=%s backend=%s", key[0], key[1])
        started: list[_Runner] = []
        for key in done.started:
            target = self.book.target(key)
            assert target is not None
            runner = _Runner(target)
            self._runners[key] = runner
            started.append(runner)
            log.debug(
                "event=health_target_%s pool=%s backend=%s addr=%s:%s state=%s",
                "added" if key in done.added else "changed",
                key[0],
                key[1],
                target.host,
                target.port,
                self.book.state(key).health,  # type: ignore[union-attr]
            )
        if self._running:
            self._spawn_all(started)

    def add_target(self, target: Target) -> bool:
        """Check one more target, first check at once (a backend added at runtime gets no
        traffic before a passing check, so the first one should not wait an interval).
        O(1): the other targets are not looked at. False if its key is checked already."""
        if not self.book.add(target, time.monotonic()):
            return False
        runner = _Runner(target)
        self._runners[target.key] = runner
        if self._running:
            self._spawn(runner, 0.0)
        return True

    def remove_target(self, key: TargetKey) -> bool:
        """Stop checking one target; a probe in flight finishes unseen."""
        runner = self._runners.pop(key, None)
        if runner is not None:
            runner.cancel()
        return self.book.remove(key)

    def state(self, key: TargetKey) -> TargetState | None:
        """Current health of one target, or None if it is not checked."""
        return self.book.state(key)

    def states(self) -> dict[TargetKey, TargetState]:
        return self.book.states()

    def force_check(self, key: TargetKey) -> bool:
        """Check this target now instead of at its next slot; False if unknown. A check
        already in flight counts as now."""
        runner = self._runners.get(key)
        if runner is None:
            return False
        if runner.timer is not None:
            runner.timer.cancel()
            loop = asyncio.get_running_loop()
            runner.due = loop.time()
            runner.timer = loop.call_soon(self._fire, runner)
        return True

    # -- timing ---------------------------------------------------------------------------

    def _spawn_all(self, runners: Sequence[_Runner]) -> None:
        """First checks of targets started together, at evenly spread phases (module doc)."""
        n = len(runners)
        for i, runner in enumerate(runners):
            spec = runner.target.spec
            window = min(
                spec.interval_s, max(spec.jitter * spec.interval_s, n * FIRST_CHECK_SPACING_S)
            )
            self._spawn(runner, window * i / n)

    def _spawn(self, runner: _Runner, delay_s: float) -> None:
        loop = asyncio.get_running_loop()
        runner.on_done = functools.partial(self._done, runner)
        runner.due = loop.time() + delay_s
        runner.timer = loop.call_at(runner.due, self._fire, runner)

    def _fire(self, runner: _Runner) -> None:
        """A check is due: start its probe (the result comes to ``_done``)."""
        runner.timer = None
        if not self._running or self._runners.get(runner.target.key) is not runner:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        runner.started = now
        self.lateness.observe(now - runner.due, now)
        target = runner.target
        try:
            runner.check = runner.probe.start(target.host, target.port, runner.on_done)
        except Exception:  # error boundary: a bug here must not stop checking
            log.exception(
                "event=health_loop_error pool=%s backend=%s", target.key[0], target.key[1]
            )
            self._next(runner, self._error_backoff_s)

    def _done(self, runner: _Runner, result: CheckResult) -> None:
        runner.check = None
        if not self._running or self._runners.get(runner.target.key) is not runner:
            return  # stopped, or retired while the probe ran: the result belongs to nobody
        wait_s = self._error_backoff_s
        try:
            counter = self._apply(runner, result)
            if counter is not None:
                wait_s = runner.target.spec.base_interval_s(counter)
        except Exception:  # error boundary, as in _fire
            key = runner.target.key
            log.exception("event=health_loop_error pool=%s backend=%s", key[0], key[1])
        self._next(runner, wait_s)

    @staticmethod
    def _started_at(runner: _Runner, now: float) -> float:
        return runner.started or now

    def _next(self, runner: _Runner, wait_s: float) -> None:
        """Schedule the next check ``wait_s`` (jittered) after this one was due (module doc)."""
        spec = runner.target.spec
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = runner.due + wait_s * self._rng.uniform(1 - spec.jitter, 1 + spec.jitter)
        # Never closer to the previous start than the shortest interval the spec allows.
        runner.due = max(due, self._started_at(runner, now) + wait_s * (1 - spec.jitter), now)
        runner.timer = loop.call_at(runner.due, self._fire, runner)

    def _apply(self, runner: _Runner, result: CheckResult) -> HealthCounter | None:
        """Write one result to the book; the counter after it, or None if this runner was
        retired while its probe ran (its results belong to nobody)."""
        key = runner.target.key
        if self._runners.get(key) is not runner:
            return None
        transition = self.book.record(key, result, time.monotonic())
        state = self.book.state(key)
        assert state is not None
        counter = state.counter
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "event=health_result pool=%s backend=%s status=%s code=%s duration_ms=%.1f "
                "health=%d/%d state=%s detail=%s",
                key[0],
                key[1],
                result.status,
                "-" if result.code is None else result.code,
                result.duration_s * 1000,
                counter.health,
                counter.top,
                counter.state,
                json.dumps(result.detail),
            )
        if transition is not None:
            log.info(
                "event=health_transition pool=%s backend=%s addr=%s:%s from=%s to=%s "
                "status=%s code=%s duration_ms=%.1f detail=%s",
                key[0],
                key[1],
                runner.target.host,
                runner.target.port,
                transition.old,
                transition.new,
                result.status,
                "-" if result.code is None else result.code,
                result.duration_s * 1000,
                json.dumps(result.detail),
            )
        # on_result first, so an observer of both sees the result that caused a transition.
        if self._on_result is not None:
            try:
                self._on_result(key, result, counter)
            except Exception:
                log.exception(
                    "event=health_callback_error callback=on_result pool=%s backend=%s",
                    key[0],
                    key[1],
                )
        if transition is not None and self._on_transition is not None:
            try:
                self._on_transition(key, transition.old, transition.new, result)
            except Exception:
                log.exception(
                    "event=health_callback_error callback=on_transition pool=%s backend=%s",
                    key[0],
                    key[1],
                )
        return counter
