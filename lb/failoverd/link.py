"""The control <-> failover process channel: typed, versioned messages (lb.channel framing).

The failover controller runs in a process of its own (lb.failoverd.main), a child of the
control process (lb.control.failover_process supervises it). They talk over a socketpair with
lb.channel's length-prefixed JSON frames; every frame is one of the dataclasses below,
``{"t": TYPE, "v": VERSION, <fields>}``. Both sides encode and decode with `encode` and
`decode` here and nowhere else: the fields are written once, as dataclass fields, and the
JSON is derived from their type hints (including failover's own `FailoverSpec` and
`FailoverStatus`, so a field added there travels without a change here).

control -> failover: `Spec` (at start and after each reload), `LocalHealth` (on change and
every second: it is also the control process's keepalive), `Switchover`,
`CancelSwitchover`, `Stop`, `CloseHandover`.
failover -> control: `Hello`, `Started` / `StartFailed`, `RoleChanged`, `Status` (every
0.2 s and at once after a change), `Event` (for the recent-events list), `Stopped`.

A frame of another `VERSION` is refused (`LinkError`): both processes run the code on disk,
and a restarted failover process after an upgrade must not guess at an older control process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

from failover import FailoverSpec, FailoverStatus
from lb import channel
from lb.log import LogCounts

VERSION = 1
"""Bump on any change that an older peer would misread."""
STALL_S = 0.5
"""A periodic tick this much later than planned means the process was stopped or starved
(both ends watch their own loop with it)."""


class LinkError(channel.ChannelError):
    """A frame that is not a valid message of this VERSION."""


# -- control -> failover ----------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """Everything the failover process needs to run the controller."""

    TYPE: ClassVar[str] = "spec"
    generation: int
    failover: FailoverSpec
    garp_count: int = 5
    garp_interval_s: float = 0.01
    garp_repeat_after_s: float = 5.0
    handover_ports: tuple[int, ...] = ()
    track_interfaces: tuple[str, ...] = ()
    control_timeout_s: float = 10.0
    """No message from the control process for this long: fault "control" (VIP released)."""
    status_interval_s: float = 0.2
    sched_priority: int = 0
    """1..99: SCHED_RR at this priority; 0: normal scheduling."""
    nice: int = -10
    """Niceness under normal scheduling (the shipped unit allows -10: LimitNICE=)."""
    oom_score_adj: int = 0
    """Lowered to this when permitted (lb.sysutil.lower_oom_score_adj)."""
    log_level: str = "info"
    journald: str = "auto"

    def restart_only_changes(self, other: Spec) -> list[str]:
        """The fields besides `failover` and the log level in which `other` differs: those
        only a restart applies."""
        return [f.name for f in dataclasses.fields(self)
                if f.name not in ("generation", "failover", "log_level")
                and getattr(self, f.name) != getattr(other, f.name)]


@dataclass(frozen=True)
class LocalHealth:
    """This node's own checks: may it serve? Also the control process's keepalive."""

    TYPE: ClassVar[str] = "health"
    healthy: bool
    healthy_count: int
    total: int


@dataclass(frozen=True)
class Switchover:
    TYPE: ClassVar[str] = "switchover"


@dataclass(frozen=True)
class CancelSwitchover:
    TYPE: ClassVar[str] = "switchover_cancel"


StopMode = Literal["graceful", "fast"]


@dataclass(frozen=True)
class Stop:
    """graceful: hand the VIP over first; fast: release without waiting for a successor."""

    TYPE: ClassVar[str] = "stop"
    mode: StopMode = "graceful"


@dataclass(frozen=True)
class CloseHandover:
    """The workers have drained: remove the handover's netfilter state, then exit."""

    TYPE: ClassVar[str] = "close_handover"


# -- failover -> control ----------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    TYPE: ClassVar[str] = "hello"
    pid: int


@dataclass(frozen=True)
class Started:
    TYPE: ClassVar[str] = "started"


@dataclass(frozen=True)
class StartFailed:
    TYPE: ClassVar[str] = "start_failed"
    error: str


@dataclass(frozen=True)
class RoleChanged:
    TYPE: ClassVar[str] = "role"
    old: str
    new: str
    reason: str = ""


GAP_SAMPLES = 4096
"""How many gaps between heartbeats the failover process keeps, sent and received."""


@dataclass(frozen=True)
class HeartbeatGaps:
    """Longest time between two heartbeats, over the last `samples` sent gaps and as many
    received ones at most (seconds): sent (between our own rounds) and received (from one
    peer address)."""

    samples: int = 0
    sent_max_s: float = 0.0
    received_max_s: float = 0.0


@dataclass(frozen=True)
class Status:
    TYPE: ClassVar[str] = "status"
    status: FailoverStatus
    gaps: HeartbeatGaps = field(default_factory=HeartbeatGaps)
    control_silent_s: float = 0.0
    """How long the control process had been silent when this was sent."""
    log: LogCounts = field(default_factory=LogCounts)
    """The failover process's own log lines, written and dropped."""


@dataclass(frozen=True)
class Event:
    """A line for /status "events" (the daemon's recent-events list)."""

    TYPE: ClassVar[str] = "event"
    kind: str
    text: str


@dataclass(frozen=True)
class Stopped:
    TYPE: ClassVar[str] = "stopped"


Message = Union[  # noqa: UP007 (a runtime alias: typing.get_args needs the Union)
    Spec, LocalHealth, Switchover, CancelSwitchover, Stop, CloseHandover,
    Hello, Started, StartFailed, RoleChanged, Status, Event, Stopped,
]


# -- encoding ---------------------------------------------------------------------------------

_CODEC = channel.Codec(VERSION, Message, LinkError)


def encode(msg: Message) -> dict[str, Any]:
    """The JSON object of a message (for lb.channel.ChannelProtocol.send)."""
    return _CODEC.encode(msg)


def decode(frame: dict[str, Any]) -> Message:
    """The message of a frame; LinkError when it is not one of this VERSION."""
    msg: Message = _CODEC.decode(frame)
    return msg


def placeholder_status(spec: FailoverSpec) -> FailoverStatus:
    """What the control process shows before the failover process reported (role INIT)."""
    import failover

    return FailoverStatus(
        node=spec.node_name, role=failover.Role.INIT, role_reason="starting", role_since=0.0,
        role_age_s=0.0, priority=spec.priority, healthy=False, healthy_count=0,
        total_count=0, faults=(), vip_holding=False, switchover_pending=False,
        preempt_suppressed=False,
        master_down_s=failover.master_down_s(spec.priority, spec.interval_s, spec.down_after),
        peers=(), counters=failover.FailoverCounters(), send_lag=failover.SendLag(0, 0, 0, 0),
    )
