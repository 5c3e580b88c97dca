"""Delayed heartbeats: how much later than usual one arrived, without synchronised clocks."""

from __future__ import annotations

from failover.controller import _PeerInfo


def test_steady_clock_offset_cancels_out_and_a_queued_burst_stands_out() -> None:
    peer = _PeerInfo("b")
    offset = 7_000  # the peer's clock is 7 s behind ours: irrelevant
    for i in range(10):  # steady: 1 ms transit, 30 ms apart
        assert peer.delay_ms(offset + i * 30 + 1, i * 30) == 0
    # The link is cut for 1 s; the kernel queued 33 heartbeats and flushes them at once.
    sent = [300 + i * 30 for i in range(33)]
    arrive = offset + 300 + 1_000
    delays = [peer.delay_ms(arrive, t) for t in sent]
    assert delays[0] >= 990 and delays[-1] <= 50
    assert delays == sorted(delays, reverse=True)


def test_a_clock_step_is_absorbed_after_the_sample_window() -> None:
    peer = _PeerInfo("b")
    for i in range(10):
        peer.delay_ms(i * 30 + 1, i * 30)
    # The peer's clock steps 5 s back: everything looks late until the window forgets.
    late = [peer.delay_ms(300 + i * 30 + 1, 300 + i * 30 - 5_000) for i in range(100)]
    assert late[0] >= 5_000
    assert late[-1] == 0
