"""Check results and the rise/fall health counter: the pure core of active health checks.

HAProxy's model (src/check.c): health is ONE bounded counter ``health`` in
``[0, rise + fall - 1]``; the target is UP when ``health >= rise``.

- a passing check increments (capped at the top), a failing one decrements (floored at 0);
- when a failure takes an UP target below ``rise`` it goes DOWN and the counter snaps to 0;
  when a success takes a DOWN target up to ``rise`` it goes UP and the counter snaps to the
  top. The snap is the hysteresis: from fully UP it takes ``fall`` consecutive failures to go
  DOWN, from fully DOWN ``rise`` consecutive successes to go UP, and results that alternate
  around the threshold cannot flap the state.

Initial state (the issue's "a new backend gets no traffic before its first passing check"):

- ``initial="down"`` (default): DOWN with ``health = rise - 1``, so ONE passing check brings a
  new backend UP and none of its traffic is sent before that check passed. We do not start at
  0 (which would need ``rise`` passes) because a freshly added backend is usually healthy and
  making it wait ``rise`` intervals only slows deployments.
- ``initial="up"``: UP with ``health = rise`` ("UP, going down" in HAProxy's words), so the
  first failing check takes it out at once rather than after ``fall`` checks.

Pure: imports no asyncio, socket, time or logging; nothing from lb or failover.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CheckResult",
    "CheckStatus",
    "Health",
    "HealthConfigError",
    "HealthCounter",
    "HealthError",
    "Initial",
    "Transition",
]

Initial = Literal["down", "up"]


class HealthError(Exception):
    """Root of the healthcheck package's exceptions."""


class HealthConfigError(HealthError, ValueError):
    """A check setting is invalid; names the field so the daemon can prefix its dotted path.

    ``str()`` reads ``interval_s: must be > 0 (got -1)``; the daemon prepends
    ``pool.<name>.health.`` using ``field``.
    """

    def __init__(self, field: str, value: object, rule: str) -> None:
        super().__init__(f"{field}: {rule} (got {value!r})")
        self.field = field
        self.value = value
        self.rule = rule


class CheckStatus(enum.StrEnum):
    """Outcome label of one probe; shown in logs, the admin API and as a metric label.

    L4_* labels describe the TCP connect, L7_* what happened after it succeeded; L6_* the
    TLS handshake in between, for a pool with ``[pool.tls]`` (HAProxy's L6TOUT and L6RSP;
    ``detail`` carries OpenSSL's reason). A ``tcp`` check over TLS that completes the
    handshake reports L4_OK, so the passing labels stay L4_OK and L7_OK.
    A body that lacks the expected substring gets its own label, L7_BODY_MISMATCH, instead
    of reusing L7_STATUS: "status 200 but wrong body" and "status 503" need different fixes,
    and the operator should not have to read ``detail`` to tell them apart.
    """

    L4_OK = "L4_OK"  # TCP probe: connect succeeded
    L4_TIMEOUT = "L4_TIMEOUT"  # no connection within the time budget
    L4_REFUSED = "L4_REFUSED"  # RST in answer to SYN: nothing listens
    L4_ERROR = "L4_ERROR"  # other connect failure (unreachable, DNS, ...)
    L6_TIMEOUT = "L6_TIMEOUT"  # TLS pool: connected, but the handshake did not end in time
    L6_ERROR = "L6_ERROR"  # TLS pool: the handshake failed (verification, protocol, not TLS)
    L7_OK = "L7_OK"  # HTTP probe: expected status (and body substring)
    L7_STATUS = "L7_STATUS"  # status outside the expected ranges; code is set
    L7_BODY_MISMATCH = "L7_BODY_MISMATCH"  # status fine, body substring missing
    L7_TIMEOUT = "L7_TIMEOUT"  # connected, but no verdict within the time budget
    L7_BAD_RESPONSE = "L7_BAD_RESPONSE"  # not HTTP, closed or reset before a response


_PASSING = frozenset({CheckStatus.L4_OK, CheckStatus.L7_OK})


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One probe's outcome. ``code`` is the HTTP status when one was read, else None."""

    status: CheckStatus
    duration_s: float
    code: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in _PASSING


class Health(enum.StrEnum):
    UP = "UP"
    DOWN = "DOWN"


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of health state, returned by :meth:`HealthCounter.step`."""

    old: Health
    new: Health


@dataclass(frozen=True, slots=True)
class HealthCounter:
    """HAProxy's bounded health counter; see the module docstring for the rules."""

    rise: int
    fall: int
    health: int

    def __post_init__(self) -> None:
        if self.rise < 1:
            raise HealthConfigError("rise", self.rise, "must be >= 1")
        if self.fall < 1:
            raise HealthConfigError("fall", self.fall, "must be >= 1")
        if not 0 <= self.health <= self.top:
            raise HealthConfigError(
                "health", self.health, f"must be in [0, rise + fall - 1 = {self.top}]"
            )

    @classmethod
    def initial(cls, rise: int, fall: int, initial: Initial = "down") -> HealthCounter:
        """The counter a new target starts with (module docstring: why these values)."""
        if initial == "down":
            return cls(rise, fall, rise - 1)
        if initial == "up":
            return cls(rise, fall, rise)
        raise HealthConfigError("initial", initial, 'must be "down" or "up"')

    @property
    def top(self) -> int:
        return self.rise + self.fall - 1

    @property
    def state(self) -> Health:
        return Health.UP if self.health >= self.rise else Health.DOWN

    @property
    def changing(self) -> bool:
        """Strictly between the extremes: a state change may be near, so check faster."""
        return 0 < self.health < self.top

    def step(self, result_ok: bool) -> tuple[HealthCounter, Transition | None]:
        """Apply one check result; return the new counter and the transition, if any."""
        h, rise = self.health, self.rise
        if result_ok:
            if h >= rise:
                return self._with(min(h + 1, self.top)), None
            if h + 1 >= rise:
                return self._with(self.top), Transition(Health.DOWN, Health.UP)
            return self._with(h + 1), None
        if h > rise:
            return self._with(h - 1), None
        if h == rise:
            return self._with(0), Transition(Health.UP, Health.DOWN)
        return self._with(max(h - 1, 0)), None

    def _with(self, health: int) -> HealthCounter:
        if health == self.health:
            return self
        return HealthCounter(self.rise, self.fall, health)
