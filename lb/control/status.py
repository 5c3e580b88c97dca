"""The node's status as typed values: what the control process knows, built once per
question by ``Daemon.status()``.

Readers take the types: /metrics reads them directly (no parsing JSON back), the admin edge
serialises them once with :func:`to_json` (GET /status, the status page, the CLI all see that
JSON; its shape is docs/status.schema.json). Role names have one spelling for operators,
upper case (``MASTER``), from ``failover.Role.label``; only notify scripts get failover's own
lower-case values (docs/configuration.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import failover

STANDALONE = "STANDALONE"
"""The role of a node without [failover]."""


@dataclass(frozen=True, slots=True)
class CheckView:
    status: str
    code: int | None
    duration_s: float
    detail: str


@dataclass(frozen=True, slots=True)
class BackendStatus:
    name: str
    address: str
    weight: float
    effective_weight: float
    in_rotation: bool
    up: bool
    out_of_rotation: tuple[str, ...]
    checks_enabled: bool
    admin_state: str
    ejected: bool
    ejected_for_s: float
    ejections: int
    last_ejection_reason: str | None
    ejections_ended_by_checks: int
    last_check: CheckView | None
    in_flight: int
    requests: int
    errors: int
    source: str = "config"
    """Where it comes from: config, api (the overlay), dns or file (discovery)."""
    shadows: str | None = None
    """A runtime entry replaces the backend of this name from that source."""
    removing: bool = False
    """Removed at runtime, draining until its requests in flight are done."""


@dataclass(frozen=True, slots=True)
class PoolStatus:
    name: str
    balance: str
    panic: bool
    usable: int
    enabled: int
    backends: tuple[BackendStatus, ...]
    discovery: dict[str, Any] | None = None
    """lb.control.discovery.Discovery.status() of a pool with [pool.discovery]."""
    tombstoned: tuple[str, ...] = ()
    """Backends of the config (or discovery) a runtime removal hides."""
    hashing: dict[str, Any] | None = None
    """A maglev pool's lookup table (lb.control.hashing.HashTables.status)."""


@dataclass(frozen=True, slots=True)
class CertificateStatus:
    cert_file: str
    names: tuple[str, ...]
    ips: tuple[str, ...]
    not_before: float
    not_after: float
    fingerprint: str
    default: bool
    """Served to clients without SNI or with a name no certificate has."""
    handshakes: int
    """Full handshakes that chose it, since the node started."""
    resumed: int
    """Resumed handshakes that chose it."""


@dataclass(frozen=True, slots=True)
class ListenerTlsStatus:
    certificates: tuple[CertificateStatus, ...]
    min_version: str
    ticket_key: str
    """Where the session ticket key comes from: file, failover_key, random, off, or
    unsupported (this OpenSSL cannot share one: each worker has its own)."""
    failures: dict[str, int]
    """Failed handshakes by reason (lb.tls.server.FAILURE_REASONS)."""
    loaded_at: float
    ticket_key_id: str | None = None
    """SHA-256 of the ticket key, first 8 hex digits: equal on both nodes when a client can
    resume on either (the key itself is never shown)."""


@dataclass(frozen=True, slots=True)
class ListenerStatus:
    name: str
    bind: str
    mode: str
    pool: str
    tls: ListenerTlsStatus | None = None
    sni_routes: dict[str, str] | None = None
    """TCP mode: server name -> pool."""
    sni_decisions: dict[str, int] | None = None
    """TCP mode with SNI routes: connections by how their pool was chosen."""
    accept_queues: tuple[int, ...] = ()
    """Connections waiting to be accepted, per socket: one per worker slot (``reuseport``)
    or the shared one."""
    accept_helped: tuple[int, ...] = ()
    """The slots whose socket the other workers accept on too, now (lb.control.acceptwatch)."""
    accept_helps: tuple[int, ...] = ()
    """Per slot: how many times the other workers began to help it since start."""


@dataclass(frozen=True, slots=True)
class ConfigStatus:
    path: str | None
    generation: int
    digest: str
    last_reload: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    index: int
    pid: int | None
    ready: bool
    uptime_s: float
    restarts: int
    crashes: int
    hung_kills: int
    crash_loop: bool
    alive: bool = True
    """Its process runs (false in a restart backoff: the slot has no worker)."""
    rotation_version: int = 0
    """The rotation snapshot it routes by (see RotationStatus)."""
    rotation_lag_s: float = 0.0
    """How long the oldest snapshot it has not applied yet has been on its way (0: it
    routes by the last one pushed, or its process is gone)."""


