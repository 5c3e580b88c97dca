"""The failover controller: the async shell around the role machine.

Owns the machine state, the heartbeat transport, the timers, the VIP port and the hooks,
and nothing else: the daemon (lb.control.daemon) creates it, feeds it local health and carrier
events, and hears about role changes through `on_role_change`. Imports nothing from lb or
healthcheck; the VIP and the network come in through `failover.core.ports`.

How it keeps its promises:

- One clock: the event loop's (monotonic). Timers are set for `machine.next_deadline`, so a
  dead MASTER is noticed at master_down exactly, not at the next tick.
- Heartbeats go out every `interval_s` from one small task that does nothing else (sign and
  send); it never waits on the VIP or hooks. After a stall it sends at once and resumes the
  cadence without a burst. Lateness of every send is kept (`status().send_lag`).
- A stall of our own loop must not look like a dead peer: when a deadline fires, the
  machine is stepped one loop iteration later, after datagrams that queued up during the
  stall have been read.
- Actions run in order in one executor task: a new MASTER acquires the VIP, *then* sends
  its first MASTER heartbeat (the old holder releases on it). VIP calls have a deadline; a
  failed acquire is a "vip" fault for `vip_retry_s`, a failed release is retried.
- Every received datagram is checked in order of cost: its source must be a listed peer
  (before any HMAC, so a flood from elsewhere is cheap), then the MAC against each key of a
  rotation, then the replay guard, and only then is it shown to the machine; anything bad
  is counted by reason and dropped, never raised. A peer's advertised interval is bounded
  (codec.bound_interval) before it sets that peer's master_down.
- Each peer's clock offset is measured from its fastest recent heartbeat and warned about
  past half of max_clock_skew_s (the replay window: beyond it a restarted node is not heard).
- Partition guard (failover.adapters.track): with `track_gateway`, a node whose gateway does not
  answer is in FAULT (the probes run in a task of their own, off the heartbeat path).
- Graceful stop is make-before-break: priority 0 heartbeats; a peer takes over after its
  Skew_Time; we release when we hear it as MASTER (or after `leave_timeout_s`, or at once
  if no peer is alive), then say goodbye twice more.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

from failover.adapters.hooks import HookCounters, HookRunner
from failover.adapters.track import (
    GATEWAY_FAULT,
    GatewayStatus,
    GatewayTracker,
    ProbeFn,
    parse_target,
)
from failover.adapters.transport import DEFAULT_PORT, UdpTransport, parse_peer
from failover.core import machine
from failover.core.codec import (
    DIGEST_LEN,
    MAX_INTERVAL_MS,
    MIN_KEY_LEN,
    Heartbeat,
    HeartbeatFlags,
    HeartbeatRejected,
    RejectReason,
    ReplayGuard,
    bound_interval,
    decode_any,
    encode,
    key_id,
    node_name_error,
)
from failover.core.machine import (
    AcquireVip,
    Action,
    Advert,
    AnnounceVip,
    Event,
    MachineError,
    ReleaseVip,
    Role,
    RunHooks,
    SendHeartbeat,
)
from failover.core.ports import Address, FailoverError, HandoverPort, HeartbeatTransport, VipPort

log = logging.getLogger(__name__)

VIP_FAULT = "vip"
"""Fault reason while a failed acquire is being backed off."""

RoleCallback = Callable[[Role, Role], None]


class FailoverConfigError(FailoverError, ValueError):
    """A FailoverSpec value breaks a rule; the message names the key, value and rule."""


LIVE_FIELDS = ("key", "verify_keys", "max_clock_skew_s", "config_digest")
"""What `FailoverController.reconfigure` applies live (a reload); the rest waits for a restart."""

# Bounds of the settings an operator writes in [failover], here once: FailoverSpec checks
# them and lb.config declares them from these (its defaults are FailoverSpec's).
INTERVAL_MIN_S = 0.005
INTERVAL_MAX_S = MAX_INTERVAL_MS / 1000
"""Heartbeat interval: under 5 ms the timer cannot keep time; above, peers bound it anyway
(failover.core.codec.bound_interval)."""
CLOCK_SKEW_MIN_S = 1.0
CLOCK_SKEW_MAX_S = 3600.0
TRACK_INTERVAL_MIN_S = 0.01
TRACK_MAX_S = 60.0
"""Largest track_gateway interval and timeout."""
TRACK_COUNT_MAX = 100
"""Largest track_gateway fall / rise."""
SEND_LAG_SAMPLES = 4096
"""How many recent sends `FailoverStatus.send_lag` is taken over."""


@dataclass(frozen=True)
class FailoverSpec:
    """Everything the controller needs, validated once. Keys mirror `[failover]`."""

    node_name: str
    interface: str
    vips: tuple[str, ...]
    priority: int
    peers: tuple[str, ...]
    key: bytes = field(repr=False)
    """Signs our heartbeats, and verifies the peers'."""
    port: int = DEFAULT_PORT
    bind: str | None = None
    address: str | None = None
    """Tie-break address sent in heartbeats; default: `bind` unless it is a wildcard."""
    multicast_group: str | None = None
    interval_s: float = 0.03
    down_after: int = 3
    preempt: bool = True
    preempt_delay_s: float = 0.0
    notify: tuple[str, ...] = ()
    notify_timeout_s: float = 5.0
    config_digest: bytes = bytes(DIGEST_LEN)
    verify_keys: tuple[bytes, ...] = field(default=(), repr=False)
    """More keys that verify (never sign) heartbeats: a key rotation in progress."""
    max_clock_skew_s: float = 30.0
    """A restarted peer is heard only if its clock is within this of ours (the replay
    guard's window); offsets past half of it are warned about."""
    leave_timeout_s: float = 1.0
    vip_timeout_s: float = 5.0
    vip_retry_s: float = 1.0
    handover_forward_s: float = 30.0
    """After taking the VIP from a live peer: how long packets of its connections are
    passed to it (failover.adapters.handover); 0 disables."""
    track_gateway: tuple[str, ...] = ()
    """Partition guard targets (failover.adapters.track): while none answers, this node is
    in FAULT."""
    track_gateway_interval_s: float = 0.5
    track_gateway_timeout_s: float = 0.5
    track_gateway_fall: int = 3
    track_gateway_rise: int = 2

    def __post_init__(self) -> None:
        def bad(key: str, rule: str, value: object) -> FailoverConfigError:
            return FailoverConfigError(f"failover.{key}: {rule} (got {value!r})")

        name_rule = node_name_error(self.node_name)
        if name_rule is not None:
            raise bad("node_name", name_rule, self.node_name)
        if not machine.PRIORITY_MIN <= self.priority <= machine.PRIORITY_MAX:
            raise bad("priority", f"must be {machine.PRIORITY_MIN}..{machine.PRIORITY_MAX} "
                      "(0 is reserved for leaving)", self.priority)
        if not self.peers and self.multicast_group is None:
            raise bad("peers", "at least one peer (or a multicast_group)", self.peers)
        for k in self.keys:
            if len(k) < MIN_KEY_LEN:
                raise bad("key", f"at least {MIN_KEY_LEN} bytes", f"{len(k)} bytes")
        if len(set(self.keys)) != len(self.keys):
            raise bad("key_files", "the same key twice", [key_id(k) for k in self.keys])
        if not (math.isfinite(self.interval_s)
                and INTERVAL_MIN_S <= self.interval_s <= INTERVAL_MAX_S):
            raise bad("interval_s", f"must be {INTERVAL_MIN_S:g}..{INTERVAL_MAX_S:g}",
                      self.interval_s)
        if not (math.isfinite(self.max_clock_skew_s)
                and CLOCK_SKEW_MIN_S <= self.max_clock_skew_s <= CLOCK_SKEW_MAX_S):
            raise bad("max_clock_skew_s", f"must be {CLOCK_SKEW_MIN_S:g}..{CLOCK_SKEW_MAX_S:g}",
                      self.max_clock_skew_s)
        if not machine.DOWN_AFTER_MIN <= self.down_after <= machine.DOWN_AFTER_MAX:
            raise bad("down_after",
                      f"must be {machine.DOWN_AFTER_MIN}..{machine.DOWN_AFTER_MAX}",
                      self.down_after)
        if len(self.config_digest) != DIGEST_LEN:
            raise bad("config_digest", f"must be {DIGEST_LEN} bytes", self.config_digest)
        for key in ("preempt_delay_s", "leave_timeout_s", "handover_forward_s"):
            if not getattr(self, key) >= 0:
                raise bad(key, "must be >= 0", getattr(self, key))
        for key in ("notify_timeout_s", "vip_timeout_s", "vip_retry_s"):
            if not getattr(self, key) > 0:
                raise bad(key, "must be > 0", getattr(self, key))
        if not TRACK_INTERVAL_MIN_S <= self.track_gateway_interval_s <= TRACK_MAX_S:
            raise bad("track_gateway_interval_s", f"must be {TRACK_INTERVAL_MIN_S:g}.."
                      f"{TRACK_MAX_S:g}", self.track_gateway_interval_s)
        if not 0 < self.track_gateway_timeout_s <= TRACK_MAX_S:
            raise bad("track_gateway_timeout_s", f"must be > 0 and <= {TRACK_MAX_S:g}",
                      self.track_gateway_timeout_s)
        for key in ("track_gateway_fall", "track_gateway_rise"):
            if not 1 <= getattr(self, key) <= TRACK_COUNT_MAX:
                raise bad(key, f"must be 1..{TRACK_COUNT_MAX}", getattr(self, key))
        for target in self.track_gateway:
            try:
                parse_target(target)
            except ValueError as exc:
                raise bad("track_gateway", str(exc), target) from None
        for key in ("address", "bind"):
            value = getattr(self, key)
            if value is not None:
                try:
                    ipaddress.ip_address(value)
                except ValueError:
                    raise bad(key, "must be an IP address", value) from None

    @property
    def keys(self) -> tuple[bytes, ...]:
        """Every key that verifies; the first signs."""
        return (self.key, *self.verify_keys)

    @property
    def tiebreak_address(self) -> machine.IPAddress | None:
        if self.address is not None:
            return ipaddress.ip_address(self.address)
        if self.bind is not None and not ipaddress.ip_address(self.bind).is_unspecified:
            return ipaddress.ip_address(self.bind)
        return None

    def params(self) -> machine.Params:
        return machine.Params(
            name=self.node_name, priority=self.priority, interval_s=self.interval_s,
            down_after=self.down_after, preempt=self.preempt,
            preempt_delay_s=self.preempt_delay_s, address=self.tiebreak_address,
            leave_timeout_s=self.leave_timeout_s,
        )


