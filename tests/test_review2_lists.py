"""Review 2: no connection is left with output queued while in neither ``dirty`` nor
``later``: a crossing of WRITE_NOW_BYTES inside ``_write_later``, a write whose callback
re-enters ``flush``, an abort of another connection from a write."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy_helpers import FakeLoop, FakeTransport, fake_proxy_server

from lb.data import proxy as P


class HookTransport(FakeTransport):
    hook: Callable[[], None] | None = None

    def write(self, data: bytes) -> None:
        super().write(data)
        h, self.hook = self.hook, None
        if h is not None:
            h()  # as a synchronous pause_writing callback would


def setup(n: int) -> tuple[FakeLoop, Any, list[Any], list[HookTransport]]:
    srv, loop = fake_proxy_server()
    cs, ts = [], []
    for _ in range(n):
        c = P._Client(srv)
        t = HookTransport(c)
        c.connection_made(t)
        cs.append(c)
        ts.append(t)
    return loop, srv, cs, ts


def run_ready(loop: FakeLoop) -> None:
    while loop.ready:
        cb, args = loop.ready.popleft()
        cb(*args)


def test_review2_crossing_inside_write_later() -> None:
    loop, srv, (a, b), (ta, tb) = setup(2)
    a.send(b"a" * 100_000)
    b.send(b"b" * 100_000)
    srv.flush()
    assert len(srv.later) == 2
    # b is written first; writing it queues more to a (still in later, not yet written),
    # crossing WRITE_NOW_BYTES
    srv.later.reverse()
    tb.hook = lambda: a.send(b"A" * 40_000)
    run_ready(loop)
    assert a.out is None and b.out is None
    assert bytes(ta.out) == b"a" * 100_000 + b"A" * 40_000


def test_review2_send_to_an_already_written_connection_inside_write_later() -> None:
    loop, srv, (a, b), (ta, tb) = setup(2)
    a.send(b"a" * 100_000)
    b.send(b"b" * 100_000)
    srv.flush()
    # a is written first; writing b then queues 100 KB more to a (out None: dirty)
    tb.hook = lambda: a.send(b"A" * 100_000)
    run_ready(loop)
    assert a.out is None and b.out is None, (a.nout, srv.dirty, srv.later)
    assert bytes(ta.out) == b"a" * 100_000 + b"A" * 100_000


def test_review2_write_reenters_flush() -> None:
    loop, srv, (a, b, c), (ta, tb, tc) = setup(3)

    def hook() -> None:
        b.send(b"B" * 90_000)
        c.send(b"c" * 10)
        srv.flush()

    ta.hook = hook
    a.send(b"a" * 200_000)
    srv.flush()
    run_ready(loop)
    assert a.out is None and b.out is None and c.out is None
    assert bytes(tb.out) == b"B" * 90_000 and bytes(tc.out) == b"c" * 10


def test_review2_abort_of_another_from_a_write() -> None:
    loop, srv, (a, b, c), (ta, tb, tc) = setup(3)
    for x in (a, b, c):
        x.send(b"x" * 100_000)
    srv.flush()
    ta.hook = b.abort
    run_ready(loop)
    assert bytes(tc.out) == b"x" * 100_000 and tb.out == bytearray() and b.out is None
    assert c.out is None
