"""Runs the active checks: one loop per target, rise/fall state, callbacks to the daemon.

The daemon maps each pool's ``[pool.health]`` table (plus per-backend overrides) to a
:class:`CheckSpec`, builds one :class:`Target` per backend and calls
:meth:`HealthChecker.set_targets` at start-up and on every config reload. Targets whose
address and spec did not change keep their counter, so a reload does not knock healthy
backends out or let dead ones back in. The pool learns of changes through ``on_transition``;
the initial state of a new target is readable with :meth:`HealthChecker.state` right after
``set_targets`` (DOWN by default: see :mod:`healthcheck.state`).

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from .probes import HttpProbe, Probe, TcpProbe
from .state import CheckResult, Health, HealthConfigError, HealthCounter, Initial

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

ProbeKind = Literal["http", "tcp"]
TargetKey = tuple[str, str]
"""``(pool, backend)``: names that appear in logs, metrics and the admin API."""

OnResult = Callable[[TargetKey, CheckResult, HealthCounter], None]
OnTransition = Callable[[TargetKey, Health, Health, CheckResult], None]


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """Validated check settings of one target; field names follow the TOML contract.

    ``expect_status`` holds inclusive ``(lo, hi)`` ranges; lists (from TOML) are turned into
    tuples so equal configs compare equal across reloads.
    """

    probe: ProbeKind = "http"
    method: str = "GET"
    path: str = "/healthz"
    host: str | None = None
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)
    expect_body: str | None = None
    interval_s: float = 1.0
    timeout_s: float = 0.5
    rise: int = 2
    fall: int = 3
    fast_interval_s: float | None = None
    down_interval_s: float | None = None
    jitter: float = 0.1
    initial: Initial = "down"

    def __post_init__(self) -> None:
        ranges = tuple((int(lo), int(hi)) for lo, hi in self.expect_status)
        object.__setattr__(self, "expect_status", ranges)
        if self.probe not in ("http", "tcp"):
            raise HealthConfigError("probe", self.probe, 'must be "http" or "tcp"')
        for name in ("interval_s", "fast_interval_s", "down_interval_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise HealthConfigError(name, value, "must be > 0")
        if not 0 <= self.jitter < 1:
            raise HealthConfigError("jitter", self.jitter, "must be in [0, 1)")
        HealthCounter.initial(self.rise, self.fall, self.initial)  # validates rise/fall/initial
        self.make_probe()  # validates method/path/host/expect_*/timeout_s

    def make_probe(self) -> Probe:
        if self.probe == "tcp":
            return TcpProbe(self.timeout_s)
        return HttpProbe(
            method=self.method,
            path=self.path,
            host=self.host,
            expect_status=self.expect_status,
            expect_body=self.expect_body,
            timeout_s=self.timeout_s,
        )

    def base_interval_s(self, counter: HealthCounter) -> float:
        """The un-jittered wait before the next check, given the counter after this one."""
        if counter.changing:
            return self.fast_interval_s or self.interval_s
        if counter.state is Health.DOWN:
            return self.down_interval_s or self.interval_s
        return self.interval_s


@dataclass(frozen=True, slots=True)
class Target:
    """One thing to check. Equal targets (same key, address and spec) keep state on reload."""

    key: TargetKey
    host: str
    port: int
    spec: CheckSpec = CheckSpec()

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise HealthConfigError("port", self.port, "must be in 1..65535")


@dataclass(frozen=True, slots=True)
class TargetState:
    """What the admin/status API shows. ``since`` is the ``time.monotonic()`` of the last
    state change (or of when checking began); ``checks`` counts completed probes."""

    health: Health
    last_result: CheckResult | None
    counter: HealthCounter
    since: float
    checks: int


class _Runner:
    """Mutable per-target state; replaced (never reset) when the target changes."""

    __slots__ = ("checks", "counter", "last", "probe", "since", "target", "task", "wake")

    def __init__(self, target: Target, now: float) -> None:
        self.target = target
        self.probe = target.spec.make_probe()
        spec = target.spec
        self.counter = HealthCounter.initial(spec.rise, spec.fall, spec.initial)
        self.last: CheckResult | None = None
        self.since = now
        self.checks = 0
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
    ) -> None:
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

    def set_targets(self, targets: Iterable[Target]) -> None:
        """Replace the target set: start new ones, stop removed ones, restart changed ones
        with fresh state; unchanged targets keep their counter and schedule.

        Raises HealthConfigError on a duplicate key, before changing anything.
        """
        wanted: dict[TargetKey, Target] = {}
        for target in targets:
            if target.key in wanted:
                raise HealthConfigError("targets", target.key, "duplicate (pool, backend) key")
            wanted[target.key] = target
        for key, runner in list(self._runners.items()):
            if wanted.get(key) != runner.target:
                del self._runners[key]
                if runner.task is not None:
                    runner.task.cancel()
                log.debug("event=health_target_removed pool=%s backend=%s", key[0], key[1])
        now = time.monotonic()
        for key, target in wanted.items():
            if key not in self._runners:
                runner = _Runner(target, now)
                self._runners[key] = runner
                log.debug(
                    "event=health_target_added pool=%s backend=%s addr=%s:%s initial=%s",
                    key[0],
                    key[1],
                    target.host,
                    target.port,
                    runner.counter.state,
                )
                if self._running:
                    self._spawn(runner)

    def state(self, key: TargetKey) -> TargetState | None:
        """Current health of one target, or None if it is not checked."""
        runner = self._runners.get(key)
        if runner is None:
            return None
        return TargetState(
            runner.counter.state, runner.last, runner.counter, runner.since, runner.checks
        )

    def states(self) -> dict[TargetKey, TargetState]:
        return {key: s for key in self._runners if (s := self.state(key)) is not None}

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
                self._apply(runner, result)
                wait_s = spec.base_interval_s(runner.counter)
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

    def _apply(self, runner: _Runner, result: CheckResult) -> None:
        key = runner.target.key
        if self._runners.get(key) is not runner:
            return  # retired while the probe ran: its results belong to nobody
        runner.counter, transition = runner.counter.step(result.ok)
        runner.last = result
        runner.checks += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "event=health_result pool=%s backend=%s status=%s code=%s duration_ms=%.1f "
                "health=%d/%d state=%s detail=%s",
                key[0],
                key[1],
                result.status,
                "-" if result.code is None else result.code,
                result.duration_s * 1000,
                runner.counter.health,
                runner.counter.top,
                runner.counter.state,
                json.dumps(result.detail),
            )
        if self._on_result is not None:
            try:
                self._on_result(key, result, runner.counter)
            except Exception:
                log.exception(
                    "event=health_callback_error callback=on_result pool=%s backend=%s",
                    key[0],
                    key[1],
                )
        if transition is None:
            return
        runner.since = time.monotonic()
        log.info(
            "event=health_transition pool=%s backend=%s addr=%s:%s from=%s to=%s status=%s "
            "code=%s duration_ms=%.1f detail=%s",
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
        if self._on_transition is not None:
            try:
                self._on_transition(key, transition.old, transition.new, result)
            except Exception:
                log.exception(
                    "event=health_callback_error callback=on_transition pool=%s backend=%s",
                    key[0],
                    key[1],
                )


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
