"""Heartbeat codec, anti-replay and key file: tables, properties and a fuzz run.

What a user would notice: a forged, truncated, bit-flipped, replayed or wrong-key heartbeat
never crashes the node and never counts as a heartbeat; a real one always does; an unsafe
key file is refused with the command that fixes it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import stat
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failover.core.codec import (
    HEADER_LEN,
    MAC_LEN,
    MAGIC,
    MAX_INTERVAL_MS,
    NODE_NAME_MAX,
    Heartbeat,
    HeartbeatFlags,
    HeartbeatRejected,
    KeyFileError,
    RejectReason,
    ReplayGuard,
    bound_interval,
    decode,
    decode_any,
    encode,
    generate_key,
    key_id,
    load_key,
    write_key_file,
)
from failover.core.machine import Role

KEY = b"k" * 32
NOW_MS = 1_750_000_000_000


def hb(**kw: object) -> Heartbeat:
    base: dict[str, object] = dict(
        name="lb1", role=Role.MASTER, priority=150, epoch=7, seq=1, timestamp_ms=NOW_MS,
        config_digest=bytes(range(16)), address=ipaddress.ip_address("192.0.2.11"),
        healthy_count=2, total_count=3, interval_ms=50, flags=HeartbeatFlags.HEALTHY,
    )
    base.update(kw)
    return Heartbeat(**base)  # type: ignore[arg-type]


heartbeats = st.builds(
    Heartbeat,
    name=st.from_regex(r"[A-Za-z0-9_.-]{1,32}", fullmatch=True),
    role=st.sampled_from(list(Role)),
    priority=st.integers(0, 255),
    epoch=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    timestamp_ms=st.integers(0, 2**64 - 1),
    config_digest=st.binary(min_size=16, max_size=16),
    address=st.one_of(st.none(), st.ip_addresses()).filter(
        lambda a: a is None or not (a.version == 6 and (a.ipv4_mapped is not None or int(a) == 0))
    ),
    healthy_count=st.integers(0, 100),
    total_count=st.integers(100, 0xFFFF),
    interval_ms=st.integers(1, 2**32 - 1),
    flags=st.sampled_from([HeartbeatFlags(i) for i in range(8)]),
)


def _decode_or_reason(data: bytes, key: bytes = KEY) -> Heartbeat | RejectReason:
    try:
        return decode(data, key)
    except HeartbeatRejected as exc:
        assert isinstance(exc.reason, RejectReason)
        return exc.reason


# -- round trip -----------------------------------------------------------------------------


@given(heartbeats)
def test_every_heartbeat_round_trips(h: Heartbeat) -> None:
    assert decode(encode(h, KEY), KEY) == h


def test_wire_layout_is_as_drawn() -> None:
    data = encode(hb(name="lb1"), KEY)
    assert HEADER_LEN == 73
    assert len(data) == 73 + 3 + 32
    assert data[:4] == b"PLBH" and data[4] == 1 and data[5] == 2 and data[6] == 150
    assert struct.unpack("!Q", data[8:16]) == (7,)
    assert data[-32:] == hmac.new(KEY, data[:-32], hashlib.sha256).digest()


def test_name_too_long_cannot_be_encoded() -> None:
    with pytest.raises(ValueError):
        encode(hb(name="x" * 65), KEY)


@pytest.mark.parametrize("name", ["x" * (NODE_NAME_MAX + 1), "nœud", "lb 1", "lb1\n", ""])
def test_a_name_outside_the_node_name_rule_cannot_be_encoded(name: str) -> None:
    """What [node] name refuses, the codec refuses too (one rule, failover's)."""
    with pytest.raises(ValueError, match="heartbeat name"):
        encode(hb(name=name), KEY)


def _signed_with_name(raw_name: bytes, key: bytes = KEY) -> bytes:
    """A heartbeat as a peer running an older build could send it: any name of 1..255 bytes,
    correctly signed (encode() of this build refuses such names)."""
    head = encode(hb(name="lb1"), key)[: HEADER_LEN - 1]
    body = head + bytes([len(raw_name)]) + raw_name
    return body + hmac.new(key, body, hashlib.sha256).digest()


@pytest.mark.parametrize("raw_name", [
    b"x" * (NODE_NAME_MAX + 1),  # the old codec took 64 bytes
    b"y" * 64,
    "nœud-ß".encode(),  # printable UTF-8: FailoverSpec used to allow it
    b"lb 1",
    b"\xff\xfe",
])
def test_an_authentic_heartbeat_with_a_name_this_build_refuses_is_malformed(
        raw_name: bytes) -> None:
    """Counted and dropped like any bad heartbeat (HeartbeatRejected), never another error."""
    data = _signed_with_name(raw_name)
    with pytest.raises(HeartbeatRejected) as info:
        decode(data, KEY)
    assert info.value.reason is RejectReason.MALFORMED


def test_the_longest_valid_name_round_trips() -> None:
    name = "a." + "Z-_9" * ((NODE_NAME_MAX - 2) // 4)
    name += "q" * (NODE_NAME_MAX - len(name))
    assert len(name) == NODE_NAME_MAX
    assert decode(_signed_with_name(name.encode()), KEY).name == name
    assert decode(encode(hb(name=name), KEY), KEY).name == name


# -- hostile input ------------------------------------------------------------------------


@settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_are_always_a_rejection(data: bytes) -> None:
    assert isinstance(_decode_or_reason(data), RejectReason)


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_random_bytes_behind_a_good_magic_are_a_rejection(tail: bytes) -> None:
    assert isinstance(_decode_or_reason(MAGIC + b"\x01" + tail), RejectReason)


def test_every_truncation_is_rejected_as_truncated() -> None:
    data = encode(hb(), KEY)
    for n in range(len(data)):
        got = _decode_or_reason(data[:n])
        assert got is RejectReason.TRUNCATED, (n, got)


def test_every_single_bit_flip_is_rejected() -> None:
    data = encode(hb(name="lb-one"), KEY)
    reasons: set[RejectReason] = set()
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        got = _decode_or_reason(bytes(flipped))
        assert isinstance(got, RejectReason), f"bit {bit} accepted"
        reasons.add(got)
    assert reasons == {RejectReason.BAD_MAGIC, RejectReason.BAD_VERSION, RejectReason.BAD_MAC,
                       RejectReason.TRUNCATED, RejectReason.MALFORMED}


@settings(max_examples=1000)
@given(heartbeats, st.data())
def test_random_corruption_of_real_packets_is_rejected(h: Heartbeat, data: st.DataObject) -> None:
    packet = bytearray(encode(h, KEY))
    positions = data.draw(st.lists(st.integers(0, len(packet) - 1), min_size=1, max_size=8,
                                   unique=True))
    for i in positions:
        packet[i] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(packet) + 4))
    mutated = bytes(packet[:cut]) + b"\0" * max(0, cut - len(packet))
    assert isinstance(_decode_or_reason(mutated), RejectReason)


