"""Failover: heartbeat codec, role machine, UDP transport, VIP adapter.

Imports nothing from lb or healthcheck. The names below are the public API (lb.daemon wires
them); everything else is internal.
"""

from failover.codec import (
    Heartbeat,
    HeartbeatFlags,
    HeartbeatRejected,
    KeyFileError,
    RejectReason,
    ReplayGuard,
    decode,
    encode,
    generate_key,
    load_key,
    write_key_file,
)
from failover.controller import (
    FailoverConfigError,
    FailoverController,
    FailoverCounters,
    FailoverSpec,
    FailoverStatus,
    PathStatus,
    PeerStatus,
    SendLag,
)
from failover.hooks import HookResult, HookRunner
from failover.machine import (
    HEALTH_FAULT,
    IllegalEvent,
    IllegalTransition,
    MachineError,
    Role,
    master_down_s,
    skew_s,
)
from failover.ports import Address, FailoverError, HeartbeatTransport, VipPort
from failover.transport import TransportError, UdpTransport, parse_peer

__all__ = [
    "HEALTH_FAULT",
    "Address",
    "FailoverConfigError",
    "FailoverController",
    "FailoverCounters",
    "FailoverError",
    "FailoverSpec",
    "FailoverStatus",
    "Heartbeat",
    "HeartbeatFlags",
    "HeartbeatRejected",
    "HeartbeatTransport",
    "HookResult",
    "HookRunner",
    "IllegalEvent",
    "IllegalTransition",
    "KeyFileError",
    "MachineError",
    "PathStatus",
    "PeerStatus",
    "RejectReason",
    "ReplayGuard",
    "Role",
    "SendLag",
    "TransportError",
    "UdpTransport",
    "VipPort",
    "decode",
    "encode",
    "generate_key",
    "load_key",
    "master_down_s",
    "parse_peer",
    "skew_s",
    "write_key_file",
]
