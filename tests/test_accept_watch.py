"""lb.control.acceptwatch: when the other workers help a slot's socket, with a fake clock.

Ring 1: the decision alone (queues and slot states in, help out). The real sockets, workers
and faults: tests/test_accept_balance.py.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lb.control.acceptwatch import AcceptWatch, SlotState

UP = SlotState(True, 0.0)


def up(pong: float) -> SlotState:
    return SlotState(True, pong)


DOWN = SlotState(False, 0.0)


def test_a_serving_slot_that_keeps_up_is_never_helped() -> None:
    w = AcceptWatch()
    for t in range(50):  # a queue seen once, then empty: taken within a look
        q = 3 if t % 2 else 0
        assert not w.look(t * 0.1, {"web": [q, 0]}, [up(t * 0.1), up(t * 0.1)])
    assert w.help == {}


def test_a_slot_without_a_serving_worker_is_helped_at_the_first_look() -> None:
    w = AcceptWatch()
    assert w.look(0.1, {"web": [0, 0]}, [UP, DOWN])
    assert w.help == {"web": (1,)}
    assert w.episodes("web", 1) == 1 and w.helped("web", 1) and not w.helped("web", 0)


def test_a_queue_left_two_looks_in_a_row_is_helped_until_a_later_pong_and_an_empty_queue(
) -> None:
    w = AcceptWatch()
    assert not w.look(0.1, {"web": [0, 4]}, [up(0.0), up(0.0)])
    assert w.look(0.2, {"web": [0, 5]}, [up(0.0), up(0.0)])  # a hang: the queue stays
    assert w.help == {"web": (1,)}
    # Emptied by the helpers, but the worker has not answered since: still helped.
    assert not w.look(0.3, {"web": [0, 0]}, [up(0.3), up(0.15)])
    assert w.help == {"web": (1,)}
    # It answers a ping sent after the help began; the queue is empty: help ends.
    assert w.look(0.4, {"web": [0, 0]}, [up(0.4), up(0.35)])
    assert w.help == {} and w.episodes("web", 1) == 1


def test_a_pong_with_the_queue_still_full_keeps_the_help() -> None:
    w = AcceptWatch()
    w.look(0.1, {"web": [1, 0]}, [up(0.0), up(0.0)])
    w.look(0.2, {"web": [1, 0]}, [up(0.0), up(0.0)])
    assert w.help == {"web": (0,)}
    assert not w.look(0.3, {"web": [2, 0]}, [up(1.0), up(1.0)])
    assert w.help == {"web": (0,)}


def test_a_restarted_slot_is_helped_while_it_starts_and_released_when_it_serves() -> None:
    w = AcceptWatch()
    assert w.look(1.0, {"web": [0, 0], "api": [0, 0]}, [UP, DOWN])
    assert w.help == {"web": (1,), "api": (1,)}
    assert not w.look(1.1, {"web": [0, 0], "api": [0, 0]}, [UP, DOWN])
    assert w.look(1.2, {"web": [0, 0], "api": [0, 0]}, [up(1.2), up(1.15)])  # ready, pong
    assert w.help == {}


def test_a_shared_socket_is_never_helped_and_a_removed_listener_is_forgotten() -> None:
    w = AcceptWatch()
    assert w.look(0.1, {"one": [9], "web": [0, 0]}, [DOWN, DOWN])
    assert w.help == {"web": (0, 1)}
    assert w.queues == {"one": [9], "web": [0, 0]}
    assert w.look(0.2, {"one": [9]}, [DOWN, DOWN])
    assert w.help == {} and w.episodes("web", 0) == 0


@given(st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.booleans()), max_size=60))
def test_help_follows_its_rules_for_any_sequence(steps: list[tuple[int, bool, bool]]) -> None:
    """Whatever happens: a slot without a serving worker is helped; a serving slot is helped
    only after two looks in a row with a queue; help ends only on an empty queue with a
    pong newer than its start."""
    w = AcceptWatch()
    prev_q = 0
    since: float | None = None
    for i, (q, serving, ponged) in enumerate(steps):
        now = 0.1 * (i + 1)
        pong = now if ponged else 0.0
        was = w.helped("web", 1)
        w.look(now, {"web": [0, q]}, [up(now), SlotState(serving, pong)])
        is_ = w.helped("web", 1)
        if not serving:
            assert is_
        if is_ and not was:
            assert not serving or (q > 0 and prev_q > 0)
            since = now
        if was and not is_:
            assert serving and q == 0 and since is not None and pong > since
        if was and is_:
            assert not (serving and q == 0 and since is not None and pong > since)
        assert not w.helped("web", 0)
        prev_q = q


def test_the_supervisor_reports_a_real_answer_not_its_stall_adjusted_deadline() -> None:
    """After a stall of the control loop the supervisor moves every last_pong forward (so
    the silence is not blamed on the worker); a stopped worker must not count as having
    answered: the watch gets when the worker last really spoke."""
    from lb.control.supervisor import Supervisor, WorkerHandle

    sup = Supervisor(1, listener_fds=dict, welcome=lambda h: [], on_message=lambda h, m: None)
    h = WorkerHandle(0, 0, ready=True, last_pong=5.0, answered=1.0)
    sup.slots[0] = h
    (state,) = sup.slot_states()
    assert state.serving and state.last_pong == 1.0
    w = AcceptWatch()
    w.look(2.0, {"web": [0, 3]}, [UP, state])
    w.look(2.1, {"web": [0, 3]}, [UP, state])
    assert w.helped("web", 0) is False and w.helped("web", 1)
    h.last_pong += 10.0  # the stall adjustment: no answer from the worker
    assert not w.look(2.2, {"web": [0, 0]}, [UP, sup.slot_states()[0]])
    assert w.helped("web", 1)
