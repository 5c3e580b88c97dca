"""The role machine: transition tables, timer rules (RFC 5798) and properties.

Ring 1: pure. Every test drives `step(state, event, now)` with explicit times and checks the
actions a user would see the effect of: who holds the VIP, when, and what is announced.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from failover.core import machine as m
from failover.core.machine import (
    HEALTH_FAULT,
    TRANSITIONS,
    AcquireVip,
    Action,
    AnnounceVip,
    FaultCleared,
    FaultDetected,
    HeartbeatReceived,
    IllegalEvent,
    IllegalTransition,
    LocalHealthChanged,
    MachineState,
    Params,
    ReleaseVip,
    Role,
    RunHooks,
    SendHeartbeat,
    ShutdownRequested,
    Started,
    SwitchoverCancelled,
    SwitchoverRequested,
    TimerExpired,
    initial_state,
    step,
)

I = 1.0  # noqa: E741  (interval: round numbers make the RFC arithmetic visible)
P150 = Params(name="a", priority=150, interval_s=I)


def started(p: Params = P150, now: float = 0.0, healthy: bool = True) -> MachineState:
    s, _ = step(initial_state(p), LocalHealthChanged(healthy), now)
    s, _ = step(s, Started(), now)
    return s


def hear(s: MachineState, now: float, peer: str = "b", role: Role = Role.MASTER,
         priority: int = 200, healthy: bool = True, address: str | None = None,
         leaving: bool = False, switchover: bool = False,
         interval_s: float = I) -> tuple[MachineState, list[Action]]:
    return step(s, HeartbeatReceived(
        peer=peer, role=role, priority=priority, healthy=healthy, interval_s=interval_s,
        address=ipaddress.ip_address(address) if address else None, leaving=leaving,
        switchover=switchover), now)


def kinds(actions: Iterable[Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


def as_master(p: Params = P150, healthy: bool = True) -> MachineState:
    s = started(p, healthy=healthy)
    s, acts = step(s, TimerExpired(), p.master_down_s)
    assert s.role is Role.MASTER and AcquireVip() in acts
    return s


# -- tables and timers --------------------------------------------------------------------------


def test_timer_formulas_follow_rfc5798_6_1() -> None:
    assert m.skew_s(100, 1.0) == pytest.approx(156 / 256)
    assert m.master_down_s(100, 1.0, 3) == pytest.approx(3 + 156 / 256)
    assert m.master_down_s(255, 0.05, 3) == pytest.approx(0.15 + 0.05 / 256)
    assert Params(name="x", priority=200, interval_s=0.05, down_after=4).master_down_s == \
        pytest.approx(0.2 + 56 / 256 * 0.05)


def test_transition_table() -> None:
    assert Role.MASTER not in TRANSITIONS[Role.INIT]
    assert Role.MASTER not in TRANSITIONS[Role.FAULT]  # FAULT rejoins as BACKUP first
    assert all(r not in TRANSITIONS[r] for r in Role)


def test_illegal_transition_raises_and_changes_nothing() -> None:
    s = started()
    f, _ = step(s, FaultDetected("carrier:eth0"), 0.5)
    assert f.role is Role.FAULT
    builder = m._Step(f)
    with pytest.raises(IllegalTransition):
        builder.goto(Role.MASTER, 1.0, "test")
    assert f.role is Role.FAULT and builder.actions == []


@pytest.mark.parametrize("event,role", [
    (Started(), Role.BACKUP), (SwitchoverRequested(), Role.BACKUP),
    (SwitchoverRequested(), Role.FAULT), (SwitchoverRequested(), Role.INIT),
])
def test_events_refused_in_a_role_change_nothing(event: m.Event, role: Role) -> None:
    s = initial_state(P150)
    if role is not Role.INIT:
        s = started()
    if role is Role.FAULT:
        s, _ = step(s, FaultDetected("x"), 0.1)
    before = s
    with pytest.raises(IllegalEvent):
        step(s, event, 1.0)
    assert s == before


def test_start_joins_as_backup_and_takes_after_master_down_when_alone() -> None:
    s, acts = step(initial_state(P150), Started(), 0.0)
    assert s.role is Role.BACKUP
    assert kinds(acts) == ["SendHeartbeat", "RunHooks"]
    md = P150.master_down_s
    s, acts = step(s, TimerExpired(), md - 1e-9)
    assert s.role is Role.BACKUP and acts == []
    assert m.next_deadline(s, md - 1e-9) == pytest.approx(md)
    s, acts = step(s, TimerExpired(), md)
    assert s.role is Role.MASTER
    # The VIP first, then the first MASTER heartbeat (the old holder releases on it).
    assert kinds(acts) == ["AcquireVip", "SendHeartbeat", "RunHooks"]
    assert acts[1] == SendHeartbeat(m.Advert(Role.MASTER, 150, healthy=False))


def test_backup_takes_over_exactly_master_down_after_last_heartbeat() -> None:
    s = started()
    for t in (0.5, 1.5, 2.5, 3.5):
        s, _ = hear(s, t)
    md = P150.master_down_s  # 3 + 106/256: our own priority sets the skew
    assert m.next_deadline(s, 3.5) == pytest.approx(3.5 + md)
    s, _ = step(s, TimerExpired(), 3.5 + md - 1e-6)
    assert s.role is Role.BACKUP
    s, acts = step(s, TimerExpired(), 3.5 + md)
    assert s.role is Role.MASTER and AcquireVip() in acts


def test_master_down_uses_the_interval_the_master_advertises() -> None:
    s = started()
    s, _ = hear(s, 1.0, interval_s=0.1)
    assert m.next_deadline(s, 1.0) == pytest.approx(1.0 + m.master_down_s(150, 0.1, 3))


def test_priority_zero_means_takeover_after_skew_only() -> None:
    s = started()
    s, _ = hear(s, 10.0)
    s, _ = hear(s, 10.2, priority=0, leaving=True)
    skew = m.skew_s(150, I)
    assert m.next_deadline(s, 10.2) == pytest.approx(10.2 + skew)
    s, _ = hear(s, 10.3, priority=0, leaving=True)  # repeats do not push the deadline
    s, _ = step(s, TimerExpired(), 10.2 + skew - 1e-6)
    assert s.role is Role.BACKUP
    s, acts = step(s, TimerExpired(), 10.2 + skew)
    assert s.role is Role.MASTER and AcquireVip() in acts


def test_master_yields_at_once_to_a_better_master() -> None:
    s = as_master()
    s, acts = hear(s, 10.0, priority=200)
    assert s.role is Role.BACKUP
    assert kinds(acts) == ["ReleaseVip", "SendHeartbeat", "RunHooks"]


def test_master_reannounces_at_once_when_it_hears_a_worse_master() -> None:
    s = as_master()
    s, acts = hear(s, 10.0, priority=100)
    assert s.role is Role.MASTER
    assert kinds(acts) == ["AnnounceVip", "SendHeartbeat"]
    s, acts = hear(s, 10.05, priority=100)  # held off: no GARP storm, still answers
    assert kinds(acts) == ["SendHeartbeat"]
    s, acts = hear(s, 10.0 + P150.reannounce_holdoff_s, priority=100)
    assert kinds(acts) == ["AnnounceVip", "SendHeartbeat"]


def test_master_reannounces_when_a_lost_or_former_master_peer_is_heard_as_backup() -> None:
    """Healed partition where the loser heard us first and yielded: its MASTER heartbeat
    never reaches us, yet clients may still be on its MAC; so re-announce on its BACKUP one."""
    s = as_master()
    s, acts = hear(s, 10.0, role=Role.BACKUP, priority=100)  # first heard: announce
    assert kinds(acts) == ["AnnounceVip", "SendHeartbeat"]
    s, acts = hear(s, 10.0 + I, role=Role.BACKUP, priority=100)  # a steady backup: nothing
    assert kinds(acts) == []
    s, acts = hear(s, 30.0, role=Role.BACKUP, priority=100)  # silent for long: lost, back
    assert s.role is Role.MASTER
    assert kinds(acts) == ["AnnounceVip", "SendHeartbeat"]
    s, acts = hear(s, 32.0, role=Role.MASTER, priority=100)  # a worse master: announce
    assert kinds(acts) == ["AnnounceVip", "SendHeartbeat"]
    # It may have announced after us before it yielded: its yield is an edge that passes
    # the holdoff, so the last announcement clients hear is ours.
    s, acts = hear(s, 32.1, role=Role.BACKUP, priority=100)
    assert s.role is Role.MASTER and kinds(acts) == ["AnnounceVip", "SendHeartbeat"]
    s, acts = hear(s, 32.1 + I, role=Role.BACKUP, priority=100)  # steady again: nothing
    assert kinds(acts) == []


def test_a_yield_heard_late_still_makes_the_winner_announce() -> None:
    """The loser yielded first and its BACKUP heartbeats reach us marked delayed (a clock
    that moved during the partition, a slow path back): the edge must not be lost, or
    clients stay on the loser's MAC until their ARP entries age out (an outside review)."""
    s = as_master()
    s, _ = hear(s, 10.0, priority=100)  # a worse MASTER: we announce (holdoff starts)
    s, acts = step(s, HeartbeatReceived(peer="b", role=Role.BACKUP, priority=100,
                                        healthy=True, interval_s=I, delayed=True), 10.2)
    assert s.role is Role.MASTER and kinds(acts) == ["AnnounceVip", "SendHeartbeat"]
    s, acts = hear(s, 10.2 + I, role=Role.BACKUP, priority=100)  # fresh: nothing more
    assert kinds(acts) == []