@dataclass
class FailoverCounters:
    """Monotonic counters for metrics (pairlb_failover_*_total)."""

    heartbeats_sent: int = 0
    heartbeats_received: int = 0
    duplicates: int = 0
    """The same heartbeat again via another path: normal with several peer addresses."""
    rejected: dict[RejectReason, int] = field(default_factory=dict)
    transitions: dict[tuple[Role, Role], int] = field(default_factory=dict)
    vip_errors: int = 0
    late_sends: int = 0
    """Heartbeats sent more than one interval late (our loop stalled)."""
    delayed: int = 0
    """Heartbeats that arrived more than master_down later than their peers usually do
    (queued by the network, e.g. during ARP resolution); never a reason to yield."""
    internal_errors: int = 0
    """Exceptions caught at the controller's error boundaries (receive, send, an action, an
    event the machine refused): a bug, logged with its traceback."""
    verified: dict[str, int] = field(default_factory=dict)
    """Datagrams whose MAC verified, by key id (which key of a rotation the peers use)."""
    interval_clamped: dict[str, int] = field(default_factory=dict)
    """Heartbeats whose advertised interval was clamped (too_long, too_short)."""


@dataclass(frozen=True)
class PathStatus:
    address: str
    last_heard_age_s: float


@dataclass(frozen=True)
class PeerStatus:
    name: str
    role: Role
    priority: int
    alive: bool
    last_heard_age_s: float
    paths: tuple[PathStatus, ...]
    healthy: bool
    healthy_count: int
    total_count: int
    config_digest_match: bool
    leaving: bool
    switchover: bool
    clock_offset_s: float | None = None
    """Its clock minus ours, from the fastest recent heartbeat (so less the smallest one-way
    delay); None before the first."""
    clock_skew_warning: bool = False
    """|clock_offset_s| is past half of max_clock_skew_s."""
    key_id: str | None = None
    """The key its last heartbeat verified with."""
    interval_s: float = 0.0
    """The heartbeat interval used for its master_down (its advertised one, bounded)."""


