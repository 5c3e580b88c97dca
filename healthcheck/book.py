"""The health book: the one owner of every active-check fact about every target.

Per target it holds the rise/fall counter, the last result, when the state last changed,
when the target last came UP (slow start reads it) and how many checks completed. The
scheduler only runs probes and writes their results here; the daemon's rotation, the
status API and the metrics read from here. Nothing else keeps a copy of "healthy", so a
reload or a new check can never leave a stale verdict behind.

Reload rules (:meth:`HealthBook.reconcile`), each so that the verdict after a reload is what
the *new* checks say:

- same key, address and spec: everything is kept (state, counter, last result, checks);
- same key and server, a different *check* (what decides a pass: type, method, path, host,
  expect_*, timeout, the check port; also through a per-backend override): the health
  state is kept but the old counter is evidence about another check, so it restarts at the
  edge of that state with no evidence ("UP, going down" or "DOWN, going up"): the first
  result of the new check decides. A failing new check drains an UP backend at its first
  result; a passing one keeps it. The last result (of the old check) is dropped.
- same check counted on a new scale (rise/fall): the state is kept, a settled counter stays
  settled (top stays top, 0 stays 0), one between the extremes restarts at the edge;
- only when it is checked changed (interval_s, fast/down intervals, jitter, initial):
  everything is kept, as for an unchanged target (the scheduler still re-plans it).
- a key not checked before whose backend was serving without checks (checks turned on for a
  pool, listed in ``in_service``): starts "UP, going down" for the same reason;
- a new key, or a changed server address (another server; a new check port alone is not):
  starts from the spec's ``initial``.

Pure: no asyncio, socket, time or logging; the caller passes ``now`` (monotonic seconds).
Imports nothing from lb or failover.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from .state import CheckResult, Health, HealthConfigError, HealthCounter, Initial, Transition
from .targets import Target, TargetKey

__all__ = ["HealthBook", "Reconciled", "TargetState"]


@dataclass(frozen=True, slots=True)
class TargetState:
    """A read-only view of one target's health.

    ``since``: when the state last changed (or checking began); ``up_since``: when it last
    went DOWN -> UP (None if it has not since checking began: no slow start then);
    ``checks``: completed probes.
    """

    health: Health
    last_result: CheckResult | None
    counter: HealthCounter
    since: float
    checks: int
    up_since: float | None = None


@dataclass(slots=True)
class _Entry:
    target: Target
    counter: HealthCounter
    since: float
    last: CheckResult | None = None
    checks: int = 0
    up_since: float | None = None


@dataclass(frozen=True, slots=True)
class Reconciled:
    """What :meth:`HealthBook.reconcile` did, by key: the scheduler restarts ``started``."""

    added: tuple[TargetKey, ...] = ()
    changed: tuple[TargetKey, ...] = ()
    removed: tuple[TargetKey, ...] = ()
    kept: tuple[TargetKey, ...] = ()

    @property
    def started(self) -> tuple[TargetKey, ...]:
        return self.added + self.changed


@dataclass(slots=True)
class HealthBook:
    """Targets and their health; see the module docstring for the reload rules."""

    _entries: dict[TargetKey, _Entry] = field(default_factory=dict)

    def reconcile(
        self, targets: Iterable[Target], now: float, in_service: Collection[TargetKey] = ()
    ) -> Reconciled:
        """Replace the target set. Raises HealthConfigError on a duplicate key, before any
        change."""
        wanted: dict[TargetKey, Target] = {}
        for target in targets:
            if target.key in wanted:
                raise HealthConfigError("targets", target.key, "duplicate (pool, backend) key")
            wanted[target.key] = target
        added: list[TargetKey] = []
        changed: list[TargetKey] = []
        kept: list[TargetKey] = []
        removed = tuple(k for k in self._entries if k not in wanted)
        for key in removed:
            del self._entries[key]
        for key, target in wanted.items():
            old = self._entries.get(key)
            spec = target.spec
            if old is not None and old.target == target:
                kept.append(key)
                continue
            if old is not None and old.target.identity == target.identity:
                self._entries[key] = _carry(old, target)
                changed.append(key)
                continue
            initial = "up" if old is None and key in in_service else spec.initial
            counter = HealthCounter.initial(spec.rise, spec.fall, initial)
            self._entries[key] = _Entry(target, counter, now)
            (added if old is None else changed).append(key)
        return Reconciled(tuple(added), tuple(changed), removed, tuple(kept))

    def add(self, target: Target, now: float) -> bool:
        """One target more (a backend added at runtime), without walking the others as
        :meth:`reconcile` does. False if its key is taken (nothing changes)."""
        if target.key in self._entries:
            return False
        counter = HealthCounter.initial(target.spec.rise, target.spec.fall, target.spec.initial)
        self._entries[target.key] = _Entry(target, counter, now)
        return True

    def remove(self, key: TargetKey) -> bool:
        """Forget one target (a backend removed at runtime): its evidence goes with it."""
        return self._entries.pop(key, None) is not None

    def up(self, key: TargetKey) -> tuple[bool, float | None] | None:
        """(UP?, up_since) of one target, or None if it is not checked: the rotation's
        per-backend read, kept cheap (no view object) because it runs for every backend
        at every snapshot."""
        e = self._entries.get(key)
        if e is None:
            return None
        return e.counter.health >= e.counter.rise, e.up_since

    def record(self, key: TargetKey, result: CheckResult, now: float) -> Transition | None:
        """Apply one probe result; the transition if the state changed. Unknown keys (a
        probe that outlived its target) are ignored."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        entry.counter, transition = entry.counter.step(result.ok)
        entry.last = result
        entry.checks += 1
        if transition is not None:
            entry.since = now
            entry.up_since = now if transition.new is Health.UP else None
        return transition

    def target(self, key: TargetKey) -> Target | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.target

    def state(self, key: TargetKey) -> TargetState | None:
        """Current health of one target, or None if it is not checked."""
        e = self._entries.get(key)
        if e is None:
            return None
        return TargetState(e.counter.state, e.last, e.counter, e.since, e.checks, e.up_since)

    def states(self) -> dict[TargetKey, TargetState]:
        return {key: s for key in self._entries if (s := self.state(key)) is not None}

    def keys(self) -> list[TargetKey]:
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def _carry(old: _Entry, target: Target) -> _Entry:
    """The entry of the same server after its check settings changed (module docstring)."""
    spec, was = target.spec, old.target.spec
    state = old.counter.state
    if (spec.tested(), target.port) != (was.tested(), old.target.port):
        # Another check: keep the state, not the old check's evidence.
        edge: Initial = "up" if state is Health.UP else "down"
        counter = HealthCounter.initial(spec.rise, spec.fall, edge)
        return _Entry(target, counter, old.since, None, old.checks, old.up_since)
    if (spec.rise, spec.fall) != (was.rise, was.fall):
        # The same check counted on a new scale: a settled state stays settled.
        c = old.counter
        if state is Health.UP:
            health = spec.rise + spec.fall - 1 if c.health == c.top else spec.rise
        else:
            health = 0 if c.health == 0 else spec.rise - 1
        counter = HealthCounter(spec.rise, spec.fall, health)
        return _Entry(target, counter, old.since, old.last, old.checks, old.up_since)
    # Only when or how often it is checked changed: everything is kept.
    return _Entry(target, old.counter, old.since, old.last, old.checks, old.up_since)
