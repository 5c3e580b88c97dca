"""Active health checks: probes, rise/fall state, scheduler. Imports nothing from lb or failover.

The daemon's entry point is :class:`HealthChecker` fed with :class:`Target` objects (one per
backend, each with a validated :class:`CheckSpec`); it reports every :class:`CheckResult`
and every UP/DOWN :class:`Health` change through callbacks. :mod:`healthcheck.state` is the
pure core (no asyncio, time or logging);
:class:`HealthBook` is the one owner of every target's health (pure too).
"""

from .book import HealthBook, Reconciled
from .lateness import Lateness
from .probes import HttpProbe, Probe, ProbeTls, TcpProbe
from .scheduler import (
    CheckSpec,
    HealthChecker,
    OnResult,
    OnTransition,
    ProbeKind,
    Target,
    TargetKey,
    TargetState,
)
from .state import (
    CheckResult,
    CheckStatus,
    Health,
    HealthConfigError,
    HealthCounter,
    HealthError,
    Initial,
    Transition,
)
from .targets import COUNT_MAX, JITTER_MAX

__all__ = [
    "COUNT_MAX",
    "JITTER_MAX",
    "CheckResult",
    "CheckSpec",
    "CheckStatus",
    "Health",
    "HealthBook",
    "HealthChecker",
    "HealthConfigError",
    "HealthCounter",
    "HealthError",
    "HttpProbe",
    "Initial",
    "Lateness",
    "OnResult",
    "OnTransition",
    "Probe",
    "ProbeKind",
    "ProbeTls",
    "Reconciled",
    "Target",
    "TargetKey",
    "TargetState",
    "TcpProbe",
    "Transition",
]