@given(heartbeats, st.binary(min_size=16, max_size=64))
def test_wrong_key_is_bad_mac(h: Heartbeat, other: bytes) -> None:
    if other == KEY:
        return
    assert _decode_or_reason(encode(h, other)) is RejectReason.BAD_MAC


def test_trailing_bytes_are_malformed() -> None:
    assert _decode_or_reason(encode(hb(), KEY) + b"x") is RejectReason.MALFORMED


def test_other_version_is_rejected_before_the_mac() -> None:
    data = bytearray(encode(hb(), KEY))
    data[4] = 2
    assert _decode_or_reason(bytes(data)) is RejectReason.BAD_VERSION


def _signed(mutate: dict[int, int] | None = None, name: bytes = b"lb1") -> bytes:
    """A correctly signed packet whose fields the encoder would never produce."""
    body = bytearray(encode(hb(name="lb1"), KEY)[:-MAC_LEN])
    for i, v in (mutate or {}).items():
        body[i] = v
    body = body[:HEADER_LEN - 1] + bytes([len(name)]) + name
    return bytes(body) + hmac.new(KEY, bytes(body), hashlib.sha256).digest()


@pytest.mark.parametrize("what,packet", [
    ("role 9", _signed({5: 9})),
    ("unknown flag bit", _signed({7: 0x80})),
    ("healthy > total", _signed({64: 0, 65: 9, 66: 0, 67: 1})),
    ("interval 0", _signed({68: 0, 69: 0, 70: 0, 71: 0})),
    ("name not utf-8", _signed(name=b"\xff\xfe")),
    ("name with control char", _signed(name=b"a\nb")),
    ("empty name", _signed(name=b"")),
])
def test_signed_but_malformed_fields(what: str, packet: bytes) -> None:
    got = _decode_or_reason(packet)
    assert got in (RejectReason.MALFORMED, RejectReason.TRUNCATED), what
    assert got is RejectReason.MALFORMED or what == "empty name"


# -- anti-replay ----------------------------------------------------------------------------


def _check(guard: ReplayGuard, h: Heartbeat, now_ms: int = NOW_MS) -> bool | RejectReason:
    try:
        return guard.check(h, now_ms)
    except HeartbeatRejected as exc:
        return exc.reason


def test_replay_rules_table() -> None:
    g = ReplayGuard(window_ms=30_000)
    assert _check(g, hb(seq=10)) is True  # first contact, timestamp in the window
    assert _check(g, hb(seq=10)) is False  # same round via another path: duplicate
    assert _check(g, hb(seq=9)) is RejectReason.REPLAYED
    assert _check(g, hb(seq=11, timestamp_ms=0)) is True  # no clock check within an epoch
    # The sender restarts: new epoch, timestamp now.
    assert _check(g, hb(epoch=8, seq=1, timestamp_ms=NOW_MS + 5)) is True
    # A recording of the previous boot, even fresh-looking, never flips it back.
    assert _check(g, hb(epoch=7, seq=12, timestamp_ms=NOW_MS + 6)) is RejectReason.REPLAYED
    # A boot we never heard, recorded before the current one: older than what we have.
    assert _check(g, hb(epoch=99, seq=5, timestamp_ms=NOW_MS - 1000)) is RejectReason.STALE
    # A new epoch from far outside the window.
    assert _check(g, hb(epoch=100, seq=1, timestamp_ms=NOW_MS + 60_000)) is RejectReason.STALE
    assert _check(g, hb(name="lb2", timestamp_ms=NOW_MS - 31_000)) is RejectReason.STALE
    assert _check(g, hb(name="lb2", timestamp_ms=NOW_MS - 29_000)) is True


