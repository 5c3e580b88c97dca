"""The node-to-node sync channel: runtime pool changes (ops), their acks, whole-state
anti-entropy and an optional whole-config offer, between the nodes of a pair (issue 16).

Runs in the control process, on its asyncio loop (docs/elastic-research/sync.md, option C):
a TCP listener plus one dialer per peer address, frames authenticated with a key derived
from the failover key. Ops and state are opaque JSON objects here: what they mean (the
overlay, its LWW merge, the validation that refuses an op) is the handler's business
(`SyncHandler`, implemented by the daemon).

Keys
----
``k_sync = HMAC-SHA256(failover_key, b"pairlb sync v1")`` for every key of the rotation
(domain separation: a sync MAC is never a heartbeat MAC, and the raw failover key never
verifies anything here). ``key_id`` names one in status: 8 hex digits of SHA-256(k_sync).

Handshake (the dialer speaks first; the listener says nothing to a stranger)
----------------------------------------------------------------------------
1. Source filter: an accepted connection whose source address is not one of the peers'
   addresses is closed before a byte is read (``unknown_source``); so is one beyond
   ``MAX_PENDING_HANDSHAKES`` unauthenticated connections (``busy``).
2. Dialer -> listener: HELLO, MAC'd with *every* key of the dialer's rotation (first = the
   one it prefers). The listener accepts the first of those MACs that one of its own keys
   verifies: that key, ``k``, is the session's. So a node that already signs with a new
   key (``[k2, k1]``) still reaches a peer that only has the old one (``[k1]``), in both
   directions, and the two agree on ``k`` without trying anything.
3. Listener -> dialer: HELLO MAC'd with ``k`` alone, then its first frame (a ping).
4. Dialer: verifies it (any of its keys), then sends its first frame (a ping).
5. Session key ``k_s = HMAC(k, "pairlb sync session\\0" || nonce_dialer || nonce_listener
   || len || node_dialer || len || node_listener)``. Each side counts the session as
   established only once a frame from the other verified under ``k_s`` (key confirmation):
   a replayed HELLO (recorded earlier, or reflected) is answered with a fresh nonce, so its
   frames fail (``bad_mac``) and it never displaces or even touches a live session.
   From accept/connect to established: at most ``HANDSHAKE_TIMEOUT_S`` (``handshake_timeout``).

HELLO on the wire (all integers big endian)::

    magic "PLBS" (4) | version (1) = 1 | n (1) = number of MACs, 1..8 | len (2) <= 4096
    | JSON body (len) | n x HMAC-SHA256(k_sync_i, "pairlb sync hello\\0" || first 8 bytes
    || body)

    body: {"t": "hello", "v": 1, "node": "lb-a", "role": "dial" | "accept",
           "nonce": 32 hex (16 random bytes), "epoch": 16 hex (random per process),
           "config_digest": "...", "overlay_digest": "...", "keys": [key_id per MAC]}

A HELLO whose node is our own name is ``looped`` (a reflection, or a peer list naming this
node); one whose role is not the other side's is ``malformed``.

Frames (after the handshake; ``direction`` is 1 for frames the dialer sends, 2 for the
listener's, so a frame reflected back to its sender never verifies)::

    len (4) <= max_frame | counter (8) | JSON body (len) | HMAC-SHA256(k_s, direction (1)
    || counter (8) || body)

The counter starts at 0 in each direction and grows by one per frame. It travels in the
clear (the MAC covers it) so that a repeated or reordered frame is named as such
(``replayed`` / ``reordered``) before its MAC is computed; an oversize length is refused as
soon as the 12-byte header arrives (``oversize``), before its body is read. Any bad frame
(``bad_mac``, ``malformed`` JSON or message, ``bad_version``, ``truncated`` by EOF) closes
the connection and is counted by reason in ``SyncChannel.rejected``; nothing raises out and
the loop never stops (the decoding functions raise `SyncRejected` and nothing else).

Bodies (``lb.channel.Codec``: ``{"t": TYPE, "v": 1, <fields>}``): `OpMsg`, `AckMsg`,
`StateMsg`, `PingMsg` / `PongMsg` (every ``ping_interval_s``; carries both digests; the pong
gives the RTT; a peer silent for ``SILENT_PINGS`` intervals is disconnected),
`ConfigOfferMsg` / `ConfigResultMsg`.

Catch-up: right after a session is established each side compares the peer's HELLO
``overlay_digest`` with its own, and when they differ sends ``state`` (the handler's whole
state). Ops that were not acked are not kept here: that state exchange is the catch-up.

Duplicate sessions (both nodes dial each other; a node with several peer addresses):
at most one session per peer node is active. When a second one is established, both nodes
keep the same one, by a rule they evaluate alike:

1. different peer epochs (the peer restarted): the newer session;
2. otherwise the session dialled by the node whose name sorts first (lexicographically);
3. otherwise (same direction) the one whose ``nonce_dialer || nonce_listener`` is greater.

The other is closed (``disconnects["duplicate"]``). When the kept one is the older, it is
probed with a ping at once: if it was a leftover the peer had already dropped (partition,
restart without FIN) the peer's kernel answers with a reset, and the next dial wins. A
dialer does not dial an address whose node is connected (by any session).

An address's node is learned from the first session dialled there, or from an accepted
session whose source IP is that of exactly one address not yet named.

Reconnects: backoff from `BACKOFF_MIN_S` doubling to `BACKOFF_MAX_S`, jittered +-25 %.

Limits: frames are authenticated, not encrypted (as heartbeats: backend addresses travel
in the clear). Anyone who can send from a peer's address can hold `MAX_PENDING_HANDSHAKES`
connections open for 2 s each and so delay a *new* inbound session (``busy``); an
established session, and our own dials to the peer, are not affected. Both nodes should use
the same ``max_frame``: each refuses what exceeds its own, on sending and on receiving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import inspect
import ipaddress
import json
import logging
import random
import secrets
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar, Final, Literal, Protocol, Union, cast

from failover import node_name_error
from lb import channel

logger = logging.getLogger("lb.control.sync")

VERSION: Final = 1
MAGIC: Final = b"PLBS"
SYNC_KEY_LABEL: Final = b"pairlb sync v1"
MAC_LEN: Final = 32
NONCE_LEN: Final = 16
EPOCH_LEN: Final = 8
MAX_KEYS: Final = 8
"""Most keys in a rotation (and MACs on a HELLO)."""
MAX_HELLO: Final = 4096
"""Longest HELLO body."""
MAX_DIGEST_LEN: Final = 128
MIN_KEY_LEN: Final = 16
"""As failover's: `failover.load_key` refuses shorter keys."""
DEFAULT_MAX_FRAME: Final = 4 << 20
HANDSHAKE_TIMEOUT_S: Final = 2.0
SILENT_PINGS: Final = 3
BACKOFF_MIN_S: Final = 0.1
BACKOFF_MAX_S: Final = 5.0
MAX_PENDING_HANDSHAKES: Final = 64
"""Unauthenticated inbound connections at once; more are closed at accept (``busy``)."""
DIALER: Final = 1
LISTENER: Final = 2

