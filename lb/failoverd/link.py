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
import enum
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

from failover import FailoverSpec, FailoverStatus

VERSION = 1
"""Bump on any change that an older peer would misread."""


class LinkError(ValueError):
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
    nice: int = 0
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


StopMode = Literal["graceful", "fast", "abort"]


@dataclass(frozen=True)
class Stop:
    """graceful: hand the VIP over first; fast: release without waiting for a successor;
    abort: stop at once and leave the VIP as it is (as kill -9 would)."""

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
    stale_vips_removed: tuple[str, ...] = ()


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


@dataclass(frozen=True)
class HeartbeatGaps:
    """Longest time between two heartbeats, over the last `samples` of each (seconds):
    sent (between our own rounds) and received (from one peer address)."""

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
_TYPES: dict[str, type[Any]] = {cls.TYPE: cls for cls in typing.get_args(Message)}


# -- encoding ---------------------------------------------------------------------------------


def encode(msg: Message) -> dict[str, Any]:
    """The JSON object of a message (for lb.channel.ChannelProtocol.send)."""
    body = _to_wire(msg)
    assert isinstance(body, dict)
    return {"t": msg.TYPE, "v": VERSION, **body}


def decode(frame: dict[str, Any]) -> Message:
    """The message of a frame; LinkError when it is not one of this VERSION."""
    kind, version = frame.get("t"), frame.get("v")
    if version != VERSION:
        raise LinkError(f"channel version {version!r}, expected {VERSION} (message {kind!r})")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise LinkError(f"unknown message type {kind!r}")
    body = {k: v for k, v in frame.items() if k not in ("t", "v")}
    try:
        msg: Message = _from_wire(cls, body)
    except (TypeError, ValueError, KeyError) as exc:
        raise LinkError(f"bad {kind!r} message: {exc}") from None
    return msg


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return _to_wire(value.value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (tuple, list)):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {str(k): _to_wire(v) for k, v in value.items()}
        return [[_to_wire(k), _to_wire(v)] for k, v in value.items()]
    return value


@functools.cache
def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_wire(tp: Any, data: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return data
    if origin in (Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _from_wire(arg, data)
            except (TypeError, ValueError, KeyError) as exc:
                errors.append(str(exc))
        raise ValueError(f"{data!r} fits none of {tp}: {'; '.join(errors)}")
    if origin is Literal:
        if data not in args:
            raise ValueError(f"{data!r} is not one of {args}")
        return data
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(data, dict):
            raise TypeError(f"{tp.__name__}: expected an object, got {type(data).__name__}")
        hints = _hints(tp)
        kwargs = {f.name: _from_wire(hints[f.name], data[f.name])
                  for f in dataclasses.fields(tp) if f.init and f.name in data}
        return tp(**kwargs)  # a missing field without a default raises TypeError
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if tp is bytes:
        if not isinstance(data, str):
            raise TypeError("bytes travel as hex strings")
        return bytes.fromhex(data)
    if tp is bool:
        if not isinstance(data, bool):
            raise TypeError(f"expected a bool, got {data!r}")
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise TypeError(f"expected an int, got {data!r}")
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise TypeError(f"expected a number, got {data!r}")
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise TypeError(f"expected a string, got {data!r}")
        return data
    if origin is tuple:
        if not isinstance(data, list):
            raise TypeError(f"expected a list, got {type(data).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_wire(args[0], x) for x in data)
        if len(args) != len(data):
            raise ValueError(f"expected {len(args)} items, got {len(data)}")
        return tuple(_from_wire(a, x) for a, x in zip(args, data, strict=True))
    if origin is list:
        if not isinstance(data, list):
            raise TypeError(f"expected a list, got {type(data).__name__}")
        return [_from_wire(args[0], x) for x in data]
    if origin is dict:
        key_t, val_t = args
        items = data.items() if isinstance(data, dict) else data
        return {_from_wire(key_t, k): _from_wire(val_t, v) for k, v in items}
    raise TypeError(f"no wire form for {tp!r}")


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
