"""Heartbeat wire format, HMAC authentication, anti-replay, and the shared key file.

Pure: no asyncio, socket, time or logging; the caller passes `now_ms`. The only I/O is
reading and writing the key file (`load_key`, `write_key_file`).

Wire format, version 1, network byte order, 73 + N + 32 bytes (N = name length, 1..32):

     0                   1                   2                   3
     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
    +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
    |                      magic "PLBH" (4)                         |
    +---------------+---------------+---------------+---------------+
    |  version = 1  |  role (1)     |  priority (1) |  flags (1)    |
    +---------------+---------------+---------------+---------------+
    |                    epoch (8): random per process start        |
    +                                                               +
    |                                                               |
    +---------------------------------------------------------------+
    |                    seq (8): +1 per heartbeat round            |
    +                                                               +
    |                                                               |
    +---------------------------------------------------------------+
    |                    timestamp (8): sender wall clock, ms       |
    +                                                               +
    |                                                               |
    +---------------------------------------------------------------+
    |                    config digest (16)                         |
    ~                                                               ~
    +---------------------------------------------------------------+
    |                    address (16): tie-break address, IPv6 or   |
    ~                    v4-mapped; all zero = none                 ~
    +-------------------------------+-------------------------------+
    |  healthy backends (2)         |  total backends (2)           |
    +-------------------------------+-------------------------------+
    |                    interval (4): heartbeat interval, ms       |
    +---------------+-----------------------------------------------+
    |  name len (1) |  name (N bytes, ASCII) ...                    |
    +---------------+-----------------------------------------------+
    |                    HMAC-SHA256 over all bytes above (32)      |
    ~                                                               ~
    +---------------------------------------------------------------+

role: 0 init, 1 backup, 2 master, 3 fault. flags: 1 healthy (this node's checks found
healthy backends), 2 leaving (priority is 0 too, as in VRRP), 4 switchover (a MASTER asks
the best backup to take over). Unknown role values, flag bits, healthy > total, interval 0,
a bad name or any trailing byte are MALFORMED. The MAC is compared with
hmac.compare_digest; nothing but the layout fields is read before it is verified.

Node names: `NODE_NAME_MAX` (32) ASCII letters, digits, ``_``, ``.`` and ``-``
(`NODE_NAME_PATTERN`, `node_name_error`), the one rule of ``[node] name``, `FailoverSpec` and
this codec. A heartbeat whose name breaks it (an older build let 64 printable UTF-8 bytes
through FailoverSpec; its config never did) is MALFORMED once its MAC verifies: counted and
dropped like any bad heartbeat, never an exception.

Keys: `decode_any` verifies against several keys (a key rotation: every node signs with its
first key and accepts any of its keys) and says which one matched. `key_id` names a key in
status and metrics without revealing it (8 hex digits of a SHA-256 over a fixed label and
the key).

Advertised interval: the receiver derives master_down from it (RFC 5798 6.4.2), so a peer
could make us wait very long before we notice its death, or declare it dead after a few
milliseconds. `bound_interval` is the policy: above `MAX_INTERVAL_MS` (no valid config
sends that) the heartbeat is rejected (BAD_INTERVAL); more than `MAX_INTERVAL_RATIO` times
longer or shorter than our own it is clamped to that ratio and the caller counts it.

`decode` raises `HeartbeatRejected` with a `RejectReason` for every bad input, and never
any other exception (property-tested over random, truncated and bit-flipped bytes).

Anti-replay (`ReplayGuard`), per sender name:

- Within the sender's current epoch, only a higher seq is fresh. The same seq again is the
  same heartbeat via another path (the sender uses one seq per round for all paths): it is
  reported as a duplicate, not an attack. A lower seq is REPLAYED.
- Timestamps are not checked within an epoch: a sender whose clock steps must not be cut off.
- A new epoch (the sender restarted) is accepted only if its timestamp is within
  +-window of our clock (a packet recorded long ago is STALE) and newer than the newest
  timestamp of the epoch it replaces (a recording of an earlier boot is older than the
  current boot's packets, even within the window). Replaced epochs are remembered and
  rejected as REPLAYED, so a replayed old boot cannot flip the sender back.
- Cost of the rules: clocks must agree within the window (NTP; the controller sets it from
  failover.max_clock_skew_s, measures each peer's offset and warns at half of it), and a
  sender whose clock stepped back across a restart is heard again once its clock passes
  its last timestamp (at most about the window). A capture of a boot we never heard can be
  replayed only within the window, only before we hear that sender again, and only to say
  what that sender really said then.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import stat
import struct
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntFlag, StrEnum
from typing import Final

from failover.core.machine import IPAddress, Role
from failover.core.ports import FailoverError

MAGIC: Final = b"PLBH"
VERSION: Final = 1
MAC_LEN: Final = 32
DIGEST_LEN: Final = 16
NODE_NAME_MAX: Final = 32
"""The longest node name, in characters (ASCII: the same in bytes on the wire)."""
NODE_NAME_PATTERN: Final = r"^[A-Za-z0-9_.-]+$"
"""What a node name is made of: ASCII letters, digits, '_', '.' and '-' (safe as they are in
logs, metric labels, notify scripts' arguments and file names)."""
MIN_KEY_LEN: Final = 16
MAX_INTERVAL_MS: Final = 10_000
"""The longest heartbeat interval a peer may advertise (failover.interval_s allows 10 s)."""
MAX_INTERVAL_RATIO: Final = 10
"""A peer's advertised interval is clamped to within this factor of our own."""

_HEADER = struct.Struct("!4sBBBBQQQ16s16sHHIB")
HEADER_LEN: Final = _HEADER.size  # 73
MIN_PACKET_LEN: Final = HEADER_LEN + 1 + MAC_LEN

_ROLE_CODES: Final = {Role.INIT: 0, Role.BACKUP: 1, Role.MASTER: 2, Role.FAULT: 3}
_CODE_ROLES: Final = {v: k for k, v in _ROLE_CODES.items()}
_NO_ADDRESS: Final = bytes(16)
_U64: Final = (1 << 64) - 1


class HeartbeatFlags(IntFlag):
    NONE = 0
    HEALTHY = 1
    LEAVING = 2
    SWITCHOVER = 4


_KNOWN_FLAGS: Final = int(HeartbeatFlags.HEALTHY | HeartbeatFlags.LEAVING
                          | HeartbeatFlags.SWITCHOVER)


class RejectReason(StrEnum):
    TRUNCATED = "truncated"
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    BAD_MAC = "bad_mac"
    MALFORMED = "malformed"
    REPLAYED = "replayed"
    STALE = "stale"
    LOOPED = "looped"
    """Our own heartbeat (multicast loop, or a peer list naming ourselves)."""
    UNKNOWN_SOURCE = "unknown_source"
    """From an address not in `peers`: dropped before the MAC is computed."""
    BAD_INTERVAL = "bad_interval"
    """Authenticated, but advertises an interval above MAX_INTERVAL_MS."""


class HeartbeatRejected(FailoverError):
    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else str(reason))
        self.reason = reason
        self.detail = detail


