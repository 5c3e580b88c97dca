"""Prometheus metrics of a pairlb node, read from the control process's state at scrape time.

Why a collector and not counters updated in place: the truth lives elsewhere (the workers'
merged counter deltas, the rotation, the health checker, the failover controller, the
supervisor). Copying it into prometheus_client objects on every change would be a second
copy that can drift; reading it at scrape time cannot. The only state kept here is the
health-check duration histogram, fed by ``daemon.check_observers``.

Every family this module can export is declared in ``METRICS`` (name, type, labels, help):
docs, the Grafana dashboard test and ``describe()`` all read that table. Label sets are
bounded by the config (pool, backend, listener, worker slot, peer) or by code (status
classes, reasons, roles): never a client, path or request id.

Rendering at scale (issue 12: 3000 backends gave 7.6 MB in 1.4-15 s through prometheus_client,
whose per-sample objects and per-character name escaping cost ~10 us a sample): the
collector's sections call ``add``/``info``/``hist`` on a :class:`Sink`. :class:`Exposition`
renders straight to the exposition text with a :class:`TextSink` (sample-line prefixes
cached per label set, values formatted like the library's ``floatToGoString``), byte for
byte what prometheus_client would write for the same samples (tests compare the two, in both
formats); :meth:`Exposition.registry` gives the same samples as prometheus_client families.

What a scrape contains (HAProxy's exporter ``scope``, Envoy's stats filters): families belong
to one scope (``SCOPES``: node, listener, pool, backend, failover, worker), chosen with
``?scope=`` (repeatable or comma-separated; default all). Per-backend series follow
``[admin] metrics_backend_series`` (or ``?backend_series=``): ``all``; ``unhealthy`` (the
state gauges of backends not fully in service only); ``none``. Whenever per-backend series
are not all exported, the additive ones (counters, histograms, in-flight requests) are
exported per pool with ``backend="*"`` (the sum over the pool's backends), so pool totals and
``sum by (pool)`` queries stay right and never count a backend twice.

prometheus_client may be imported only here and in lb.admin.server. Must not import
lb.control.daemon at run time (the daemon imports us), nor failover or healthcheck
internals.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import itertools
import math
import os
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client import generate_latest as _text_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.openmetrics.exposition import generate_latest as _om_latest_untyped
from prometheus_client.utils import floatToGoString as _float_to_go_untyped

from failover import SEND_LAG_SAMPLES
from lb import __version__
from lb import log as lb_log
from lb.config import BackendSeries
from lb.control.rotation import AdminState
from lb.control.status import BackendStatus, NodeStatus
from lb.failoverd.link import GAP_SAMPLES
from lb.stats import CLASSES, DURATION_BUCKETS_S
from lb.tls.server import FAILURE_REASONS as TLS_FAILURE_REASONS

if TYPE_CHECKING:
    from collections import deque

    from healthcheck import CheckResult
    from lb.config import Config
    from lb.control.supervisor import Supervisor

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
    _d(
        "pairlb_log_lines_total",
        "counter",
        "process result",
        "Log lines of the control and failover processes by result: written to the log sink "
        "(journald, stderr), or dropped while it did not take them.",
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
    _d("pairlb_listener_accept_queue", "gauge", "listener worker",
       "Connections waiting in a listening socket's accept queue (worker: the slot whose "
       "socket it is with reuseport, \"shared\" for the one socket of all workers)."),
    _d("pairlb_listener_accept_helped", "gauge", "listener worker",
       "1 while the other workers also accept on this slot's socket (its worker is gone, "
       "starting, paused, or not taking its queue)."),
    _d("pairlb_listener_accept_helps_total", "counter", "listener worker",
       "Times the other workers began to accept on this slot's socket."),
    _d("pairlb_tcp_connections_total", "counter", "pool backend", "TCP-mode connections piped."),
    _d(
        "pairlb_tls_certificate_expiry_timestamp_seconds",
        "gauge",
        "listener cert",
        "notAfter of each certificate a TLS listener serves (cert: its cert_file), unix time.",
    ),
    _d(
        "pairlb_tls_handshakes_total",
        "counter",
        "listener cert kind",
        "TLS handshakes completed, by the certificate SNI chose and kind (full or resumed).",
    ),
    _d(
        "pairlb_tls_handshake_failures_total",
        "counter",
        "listener reason",
        "TLS handshakes that failed or were abandoned, by reason (protocol_version, "
        "no_shared_cipher, http_request, not_tls, client_alert, aborted_before_hello, aborted, "
        "timeout, other).",
    ),
    _d(
        "pairlb_tls_ticket_key_shared",
        "gauge",
        "listener",
        "1 when the listener's session ticket key is shared by every worker (and, from a file or "
        "the failover key, by the peer), else 0.",
    ),
    _d(
        "pairlb_local_responses_total",
        "counter",
        "listener kind",
        "Requests pairlb answered itself, never sent to a backend: https_redirect, "
        "acme_served (an ACME challenge file), acme_missing (404 under the challenge path).",
    ),
    _d(
        "pairlb_sticky_requests_total",
        "counter",
        "pool outcome",
        "Requests to a pool with sticky_cookie: hit (sent where the cookie said), set (the "
        "cookie was missing, or named a backend out of rotation or gone: a new one was set).",
    ),
    _d(
        "pairlb_access_log_lines_total",
        "counter",
        "outcome",
        "Access log lines by outcome: written, dropped (the writer was more than "
        "access_log_buffer_bytes behind: a slow disk; the worker never waits for it).",
    ),
    _d(
        "pairlb_access_log_errors_total",
        "counter",
        "",
        "Access log writes or reopens that failed (the lines are dropped and counted).",
    ),
    _d(
        "pairlb_maglev_table_size",
        "gauge",
        "pool",
        "Slots of a maglev pool's lookup table (a prime above 100 x its backends).",
    ),
    _d(
        "pairlb_maglev_table_current",
        "gauge",
        "pool",
        "1 when the workers have the lookup table of the pool's current members, 0 while a "
        "build runs (or after one failed: the old table keeps serving).",
    ),
    _d(
        "pairlb_maglev_table_build_seconds",
        "gauge",
        "pool",
        "How long the last lookup table build took (by the control process's table "
        "builder process).",
    ),
    _d(
        "pairlb_sni_routing_total",
        "counter",
        "listener decision",
        "TCP-mode connections by how SNI routing chose their pool: route (a route matched), "
        "no_match, no_sni, not_tls, oversize (no ClientHello in 16 KiB), timeout, eof (the "
        "listener's pool for all of these), closed (the client left first).",
    ),
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
    _d(
        "pairlb_rotation_apply_seconds",
        "histogram",
        "",
        "From the control process pushing a rotation change (a backend in or out) to a "
        "worker applying it; one observation per worker.",
    ),
    _d(
        "pairlb_health_check_lateness_seconds",
        "histogram",
        "",
        "How long after its scheduled time each active health check started (control loop "
        "backlog).",
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
        "pairlb_heartbeats_duplicated_total",
        "counter",
        "",
        "Heartbeats heard again via another path (normal with several peer addresses); not "
        "counted as received.",
        True,
    ),
    _d(
        "pairlb_heartbeat_send_errors_total",
        "counter",
        "",
        "Heartbeat datagrams that could not be sent, and ICMP errors for earlier ones (a "
        "peer's port unreachable).",
        True,
    ),
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
        f"How late heartbeats left, 99th percentile over the last {SEND_LAG_SAMPLES} sends.",
        True,
    ),
    _d(
        "pairlb_heartbeat_send_lag_max_seconds",
        "gauge",
        "",
        f"How late the latest of the last {SEND_LAG_SAMPLES} heartbeats left.",
        True,
    ),
    _d(
        "pairlb_heartbeat_send_gap_max_seconds",
        "gauge",
        "",
        f"Longest time between two heartbeats sent to one peer address (last {GAP_SAMPLES}).",
        True,
    ),
    _d(
        "pairlb_heartbeat_receive_gap_max_seconds",
        "gauge",
        "",
        f"Longest time between two datagrams from one peer address (last {GAP_SAMPLES}).",
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
        "pairlb_failover_control_silent_seconds",
        "gauge",
        "",
        "How long the control process had been silent when the failover process last "
        "reported; from failover.control_timeout_s on, the node counts as unhealthy.",
        True,
    ),
    _d(
        "pairlb_failover_internal_errors_total",
        "counter",
        "",
        "Exceptions caught at the failover controller's error boundaries (a bug: the "
        "failover process logs the traceback).",
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
        "pairlb_vip_announcements_total",
        "counter",
        "",
        "Gratuitous ARP / unsolicited NA packets sent for the virtual IPs.",
        True,
    ),
    _d(
        "pairlb_vip_announcement_errors_total",
        "counter",
        "",
        "VIP announcement rounds that failed to send (the virtual IPs stay held).",
        True,
    ),
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
    _d(
        "pairlb_failover_notify_runs_total",
        "counter",
        "result",
        "Notify script runs by result (success; failure: non-zero exit, not started, killed "
        "on timeout).",
        True,
    ),
    _d(
        "pairlb_failover_notify_timeouts_total",
        "counter",
        "",
        "Notify script runs killed at failover.notify_timeout_s (counted as failures too).",
        True,
    ),
    _d(
        "pairlb_failover_notify_dropped_total",
        "counter",
        "",
        "Role transitions whose notify scripts never ran (their queue was full: the role "
        "changed faster than the scripts ran).",
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
        "pairlb_worker_rotation_lag_seconds",
        "gauge",
        "worker",
        "How long the oldest rotation change this worker has not applied yet has been on its "
        "way (0: it routes by the last one pushed, or the slot has no process).",
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
    # runtime pool changes (docs/elastic-pools.md)
    _d("pairlb_pool_backends", "gauge", "pool source",
       "Backends of the pool by where they come from: config, api (runtime changes, from "
       "the admin API or the peer), dns or file (discovery)."),
    _d("pairlb_discovery_up", "gauge", "pool kind",
       "1 when the pool's last discovery refresh succeeded; 0 while it fails (the last good "
       "set is kept)."),
    _d("pairlb_discovery_last_success_timestamp_seconds", "gauge", "pool",
       "Unix time of the pool's last successful discovery refresh (0: never)."),
    _d("pairlb_discovery_backends", "gauge", "pool",
       "Backends in the pool's last good discovered set."),
    _d("pairlb_discovery_failures_total", "counter", "pool reason",
       "Failed discovery refreshes by reason (nxdomain, nodata, servfail, refused, timeout, "
       "unreachable, too_many, invalid, error, and the file's)."),
    _d("pairlb_runtime_changes_total", "counter", "outcome",
       "Runtime pool changes: applied_local (admin API here), applied_peer (from the peer), "
       "refused_by_peer, refused_here (the peer's, refused by this node), conflicts "
       "(concurrent changes of one backend, the later kept), pending (the peer did not "
       "answer in time)."),
    _d("pairlb_overlay_entries", "gauge", "",
       "Runtime changes kept in [node] state_dir (the overlay over the config)."),
    _d("pairlb_overlay_persistent", "gauge", "",
       "1 when runtime changes are kept on disk; 0 when the default state_dir could not be "
       "made (they are lost at the next restart)."),
    _d("pairlb_sync_peer_connected", "gauge", "peer",
       "1 while the channel that carries runtime changes to the peer is up."),
    _d("pairlb_sync_peer_overlay_digest_match", "gauge", "peer",
       "1 when the peer holds the same runtime changes as this node."),
    _d("pairlb_sync_rejected_total", "counter", "reason",
       "Sync connections or frames refused (unknown_source, bad_mac, replayed, ...)."),
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
    """What the collector reads from the daemon (lb.control.daemon.Daemon satisfies it)."""

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
    @property
    def health(self) -> HasLateness: ...
    @property
    def rotation_apply(self) -> LatenessLike: ...

    def status(self) -> NodeStatus: ...
    def ready(self) -> bool: ...


class LatenessLike(Protocol):
    """What metrics reads of healthcheck's lateness recorder."""

    @property
    def bounds(self) -> tuple[float, ...]: ...
    @property
    def counts(self) -> list[int]: ...
    @property
    def sum_s(self) -> float: ...


