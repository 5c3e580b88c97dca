"""The role machine: which node holds the VIP, decided from heartbeats, health and faults.

Pure: no asyncio, socket, time or logging. The controller feeds events with the time and
carries out the returned actions in order:

    state, actions = step(state, HeartbeatReceived(...), now)

Roles follow VRRPv3 (RFC 5798 section 6.3): INIT, BACKUP, MASTER, plus FAULT (keepalived's
name for "this node cannot serve"). `TRANSITIONS` is the whole table; a transition outside it
raises `IllegalTransition` and the caller's state is unchanged (states are frozen values).
The VIP follows the role exactly: AcquireVip is emitted on every entry to MASTER and
ReleaseVip on every exit, so no other role ever holds it.

Timers (RFC 5798 section 6.1, with down_after in place of the fixed 3):

    skew          = (256 - priority) / 256 * interval        Skew_Time
    master_down   = down_after * interval + skew              Master_Down_Interval

`interval` is the one the peer advertises (section 6.4.2: a Backup uses the Master's
Master_Adver_Interval), `priority` is our own, so better nodes notice a dead MASTER first.

Ranking. Nodes are compared by (not yielding, healthy, priority, address, name): a node with
healthy backends beats any node without (a node must not take the VIP before its own checks
pass, or clients get 503s), then priority, then the higher address (section 6.4.3), then the
name so that the order is total. "Yielding" means leaving (priority 0) or handing over.

Rules beyond VRRP, each from a failure measured on keepalived:

- Backups also send heartbeats, so every node knows every other. A BACKUP defers to a better
  live BACKUP: of several backups only the best takes a dead MASTER's VIP (no brief double
  MASTER), and an unhealthy node never takes over while a healthy one is alive. If no node
  has healthy backends, the best one still becomes MASTER so the VIP answers.
- A MASTER that hears a better MASTER yields at once (section 6.4.3), but never on a
  heartbeat the controller marks `delayed` (queued in the network far longer than usual).
  One that hears a worse MASTER re-announces the VIP at once and sends a heartbeat
  (section 6.4.3 sends an advert; the re-announce is ours: after a healed partition
  clients otherwise stay on the loser's MAC for ~53 s). The loser may hear us first and
  yield before its MASTER heartbeat reaches us, so a MASTER also re-announces when it
  hears a peer it had lost, or one that was MASTER, say BACKUP. The yield passes the
  holdoff: the last announcement clients hear must be the holder's, and the loser
  releases (ending its own bursts) before it says BACKUP.
- Every planned handover is make-before-break. Switchover: the MASTER sets the switchover
  flag; the best eligible BACKUP takes the VIP at once (acquire, announce, then its first
  MASTER heartbeat); the old MASTER releases only when it hears that heartbeat. Graceful
  stop is the same with priority 0: backups wait only Skew_Time (section 6.4.2), the leaving
  MASTER releases when it hears the new MASTER or after `leave_timeout_s`, or at once if no
  peer could take over. A MASTER without healthy backends hands over the same way to a
  healthy peer, then goes to FAULT. Clients see both holders for at most one network delay,
  never none.
- After a switchover the old MASTER does not preempt back (it would undo the operator's
  request); a switchover requested on the new MASTER moves the VIP back.
- FAULT: a reported fault (carrier loss, VIP failure) or "no healthy backends here while an
  eligible peer has some". A MASTER with a reported fault releases at once. When every fault
  has cleared the node joins as BACKUP and waits master_down like a fresh start.
- Preempt: a healthy BACKUP that outranks the MASTER takes over once that has held for
  `preempt_delay_s`; the old MASTER then hears a better MASTER and yields.
- Several addresses of one peer are one peer (heartbeats carry the name): it is dead only
  when nothing at all was heard from it for master_down.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType

from failover.core.ports import FailoverError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

HEALTH_FAULT = "no_healthy_backends"
"""The fault reason the machine derives itself from local and peer health."""


class Role(StrEnum):
    INIT = "init"
    BACKUP = "backup"
    MASTER = "master"
    FAULT = "fault"

    @property
    def label(self) -> str:
        """How operators see it (/status, logs, metrics, events): ``MASTER``. Only notify
        scripts get the lower-case value, a documented contract."""
        return self.value.upper()


TRANSITIONS: Mapping[Role, frozenset[Role]] = MappingProxyType({
    Role.INIT: frozenset({Role.BACKUP, Role.FAULT}),
    Role.BACKUP: frozenset({Role.MASTER, Role.FAULT, Role.INIT}),
    Role.MASTER: frozenset({Role.BACKUP, Role.FAULT, Role.INIT}),
    # Out of FAULT only through BACKUP: a node whose link just came back must first hear
    # its peers before it may hold the VIP.
    Role.FAULT: frozenset({Role.BACKUP, Role.INIT}),
})


class MachineError(FailoverError):
    """The caller broke the machine's rules; the state is unchanged."""