def test_a_lossy_backup_peer_gets_at_most_one_announce_per_holdoff() -> None:
    """A steady BACKUP whose heartbeats arrive with gaps just over master_down is "lost and
    back" each time: that is no yield, so the holdoff applies (an outside review counted 59
    bursts in 10 s when it did not)."""
    s = as_master()
    fast = 0.03
    gap = m.master_down_s(100, fast, 3) * 1.05
    announces, t = 0, 10.0
    while t < 20.0:
        s, acts = hear(s, t, role=Role.BACKUP, priority=100, interval_s=fast)
        s, _ = step(s, TimerExpired(), t + gap * 0.99)
        announces += kinds(acts).count("AnnounceVip")
        t += gap
    assert s.role is Role.MASTER
    assert announces <= 10 / P150.reannounce_holdoff_s + 1


def test_master_never_yields_to_a_delayed_heartbeat() -> None:
    """A link that comes back flushes heartbeats queued while it was down, the oldest
    saying MASTER: obeying one would leave the VIP unheld (seen in the e2e link-cut run)."""
    s = as_master()
    s, acts = step(s, HeartbeatReceived(peer="b", role=Role.MASTER, priority=200, healthy=True,
                                        interval_s=I, delayed=True), 10.0)
    assert s.role is Role.MASTER and "ReleaseVip" not in kinds(acts)
    s, acts = hear(s, 10.001, role=Role.FAULT)  # the fresh one right behind it
    assert s.role is Role.MASTER
    s, acts = hear(s, 11.0)  # a fresh better MASTER is obeyed at once
    assert s.role is Role.BACKUP and kinds(acts)[0] == "ReleaseVip"


