"""Failover: heartbeat codec, role machine, UDP transport, VIP adapter.

Imports nothing from lb or healthcheck. The names below are the public API (lb.daemon wires
them); everything else is internal. `VipAdapter` and `VipError` load failover.vip (and so
pyroute2) only when first used, so `pairlb keygen` and pure tests never import netlink code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from failover.codec import (
    DIGEST_LEN,
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
from failover.handover import Handover, HandoverError
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
from failover.ports import Address, FailoverError, HandoverPort, HeartbeatTransport, VipPort
from failover.transport import TransportError, UdpTransport, parse_peer

if TYPE_CHECKING:
    from failover.vip import VipAdapter, VipError


def __getattr__(name: str) -> Any:
    if name in ("VipAdapter", "VipError"):
        from failover import vip

        return getattr(vip, name)
    raise AttributeError(f"module 'failover' has no attribute {name!r}")


__all__ = [
    "DIGEST_LEN",
    "HEALTH_FAULT",
    "Address",
    "FailoverConfigError",
    "FailoverController",
    "FailoverCounters",
    "FailoverError",
    "FailoverSpec",
    "FailoverStatus",
    "Handover",
    "HandoverError",
    "HandoverPort",
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
    "VipAdapter",
    "VipError",
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
