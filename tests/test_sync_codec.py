"""The sync channel's wire format, pure (no sockets): keys, HELLO, frames, counters.

What a user would notice: a truncated, bit-flipped, replayed, reordered, oversize or
wrong-key frame or HELLO never crashes the control process and never counts as a message
from the peer; it is refused with a reason that goes to a counter. A key used raw (not
derived for sync) verifies nothing, and a heartbeat is never taken for a sync frame.
"""

from __future__ import annotations

import ipaddress
import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from failover.core import codec as hb_codec
from failover.core.machine import Role
from lb.control import sync
from lb.control.sync import (
    DIALER,
    LISTENER,
    MAC_LEN,
    AckMsg,
    ConfigOfferMsg,
    ConfigResultMsg,
    FrameDecoder,
    FrameOpener,
    FrameSealer,
    FrameTooLarge,
    HelloMsg,
    Message,
    OpMsg,
    PingMsg,
    PongMsg,
    Reason,
    StateMsg,
    SyncRejected,
)

RAW1, RAW2, RAW3 = b"1" * 32, b"2" * 32, b"3" * 32
K1, K2, K3 = (sync.derive_key(k) for k in (RAW1, RAW2, RAW3))
KS = sync.session_key(K1, b"n" * 16, b"m" * 16, "lb-a", "lb-b")
HELLO = HelloMsg("lb-a", "dial", bytes(range(16)), b"e" * 8, "cfg", "ovl")

MESSAGES: list[Message] = [
    OpMsg("lb-a", 1, {"pool": "web", "backend": "w4", "set": {"weight": 2}}),
    AckMsg("lb-a", 1, "applied"),
    AckMsg("lb-a", 2, "refused", "pool api: no such pool"),
    StateMsg({"entries": {"web/w4": {"state": "removed"}}, "seen": {"lb-a": 3}}),
    PingMsg(12.5, "cfg", "ovl"),
    PongMsg(12.5),
    ConfigOfferMsg(1, "d", "[node]\nname = 'x'\n"),
    ConfigResultMsg(1, "d", "refused", ("line 2: bad",)),
]


def reason_of(fn: object, *args: object) -> Reason:
    with pytest.raises(SyncRejected) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.reason


def frames(msgs: list[Message], key: bytes = KS, direction: int = DIALER) -> list[bytes]:
    sealer = FrameSealer(key, direction)
    return [sealer.seal(m) for m in msgs]


def decoder(key: bytes = KS, direction: int = DIALER, max_frame: int = sync.DEFAULT_MAX_FRAME
            ) -> FrameDecoder:
    return FrameDecoder(FrameOpener(key, direction, max_frame))


def feed_all(data: bytes, dec: FrameDecoder | None = None) -> list[Message]:
    dec = dec or decoder()
    out = dec.feed(data)
    dec.eof()
    return out


def signed_hello(body: bytes, keys: list[bytes], version: int = 1) -> bytes:
    """A HELLO of any body, validly MAC'd (to test what is checked after the MAC)."""
    head = struct.pack("!4sBBH", b"PLBS", version, len(keys), len(body))
    return head + body + b"".join(sync._hmac(k, sync._HELLO_LABEL, head + body) for k in keys)


def hello_body(**fields: object) -> bytes:
    base: dict[str, object] = {"t": "hello", "v": 1, "node": "lb-a", "role": "dial",
                               "nonce": "00" * 16, "epoch": "11" * 8, "config_digest": "c",
                               "overlay_digest": "o", "keys": ["k"]}
    base.update(fields)
    return json.dumps(base).encode()


# -- keys -------------------------------------------------------------------------------------


def test_sync_keys_are_derived_and_named_without_revealing_them() -> None:
    assert K1 != RAW1 and len(K1) == 32 and sync.derive_key(RAW1) == K1
    assert len({K1, K2, K3}) == 3
    assert sync.key_id(K1) == sync.key_id(K1) != sync.key_id(K2)
    assert len(sync.key_id(K1)) == 8 and int(sync.key_id(K1), 16) >= 0
    assert sync.key_id(K1) != hb_codec.key_id(RAW1)


