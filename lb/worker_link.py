"""The control <-> worker channel: typed, versioned messages (lb.channel framing and Codec).

The control process (lb.control.supervisor, lb.control.daemon) and each proxy worker
(lb.data.worker) encode and decode with `encode` and `decode` here and nowhere else; every
frame is one of the dataclasses below, ``{"t": TYPE, "v": VERSION, <fields>}``.

control -> worker: `Config` (generation, the validated config as JSON, listener fds),
`Snap` (versioned pool snapshot: per backend eligible + weight, and the pool's panic flag),
`PoolEdit` (backends added to or removed from one pool at runtime), `HashTable` (a
maglev pool's lookup table), `Ping`, `CloseIdle` (after losing the VIP), `ReopenLogs`
(after logrotate), `Help` (accept on other slots' sockets too), `Stop` (drain with a
deadline).
worker -> control: `Hello`, `Ready`, `Pong`, `Paused` (a listener paused at max_connections
or resumed), `SnapApplied` (the rotation it now routes by), `Stats` (counter deltas and
in-flight per backend), `Eject` (a passive ejection the worker applied locally),
`ConfigApplied` / `ConfigFailed`, `Stopped`.

`Snap` (every backend of every pool, pushed on each health change), `Stats` (every busy
backend, every 0.25 s from every worker) and `Config` (the whole config) carry thousands of
entries at scale, so they have a bulk `to_wire` / `from_wire` instead of the per-field
walk.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from lb import channel

VERSION = 6
"""Bump on any change that an older peer would misread."""


class WorkerLinkError(channel.ChannelError):
    """A frame that is not a valid worker-channel message of this VERSION."""


# -- control -> worker ------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    TYPE: ClassVar[str] = "config"
    gen: int
    config: dict[str, Any]
    """``Config.wire()``: the worker validates it again, into the same config."""
    fds: dict[str, tuple[int, ...]]
    """Listener name -> the inherited listening sockets' fd numbers: one per worker slot
    (``reuseport``; slot ``i`` accepts on element ``i``), or the one every worker shares."""
    tls: dict[str, Any] = field(default_factory=dict)
    """TLS listener name -> ``{"certs": [CertBundle.to_wire()], "ticket_key": hex or
    None}``: the control process read the key files, the workers cannot."""

    def to_wire(self) -> dict[str, Any]:
        return {"gen": self.gen, "config": self.config,
                "fds": {n: list(f) for n, f in self.fds.items()},
                "tls": self.tls}  # JSON already


@dataclass(frozen=True)
class PoolSnap:
    panic: bool
    entries: dict[str, tuple[bool, float]]
    """Backend -> (eligible, weight)."""


@dataclass(frozen=True)
class Snap:
    """Which backends are in rotation. ``base`` 0: the whole rotation of every pool. Else a
    change on top of snapshot ``base``: only the entries that changed (every pool's panic
    flag), so a pool of thousands that changes one backend at a time sends ~100 bytes, not
    the whole pool, and the worker adjusts its rotation in O(log N) (lb.data.pool)."""

    TYPE: ClassVar[str] = "snap"
    ver: int
    pools: dict[str, PoolSnap] = field(default_factory=dict)
    base: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {
            "ver": self.ver,
            "base": self.base,
            "pools": {
                name: {"panic": p.panic, "e": {b: [e, w] for b, (e, w) in p.entries.items()}}
                for name, p in self.pools.items()
            },
        }

    @classmethod
    def from_wire(cls, data: Any) -> Snap:
        if not isinstance(data, dict) or not isinstance(data.get("ver"), int):
            raise TypeError("snap: expected {ver: int, pools: {...}}")
        pools: dict[str, PoolSnap] = {}
        for name, p in data.get("pools", {}).items():
            entries = {
                str(b): (bool(e[0]), float(e[1])) for b, e in p["e"].items()
            }
            pools[str(name)] = PoolSnap(bool(p.get("panic", False)), entries)
        return cls(data["ver"], pools, int(data.get("base", 0)))

    def merged(self, delta: Snap) -> Snap:
        """This whole snapshot with ``delta``'s changes: the whole one it makes."""
        pools = dict(self.pools)
        for name, p in delta.pools.items():
            prev = pools.get(name)
            entries = dict(prev.entries) if prev is not None else {}
            entries.update(p.entries)
            pools[name] = PoolSnap(p.panic, entries)
        return Snap(delta.ver, pools)


@dataclass(frozen=True)
class PoolEdit:
    """Backends added to or removed from one pool at runtime (admin API, discovery, the
    peer): applied to the worker's pool in place, so no other backend loses its load, place
    or ejection. ``gen``: the config generation it applies on top of (FIFO after that
    ``Config``); a worker on another generation refuses it and gets a full config."""

    TYPE: ClassVar[str] = "pool_edit"
    gen: int
    pool: str
    add: tuple[tuple[str, str, int], ...] = ()
    """(name, address, weight) of each backend added (out of rotation until a snapshot)."""
    remove: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {"gen": self.gen, "pool": self.pool, "add": [list(a) for a in self.add],
                "remove": list(self.remove)}

    @classmethod
    def from_wire(cls, data: Any) -> PoolEdit:
        if not isinstance(data, dict) or not isinstance(data.get("gen"), int):
            raise TypeError("pool_edit: expected {gen: int, pool: str, add: [...], remove: [...]}")
        add = tuple((str(n), str(a), int(w)) for n, a, w in data.get("add", ()))
        return cls(data["gen"], str(data["pool"]), add,
                   tuple(str(n) for n in data.get("remove", ())))


