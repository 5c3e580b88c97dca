"""Which backends are in rotation, and at what weight: the control process's pure verdict.

Pure: no asyncio, socket, time or logging; the caller passes ``now`` (monotonic seconds)
and logs what the returned values say. This module owns admin state (enabled/draining/
maintenance) and passive ejections; it does NOT keep a copy of active-check health: every
call that needs it takes a :class:`Verdict` per backend, read from the one health owner
(``healthcheck.HealthBook``) at that moment. Output: a snapshot (eligible + weight per
backend) the control process pushes to every worker, a pure function of both.

Rules, and why:
- Ejection lasts ``eject_s x n`` for the n-th ejection in a row (Envoy's outlier detection),
  capped at ``max_eject_s``; the count resets once the backend has stayed in for
  ``max_eject_s`` since its last ejection ended.
  An ejected backend comes back when the time is up *and* active checks say it is healthy,
  or earlier when the caller ends the ejection (a passing active check: ``lb.control.backends``).
- Never more than ``max_eject_percent`` of the pool ejected at once, so a wave of errors
  caused by the clients themselves cannot empty the pool.
- Panic: when fewer than ``panic_percent`` of the enabled backends are usable, either spread
  over all enabled backends (health checks may be what is broken) or fail fast with 503.
  With zero healthy backends spreading only sends requests into timeouts, so the pool fails
  fast with 503 either way.
- Slow start: a backend that came (back) up gets ``weight x max(5%, elapsed/slow_start_s)``.
- Draining and maintenance backends get no new requests; in-flight ones finish (the worker
  keeps the connection). Maintenance keeps health checks running, so enabling it again
  puts it back at once if it is healthy.

The rules' defaults are lb.config's (``PASSIVE_DEFAULTS`` and the [[pool]] ones), so a
rotation built without a config behaves as one configured with nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from lb.config import (
    PANIC_MODE_DEFAULT,
    PANIC_PERCENT_DEFAULT,
    PASSIVE_DEFAULTS,
    SLOW_START_S_DEFAULT,
    PanicMode,
)


class AdminState(StrEnum):
    ENABLED = "enabled"
    DRAINING = "draining"
    MAINTENANCE = "maintenance"


SLOW_START_FLOOR = 0.05
SLOW_START_STEPS = 20


class OutReason(StrEnum):
    """Why a backend gets no (or less) traffic; shown beside it in /status."""

    HEALTH = "health"  # active checks say DOWN
    ADMIN = "admin"  # draining or maintenance
    WEIGHT = "weight"  # configured weight 0
    EJECTED = "ejected"  # passive ejection running
    PANIC = "panic"  # pool in panic, mode "fail" (or nothing healthy to spread over)
    SLOW_START = "slow_start"  # in rotation at a reduced weight


@dataclass(frozen=True, slots=True)
class Verdict:
    """What active checks say of a backend right now, as the rotation needs it.

    ``up_since``: when it last went DOWN -> UP (slow start ramps from there); None when it
    has been up since checking began, or checks are off.
    """

    up: bool
    up_since: float | None = None


UNCHECKED = Verdict(True, None)
"""Checks are off for the pool: the backend counts as healthy."""

Verdicts = Mapping[str, Verdict]


@dataclass(slots=True)
class BackendRecord:
    """Admin state and ejection of one backend: the facts this module owns."""

    name: str
    weight: int
    admin: AdminState = AdminState.ENABLED
    ejected_until: float = 0.0
    ejections_in_row: int = 0
    ejections_total: int = 0
    last_ejection_at: float = 0.0
    last_ejection_reason: str = ""
    ejections_ended_early: int = 0
    check_failed_while_ejected: bool = False
    """An active check begun during the current ejection failed (see ``lb.control.backends``)."""

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now

    def usable(self, now: float, verdict: Verdict) -> bool:
        return (
            self.admin is AdminState.ENABLED
            and self.weight > 0
            and verdict.up
            and not self.ejected(now)
        )


@dataclass(frozen=True, slots=True)
class Entry:
    eligible: bool
    weight: float


_ENTRIES: dict[tuple[bool, float], Entry] = {}
_ENTRIES_MAX = 65536


def entry(eligible: bool, weight: float) -> Entry:
    """The one Entry of these values: snapshots share them, so "did this backend change
    since the last push" is an identity test (a pool of thousands compared at every push)."""
    key = (eligible, weight)
    found = _ENTRIES.get(key)
    if found is None:
        if len(_ENTRIES) >= _ENTRIES_MAX:
            _ENTRIES.clear()
        found = _ENTRIES[key] = Entry(eligible, weight)
    return found


@dataclass(frozen=True, slots=True)
class Snapshot:
    pool: str
    entries: dict[str, Entry]
    panic: bool
    usable: int
    enabled: int


@dataclass(frozen=True, slots=True)
class Ejected:
    backend: str
    until: float
    duration_s: float
    reason: str


