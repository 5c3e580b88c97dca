"""Runs the active checks: one loop per target, results written to the health book.

The daemon maps each pool's ``[pool.health]`` table (plus per-backend overrides) to a
:class:`CheckSpec`, builds one :class:`Target` per backend and calls
:meth:`HealthChecker.set_targets` at start-up and on every config reload. The scheduler
keeps no health state of its own: every result goes to the :class:`~healthcheck.book.HealthBook`
(the one owner; pass the daemon's in), which also decides what a reload keeps. Listeners
learn of results and changes through ``on_result`` / ``on_transition``.

Cadence per target: the next check starts ``interval`` after the previous one started
(or at once if the probe took longer), where ``interval`` is

- ``fast_interval_s`` while the counter is between its extremes (a change may be near),
- ``down_interval_s`` while the target is DOWN and stable,
- ``interval_s`` while it is UP and stable,

each multiplied by a random factor in ``[1 - jitter, 1 + jitter]`` so checks of many targets
drift apart. A new target's first check waits a random ``[0, jitter * interval_s]``.

Worst-case time for a fully UP target to be marked DOWN after it dies:
``interval_s * (1 + jitter) + (fall - 1) * fast_interval_s * (1 + jitter) + fall * timeout_s``.

Each target's loop is an error boundary: a bug or a raising callback is logged with its
traceback and the loop carries on; ``CancelledError`` always propagates. Logging: one INFO
line per state change (with the result that caused it), one DEBUG line per result.

Imports nothing from lb or failover. Call its methods from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable, Collection, Iterable
from types import TracebackType

from .book import HealthBook, TargetState
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


class _Runner:
    """The task that probes one target; replaced (never reset) when the target changes.
    It holds no health state: results go to the book."""

    __slots__ = ("probe", "target", "task", "wake")

    def __init__(self, target: Target) -> None:
        self.target = target
        self.probe = target.spec.make_probe()
        self.task: asyncio.Task[None] | None = None
        self.wake: asyncio.Future[None] | None = None


class HealthChecker:
    """Owns one check task per target. ``async with HealthChecker(...)`` starts and stops it."""

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
        self._tasks: set[asyncio.Task[None]] = set()  # live and cancelled-but-unfinished
        self._running = False

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
        for runner in self._runners.values():
            self._spawn(runner)

    async def stop(self) -> None:
        """Cancel every check and wait for them to finish. State is kept; start() resumes."""
        self._running = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for runner in self._runners.values():
            runner.task = None

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
            if runner is not None and runner.task is not None:
                runner.task.cancel()
            if key in done.removed:
                log.debug("event=health_target_removed pool=%s backend=%s", key[0], key[1])
        for key in done.started:
            target = self.book.target(key)
            assert target is not None
            runner = _Runner(target)
            self._runners[key] = runner
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
                self._spawn(runner)

    def state(self, key: TargetKey) -> TargetState | None:
        """Current health of one target, or None if it is not checked."""
        return self.book.state(key)

    def states(self) -> dict[TargetKey, TargetState]:
        return self.book.states()

    def force_check(self, key: TargetKey) -> bool:
        """Check this target now instead of at its next slot; False if unknown."""
        runner = self._runners.get(key)
        if runner is None:
            return False
        if runner.wake is not None and not runner.wake.done():
            runner.wake.set_result(None)
        return True

    def _spawn(self, runner: _Runner) -> None:
        pool, backend = runner.target.key
        task = asyncio.get_running_loop().create_task(
            self._run(runner), name=f"healthcheck:{pool}/{backend}"
        )
        runner.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, runner: _Runner) -> None:
        target = runner.target
        spec = target.spec
        next_at = time.monotonic() + self._rng.uniform(0, spec.jitter * spec.interval_s)
        while True:
            await self._sleep(runner, next_at - time.monotonic())
            started = time.monotonic()
            wait_s = self._error_backoff_s
            try:
                result = await runner.probe.run(target.host, target.port)
                counter = self._apply(runner, result)
                if counter is None:
                    return  # retired while the probe ran
                wait_s = spec.base_interval_s(counter)
            except Exception:  # error boundary: a bug here must not stop checking
                log.exception(
                    "event=health_loop_error pool=%s backend=%s", target.key[0], target.key[1]
                )
            next_at = started + wait_s * self._rng.uniform(1 - spec.jitter, 1 + spec.jitter)

    async def _sleep(self, runner: _Runner, delay_s: float) -> None:
        """Sleep that force_check() can cut short; one future + one timer, no extra task."""
        if delay_s <= 0:
            return
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()
        runner.wake = wake
        timer = loop.call_later(delay_s, _resolve, wake)
        try:
            await wake
        finally:
            timer.cancel()
            runner.wake = None

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


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