@dataclass(frozen=True, slots=True)
class RetiringWorkerStatus:
    """An old worker of a rolling replacement, still routing its last requests."""

    index: int
    pid: int | None
    rotation_version: int
    rotation_lag_s: float


@dataclass(frozen=True, slots=True)
class RotationStatus:
    """The rotation the control process pushed to the workers last: a request that reaches
    a worker whose ``rotation_version`` is this one is routed by it."""

    version: int
    pending: bool
    """A change is waiting for the next push (they are coalesced, HEALTH_PUSH_GAP_S)."""
    applied: int = 0
    """Pushed snapshots the workers applied since start (each worker's counts)."""
    apply_p50_s: float = 0.0
    apply_p99_s: float = 0.0
    apply_max_10s_s: float = 0.0
    apply_max_60s_s: float = 0.0
    """From a push to the worker's SnapApplied: p50/p99 since start, worst of 10 s/60 s."""


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    """The failover process as its supervisor sees it."""

    pid: int | None
    running: bool
    uptime_s: float
    status_age_s: float | None
    restarts: int
    crashes: int
    hung_kills: int
    crash_loop: bool
    control_silent_s: float = 0.0
    """How long the control process had been silent, as the failover process saw it when it
    last reported (past failover.control_timeout_s the node counts as unhealthy)."""
    heartbeat_gap_samples: int = 0
    """How many sent gaps FailoverView's gap maxima are taken over (at most
    lb.failoverd.link.GAP_SAMPLES)."""
    log_lines_written: int = 0
    log_lines_dropped: int = 0
    """The failover process's log lines (lb.log.counts), as it last reported them."""


@dataclass(frozen=True, slots=True)
class FailoverView:
    """What the failover process last reported, and how the control process runs it.
    ``gaps`` and ``process`` are None for a controller in this process (tests)."""

    status: failover.FailoverStatus
    interface: str
    vips: tuple[str, ...]
    sent_gap_max_s: float | None = None
    received_gap_max_s: float | None = None
    process: ProcessStatus | None = None


@dataclass(frozen=True, slots=True)
class HealthChecksStatus:
    targets: int
    in_flight: int
    checks: int
    lateness_p50_s: float
    lateness_p99_s: float
    lateness_max_s: float
    lateness_max_10s_s: float
    lateness_max_60s_s: float


@dataclass(frozen=True, slots=True)
class NodeStatus:
    node: str
    version: str
    pid: int
    started_at: float
    uptime_s: float
    config: ConfigStatus
    listeners: tuple[ListenerStatus, ...]
    pools: tuple[PoolStatus, ...]
    workers: tuple[WorkerStatus, ...]
    failover: FailoverView | None
    role: str
    """The failover role's ``label``, or STANDALONE."""
    events: tuple[dict[str, Any], ...]
    health_checks: HealthChecksStatus
    ready: bool
    runtime: dict[str, Any] | None = None
    """Runtime pool changes: the overlay, the last composition's notes, the peer channel
    (lb.control.elastic.Elastic.status)."""
    rotation: RotationStatus = RotationStatus(0, False)
    workers_retiring: tuple[RetiringWorkerStatus, ...] = ()


# -- the one serialisation ------------------------------------------------------------------


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _backend_json(b: BackendStatus) -> dict[str, Any]:
    c = b.last_check
    return {
        "name": b.name,
        "address": b.address,
        "weight": b.weight,
        "effective_weight": b.effective_weight,
        "in_rotation": b.in_rotation,
        "health": "up" if b.up else "down",
        "out_of_rotation": list(b.out_of_rotation),
        "checks_enabled": b.checks_enabled,
        "admin_state": b.admin_state,
        "ejected": b.ejected,
        "ejected_for_s": round(b.ejected_for_s, 3),
        "ejections": b.ejections,
        "last_ejection_reason": b.last_ejection_reason,
        "ejections_ended_by_checks": b.ejections_ended_by_checks,
        "last_check": None if c is None else {
            "status": c.status, "code": c.code, "duration_ms": _ms(c.duration_s),
            "detail": c.detail,
        },
        "in_flight": b.in_flight,
        "requests": b.requests,
        "errors": b.errors,
        "source": b.source,
        "shadows": b.shadows,
        "removing": b.removing,
    }