@dataclass(frozen=True)
class HashTable:
    """A pool's Maglev lookup table (lb.control.hashing builds it, lb.maglev defines
    it): slot -> index into ``members``. Sent when the pool's members change and in a
    worker's welcome; a worker keeps its last table until the next one."""

    TYPE: ClassVar[str] = "hash_table"
    pool: str
    members: tuple[str, ...]
    size: int
    typecode: str
    """array typecode of ``table`` ("H" below 65,535 members, else "I"; native order:
    control process and workers share the machine)."""
    table: bytes
    digest: str

    def to_wire(self) -> dict[str, Any]:
        return {"pool": self.pool, "members": list(self.members), "size": self.size,
                "typecode": self.typecode, "table": base64.b64encode(self.table).decode(),
                "digest": self.digest}

    @classmethod
    def from_wire(cls, data: Any) -> HashTable:
        if not isinstance(data, dict) or data.get("typecode") not in ("H", "I"):
            raise TypeError("hash_table: expected {pool, members, size, typecode, table}")
        raw = base64.b64decode(data["table"], validate=True)
        size = int(data["size"])
        if len(raw) != size * (2 if data["typecode"] == "H" else 4):
            raise TypeError(f"hash_table: {len(raw)} bytes for size {size}")
        return cls(str(data["pool"]), tuple(str(m) for m in data["members"]), size,
                   str(data["typecode"]), raw, str(data.get("digest", "")))


@dataclass(frozen=True)
class Ping:
    TYPE: ClassVar[str] = "ping"


@dataclass(frozen=True)
class CloseIdle:
    """Close keep-alive connections after their current response (the VIP moved away)."""

    TYPE: ClassVar[str] = "close_idle"


@dataclass(frozen=True)
class ReopenLogs:
    """Reopen the access log file (SIGUSR2 to the control process or POST /logs/reopen,
    after logrotate)."""

    TYPE: ClassVar[str] = "reopen_logs"


@dataclass(frozen=True)
class Help:
    """Accept on these other slots' sockets too, until the next Help leaves them out
    (lb.control.acceptwatch: their worker is gone, starting, paused or not taking them)."""

    TYPE: ClassVar[str] = "help"
    slots: dict[str, tuple[int, ...]]
    """Listener -> the slots to help (every listener with none is left out)."""


@dataclass(frozen=True)
class Stop:
    TYPE: ClassVar[str] = "stop"
    timeout_s: float
    """Drain for at most this long, then close what is left."""


# -- worker -> control ------------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    TYPE: ClassVar[str] = "hello"
    pid: int
    index: int


@dataclass(frozen=True)
class Ready:
    TYPE: ClassVar[str] = "ready"
    pid: int
    listeners: tuple[str, ...]


@dataclass(frozen=True)
class Pong:
    TYPE: ClassVar[str] = "pong"


@dataclass(frozen=True)
class Paused:
    """The worker stopped (or began again) accepting on ``listener``'s own socket at
    ``max_connections``: the control process has the others take that slot's queue for as
    long as it lasts (lb.control.acceptwatch)."""

    TYPE: ClassVar[str] = "paused"
    listener: str
    paused: bool


@dataclass(frozen=True)
class SnapApplied:
    """The worker routes by snapshot ``ver`` now: the control process knows how far behind
    each worker's rotation is (``/status`` workers[].rotation_lag_s), so a worker that still
    sends to a backend the control process took out is seen, not guessed."""

    TYPE: ClassVar[str] = "snap_applied"
    ver: int
    at: float = 0.0
    """The worker's time.monotonic() when it applied it (one clock on one machine): the
    propagation time without the control loop's delay in reading this answer."""


@dataclass(frozen=True)
class Stats:
    TYPE: ClassVar[str] = "stats"
    d: dict[str, Any]
    """Counter deltas since the last Stats (lb.stats.Stats.take_delta)."""
    inflight: dict[str, int]
    """"pool/backend" -> requests in flight, only the non-zero ones."""

    # Sent every 0.25 s by every worker, one entry per busy backend: the counters are JSON
    # already, so no per-field walk (13 ms a message at 3000 busy backends).
    def to_wire(self) -> dict[str, Any]:
        return {"d": self.d, "inflight": self.inflight}

    @classmethod
    def from_wire(cls, data: Any) -> Stats:
        if not isinstance(data, dict):
            raise TypeError("stats: expected an object")
        d, inflight = data.get("d"), data.get("inflight")
        if not isinstance(d, dict) or not isinstance(inflight, dict):
            raise TypeError("stats: expected {d: {...}, inflight: {...}}")
        return cls(d, inflight)


@dataclass(frozen=True)
class Eject:
    TYPE: ClassVar[str] = "eject"
    pool: str
    backend: str
    reason: str


@dataclass(frozen=True)
class ConfigApplied:
    TYPE: ClassVar[str] = "config_applied"
    gen: int


@dataclass(frozen=True)
class ConfigFailed:
    TYPE: ClassVar[str] = "config_failed"
    gen: int
    error: str


@dataclass(frozen=True)
class Stopped:
    TYPE: ClassVar[str] = "stopped"
    pid: int


Message = Union[  # noqa: UP007 (a runtime alias: typing.get_args needs the Union)
    Config, Snap, PoolEdit, HashTable, Ping, CloseIdle, Stop, ReopenLogs, Help,
    Hello, Ready, Pong, Paused, SnapApplied, Stats, Eject, ConfigApplied, ConfigFailed, Stopped,
]

_CODEC = channel.Codec(VERSION, Message, WorkerLinkError)


def encode(msg: Message) -> dict[str, Any]:
    """The JSON object of a message (for lb.channel.ChannelProtocol.send)."""
    return _CODEC.encode(msg)


def decode(frame: dict[str, Any]) -> Message:
    """The message of a frame; WorkerLinkError when it is not one of this VERSION."""
    msg: Message = _CODEC.decode(frame)
    return msg