@dataclass(frozen=True)
class PeerClock:
    """A node whose heartbeats verify but whose clock is outside the window: never heard."""

    name: str
    offset_s: float
    last_seen_age_s: float


@dataclass(frozen=True)
class KeyStatus:
    key_id: str
    signing: bool
    verified: int


@dataclass(frozen=True)
class SendLag:
    """How late heartbeats left, over the last `samples` sends (seconds)."""

    samples: int
    p50_s: float
    p99_s: float
    max_s: float


@dataclass(frozen=True)
class FailoverStatus:
    node: str
    role: Role
    role_reason: str
    role_since: float
    """Wall-clock time of the last transition, for people."""
    role_age_s: float
    priority: int
    healthy: bool
    healthy_count: int
    total_count: int
    faults: tuple[str, ...]
    vip_holding: bool
    switchover_pending: bool
    preempt_suppressed: bool
    master_down_s: float
    peers: tuple[PeerStatus, ...]
    counters: FailoverCounters
    send_lag: SendLag
    handover_enabled: bool = False
    handover_forwarding_to: str | None = None
    handover_forwards: int = 0
    max_clock_skew_s: float = 30.0
    clock_skew_warning: bool = False
    """Some peer's clock offset is past half of max_clock_skew_s (see PeerStatus)."""
    rejected_clocks: tuple[PeerClock, ...] = ()
    keys: tuple[KeyStatus, ...] = ()
    """The configured keys, signing one first."""
    gateway: GatewayStatus | None = None
    """The partition guard (failover.track_gateway), if configured."""
    heartbeat_send_errors: int = 0
    """Heartbeat datagrams the transport could not send, and ICMP errors for earlier ones
    (a peer's port unreachable): the transport's `send_errors`."""
    vip_announcements: int = 0
    """Gratuitous ARP / unsolicited NA packets the VIP adapter sent."""
    vip_announcement_errors: int = 0
    """Announcement rounds the VIP adapter failed to send (the VIPs stay held)."""
    notify: HookCounters = field(default_factory=HookCounters)
    """The notify scripts: runs, failures, timeouts, transitions dropped."""


@dataclass
class _PeerInfo:
    name: str
    paths: dict[str, float] = field(default_factory=dict)
    epoch: int = 0
    healthy_count: int = 0
    total_count: int = 0
    digest_match: bool = True
    last_master: float | None = None
    """When it last said MASTER (local monotonic time; delayed heartbeats excluded)."""
    transit_ms: deque[int] = field(default_factory=lambda: deque(maxlen=_TRANSIT_SAMPLES))
    """Recent (our wall clock - its timestamp): clock offset plus network delay."""
    key_id: str | None = None
    skew_warning: bool = False
    skew_logged_at: float | None = None
    clamp_logged_at: float | None = None

    def clock_offset_ms(self) -> int | None:
        """Its clock minus ours: the fastest recent heartbeat has the least network delay."""
        return -min(self.transit_ms) if self.transit_ms else None

    def delay_ms(self, now_ms: int, sent_ms: int) -> int:
        """How much later than usual this heartbeat arrived (0 for the usual ones).

        The baseline is the smallest transit of the last samples, so a steady clock offset
        between the hosts cancels out and no clock sync is needed; a clock step is absorbed
        after _TRANSIT_SAMPLES heartbeats (and until then only costs a yield, not a takeover).
        """
        transit = now_ms - sent_ms
        base = min(self.transit_ms, default=transit)
        self.transit_ms.append(transit)
        return max(0, transit - base)


_TRANSIT_SAMPLES = 64
_HANDOVER_RECENT_S = 5.0
CLOCK_SKEW_WARN_FRACTION = 0.5
"""Warn when a peer's clock offset passes this share of max_clock_skew_s."""
_WARN_EVERY_S = 60.0
_MAX_REJECTED_CLOCKS = 16