def test_session_key_depends_on_every_input() -> None:
    base = (K1, b"n" * 16, b"m" * 16, "lb-a", "lb-b")
    variants = [
        (K2, *base[1:]), (K1, b"N" * 16, *base[2:]), (*base[:2], b"M" * 16, *base[3:]),
        (*base[:3], "lb-x", "lb-b"), (*base[:4], "lb-x"), (K1, b"m" * 16, b"n" * 16, "lb-b",
                                                        "lb-a"),
        (K1, b"n" * 16, b"m" * 16, "lb-", "alb-b"),  # no ambiguity in the name split
    ]
    keys = {sync.session_key(*v) for v in variants}  # type: ignore[arg-type]
    assert len(keys) == len(variants) and sync.session_key(*base) not in keys


# -- HELLO ------------------------------------------------------------------------------------


def test_hello_round_trip_names_the_key_used() -> None:
    data = sync.encode_hello(HELLO, [K1])
    hello, index = sync.decode_hello(data, [K1])
    assert index == 0
    assert hello == HelloMsg("lb-a", "dial", HELLO.nonce, HELLO.epoch, "cfg", "ovl",
                             (sync.key_id(K1),))
    assert data[:4] == b"PLBS" and data[4] == 1


@pytest.mark.parametrize(("sender", "receiver", "index"), [
    ([K2, K1], [K1], 0),        # new key first on one side, only the old on the other
    ([K1], [K2, K1], 1),        # the other way round
    ([K2, K1], [K1, K2], 1),    # both have both: the sender's preference (k2) wins
    ([K3, K2, K1], [K1], 0),
])
def test_key_rotation_any_shared_key_verifies(sender: list[bytes], receiver: list[bytes],
                                              index: int) -> None:
    _, got = sync.decode_hello(sync.encode_hello(HELLO, sender), receiver)
    assert got == index


def test_hello_with_a_foreign_key_or_the_raw_failover_key_is_bad_mac() -> None:
    assert reason_of(sync.decode_hello, sync.encode_hello(HELLO, [K2]), [K1]) == Reason.BAD_MAC
    # the failover key itself, not derived: a sync MAC is never made with it
    raw = sync.encode_hello(HELLO, [RAW1])
    assert reason_of(sync.decode_hello, raw, [K1]) == Reason.BAD_MAC
    # and a derived key does not verify what the raw key signed, whatever the order
    assert reason_of(sync.decode_hello, sync.encode_hello(HELLO, [K1]), [RAW1]) \
        == Reason.BAD_MAC
    assert reason_of(sync.decode_hello, sync.encode_hello(HELLO, [K1]), []) == Reason.BAD_MAC


def test_a_heartbeat_is_never_a_hello() -> None:
    hb = hb_codec.Heartbeat(name="lb-a", role=Role.MASTER, priority=100, epoch=1, seq=1,
                            timestamp_ms=1, address=ipaddress.ip_address("192.0.2.1"))
    packet = hb_codec.encode(hb, RAW1)
    assert reason_of(sync.decode_hello, packet, [K1, RAW1]) == Reason.BAD_MAGIC
    # nor a sync HELLO a heartbeat
    with pytest.raises(hb_codec.HeartbeatRejected):
        hb_codec.decode(sync.encode_hello(HELLO, [K1]), RAW1)


def test_hello_header_checks() -> None:
    good = sync.encode_hello(HELLO, [K1])
    cases = {
        b"HTTP" + good[4:]: Reason.BAD_MAGIC,
        good[:4] + b"\x02" + good[5:]: Reason.BAD_VERSION,
        good[:5] + b"\x00" + good[6:]: Reason.MALFORMED,     # no MAC
        good[:5] + b"\x09" + good[6:]: Reason.MALFORMED,     # more MACs than keys allowed
        good[:6] + b"\x10\x01" + good[8:]: Reason.OVERSIZE,  # 4097 > MAX_HELLO
        good[:6] + b"\x00\x00" + good[8:]: Reason.MALFORMED,  # empty body
        good + b"\x00": Reason.MALFORMED,                    # trailing byte
        b"": Reason.TRUNCATED,
        b"GE": Reason.BAD_MAGIC,
    }
    for data, reason in cases.items():
        assert reason_of(sync.decode_hello, data, [K1]) == reason, data[:8]
    for n in range(1, len(good)):
        assert reason_of(sync.decode_hello, good[:n], [K1]) == Reason.TRUNCATED, n


