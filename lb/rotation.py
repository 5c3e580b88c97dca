"""Which backends are in rotation, and at what weight: the control process's pure verdict.

Pure: no asyncio, socket, time or logging; the caller passes ``now`` (monotonic seconds)
and logs what the returned values say. Inputs: active-check health, admin state
(enabled/draining/maintenance), passive ejections reported by workers, slow start and the
pool's panic threshold. Output: a snapshot (eligible + weight per backend) the control
process pushes to every worker.

Rules, and why:
- Ejection lasts ``eject_s x n`` for the n-th ejection in a row (Envoy's outlier detection),
  capped at ``max_eject_s``; the count resets once the backend has stayed in for
  ``max_eject_s`` since its last ejection ended.
  An ejected backend comes back when the time is up *and* active checks say it is healthy.
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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class AdminState(StrEnum):
    ENABLED = "enabled"
    DRAINING = "draining"
    MAINTENANCE = "maintenance"


SLOW_START_FLOOR = 0.05
SLOW_START_STEPS = 20


@dataclass(slots=True)
class BackendRecord:
    name: str
    weight: int
    healthy: bool
    admin: AdminState = AdminState.ENABLED
    ejected_until: float = 0.0
    ejections_in_row: int = 0
    ejections_total: int = 0
    last_ejection_at: float = 0.0
    last_ejection_reason: str = ""
    up_since: float | None = None
    """When it last became healthy (for slow start); None while down."""

    def ejected(self, now: float) -> bool:
        return self.ejected_until > now

    def usable(self, now: float) -> bool:
        return (
            self.admin is AdminState.ENABLED
            and self.weight > 0
            and self.healthy
            and not self.ejected(now)
        )


@dataclass(frozen=True, slots=True)
class Entry:
    eligible: bool
    weight: float


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
    eject_s: float = 10.0
    max_eject_s: float = 300.0
    max_eject_percent: int = 50
    slow_start_s: float = 0.0
    panic_percent: int = 50
    panic_mode: str = "spread"

    @classmethod
    def create(
        cls,
        name: str,
        backends: Iterable[tuple[str, int]],
        *,
        initially_healthy: bool,
        **rules: float | int | str,
    ) -> PoolRotation:
        records = {n: BackendRecord(n, w, initially_healthy) for n, w in backends}
        return cls(name, records, **rules)  # type: ignore[arg-type]

    def set_health(self, backend: str, healthy: bool, now: float) -> bool:
        """Record an active-check verdict; True if it changed."""
        rec = self.records[backend]
        if rec.healthy == healthy:
            return False
        rec.healthy = healthy
        rec.up_since = now if healthy else None
        return True

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
        return Ejected(backend, rec.ejected_until, duration, reason)

    def snapshot(self, now: float) -> Snapshot:
        enabled = [r for r in self.records.values() if r.admin is AdminState.ENABLED and r.weight]
        usable = [r for r in enabled if r.usable(now)]
        healthy = [r for r in enabled if r.healthy]
        panic = bool(enabled) and len(usable) * 100 < self.panic_percent * len(enabled)
        entries: dict[str, Entry] = {}
        for r in self.records.values():
            if panic and self.panic_mode == "spread" and healthy:
                ok = r.admin is AdminState.ENABLED and r.weight > 0
            elif panic:
                ok = False
            else:
                ok = r.usable(now)
            entries[r.name] = Entry(ok, self._weight(r, now) if ok else 0.0)
        return Snapshot(self.name, entries, panic, len(usable), len(enabled))

    def _weight(self, rec: BackendRecord, now: float) -> float:
        if self.slow_start_s <= 0 or rec.up_since is None:
            return float(rec.weight)
        elapsed = now - rec.up_since
        if elapsed >= self.slow_start_s:
            return float(rec.weight)
        # Quantised so snapshots change in SLOW_START_STEPS steps, not on every push.
        step = int(elapsed / self.slow_start_s * SLOW_START_STEPS) / SLOW_START_STEPS
        return rec.weight * max(SLOW_START_FLOOR, step)

    def next_change(self, now: float) -> float | None:
        """When the snapshot will change by itself (ejection ends, slow-start step)."""
        times = [r.ejected_until for r in self.records.values() if r.ejected_until > now]
        if self.slow_start_s > 0:
            tick = self.slow_start_s / SLOW_START_STEPS
            for r in self.records.values():
                if r.up_since is not None and now - r.up_since < self.slow_start_s:
                    steps_done = int((now - r.up_since) / tick) + 1
                    times.append(r.up_since + steps_done * tick)
        return min(times) if times else None

    def reconcile(self, backends: Iterable[tuple[str, int]], *, initially_healthy: bool) -> None:
        """Config reload: keep the state of backends that stay, add new ones, drop removed."""
        new: dict[str, BackendRecord] = {}
        for name, weight in backends:
            rec = self.records.get(name)
            if rec is None:
                rec = BackendRecord(name, weight, initially_healthy)
            rec.weight = weight
            new[name] = rec
        self.records = new