@settings(max_examples=300)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 1000)), min_size=1, max_size=60))
def test_replays_of_anything_seen_are_never_fresh(script: list[tuple[bool, int]]) -> None:
    """A live sender (with restarts) interleaved with replays of its earlier packets."""
    g = ReplayGuard()
    sent: list[Heartbeat] = []
    epoch, seq, t = 1, 0, NOW_MS
    for restart, pick in script:
        t += 50
        if restart:
            epoch, seq = epoch + 1, 0
        seq += 1
        h = hb(epoch=epoch, seq=seq, timestamp_ms=t)
        assert _check(g, h, t) is True
        if sent:
            old = sent[pick % len(sent)]
            assert _check(g, old, t) in (RejectReason.REPLAYED, RejectReason.STALE)
        sent.append(h)


# -- key file -----------------------------------------------------------------------------


def test_keygen_writes_a_private_key_that_loads(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "failover.key")
    key = write_key_file(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_key(path) == key and len(key) == 32
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_file(path)
    assert generate_key() != generate_key()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o610])
def test_key_readable_by_others_is_refused_with_the_fix(tmp_path: os.PathLike[str],
                                                        mode: int) -> None:
    path = os.path.join(tmp_path, "k")
    with open(path, "w") as f:
        f.write(generate_key().hex())
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as exc:
        load_key(path)
    assert f"chmod 600 {path}" in str(exc.value)


def test_short_missing_and_raw_keys(tmp_path: os.PathLike[str]) -> None:
    short = os.path.join(tmp_path, "short")
    fd = os.open(short, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"abcd\n")
    os.close(fd)
    with pytest.raises(KeyFileError, match="too short"):
        load_key(short)
    with pytest.raises(KeyFileError, match="pairlb keygen"):
        load_key(os.path.join(tmp_path, "missing"))
    raw = os.path.join(tmp_path, "raw")
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"a passphrase that is long enough\n")
    os.close(fd)
    assert load_key(raw) == b"a passphrase that is long enough"


def test_keygen_force_replaces_atomically_and_stays_private(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "failover.key")
    first = write_key_file(path)
    old_umask = os.umask(0)  # a careless umask must not make the key readable
    try:
        second = write_key_file(path, force=True)
    finally:
        os.umask(old_umask)
    assert second != first and load_key(path) == second
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["failover.key"]  # no temporary file left
    link = os.path.join(tmp_path, "link")
    os.symlink(os.path.join(tmp_path, "elsewhere"), link)
    with pytest.raises(KeyFileError, match="already exists"):
        write_key_file(link)  # never written through a symlink
    assert not os.path.exists(os.path.join(tmp_path, "elsewhere"))


# -- key rotation and the advertised interval -------------------------------------------------


def test_decode_any_says_which_key_verified_and_refuses_all_others() -> None:
    old, new, other = b"o" * 32, b"n" * 32, b"x" * 32
    assert decode_any(encode(hb(), old), [new, old]) == (hb(), 1)
    assert decode_any(encode(hb(), new), [new, old]) == (hb(), 0)
    for keys in ([new, old], [], [other]):
        with pytest.raises(HeartbeatRejected) as exc:
            decode_any(encode(hb(), b"y" * 32), keys)
        assert exc.value.reason is RejectReason.BAD_MAC
    assert decode(encode(hb(), old), old) == hb()


def test_key_id_names_a_key_without_showing_it() -> None:
    a, b = generate_key(), generate_key()
    assert key_id(a) == key_id(a) and key_id(a) != key_id(b)
    assert len(key_id(a)) == 8 and key_id(a) not in a.hex()


@pytest.mark.parametrize("advertised,own,want", [
    (30, 30, (30, None)),
    (300, 30, (300, None)),            # 10 x ours: still within bounds
    (301, 30, (300, "too_long")),
    (10_000, 30, (300, "too_long")),   # the longest a config allows, clamped
    (3, 30, (3, None)),
    (2, 30, (3, "too_short")),
    (1, 5, (1, None)),                 # 5 ms / 10 rounds up to 1 ms
    (1, 1, (1, None)),
])
def test_bound_interval_table(advertised: int, own: int, want: tuple[int, str | None]) -> None:
    assert bound_interval(advertised, own) == want


def test_an_interval_no_config_can_send_is_rejected() -> None:
    with pytest.raises(HeartbeatRejected) as exc:
        bound_interval(MAX_INTERVAL_MS + 1, 30)
    assert exc.value.reason is RejectReason.BAD_INTERVAL
    # It is signed and well-formed: the codec itself still decodes it.
    assert decode(encode(hb(interval_ms=MAX_INTERVAL_MS + 1), KEY), KEY).interval_ms == 10_001
