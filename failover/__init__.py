"""Failover: heartbeat codec, role machine, UDP transport, VIP adapter, partition guard.

Imports nothing from lb or healthcheck. The names below are the public API (lb.control.daemon wires
them); everything else is internal. `VipAdapter`, `VipError`, `Handover` and `HandoverError` load
their adapters (and so pyroute2) only when first used, so the control process, the proxy
workers, `pairlb keygen` and pure tests never import netlink code (~80 ms a process start).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from failover.adapters.hooks import HookCounters, HookResult, HookRunner
from failover.adapters.track import (
    GATEWAY_FAULT,
    GatewayStatus,
    GatewayTracker,
    TargetStatus,
    TrackError,
    parse_target,
)
from failover.adapters.transport import TransportError, UdpTransport, parse_peer
from failover.controller import (
    CLOCK_SKEW_MAX_S,
    CLOCK_SKEW_MIN_S,
    INTERVAL_MAX_S,
    INTERVAL_MIN_S,
    LIVE_FIELDS,
    SEND_LAG_SAMPLES,
    TRACK_COUNT_MAX,
    TRACK_INTERVAL_MIN_S,
    TRACK_MAX_S,
    FailoverConfigError,
    FailoverController,
    FailoverCounters,
    FailoverSpec,
    FailoverStatus,
    KeyStatus,
    PathStatus,
    PeerClock,
    PeerStatus,
    SendLag,
)
from failover.core.codec import (
    DIGEST_LEN,
    NODE_NAME_MAX,
    NODE_NAME_PATTERN,
    Heartbeat,
    HeartbeatFlags,
    HeartbeatRejected,
    KeyFileError,
    RejectReason,
    ReplayGuard,
    SecretFileError,
    bound_interval,
    decode,
    decode_any,
    encode,
    generate_key,
    key_id,
    load_key,
    node_name_error,
    read_secret,
    write_key_file,
    write_secret,
)
from failover.core.machine import (
    DOWN_AFTER_MAX,
    DOWN_AFTER_MIN,
    HEALTH_FAULT,
    PRIORITY_MAX,
    PRIORITY_MIN,
    IllegalEvent,
    IllegalTransition,
    MachineError,
    Role,
    master_down_s,
    skew_s,
)
from failover.core.ports import Address, FailoverError, HandoverPort, HeartbeatTransport, VipPort

if TYPE_CHECKING:
    from failover.adapters.handover import Handover, HandoverError
    from failover.adapters.vip import VipAdapter, VipError


def __getattr__(name: str) -> Any:
    if name in ("VipAdapter", "VipError"):
        from failover.adapters import vip

        return getattr(vip, name)
    if name in ("Handover", "HandoverError"):
        from failover.adapters import handover

        return getattr(handover, name)
    raise AttributeError(f"module 'failover' has no attribute {name!r}")


__all__ = [
    "CLOCK_SKEW_MAX_S",
    "CLOCK_SKEW_MIN_S",
    "DIGEST_LEN",
    "DOWN_AFTER_MAX",
    "DOWN_AFTER_MIN",
    "GATEWAY_FAULT",
    "HEALTH_FAULT",
    "INTERVAL_MAX_S",
    "INTERVAL_MIN_S",
    "LIVE_FIELDS",
    "NODE_NAME_MAX",
    "NODE_NAME_PATTERN",
    "PRIORITY_MAX",
    "PRIORITY_MIN",
    "SEND_LAG_SAMPLES",
    "TRACK_COUNT_MAX",
    "TRACK_INTERVAL_MIN_S",
    "TRACK_MAX_S",
    "Address",
    "FailoverConfigError",
    "FailoverController",
    "FailoverCounters",
    "FailoverError",
    "FailoverSpec",
    "FailoverStatus",
    "GatewayStatus",
    "GatewayTracker",
    "Handover",
    "HandoverError",
    "HandoverPort",
    "Heartbeat",
    "HeartbeatFlags",
    "HeartbeatRejected",
    "HeartbeatTransport",
    "HookCounters",
    "HookResult",
    "HookRunner",
    "IllegalEvent",
    "IllegalTransition",
    "KeyFileError",
    "KeyStatus",
    "MachineError",
    "PathStatus",
    "PeerClock",
    "PeerStatus",
    "RejectReason",
    "ReplayGuard",
    "Role",
    "SecretFileError",
    "SendLag",
    "TargetStatus",
    "TrackError",
    "TransportError",
    "UdpTransport",
    "VipAdapter",
    "VipError",
    "VipPort",
    "bound_interval",
    "decode",
    "decode_any",
    "encode",
    "generate_key",
    "key_id",
    "load_key",
    "master_down_s",
    "node_name_error",
    "parse_peer",
    "parse_target",
    "read_secret",
    "skew_s",
    "write_key_file",
    "write_secret",
]