@pytest.mark.parametrize("mine,theirs,i_win", [
    ("10.0.0.2", "10.0.0.1", True), ("10.0.0.1", "10.0.0.2", False),
    ("2001:db8::1", "10.0.0.9", True), (None, "10.0.0.1", False),
])
def test_priority_ties_go_to_the_higher_address(mine: str | None, theirs: str,
                                                i_win: bool) -> None:
    p = Params(name="a", priority=100, interval_s=I,
               address=ipaddress.ip_address(mine) if mine else None)
    s = as_master(p)
    s, _ = hear(s, 10.0, priority=100, address=theirs)
    assert (s.role is Role.MASTER) is i_win


def test_carrier_loss_releases_and_rejoin_is_backup_first() -> None:
    s = as_master()
    s, acts = step(s, FaultDetected("carrier:eth0"), 10.0)
    assert s.role is Role.FAULT and kinds(acts)[0] == "ReleaseVip"
    s, acts = step(s, TimerExpired(), 20.0)
    assert s.role is Role.FAULT and acts == []
    s, acts = step(s, FaultCleared("carrier:eth0"), 30.0)
    assert s.role is Role.BACKUP and AcquireVip() not in acts
    s, _ = step(s, TimerExpired(), 30.0 + P150.master_down_s - 1e-6)
    assert s.role is Role.BACKUP
    s, _ = step(s, TimerExpired(), 30.0 + P150.master_down_s)
    assert s.role is Role.MASTER