class HasLateness(Protocol):
    @property
    def lateness(self) -> LatenessLike: ...


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
    les = _le_strings(tuple(bounds))
    if len(counts) != len(les):
        counts = [*counts[: len(les)], *([0] * (len(les) - len(counts)))]
    return list(zip(les, map(float, itertools.accumulate(counts)), strict=True))


@functools.lru_cache(maxsize=64)
def _le_strings(bounds: tuple[float, ...]) -> tuple[str, ...]:
    return (*(repr(float(le)) for le in bounds), "+Inf")


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
        """Every family as prometheus_client objects (the reference for :class:`TextSink`)."""
        sink = FamilySink()
        self.emit(sink, ALL)
        # Families without samples are left out (e.g. failover ones on a standalone node).
        yield from sink.families()

    def emit(self, sink: Sink, sel: Selection) -> None:
        """Every sample the selection asks for, to ``sink``."""
        d = self.daemon
        st = d.status()
        out: Sink = sink if sel == ALL else Select(sink, sel, _not_in_service(st, sel))
        add = out.add
        out.info("pairlb_build_info", {"version": __version__, "node": st.node})
        add("pairlb_start_time_seconds", [], float(st.started_at))
        add("pairlb_ready", [], 1.0 if st.ready else 0.0)
        add("pairlb_config_generation", [], float(st.config.generation))
        out.info("pairlb_config_info", {"digest": st.config.digest})
        for result in ("success", "failure"):
            add("pairlb_config_reloads_total", [result], float(d.reloads.get(result, 0)))
        last = st.config.last_reload
        add("pairlb_config_last_reload_successful", [], 0.0 if last and not last["ok"] else 1.0)
        own = lb_log.counts()  # the control process's; the failover process's with its status
        add("pairlb_log_lines_total", ["control", "written"], own.written)
        add("pairlb_log_lines_total", ["control", "dropped"], own.dropped)

        self._traffic(st, d.totals, d.worker_active, add, out.hist)
        self._tls(st, add)
        self._accept(st, add)
        self._pools(st, add, out.hist)
        self._checks_timing(out.hist)
        self._failover(st, add)
        self._workers(st, add)
        self._runtime(st, add)
        if isinstance(out, Select):
            out.flush()

    # -- sections -------------------------------------------------------------------------

    def _traffic(
        self,
        st: NodeStatus,
        totals: Mapping[str, Any],
        worker_active: Mapping[int, Mapping[str, int]],
        add: Callable[[str, Sequence[str], float], None],
        hist: HistFn,
    ) -> None:
        # Every configured backend and class from the start, at 0: Prometheus's rate() and
        # increase() cannot see the first increment of a series that appears with it.
        requests = totals.get("requests", {})
        configured = {(p.name, b.name) for p in st.pools for b in p.backends}
        seen = {(p, b) for p, backends in requests.items() for b in backends}
        for pool, backend in sorted(configured | seen):
            classes = requests.get(pool, {}).get(backend, {})
            for cls in CLASSES:
                n = classes.get(cls, 0)
                if n or (pool, backend) in configured:
                    add("pairlb_requests_total", [pool, backend, cls], n)
        for pool, h in sorted(totals.get("duration", {}).items()):
            hist(
                "pairlb_request_duration_seconds",
                [pool],
                cumulative_buckets(DURATION_BUCKETS_S, h["buckets"]),
                float(h["sum"]),
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
        for listener, kinds in sorted(totals.get("local", {}).items()):
            for kind, n in sorted(kinds.items()):
                add("pairlb_local_responses_total", [listener, kind], n)
        for listener, decisions in sorted(totals.get("sni", {}).items()):
            for decision, n in sorted(decisions.items()):
                add("pairlb_sni_routing_total", [listener, decision], n)
        for pool, outcomes in sorted(totals.get("sticky", {}).items()):
            for outcome, n in sorted(outcomes.items()):
                add("pairlb_sticky_requests_total", [pool, outcome], n)
        alog = totals.get("access_log")
        if alog is not None or self.daemon.cfg.logging.access_log:
            alog = alog or {}
            add("pairlb_access_log_lines_total", ["written"], alog.get("written", 0))
            add("pairlb_access_log_lines_total", ["dropped"], alog.get("dropped", 0))
            add("pairlb_access_log_errors_total", [], alog.get("errors", 0))

    def _runtime(self, st: NodeStatus, add: Callable[[str, Sequence[str], float], None]
                 ) -> None:
        for pool in st.pools:
            h = pool.hashing
            if h is not None:
                add("pairlb_maglev_table_size", [pool.name], h["size"])
                add("pairlb_maglev_table_current", [pool.name], 1.0 if h["current"] else 0.0)
                add("pairlb_maglev_table_build_seconds", [pool.name],
                    (h["build_ms"] or 0.0) / 1000)
            by_source = dict.fromkeys(("config", "api", "dns", "file"), 0)
            for b in pool.backends:
                by_source[b.source] = by_source.get(b.source, 0) + 1
            for source, n in by_source.items():
                add("pairlb_pool_backends", [pool.name, source], n)
            disc = pool.discovery
            if disc is None:
                continue
            ok = disc.get("last_ok_at") is not None and not disc.get("consecutive_failures")
            add("pairlb_discovery_up", [pool.name, str(disc.get("kind"))], 1.0 if ok else 0.0)
            add("pairlb_discovery_last_success_timestamp_seconds", [pool.name],
                float(disc.get("last_ok_at") or 0.0))
            add("pairlb_discovery_backends", [pool.name], float(disc.get("backends") or 0))
            for reason, n in sorted((disc.get("failures") or {}).items()):
                add("pairlb_discovery_failures_total", [pool.name, str(reason)], n)
        rt = st.runtime
        if rt is None:
            return
        for result, n in sorted(rt["changes"].items()):
            add("pairlb_runtime_changes_total", [result], n)
        add("pairlb_overlay_entries", [], rt["overlay"]["entries"])
        add("pairlb_overlay_persistent", [], 1.0 if rt.get("persistent") else 0.0)
        sync = rt.get("sync")
        if not sync or "peers" not in sync:
            return
        mine = rt["overlay"]["digest"]
        for peer in sync["peers"]:
            add("pairlb_sync_peer_connected", [peer["node"]], 1.0 if peer["connected"] else 0.0)
            add("pairlb_sync_peer_overlay_digest_match", [peer["node"]],
                1.0 if peer.get("overlay_digest") == mine else 0.0)
        for reason, n in sorted(sync.get("rejected", {}).items()):
            add("pairlb_sync_rejected_total", [reason], n)

    @staticmethod
    def _accept(st: NodeStatus, add: Callable[[str, Sequence[str], float], None]) -> None:
        for lst in st.listeners:
            if len(lst.accept_queues) == 1:
                add("pairlb_listener_accept_queue", [lst.name, "shared"], lst.accept_queues[0])
                continue
            for k, q in enumerate(lst.accept_queues):
                slot = [lst.name, str(k)]
                add("pairlb_listener_accept_queue", slot, q)
                add("pairlb_listener_accept_helped", slot,
                    1.0 if k in lst.accept_helped else 0.0)
                add("pairlb_listener_accept_helps_total", slot,
                    lst.accept_helps[k] if k < len(lst.accept_helps) else 0)

    def _tls(self, st: NodeStatus, add: Callable[[str, Sequence[str], float], None]) -> None:
        for lst in st.listeners:
            t = lst.tls
            if t is None:
                continue
            for c in t.certificates:
                add("pairlb_tls_certificate_expiry_timestamp_seconds", [lst.name, c.cert_file],
                    c.not_after)
                add("pairlb_tls_handshakes_total", [lst.name, c.cert_file, "full"], c.handshakes)
                add("pairlb_tls_handshakes_total", [lst.name, c.cert_file, "resumed"], c.resumed)
            for reason in TLS_FAILURE_REASONS:
                add("pairlb_tls_handshake_failures_total", [lst.name, reason],
                    t.failures.get(reason, 0))
            shared = t.ticket_key in ("file", "failover_key", "random")
            add("pairlb_tls_ticket_key_shared", [lst.name], 1.0 if shared else 0.0)

    def _pools(
        self,
        st: NodeStatus,
        add: Callable[[str, Sequence[str], float], None],
        hist: HistFn,
    ) -> None:
        present: set[tuple[str, str]] = set()
        for pool in st.pools:
            p = pool.name
            add("pairlb_pool_panic", [p], 1.0 if pool.panic else 0.0)
            add("pairlb_pool_usable_backends", [p], pool.usable)
            add("pairlb_pool_enabled_backends", [p], pool.enabled)
            for b in pool.backends:
                n = b.name
                present.add((p, n))
                add("pairlb_backend_healthy", [p, n], 1.0 if b.up else 0.0)
                for state in AdminState:
                    one = 1.0 if b.admin_state == state else 0.0
                    add("pairlb_backend_admin_state", [p, n, str(state)], one)
                add("pairlb_backend_in_rotation", [p, n], 1.0 if b.in_rotation else 0.0)
                add("pairlb_backend_effective_weight", [p, n], float(b.effective_weight))
                add("pairlb_backend_inflight_requests", [p, n], b.in_flight)
                add("pairlb_backend_ejected", [p, n], 1.0 if b.ejected else 0.0)
                add("pairlb_backend_ejections_total", [p, n], b.ejections)
                add("pairlb_backend_ejections_ended_total", [p, n], b.ejections_ended_by_checks)
        for (pool_name, backend, status), count in sorted(self.daemon.check_counts.items()):
            if (pool_name, backend) in present:
                add("pairlb_health_checks_total", [pool_name, backend, status], count)
        bounds = self.checks.bounds
        for key, (counts, total) in sorted(self.checks.series.items()):
            # Backends removed by a reload stop being exported (bounded label sets).
            if key in present:
                hist(
                    "pairlb_health_check_duration_seconds",
                    key,
                    cumulative_buckets(bounds, counts),
                    total[0],
                )

    def _checks_timing(self, hist: HistFn) -> None:
        health = getattr(self.daemon, "health", None)
        lat = getattr(health, "lateness", None)
        if lat is not None:  # from the start, at 0 (see _traffic)
            hist(
                "pairlb_health_check_lateness_seconds",
                [],
                cumulative_buckets(lat.bounds, lat.counts),
                float(lat.sum_s),
            )
        ra = getattr(self.daemon, "rotation_apply", None)
        if ra is not None:
            hist("pairlb_rotation_apply_seconds", [], cumulative_buckets(ra.bounds, ra.counts),
                 float(ra.sum_s))

    def _failover(self, st: NodeStatus, add: Callable[[str, Sequence[str], float], None]
                  ) -> None:
        for r in ROLES:
            add("pairlb_role", [r], 1.0 if r == st.role else 0.0)
        view = st.failover
        if view is None:
            return
        import failover  # only with [failover]; its public names only

        fo = view.status
        add("pairlb_role_changed_timestamp_seconds", [], float(fo.role_since or 0.0))
        add("pairlb_failover_priority", [], float(fo.priority))
        add("pairlb_failover_effective_priority", [], float(fo.priority if fo.healthy else 0))
        add("pairlb_vip_held", [], 1.0 if fo.vip_holding else 0.0)
        add("pairlb_failover_healthy", [], 1.0 if fo.healthy else 0.0)
        add("pairlb_failover_alive_peers", [], float(sum(1 for p in fo.peers if p.alive)))
        c = fo.counters
        add("pairlb_heartbeat_late_sends_total", [], c.late_sends)
        # Whole microseconds, as /status shows them (milliseconds to 3 places).
        add("pairlb_heartbeat_send_lag_p99_seconds", [], _us(fo.send_lag.p99_s))
        add("pairlb_heartbeat_send_lag_max_seconds", [], _us(fo.send_lag.max_s))
        add("pairlb_heartbeat_send_gap_max_seconds", [], _us(view.sent_gap_max_s or 0.0))
        add("pairlb_heartbeat_receive_gap_max_seconds", [], _us(view.received_gap_max_s or 0.0))
        process = view.process  # None: a controller in this process (tests)
        add("pairlb_failover_process_up", [], 1.0 if process is None or process.running else 0.0)
        add("pairlb_failover_process_restarts_total", [], process.restarts if process else 0)
        if process is not None:
            add("pairlb_failover_control_silent_seconds", [], process.control_silent_s)
            add("pairlb_log_lines_total", ["failover", "written"], process.log_lines_written)
            add("pairlb_log_lines_total", ["failover", "dropped"], process.log_lines_dropped)
        add("pairlb_failover_internal_errors_total", [], c.internal_errors)
        add("pairlb_heartbeats_delayed_total", [], c.delayed)
        add("pairlb_handover_forwarding", [], 1.0 if fo.handover_forwarding_to else 0.0)
        add("pairlb_handover_forwards_total", [], fo.handover_forwards)
        add("pairlb_vip_errors_total", [], c.vip_errors)
        add("pairlb_vip_announcements_total", [], fo.vip_announcements)
        add("pairlb_vip_announcement_errors_total", [], fo.vip_announcement_errors)
        add("pairlb_heartbeats_sent_total", [], c.heartbeats_sent)
        add("pairlb_heartbeats_received_total", [], c.heartbeats_received)
        add("pairlb_heartbeats_duplicated_total", [], c.duplicates)
        add("pairlb_heartbeat_send_errors_total", [], fo.heartbeat_send_errors)
        # Known reasons and role changes exported at 0 from the start (see _traffic).
        rejected = {str(r): 0 for r in failover.RejectReason}
        rejected.update({str(r): n for r, n in c.rejected.items()})
        for reason, n in sorted(rejected.items()):
            add("pairlb_heartbeats_rejected_total", [reason], n)
        edges = {(a, b): 0 for a in ROLES[:4] for b in ROLES[:4] if a != b}
        for (old, new), n in c.transitions.items():
            edges[(old.label, new.label)] = n
        for (old_s, new_s), n in sorted(edges.items()):
            add("pairlb_role_transitions_total", [old_s, new_s], n)
        offsets: dict[str, float] = {}
        for peer in fo.peers:
            name = peer.name or ",".join(path.address for path in peer.paths) or "?"
            add("pairlb_peer_heartbeat_age_seconds", [name], round(peer.last_heard_age_s, 4))
            prole = peer.role.label
            for r in ROLES[:4]:
                add("pairlb_peer_role", [name, r], 1.0 if r == prole else 0.0)
            add("pairlb_peer_priority", [name], float(peer.priority))
            add("pairlb_peer_config_digest_match", [name],
                1.0 if peer.config_digest_match else 0.0)
            add("pairlb_peer_healthy_backends", [name], float(peer.healthy_count))
            add("pairlb_peer_backends", [name], float(peer.total_count))
            add("pairlb_peer_alive", [name], 1.0 if peer.alive else 0.0)
            if peer.clock_offset_s is not None:
                offsets[name] = round(peer.clock_offset_s, 4)
        for clock in fo.rejected_clocks:  # newer than a peer entry of that name
            offsets[clock.name] = round(clock.offset_s, 3)
        for name, offset in sorted(offsets.items()):
            add("pairlb_failover_peer_clock_offset_seconds", [name], offset)
        add("pairlb_failover_max_clock_skew_seconds", [], fo.max_clock_skew_s)
        for key in fo.keys:
            add("pairlb_heartbeats_verified_total", [key.key_id], key.verified)
        clamped = {"too_long": 0, "too_short": 0}
        clamped.update(c.interval_clamped)
        for reason, n in sorted(clamped.items()):
            add("pairlb_heartbeat_interval_clamped_total", [reason], n)
        gateway = fo.gateway
        if gateway is not None:
            add("pairlb_failover_gateway_up", [], 1.0 if gateway.up else 0.0)
            for t in gateway.targets:
                add("pairlb_failover_gateway_probes_total", [t.target, "success"], t.successes)
                add("pairlb_failover_gateway_probes_total", [t.target, "failure"], t.failures)
        hooks = fo.notify
        add("pairlb_failover_notify_runs_total", ["success"], hooks.runs - hooks.failures)
        add("pairlb_failover_notify_runs_total", ["failure"], hooks.failures)
        add("pairlb_failover_notify_timeouts_total", [], hooks.timeouts)
        add("pairlb_failover_notify_dropped_total", [], hooks.dropped)

    def _workers(
        self, st: NodeStatus, add: Callable[[str, Sequence[str], float], None]
    ) -> None:
        active = self.daemon.worker_active
        for w in st.workers:
            slot = [str(w.index)]
            conns = sum(active.get(w.index, {}).values())
            add("pairlb_worker_connections_active", slot, float(max(0, conns)))
            add("pairlb_worker_ready", slot, 1.0 if w.ready else 0.0)
            add("pairlb_worker_restarts_total", slot, w.restarts)
            add("pairlb_worker_crashes_total", slot, w.crashes)
            add("pairlb_worker_hung_kills_total", slot, w.hung_kills)
            add("pairlb_worker_crash_loop", slot, 1.0 if w.crash_loop else 0.0)
            add("pairlb_worker_rotation_lag_seconds", slot, w.rotation_lag_s)
            sample = read_proc(w.pid) if w.pid else None
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


# -- selection: scopes and per-backend series ------------------------------------------------

SCOPES = ("node", "listener", "pool", "backend", "failover", "worker")
"""What ``?scope=`` may name (``all`` or ``*`` for every one)."""
BACKEND_SERIES: tuple[str, ...] = typing.get_args(BackendSeries)
"""Values of ``[admin] metrics_backend_series`` and ``?backend_series=`` (lb.config's)."""
ADDITIVE_GAUGES = frozenset({"pairlb_backend_inflight_requests"})
"""Per-backend gauges whose pool sum means something (exported as ``backend="*"``)."""
_FAILOVER_PREFIXES = (
    "pairlb_role_", "pairlb_failover", "pairlb_heartbeat", "pairlb_peer", "pairlb_vip",
    "pairlb_handover",
)


def scope_of(m: MetricDef) -> str:
    """The scope a family belongs to (``?scope=``)."""
    if m.name == "pairlb_role":
        return "node"  # STANDALONE included: alerts read it on every node
    if m.failover_only or m.name.startswith(_FAILOVER_PREFIXES):
        return "failover"
    for label in ("backend", "pool", "listener", "worker"):
        if label in m.labels:
            return label
    return "node"


@dataclass(frozen=True, slots=True)
class Selection:
    """What one scrape exports: a set of scopes and the per-backend series mode."""

    scopes: frozenset[str] = frozenset(SCOPES)
    backend_series: str = "all"


ALL = Selection()


def parse_selection(scope_args: Sequence[str], series_arg: str | None, default: str) -> Selection:
    """From ``?scope=`` (repeatable, comma-separated, ``all``/``*``; absent = all) and
    ``?backend_series=``. Raises ValueError with a message for a client."""
    scopes: set[str] = set()
    if not scope_args:
        scopes.update(SCOPES)
    for arg in scope_args:
        for word in arg.split(","):
            word = word.strip().lower()
            if word in ("all", "*"):
                scopes.update(SCOPES)
            elif word in SCOPES:
                scopes.add(word)
            elif word:
                raise ValueError(
                    f"unknown scope {word[:32]!r}: use {', '.join(SCOPES)} or all"
                )
    series = (series_arg if series_arg is not None else default).strip().lower()
    if series not in BACKEND_SERIES:
        raise ValueError(
            f"unknown backend_series {series[:32]!r}: use {', '.join(BACKEND_SERIES)}"
        )
    return Selection(frozenset(scopes), series)


def _us(seconds: float) -> float:
    return round(seconds * 1000, 3) / 1000


def _in_service(b: BackendStatus) -> bool:
    return b.up and b.admin_state == "enabled" and b.in_rotation and not b.ejected


def _not_in_service(st: NodeStatus, sel: Selection) -> frozenset[tuple[str, str]]:
    if sel.backend_series != "unhealthy":
        return frozenset()
    return frozenset(
        (p.name, b.name) for p in st.pools for b in p.backends if not _in_service(b)
    )


# -- sinks -------------------------------------------------------------------------------------

HistFn = Callable[[str, Sequence[str], Sequence[tuple[str, float]], float], None]


class Sink(Protocol):
    """Where the collector's sections put samples (labels in the family's declared order)."""

    def add(self, name: str, labels: Sequence[str], value: float) -> None: ...
    def info(self, name: str, labels: Mapping[str, str]) -> None: ...
    def hist(
        self, name: str, labels: Sequence[str], buckets: Sequence[tuple[str, float]], total: float
    ) -> None: ...


class FamilySink:
    """Samples as prometheus_client families (slow; the reference the tests compare with)."""

    def __init__(self) -> None:
        self.fams = {m.name: _family(m) for m in METRICS}

    def add(self, name: str, labels: Sequence[str], value: float) -> None:
        fam = self.fams[name]
        assert isinstance(fam, (CounterMetricFamily, GaugeMetricFamily))
        fam.add_metric(list(labels), value)

    def info(self, name: str, labels: Mapping[str, str]) -> None:
        fam = self.fams[name]
        assert isinstance(fam, InfoMetricFamily)
        fam.add_metric([], dict(labels))

    def hist(
        self, name: str, labels: Sequence[str], buckets: Sequence[tuple[str, float]], total: float
    ) -> None:
        fam = self.fams[name]
        assert isinstance(fam, HistogramMetricFamily)
        fam.add_metric(list(labels), list(buckets), total)

    def families(self) -> Iterator[Metric]:
        return (f for f in self.fams.values() if f.samples)


class Select:
    """A sink in front of another that applies a :class:`Selection` (module docstring)."""

    def __init__(
        self, inner: Sink, sel: Selection, not_in_service: frozenset[tuple[str, str]]
    ) -> None:
        self.inner = inner
        self.sel = sel
        self.chosen = not_in_service
        scopes = sel.scopes
        self.per_backend = "backend" in scopes and sel.backend_series == "all"
        self.pool_level = not self.per_backend and bool({"pool", "backend"} & scopes)
        self.states = "backend" in scopes and sel.backend_series == "unhealthy"
        self.sums: dict[tuple[str, tuple[str, ...]], float] = {}
        self.hists: dict[tuple[str, tuple[str, ...]], tuple[list[tuple[str, float]], float]] = {}

    def _route(self, name: str, labels: Sequence[str]) -> tuple[str, tuple[str, ...] | None]:
        """("emit", labels) | ("sum", labels with backend "*") | ("drop", None)."""
        scope, additive, ip, ib = _FAMILY_ROUTES[name]
        if scope != "backend":
            return ("emit", tuple(labels)) if scope in self.sel.scopes else ("drop", None)
        backend = labels[ib]
        if backend == "-":  # "no backend chosen": a pool-level series already
            ok = self.per_backend or self.pool_level
            return ("emit", tuple(labels)) if ok else ("drop", None)
        if self.per_backend:
            return "emit", tuple(labels)
        if not additive:
            ok = self.states and (labels[ip], backend) in self.chosen
            return ("emit", tuple(labels)) if ok else ("drop", None)
        if not self.pool_level:
            return "drop", None
        starred = list(labels)
        starred[ib] = "*"
        return "sum", tuple(starred)

    def add(self, name: str, labels: Sequence[str], value: float) -> None:
        how, key = self._route(name, labels)
        if how == "emit":
            self.inner.add(name, labels, value)
        elif how == "sum" and key is not None:
            k = (name, key)
            self.sums[k] = self.sums.get(k, 0) + value

    def info(self, name: str, labels: Mapping[str, str]) -> None:
        if _FAMILY_ROUTES[name][0] in self.sel.scopes:
            self.inner.info(name, labels)

    def hist(
        self, name: str, labels: Sequence[str], buckets: Sequence[tuple[str, float]], total: float
    ) -> None:
        how, key = self._route(name, labels)
        if how == "emit":
            self.inner.hist(name, labels, buckets, total)
        elif how == "sum" and key is not None:
            k = (name, key)
            prev = self.hists.get(k)
            if prev is None:
                self.hists[k] = (list(buckets), total)
            else:
                acc = [(le, n + m) for (le, n), (_, m) in zip(prev[0], buckets, strict=True)]
                self.hists[k] = (acc, prev[1] + total)

    def flush(self) -> None:
        """The ``backend="*"`` series, after everything else of their family."""
        for (name, labels), value in self.sums.items():
            self.inner.add(name, labels, value)
        for (name, labels), (buckets, total) in self.hists.items():
            self.inner.hist(name, labels, buckets, total)
        self.sums.clear()
        self.hists.clear()


def _routes() -> dict[str, tuple[str, bool, int, int]]:
    out = {}
    for m in METRICS:
        additive = m.kind in ("counter", "histogram") or m.name in ADDITIVE_GAUGES
        ip = m.labels.index("pool") if "pool" in m.labels else -1
        ib = m.labels.index("backend") if "backend" in m.labels else -1
        out[m.name] = (scope_of(m), additive, ip, ib)
    return out


_FAMILY_ROUTES = _routes()


def _escape_label_value(v: str) -> str:
    if "\\" in v or "\n" in v or '"' in v:
        return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
    return v


_om_latest: Callable[[Any], bytes] = _om_latest_untyped
_float_to_go: Callable[[float], str] = _float_to_go_untyped


_SMALL: dict[float, str] = {float(i): f"{i}.0" for i in range(4096)}
"""Whole numbers as floatToGoString writes them (ints and floats hash alike: 1 == 1.0)."""


def fmt_value(v: float) -> str:
    """``floatToGoString`` (what prometheus_client writes), with a fast path for counts."""
    s = _SMALL.get(v)
    if s is not None and (v or math.copysign(1.0, v) > 0):  # -0.0 is "-0.0"
        return s
    return _float_to_go(v)


class TextSink:
    """Writes sample lines straight to text, family by family (module docstring).

    Sample lines are the same in the text and OpenMetrics formats (labels sorted by name,
    values as ``floatToGoString``); only the headers differ, and those come from
    prometheus_client itself (``_headers``). ``prefixes`` maps (name, *labels) to the line up
    to the value; it lives as long as the :class:`Exposition` (bounded by the config).
    """

    def __init__(self, prefixes: dict[tuple[str, ...], Any]) -> None:
        self.prefixes = prefixes
        self.lines: dict[str, list[str]] = {}

    def _prefix(self, name: str, sample: str, names: Sequence[str], labels: Sequence[str]) -> str:
        pairs = sorted(zip(names, labels, strict=True))
        inner = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in pairs)
        return f"{sample}{{{inner}}} " if inner else f"{sample} "

    def add(self, name: str, labels: Sequence[str], value: float) -> None:
        key = (name, *labels)
        p = self.prefixes.get(key)
        if p is None:
            p = self.prefixes[key] = self._prefix(name, name, _LABELS[name], labels)
        lines = self.lines.get(name)
        if lines is None:
            lines = self.lines[name] = []
        lines.append(p + fmt_value(value))

    def info(self, name: str, labels: Mapping[str, str]) -> None:
        names = tuple(labels)
        line = self._prefix(name, name, names, [str(labels[k]) for k in names]) + "1.0"
        self.lines.setdefault(name, []).append(line)

    def hist(
        self, name: str, labels: Sequence[str], buckets: Sequence[tuple[str, float]], total: float
    ) -> None:
        key = ("#h", name, *labels)
        les = tuple(le for le, _ in buckets)
        cached = self.prefixes.get(key)
        if cached is None or cached[0] != les:
            names = _LABELS[name]
            bucket_names = (*names, "le")
            cached = self.prefixes[key] = (
                les,
                [
                    self._prefix(name, name + "_bucket", bucket_names, (*labels, le))
                    for le in les
                ],
                self._prefix(name, name + "_count", names, labels),
                self._prefix(name, name + "_sum", names, labels),
            )
        _, bucket_prefixes, count_prefix, sum_prefix = cached
        lines = self.lines.get(name)
        if lines is None:
            lines = self.lines[name] = []
        lines.extend(
            [p + fmt_value(n) for p, (_, n) in zip(bucket_prefixes, buckets, strict=True)]
        )
        lines.append(count_prefix + fmt_value(buckets[-1][1] if buckets else 0.0))
        lines.append(sum_prefix + fmt_value(total))

    def text(self, openmetrics: bool) -> str:
        heads = _HEADERS[1 if openmetrics else 0]
        parts = []
        for m in METRICS:
            lines = self.lines.get(m.name)
            if lines:
                parts.append(heads[m.name])
                parts.append("\n".join(lines))
                parts.append("\n")
        return "".join(parts)


