"""Backend selection inside a proxy worker: the balancer the hot path asks for a backend.

Pure: no asyncio, socket, time or logging. The caller passes ``now`` (monotonic seconds).

The control process decides which backends are in rotation and at what weight (health,
admin state, ejections, slow start, panic: see ``lb.rotation``) and pushes that as a
snapshot; a worker's ``Pool`` applies it and picks among the eligible ones. The worker also
ejects a backend locally the moment it sees ``consecutive_failures`` in a row, so a dead
backend leaves its rotation before the control process has even heard of it; the next
snapshot from the control process is authoritative again.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class Outcome(StrEnum):
    """What one attempt at a backend taught us (passive health)."""

    OK = "ok"
    CONNECT_FAILED = "connect_failed"
    TIMEOUT = "timeout"
    HTTP_5XX = "http_5xx"
    RESET = "reset"
    """The backend closed the connection before answering."""


FAILURES = frozenset({Outcome.CONNECT_FAILED, Outcome.TIMEOUT, Outcome.HTTP_5XX, Outcome.RESET})


@dataclass(slots=True, eq=False)
class Backend:
    """One backend as a worker sees it: where it is, whether to use it, how loaded it is."""

    pool: str
    name: str
    host: str
    port: int
    weight: float = 1.0
    eligible: bool = True
    in_flight: int = 0
    requests: int = 0
    failures_in_row: int = 0
    ejected_until: float = 0.0
    """Local ejection deadline (monotonic); 0 when not ejected locally."""
    current: float = 0.0
    """Smooth weighted round-robin accumulator."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.pool, self.name)

    def usable(self, now: float) -> bool:
        return self.eligible and self.weight > 0 and self.ejected_until <= now


@dataclass(frozen=True, slots=True)
class BackendEntry:
    """One backend's line in a snapshot from the control process."""

    eligible: bool
    weight: float


@dataclass(frozen=True, slots=True)
class Ejection:
    """Returned by ``Pool.observe`` when a backend crossed the local failure threshold."""

    pool: str
    backend: str
    outcome: Outcome


@dataclass(slots=True)
class Pool:
    """Selection among a pool's backends: round robin, least connections or two random."""

    name: str
    balance: str
    backends: list[Backend]
    consecutive_failures: int = 3
    local_eject_s: float = 1.0
    max_eject_percent: int = 50
    rng: random.Random = field(default_factory=random.Random)
    version: int = 0
    panic: bool = False
    _rr_offset: int = 0
    _by_name: dict[str, Backend] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_name = {b.name: b for b in self.backends}

    def get(self, name: str) -> Backend | None:
        return self._by_name.get(name)

    def apply(self, version: int, entries: Mapping[str, BackendEntry], panic: bool) -> None:
        """Take a snapshot from the control process; it overrides local ejections."""
        if version < self.version:
            return
        self.version = version
        self.panic = panic
        for b in self.backends:
            entry = entries.get(b.name)
            if entry is None:
                b.eligible = False
                continue
            b.eligible = entry.eligible
            b.weight = entry.weight
            b.ejected_until = 0.0
            b.failures_in_row = 0

    def pick(self, now: float, exclude: Iterable[Backend] = ()) -> Backend | None:
        """Choose a backend for a new request or connection and count it in flight."""
        if exclude:
            skip = set(map(id, exclude))
            cands = [b for b in self.backends if b.usable(now) and id(b) not in skip]
        else:
            # Hot path (every request): usable() inlined.
            cands = [
                b for b in self.backends
                if b.eligible and b.weight > 0 and b.ejected_until <= now
            ]
        if not cands:
            return None
        if len(cands) == 1:
            chosen = cands[0]
        elif self.balance == "least_connections":
            chosen = self._least(cands)
        elif self.balance == "random_two":
            chosen = self._two(cands)
        else:
            chosen = self._smooth_rr(cands)
        chosen.in_flight += 1
        chosen.requests += 1
        return chosen

    def release(self, backend: Backend) -> None:
        backend.in_flight -= 1

    def observe(self, backend: Backend, outcome: Outcome, now: float) -> Ejection | None:
        """Passive health: count failures in a row; eject locally at the threshold."""
        if outcome not in FAILURES:
            backend.failures_in_row = 0
            return None
        backend.failures_in_row += 1
        if backend.failures_in_row < self.consecutive_failures or backend.ejected_until > now:
            return None
        if not self._may_eject():
            return None
        backend.ejected_until = now + self.local_eject_s
        backend.failures_in_row = 0
        return Ejection(self.name, backend.name, outcome)

    def _may_eject(self) -> bool:
        # Out of rotation already (not eligible) does not count against the budget.
        total = len(self.backends)
        ejected = sum(1 for b in self.backends if b.ejected_until > 0 and b.eligible)
        return (ejected + 1) * 100 <= self.max_eject_percent * total

    def _smooth_rr(self, cands: list[Backend]) -> Backend:
        # nginx's smooth weighted round robin: even spread, no bursts to heavy backends.
        total = 0.0
        best = cands[0]
        for b in cands:
            b.current += b.weight
            total += b.weight
            if b.current > best.current:
                best = b
        best.current -= total
        return best

    def _least(self, cands: list[Backend]) -> Backend:
        # Rotate the starting point so ties don't always land on the first backend.
        n = len(cands)
        self._rr_offset = (self._rr_offset + 1) % n
        best = cands[self._rr_offset]
        for i in range(n):
            b = cands[(self._rr_offset + i) % n]
            if b.in_flight * best.weight < best.in_flight * b.weight:
                best = b
        return best

    def _two(self, cands: list[Backend]) -> Backend:
        a, b = self.rng.sample(cands, 2)
        return a if a.in_flight * b.weight <= b.in_flight * a.weight else b


def build_pool(
    name: str,
    balance: str,
    backends: Iterable[tuple[str, str, int, float]],
    *,
    consecutive_failures: int = 3,
    local_eject_s: float = 1.0,
    max_eject_percent: int = 50,
    eligible: bool = True,
    seed: int | None = None,
) -> Pool:
    """Make a worker pool from (name, host, port, weight) tuples."""
    return Pool(
        name=name,
        balance=balance,
        backends=[Backend(name, bn, h, p, w, eligible) for bn, h, p, w in backends],
        consecutive_failures=consecutive_failures,
        local_eject_s=local_eject_s,
        max_eject_percent=max_eject_percent,
        rng=random.Random(seed),
    )