def test_no_healthy_backends_while_a_peer_has_some_is_fault() -> None:
    s = started(healthy=False)
    s, _ = hear(s, 0.5, role=Role.BACKUP, healthy=False)
    assert s.role is Role.BACKUP
    s, _ = hear(s, 1.0, role=Role.BACKUP, healthy=True)
    assert s.role is Role.FAULT and m.faults_of(s, 1.0) == {HEALTH_FAULT}
    s, _ = step(s, LocalHealthChanged(True), 2.0)
    assert s.role is Role.BACKUP


def test_unhealthy_node_never_takes_over_while_a_healthy_one_lives() -> None:
    # a is better by priority but has no healthy backends; c is healthy.
    s = started(healthy=False)
    t = 0.0
    while t < 20:
        s, _ = hear(s, t, peer="c", role=Role.BACKUP, priority=50, healthy=True)
        s, acts = step(s, TimerExpired(), t + 0.5)
        assert AcquireVip() not in acts
        t += 1.0


def test_if_nobody_is_healthy_a_master_is_still_elected() -> None:
    s = started(healthy=False)
    s, _ = hear(s, 0.5, role=Role.BACKUP, priority=100, healthy=False)
    s, _ = step(s, TimerExpired(), P150.master_down_s)
    assert s.role is Role.MASTER


def test_a_worse_backup_defers_to_a_better_live_backup() -> None:
    p = Params(name="c", priority=50, interval_s=I)
    s = started(p)
    s, _ = hear(s, 0.5, peer="b", role=Role.BACKUP, priority=100)
    s, _ = step(s, TimerExpired(), p.master_down_s)
    assert s.role is Role.BACKUP
    # When b falls silent too, c takes over.
    s, _ = step(s, TimerExpired(), 0.5 + p.master_down_s)
    assert s.role is Role.MASTER


def test_unhealthy_master_hands_over_to_a_healthy_peer_before_releasing() -> None:
    s = as_master(healthy=True)
    s, acts = hear(s, 10.0, role=Role.BACKUP, healthy=True)
    s, acts = step(s, LocalHealthChanged(False), 10.5)
    assert s.role is Role.MASTER  # still holds: nobody else does yet
    assert acts == [SendHeartbeat(m.Advert(Role.MASTER, 150, False, switchover=True))]
    s, acts = hear(s, 10.6, role=Role.MASTER, healthy=True)
    assert s.role is Role.FAULT and kinds(acts)[0] == "ReleaseVip"


def test_backup_takes_at_once_when_master_asks_for_switchover() -> None:
    s = started()
    s, _ = hear(s, 1.0, priority=200)
    s, acts = hear(s, 1.5, priority=200, switchover=True)
    assert s.role is Role.MASTER and kinds(acts) == ["AcquireVip", "SendHeartbeat", "RunHooks"]


def test_unhealthy_backup_does_not_take_a_switchover_from_a_healthy_master() -> None:
    s = started(healthy=False)
    s, _ = hear(s, 1.0, priority=200, switchover=True, healthy=True)
    assert s.role is Role.FAULT


def test_preempt_waits_for_delay_and_health() -> None:
    p = Params(name="a", priority=200, interval_s=I, preempt_delay_s=5.0)
    s = started(p, healthy=False)
    s, _ = hear(s, 1.0, priority=100, healthy=False)
    s, _ = step(s, TimerExpired(), 2.0)
    assert s.role is Role.BACKUP and s.preempt_since is None  # not healthy: no preempt
    s, _ = step(s, LocalHealthChanged(True), 3.0)
    assert s.preempt_since == 3.0
    s, _ = hear(s, 4.0, priority=100, healthy=False)
    s, _ = hear(s, 7.0, priority=100, healthy=False)
    assert m.next_deadline(s, 7.0) == pytest.approx(8.0)
    s, _ = hear(s, 7.9, priority=100, healthy=False)
    assert s.role is Role.BACKUP
    s, acts = step(s, TimerExpired(), 8.0)
    assert s.role is Role.MASTER and AcquireVip() in acts