_LABELS = {m.name: m.labels for m in METRICS}


def _headers() -> tuple[dict[str, str], dict[str, str]]:
    """Each family's HELP/TYPE lines in the text and OpenMetrics formats, written by
    prometheus_client once (so escaping and type names are the library's)."""
    text: dict[str, str] = {}
    om: dict[str, str] = {}
    for m in METRICS:
        fam = _family(m)

        class _One:
            def collect(self, fam: Metric = fam) -> Iterator[Metric]:
                yield fam

        text[m.name] = _text_latest(_One()).decode()
        om[m.name] = _om_latest(_One()).decode().removesuffix("# EOF\n")
    return text, om


_HEADERS = _headers()


def _copy_tree(x: Any) -> Any:
    """Nested dicts and lists of numbers (the workers' merged counters), copied."""
    if isinstance(x, dict):
        return {k: _copy_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return list(x)
    return x


class _FrozenLateness:
    def __init__(self, lat: LatenessLike) -> None:
        self.bounds = tuple(lat.bounds)
        self.counts = list(lat.counts)
        self.sum_s = lat.sum_s


class _FrozenHealth:
    def __init__(self, lateness: LatenessLike) -> None:
        self.lateness: LatenessLike = _FrozenLateness(lateness)


class Frozen:
    """What the collector reads of a daemon, copied on the control loop at one instant, so a
    thread can format it while the loop keeps changing the originals (``status()`` already
    returns a fresh structure)."""

    def __init__(self, daemon: MetricsSource, checks: CheckDurations) -> None:
        self.cfg = daemon.cfg
        self.generation = daemon.generation
        self._status = daemon.status()
        self._ready = daemon.ready()
        self.totals = _copy_tree(daemon.totals)
        self.worker_active = _copy_tree(daemon.worker_active)
        self.supervisor = daemon.supervisor
        self.check_counts = dict(daemon.check_counts)
        self.check_observers: list[Callable[[tuple[str, str], CheckResult], None]] = []
        self.reloads = dict(daemon.reloads)
        self.events = daemon.events
        self.health = _FrozenHealth(daemon.health.lateness)
        self.rotation_apply: LatenessLike = _FrozenLateness(daemon.rotation_apply)
        self.checks = CheckDurations(checks.bounds)
        self.checks.series = {
            key: (list(counts), list(total)) for key, (counts, total) in checks.series.items()
        }

    def status(self) -> NodeStatus:
        return self._status

    def ready(self) -> bool:
        return self._ready


class Exposition:
    """Renders /metrics for one daemon (one per admin app). Registers the check-duration
    observer on the daemon."""

    def __init__(self, daemon: MetricsSource) -> None:
        self.daemon = daemon
        self.checks = CheckDurations()
        daemon.check_observers.append(self.checks.observe)
        self.collector = PairlbCollector(daemon, self.checks)
        self.process = CollectorRegistry()
        ProcessCollector(namespace="pairlb", registry=self.process)
        self._prefixes: dict[tuple[str, ...], Any] = {}
        self._generation = daemon.generation

    def registry(self) -> CollectorRegistry:
        """The same samples as prometheus_client families, plus the process metrics."""
        registry = CollectorRegistry()
        registry.register(self.collector)
        ProcessCollector(namespace="pairlb", registry=registry)
        return registry

    def render(self, openmetrics: bool, sel: Selection = ALL) -> bytes:
        """The exposition text in one format (the admin app picks it from Accept)."""
        self._check_generation()
        return self._render(self.collector, openmetrics, sel)

    async def render_async(
        self, openmetrics: bool, sel: Selection = ALL, *, gzip_min: int | None = None
    ) -> tuple[bytes, bool]:
        """As :meth:`render`, gzipped when ``gzip_min`` is set and the body is at least that
        big; returns (body, gzipped). Only a copy of the daemon's state is taken on the
        control loop (``Frozen``); formatting and compressing run in a thread, so a scrape
        of thousands of backends does not hold the loop (the GIL is handed back every few
        ms, and zlib lets go of it)."""
        self._check_generation()
        view = Frozen(self.daemon, self.checks)
        collector = PairlbCollector(view, view.checks)

        def work() -> tuple[bytes, bool]:
            body = self._render(collector, openmetrics, sel)
            if gzip_min is not None and len(body) >= gzip_min:
                return gzip.compress(body, compresslevel=1), True
            return body, False

        return await asyncio.to_thread(work)

    def _check_generation(self) -> None:
        if self.daemon.generation != self._generation or len(self._prefixes) > 1_000_000:
            self._prefixes = {}  # label sets of a previous config
            self._generation = self.daemon.generation

    def _render(self, collector: PairlbCollector, openmetrics: bool, sel: Selection) -> bytes:
        sink = TextSink(self._prefixes)
        collector.emit(sink, sel)
        body = sink.text(openmetrics)
        if "node" in sel.scopes:
            if openmetrics:
                body += _om_latest(self.process).decode().removesuffix("# EOF\n")
            else:
                body += _text_latest(self.process).decode()
        if openmetrics:
            body += "# EOF\n"
        return body.encode()


def declared_names() -> Iterable[str]:
    """Every family name pairlb can export (for the dashboard and docs checks)."""
    return (m.name for m in ALL_METRICS)