class IllegalTransition(MachineError):
    def __init__(self, old: Role, new: Role) -> None:
        super().__init__(f"illegal transition {old} -> {new}")
        self.old = old
        self.new = new


class IllegalEvent(MachineError):
    def __init__(self, event: object, role: Role) -> None:
        super().__init__(f"{type(event).__name__} is not accepted in role {role}")
        self.event = event
        self.role = role


PRIORITY_MIN = 1
PRIORITY_MAX = 254
"""A node's own priority: 1..254 (0 is a leaving node's, 255 VRRP's address owner, which a
pair of load balancers never has). Heartbeats on the wire may carry 0..255."""
DOWN_AFTER_MIN = 2
DOWN_AFTER_MAX = 100
"""Missed intervals before a peer is dead: 1 would fail over on one late heartbeat."""


def skew_s(priority: int, interval_s: float) -> float:
    """RFC 5798 section 6.1 Skew_Time: better nodes react sooner."""
    return (256 - priority) / 256 * interval_s


def master_down_s(priority: int, interval_s: float, down_after: int) -> float:
    """RFC 5798 section 6.1 Master_Down_Interval, with `down_after` instead of 3."""
    return down_after * interval_s + skew_s(priority, interval_s)


@dataclass(frozen=True)
class Params:
    """What a node is; fixed for the life of a machine."""

    name: str
    priority: int
    interval_s: float
    down_after: int = 3
    preempt: bool = True
    preempt_delay_s: float = 0.0
    address: IPAddress | None = None
    """Breaks priority ties (higher wins); peers learn it from our heartbeats."""
    leave_timeout_s: float = 1.0
    """A leaving MASTER releases after this even if no successor was heard."""
    reannounce_holdoff_s: float = 1.0
    """At most one re-announce per this long while worse MASTERs keep talking."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("name: must not be empty")
        if not PRIORITY_MIN <= self.priority <= PRIORITY_MAX:
            raise ValueError(
                f"priority: must be {PRIORITY_MIN}..{PRIORITY_MAX} (got {self.priority})")
        if not self.interval_s > 0:
            raise ValueError(f"interval_s: must be > 0 (got {self.interval_s})")
        if not DOWN_AFTER_MIN <= self.down_after <= DOWN_AFTER_MAX:
            raise ValueError(f"down_after: must be {DOWN_AFTER_MIN}..{DOWN_AFTER_MAX} "
                             f"(got {self.down_after})")
        for key in ("preempt_delay_s", "leave_timeout_s", "reannounce_holdoff_s"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0 (got {getattr(self, key)})")

    @property
    def master_down_s(self) -> float:
        return master_down_s(self.priority, self.interval_s, self.down_after)


@dataclass(frozen=True)
class PeerView:
    """The latest heartbeat from one peer, by name, whatever path it came on."""

    name: str
    role: Role
    priority: int
    healthy: bool
    interval_s: float
    last_heard: float
    address: IPAddress | None = None
    leaving: bool = False
    switchover: bool = False
    leaving_since: float | None = None

    @property
    def eligible(self) -> bool:
        """Could this peer hold the VIP?"""
        return self.role in (Role.BACKUP, Role.MASTER) and not self.leaving


@dataclass(frozen=True)
class Advert:
    """What this node says in its heartbeats."""

    role: Role
    priority: int
    healthy: bool
    leaving: bool = False
    switchover: bool = False


# -- events (what happened) ------------------------------------------------------------------


@dataclass(frozen=True)
class Started:
    pass


@dataclass(frozen=True)
class HeartbeatReceived:
    """An authenticated, fresh heartbeat (the controller drops the rest before the machine)."""

    peer: str
    role: Role
    priority: int
    healthy: bool
    interval_s: float
    address: IPAddress | None = None
    leaving: bool = False
    switchover: bool = False
    delayed: bool = False
    """It arrived much later than this peer's heartbeats usually do: what it says about the
    peer's role may be long out of date (see `_heard`)."""