class KeyFileError(FailoverError):
    """The key file is missing, unsafe or unusable; the message says how to fix it."""


@dataclass(frozen=True)
class Heartbeat:
    name: str
    role: Role
    priority: int
    epoch: int
    seq: int
    timestamp_ms: int
    config_digest: bytes = bytes(DIGEST_LEN)
    address: IPAddress | None = None
    healthy_count: int = 0
    total_count: int = 0
    interval_ms: int = 50
    flags: HeartbeatFlags = HeartbeatFlags.NONE


def _pack_address(address: IPAddress | None) -> bytes:
    if address is None:
        return _NO_ADDRESS
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed).packed
    return address.packed


def _unpack_address(raw: bytes) -> IPAddress | None:
    if raw == _NO_ADDRESS:
        return None
    v6 = ipaddress.IPv6Address(raw)
    return v6.ipv4_mapped or v6


_NODE_NAME_RE: Final = re.compile(NODE_NAME_PATTERN)


def node_name_error(name: str) -> str | None:
    """Why `name` cannot name a node (the rule broken), or None when it can."""
    if not 1 <= len(name) <= NODE_NAME_MAX:
        return f"1..{NODE_NAME_MAX} characters (got {len(name)})"
    if _NODE_NAME_RE.fullmatch(name) is None:
        return "only ASCII letters, digits, '_', '.' and '-'"
    return None