def _failover_json(v: FailoverView) -> dict[str, Any]:
    st = v.status
    out: dict[str, Any] = {
        "role": st.role.label,
        "reason": st.role_reason,
        "since": st.role_since,
        "priority": st.priority,
        "effective_priority": st.priority if st.healthy else 0,
        "interface": v.interface,
        "vips": list(v.vips),
        "vip_held": st.vip_holding,
        "healthy": st.healthy,
        "faults": list(st.faults),
        "switchover_pending": st.switchover_pending,
        "master_down_s": st.master_down_s,
        "peers": [
            {
                "name": p.name,
                "addresses": [path.address for path in p.paths],
                "alive": p.alive,
                "last_heard_s": round(p.last_heard_age_s, 4),
                "role": p.role.label,
                "priority": p.priority,
                "config_digest_match": p.config_digest_match,
                "healthy_backends": p.healthy_count,
                "total_backends": p.total_count,
                "clock_offset_s": None if p.clock_offset_s is None
                else round(p.clock_offset_s, 4),
                "clock_skew_warning": p.clock_skew_warning,
                "key_id": p.key_id,
                "interval_s": p.interval_s,
            }
            for p in st.peers
        ],
        "max_clock_skew_s": st.max_clock_skew_s,
        "clock_skew_warning": st.clock_skew_warning,
        "rejected_clocks": [
            {"name": c.name, "offset_s": round(c.offset_s, 3),
             "last_seen_s": round(c.last_seen_age_s, 3)}
            for c in st.rejected_clocks
        ],
        "keys": [{"id": k.key_id, "signing": k.signing, "verified": k.verified}
                 for k in st.keys],
        "gateway": None if st.gateway is None else {
            "up": st.gateway.up,
            "targets": [
                {"target": t.target, "ok": t.ok, "detail": t.detail,
                 "rtt_ms": None if t.rtt_s is None else _ms(t.rtt_s),
                 "successes": t.successes, "failures": t.failures}
                for t in st.gateway.targets
            ],
            "interval_s": st.gateway.interval_s,
            "timeout_s": st.gateway.timeout_s,
            "fall": st.gateway.fall,
            "rise": st.gateway.rise,
            "transitions": st.gateway.transitions,
        },
        "counters": {
            "heartbeats_sent": st.counters.heartbeats_sent,
            "heartbeats_received": st.counters.heartbeats_received,
            "rejected": {str(k): n for k, n in st.counters.rejected.items()},
            "transitions": {
                f"{a.label}->{b.label}": n
                for (a, b), n in st.counters.transitions.items()
            },
            "duplicates": st.counters.duplicates,
            "late_sends": st.counters.late_sends,
            "delayed": st.counters.delayed,
            "heartbeat_send_errors": st.heartbeat_send_errors,
            "vip_errors": st.counters.vip_errors,
            "vip_announcements": st.vip_announcements,
            "vip_announcement_errors": st.vip_announcement_errors,
            "interval_clamped": dict(st.counters.interval_clamped),
            "internal_errors": st.counters.internal_errors,
        },
        "notify": {
            "runs": st.notify.runs,
            "failures": st.notify.failures,
            "timeouts": st.notify.timeouts,
            "dropped": st.notify.dropped,
        },
        "handover": {
            "enabled": st.handover_enabled,
            "forwarding_to": st.handover_forwarding_to,
            "forwards": st.handover_forwards,
        },
        "send_lag_ms": {
            "samples": st.send_lag.samples,
            "p50": _ms(st.send_lag.p50_s),
            "p99": _ms(st.send_lag.p99_s),
            "max": _ms(st.send_lag.max_s),
        },
    }
    if v.process is not None:
        p = v.process
        out["heartbeat_gap_ms"] = {
            "samples": p.heartbeat_gap_samples,
            "sent_max": _ms(v.sent_gap_max_s or 0.0),
            "received_max": _ms(v.received_gap_max_s or 0.0),
        }
        out["process"] = {
            "pid": p.pid, "running": p.running, "uptime_s": p.uptime_s,
            "status_age_s": p.status_age_s, "restarts": p.restarts, "crashes": p.crashes,
            "hung_kills": p.hung_kills, "crash_loop": p.crash_loop,
            "control_silent_s": p.control_silent_s,
            "log_lines": {"written": p.log_lines_written, "dropped": p.log_lines_dropped},
        }
    return out