@dataclass(frozen=True)
class TimerExpired:
    """A deadline from `next_deadline` passed (or any periodic wake-up: it is idempotent)."""


@dataclass(frozen=True)
class FaultDetected:
    reason: str


@dataclass(frozen=True)
class FaultCleared:
    reason: str


@dataclass(frozen=True)
class LocalHealthChanged:
    healthy: bool


@dataclass(frozen=True)
class ShutdownRequested:
    pass


@dataclass(frozen=True)
class SwitchoverRequested:
    pass


@dataclass(frozen=True)
class SwitchoverCancelled:
    pass


Event = (Started | HeartbeatReceived | TimerExpired | FaultDetected | FaultCleared
         | LocalHealthChanged | ShutdownRequested | SwitchoverRequested | SwitchoverCancelled)

EVENT_ROLES: Mapping[type, frozenset[Role]] = MappingProxyType({
    Started: frozenset({Role.INIT}),
    SwitchoverRequested: frozenset({Role.MASTER}),
})
"""Events accepted only in some roles; every other event is accepted in every role."""


# -- actions (what to do, in order) ------------------------------------------------------------


@dataclass(frozen=True)
class AcquireVip:
    pass


@dataclass(frozen=True)
class ReleaseVip:
    pass


@dataclass(frozen=True)
class AnnounceVip:
    pass


@dataclass(frozen=True)
class SendHeartbeat:
    """Advertise this from now on, and send one heartbeat now."""

    advert: Advert


@dataclass(frozen=True)
class RunHooks:
    old: Role
    new: Role
    reason: str


Action = AcquireVip | ReleaseVip | AnnounceVip | SendHeartbeat | RunHooks

# The VIP moves before anyone is told: the first MASTER heartbeat must follow the acquire
# (the old holder releases on it), and a release must precede the BACKUP heartbeat.
_ACTION_ORDER: Mapping[type, int] = MappingProxyType({
    ReleaseVip: 0, AcquireVip: 0, AnnounceVip: 1, SendHeartbeat: 2, RunHooks: 3,
})


# -- state ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineState:
    params: Params
    role: Role = Role.INIT
    since: float = 0.0
    reason: str = "not started"
    healthy: bool = False
    faults: frozenset[str] = frozenset()
    """Reported faults (carrier, VIP); the health fault is derived, see `faults_of`."""
    peers: Mapping[str, PeerView] = field(default_factory=lambda: MappingProxyType({}))
    switchover: bool = False
    """The operator asked this MASTER to hand over."""
    leaving: bool = False
    leave_deadline: float | None = None
    preempt_since: float | None = None
    preempt_suppressed: bool = False
    reannounced_at: float | None = None
    advertised: Advert | None = None


def initial_state(params: Params) -> MachineState:
    return MachineState(params=params)


# -- queries (pure) ---------------------------------------------------------------------------