def _host(address: str) -> str:
    """A source or peer address as one canonical string (no scope id, never v4-mapped)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class FailoverController:
    """Heartbeats + role machine + VIP for one node. See the module docstring.

    Call from the event loop thread only. `start()` then, at the end, `stop()`.
    """

    def __init__(
        self,
        spec: FailoverSpec,
        vip: VipPort,
        *,
        transport: HeartbeatTransport | None = None,
        hooks: HookRunner | None = None,
        handover: HandoverPort | None = None,
        on_role_change: RoleCallback | None = None,
        wall_clock: Callable[[], float] = time.time,
        gateway_probe: ProbeFn | None = None,
    ) -> None:
        self.spec = spec
        self._vip = vip
        self._transport: HeartbeatTransport = transport or UdpTransport(
            spec.peers, port=spec.port, bind=spec.bind, multicast_group=spec.multicast_group,
            interface=spec.interface)
        self._hooks = hooks or HookRunner(spec.notify, node=spec.node_name,
                                          timeout_s=spec.notify_timeout_s)
        self._on_role_change = on_role_change
        self._handover = handover
        self._wall = wall_clock
        self._state = machine.initial_state(spec.params())
        self._advert = Advert(Role.INIT, spec.priority, healthy=False)
        self._epoch = secrets.randbits(64) or 1
        self._seq = 0
        self._interval_ms = max(1, round(spec.interval_s * 1000))
        self._guard = ReplayGuard(window_ms=round(spec.max_clock_skew_s * 1000))
        self._key_ids = tuple(key_id(k) for k in spec.keys)
        self._sources = self._allowed_sources(spec)
        self._rejected_clocks: dict[str, tuple[float, float]] = {}
        self._peers: dict[str, _PeerInfo] = {}
        self._health = (False, 0, 0)
        self._early_faults: set[str] = set()  # reported before start()
        self.counters = FailoverCounters()
        self._lags: deque[float] = deque(maxlen=SEND_LAG_SAMPLES)
        self._role_since_wall = self._wall()
        self._reject_logged: dict[RejectReason, float] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._actions: asyncio.Queue[Action] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._left: asyncio.Event | None = None
        self._started = False
        self._closed = False
        self._tracker: GatewayTracker | None = None
        self._tracker_task: asyncio.Task[None] | None = None
        if spec.track_gateway:
            self._tracker = GatewayTracker(
                spec.track_gateway, interface=spec.interface,
                interval_s=spec.track_gateway_interval_s,
                timeout_s=spec.track_gateway_timeout_s, fall=spec.track_gateway_fall,
                rise=spec.track_gateway_rise, on_change=self._gateway_changed,
                probe=gateway_probe)
            # Unknown until the first answer: a node must not claim the VIP before it knows
            # it is not the one cut off.
            self._early_faults.add(GATEWAY_FAULT)

    @staticmethod
    def _allowed_sources(spec: FailoverSpec) -> frozenset[str] | None:
        """Heartbeat sources we verify at all: the peers' addresses. None (anyone) only in
        multicast mode with no peers listed, where the group is link-local (TTL 1)."""
        if not spec.peers:
            return None
        hosts = set()
        for text in spec.peers:
            try:
                hosts.add(_host(parse_peer(text)[0]))
            except ValueError:
                hosts.add(_host(text))  # the transport refuses it with the reason
        return frozenset(hosts)

    # -- public API ---------------------------------------------------------------------------

    @property
    def peer_hosts(self) -> frozenset[str]:
        """The peers' addresses (empty in multicast mode without peers): whose unresolved
        neighbour entries a regained carrier forgets (VipAdapter.watch_carrier)."""
        return self._sources or frozenset()

    @property
    def role(self) -> Role:
        return self._state.role

    async def start(self) -> None:
        """Bind, remove stale VIPs, then join as BACKUP (or FAULT) and start heartbeats."""
        if self._started:
            raise FailoverError("failover controller already started")
        self._loop = asyncio.get_running_loop()
        self._actions = asyncio.Queue()
        self._left = asyncio.Event()
        await self._transport.start(self._on_datagram)
        try:
            async with asyncio.timeout(self.spec.vip_timeout_s):
                removed = await self._vip.remove_stale()
        except Exception as exc:
            self._transport.close()
            raise FailoverError(f"failover: cannot remove stale VIPs from "
                                f"{self.spec.interface}: {exc}") from exc
        if removed:
            log.warning("failover_stale_vips_removed node=%s vips=%s", self.spec.node_name,
                        ",".join(removed))
        if self._handover is not None and self.spec.handover_forward_s > 0:
            await self._handover.start()
        if self._tracker is not None:
            try:
                self._tracker.start()
            except FailoverError:
                self._transport.close()
                raise
        self._started = True
        log.info("failover_started node=%s priority=%s interval_s=%s master_down_s=%.3f "
                 "peers=%s", self.spec.node_name, self.spec.priority, self.spec.interval_s,
                 self._state.params.master_down_s, ",".join(self.spec.peers))
        if self._health[0]:
            self._step(machine.LocalHealthChanged(True))
        for reason in sorted(self._early_faults):  # e.g. carrier already down at start
            self._step(machine.FaultDetected(reason))
        self._step(machine.Started())
        self._runner = asyncio.create_task(self._run(), name=f"failover-{self.spec.node_name}")
        self._runner.add_done_callback(self._runner_done)
        if self._tracker is not None:
            # Its own task, not in the runner's TaskGroup: a probe can never delay or stop a
            # heartbeat, and the tracker's rounds catch their own errors.
            self._tracker_task = asyncio.create_task(
                self._tracker.run(), name=f"failover-track-{self.spec.node_name}")
            self._tracker_task.add_done_callback(self._tracker_done)

    async def stop(self, *, graceful: bool = True) -> None:
        """Leave the pair. Graceful: hand the VIP over first (see module doc), bounded. Not
        graceful: stop at once without a word and without touching the VIP (as kill -9)."""
        if not self._started or self._closed:
            return
        assert self._actions is not None and self._left is not None
        if graceful:
            self._step(machine.ShutdownRequested())
            bound = self.spec.leave_timeout_s + 2 * self.spec.vip_timeout_s
            try:
                async with asyncio.timeout(bound):
                    await self._left.wait()
                    await self._actions.join()
            except TimeoutError:
                log.warning("failover_stop_timeout node=%s role=%s", self.spec.node_name,
                            self.role.label)
            for _ in range(2):  # one lost datagram must not cost the peer master_down
                self._send_round()
            await self._hooks.drain(self.spec.notify_timeout_s + 1.0)
        await self._shutdown()
        if graceful and self._vip.holding:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.spec.vip_timeout_s):
                    await self._vip.release()
        log.info("failover_stopped node=%s graceful=%s", self.spec.node_name, graceful)

    def set_local_health(self, healthy: bool, healthy_count: int = 0, total: int = 0) -> None:
        """What this node's own checks say: `healthy` once they found healthy backends."""
        self._health = (healthy, max(0, healthy_count), max(0, total))
        if self._started and not self._closed and healthy != self._state.healthy:
            self._step(machine.LocalHealthChanged(healthy))

    def report_fault(self, reason: str) -> None:
        """A condition under which this node must not hold the VIP began (e.g. carrier)."""
        if not self._started:
            self._early_faults.add(reason)
        elif reason not in self._state.faults:
            self._step(machine.FaultDetected(reason))

    def clear_fault(self, reason: str) -> None:
        self._early_faults.discard(reason)
        if reason in self._state.faults:
            self._step(machine.FaultCleared(reason))

    def carrier_changed(self, ifname: str, up: bool) -> None:
        """Carrier events of a tracked interface (fits VipAdapter.watch_carrier)."""
        reason = f"carrier:{ifname}"
        if up:
            self.clear_fault(reason)
        else:
            self.report_fault(reason)

    def request_switchover(self) -> bool:
        """Ask this MASTER to hand the VIP to the best backup; False unless MASTER."""
        if self._state.role is not Role.MASTER or self._closed:
            return False
        return self._step(machine.SwitchoverRequested())

    def cancel_switchover(self) -> None:
        if self._state.switchover:
            self._step(machine.SwitchoverCancelled())

    def reconfigure(self, spec: FailoverSpec) -> tuple[str, ...]:
        """Apply what a reload may change live: the keys (a rotation), max_clock_skew_s and
        the config digest. Returns the names of the other fields that differ, which only a
        restart applies (the VIP never moves on reload)."""
        pending = tuple(f.name for f in fields(FailoverSpec) if f.name not in LIVE_FIELDS
                        and getattr(spec, f.name) != getattr(self.spec, f.name))
        old = self.spec
        self.spec = replace(old, key=spec.key, verify_keys=spec.verify_keys,
                            max_clock_skew_s=spec.max_clock_skew_s,
                            config_digest=spec.config_digest)
        self._key_ids = tuple(key_id(k) for k in self.spec.keys)
        self._guard.window_ms = round(self.spec.max_clock_skew_s * 1000)
        if old.keys != self.spec.keys:
            log.info("failover_keys_changed node=%s signing=%s accepting=%s",
                     self.spec.node_name, self._key_ids[0], ",".join(self._key_ids))
        if old.config_digest != self.spec.config_digest:
            for info in self._peers.values():
                info.digest_match = True  # re-evaluated (and logged) on its next heartbeat
        return pending

    def status(self) -> FailoverStatus:
        ho = self._handover
        now = self._now()
        s = self._state
        peers = []
        for name, view in sorted(s.peers.items()):
            info = self._peers.get(name) or _PeerInfo(name)
            offset_ms = info.clock_offset_ms()
            peers.append(PeerStatus(
                name=name, role=view.role, priority=view.priority,
                alive=machine.alive(s, view, now), last_heard_age_s=now - view.last_heard,
                paths=tuple(PathStatus(a, now - t) for a, t in sorted(info.paths.items())),
                healthy=view.healthy, healthy_count=info.healthy_count,
                total_count=info.total_count, config_digest_match=info.digest_match,
                leaving=view.leaving, switchover=view.switchover,
                clock_offset_s=None if offset_ms is None else offset_ms / 1000,
                clock_skew_warning=info.skew_warning, key_id=info.key_id,
                interval_s=view.interval_s,
            ))
        c = self.counters
        verified = dict(c.verified)
        return FailoverStatus(
            node=self.spec.node_name, role=s.role, role_reason=s.reason,
            role_since=self._role_since_wall,
            role_age_s=now - s.since if self._started else 0.0,
            priority=self.spec.priority, healthy=s.healthy, healthy_count=self._health[1],
            total_count=self._health[2], faults=tuple(sorted(machine.faults_of(s, now))),
            vip_holding=self._vip.holding, switchover_pending=s.switchover,
            preempt_suppressed=s.preempt_suppressed, master_down_s=s.params.master_down_s,
            peers=tuple(peers),
            counters=replace(c, rejected=dict(c.rejected), transitions=dict(c.transitions),
                             verified=verified, interval_clamped=dict(c.interval_clamped)),
            send_lag=self._lag_stats(),
            handover_enabled=ho is not None and ho.enabled,
            handover_forwarding_to=ho.forwarding_to if ho is not None else None,
            handover_forwards=ho.forwards if ho is not None else 0,
            max_clock_skew_s=self.spec.max_clock_skew_s,
            clock_skew_warning=any(p.clock_skew_warning for p in peers),
            rejected_clocks=tuple(PeerClock(name, off, now - t) for name, (off, t)
                                  in sorted(self._rejected_clocks.items())),
            keys=tuple(KeyStatus(kid, i == 0, verified.get(kid, 0))
                       for i, kid in enumerate(self._key_ids)),
            gateway=self._tracker.status() if self._tracker is not None else None,
            heartbeat_send_errors=self._transport.send_errors,
            vip_announcements=self._vip.announcements_sent,
            vip_announcement_errors=self._vip.announcement_errors,
            notify=self._hooks.counters(),
        )

    # -- the machine ----------------------------------------------------------------------------

    def _now(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    def _step(self, event: Event) -> bool:
        if self._closed or not self._started or self._actions is None:
            return False
        now = self._now()
        try:
            new, actions = machine.step(self._state, event, now)
        except MachineError as exc:
            self.counters.internal_errors += 1
            log.error("failover_event_refused node=%s event=%s error=%s", self.spec.node_name,
                      type(event).__name__, exc)
            return False
        self._state = new
        for action in actions:
            if isinstance(action, RunHooks):
                key = (action.old, action.new)
                self.counters.transitions[key] = self.counters.transitions.get(key, 0) + 1
                self._role_since_wall = self._wall()
                log.info("failover_role_changed node=%s from=%s to=%s reason=%r",
                         self.spec.node_name, action.old.label, action.new.label,
                         action.reason)
            self._actions.put_nowait(action)
        if new.role is Role.INIT and new.leaving and self._left is not None:
            self._left.set()
        self._arm_timer(now)
        return True

    def _arm_timer(self, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = machine.next_deadline(self._state, now)
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_at(deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        # One more loop iteration first: a timer handle runs after the I/O callbacks of its
        # iteration, so heartbeats that queued while the loop was stalled are read before
        # we decide that their sender is dead.
        assert self._loop is not None
        self._timer = self._loop.call_at(self._loop.time(), self._timer_step)

    def _timer_step(self) -> None:
        self._timer = None
        self._step(machine.TimerExpired())

    # -- tasks ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._send_loop(), name="failover-send")
            tg.create_task(self._execute_loop(), name="failover-actions")
            tg.create_task(self._hooks.run(), name="failover-hooks")

    def _tracker_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._closed:
            return
        # Without its guard this node cannot tell whether it is the one cut off: it stays
        # out of the election rather than risk two MASTERs.
        log.critical("failover_gateway_tracker_died node=%s", self.spec.node_name,
                     exc_info=task.exception())
        self.report_fault(GATEWAY_FAULT)

    def _gateway_changed(self, up: bool) -> None:
        if self._closed:
            return
        if up:
            self.clear_fault(GATEWAY_FAULT)
        else:
            self.report_fault(GATEWAY_FAULT)

    def _runner_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and not self._closed:
            log.critical("failover_runner_died node=%s", self.spec.node_name,
                         exc_info=task.exception())

    async def _shutdown(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        if self._tracker_task is not None:
            self._tracker_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # logged when it died
                await self._tracker_task
        if self._tracker is not None:
            self._tracker.close()
        self._transport.close()

    async def _send_loop(self) -> None:
        assert self._loop is not None
        loop, interval = self._loop, self.spec.interval_s
        due = loop.time()
        while True:
            now = loop.time()
            if now < due:
                await asyncio.sleep(due - now)
                now = loop.time()
            lag = now - due
            self._lags.append(lag)
            if lag > interval:
                self.counters.late_sends += 1
                log.warning("failover_heartbeat_late node=%s late_s=%.3f", self.spec.node_name,
                            lag)
            try:
                self._send_round()
            except Exception:
                self.counters.internal_errors += 1
                log.exception("failover_send_failed node=%s", self.spec.node_name)
            due += interval
            if due <= now:  # stalled past a whole interval: resume the cadence, no burst
                due = now + interval

    def _send_round(self) -> None:
        adv = self._advert
        if adv.role is Role.INIT and not adv.leaving:
            return
        self._seq += 1
        _, count, total = self._health
        count = min(count, total, 0xFFFF)
        flags = HeartbeatFlags.NONE
        if adv.healthy:
            flags |= HeartbeatFlags.HEALTHY
        if adv.leaving:
            flags |= HeartbeatFlags.LEAVING
        if adv.switchover:
            flags |= HeartbeatFlags.SWITCHOVER
        data = encode(Heartbeat(
            name=self.spec.node_name, role=adv.role, priority=adv.priority, epoch=self._epoch,
            seq=self._seq, timestamp_ms=int(self._wall() * 1000),
            config_digest=self.spec.config_digest, address=self.spec.tiebreak_address,
            healthy_count=count, total_count=min(total, 0xFFFF), interval_ms=self._interval_ms,
            flags=flags,
        ), self.spec.key)
        for dest in self._transport.destinations():
            self._transport.send(data, dest)
            self.counters.heartbeats_sent += 1

    async def _execute_loop(self) -> None:
        assert self._actions is not None
        while True:
            action = await self._actions.get()
            try:
                await self._execute(action)
            except Exception:
                self.counters.internal_errors += 1
                log.exception("failover_action_failed node=%s action=%s", self.spec.node_name,
                              action)
            finally:
                self._actions.task_done()

    async def _execute(self, action: Action) -> None:
        if isinstance(action, SendHeartbeat):
            self._advert = action.advert
            self._send_round()
        elif isinstance(action, AcquireVip):
            await self._arm_handover()  # before the gratuitous ARP moves the clients
            if not await self._vip_call("acquire", self._vip.acquire):
                self._acquire_failed()
        elif isinstance(action, ReleaseVip):
            if not await self._vip_call("release", self._vip.release):
                self._retry_release()
            if self._handover is not None:  # no VIP here: forwarding could only loop
                with contextlib.suppress(Exception):
                    await self._handover.stop_forwarding()
        elif isinstance(action, AnnounceVip):
            await self._arm_handover()
            await self._vip_call("announce", self._vip.announce)
        elif isinstance(action, RunHooks):
            self._hooks.notify(str(action.old), str(action.new), action.reason)
            if self._on_role_change is not None:
                try:
                    self._on_role_change(action.old, action.new)
                except Exception:
                    log.exception("failover_role_callback_failed node=%s", self.spec.node_name)

    def handover_peer(self, now: float) -> str | None:
        """The address of the live peer that held the VIP last (said MASTER within the last
        `_HANDOVER_RECENT_S`), if any: clients may still have connections with it."""
        best: tuple[float, str] | None = None
        for name, view in self._state.peers.items():
            info = self._peers.get(name)
            if info is None or info.last_master is None or not info.paths:
                continue
            if not machine.alive(self._state, view, now):
                continue  # dead (kill -9): nobody to pass packets to, a reset is better
            if now - info.last_master > _HANDOVER_RECENT_S:
                continue
            address = max(info.paths, key=lambda a: info.paths[a])
            if best is None or info.last_master > best[0]:
                best = (info.last_master, address)
        return best[1] if best is not None else None

    async def _arm_handover(self) -> None:
        if self._handover is None or not self._handover.enabled:
            return
        peer = self.handover_peer(self._now())
        if peer is None:
            return
        try:
            await self._handover.forward_to(peer, self.spec.handover_forward_s)
        except Exception:  # an optimisation: the VIP moves regardless
            log.exception("failover_handover_failed node=%s peer=%s", self.spec.node_name, peer)

    async def close_handover(self) -> None:
        """Remove the handover's netfilter state: after the workers drained, at exit."""
        if self._handover is not None:
            with contextlib.suppress(Exception):
                await self._handover.close()

    async def _vip_call(self, what: str, call: Callable[[], object]) -> bool:
        try:
            async with asyncio.timeout(self.spec.vip_timeout_s):
                result = call()
                if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                    await result
        except Exception as exc:
            self.counters.vip_errors += 1
            log.error("failover_vip_failed node=%s step=%s error=%s", self.spec.node_name,
                      what, exc or type(exc).__name__)
            return False
        return True

    def _acquire_failed(self) -> None:
        # Holding the VIP half-way is worse than not at all: FAULT releases it, and after
        # vip_retry_s the node rejoins as BACKUP and may try again.
        assert self._loop is not None
        self.report_fault(VIP_FAULT)
        self._loop.call_later(self.spec.vip_retry_s, self.clear_fault, VIP_FAULT)

    def _retry_release(self) -> None:
        assert self._loop is not None

        def again() -> None:
            if not self._closed and self._actions is not None and self.role is not Role.MASTER:
                self._actions.put_nowait(ReleaseVip())

        self._loop.call_later(self.spec.vip_retry_s, again)

    # -- receiving ----------------------------------------------------------------------------

    def _on_datagram(self, data: bytes, source: Address) -> None:
        try:
            self._receive(data, source)
        except Exception:  # error boundary of the receive path
            self.counters.internal_errors += 1
            log.exception("failover_receive_failed node=%s source=%s", self.spec.node_name,
                          source[0])

    def from_peer(self, host: str) -> bool:
        """Whether a datagram from `host` is looked at at all (a peer's address; anyone in
        multicast mode without peers)."""
        sources = self._sources
        return sources is None or host in sources or ("%" in host and _host(host) in sources)

    def _receive(self, data: bytes, source: Address) -> None:
        if self._closed:
            return
        if not self.from_peer(source[0]):
            # Before the MAC: a flood from elsewhere costs a set lookup, not an HMAC.
            self._unknown_source(source)
            return
        try:
            hb, index = decode_any(data, self.spec.keys)
            kid = self._key_ids[index]
            self.counters.verified[kid] = self.counters.verified.get(kid, 0) + 1
            if hb.name == self.spec.node_name:
                raise HeartbeatRejected(RejectReason.LOOPED)
            interval_ms, clamped = bound_interval(hb.interval_ms, self._interval_ms)
            wall_ms = int(self._wall() * 1000)
            try:
                fresh = self._guard.check(hb, wall_ms)
            except HeartbeatRejected as exc:
                if exc.reason is RejectReason.STALE:
                    self._stale_clock(hb, wall_ms)
                raise
        except HeartbeatRejected as exc:
            self._rejected(exc, source)
            return
        now = self._now()
        info = self._peers.get(hb.name)
        if info is None:
            info = self._peers[hb.name] = _PeerInfo(hb.name)
        info.paths[source[0]] = now
        info.key_id = kid
        if not fresh:
            self.counters.duplicates += 1
            return
        self.counters.heartbeats_received += 1
        self._rejected_clocks.pop(hb.name, None)
        if info.epoch != hb.epoch:
            if info.epoch:
                log.info("failover_peer_restarted node=%s peer=%s", self.spec.node_name, hb.name)
            info.epoch = hb.epoch
            info.transit_ms.clear()
        if clamped is not None:
            self._interval_clamped(info, hb.interval_ms, interval_ms, clamped, now)
        delay_ms = info.delay_ms(int(self._wall() * 1000), hb.timestamp_ms)
        self._check_clock(info, now)
        p = self._state.params
        delayed = delay_ms > machine.master_down_s(
            p.priority, interval_ms / 1000, p.down_after) * 1000
        if hb.role is Role.MASTER and not delayed:
            info.last_master = now
        if delayed:
            self.counters.delayed += 1
            log.info("failover_heartbeat_delayed node=%s peer=%s role=%s delay_ms=%d",
                     self.spec.node_name, hb.name, hb.role.label, delay_ms)
        info.healthy_count, info.total_count = hb.healthy_count, hb.total_count
        match = hb.config_digest == self.spec.config_digest
        if match != info.digest_match:
            info.digest_match = match
            if match:
                log.info("failover_config_digest_match node=%s peer=%s", self.spec.node_name,
                         hb.name)
            else:
                log.warning("failover_config_digest_mismatch node=%s peer=%s ours=%s theirs=%s",
                            self.spec.node_name, hb.name, self.spec.config_digest.hex(),
                            hb.config_digest.hex())
        self._step(machine.HeartbeatReceived(
            peer=hb.name, role=hb.role, priority=hb.priority,
            healthy=HeartbeatFlags.HEALTHY in hb.flags, interval_s=interval_ms / 1000,
            address=hb.address, leaving=HeartbeatFlags.LEAVING in hb.flags,
            switchover=HeartbeatFlags.SWITCHOVER in hb.flags, delayed=delayed,
        ))

    def _interval_clamped(self, info: _PeerInfo, advertised_ms: int, used_ms: int,
                          reason: str, now: float) -> None:
        c = self.counters.interval_clamped
        c[reason] = c.get(reason, 0) + 1
        if info.clamp_logged_at is None or now - info.clamp_logged_at >= _WARN_EVERY_S:
            info.clamp_logged_at = now
            log.warning("failover_peer_interval_clamped node=%s peer=%s advertised_ms=%d "
                        "used_ms=%d reason=%s ours_ms=%d total=%d", self.spec.node_name,
                        info.name, advertised_ms, used_ms, reason, self._interval_ms, c[reason])

    def _check_clock(self, info: _PeerInfo, now: float) -> None:
        """Warn (rate-limited) while a peer's clock is more than half the window off: if
        either node restarted now, the other would reject it as STALE (two MASTERs)."""
        offset_ms = info.clock_offset_ms()
        if offset_ms is None:
            return
        limit_ms = self.spec.max_clock_skew_s * 1000 * CLOCK_SKEW_WARN_FRACTION
        if abs(offset_ms) >= limit_ms:
            if (not info.skew_warning or info.skew_logged_at is None
                    or now - info.skew_logged_at >= _WARN_EVERY_S):
                info.skew_logged_at = now
                log.warning("failover_peer_clock_skew node=%s peer=%s offset_s=%+.3f "
                            "max_clock_skew_s=%g: past this window a restarted node is not "
                            "heard (two MASTERs); check NTP on both nodes", self.spec.node_name,
                            info.name, offset_ms / 1000, self.spec.max_clock_skew_s)
            info.skew_warning = True
        elif info.skew_warning and abs(offset_ms) < 0.9 * limit_ms:  # hysteresis: no flapping
            info.skew_warning = False
            log.info("failover_peer_clock_skew_cleared node=%s peer=%s offset_s=%+.3f",
                     self.spec.node_name, info.name, offset_ms / 1000)

    def _stale_clock(self, hb: Heartbeat, wall_ms: int) -> None:
        """Remember the offset of an authenticated sender rejected for its clock."""
        offset_ms = hb.timestamp_ms - wall_ms
        if abs(offset_ms) <= self._guard.window_ms:
            return  # stale for another reason (an older boot), not the clock
        self._rejected_clocks.pop(hb.name, None)
        self._rejected_clocks[hb.name] = (offset_ms / 1000, self._now())
        while len(self._rejected_clocks) > _MAX_REJECTED_CLOCKS:
            self._rejected_clocks.pop(next(iter(self._rejected_clocks)))

    def _unknown_source(self, source: Address) -> None:
        reason = RejectReason.UNKNOWN_SOURCE
        rejected = self.counters.rejected
        rejected[reason] = rejected.get(reason, 0) + 1
        last = self._reject_logged.get(reason)
        if last is None or self._now() - last >= 10.0:
            self._rejected(HeartbeatRejected(reason, "not in failover.peers"), source, count=False)

    def _rejected(self, exc: HeartbeatRejected, source: Address, *, count: bool = True) -> None:
        reason = exc.reason
        if count:
            self.counters.rejected[reason] = self.counters.rejected.get(reason, 0) + 1
        now = self._now()
        last = self._reject_logged.get(reason)
        if last is None or now - last >= 10.0:  # a flood must not flood the log
            self._reject_logged[reason] = now
            log.warning("failover_heartbeat_rejected node=%s source=%s reason=%s detail=%s "
                        "total=%d", self.spec.node_name, source[0], reason, exc.detail,
                        self.counters.rejected[reason])

    def _lag_stats(self) -> SendLag:
        lags = sorted(self._lags)
        if not lags:
            return SendLag(0, 0.0, 0.0, 0.0)
        n = len(lags)
        return SendLag(n, lags[n // 2], lags[min(n - 1, math.ceil(n * 0.99) - 1)], lags[-1])
