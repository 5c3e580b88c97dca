"""What to check and how: validated check settings and targets, shared by the book and the
scheduler. Field names, defaults and bounds are written here once; the daemon's config maps
onto them (``lb.config`` reads the defaults from :class:`CheckSpec`).

Imports nothing from lb or failover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .probes import HttpProbe, Probe, ProbeTls, TcpProbe
from .state import Health, HealthConfigError, HealthCounter, Initial

__all__ = [
    "COUNT_MAX", "JITTER_MAX", "CheckSpec", "ProbeKind", "ProbeTls", "Target", "TargetKey",
]

COUNT_MAX = 100
"""Largest ``rise`` / ``fall``: more checks in a row than this is a misconfiguration."""
JITTER_MAX = 0.5
"""Largest ``jitter``: beyond half the interval the cadence stops meaning anything."""

ProbeKind = Literal["http", "tcp"]
TargetKey = tuple[str, str]
"""``(pool, backend)``: names that appear in logs, metrics and the admin API."""


@dataclass(frozen=True, slots=True)
class CheckSpec:
    """Validated check settings of one target; field names follow the TOML contract.

    ``expect_status`` holds inclusive ``(lo, hi)`` ranges; lists (from TOML) are turned into
    tuples so equal configs compare equal across reloads.

    ``tls``: run the check over TLS (a pool with ``[pool.tls]``; :class:`ProbeTls`). Its
    ``ssl.SSLContext`` takes no part in equality; what the context does (verification, CA
    certificates, minimum version) and the server name do, through ``tls.tested()``, so a
    reload with the same TLS settings keeps the evidence and one that changes the CA file's
    content or the server name starts it afresh.
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
    reuse_connection: bool = False
    tls: ProbeTls | None = None

    def __post_init__(self) -> None:
        ranges = tuple((int(lo), int(hi)) for lo, hi in self.expect_status)
        object.__setattr__(self, "expect_status", ranges)
        if self.probe not in ("http", "tcp"):
            raise HealthConfigError("probe", self.probe, 'must be "http" or "tcp"')
        for name in ("interval_s", "fast_interval_s", "down_interval_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise HealthConfigError(name, value, "must be > 0")
        if not 0 <= self.jitter <= JITTER_MAX:
            raise HealthConfigError("jitter", self.jitter, f"must be in [0, {JITTER_MAX}]")
        for name in ("rise", "fall"):
            if getattr(self, name) > COUNT_MAX:
                raise HealthConfigError(name, getattr(self, name), f"must be <= {COUNT_MAX}")
        HealthCounter.initial(self.rise, self.fall, self.initial)  # validates rise/fall/initial
        self.make_probe()  # validates method/path/host/expect_*/timeout_s

    def tested(self) -> tuple[object, ...]:
        """The settings that decide whether a probe passes. A reload that changes one of
        them makes the old counter evidence about another check; the others (interval_s,
        fast/down intervals, jitter, initial, rise/fall) only change when or how often,
        reuse_connection only whether a passing check's connection is kept, and
        ``tls.resume_s`` only how often the handshake is a full one."""
        return (
            self.probe, self.method, self.path, self.host, self.expect_status,
            self.expect_body, self.timeout_s, None if self.tls is None else self.tls.tested(),
        )

    @staticmethod
    def timeout_rule(timeout_s: float, interval_s: float) -> str | None:
        """A probe should end before the next one is due; the broken rule, or None. The
        config applies it (a direct CheckSpec may overrun: the next check then starts at
        once)."""
        if timeout_s > interval_s:
            return f"must be <= interval_s (got timeout_s={timeout_s}, interval_s={interval_s})"
        return None

    def make_probe(self) -> Probe:
        if self.probe == "tcp":
            return TcpProbe(self.timeout_s, tls=self.tls)
        return HttpProbe(
            method=self.method,
            path=self.path,
            host=self.host,
            expect_status=self.expect_status,
            expect_body=self.expect_body,
            timeout_s=self.timeout_s,
            reuse_connection=self.reuse_connection,
            tls=self.tls,
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
    server: str | None = None
    """What this is a check of (the backend's traffic address). A reload that changes it is
    another server (fresh state); one that changes only the check port is not. None: the
    checked ``host:port`` is the server."""

    @property
    def identity(self) -> object:
        return self.server if self.server is not None else (self.host, self.port)

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise HealthConfigError("port", self.port, "must be in 1..65535")