def _addr_key(address: IPAddress | None) -> int:
    if address is None:
        return -1
    if isinstance(address, ipaddress.IPv4Address):
        return int(address) | 0xFFFF_0000_0000  # as its v4-mapped IPv6 address
    return int(address)


Rank = tuple[bool, bool, int, int, str]


def peer_rank(p: PeerView) -> Rank:
    return (not (p.leaving or p.switchover), p.healthy, p.priority, _addr_key(p.address), p.name)


def self_rank(s: MachineState) -> Rank:
    p = s.params
    return (not s.leaving, s.healthy, p.priority, _addr_key(p.address), p.name)


def _down_s(s: MachineState, peer: PeerView) -> float:
    return master_down_s(s.params.priority, peer.interval_s, s.params.down_after)


def expires_at(s: MachineState, peer: PeerView) -> float:
    """When the peer counts as dead if nothing more is heard from it."""
    return peer.last_heard + _down_s(s, peer)


def alive(s: MachineState, peer: PeerView, now: float) -> bool:
    return now < expires_at(s, peer)


def live_peers(s: MachineState, now: float) -> list[PeerView]:
    return [p for p in s.peers.values() if alive(s, p, now)]


def faults_of(s: MachineState, now: float) -> frozenset[str]:
    """Reported faults plus the derived one: no healthy backends here, some at a peer."""
    if not s.healthy and any(p.healthy and p.eligible for p in live_peers(s, now)):
        return s.faults | {HEALTH_FAULT}
    return s.faults


def advert_of(s: MachineState, now: float) -> Advert:
    handoff = s.role is Role.MASTER and HEALTH_FAULT in faults_of(s, now)
    return Advert(
        role=s.role,
        priority=0 if s.leaving else s.params.priority,
        healthy=s.healthy,
        leaving=s.leaving,
        switchover=s.role is Role.MASTER and (s.switchover or handoff),
    )


def next_deadline(s: MachineState, now: float) -> float | None:
    """The earliest future time at which `TimerExpired` could change something."""
    if s.role is Role.INIT:
        return None
    p = s.params
    times: list[float] = []
    for peer in s.peers.values():
        times.append(expires_at(s, peer))
        if peer.leaving_since is not None:
            times.append(peer.leaving_since + skew_s(p.priority, peer.interval_s))
    if s.role is Role.BACKUP:
        times.append(s.since + p.master_down_s)
    if s.preempt_since is not None:
        times.append(s.preempt_since + p.preempt_delay_s)
    if s.leave_deadline is not None:
        times.append(s.leave_deadline)
    future = [t for t in times if t > now]
    return min(future) if future else None


# -- the step -----------------------------------------------------------------------------------


class _Step:
    """Accumulates one step's new state and actions; thrown away if anything raises."""

    def __init__(self, state: MachineState) -> None:
        self.s = state
        self.actions: list[Action] = []
        self.force_send = False

    def goto(self, new: Role, now: float, reason: str) -> None:
        old = self.s.role
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(old, new)
        if old is Role.MASTER:
            self.actions.append(ReleaseVip())
        if new is Role.MASTER:
            self.actions.append(AcquireVip())
        self.s = replace(
            self.s, role=new, since=now, reason=reason, preempt_since=None, reannounced_at=None,
            switchover=False,
            preempt_suppressed=False if new is Role.MASTER else self.s.preempt_suppressed,
            leave_deadline=None if new is not Role.MASTER else self.s.leave_deadline,
        )
        self.actions.append(RunHooks(old, new, reason))


def step(state: MachineState, event: Event, now: float) -> tuple[MachineState, list[Action]]:
    """Apply one event at monotonic time `now`; return the new state and actions, in order."""
    allowed = EVENT_ROLES.get(type(event))
    if allowed is not None and state.role not in allowed:
        raise IllegalEvent(event, state.role)
    st = _Step(state)
    _apply(st, event, now)
    _evaluate(st, now)
    advert = advert_of(st.s, now)
    if (st.force_send or advert != state.advertised) and (
            advert.role is not Role.INIT or advert.leaving):
        st.actions.append(SendHeartbeat(advert))
    st.s = replace(st.s, advertised=advert)
    actions = sorted(st.actions, key=lambda a: _ACTION_ORDER[type(a)])
    return st.s, actions