def test_no_preempt_when_disabled() -> None:
    p = Params(name="a", priority=200, interval_s=I, preempt=False)
    s = started(p)
    for t in range(1, 30):
        s, _ = hear(s, float(t), priority=100)
    assert s.role is Role.BACKUP


def test_graceful_stop_alone_releases_at_once() -> None:
    s = as_master()
    s, acts = step(s, ShutdownRequested(), 10.0)
    assert s.role is Role.INIT
    assert kinds(acts) == ["ReleaseVip", "SendHeartbeat", "RunHooks"]
    assert acts[1] == SendHeartbeat(m.Advert(Role.INIT, 0, True, leaving=True))


def test_graceful_stop_holds_until_successor_is_master_or_timeout() -> None:
    s = as_master()
    s, _ = hear(s, 9.5, role=Role.BACKUP)
    s, acts = step(s, ShutdownRequested(), 10.0)
    assert s.role is Role.MASTER
    assert acts == [SendHeartbeat(m.Advert(Role.MASTER, 0, True, leaving=True))]
    s2, acts = hear(s, 10.01, role=Role.MASTER, priority=100)
    assert s2.role is Role.INIT and kinds(acts)[0] == "ReleaseVip"
    # Nobody answers: released at the leave timeout anyway.
    s3, _ = step(s, TimerExpired(), 10.0 + P150.leave_timeout_s)
    assert s3.role is Role.INIT


def test_switchover_request_is_cancellable() -> None:
    s = as_master()
    s, acts = step(s, SwitchoverRequested(), 10.0)
    assert acts == [SendHeartbeat(m.Advert(Role.MASTER, 150, True, switchover=True))]
    s, acts = step(s, SwitchoverCancelled(), 11.0)
    assert acts == [SendHeartbeat(m.Advert(Role.MASTER, 150, True))]


# -- properties -----------------------------------------------------------------------------

events = st.one_of(
    st.builds(HeartbeatReceived, peer=st.sampled_from(["b", "c"]),
              role=st.sampled_from(list(Role)), priority=st.integers(0, 255),
              healthy=st.booleans(), interval_s=st.sampled_from([0.5, 1.0]),
              address=st.none(), leaving=st.booleans(), switchover=st.booleans()),
    st.just(TimerExpired()),
    st.builds(FaultDetected, st.sampled_from(["carrier:eth0", "vip"])),
    st.builds(FaultCleared, st.sampled_from(["carrier:eth0", "vip"])),
    st.builds(LocalHealthChanged, st.booleans()),
    st.just(ShutdownRequested()), st.just(Started()), st.just(SwitchoverRequested()),
    st.just(SwitchoverCancelled()),
)


@settings(max_examples=400)
@given(st.integers(m.PRIORITY_MIN, m.PRIORITY_MAX), st.booleans(), st.lists(
    st.tuples(events, st.floats(0, 3, allow_nan=False)), max_size=60))
def test_vip_is_held_exactly_while_master(priority: int, preempt: bool,
                                          script: list[tuple[m.Event, float]]) -> None:
    s = initial_state(Params(name="a", priority=priority, interval_s=1.0, preempt=preempt))
    held, now = False, 0.0
    for event, dt in script:
        now += dt
        try:
            s2, acts = step(s, event, now)
        except IllegalEvent:
            assert type(event) in m.EVENT_ROLES
            continue
        for a in acts:
            if isinstance(a, AcquireVip):
                assert not held, "two AcquireVip without ReleaseVip"
                held = True
            elif isinstance(a, ReleaseVip):
                assert held, "ReleaseVip without AcquireVip"
                held = False
            elif isinstance(a, RunHooks):
                assert a.new in TRANSITIONS[a.old]
            elif isinstance(a, SendHeartbeat):
                assert a.advert.role is s2.role
        assert held is (s2.role is Role.MASTER)
        if s2.role is Role.FAULT:
            assert not held
        s = s2