def _listener_json(lst: ListenerStatus) -> dict[str, Any]:
    out: dict[str, Any] = {"name": lst.name, "bind": lst.bind, "mode": lst.mode,
                           "pool": lst.pool}
    if lst.tls is not None:
        t = lst.tls
        out["tls"] = {
            "min_version": t.min_version,
            "ticket_key": t.ticket_key,
            "ticket_key_id": t.ticket_key_id,
            "loaded_at": t.loaded_at,
            "failures": dict(sorted(t.failures.items())),
            "certificates": [
                {"cert_file": c.cert_file, "names": list(c.names), "ips": list(c.ips),
                 "not_before": c.not_before, "not_after": c.not_after,
                 "fingerprint": c.fingerprint, "default": c.default,
                 "handshakes": c.handshakes, "resumed": c.resumed}
                for c in t.certificates
            ],
        }
    if lst.sni_routes is not None:
        out["sni_routes"] = dict(lst.sni_routes)
        out["sni_decisions"] = dict(sorted((lst.sni_decisions or {}).items()))
    out["accept"] = {"queues": list(lst.accept_queues), "helped": list(lst.accept_helped),
                     "helps": list(lst.accept_helps)}
    return out


def to_json(st: NodeStatus) -> dict[str, Any]:
    """The JSON of GET /status (docs/status.schema.json): the one place it is written."""
    hc = st.health_checks
    return {
        "node": st.node,
        "version": st.version,
        "pid": st.pid,
        "started_at": st.started_at,
        "uptime_s": st.uptime_s,
        "config": {
            "path": st.config.path,
            "generation": st.config.generation,
            "digest": st.config.digest,
            "last_reload": st.config.last_reload,
        },
        "listeners": [_listener_json(lst) for lst in st.listeners],
        "pools": [
            {
                "name": p.name,
                "balance": p.balance,
                "panic": p.panic,
                "usable": p.usable,
                "enabled": p.enabled,
                "backends": [_backend_json(b) for b in p.backends],
                "discovery": p.discovery,
                "tombstoned": list(p.tombstoned),
                "hashing": p.hashing,
            }
            for p in st.pools
        ],
        "workers": [
            {"index": w.index, "pid": w.pid, "ready": w.ready, "uptime_s": w.uptime_s,
             "restarts": w.restarts, "crashes": w.crashes, "hung_kills": w.hung_kills,
             "crash_loop": w.crash_loop, "alive": w.alive,
             "rotation_version": w.rotation_version,
             "rotation_lag_s": round(w.rotation_lag_s, 3)}
            for w in st.workers
        ],
        "workers_retiring": [
            {"index": w.index, "pid": w.pid, "rotation_version": w.rotation_version,
             "rotation_lag_s": round(w.rotation_lag_s, 3)}
            for w in st.workers_retiring
        ],
        "rotation": {
            "version": st.rotation.version,
            "pending": st.rotation.pending,
            "applied": st.rotation.applied,
            "apply_ms": {
                "p50": _ms(st.rotation.apply_p50_s),
                "p99": _ms(st.rotation.apply_p99_s),
                "max_10s": _ms(st.rotation.apply_max_10s_s),
                "max_60s": _ms(st.rotation.apply_max_60s_s),
            },
        },
        "failover": None if st.failover is None else _failover_json(st.failover),
        "role": st.role,
        "events": list(st.events),
        "runtime": st.runtime,
        "health_checks": {
            "targets": hc.targets,
            "in_flight": hc.in_flight,
            "checks": hc.checks,
            "lateness_ms": {
                "p50": _ms(hc.lateness_p50_s),
                "p99": _ms(hc.lateness_p99_s),
                "max": _ms(hc.lateness_max_s),
            },
            "lateness_max_ms": {
                "10s": _ms(hc.lateness_max_10s_s),
                "60s": _ms(hc.lateness_max_60s_s),
            },
        },
        "ready": st.ready,
    }