def _rest_role(s: MachineState, now: float) -> Role:
    return Role.FAULT if faults_of(s, now) else Role.BACKUP


def _apply(st: _Step, event: Event, now: float) -> None:
    s = st.s
    if isinstance(event, Started):
        st.s = replace(s, leaving=False, leave_deadline=None, preempt_suppressed=False)
        # RFC 5798 section 6.4.1 sends an address owner (priority 255) straight to Master;
        # we never do: a node first listens for master_down, so a restart cannot split brain.
        st.goto(Role.FAULT if s.faults else Role.BACKUP, now, "started")
    elif isinstance(event, HeartbeatReceived):
        _heard(st, event, now)
    elif isinstance(event, FaultDetected):
        st.s = replace(s, faults=s.faults | {event.reason})
    elif isinstance(event, FaultCleared):
        st.s = replace(s, faults=s.faults - {event.reason})
    elif isinstance(event, LocalHealthChanged):
        st.s = replace(s, healthy=event.healthy)
    elif isinstance(event, ShutdownRequested):
        if s.role is Role.MASTER:
            st.s = replace(s, leaving=True, leave_deadline=now + s.params.leave_timeout_s)
        elif s.role is not Role.INIT:
            st.s = replace(s, leaving=True)
            st.goto(Role.INIT, now, "stopped")
    elif isinstance(event, SwitchoverRequested):
        st.s = replace(s, switchover=True)
    elif isinstance(event, SwitchoverCancelled):
        st.s = replace(s, switchover=False)
    # TimerExpired: nothing to record; _evaluate looks at the clock.


def _heard(st: _Step, e: HeartbeatReceived, now: float) -> None:
    s = st.s
    if e.peer == s.params.name:
        return  # our own heartbeat looped back; the controller drops these too
    prev = s.peers.get(e.peer)
    leaving = e.leaving or e.priority == 0  # RFC 5798: priority 0 means "I am leaving"
    leaving_since: float | None = None
    if leaving:
        kept = prev is not None and prev.leaving and prev.leaving_since is not None
        leaving_since = prev.leaving_since if kept and prev is not None else now
    view = PeerView(
        name=e.peer, role=e.role, priority=e.priority, healthy=e.healthy,
        interval_s=e.interval_s, last_heard=now, address=e.address, leaving=leaving,
        switchover=e.switchover and e.role is Role.MASTER, leaving_since=leaving_since,
    )
    st.s = s = replace(s, peers=MappingProxyType({**s.peers, e.peer: view}))
    if s.role is not Role.MASTER:
        return
    if view.role is not Role.MASTER:
        # A peer we had lost (healed partition) or that just stopped being MASTER may have
        # held the VIP; its heartbeat saying MASTER may never reach us (it can yield to ours
        # first), so re-announce now: clients must not stay on its MAC. A yield (MASTER ->
        # not) passes the holdoff: the announcement after the peer's last one must be ours,
        # or clients stay on a node that no longer holds the VIP (seen in a link-cut chaos
        # run: the loser announced 16 ms before it yielded, our answer fell in the holdoff).
        # It releases before it says BACKUP, so nothing of its can follow ours. Delayed
        # heartbeats count too: skipping them could lose the edge for good (the view below
        # already holds the role they carried).
        was_master = prev is not None and prev.role is Role.MASTER
        if prev is None or was_master or not alive(s, prev, now):
            st.force_send = True
            _reannounce(st, now, edge=was_master)
        return
    handing_over = s.switchover and not view.leaving
    if e.delayed and not (s.leaving or handing_over):
        # A link that comes back flushes the heartbeats the kernel queued while it was down
        # (ARP resolution holds them), the oldest saying MASTER from before the peer noticed
        # the cut. Yielding to one would leave the VIP unheld; the fresh ones follow at once.
        return
    if s.leaving or handing_over or peer_rank(view) > self_rank(s):
        # RFC 5798 section 6.4.3: a better Master's advert sends us to Backup. Ours first
        # released nothing until now, so the VIP was never without a holder.
        st.s = replace(s, preempt_suppressed=s.preempt_suppressed or handing_over)
        target = Role.INIT if s.leaving else _rest_role(st.s, now)
        st.goto(target, now, f"yielded to {e.peer}")
        return
    # A worse MASTER: section 6.4.3 answers with an advert at once; we also re-announce
    # the VIP, because clients may be on the other node's MAC (healed partition).
    st.force_send = True
    _reannounce(st, now)