_HELLO_LABEL: Final = b"pairlb sync hello\0"
_SESSION_LABEL: Final = b"pairlb sync session\0"
_HELLO_HEADER: Final = struct.Struct("!4sBBH")
HELLO_HEADER_LEN: Final = _HELLO_HEADER.size  # 8
_FRAME_HEADER: Final = struct.Struct("!IQ")
FRAME_HEADER_LEN: Final = _FRAME_HEADER.size  # 12
_COUNTER: Final = struct.Struct("!Q")
_STREAM_LIMIT: Final = 1 << 20
_LOG_EVERY_S: Final = 10.0


class Reason(StrEnum):
    """Why a connection was refused (``SyncChannel.rejected`` keys)."""

    UNKNOWN_SOURCE = "unknown_source"
    """Source address not a peer's: closed before any byte was read."""
    BUSY = "busy"
    """Too many unauthenticated connections at once."""
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    TRUNCATED = "truncated"
    """EOF inside a HELLO or a frame (or before any HELLO)."""
    OVERSIZE = "oversize"
    BAD_MAC = "bad_mac"
    REPLAYED = "replayed"
    """A frame counter lower than expected (a frame seen before)."""
    REORDERED = "reordered"
    """A frame counter higher than expected (a frame skipped)."""
    MALFORMED = "malformed"
    LOOPED = "looped"
    """A HELLO carrying our own node name."""
    HANDSHAKE_TIMEOUT = "handshake_timeout"


class SyncRejected(Exception):
    """A HELLO or frame refused; `reason` is the counter it goes to."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail


class FrameTooLarge(ValueError):
    """A message to send whose body is longer than max_frame (refused, not sent)."""


class SyncCodecError(channel.ChannelError):
    """A frame body that is not a valid message of this VERSION."""


# -- messages ---------------------------------------------------------------------------------


def _require_dict(data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise TypeError(f"{what}: expected an object, got {type(data).__name__}")
    return data


def _require_int(data: Any, what: str) -> int:
    if isinstance(data, bool) or not isinstance(data, int) or data < 0:
        raise TypeError(f"{what}: expected a non-negative int, got {data!r}")
    return data


@dataclass(frozen=True)
class HelloMsg:
    TYPE: ClassVar[str] = "hello"
    node: str
    role: Literal["dial", "accept"]
    nonce: bytes
    epoch: bytes
    config_digest: str = ""
    overlay_digest: str = ""
    keys: tuple[str, ...] = ()
    """The key ids of the MACs that follow the body, in order."""


@dataclass(frozen=True)
class OpMsg:
    """One change, opaque here; ``op`` is the handler's."""

    TYPE: ClassVar[str] = "op"
    origin: str
    seq: int
    op: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:  # fast path: the payload is JSON already
        return {"origin": self.origin, "seq": self.seq, "op": self.op}

    @classmethod
    def from_wire(cls, data: Any) -> OpMsg:
        d = _require_dict(data, "op message")
        origin = d["origin"]
        if not isinstance(origin, str):
            raise TypeError("origin: expected a string")
        return cls(origin, _require_int(d["seq"], "seq"), _require_dict(d["op"], "op"))


@dataclass(frozen=True)
class AckMsg:
    TYPE: ClassVar[str] = "ack"
    origin: str
    seq: int
    result: Literal["applied", "refused"]
    reason: str = ""


@dataclass(frozen=True)
class StateMsg:
    """The sender's whole overlay state (anti-entropy), opaque here."""

    TYPE: ClassVar[str] = "state"
    state: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {"state": self.state}

    @classmethod
    def from_wire(cls, data: Any) -> StateMsg:
        return cls(_require_dict(_require_dict(data, "state message")["state"], "state"))


@dataclass(frozen=True)
class PingMsg:
    TYPE: ClassVar[str] = "ping"
    sent: float
    """The sender's monotonic clock, echoed by the pong (RTT)."""
    config_digest: str = ""
    overlay_digest: str = ""


@dataclass(frozen=True)
class PongMsg:
    TYPE: ClassVar[str] = "pong"
    sent: float


@dataclass(frozen=True)
class ConfigOfferMsg:
    """Whole-config sync: the TOML text; only carried here, the handler validates it."""

    TYPE: ClassVar[str] = "config_offer"
    id: int
    digest: str
    toml: str


@dataclass(frozen=True)
class ConfigResultMsg:
    TYPE: ClassVar[str] = "config_result"
    id: int
    digest: str
    result: Literal["applied", "refused"]
    errors: tuple[str, ...] = ()


Message = Union[  # noqa: UP007 (a runtime alias: typing.get_args needs the Union)
    HelloMsg, OpMsg, AckMsg, StateMsg, PingMsg, PongMsg, ConfigOfferMsg, ConfigResultMsg,
]

_CODEC: Final = channel.Codec(VERSION, Message, SyncCodecError)