@settings(max_examples=300)
@given(st.lists(st.tuples(events, st.floats(0, 3, allow_nan=False)), max_size=40),
       st.floats(0, 1, allow_nan=False))
def test_nothing_changes_before_next_deadline(script: list[tuple[m.Event, float]],
                                              frac: float) -> None:
    """The controller sleeps until next_deadline: no transition may be due earlier."""
    s, now = initial_state(Params(name="a", priority=120, interval_s=1.0)), 0.0
    for event, dt in script:
        now += dt
        try:
            s, _ = step(s, event, now)
        except IllegalEvent:
            continue
        # Settle anything due right now, as the controller's timer would.
        s, _ = step(s, TimerExpired(), now)
        deadline = m.next_deadline(s, now)
        horizon = deadline if deadline is not None else now + 100.0
        probe = now + (horizon - now) * frac * 0.999
        s2, _ = step(s, TimerExpired(), probe)
        assert s2.role is s.role, (s.role, s2.role, now, probe, deadline)


# -- a whole pair/trio in a pure simulation --------------------------------------------------


@dataclass
class Node:
    state: MachineState
    held: bool = False
    announces: int = 0
    up: bool = True
    acquired_at: list[float] = field(default_factory=list)


class Sim:
    """Several machines, a network with latency, heartbeats every interval; no asyncio."""

    def __init__(self, params: Sequence[Params], latency_s: float = 0.001) -> None:
        self.nodes = {p.name: Node(initial_state(p)) for p in params}
        self.latency_s = latency_s
        self.now = 0.0
        self._q: list[tuple[float, int, str, str, object]] = []
        self._n = itertools.count()
        self.blocked: set[tuple[str, str]] = set()
        self.client_on: str | None = None
        """Whose MAC a client on the segment uses: the last node that took or announced
        the VIP (a GARP moves it)."""

    def at(self, t: float, kind: str, name: str, payload: object = None) -> None:
        heapq.heappush(self._q, (t, next(self._n), kind, name, payload))

    def start(self, name: str, t: float, healthy: bool = True) -> None:
        self.at(t, "event", name, LocalHealthChanged(healthy))
        self.at(t, "event", name, Started())
        self.at(t, "send", name)

    def feed(self, name: str, event: m.Event) -> None:
        node = self.nodes[name]
        node.state, acts = step(node.state, event, self.now)
        for a in acts:
            if isinstance(a, AcquireVip):
                assert not node.held
                node.held = True
                node.acquired_at.append(self.now)
                self.client_on = name
            elif isinstance(a, ReleaseVip):
                assert node.held
                node.held = False
            elif isinstance(a, AnnounceVip):
                node.announces += 1
                self.client_on = name
            elif isinstance(a, SendHeartbeat):
                self.broadcast(name)
        d = m.next_deadline(node.state, self.now)
        if d is not None:
            self.at(d, "event", name, TimerExpired())

    def broadcast(self, name: str) -> None:
        adv = self.nodes[name].state.advertised
        if adv is None or (adv.role is Role.INIT and not adv.leaving):
            return
        p = self.nodes[name].state.params
        for other in self.nodes:
            if other != name and (name, other) not in self.blocked:
                self.at(self.now + self.latency_s, "event", other, HeartbeatReceived(
                    peer=name, role=adv.role, priority=adv.priority, healthy=adv.healthy,
                    interval_s=p.interval_s, address=p.address, leaving=adv.leaving,
                    switchover=adv.switchover))

    def run(self, until: float) -> None:
        while self._q and self._q[0][0] <= until:
            t, _, kind, name, payload = heapq.heappop(self._q)
            self.now = t
            node = self.nodes[name]
            if not node.up:
                continue
            if kind == "send":
                self.broadcast(name)
                self.at(t + node.state.params.interval_s, "send", name)
            else:
                assert isinstance(payload, m.Event.__args__)
                self.feed(name, payload)
        self.now = until

    def masters(self) -> list[str]:
        return sorted(n for n, x in self.nodes.items() if x.up and x.state.role is Role.MASTER)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 254), st.booleans(), st.floats(0, 0.5)),
                min_size=2, max_size=4), st.booleans())