def _reannounce(st: _Step, now: float, *, edge: bool = False) -> None:
    """GARP/NA again, at most once per holdoff while peers keep prompting it (a worse
    MASTER talking, a lossy peer lost and back again); an `edge` (a peer that stopped
    being MASTER: one per yield) always announces."""
    s = st.s
    if edge or s.reannounced_at is None or now >= s.reannounced_at + s.params.reannounce_holdoff_s:
        st.actions.append(AnnounceVip())
        st.s = replace(s, reannounced_at=now)


def _evaluate(st: _Step, now: float) -> None:
    """At most one transition that the clock, faults or health call for."""
    s = st.s
    if s.role is Role.INIT:
        return
    if s.role is Role.MASTER:
        if s.faults:
            st.goto(Role.FAULT, now, "fault: " + ", ".join(sorted(s.faults)))
        elif s.leaving and (
                s.leave_deadline is None or now >= s.leave_deadline or not _successors(s, now)):
            st.goto(Role.INIT, now, "stopped")
        return
    faults = faults_of(s, now)
    if s.role is Role.FAULT:
        if not faults:
            st.goto(Role.BACKUP, now, "fault cleared")
        return
    if faults:  # BACKUP
        st.goto(Role.FAULT, now, "fault: " + ", ".join(sorted(faults)))
        return
    take, preempt_since, reason = _should_take(s, now)
    if take:
        st.goto(Role.MASTER, now, reason)
    elif preempt_since != s.preempt_since:
        st.s = replace(s, preempt_since=preempt_since)


def _successors(s: MachineState, now: float) -> list[PeerView]:
    return [p for p in live_peers(s, now) if p.eligible]


def _should_take(s: MachineState, now: float) -> tuple[bool, float | None, str]:
    """May this BACKUP become MASTER now? Also returns the preempt clock to keep."""
    p = s.params
    live = live_peers(s, now)
    me = self_rank(s)
    if any(v.role is Role.BACKUP and not v.leaving and peer_rank(v) > me for v in live):
        return False, None, ""  # a better backup is alive: it takes, we do not race it
    masters = [v for v in live if v.role is Role.MASTER and not v.leaving]
    if not masters:
        ready = s.since + p.master_down_s  # RFC 5798 section 6.4.2 Master_Down_Timer
        leaving = [v for v in live if v.role is Role.MASTER and v.leaving]
        for v in leaving:
            if v.leaving_since is not None:
                # Section 6.4.2: priority 0 sets the Master_Down_Timer to Skew_Time.
                ready = max(ready, v.leaving_since + skew_s(p.priority, v.interval_s))
        if now < ready:
            return False, None, ""
        if leaving:
            return True, None, f"{leaving[0].name} left"
        return True, None, "no master"
    m = max(masters, key=peer_rank)
    if m.switchover and (s.healthy or not m.healthy):
        return True, None, f"switchover from {m.name}"
    if p.preempt and not s.preempt_suppressed and s.healthy and me > peer_rank(m):
        since = s.preempt_since if s.preempt_since is not None else now
        if now >= since + p.preempt_delay_s:
            return True, None, f"preempted {m.name}"
        return False, since, ""
    return False, None, ""