def encode_body(msg: Message) -> bytes:
    """The JSON body of a message. ValueError/TypeError if its payload is not JSON."""
    return json.dumps(_CODEC.encode(msg), separators=(",", ":"), allow_nan=False).encode()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_body(body: bytes) -> Message:
    """The message of a JSON body; raises SyncRejected (and nothing else) when it is not
    one of this VERSION."""
    try:
        obj = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except Exception as exc:  # RecursionError, UnicodeDecodeError, ValueError
        raise SyncRejected(Reason.MALFORMED, f"not JSON: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise SyncRejected(Reason.MALFORMED, f"not an object: {type(obj).__name__}")
    version = obj.get("v")
    if version != VERSION:
        raise SyncRejected(Reason.BAD_VERSION, f"version {version!r}")
    try:
        msg: Message = _CODEC.decode(obj)
    except Exception as exc:
        raise SyncRejected(Reason.MALFORMED, str(exc)[:200]) from None
    return msg


# -- keys and HELLO ---------------------------------------------------------------------------


def derive_key(key: bytes) -> bytes:
    """k_sync of one failover key (module doc)."""
    return hmac.new(key, SYNC_KEY_LABEL, hashlib.sha256).digest()


def key_id(k_sync: bytes) -> str:
    """A short public name of a derived key (8 hex digits of its SHA-256)."""
    return hashlib.sha256(k_sync).hexdigest()[:8]


def _hmac(key: bytes, *parts: bytes) -> bytes:
    h = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        h.update(p)
    return h.digest()


def encode_hello(hello: HelloMsg, keys: Sequence[bytes]) -> bytes:
    """A HELLO MAC'd with each of `keys` (derived keys, first = preferred); its ``keys``
    field is set to their ids. ValueError for what cannot be represented."""
    if not 1 <= len(keys) <= MAX_KEYS:
        raise ValueError(f"a HELLO carries 1..{MAX_KEYS} MACs (got {len(keys)})")
    hello = dataclasses.replace(hello, keys=tuple(key_id(k) for k in keys))
    body = encode_body(hello)
    if len(body) > MAX_HELLO:
        raise ValueError(f"HELLO body of {len(body)} bytes > {MAX_HELLO}")
    signed = _HELLO_HEADER.pack(MAGIC, VERSION, len(keys), len(body)) + body
    return signed + b"".join(_hmac(k, _HELLO_LABEL, signed) for k in keys)


def hello_header(header: bytes) -> tuple[int, int]:
    """(number of MACs, body length) of a HELLO's first 8 bytes; SyncRejected if bad."""
    if len(header) < HELLO_HEADER_LEN:
        if header[:4] != MAGIC[:len(header)]:
            raise SyncRejected(Reason.BAD_MAGIC)
        raise SyncRejected(Reason.TRUNCATED, f"{len(header)} bytes")
    magic, version, nmacs, n = _HELLO_HEADER.unpack_from(header)
    if magic != MAGIC:
        raise SyncRejected(Reason.BAD_MAGIC)
    if version != VERSION:
        raise SyncRejected(Reason.BAD_VERSION, f"version {version}")
    if not 1 <= nmacs <= MAX_KEYS:
        raise SyncRejected(Reason.MALFORMED, f"{nmacs} MACs")
    if n > MAX_HELLO:
        raise SyncRejected(Reason.OVERSIZE, f"HELLO body {n} > {MAX_HELLO} bytes")
    if n == 0:
        raise SyncRejected(Reason.MALFORMED, "empty HELLO")
    return nmacs, n


def open_hello(header: bytes, rest: bytes, keys: Sequence[bytes]) -> tuple[HelloMsg, int]:
    """Verify and parse a HELLO (`header`: its 8 bytes, `rest`: body and MACs) against our
    derived `keys`; returns it and the index of our key that verified it (the first of the
    sender's MACs that any of ours verifies). Raises SyncRejected and nothing else."""
    try:
        return _open_hello(bytes(header), bytes(rest), keys)
    except SyncRejected:
        raise
    except Exception as exc:  # a bug here must still be a counted rejection, never a crash
        raise SyncRejected(Reason.MALFORMED, type(exc).__name__) from exc


def _open_hello(header: bytes, rest: bytes, keys: Sequence[bytes]) -> tuple[HelloMsg, int]:
    nmacs, n = hello_header(header)
    if len(rest) < n + nmacs * MAC_LEN:
        raise SyncRejected(Reason.TRUNCATED, f"HELLO of {len(header) + len(rest)} bytes")
    if len(rest) > n + nmacs * MAC_LEN:
        raise SyncRejected(Reason.MALFORMED, "trailing bytes after the HELLO")
    body, macs = rest[:n], rest[n:]
    signed = header + body
    ours = [_hmac(k, _HELLO_LABEL, signed) for k in keys]
    index = -1
    for i in range(nmacs):
        mac = macs[i * MAC_LEN:(i + 1) * MAC_LEN]
        index = next((j for j, m in enumerate(ours) if hmac.compare_digest(mac, m)), -1)
        if index >= 0:
            break
    if index < 0:
        raise SyncRejected(Reason.BAD_MAC, "HELLO")
    msg = decode_body(body)
    if not isinstance(msg, HelloMsg):
        raise SyncRejected(Reason.MALFORMED, f"expected a HELLO, got {msg.TYPE!r}")
    bad = node_name_error(msg.node)
    if bad is not None:
        raise SyncRejected(Reason.MALFORMED, f"node name: {bad}")
    if len(msg.nonce) != NONCE_LEN or len(msg.epoch) != EPOCH_LEN:
        raise SyncRejected(Reason.MALFORMED, "nonce or epoch length")
    if len(msg.keys) != nmacs:
        raise SyncRejected(Reason.MALFORMED, f"{len(msg.keys)} key ids for {nmacs} MACs")
    if max(len(msg.config_digest), len(msg.overlay_digest)) > MAX_DIGEST_LEN:
        raise SyncRejected(Reason.MALFORMED, "digest too long")
    return msg, index


def decode_hello(data: bytes, keys: Sequence[bytes]) -> tuple[HelloMsg, int]:
    """`open_hello` over one complete HELLO in `data` (trailing bytes are MALFORMED)."""
    data = bytes(data)
    return open_hello(data[:HELLO_HEADER_LEN], data[HELLO_HEADER_LEN:], keys)


def session_key(k_sync: bytes, nonce_dialer: bytes, nonce_listener: bytes,
                node_dialer: str, node_listener: str) -> bytes:
    """k_s of a session (module doc)."""
    nd, nl = node_dialer.encode("ascii"), node_listener.encode("ascii")
    return _hmac(k_sync, _SESSION_LABEL, nonce_dialer, nonce_listener,
                 bytes([len(nd)]), nd, bytes([len(nl)]), nl)


# -- frames -----------------------------------------------------------------------------------


class FrameSealer:
    """Signs the frames one side sends in a session (counter from 0)."""

    def __init__(self, k_s: bytes, direction: int, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._key = k_s
        self._dir = bytes([direction])
        self.max_frame = max_frame
        self.counter = 0

    def seal(self, msg: Message) -> bytes:
        return self.seal_body(encode_body(msg))

    def seal_body(self, body: bytes) -> bytes:
        """One frame of `body`; FrameTooLarge (the counter untouched) above max_frame."""
        if len(body) > self.max_frame:
            raise FrameTooLarge(f"frame body of {len(body)} bytes > max_frame {self.max_frame}")
        counter = _COUNTER.pack(self.counter)
        mac = _hmac(self._key, self._dir, counter, body)
        self.counter += 1
        return b"".join((_FRAME_HEADER.pack(len(body), self.counter - 1), body, mac))


class FrameOpener:
    """Verifies the frames the other side sends in a session, strictly in counter order.
    After one rejection every later call raises it again (the connection is closed)."""

    def __init__(self, k_s: bytes, direction: int, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._key = k_s
        self._dir = bytes([direction])
        self.max_frame = max_frame
        self.expected = 0
        self._failed: SyncRejected | None = None

    def _fail(self, exc: SyncRejected) -> SyncRejected:
        self._failed = exc
        return exc

    def header(self, header: bytes) -> int:
        """Check a frame's 12-byte header; the number of bytes that follow it."""
        if self._failed is not None:
            raise self._failed
        if len(header) != FRAME_HEADER_LEN:
            raise self._fail(SyncRejected(Reason.TRUNCATED, "frame header"))
        n: int
        counter: int
        n, counter = _FRAME_HEADER.unpack(header)
        if n > self.max_frame:
            raise self._fail(SyncRejected(Reason.OVERSIZE, f"{n} > {self.max_frame} bytes"))
        if counter < self.expected:
            raise self._fail(SyncRejected(Reason.REPLAYED,
                                          f"counter {counter}, expected {self.expected}"))
        if counter > self.expected:
            raise self._fail(SyncRejected(Reason.REORDERED,
                                          f"counter {counter}, expected {self.expected}"))
        return n + MAC_LEN

    def open(self, header: bytes, rest: bytes) -> Message:
        """Verify and decode one frame (`rest`: body and MAC); SyncRejected, nothing else."""
        try:
            return self._open(bytes(header), bytes(rest))
        except SyncRejected as exc:
            raise self._fail(exc) from None
        except Exception as exc:  # a bug must still be a counted rejection
            raise self._fail(SyncRejected(Reason.MALFORMED, type(exc).__name__)) from exc

    def _open(self, header: bytes, rest: bytes) -> Message:
        if len(rest) != self.header(header):
            raise SyncRejected(Reason.TRUNCATED, "frame body")
        body, mac = rest[:-MAC_LEN], rest[-MAC_LEN:]
        expect = _hmac(self._key, self._dir, header[4:], body)
        if not hmac.compare_digest(mac, expect):
            raise SyncRejected(Reason.BAD_MAC, f"frame {self.expected}")
        self.expected += 1
        msg = decode_body(body)
        if isinstance(msg, HelloMsg):
            raise SyncRejected(Reason.MALFORMED, "HELLO inside a session")
        return msg


class FrameDecoder:
    """Incremental form of `FrameOpener` over a byte stream (tests, tools): `feed` bytes
    as they come, get the messages completed; `eof` at the end."""

    def __init__(self, opener: FrameOpener) -> None:
        self.opener = opener
        self._buf = bytearray()
        self._need = 0  # bytes after the header of the frame in progress; 0 = none yet

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while True:
            if self._need == 0:
                if len(self._buf) < FRAME_HEADER_LEN:
                    return out
                self._need = self.opener.header(bytes(self._buf[:FRAME_HEADER_LEN]))
            if len(self._buf) < FRAME_HEADER_LEN + self._need:
                return out
            end = FRAME_HEADER_LEN + self._need
            header, rest = bytes(self._buf[:FRAME_HEADER_LEN]), bytes(self._buf[12:end])
            del self._buf[:end]
            self._need = 0
            out.append(self.opener.open(header, rest))

    def eof(self) -> None:
        """SyncRejected(TRUNCATED) when the stream ended inside a frame."""
        if self._buf:
            raise SyncRejected(Reason.TRUNCATED, f"{len(self._buf)} bytes at EOF")


# -- the channel ------------------------------------------------------------------------------


class SyncHandler(Protocol):
    """What the daemon gives the channel. on_op, on_state (and on_config_offer) may be
    coroutines; the others are called synchronously. An exception from any of them is
    logged and counted (``handler_errors``), never propagated; from on_op it also refuses
    the op with the exception as the reason."""

    def config_digest(self) -> str: ...
    def overlay_digest(self) -> str: ...
    def state(self) -> dict[str, Any]: ...
    def on_op(self, op: dict[str, Any]) -> tuple[str, str] | Awaitable[tuple[str, str]]:
        """Apply or refuse one op from the peer: ("applied", "") or ("refused", reason)."""
        ...
    def on_state(self, state: dict[str, Any]) -> Awaitable[None] | None:
        """Merge the peer's whole state."""
        ...
    def on_ack(self, origin: str, seq: int, result: str, reason: str) -> None:
        """Every ack of one of our ops, in time or late (after send_op returned)."""
        ...
    def on_peer(self, node: str | None) -> None:
        """`node` connected; None: a peer disconnected (status() says which)."""
        ...


class ConfigOfferHandler(Protocol):
    """Optional: a handler with this method accepts config offers (else they are refused)."""

    def on_config_offer(self, toml: str, digest: str
                        ) -> tuple[str, Sequence[str]] | Awaitable[tuple[str, Sequence[str]]]:
        """("applied", []) or ("refused", [error, ...])."""
        ...


@dataclass(frozen=True)
class Ack:
    """What `send_op` got: per peer (node name, or "ip:port" for an address never reached)
    "applied", "refused: <reason>" or "pending" (not connected, or no ack in time)."""

    origin: str
    seq: int
    peers: dict[str, str]

    @property
    def applied(self) -> bool:
        """Every peer applied it (False with no peer at all)."""
        return bool(self.peers) and all(r == "applied" for r in self.peers.values())

    def to_dict(self) -> dict[str, Any]:
        return {"origin": self.origin, "seq": self.seq, "peers": dict(self.peers)}


class _Closed(Exception):
    """A connection we ended on purpose (duplicate, silent, rekey...): not a rejection."""


@dataclass(eq=False)
class _Conn:
    cid: int
    remote: tuple[str, int]
    dialed: bool
    writer: asyncio.StreamWriter
    started: float
    peer: str = ""
    peer_epoch: bytes = b""
    sid: bytes = b""
    k_sync: bytes = b""
    sealer: FrameSealer | None = None
    opener: FrameOpener | None = None
    established: bool = False
    last_rx: float = 0.0
    close_reason: str = ""
    hello: HelloMsg | None = None

    def abort(self, reason: str) -> None:
        if not self.close_reason:
            self.close_reason = reason
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


@dataclass(eq=False)
class _Peer:
    node: str
    conn: _Conn | None = None
    address: str = ""
    dialed: bool = False
    since: float | None = None
    last_error: str = ""
    config_digest: str = ""
    overlay_digest: str = ""
    rtt_ms: float | None = None
    handshake_ms: float | None = None
    key_id: str = ""
    sessions: int = 0


@dataclass(eq=False)
class _Dial:
    address: tuple[str, int]
    node: str = ""
    last_error: str = ""
    attempts: int = 0
    task: asyncio.Task[None] | None = None


def _norm_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _fmt(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_COUNTER_NAMES: Final = (
    "frames_in", "frames_out", "bytes_in", "bytes_out", "ops_sent", "ops_applied",
    "ops_refused", "ops_pending", "ops_late_acks", "ops_received", "ops_received_applied",
    "ops_received_refused", "states_sent", "states_received", "states_oversize",
    "configs_offered", "configs_received", "dials", "dial_failures", "handshakes",
    "reconnects", "handler_errors",
)


class SyncChannel:
    """The sync channel of one node (module doc). Use from one asyncio loop: `start()`,
    then `send_op` / `send_state` / `offer_config` / `status`, then `await stop()`.

    `keys`: the failover keys as `failover.load_key` returns them (first = sign with).
    `bind`: numeric address ("" / "0.0.0.0" / "::" = all) and port (0 = the kernel's:
    read `address` after `start`); a specific address is also the source of our dials, so
    the peer's source filter sees it. `peers`: (IP, port) of every address of every peer;
    accepted connections must come from one of these IPs. `set_peers` and `rekey` apply a
    reload live."""

    def __init__(
        self, node: str, keys: Sequence[bytes], bind: tuple[str, int],
        peers: Sequence[tuple[str, int]], handler: SyncHandler, *,
        op_timeout_s: float = 1.0, ping_interval_s: float = 5.0,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        bad = node_name_error(node)
        if bad is not None:
            raise ValueError(f"node name {node!r}: {bad}")
        if op_timeout_s <= 0 or ping_interval_s <= 0 or max_frame < 1024:
            raise ValueError("op_timeout_s and ping_interval_s must be > 0, max_frame >= 1024")
        self.node = node
        self.handler = handler
        self.bind = (bind[0], int(bind[1]))
        self.op_timeout_s = op_timeout_s
        self.ping_interval_s = ping_interval_s
        self.max_frame = max_frame
        self.address: tuple[str, int] | None = None
        """The listener's address once started (the kernel's port when bind's is 0)."""
        self.epoch = secrets.token_bytes(EPOCH_LEN)
        self.rejected: dict[str, int] = {}
        self.disconnects: dict[str, int] = {}
        self.counters: dict[str, int] = dict.fromkeys(_COUNTER_NAMES, 0)
        self._ksync: list[bytes] = []
        self._conns: set[_Conn] = set()
        self.rekey(keys)
        self._allowed: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        self._dials: dict[tuple[str, int], _Dial] = {}
        self._peer_addrs: list[tuple[str, int]] = []
        self._set_peer_list(peers)
        self._peers: dict[str, _Peer] = {}
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._pending_handshakes = 0
        self._next_cid = 0
        self._seq = 0
        self._offer_id = 0
        self._acks: dict[tuple[str, int], asyncio.Future[str]] = {}
        self._offers: dict[tuple[str, int], asyncio.Future[str]] = {}
        self._change = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._sock: socket.socket | None = None
        self._server_task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._started = False
        self._stopping = False
        self._last_log: dict[str, float] = {}

    # -- configuration ------------------------------------------------------------------------

    def rekey(self, keys: Sequence[bytes]) -> None:
        """Apply a key rotation (raw failover keys, first = sign with). Sessions whose key is
        no longer among them are closed (their dialers reconnect with the new keys)."""
        if not 1 <= len(keys) <= MAX_KEYS:
            raise ValueError(f"1..{MAX_KEYS} keys (got {len(keys)})")
        if any(len(k) < MIN_KEY_LEN for k in keys):
            raise ValueError(f"a key of fewer than {MIN_KEY_LEN} bytes")
        self._ksync = [derive_key(bytes(k)) for k in keys]
        for conn in list(self._conns):
            if conn.established and conn.k_sync not in self._ksync:
                conn.abort("rekey")

    def _set_peer_list(self, peers: Sequence[tuple[str, int]]) -> None:
        addrs = [(str(h), int(p)) for h, p in peers]
        allowed = set()
        for host, port in addrs:
            try:
                allowed.add(_norm_ip(host))
            except ValueError:
                raise ValueError(f"peer {host!r}: an IP address is needed") from None
            if not 1 <= port <= 65535:
                raise ValueError(f"peer {host!r}: port {port}")
        self._allowed = allowed
        self._peer_addrs = addrs

    def set_peers(self, peers: Sequence[tuple[str, int]]) -> None:
        """Replace the peer list (reload): dialers follow; connections from or to an address
        no longer listed are closed."""
        self._set_peer_list(peers)
        wanted = set(self._peer_addrs)
        for addr in list(self._dials):
            if addr not in wanted:
                d = self._dials.pop(addr)
                if d.task is not None:
                    d.task.cancel()
        for conn in list(self._conns):
            gone = (conn.remote not in wanted) if conn.dialed else (
                _norm_ip(conn.remote[0]) not in self._allowed)
            if gone:
                conn.abort("peer_removed")
        for node in [n for n, p in self._peers.items() if p.conn is None]:
            del self._peers[node]
        if self._started and not self._stopping:
            for addr in self._peer_addrs:
                self._start_dialer(addr)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the listener (OSError if that fails; `address` is set on return), then
        accept and dial in the background. Needs a running loop."""
        if self._started:
            raise RuntimeError("already started")
        loop = asyncio.get_running_loop()
        self._sock = self._listen_socket()
        self.address = cast(tuple[str, int], self._sock.getsockname()[:2])
        self._started = True
        self._server_task = loop.create_task(self._serve(self._sock), name="sync-listen")
        self._ticker = loop.create_task(self._tick(), name="sync-ping")
        for addr in self._peer_addrs:
            self._start_dialer(addr)
        logger.info("event=sync_started node=%s listen=%s peers=%s key_id=%s", self.node,
                    _fmt(self.address), ",".join(_fmt(a) for a in self._peer_addrs),
                    key_id(self._ksync[0]))

    def _listen_socket(self) -> socket.socket:
        host, port = self.bind
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE | socket.AI_NUMERICHOST)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(sockaddr)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _serve(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._accepted, sock=sock,
                                                  limit=_STREAM_LIMIT)

    def _start_dialer(self, addr: tuple[str, int]) -> None:
        d = self._dials.get(addr)
        if d is None:
            d = self._dials[addr] = _Dial(addr)
        if d.task is None or d.task.done():
            d.task = asyncio.get_running_loop().create_task(
                self._dial_loop(d), name=f"sync-dial-{_fmt(addr)}")

    async def stop(self) -> None:
        """Close everything; returns when no task of the channel is left."""
        if not self._started or self._stopping:
            return
        self._stopping = True
        if self._server is not None:
            self._server.close()
        tasks: list[asyncio.Task[Any]] = [t for t in (self._server_task, self._ticker)
                                          if t is not None]
        tasks += [d.task for d in self._dials.values() if d.task is not None]
        for conn in list(self._conns):
            conn.abort("stopped")
        for _ in range(10):
            tasks += list(self._conn_tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            tasks = []
            await asyncio.sleep(0)  # accepted connections whose task had not started yet
            if not self._conn_tasks:
                break
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        elif self._sock is not None:
            self._sock.close()
        for fut in [*self._acks.values(), *self._offers.values()]:
            if not fut.done():
                fut.set_result("pending")
        logger.info("event=sync_stopped node=%s", self.node)

    # -- public operations ----------------------------------------------------------------------

    def _targets(self) -> list[tuple[str, _Conn | None]]:
        """Every peer we know of: (node name, or "ip:port" when never reached; session)."""
        out: list[tuple[str, _Conn | None]] = [(p.node, p.conn) for p in self._peers.values()]
        known = {p.node for p in self._peers.values()}
        for d in self._dials.values():
            if not d.node:
                out.append((_fmt(d.address), None))
            elif d.node not in known:
                known.add(d.node)
                out.append((d.node, None))
        return out

    async def send_op(self, op: dict[str, Any]) -> Ack:
        """Send one op to every connected peer and wait up to op_timeout_s for their acks.
        Raises FrameTooLarge / ValueError / TypeError for an op that cannot be sent."""
        if not isinstance(op, dict):
            raise TypeError("an op is a dict")
        self._seq += 1
        seq = self._seq
        body = encode_body(OpMsg(self.node, seq, op))
        if len(body) > self.max_frame:
            raise FrameTooLarge(f"op of {len(body)} bytes > max_frame {self.max_frame}")
        loop = asyncio.get_running_loop()
        results: dict[str, str] = {}
        waits: dict[str, asyncio.Future[str]] = {}
        self.counters["ops_sent"] += 1
        try:
            for name, conn in self._targets():
                if conn is not None and not self._stopping:
                    fut: asyncio.Future[str] = loop.create_future()
                    self._acks[(name, seq)] = fut
                    if self._send_body(conn, body):
                        waits[name] = fut
                        continue
                    del self._acks[(name, seq)]
                results[name] = "pending"
            if waits:
                await asyncio.wait(waits.values(), timeout=self.op_timeout_s)
        finally:
            for name in waits:
                self._acks.pop((name, seq), None)
        for name, fut in waits.items():
            results[name] = fut.result() if fut.done() and not fut.cancelled() else "pending"
        for r in results.values():
            key = ("ops_applied" if r == "applied" else
                   "ops_pending" if r == "pending" else "ops_refused")
            self.counters[key] += 1
        return Ack(self.node, seq, results)

    def send_state(self, node: str | None = None) -> list[str]:
        """Send the handler's whole state to `node` (or every connected peer) now; returns
        the peers it was sent to."""
        conns = [p.conn for p in self._peers.values()
                 if p.conn is not None and (node is None or p.node == node)]
        if not conns:
            return []
        body = self._state_body()
        if body is None:
            return []
        return [c.peer for c in conns if self._send_body(c, body, "states_sent")]

    async def offer_config(self, toml: str, digest: str, timeout_s: float = 10.0
                           ) -> dict[str, str]:
        """Offer the whole config to every connected peer: per peer "applied",
        "refused: <errors>" or "pending". The receiver's handler validates and decides."""
        self._offer_id += 1
        oid = self._offer_id
        body = encode_body(ConfigOfferMsg(oid, digest, toml))
        if len(body) > self.max_frame:
            raise FrameTooLarge(f"config of {len(body)} bytes > max_frame {self.max_frame}")
        loop = asyncio.get_running_loop()
        results: dict[str, str] = {}
        waits: dict[str, asyncio.Future[str]] = {}
        try:
            for name, conn in self._targets():
                if conn is not None and not self._stopping:
                    fut: asyncio.Future[str] = loop.create_future()
                    self._offers[(name, oid)] = fut
                    if self._send_body(conn, body, "configs_offered"):
                        waits[name] = fut
                        continue
                    del self._offers[(name, oid)]
                results[name] = "pending"
            if waits:
                await asyncio.wait(waits.values(), timeout=timeout_s)
        finally:
            for name in waits:
                self._offers.pop((name, oid), None)
        for name, fut in waits.items():
            results[name] = fut.result() if fut.done() and not fut.cancelled() else "pending"
        return results

    def connected(self) -> list[str]:
        """Names of the peers with an established session."""
        return sorted(p.node for p in self._peers.values() if p.conn is not None)

    def status(self) -> dict[str, Any]:
        """JSON-serialisable state of the channel (for /status and metrics)."""
        now = time.monotonic()
        peers: list[dict[str, Any]] = []
        for p in sorted(self._peers.values(), key=lambda p: p.node):
            c = p.conn
            peers.append({
                "node": p.node, "address": p.address, "connected": c is not None,
                "direction": ("dialed" if p.dialed else "accepted") if c is not None else None,
                "since": p.since, "last_error": p.last_error or None,
                "config_digest": p.config_digest, "overlay_digest": p.overlay_digest,
                "rtt_ms": p.rtt_ms, "handshake_ms": p.handshake_ms, "key_id": p.key_id,
                "sessions": p.sessions,
                "silent_s": round(now - c.last_rx, 3) if c is not None else None,
            })
        addresses = [{"address": _fmt(d.address), "node": d.node or None,
                      "attempts": d.attempts, "last_error": d.last_error or None}
                     for d in self._dials.values()]
        return {
            "node": self.node,
            "listen": _fmt(self.address) if self.address is not None else None,
            "key_id": key_id(self._ksync[0]),
            "key_ids": [key_id(k) for k in self._ksync],
            "peers": peers,
            "addresses": addresses,
            "counters": dict(self.counters),
            "rejected": dict(self.rejected),
            "disconnects": dict(self.disconnects),
            "pending_handshakes": self._pending_handshakes,
        }

    # -- connections ----------------------------------------------------------------------------

    def _source_ok(self, host: str) -> bool:
        try:
            return _norm_ip(host) in self._allowed
        except ValueError:
            return False

    def _count(self, table: dict[str, int], reason: str) -> None:
        key = str(reason)
        table[key] = table.get(key, 0) + 1

    def _log_rejection(self, reason: str, remote: tuple[str, int], detail: str) -> None:
        now = time.monotonic()
        if now - self._last_log.get(reason, -_LOG_EVERY_S) >= _LOG_EVERY_S:
            self._last_log[reason] = now
            logger.warning("event=sync_rejected node=%s reason=%s source=%s total=%d %s",
                           self.node, reason, _fmt(remote), self.rejected.get(reason, 0),
                           f"detail={detail!r}" if detail else "")

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                        ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conn_tasks.add(task)
        try:
            peername = writer.get_extra_info("peername")
            remote = (str(peername[0]), int(peername[1])) if peername else ("?", 0)
            if self._stopping:
                writer.transport.abort()
                return
            reason = None
            if not self._source_ok(remote[0]):
                reason = Reason.UNKNOWN_SOURCE
            elif self._pending_handshakes >= MAX_PENDING_HANDSHAKES:
                reason = Reason.BUSY
            if reason is not None:
                writer.transport.abort()
                self._count(self.rejected, reason)
                self._log_rejection(reason, remote, "")
                return
            await self._run_conn(reader, writer, remote, None)
        except asyncio.CancelledError:
            # stop(): end quietly (asyncio's start_server logs a cancelled callback task
            # as an error)
            if not self._stopping:
                raise
        finally:
            if task is not None:
                self._conn_tasks.discard(task)

    async def _dial_loop(self, d: _Dial) -> None:
        delay = BACKOFF_MIN_S
        host = self.bind[0]
        local = None if host in ("", "0.0.0.0", "::") else (host, 0)
        while not self._stopping:
            if d.node and d.node in self._peers and self._peers[d.node].conn is not None:
                change = self._change
                await change.wait()
                continue
            d.attempts += 1
            self.counters["dials"] += 1
            established = False
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                    reader, writer = await asyncio.open_connection(
                        d.address[0], d.address[1], local_addr=local, limit=_STREAM_LIMIT)
            except (OSError, TimeoutError) as exc:
                self.counters["dial_failures"] += 1
                d.last_error = f"connect: {exc or type(exc).__name__}"
            else:
                established = await self._run_conn(reader, writer, d.address, d)
            if established:
                delay = BACKOFF_MIN_S
            await asyncio.sleep(delay * random.uniform(0.75, 1.25))
            if not established:
                delay = min(delay * 2, BACKOFF_MAX_S)

    def _changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    async def _run_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        remote: tuple[str, int], dial: _Dial | None) -> bool:
        """Handshake then serve one connection until it ends; True if it was established.
        Every failure ends here as a counted reason."""
        self._next_cid += 1
        conn = _Conn(self._next_cid, remote, dial is not None, writer, time.monotonic())
        self._conns.add(conn)
        unauthenticated = dial is None
        if unauthenticated:
            self._pending_handshakes += 1
        reason = ""
        rejected = False
        detail = ""
        try:
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                    first = await self._handshake(conn, reader, dial)
            except TimeoutError:
                raise SyncRejected(Reason.HANDSHAKE_TIMEOUT) from None
            if unauthenticated:
                unauthenticated = False
                self._pending_handshakes -= 1
            if not self._established(conn, dial):
                raise _Closed(conn.close_reason)
            await self._dispatch(conn, first)
            while True:
                msg = await self._read_frame(conn, reader)
                await self._dispatch(conn, msg)
        except SyncRejected as exc:
            reason, rejected, detail = exc.reason, True, exc.detail
        except _Closed as exc:
            reason = str(exc) or conn.close_reason or "closed"
        except asyncio.IncompleteReadError as exc:
            if conn.close_reason:
                reason = conn.close_reason
            elif dial is not None and not conn.established and not exc.partial:
                # the listener hung up on our HELLO: it refused our key, our source
                # address or our name (its counters say which); not a rejection here
                reason = "closed by the peer during the handshake"
            elif exc.partial or not conn.established:
                reason, rejected = Reason.TRUNCATED, True
                detail = f"EOF after {len(exc.partial)} of {exc.expected} bytes"
            else:
                reason = "eof"
        except (ConnectionError, OSError) as exc:
            reason = conn.close_reason or f"error: {exc}"
        except asyncio.CancelledError:
            reason = conn.close_reason or "stopped"
            raise
        except Exception as exc:  # a bug: counted, logged, the connection closed
            logger.exception("event=sync_internal_error node=%s", self.node)
            reason = f"internal: {type(exc).__name__}"
        finally:
            if unauthenticated:
                self._pending_handshakes -= 1
            conn.abort(reason)
            self._conns.discard(conn)
            if rejected:
                self._count(self.rejected, reason)
                self._log_rejection(reason, remote, detail)
                reason = f"rejected: {reason}" + (f" ({detail})" if detail else "")
            elif conn.established:
                self._count(self.disconnects, reason.split(":", 1)[0])
            self._ended(conn, reason, dial)
        return conn.established

    async def _handshake(self, conn: _Conn, reader: asyncio.StreamReader,
                         dial: _Dial | None) -> Message:
        writer = conn.writer
        nonce = secrets.token_bytes(NONCE_LEN)
        if dial is not None:
            writer.write(encode_hello(self._hello("dial", nonce), self._ksync))
        header = await reader.readexactly(HELLO_HEADER_LEN)
        nmacs, n = hello_header(header)
        rest = await reader.readexactly(n + nmacs * MAC_LEN)
        hello, index = open_hello(header, rest, self._ksync)
        if hello.node == self.node:
            raise SyncRejected(Reason.LOOPED, "HELLO with our own node name")
        expected_role = "accept" if dial is not None else "dial"
        if hello.role != expected_role:
            raise SyncRejected(Reason.MALFORMED, f"role {hello.role!r}")
        k = self._ksync[index]
        if dial is not None:
            k_s = session_key(k, nonce, hello.nonce, self.node, hello.node)
            conn.sid = nonce + hello.nonce
            mine, theirs = DIALER, LISTENER
        else:
            writer.write(encode_hello(self._hello("accept", nonce), [k]))
            k_s = session_key(k, hello.nonce, nonce, hello.node, self.node)
            conn.sid = hello.nonce + nonce
            mine, theirs = LISTENER, DIALER
        conn.peer, conn.peer_epoch, conn.hello, conn.k_sync = (
            hello.node, hello.epoch, hello, k)
        conn.sealer = FrameSealer(k_s, mine, self.max_frame)
        conn.opener = FrameOpener(k_s, theirs, self.max_frame)
        self._send(conn, self._ping())
        return await self._read_frame(conn, reader)  # key confirmation

    def _hello(self, role: Literal["dial", "accept"], nonce: bytes) -> HelloMsg:
        return HelloMsg(self.node, role, nonce, self.epoch, self._digest("config_digest"),
                        self._digest("overlay_digest"))

    def _digest(self, which: str) -> str:
        try:
            value = getattr(self.handler, which)()
        except Exception:
            self._handler_error(which)
            return ""
        return value[:MAX_DIGEST_LEN] if isinstance(value, str) else ""

    def _ping(self) -> PingMsg:
        return PingMsg(time.monotonic(), self._digest("config_digest"),
                       self._digest("overlay_digest"))

    async def _read_frame(self, conn: _Conn, reader: asyncio.StreamReader) -> Message:
        opener = conn.opener
        assert opener is not None
        header = await reader.readexactly(FRAME_HEADER_LEN)
        rest = await reader.readexactly(opener.header(header))
        msg = opener.open(header, rest)
        conn.last_rx = time.monotonic()
        self.counters["frames_in"] += 1
        self.counters["bytes_in"] += FRAME_HEADER_LEN + len(rest)
        return msg

    def _established(self, conn: _Conn, dial: _Dial | None) -> bool:
        """A session is confirmed: make it the peer's (or close the duplicate). False when
        this one is closed as the duplicate."""
        conn.established = True
        self.counters["handshakes"] += 1
        node = conn.peer
        if dial is not None:
            dial.node, dial.last_error = node, ""
        else:
            same_ip = [d for d in self._dials.values()
                       if not d.node and self._same_ip(d.address[0], conn.remote[0])]
            if len(same_ip) == 1:
                same_ip[0].node = node
        info = self._peers.get(node)
        if info is None:
            info = self._peers[node] = _Peer(node)
        existing = info.conn
        if existing is not None:
            keep = self._prefer(existing, conn)
            lose = conn if keep is existing else existing
            lose.abort("duplicate")
            if keep is existing:
                with contextlib.suppress(Exception):
                    self._send(existing, self._ping())  # a leftover answers with a reset
                return False
        hello = conn.hello
        assert hello is not None
        elapsed_ms = (time.monotonic() - conn.started) * 1000
        first = existing is None
        if first and info.sessions > 0:
            self.counters["reconnects"] += 1
        info.conn, info.sessions = conn, info.sessions + 1
        info.address, info.dialed, info.since = _fmt(conn.remote), conn.dialed, time.time()
        info.config_digest, info.overlay_digest = hello.config_digest, hello.overlay_digest
        info.handshake_ms, info.key_id = round(elapsed_ms, 3), key_id(conn.k_sync)
        info.last_error = ""
        logger.info("event=sync_peer_connected node=%s peer=%s address=%s direction=%s "
                    "key_id=%s handshake_ms=%.1f%s", self.node, node, info.address,
                    "dialed" if conn.dialed else "accepted", info.key_id, elapsed_ms,
                    "" if first else " replaces=older_session")
        self._changed()
        if first:
            self._call_sync("on_peer", node)
        if hello.overlay_digest != self._digest("overlay_digest"):
            self.send_state(node)
        return True

    @staticmethod
    def _same_ip(a: str, b: str) -> bool:
        try:
            return _norm_ip(a) == _norm_ip(b)
        except ValueError:
            return False

    def _prefer(self, a: _Conn, b: _Conn) -> _Conn:
        """The rule of the module doc; `b` is the newer session."""
        if a.peer_epoch != b.peer_epoch:
            return b
        first = min(self.node, a.peer)

        def rank(c: _Conn) -> tuple[bool, bytes]:
            return ((self.node if c.dialed else c.peer) == first, c.sid)

        return a if rank(a) >= rank(b) else b

    def _ended(self, conn: _Conn, reason: str, dial: _Dial | None) -> None:
        info = self._peers.get(conn.peer) if conn.established else None
        if info is None or info.conn is not conn:
            if dial is not None and reason and reason != "duplicate":
                dial.last_error = reason
            return
        info.conn, info.since, info.last_error, info.rtt_ms = None, None, reason, None
        for table in (self._acks, self._offers):
            for (name, _), fut in table.items():
                if name == info.node and not fut.done():
                    fut.set_result("pending")
        logger.info("event=sync_peer_disconnected node=%s peer=%s reason=%r", self.node,
                    info.node, reason)
        if not self._stopping:
            self._changed()
            self._call_sync("on_peer", None)

    # -- sending --------------------------------------------------------------------------------

    def _send(self, conn: _Conn, msg: Message) -> bool:
        return self._send_body(conn, encode_body(msg))

    def _send_body(self, conn: _Conn, body: bytes, counter: str = "") -> bool:
        sealer = conn.sealer
        if sealer is None or conn.close_reason or conn.writer.is_closing():
            return False
        frame = sealer.seal_body(body)
        conn.writer.write(frame)
        self.counters["frames_out"] += 1
        self.counters["bytes_out"] += len(frame)
        if counter:
            self.counters[counter] += 1
        if conn.writer.transport.get_write_buffer_size() > 2 * self.max_frame + (1 << 20):
            conn.abort("write_buffer_full")  # the peer does not read: not our memory's fault
        return True

    def _state_body(self) -> bytes | None:
        try:
            state = self.handler.state()
            body = encode_body(StateMsg(state))
        except Exception:
            self._handler_error("state")
            return None
        if len(body) > self.max_frame:
            self.counters["states_oversize"] += 1
            logger.error("event=sync_state_too_large node=%s bytes=%d max_frame=%d",
                         self.node, len(body), self.max_frame)
            return None
        return body

    # -- receiving ------------------------------------------------------------------------------

    def _handler_error(self, what: str) -> None:
        self.counters["handler_errors"] += 1
        logger.exception("event=sync_handler_error node=%s call=%s", self.node, what)

    def _call_sync(self, name: str, *args: Any) -> None:
        try:
            result = getattr(self.handler, name)(*args)
            if inspect.iscoroutine(result):
                result.close()
                raise TypeError(f"{name} must not be a coroutine")
        except Exception:
            self._handler_error(name)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        result = fn(*args)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _dispatch(self, conn: _Conn, msg: Message) -> None:
        info = self._peers.get(conn.peer)
        if isinstance(msg, PingMsg):
            if info is not None and info.conn is conn:
                info.config_digest, info.overlay_digest = msg.config_digest, msg.overlay_digest
            self._send(conn, PongMsg(msg.sent))
        elif isinstance(msg, PongMsg):
            if info is not None and info.conn is conn:
                info.rtt_ms = round((time.monotonic() - msg.sent) * 1000, 3)
        elif isinstance(msg, OpMsg):
            await self._on_op(conn, msg)
        elif isinstance(msg, AckMsg):
            self._on_ack(conn, msg)
        elif isinstance(msg, StateMsg):
            self.counters["states_received"] += 1
            try:
                await self._call(self.handler.on_state, msg.state)
            except Exception:
                self._handler_error("on_state")
        elif isinstance(msg, ConfigOfferMsg):
            await self._on_config_offer(conn, msg)
        elif isinstance(msg, ConfigResultMsg):
            fut = self._offers.get((conn.peer, msg.id))
            if fut is not None and not fut.done():
                fut.set_result("applied" if msg.result == "applied"
                               else "refused: " + "; ".join(msg.errors))
        else:  # HelloMsg never gets here (FrameOpener refuses it)
            raise SyncRejected(Reason.MALFORMED, f"unexpected {msg.TYPE!r}")

    async def _on_op(self, conn: _Conn, msg: OpMsg) -> None:
        self.counters["ops_received"] += 1
        result, reason = "refused", ""
        try:
            got = await self._call(self.handler.on_op, msg.op)
            if (isinstance(got, tuple) and len(got) == 2 and got[0] in ("applied", "refused")
                    and isinstance(got[1], str)):
                result, reason = got
            else:
                reason = f"handler returned {got!r:.100}"
                self._handler_error("on_op")
        except Exception as exc:
            self._handler_error("on_op")
            reason = f"handler error: {type(exc).__name__}: {exc}"
        if result == "applied":
            self.counters["ops_received_applied"] += 1
        else:
            self.counters["ops_received_refused"] += 1
            logger.info("event=sync_op_refused node=%s origin=%s seq=%d reason=%r", self.node,
                        msg.origin, msg.seq, reason)
        self._send(conn, AckMsg(msg.origin, msg.seq,
                                "applied" if result == "applied" else "refused", reason[:1000]))

    def _on_ack(self, conn: _Conn, msg: AckMsg) -> None:
        if msg.origin != self.node:
            return  # not ours: nothing to resolve or report
        fut = self._acks.get((conn.peer, msg.seq))
        text = "applied" if msg.result == "applied" else f"refused: {msg.reason}"
        if fut is not None and not fut.done():
            fut.set_result(text)
        else:
            self.counters["ops_late_acks"] += 1
        if msg.result == "refused":
            logger.warning("event=sync_op_refused_by_peer node=%s peer=%s seq=%d reason=%r",
                           self.node, conn.peer, msg.seq, msg.reason)
        self._call_sync("on_ack", msg.origin, msg.seq, msg.result, msg.reason)

    async def _on_config_offer(self, conn: _Conn, msg: ConfigOfferMsg) -> None:
        self.counters["configs_received"] += 1
        fn = getattr(self.handler, "on_config_offer", None)
        result: Literal["applied", "refused"] = "refused"
        errors: tuple[str, ...] = (f"{self.node} does not take config offers",)
        if fn is not None:
            try:
                got = await self._call(fn, msg.toml, msg.digest)
                result = "applied" if got[0] == "applied" else "refused"
                errors = tuple(str(e)[:1000] for e in got[1])[:100]
            except Exception as exc:
                self._handler_error("on_config_offer")
                errors = (f"handler error: {type(exc).__name__}: {exc}",)
        self._send(conn, ConfigResultMsg(msg.id, msg.digest, result, errors))

    # -- periodic -------------------------------------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval_s)
            now = time.monotonic()
            for info in list(self._peers.values()):
                conn = info.conn
                if conn is None:
                    continue
                if now - conn.last_rx > SILENT_PINGS * self.ping_interval_s:
                    conn.abort("silent")
                    continue
                try:
                    self._send(conn, self._ping())
                except Exception:
                    logger.exception("event=sync_internal_error node=%s", self.node)

