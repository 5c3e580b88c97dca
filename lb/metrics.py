"""Prometheus metrics of a pairlb node, read from the control process's state at scrape time.

Why a collector and not counters updated in place: the truth lives elsewhere (the workers'
merged counter deltas, the rotation, the health checker, the failover controller, the
supervisor). Copying it into prometheus_client objects on every change would be a second
copy that can drift; reading it at scrape time cannot. The only state kept here is the
health-check duration histogram, fed by ``daemon.check_observers``.

One ``CollectorRegistry`` per app (never the global one, so tests and several daemons in one
process never share metrics). Every family this module can export is declared in
``METRICS`` (name, type, labels, help): docs, the Grafana dashboard test and
``describe()`` all read that table. Label sets are bounded by the config (pool, backend,
listener, worker slot, peer) or by code (status classes, reasons, roles): never a client,
path or request id.

prometheus_client may be imported only here and in lb.admin. Must not import lb.daemon at run
time (the daemon imports us), nor failover or healthcheck internals.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from lb import __version__
from lb.rotation import AdminState
from lb.stats import CLASSES, DURATION_BUCKETS_S

if TYPE_CHECKING:
    from collections import deque

    from healthcheck import CheckResult
    from lb.config import Config
    from lb.supervisor import Supervisor

ROLES = ("MASTER", "BACKUP", "FAULT", "INIT", "STANDALONE")
"""Every value the ``role`` label can take (one-hot gauges)."""

CHECK_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
"""Health-check duration buckets: probes have a timeout of a few seconds at most."""

Kind = Literal["counter", "gauge", "histogram", "info"]


@dataclass(frozen=True, slots=True)
class MetricDef:
    """One exported family. ``name`` is the name in the exposition (counters end _total,
    info metrics _info; histograms add _bucket/_sum/_count)."""

    name: str
    kind: Kind
    labels: tuple[str, ...]
    help: str
    failover_only: bool = False


def _d(name: str, kind: Kind, labels: str, help: str, failover_only: bool = False) -> MetricDef:
    return MetricDef(name, kind, tuple(labels.split()), help, failover_only)


METRICS: tuple[MetricDef, ...] = (
    # node
    _d("pairlb_build_info", "info", "version node", "pairlb version and node name (always 1)."),
    _d("pairlb_start_time_seconds", "gauge", "", "Start of the control process, unix time."),
    _d("pairlb_ready", "gauge", "", "1 when this node can serve (as GET /readyz), else 0."),
    _d("pairlb_config_generation", "gauge", "", "Config generation; +1 on each applied reload."),
    _d("pairlb_config_info", "info", "digest", "Digest of the pools and listeners (always 1)."),
    _d("pairlb_config_reloads_total", "counter", "result", "Reloads by result (success/failure)."),
    _d(
        "pairlb_config_last_reload_successful",
        "gauge",
        "",
        "0 when the last reload was rejected (the old config is kept), else 1.",
    ),
    # traffic (merged from every worker)
    _d(
        "pairlb_requests_total",
        "counter",
        "pool backend code_class",
        "Responses sent to clients by status class; backend '-' when none was chosen.",
    ),
    _d(
        "pairlb_request_duration_seconds",
        "histogram",
        "pool",
        "Time from request start to the end of the response, per pool.",
    ),
    _d(
        "pairlb_backend_errors_total",
        "counter",
        "pool backend reason",
        "Failed attempts at a backend (connect, timeout, reset, 5xx, ...) by reason.",
    ),
    _d("pairlb_retries_total", "counter", "pool reason", "Requests retried on another backend."),
    _d(
        "pairlb_bad_requests_total",
        "counter",
        "listener reason code",
        "Client requests rejected by the proxy (malformed, too large, slow) by reason.",
    ),
    _d("pairlb_connections_accepted_total", "counter", "listener", "Client connections accepted."),
    _d("pairlb_connections_active", "gauge", "listener", "Client connections open now."),
    _d("pairlb_tcp_connections_total", "counter", "pool backend", "TCP-mode connections piped."),
    _d(
        "pairlb_tcp_bytes_total",
        "counter",
        "pool backend direction",
        "TCP-mode bytes piped; direction 'in' and 'out' as counted by the TCP proxy.",
    ),
    # pools and backends
    _d("pairlb_backend_healthy", "gauge", "pool backend", "1 when active checks say UP."),
    _d(
        "pairlb_backend_admin_state",
        "gauge",
        "pool backend state",
        "1 for the backend's admin state (enabled/draining/maintenance), 0 for the others.",
    ),
    _d(
        "pairlb_backend_in_rotation",
        "gauge",
        "pool backend",
        "1 when new requests may go to the backend.",
    ),
    _d(
        "pairlb_backend_effective_weight",
        "gauge",
        "pool backend",
        "Weight used for balancing now (slow start lowers it; 0 out of rotation).",
    ),
    _d(
        "pairlb_backend_inflight_requests",
        "gauge",
        "pool backend",
        "Requests at the backend now, over all workers.",
    ),
    _d("pairlb_backend_ejected", "gauge", "pool backend", "1 while passive checks eject it."),
    _d(
        "pairlb_backend_ejections_total",
        "counter",
        "pool backend",
        "Passive-check ejections (consecutive failures seen by the proxy).",
    ),
    _d(
        "pairlb_backend_ejections_ended_total",
        "counter",
        "pool backend",
        "Ejections ended early because active checks vouched for the backend.",
    ),
    _d("pairlb_pool_panic", "gauge", "pool", "1 while too few backends are usable (panic)."),
    _d("pairlb_pool_usable_backends", "gauge", "pool", "Backends that can take requests."),
    _d("pairlb_pool_enabled_backends", "gauge", "pool", "Backends not drained or in maintenance."),
    _d(
        "pairlb_health_checks_total",
        "counter",
        "pool backend status",
        "Active health-check results by L4/L7 status label.",
    ),
    _d(
        "pairlb_health_check_duration_seconds",
        "histogram",
        "pool backend",
        "Duration of active health checks.",
    ),
    # failover
    _d("pairlb_role", "gauge", "role", "1 for this node's role, 0 for the other roles."),
    _d(
        "pairlb_role_changed_timestamp_seconds",
        "gauge",
        "",
        "When this node entered its current role, unix time.",
        True,
    ),
    _d(
        "pairlb_role_transitions_total",
        "counter",
        "from to",
        "Role changes of this node.",
        True,
    ),
    _d("pairlb_failover_priority", "gauge", "", "Configured election priority.", True),
    _d(
        "pairlb_failover_effective_priority",
        "gauge",
        "",
        "Priority announced now (lowered without healthy backends; 0 when leaving).",
        True,
    ),
    _d("pairlb_vip_held", "gauge", "", "1 while this node holds the virtual IPs.", True),
    _d("pairlb_heartbeats_sent_total", "counter", "", "Heartbeats sent.", True),
    _d("pairlb_heartbeats_received_total", "counter", "", "Valid heartbeats received.", True),
    _d(
        "pairlb_heartbeats_rejected_total",
        "counter",
        "reason",
        "Heartbeats dropped (bad HMAC, replay, malformed, ...) by reason.",
        True,
    ),
    _d(
        "pairlb_peer_heartbeat_age_seconds",
        "gauge",
        "peer",
        "Time since the peer's last valid heartbeat; +Inf if never heard.",
        True,
    ),
    _d(
        "pairlb_peer_role",
        "gauge",
        "peer role",
        "1 for the role the peer last announced, 0 for the others.",
        True,
    ),
    _d("pairlb_peer_priority", "gauge", "peer", "Priority the peer last announced.", True),
    _d(
        "pairlb_peer_config_digest_match",
        "gauge",
        "peer",
        "1 when the peer's pools and listeners digest equals ours.",
        True,
    ),
    _d(
        "pairlb_peer_healthy_backends",
        "gauge",
        "peer",
        "Healthy backends the peer last reported.",
        True,
    ),
    _d("pairlb_peer_backends", "gauge", "peer", "Backends the peer last reported.", True),
    _d(
        "pairlb_peer_alive",
        "gauge",
        "peer",
        "1 while the peer's heartbeats arrive in time (it is not declared down).",
        True,
    ),
    _d(
        "pairlb_failover_alive_peers",
        "gauge",
        "",
        "Peers heard in time; 0 means this node is alone (peers never heard have no series).",
        True,
    ),
    _d(
        "pairlb_failover_healthy",
        "gauge",
        "",
        "1 when this node may hold the VIP (tracked links up, healthy backends found).",
        True,
    ),
    _d(
        "pairlb_heartbeat_late_sends_total",
        "counter",
        "",
        "Heartbeats sent more than one interval late (the failover process's loop stalled).",
        True,
    ),
    _d(
        "pairlb_heartbeat_send_lag_p99_seconds",
        "gauge",
        "",
        "How late heartbeats left, 99th percentile over the last 4096 sends.",
        True,
    ),
    _d(
        "pairlb_heartbeat_send_lag_max_seconds",
        "gauge",
        "",
        "How late the latest of the last 4096 heartbeats left.",
        True,
    ),
    _d(
        "pairlb_heartbeat_send_gap_max_seconds",
        "gauge",
        "",
        "Longest time between two heartbeats sent to one peer address (last 4096).",
        True,
    ),
    _d(
        "pairlb_heartbeat_receive_gap_max_seconds",
        "gauge",
        "",
        "Longest time between two datagrams from one peer address (last 4096).",
        True,
    ),
    _d(
        "pairlb_failover_process_up",
        "gauge",
        "",
        "1 while the failover process runs the controller (heartbeats, VIP), else 0.",
        True,
    ),
    _d(
        "pairlb_failover_process_restarts_total",
        "counter",
        "",
        "Times the failover process was restarted after it died or hung.",
        True,
    ),
    _d(
        "pairlb_heartbeats_delayed_total",
        "counter",
        "",
        "Heartbeats that arrived far later than usual (queued in the network); never obeyed.",
        True,
    ),
    _d(
        "pairlb_handover_forwarding",
        "gauge",
        "",
        "1 while packets of the previous VIP holder's connections are passed to it.",
        True,
    ),
    _d(
        "pairlb_handover_forwards_total",
        "counter",
        "",
        "Times connection handover toward a previous VIP holder was armed.",
        True,
    ),
    _d("pairlb_vip_errors_total", "counter", "", "Failed VIP add/remove/announce calls.", True),
    _d(
        "pairlb_failover_peer_clock_offset_seconds",
        "gauge",
        "peer",
        "The peer's clock minus ours (from its fastest recent heartbeat); also for nodes "
        "whose heartbeats are rejected for their clock.",
        True,
    ),
    _d(
        "pairlb_failover_max_clock_skew_seconds",
        "gauge",
        "",
        "failover.max_clock_skew_s: past this offset a restarted node is not heard.",
        True,
    ),
    _d(
        "pairlb_heartbeats_verified_total",
        "counter",
        "key_id",
        "Heartbeat datagrams whose HMAC verified, by key id (a key rotation's progress).",
        True,
    ),
    _d(
        "pairlb_heartbeat_interval_clamped_total",
        "counter",
        "reason",
        "Peer heartbeats whose advertised interval was clamped (too_long, too_short).",
        True,
    ),
    _d(
        "pairlb_failover_gateway_up",
        "gauge",
        "",
        "Partition guard: 1 while a track_gateway target answers, 0 when not (FAULT).",
        True,
    ),
    _d(
        "pairlb_failover_gateway_probes_total",
        "counter",
        "target result",
        "Partition guard probes by target and result (success, failure).",
        True,
    ),
    # workers
    _d("pairlb_worker_ready", "gauge", "worker", "1 when the worker in this slot is serving."),
    _d(
        "pairlb_worker_restarts_total",
        "counter",
        "worker",
        "Times the supervisor restarted this slot's worker.",
    ),
    _d(
        "pairlb_worker_crashes_total",
        "counter",
        "worker",
        "Unexpected exits of this slot's worker.",
    ),
    _d(
        "pairlb_worker_hung_kills_total",
        "counter",
        "worker",
        "Workers killed for not answering pings.",
    ),
    _d(
        "pairlb_worker_crash_loop",
        "gauge",
        "worker",
        "1 while the slot restarts too often (a crash loop).",
    ),
    _d(
        "pairlb_worker_connections_active",
        "gauge",
        "worker",
        "Client connections the worker in this slot has open now.",
    ),
    _d(
        "pairlb_worker_cpu_seconds_total",
        "counter",
        "worker",
        "CPU time of the current worker process (resets when it is replaced).",
    ),
    _d(
        "pairlb_worker_resident_memory_bytes",
        "gauge",
        "worker",
        "Resident memory of the worker process.",
    ),
)

PROCESS_METRICS: tuple[MetricDef, ...] = (
    _d("pairlb_process_cpu_seconds_total", "counter", "", "Control process CPU time."),
    _d("pairlb_process_resident_memory_bytes", "gauge", "", "Control process resident memory."),
    _d("pairlb_process_virtual_memory_bytes", "gauge", "", "Control process virtual memory."),
    _d("pairlb_process_start_time_seconds", "gauge", "", "Control process start, unix time."),
    _d("pairlb_process_open_fds", "gauge", "", "Open file descriptors of the control process."),
    _d("pairlb_process_max_fds", "gauge", "", "File descriptor limit of the control process."),
)
"""What ``ProcessCollector(namespace="pairlb")`` exports for the control process."""

ALL_METRICS: tuple[MetricDef, ...] = METRICS + PROCESS_METRICS
_BY_NAME = {m.name: m for m in METRICS}

SAMPLE_SUFFIXES = ("_bucket", "_sum", "_count")


def family_of(sample_name: str) -> str | None:
    """The declared family a sample or series name belongs to (histogram suffixes allowed)."""
    names = {m.name for m in ALL_METRICS}
    if sample_name in names:
        return sample_name
    for suffix in SAMPLE_SUFFIXES:
        base = sample_name.removesuffix(suffix)
        if base != sample_name and base in names and _kind(base) == "histogram":
            return base
    return None


def _kind(name: str) -> Kind | None:
    m = _BY_NAME.get(name)
    return m.kind if m else None


class MetricsSource(Protocol):
    """What the collector reads from the daemon (lb.daemon.Daemon satisfies it)."""

    @property
    def cfg(self) -> Config: ...
    @property
    def generation(self) -> int: ...
    @property
    def totals(self) -> dict[str, Any]: ...
    @property
    def worker_active(self) -> dict[int, dict[str, int]]: ...
    @property
    def supervisor(self) -> Supervisor: ...
    @property
    def check_counts(self) -> dict[tuple[str, str, str], int]: ...
    @property
    def check_observers(self) -> list[Callable[[tuple[str, str], CheckResult], None]]: ...
    @property
    def reloads(self) -> dict[str, int]: ...
    @property
    def events(self) -> deque[dict[str, Any]]: ...

    def status(self) -> dict[str, Any]: ...
    def ready(self) -> bool: ...


class CheckDurations:
    """The health-check duration histogram: the one piece of state metrics keeps itself."""

    def __init__(self, bounds: Sequence[float] = CHECK_BUCKETS_S) -> None:
        self.bounds = tuple(bounds)
        self.series: dict[tuple[str, str], tuple[list[int], list[float]]] = {}

    def observe(self, key: tuple[str, str], result: CheckResult) -> None:
        """A ``daemon.check_observers`` callback: called for every probe result."""
        row = self.series.get(key)
        if row is None:
            row = self.series[key] = ([0] * (len(self.bounds) + 1), [0.0])
        d = result.duration_s
        i = 0
        while i < len(self.bounds) and d > self.bounds[i]:
            i += 1
        row[0][i] += 1
        row[1][0] += d


def cumulative_buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one is +Inf) to Prometheus's cumulative ``le`` buckets."""
    out: list[tuple[str, float]] = []
    acc = 0
    for i, le in enumerate((*bounds, math.inf)):
        acc += counts[i] if i < len(counts) else 0
        out.append(("+Inf" if le == math.inf else repr(float(le)), float(acc)))
    return out