def encode(hb: Heartbeat, key: bytes) -> bytes:
    """Serialize and sign. Raises ValueError for a heartbeat that cannot be represented."""
    bad_name = node_name_error(hb.name)
    if bad_name is not None:
        raise ValueError(f"heartbeat name {hb.name!r}: {bad_name}")
    name = hb.name.encode("ascii")
    if not 0 <= hb.priority <= 255:
        raise ValueError(f"priority: must be 0..255 (got {hb.priority})")
    if len(hb.config_digest) != DIGEST_LEN:
        raise ValueError(f"config_digest: must be {DIGEST_LEN} bytes")
    if not 0 <= hb.healthy_count <= hb.total_count <= 0xFFFF:
        raise ValueError(f"backend counts: 0 <= healthy <= total <= 65535 "
                         f"(got {hb.healthy_count}/{hb.total_count})")
    if not 1 <= hb.interval_ms <= 0xFFFF_FFFF:
        raise ValueError(f"interval_ms: must be 1..2^32-1 (got {hb.interval_ms})")
    body = _HEADER.pack(
        MAGIC, VERSION, _ROLE_CODES[hb.role], hb.priority, int(hb.flags),
        hb.epoch & _U64, hb.seq & _U64, hb.timestamp_ms & _U64, hb.config_digest,
        _pack_address(hb.address), hb.healthy_count, hb.total_count, hb.interval_ms, len(name),
    ) + name
    return body + hmac.new(key, body, hashlib.sha256).digest()


def decode(data: bytes, key: bytes) -> Heartbeat:
    """Verify and parse one datagram; raise HeartbeatRejected, and nothing else, if bad."""
    return decode_any(data, (key,))[0]


def decode_any(data: bytes, keys: Sequence[bytes]) -> tuple[Heartbeat, int]:
    """As `decode`, accepting a MAC by any of `keys` (tried in order); returns the heartbeat
    and the index of the key that verified it. An empty `keys` rejects everything."""
    try:
        return _decode(bytes(data), keys)
    except HeartbeatRejected:
        raise
    except Exception as exc:  # a bug here must still be a counted rejection, never a crash
        raise HeartbeatRejected(RejectReason.MALFORMED, f"{type(exc).__name__}") from exc


def _decode(data: bytes, keys: Sequence[bytes]) -> tuple[Heartbeat, int]:
    if len(data) < MIN_PACKET_LEN:
        if len(data) >= 4 and data[:4] != MAGIC:
            raise HeartbeatRejected(RejectReason.BAD_MAGIC)
        raise HeartbeatRejected(RejectReason.TRUNCATED, f"{len(data)} bytes")
    if data[:4] != MAGIC:
        raise HeartbeatRejected(RejectReason.BAD_MAGIC)
    if data[4] != VERSION:
        raise HeartbeatRejected(RejectReason.BAD_VERSION, f"version {data[4]}")
    name_len = data[HEADER_LEN - 1]
    expected = HEADER_LEN + name_len + MAC_LEN
    if len(data) < expected:
        raise HeartbeatRejected(RejectReason.TRUNCATED, f"{len(data)} < {expected} bytes")
    if len(data) > expected:
        raise HeartbeatRejected(RejectReason.MALFORMED, f"{len(data) - expected} trailing bytes")
    body, mac = data[:-MAC_LEN], data[-MAC_LEN:]
    index = next((i for i, key in enumerate(keys)
                  if hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest())), -1)
    if index < 0:
        raise HeartbeatRejected(RejectReason.BAD_MAC)
    (_magic, _version, role_code, priority, flags, epoch, seq, ts, digest, addr, healthy, total,
     interval_ms, _nl) = _HEADER.unpack_from(body)
    role = _CODE_ROLES.get(role_code)
    if role is None:
        raise HeartbeatRejected(RejectReason.MALFORMED, f"role {role_code}")
    if flags & ~_KNOWN_FLAGS:
        raise HeartbeatRejected(RejectReason.MALFORMED, f"flags {flags:#x}")
    if healthy > total:
        raise HeartbeatRejected(RejectReason.MALFORMED, f"healthy {healthy} > total {total}")
    if interval_ms == 0:
        raise HeartbeatRejected(RejectReason.MALFORMED, "interval 0")
    if name_len == 0 or name_len > NODE_NAME_MAX:
        raise HeartbeatRejected(RejectReason.MALFORMED, f"name length {name_len}")
    try:
        name = body[HEADER_LEN:].decode("ascii")
    except UnicodeDecodeError:
        raise HeartbeatRejected(RejectReason.MALFORMED, "name not ASCII") from None
    bad_name = node_name_error(name)
    if bad_name is not None:
        raise HeartbeatRejected(RejectReason.MALFORMED, f"name {name!r}: {bad_name}")
    return Heartbeat(
        name=name, role=role, priority=priority, epoch=epoch, seq=seq, timestamp_ms=ts,
        config_digest=digest, address=_unpack_address(addr), healthy_count=healthy,
        total_count=total, interval_ms=interval_ms, flags=HeartbeatFlags(flags),
    ), index