@dataclass(slots=True)
class PoolRotation:
    """All the control-side state of one pool's backends."""

    name: str
    records: dict[str, BackendRecord]
    eject_s: float = PASSIVE_DEFAULTS.eject_s
    max_eject_s: float = PASSIVE_DEFAULTS.max_eject_s
    max_eject_percent: int = PASSIVE_DEFAULTS.max_eject_percent
    slow_start_s: float = SLOW_START_S_DEFAULT
    panic_percent: int = PANIC_PERCENT_DEFAULT
    panic_mode: PanicMode = PANIC_MODE_DEFAULT

    @classmethod
    def create(
        cls, name: str, backends: Iterable[tuple[str, int]], **rules: float | int | str
    ) -> PoolRotation:
        records = {n: BackendRecord(n, w) for n, w in backends}
        return cls(name, records, **rules)  # type: ignore[arg-type]

    def set_admin(self, backend: str, state: AdminState) -> bool:
        rec = self.records[backend]
        if rec.admin is state:
            return False
        rec.admin = state
        return True

    def eject(self, backend: str, reason: str, now: float) -> Ejected | None:
        """A worker saw consecutive failures: take the backend out, if the budget allows."""
        rec = self.records.get(backend)
        if rec is None or rec.ejected(now) or rec.admin is not AdminState.ENABLED:
            return None
        total = len(self.records)
        ejected = sum(1 for r in self.records.values() if r.ejected(now))
        if (ejected + 1) * 100 > self.max_eject_percent * total:
            return None
        if rec.ejections_in_row and now - rec.ejected_until > self.max_eject_s:
            rec.ejections_in_row = 0
        rec.ejections_in_row += 1
        rec.ejections_total += 1
        duration = min(self.eject_s * rec.ejections_in_row, self.max_eject_s)
        rec.ejected_until = now + duration
        rec.last_ejection_at = now
        rec.last_ejection_reason = reason
        rec.check_failed_while_ejected = False
        return Ejected(backend, rec.ejected_until, duration, reason)

    def end_ejection(self, backend: str, now: float) -> bool:
        """End a running ejection early (the active checks vouched for the backend); the
        streak is kept, so a backend that fails again is ejected for longer."""
        rec = self.records.get(backend)
        if rec is None or not rec.ejected(now):
            return False
        rec.ejected_until = now
        rec.ejections_ended_early += 1
        return True

    def snapshot(self, now: float, verdicts: Verdicts) -> Snapshot:
        """Who gets traffic: a pure function of the records and the verdicts passed in."""
        rows = []
        for r in self.records.values():
            v = verdicts[r.name]
            enabled = r.admin is AdminState.ENABLED and r.weight > 0
            rows.append((r, v, enabled, enabled and v.up and not r.ejected(now)))
        n_enabled = sum(1 for row in rows if row[2])
        n_usable = sum(1 for row in rows if row[3])
        any_healthy = any(row[2] and row[1].up for row in rows)
        panic = bool(n_enabled) and n_usable * 100 < self.panic_percent * n_enabled
        spread = panic and self.panic_mode == "spread" and any_healthy
        entries: dict[str, Entry] = {}
        for r, v, enabled, usable in rows:
            ok = enabled if spread else (usable and not panic)
            entries[r.name] = entry(ok, self._weight(r, now, v) if ok else 0.0)
        return Snapshot(self.name, entries, panic, n_usable, n_enabled)

    def explain(self, backend: str, now: float, verdict: Verdict, snap: Snapshot) -> list[str]:
        """Every reason the backend gets no traffic or less than its weight (empty: full)."""
        rec = self.records[backend]
        entry = snap.entries.get(backend)
        out: list[OutReason] = []
        if not verdict.up:
            out.append(OutReason.HEALTH)
        if rec.admin is not AdminState.ENABLED:
            out.append(OutReason.ADMIN)
        if rec.weight <= 0:
            out.append(OutReason.WEIGHT)
        if rec.ejected(now):
            out.append(OutReason.EJECTED)
        usable = rec.usable(now, verdict)
        if snap.panic and entry is not None and entry.eligible != usable:
            # Panic overrode the normal verdict: spread took it in, or fail took it out.
            out.append(OutReason.PANIC)
        if entry is not None and entry.eligible and 0 < entry.weight < rec.weight:
            out.append(OutReason.SLOW_START)
        return [str(r) for r in out]

    def _weight(self, rec: BackendRecord, now: float, verdict: Verdict) -> float:
        if self.slow_start_s <= 0 or verdict.up_since is None:
            return float(rec.weight)
        elapsed = now - verdict.up_since
        if elapsed >= self.slow_start_s:
            return float(rec.weight)
        # Quantised so snapshots change in SLOW_START_STEPS steps, not on every push.
        step = int(elapsed / self.slow_start_s * SLOW_START_STEPS) / SLOW_START_STEPS
        return rec.weight * max(SLOW_START_FLOOR, step)

    def next_change(self, now: float, verdicts: Verdicts) -> float | None:
        """When the snapshot will change by itself (ejection ends, slow-start step)."""
        times = [r.ejected_until for r in self.records.values() if r.ejected_until > now]
        if self.slow_start_s > 0:
            tick = self.slow_start_s / SLOW_START_STEPS
            for r in self.records.values():
                up_since = verdicts[r.name].up_since
                if up_since is not None and now - up_since < self.slow_start_s:
                    steps_done = int((now - up_since) / tick) + 1
                    times.append(up_since + steps_done * tick)
        return min(times) if times else None

    def reconcile(
        self, backends: Iterable[tuple[str, int]], fresh: Collection[str] = ()
    ) -> None:
        """Config reload: keep the admin state and ejections of backends that stay, add new
        ones, drop removed ones; ``fresh`` names backends that are another server now (a
        new address): they start over."""
        new: dict[str, BackendRecord] = {}
        for name, weight in backends:
            rec = self.records.get(name)
            if rec is None:
                rec = BackendRecord(name, weight)
            elif name in fresh:  # the operator's admin state is about the name: kept
                rec = BackendRecord(name, weight, rec.admin)
            rec.weight = weight
            new[name] = rec
        self.records = new