def test_any_group_converges_to_the_best_single_master(
        nodes: list[tuple[int, bool, float]], preempt: bool) -> None:
    params = [Params(name=f"n{i}", priority=pr, interval_s=0.05, preempt=preempt)
              for i, (pr, _, _) in enumerate(nodes)]
    sim = Sim(params)
    for p, (_, healthy, t0) in zip(params, nodes, strict=True):
        sim.start(p.name, t0, healthy)
    sim.run(3.0)
    masters = sim.masters()
    assert len(masters) == 1
    assert [n for n, x in sim.nodes.items() if x.held] == masters
    best = max(sim.nodes.values(), key=lambda x: m.self_rank(x.state))
    if preempt and best.state.healthy:  # nobody preempts without healthy backends
        assert masters == [best.state.params.name]
    if any(h for _, h, _ in nodes):
        assert sim.nodes[masters[0]].state.healthy


def split_pair() -> Sim:
    """a (200) and b (100), 50 ms heartbeats: a MASTER after 1 s, then cut apart until
    2 s, so both are MASTER and the client follows b's takeover."""
    sim = Sim([Params(name="a", priority=200, interval_s=0.05),
               Params(name="b", priority=100, interval_s=0.05)])
    sim.start("a", 0.0)
    sim.start("b", 0.0)
    sim.run(1.0)
    assert sim.masters() == ["a"]
    sim.blocked = {("a", "b"), ("b", "a")}
    sim.run(2.0)
    assert sim.masters() == ["a", "b"] and sim.client_on == "b"
    return sim


def test_sim_partition_heal_converges_within_one_interval_and_winner_reannounces() -> None:
    sim = split_pair()
    sim.blocked = set()
    sim.run(2.0 + 0.05 + 2 * sim.latency_s)
    assert sim.masters() == ["a"]
    assert not sim.nodes["b"].held and sim.client_on == "a"


def test_sim_heal_the_loser_announcing_last_before_it_yields_does_not_keep_the_client() -> None:
    """The chaos run behind this test: a's link came back, b heard a (better) MASTER only
    1 s later (a's heartbeats queued behind ARP), and in between b announced on a's flushed
    stale heartbeats. a's answer to b's yield fell in its re-announce holdoff: the client
    stayed on b, which no longer held the VIP, until a's repeat burst 5 s later."""
    sim = split_pair()
    sim.blocked = {("a", "b")}  # b's heartbeats reach a: a announces, the client moves
    sim.run(2.3)
    assert sim.client_on == "a"
    sim.now = 2.3
    for role in (Role.FAULT, Role.BACKUP):  # a's queued past reaches b, flagged delayed
        sim.feed("b", HeartbeatReceived(peer="a", role=role, priority=200, healthy=True,
                                        interval_s=0.05, delayed=True))
    sim.client_on = "b"  # b announced on them (the run): a's answer must follow it
    sim.blocked = set()
    sim.run(2.3 + 0.05 + 3 * sim.latency_s)
    assert sim.masters() == ["a"] and not sim.nodes["b"].held
    assert sim.client_on == "a"


# -- import rules (docs/architecture.md) ------------------------------------------------------


def _imports(path: str) -> set[str]:
    import ast

    with open(path) as f:
        tree = ast.parse(f.read())
    out: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            out.add(n.module.split(".")[0])
    return out


@pytest.mark.parametrize("module", ["core.codec", "core.machine", "core.ports",
                                    "adapters.transport", "adapters.hooks", "controller"])
def test_failover_core_imports_nothing_of_lb_or_healthcheck(module: str) -> None:
    import importlib

    path = importlib.import_module(f"failover.{module}").__file__
    assert path is not None
    used = _imports(path)
    assert not used & {"lb", "healthcheck", "pyroute2", "prometheus_client"}, used
    if module.startswith("core."):  # pure: the caller passes `now`
        assert not used & {"asyncio", "socket", "time", "logging"}, used