def test_hello_fields_are_checked_after_the_mac() -> None:
    cases = [
        hello_body(node="lb a"),                   # not a node name
        hello_body(node="x" * 33),
        hello_body(nonce="00" * 15),
        hello_body(epoch="11" * 9),
        hello_body(nonce="zz" * 16),               # not hex
        hello_body(role="listen"),
        hello_body(keys=["a", "b"]),               # 2 key ids for 1 MAC
        hello_body(config_digest="c" * 129),
        hello_body(t="op"),
        hello_body(node=None),
        b"[1, 2]",
        b"{not json",
        b"\xff\xfe{}",
        b'{"t": "hello", "v": 1, "node": "lb-a", "x": NaN}',
    ]
    for body in cases:
        assert reason_of(sync.decode_hello, signed_hello(body, [K1]), [K1]) \
            == Reason.MALFORMED, body
    assert reason_of(sync.decode_hello, signed_hello(hello_body(v=2), [K1]), [K1]) \
        == Reason.BAD_VERSION
    hello, _ = sync.decode_hello(signed_hello(hello_body(), [K1]), [K1])
    assert hello.node == "lb-a"


def test_every_bit_flip_of_a_hello_is_refused() -> None:
    good = sync.encode_hello(HELLO, [K2, K1])
    for i in range(len(good) * 8):
        bad = bytearray(good)
        bad[i // 8] ^= 1 << (i % 8)
        if i // 8 >= len(good) - 2 * MAC_LEN and i // 8 < len(good) - MAC_LEN:
            # the first MAC (k2) is one the receiver does not have: flipping it changes
            # nothing, the second (k1) still verifies
            sync.decode_hello(bytes(bad), [K1])
            continue
        with pytest.raises(SyncRejected):
            sync.decode_hello(bytes(bad), [K1])


def test_hello_encoding_limits() -> None:
    with pytest.raises(ValueError):
        sync.encode_hello(HELLO, [])
    with pytest.raises(ValueError):
        sync.encode_hello(HELLO, [K1] * 9)
    with pytest.raises(ValueError):
        sync.encode_hello(HelloMsg("lb-a", "dial", b"n" * 16, b"e" * 8, "c" * 5000), [K1])


# -- frames -----------------------------------------------------------------------------------


def test_frames_round_trip_in_order() -> None:
    data = b"".join(frames(MESSAGES))
    assert feed_all(data) == MESSAGES


@settings(max_examples=50, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=40))
def test_frames_survive_any_split_of_the_stream(cuts: list[int]) -> None:
    data = b"".join(frames(MESSAGES))
    dec, got, pos = decoder(), [], 0
    for n in cuts:
        got += dec.feed(data[pos:pos + n])
        pos += n
    got += dec.feed(data[pos:])
    dec.eof()
    assert got == MESSAGES


def test_frame_layout_is_len_counter_body_mac() -> None:
    sealer = FrameSealer(KS, DIALER)
    sealer.seal(PongMsg(1.0))
    frame = sealer.seal(PongMsg(2.0))
    n, counter = struct.unpack("!IQ", frame[:12])
    body = frame[12:12 + n]
    assert counter == 1 and len(frame) == 12 + n + 32
    assert json.loads(body) == {"t": "pong", "v": 1, "sent": 2.0}
    mac = sync._hmac(KS, bytes([DIALER]), struct.pack("!Q", 1), body)
    assert frame[-32:] == mac