def key_id(key: bytes) -> str:
    """A short public name for a key (status, metrics, logs); reveals nothing of the key."""
    return hashlib.sha256(b"pairlb failover key id\0" + key).hexdigest()[:8]


def bound_interval(advertised_ms: int, own_ms: int) -> tuple[int, str | None]:
    """The interval to use for a peer that advertises `advertised_ms` (see module doc).

    Returns (interval_ms, None) when it is within bounds, (clamped_ms, "too_long" or
    "too_short") when it was clamped; raises HeartbeatRejected(BAD_INTERVAL) above
    MAX_INTERVAL_MS.
    """
    if advertised_ms > MAX_INTERVAL_MS:
        raise HeartbeatRejected(RejectReason.BAD_INTERVAL,
                                f"interval {advertised_ms} ms > {MAX_INTERVAL_MS} ms")
    own_ms = max(1, own_ms)
    longest = own_ms * MAX_INTERVAL_RATIO
    shortest = max(1, -(-own_ms // MAX_INTERVAL_RATIO))
    if advertised_ms > longest:
        return longest, "too_long"
    if advertised_ms < shortest:
        return shortest, "too_short"
    return advertised_ms, None


# -- anti-replay ------------------------------------------------------------------------------


@dataclass
class _Sender:
    epoch: int
    seq: int
    newest_ms: int
    retired: deque[int]


class ReplayGuard:
    """Per-sender freshness of authenticated heartbeats (rules in the module docstring).

    Bounded: remembers `max_senders` names (least recently heard forgotten first) and
    `retired_epochs` replaced epochs per name.
    """

    def __init__(self, window_ms: int = 30_000, *, retired_epochs: int = 16,
                 max_senders: int = 256) -> None:
        if window_ms <= 0:
            raise ValueError(f"window_ms: must be > 0 (got {window_ms})")
        self.window_ms = window_ms
        self._retired_max = retired_epochs
        self._max_senders = max_senders
        self._senders: OrderedDict[str, _Sender] = OrderedDict()

    def check(self, hb: Heartbeat, now_ms: int) -> bool:
        """True: fresh, act on it. False: a copy of the newest via another path, ignore it.

        Raises HeartbeatRejected(REPLAYED or STALE) and then remembers nothing.
        """
        rec = self._senders.get(hb.name)
        if rec is not None and hb.epoch == rec.epoch:
            if hb.seq == rec.seq:
                return False
            if hb.seq < rec.seq:
                raise HeartbeatRejected(RejectReason.REPLAYED, f"seq {hb.seq} < {rec.seq}")
            rec.seq = hb.seq
            rec.newest_ms = max(rec.newest_ms, hb.timestamp_ms)
            self._senders.move_to_end(hb.name)
            return True
        if rec is not None and hb.epoch in rec.retired:
            raise HeartbeatRejected(RejectReason.REPLAYED, "epoch of an earlier start")
        skew_ms = hb.timestamp_ms - now_ms
        if abs(skew_ms) > self.window_ms:
            raise HeartbeatRejected(
                RejectReason.STALE, f"timestamp {skew_ms:+d} ms off, window {self.window_ms}")
        if rec is not None and hb.timestamp_ms <= rec.newest_ms:
            raise HeartbeatRejected(RejectReason.STALE, "new epoch older than the current one")
        retired: deque[int] = deque(maxlen=self._retired_max)
        if rec is not None:
            retired = rec.retired
            retired.append(rec.epoch)
        self._senders[hb.name] = _Sender(hb.epoch, hb.seq, hb.timestamp_ms, retired)
        self._senders.move_to_end(hb.name)
        while len(self._senders) > self._max_senders:
            self._senders.popitem(last=False)
        return True


# -- the key file ---------------------------------------------------------------------------

_HEX = re.compile(rb"(?:[0-9a-fA-F]{2})+")


def generate_key() -> bytes:
    """32 random bytes: the key `pairlb keygen` writes."""
    return secrets.token_bytes(32)


def write_key_file(path: str, key: bytes | None = None, *, force: bool = False) -> bytes:
    """Create `path` (mode 0600) holding a new key in hex; return the key (`write_secret`:
    never overwritten unless `force`, never readable by others, never torn)."""
    key = generate_key() if key is None else key
    if len(key) < MIN_KEY_LEN:
        raise KeyFileError(f"failover key: at least {MIN_KEY_LEN} bytes (got {len(key)})")
    try:
        write_secret(path, key.hex().encode() + b"\n", replace=force)
    except SecretFileError as exc:
        if exc.reason == "exists":
            raise KeyFileError(f"{path}: already exists; use --force to replace the key "
                               f"(every node of the pair needs the same key: see the key "
                               f"rotation procedure in docs/operations.md)") from None
        raise KeyFileError(str(exc)) from None
    return key


def write_secret(path: str, data: bytes, *, replace: bool = False) -> None:
    """The one way pairlb writes a secret (keygen, the lab's tokens): created mode 0600
    from the start (O_EXCL, O_NOFOLLOW: never through a symlink, never readable by others
    even for a moment) and fsynced. An existing file is an error unless ``replace``; then
    the new file is written beside it and renamed over it, so a crash leaves the old
    secret or the new one, never a torn file."""
    target = path
    if replace:
        directory = os.path.dirname(os.path.abspath(path))
        path = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise SecretFileError(path, "exists", "already exists") from None
    except OSError as exc:
        raise SecretFileError(path, "unwritable", f"cannot create: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask or the directory's ACL said
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(path, target)
    except OSError as exc:
        if replace:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise SecretFileError(target, "unwritable", f"cannot write: {exc.strerror}") from None


class SecretFileError(FailoverError):
    """A secret file that cannot be read or written safely. ``reason``: "missing",
    "unreadable", "type", "mode" (reading), "exists", "unwritable" (writing); ``detail``
    says what is wrong (the message is "PATH: detail")."""

    def __init__(self, path: str, reason: str, detail: str, mode: int = 0) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.reason = reason
        self.detail = detail
        self.mode = mode


def read_secret(path: str, max_bytes: int = 64 * 1024) -> bytes:
    """The one way pairlb reads a secret (the failover key, the admin token): opened with
    O_NOFOLLOW (a symlink is refused, not followed) and checked on the open descriptor
    (no window between the check and the read): a regular file that neither group nor
    others may access. Returns at most ``max_bytes``, stripped."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SecretFileError(path, "missing", "No such file or directory") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SecretFileError(path, "unreadable", "is a symbolic link (refused, not "
                                  "followed): point at the file itself") from None
        raise SecretFileError(path, "unreadable", str(exc.strerror)) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(path, "type", "not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise SecretFileError(path, "mode", f"accessible by group or others (mode "
                                  f"{mode:04o}); fix it with: chmod 600 {path}", mode)
        try:
            return f.read(max_bytes).strip()
        except OSError as exc:
            raise SecretFileError(path, "unreadable", str(exc.strerror)) from None


def load_key(path: str) -> bytes:
    """Read the shared key: hex (as `pairlb keygen` writes) or raw bytes, >= 16 bytes.

    Refuses a file that group or others may access (`read_secret`): with the key anyone
    can forge a heartbeat and take the VIP.
    """
    try:
        raw = read_secret(path)
    except SecretFileError as exc:
        if exc.reason == "missing":
            raise KeyFileError(f"{path}: no such key file; create one with "
                               f"`pairlb keygen {path}` and copy it to every node") from None
        if exc.reason == "mode":
            raise KeyFileError(
                f"{path}: key file is accessible by group/others (mode {exc.mode:04o}); "
                f"fix with: chmod 600 {path}") from None
        if exc.reason == "type":
            raise KeyFileError(f"{path}: not a regular file") from None
        raise KeyFileError(f"{path}: cannot open key file: {exc.detail}") from None
    key = bytes.fromhex(raw.decode()) if _HEX.fullmatch(raw) else raw
    if len(key) < MIN_KEY_LEN:
        raise KeyFileError(f"{path}: key too short ({len(key)} bytes, need {MIN_KEY_LEN}); "
                           f"create a new one with `pairlb keygen`")
    return key