@dataclass(frozen=True, slots=True)
class ProcSample:
    cpu_s: float
    rss_bytes: int


_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def read_proc(pid: int) -> ProcSample | None:
    """CPU seconds and resident memory of ``pid`` from /proc/PID/stat; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        utime, stime, rss = int(fields[11]), int(fields[12]), int(fields[21])
    except (IndexError, ValueError):
        return None
    return ProcSample((utime + stime) / _CLK_TCK, rss * _PAGE)


class PairlbCollector:
    """Builds every ``pairlb_*`` family from the daemon's state when Prometheus scrapes."""

    def __init__(self, daemon: MetricsSource, checks: CheckDurations) -> None:
        self.daemon = daemon
        self.checks = checks

    def describe(self) -> Iterator[Metric]:
        for m in METRICS:
            yield _family(m)

    def collect(self) -> Iterator[Metric]:
        d = self.daemon
        st = d.status()
        fams = {m.name: _family(m) for m in METRICS}

        def add(name: str, labels: Sequence[str], value: float) -> None:
            fam = fams[name]
            assert isinstance(fam, (CounterMetricFamily, GaugeMetricFamily))
            fam.add_metric(list(labels), value)

        info = fams["pairlb_build_info"]
        assert isinstance(info, InfoMetricFamily)
        info.add_metric([], {"version": __version__, "node": str(st["node"])})
        add("pairlb_start_time_seconds", [], float(st["started_at"]))
        add("pairlb_ready", [], 1.0 if d.ready() else 0.0)
        cfg_st = st["config"]
        add("pairlb_config_generation", [], float(cfg_st["generation"]))
        cinfo = fams["pairlb_config_info"]
        assert isinstance(cinfo, InfoMetricFamily)
        cinfo.add_metric([], {"digest": str(cfg_st["digest"])})
        for result in ("success", "failure"):
            add("pairlb_config_reloads_total", [result], float(d.reloads.get(result, 0)))
        last = cfg_st.get("last_reload")
        add("pairlb_config_last_reload_successful", [], 0.0 if last and not last["ok"] else 1.0)

        self._traffic(d.totals, d.worker_active, add, fams)
        self._pools(st, add, fams)
        self._failover(st, add)
        self._workers(st, add)
        # Families without samples are left out (e.g. failover ones on a standalone node).
        yield from (f for f in fams.values() if f.samples)

    # -- sections -------------------------------------------------------------------------

    def _traffic(
        self,
        totals: Mapping[str, Any],
        worker_active: Mapping[int, Mapping[str, int]],
        add: Callable[[str, Sequence[str], float], None],
        fams: dict[str, Metric],
    ) -> None:
        # Every configured backend and class from the start, at 0: Prometheus's rate() and
        # increase() cannot see the first increment of a series that appears with it.
        requests = totals.get("requests", {})
        configured = {(p.name, b.name) for p in self.daemon.cfg.pool for b in p.backends}
        seen = {(p, b) for p, backends in requests.items() for b in backends}
        for pool, backend in sorted(configured | seen):
            classes = requests.get(pool, {}).get(backend, {})
            for cls in CLASSES:
                n = classes.get(cls, 0)
                if n or (pool, backend) in configured:
                    add("pairlb_requests_total", [pool, backend, cls], n)
        hist = fams["pairlb_request_duration_seconds"]
        assert isinstance(hist, HistogramMetricFamily)
        for pool, h in sorted(totals.get("duration", {}).items()):
            hist.add_metric(
                [pool], cumulative_buckets(DURATION_BUCKETS_S, h["buckets"]), float(h["sum"])
            )
        for pool, backends in sorted(totals.get("errors", {}).items()):
            for backend, reasons in sorted(backends.items()):
                for reason, n in sorted(reasons.items()):
                    add("pairlb_backend_errors_total", [pool, backend, reason], n)
        for pool, reasons in sorted(totals.get("retries", {}).items()):
            for reason, n in sorted(reasons.items()):
                add("pairlb_retries_total", [pool, reason], n)
        for listener, reasons in sorted(totals.get("bad_requests", {}).items()):
            for reason, codes in sorted(reasons.items()):
                for code, n in sorted(codes.items()):
                    add("pairlb_bad_requests_total", [listener, reason, code], n)
        active: dict[str, int] = {}
        for per_worker in worker_active.values():
            for listener, n in per_worker.items():
                active[listener] = active.get(listener, 0) + n
        conns = totals.get("connections", {})
        for listener in sorted(set(conns) | set(active)):
            accepted = conns.get(listener, {}).get("accepted", 0)
            add("pairlb_connections_accepted_total", [listener], accepted)
            add("pairlb_connections_active", [listener], max(0, active.get(listener, 0)))
        for pool, backends in sorted(totals.get("tcp", {}).items()):
            for backend, row in sorted(backends.items()):
                add("pairlb_tcp_connections_total", [pool, backend], row.get("connections", 0))
                add("pairlb_tcp_bytes_total", [pool, backend, "in"], row.get("bytes_in", 0))
                add("pairlb_tcp_bytes_total", [pool, backend, "out"], row.get("bytes_out", 0))

    def _pools(
        self,
        st: Mapping[str, Any],
        add: Callable[[str, Sequence[str], float], None],
        fams: dict[str, Metric],
    ) -> None:
        present: set[tuple[str, str]] = set()
        for pool in st["pools"]:
            p = pool["name"]
            add("pairlb_pool_panic", [p], 1.0 if pool["panic"] else 0.0)
            add("pairlb_pool_usable_backends", [p], pool["usable"])
            add("pairlb_pool_enabled_backends", [p], pool["enabled"])
            for b in pool["backends"]:
                n = b["name"]
                present.add((p, n))
                add("pairlb_backend_healthy", [p, n], 1.0 if b["health"] == "up" else 0.0)
                for state in AdminState:
                    one = 1.0 if b["admin_state"] == state else 0.0
                    add("pairlb_backend_admin_state", [p, n, str(state)], one)
                add("pairlb_backend_in_rotation", [p, n], 1.0 if b["in_rotation"] else 0.0)
                add("pairlb_backend_effective_weight", [p, n], float(b["effective_weight"]))
                add("pairlb_backend_inflight_requests", [p, n], b["in_flight"])
                add("pairlb_backend_ejected", [p, n], 1.0 if b["ejected"] else 0.0)
                add("pairlb_backend_ejections_total", [p, n], b["ejections"])
                add("pairlb_backend_ejections_ended_total", [p, n], b["ejections_ended_by_checks"])
        for (pool_name, backend, status), count in sorted(self.daemon.check_counts.items()):
            if (pool_name, backend) in present:
                add("pairlb_health_checks_total", [pool_name, backend, status], count)
        hist = fams["pairlb_health_check_duration_seconds"]
        assert isinstance(hist, HistogramMetricFamily)
        for key, (counts, total) in sorted(self.checks.series.items()):
            # Backends removed by a reload stop being exported (bounded label sets).
            if key in present:
                hist.add_metric(
                    list(key), cumulative_buckets(self.checks.bounds, counts), total[0]
                )

    def _failover(
        self, st: Mapping[str, Any], add: Callable[[str, Sequence[str], float], None]
    ) -> None:
        role = str(st["role"]).upper()
        for r in ROLES:
            add("pairlb_role", [r], 1.0 if r == role else 0.0)
        fo = st.get("failover")
        if not fo:
            return
        add("pairlb_role_changed_timestamp_seconds", [], float(fo.get("since") or 0.0))
        add("pairlb_failover_priority", [], float(fo.get("priority", 0)))
        add("pairlb_failover_effective_priority", [], float(fo.get("effective_priority", 0)))
        add("pairlb_vip_held", [], 1.0 if fo.get("vip_held") else 0.0)
        add("pairlb_failover_healthy", [], 1.0 if fo.get("healthy", True) else 0.0)
        peers = fo.get("peers") or []
        alive = sum(1 for p in peers if p.get("alive", p.get("last_heard_s") is not None))
        add("pairlb_failover_alive_peers", [], float(alive))
        counters = fo.get("counters") or {}
        add("pairlb_heartbeat_late_sends_total", [], counters.get("late_sends", 0))
        lag = fo.get("send_lag_ms") or {}
        add("pairlb_heartbeat_send_lag_p99_seconds", [], float(lag.get("p99", 0.0)) / 1000)
        add("pairlb_heartbeat_send_lag_max_seconds", [], float(lag.get("max", 0.0)) / 1000)
        gaps = fo.get("heartbeat_gap_ms") or {}
        add("pairlb_heartbeat_send_gap_max_seconds", [], float(gaps.get("sent_max", 0.0)) / 1000)
        add("pairlb_heartbeat_receive_gap_max_seconds", [],
            float(gaps.get("received_max", 0.0)) / 1000)
        process = fo.get("process") or {}  # absent: a controller in this process (tests)
        add("pairlb_failover_process_up", [], 1.0 if process.get("running", True) else 0.0)
        add("pairlb_failover_process_restarts_total", [], process.get("restarts", 0))
        add("pairlb_heartbeats_delayed_total", [], counters.get("delayed", 0))
        handover = fo.get("handover") or {}
        add("pairlb_handover_forwarding", [], 1.0 if handover.get("forwarding_to") else 0.0)
        add("pairlb_handover_forwards_total", [], handover.get("forwards", 0))
        add("pairlb_vip_errors_total", [], counters.get("vip_errors", 0))
        add("pairlb_heartbeats_sent_total", [], counters.get("heartbeats_sent", 0))
        add("pairlb_heartbeats_received_total", [], counters.get("heartbeats_received", 0))
        import failover  # only with [failover]; its public names only

        # Known reasons and role changes exported at 0 from the start (see _traffic).
        rejected = {str(r): 0 for r in failover.RejectReason}
        rejected.update(counters.get("rejected") or {})
        for reason, n in sorted(rejected.items()):
            add("pairlb_heartbeats_rejected_total", [reason], n)
        edges = {(a, b): 0 for a in ROLES[:4] for b in ROLES[:4] if a != b}
        for edge, n in (counters.get("transitions") or {}).items():
            old, _, new = edge.partition("->")
            edges[(old.upper(), new.upper())] = n
        for (old, new), n in sorted(edges.items()):
            add("pairlb_role_transitions_total", [old, new], n)
        offsets: dict[str, float] = {}
        for peer in peers:
            name = str(peer.get("name") or ",".join(peer.get("addresses") or []) or "?")
            age = peer.get("last_heard_s")
            add("pairlb_peer_heartbeat_age_seconds", [name], math.inf if age is None else age)
            prole = str(peer.get("role") or "").upper()
            for r in ROLES[:4]:
                add("pairlb_peer_role", [name, r], 1.0 if r == prole else 0.0)
            add("pairlb_peer_priority", [name], float(peer.get("priority") or 0))
            match = 1.0 if peer.get("config_digest_match") else 0.0
            add("pairlb_peer_config_digest_match", [name], match)
            add("pairlb_peer_healthy_backends", [name], float(peer.get("healthy_backends") or 0))
            add("pairlb_peer_backends", [name], float(peer.get("total_backends") or 0))
            is_alive = peer.get("alive", age is not None)
            add("pairlb_peer_alive", [name], 1.0 if is_alive else 0.0)
            if peer.get("clock_offset_s") is not None:
                offsets[name] = peer["clock_offset_s"]
        for clock in fo.get("rejected_clocks") or []:  # newer than a peer entry of that name
            offsets[str(clock["name"])] = clock["offset_s"]
        for name, offset in sorted(offsets.items()):
            add("pairlb_failover_peer_clock_offset_seconds", [name], offset)
        add("pairlb_failover_max_clock_skew_seconds", [], fo.get("max_clock_skew_s", 30.0))
        for key in fo.get("keys") or []:
            add("pairlb_heartbeats_verified_total", [str(key["id"])], key.get("verified", 0))
        clamped = {"too_long": 0, "too_short": 0}
        clamped.update(counters.get("interval_clamped") or {})
        for reason, n in sorted(clamped.items()):
            add("pairlb_heartbeat_interval_clamped_total", [reason], n)
        gateway = fo.get("gateway")
        if gateway:
            add("pairlb_failover_gateway_up", [], 1.0 if gateway.get("up") else 0.0)
            for t in gateway.get("targets") or []:
                add("pairlb_failover_gateway_probes_total", [t["target"], "success"],
                    t.get("successes", 0))
                add("pairlb_failover_gateway_probes_total", [t["target"], "failure"],
                    t.get("failures", 0))

    def _workers(
        self, st: Mapping[str, Any], add: Callable[[str, Sequence[str], float], None]
    ) -> None:
        active = self.daemon.worker_active
        for w in st["workers"]:
            slot = [str(w["index"])]
            conns = sum(active.get(int(w["index"]), {}).values())
            add("pairlb_worker_connections_active", slot, float(max(0, conns)))
            add("pairlb_worker_ready", slot, 1.0 if w["ready"] else 0.0)
            add("pairlb_worker_restarts_total", slot, w["restarts"])
            add("pairlb_worker_crashes_total", slot, w["crashes"])
            add("pairlb_worker_hung_kills_total", slot, w["hung_kills"])
            add("pairlb_worker_crash_loop", slot, 1.0 if w["crash_loop"] else 0.0)
            sample = read_proc(int(w["pid"])) if w.get("pid") else None
            if sample is not None:
                add("pairlb_worker_cpu_seconds_total", slot, sample.cpu_s)
                add("pairlb_worker_resident_memory_bytes", slot, sample.rss_bytes)


def _family(m: MetricDef) -> Metric:
    labels = list(m.labels)
    if m.kind == "counter":
        return CounterMetricFamily(m.name, m.help, labels=labels)
    if m.kind == "gauge":
        return GaugeMetricFamily(m.name, m.help, labels=labels)
    if m.kind == "histogram":
        return HistogramMetricFamily(m.name, m.help, labels=labels)
    return InfoMetricFamily(m.name.removesuffix("_info"), m.help, labels=labels)


def make_registry(daemon: MetricsSource) -> CollectorRegistry:
    """A fresh registry with the pairlb collector and the control process's process metrics;
    the check-duration observer is registered on the daemon."""
    registry = CollectorRegistry()
    checks = CheckDurations()
    daemon.check_observers.append(checks.observe)
    registry.register(PairlbCollector(daemon, checks))
    ProcessCollector(namespace="pairlb", registry=registry)
    return registry


def declared_names() -> Iterable[str]:
    """Every family name pairlb can export (for the dashboard and docs checks)."""
    return (m.name for m in ALL_METRICS)