def test_truncated_frames_wait_for_more_and_fail_at_eof() -> None:
    (frame,) = frames([MESSAGES[0]])
    for n in range(1, len(frame)):
        dec = decoder()
        assert dec.feed(frame[:n]) == []
        with pytest.raises(SyncRejected) as info:
            dec.eof()
        assert info.value.reason == Reason.TRUNCATED
    decoder().eof()  # nothing fed: a clean end


def test_every_bit_flip_of_a_frame_is_refused() -> None:
    (frame,) = frames([AckMsg("lb-a", 7, "applied")])
    for i in range(len(frame) * 8):
        bad = bytearray(frame)
        bad[i // 8] ^= 1 << (i % 8)
        with pytest.raises(SyncRejected):
            feed_all(bytes(bad))


def test_repeated_and_reordered_frames_are_refused_before_the_mac() -> None:
    f0, f1, f2 = frames(MESSAGES[:3])
    assert reason_of(feed_all, f0 + f0) == Reason.REPLAYED
    assert reason_of(feed_all, f0 + f2) == Reason.REORDERED
    assert reason_of(feed_all, f1) == Reason.REORDERED
    assert reason_of(feed_all, f0 + f1 + f1) == Reason.REPLAYED
    # a frame of another session with the right counter fails on its MAC
    (other,) = frames([MESSAGES[0]], key=sync.session_key(K1, b"x" * 16, b"y" * 16, "lb-a",
                                                          "lb-b"))
    assert reason_of(feed_all, other) == Reason.BAD_MAC


def test_wrong_key_reflected_frame_and_wrong_domain_key_are_bad_mac() -> None:
    (frame,) = frames([MESSAGES[0]])
    assert reason_of(feed_all, frame, decoder(key=b"k" * 32)) == Reason.BAD_MAC
    # our own frame sent back to us: same key, our direction
    assert reason_of(feed_all, frame, decoder(direction=LISTENER)) == Reason.BAD_MAC
    # sealed with k_sync (or the raw key) instead of the session key
    for key in (K1, RAW1):
        (bad,) = frames([MESSAGES[0]], key=key)
        assert reason_of(feed_all, bad) == Reason.BAD_MAC


def test_oversize_is_refused_from_the_header_alone() -> None:
    dec = decoder(max_frame=1024)
    header = struct.pack("!IQ", 1025, 0)
    with pytest.raises(SyncRejected) as info:
        dec.feed(header)  # no body needed to decide
    assert info.value.reason == Reason.OVERSIZE
    assert reason_of(feed_all, struct.pack("!IQ", 0xFFFF_FFFF, 0)) == Reason.OVERSIZE
    sealer = FrameSealer(KS, DIALER, max_frame=1024)
    with pytest.raises(FrameTooLarge):
        sealer.seal(StateMsg({"x": "y" * 2000}))
    assert sealer.counter == 0  # nothing was sent: the next frame is still 0
    assert feed_all(sealer.seal(PongMsg(1.0)), decoder(max_frame=1024)) == [PongMsg(1.0)]


def test_a_failed_decoder_stays_failed() -> None:
    f0, f1 = frames(MESSAGES[:2])
    dec = decoder()
    bad = bytearray(f0)
    bad[-1] ^= 1
    with pytest.raises(SyncRejected):
        dec.feed(bytes(bad))
    with pytest.raises(SyncRejected):
        dec.feed(f1)


BODIES: dict[bytes, Reason] = {
    b"": Reason.MALFORMED,
    b"not json": Reason.MALFORMED,
    b"[1, 2]": Reason.MALFORMED,
    b'"op"': Reason.MALFORMED,
    b"\xff\xfe": Reason.MALFORMED,
    '{"t": "op", "v": 1}'.encode("utf-16"): Reason.MALFORMED,
    b'{"t": "op", "v": 2, "origin": "a", "seq": 1, "op": {}}': Reason.BAD_VERSION,
    b'{"t": "op", "origin": "a", "seq": 1, "op": {}}': Reason.BAD_VERSION,
    b'{"t": "nope", "v": 1}': Reason.MALFORMED,
    b'{"t": 5, "v": 1}': Reason.MALFORMED,
    b'{"t": "op", "v": 1, "origin": 1, "seq": 1, "op": {}}': Reason.MALFORMED,
    b'{"t": "op", "v": 1, "origin": "a", "seq": -1, "op": {}}': Reason.MALFORMED,
    b'{"t": "op", "v": 1, "origin": "a", "seq": true, "op": {}}': Reason.MALFORMED,
    b'{"t": "op", "v": 1, "origin": "a", "seq": 1, "op": []}': Reason.MALFORMED,
    b'{"t": "op", "v": 1, "origin": "a", "seq": 1}': Reason.MALFORMED,
    b'{"t": "ack", "v": 1, "origin": "a", "seq": 1, "result": "maybe"}': Reason.MALFORMED,
    b'{"t": "state", "v": 1, "state": [1]}': Reason.MALFORMED,
    b'{"t": "ping", "v": 1, "sent": NaN}': Reason.MALFORMED,
    b'{"t": "ping", "v": 1, "sent": "soon"}': Reason.MALFORMED,
    b"[" * 100_000 + b"]" * 100_000: Reason.MALFORMED,
    sync.encode_body(HELLO): Reason.MALFORMED,  # a HELLO inside a session
}


@pytest.mark.parametrize("body", list(BODIES), ids=range(len(BODIES)))
def test_authenticated_garbage_bodies_are_refused(body: bytes) -> None:
    frame = FrameSealer(KS, DIALER).seal_body(body)
    assert reason_of(feed_all, frame) == BODIES[body]


def test_unknown_fields_are_ignored_for_forward_compatibility_within_a_version() -> None:
    body = b'{"t": "pong", "v": 1, "sent": 1.5, "extra": [1, 2]}'
    assert feed_all(FrameSealer(KS, DIALER).seal_body(body)) == [PongMsg(1.5)]


def test_payloads_that_are_not_json_cannot_be_sent() -> None:
    sealer = FrameSealer(KS, DIALER)
    for op in ({"x": float("nan")}, {"x": object()}, {"x": b"bytes"}):
        with pytest.raises((ValueError, TypeError)):
            sealer.seal(OpMsg("lb-a", 1, op))
    assert sealer.counter == 0


# -- fuzz -------------------------------------------------------------------------------------


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_are_only_ever_counted_rejections(data: bytes) -> None:
    for candidate in (data, b"PLBS\x01" + data, struct.pack("!IQ", len(data), 0) + data):
        try:
            sync.decode_hello(candidate, [K1, K2])
        except SyncRejected:
            pass
        else:
            raise AssertionError("random bytes made a HELLO")
        dec = decoder()
        try:
            assert dec.feed(candidate) == []
            dec.eof()
        except SyncRejected:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["op", "ack", "state", "ping", "pong", "config_offer",
                        "config_result", "hello", "x"]),
       st.dictionaries(st.sampled_from(["origin", "seq", "op", "result", "reason", "state",
                                        "sent", "id", "digest", "toml", "errors", "node"]),
                       json_values, max_size=6),
       st.sampled_from([1, 1, 1, 2, None, "1"]))
def test_authenticated_random_messages_decode_or_are_refused(kind: str, fields: dict[str, object],
                                                             version: object) -> None:
    body = json.dumps({"t": kind, "v": version, **fields}).encode()
    frame = FrameSealer(KS, DIALER).seal_body(body)
    try:
        (msg,) = feed_all(frame)
    except SyncRejected as exc:
        assert exc.reason in (Reason.MALFORMED, Reason.BAD_VERSION)
    else:
        assert kind == msg.TYPE and version == 1
        assert sync.decode_body(sync.encode_body(msg)) == msg  # what we take, we can send


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=20), json_values, max_size=10), st.integers(0, 2**63))
def test_any_json_op_round_trips(op: dict[str, object], seq: int) -> None:
    msg = OpMsg("lb-a", seq, op)
    assert feed_all(FrameSealer(KS, DIALER).seal(msg)) == [msg]
