"""Failover with real hosts (issue 4): two pairlb processes in namespaces, a client that sends
a request to the VIP every 10 ms, and the kernel's own record of who holds the VIP.

Each test runs one scenario once and asserts the issue's target for it; bench/takeover.py runs
the same scenarios many times and prints the table. The harness is lab/pair_rig.py.
Needs root (namespaces); skipped otherwise. The whole module takes about a minute and a half
(longer when a blackhole is being measured: up to pair_rig.BLACKHOLE_LIMIT_S).
"""

from __future__ import annotations

import signal
import socket
import statistics
from collections.abc import Iterator

import pytest

from lab import netns
from lab import pair_rig as fe

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(netns.skip_reason() is not None, reason=netns.skip_reason() or ""),
    pytest.mark.timeout(90),
]

TAKEOVER_DEFAULT_S = 0.15
"""Issue 4: median outage after kill -9, link cut or a hung node, default settings."""
TAKEOVER_FAST_S = 0.05
"""Issue 4: the fastest documented setting (interval 10 ms)."""
FAST_RUNS = 5
"""Runs of each fault whose median is held to TAKEOVER_FAST_S."""
HTTP_5XX = ("http500", "http502", "http503", "http504")


@pytest.fixture(scope="module")
def rig() -> Iterator[fe.Rig]:
    with fe.Rig() as r:
        r.steady(fe.DEFAULT)
        yield r


def evidence(rig: fe.Rig, outs: list[fe.Outcome]) -> str:
    """Everything needed to diagnose a miss: measurements, failures, VIP events, logs."""
    lines = []
    for o in outs:
        lines += [o.describe(), f"  failed (start vs fault s, duration s, error): "
                                f"{o.failures[:20]}", f"  VIP events (s, node, held): "
                                                      f"{o.vip_events[:20]}"]
    for node in fe.LBS:
        lines.append(f"== {node} log ==\n{rig.log_tail(node, 25)}")
    return "\n".join(lines)


def no_5xx(out: fe.Outcome) -> bool:
    return not any(e in out.errors for e in HTTP_5XX)


def test_kill9_whole_node_stale_vip_and_failback(rig: fe.Rig) -> None:
    rig.steady(fe.DEFAULT)
    kill, back = fe.kill9(rig)
    why = evidence(rig, [kill, back])
    # The standby serves within the target; the dead node's kernel still has the VIP.
    assert kill.takeover_s is not None, why
    assert kill.extra["stale_vip_left"], why
    # Restart: the stale VIP goes before the node joins as BACKUP, and it takes the VIP back
    # (preempt) only with healthy backends: no 5xx, at most the in-flight connections of the
    # instant the VIP moves.
    assert back.extra["stale_vip_before_start"], why
    assert back.extra["stale_vip_removed_s"] is not None, why
    assert back.extra["joined_backup_s"] is not None, why
    assert back.extra["stale_vip_removed_s"] <= back.extra["joined_backup_s"] + 0.005, why
    assert "INIT->MASTER" not in back.extra["lb1_transitions"], why
    assert back.extra["masters"] == ["lb1"], why
    assert no_5xx(back), why
    assert back.failed <= 2, why
    assert kill.takeover_s <= TAKEOVER_DEFAULT_S, why


def test_hung_node_sigstop_then_sigcont(rig: fe.Rig) -> None:
    rig.steady(fe.DEFAULT)
    hung, woke = fe.sigstop(rig)
    why = evidence(rig, [hung, woke])
    assert hung.takeover_s is not None, why
    # Woken up: one VIP holder again within one interval, and the client keeps being served.
    assert woke.converge_s is not None and woke.converge_s <= rig.settings.interval_s, why
    assert len(woke.extra["holder_after"]) == 1, why
    assert woke.max_gap_s <= 0.1, why
    assert hung.takeover_s <= TAKEOVER_DEFAULT_S, why


def test_link_cut_fault_then_failback(rig: fe.Rig) -> None:
    rig.steady(fe.DEFAULT)
    cut, back = fe.link_cut(rig)
    why = evidence(rig, [cut, back])
    assert cut.takeover_s is not None, why
    assert cut.extra["lb1_role_during_cut"] == "FAULT", why
    assert cut.overlap_s == 0.0, why  # FAULT released the VIP before the peer took it
    # Link back: BACKUP first, then failback once checks pass; the VIP is never orphaned.
    assert "FAULT->MASTER" not in back.extra["lb1_transitions"], why
    assert back.unheld_s == 0.0, why
    assert no_5xx(back), why
    assert back.failed <= 2, why
    assert cut.takeover_s <= TAKEOVER_DEFAULT_S, why


def test_graceful_stop_loses_nothing(rig: fe.Rig) -> None:
    rig.steady(fe.DEFAULT)
    (out,) = fe.graceful_stop(rig)
    why = evidence(rig, [out])
    assert out.takeover_s is not None, why
    assert out.extra["lb1_exit"] == 0, why
    assert out.unheld_s == 0.0, why  # make-before-break
    assert out.failed == 0, why  # in-flight and half-open connections: failover.adapters.handover


def test_planned_switchover_loses_nothing(rig: fe.Rig) -> None:
    rig.steady(fe.DEFAULT)
    there, back = fe.switchover(rig)
    why = evidence(rig, [there, back])
    for out in (there, back):
        assert out.takeover_s is not None, why
        assert out.extra["old_role_after"] == "BACKUP", why
        assert out.unheld_s == 0.0, why
        assert out.failed == 0, why


def _get_on(sock: socket.socket, host: str) -> tuple[int, str, bool]:
    """GET / on an open connection: (status, X-Peer, server said Connection: close)."""
    sock.settimeout(2.0)
    sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower().split("\r\n")
    fields = dict(line.split(":", 1) for line in head[1:] if ":" in line)
    return (int(head[0].split()[1]), fields.get("x-peer", "-").strip(),
            fields.get("connection", "").strip() == "close")


def test_connections_open_at_a_switchover_are_finished_by_the_old_holder(rig: fe.Rig) -> None:
    """The handshake race made deterministic: connections accepted by lb1, their request
    sent only after the client moved to lb2's MAC. lb2 passes their packets to lb1
    (failover.adapters.handover), lb1 answers from the VIP it no longer holds and closes them; a new
    connection is served by lb2. Without the handover each would be reset by lb2."""
    rig.steady(fe.DEFAULT)
    vip = rig.vip

    def connect() -> list[socket.socket]:
        return [socket.create_connection((vip, fe.HTTP_PORT), 2.0) for _ in range(3)]

    socks = rig.topo.call("client", connect)
    try:
        t_fault = rig.signal_control("lb1", signal.SIGUSR1)
        rig.wait_role("lb2", "MASTER", 5.0)
        fe.settle(rig, "lb2", t_fault)
        answers = [_get_on(s, vip) for s in socks]
        assert answers == [(200, rig.addr["lb1"], True)] * 3, answers
        (fresh,) = rig.topo.call("client", lambda: connect()[:1])
        with fresh:
            assert _get_on(fresh, vip)[:2] == (200, rig.addr["lb2"])
    finally:
        for s in socks:
            s.close()
    log = rig.log_tail("lb2", 400)
    assert "handover_forwarding" in log, log


def test_partition_then_heal_no_blackhole(rig: fe.Rig) -> None:
    rig.steady(fe.DEFAULT)
    split, healed = fe.partition_heal(rig)
    why = evidence(rig, [split, healed])
    assert split.overlap_s > 0, why  # both MASTER while they cannot hear each other
    assert healed.extra["winner"] == "lb1", why
    assert healed.converge_s is not None and healed.converge_s <= 0.5, why
    assert healed.failed == 0, why  # 0 s of blackhole after healing, no connection reset


def test_no_takeover_without_healthy_backends(rig: fe.Rig) -> None:
    rig.steady(fe.DEFAULT)
    held, back = fe.unhealthy_no_takeover(rig)
    why = evidence(rig, [held, back])
    assert "MASTER" not in held.extra["lb1_roles_seen"], why
    assert not held.extra["vip_on_lb1"], why
    assert held.failed == 0, why
    # Once its checks pass it preempts, and no client sees a 5xx.
    assert back.takeover_s is not None, why
    assert no_5xx(back), why
    assert back.failed <= 2, why


def test_bad_heartbeats_are_counted_and_change_nothing(rig: fe.Rig) -> None:
    rig.steady(fe.DEFAULT)
    (out,) = fe.bad_heartbeats(rig)
    why = evidence(rig, [out])
    sent, got = out.extra["sent"], out.extra["rejected_delta"]
    for reason, n in sent.items():
        assert got.get(reason) == n, why
    assert out.extra["roles"] == ("MASTER", "BACKUP"), why
    assert not out.extra["transitions_changed"], why
    assert out.extra["holders"] == ["lb1"], why
    assert out.extra["lb2_seen_by_lb1"] == [("lb2", "BACKUP", 100)], why
    assert out.failed == 0, why


def test_failback_with_preempt_off_keeps_the_new_master(rig: fe.Rig) -> None:
    (out,) = fe.failback_preempt_off(rig)
    why = evidence(rig, [out])
    assert out.extra["stale_vip_removed_s"] is not None, why
    assert "BACKUP->MASTER" not in out.extra["lb1_transitions"], why
    assert out.extra["masters"] == ["lb2"], why
    assert out.failed == 0, why


def test_fast_setting_kill9_and_link_cut(rig: fe.Rig) -> None:
    """The target is a median: five runs of each. One run is too noisy at 10 ms, and the
    link cut's median sits just under the target (48 ms, runs 43-51 in docs/operations.md;
    master_down alone is 36 ms), so three runs put the median over it once in a while (a
    full suite saw 50.1 ms from 44.8, 50.1 and 52.2)."""
    rig.steady(fe.FAST)
    kills, cuts, backs = [], [], []
    for _ in range(FAST_RUNS):
        kills.append(fe.kill9(rig)[0])
        cut, back = fe.link_cut(rig)
        cuts.append(cut)
        backs.append(back)
    why = evidence(rig, [*kills, *cuts, *backs])
    kill_s = [o.takeover_s for o in kills if o.takeover_s is not None]
    cut_s = [o.takeover_s for o in cuts if o.takeover_s is not None]
    assert len(kill_s) == FAST_RUNS and len(cut_s) == FAST_RUNS, why
    assert all(b.unheld_s == 0.0 for b in backs), why
    assert statistics.median(kill_s) <= TAKEOVER_FAST_S, why
    assert statistics.median(cut_s) <= TAKEOVER_FAST_S, why


# -- the failover process (issue 12) ----------------------------------------------------------


def test_kill9_of_the_failover_process_peer_takes_over_and_the_restart_resumes(
        rig: fe.Rig) -> None:
    """Only the MASTER's failover process dies: the peer takes the VIP within the target,
    and the control process removes the one the dead process left once the peer could have
    (never after more than a peer's longest master_down); it restarts the process, the new
    one joins and preempts make-before-break. After that recovery the two nodes never hold
    the VIP together for longer than one interval."""
    rig.steady(fe.DEFAULT)
    out, back = fe.kill9_failover_process(rig)
    why = evidence(rig, [out, back])
    x = out.extra
    assert out.takeover_s is not None and out.takeover_s <= TAKEOVER_DEFAULT_S, why
    assert x["new_pid"] != x["old_pid"], why
    assert x["process"]["crashes"] == 1 and x["process"]["restarts"] == 1, why
    assert x["stale_vip_removed_s"] is not None, why
    # By the control process, once the peer had its longest master_down to take over:
    # long before the new process could (it imports for ~0.3 s first).
    release_s = (rig.settings.down_after + 1) * rig.settings.interval_s
    assert x["stale_vip_removed_s"] <= release_s + 0.15, why
    assert x["longest_overlap_before_recovery_s"] <= release_s, why
    assert out.failed <= 3, why  # its workers served on until the peer's ARP
    assert back.extra["masters"] == ["lb1"], why
    assert back.extra["longest_overlap_after_recovery_s"] <= rig.settings.interval_s, why
    assert no_5xx(back) and back.failed <= 2, why
    assert "event=failover_process_died" in rig.log_text("lb1"), why
    assert "event=failover_vips_released_after_crash" in rig.log_text("lb1"), why


def test_a_hung_failover_process_is_replaced(rig: fe.Rig) -> None:
    """SIGSTOP of the MASTER's failover process alone: the peer takes over at once; the
    control process kills the silent process after worker_ping_timeout_s (5 s) and the new
    one takes the VIP back, never held by both for longer than one interval after that."""
    rig.steady(fe.DEFAULT)
    out, back = fe.failover_hung(rig)
    why = evidence(rig, [out, back])
    assert out.takeover_s is not None and out.takeover_s <= TAKEOVER_DEFAULT_S, why
    assert out.extra["killed_after_s"] is not None, why
    assert 4.5 <= out.extra["killed_after_s"] <= 8.0, why
    assert out.extra["process"]["hung_kills"] == 1, why
    assert back.extra["longest_overlap_after_recovery_s"] <= rig.settings.interval_s, why
    assert rig.role("lb1") == "MASTER" and no_5xx(back) and back.failed <= 2, why


def test_kill9_of_the_control_process_the_vip_moves_and_nothing_is_left(rig: fe.Rig) -> None:
    """The control process dies: its failover process sees the channel close, hands the VIP
    to the peer (priority 0) and exits; no process of the node keeps the VIP."""
    rig.steady(fe.DEFAULT)
    (out,) = fe.kill9_control(rig)
    why = evidence(rig, [out])
    x = out.extra
    assert out.takeover_s is not None and out.takeover_s <= TAKEOVER_DEFAULT_S, why
    assert x["left_gracefully"], why
    assert x["vip_released_s"] is not None and not x["vip_on_lb1"], why
    assert x["failover_exit_s"] <= 5.0, why
    # The workers stop accepting as soon as their channel closes: new connections are
    # refused on lb1 until the peer's ARP (one every 10 ms, for the ~0.06 s it takes).
    assert out.failed <= 10, why


def test_a_stalled_control_process_delays_no_heartbeat(rig: fe.Rig) -> None:
    """SIGSTOP the MASTER's control process for 2 s (what a long /metrics render or reload
    used to be): the heartbeats come from the failover process, so the peer's NIC sees no
    gap near master_down, nothing moves, and the workers serve on."""
    rig.steady(fe.DEFAULT)
    (out,) = fe.control_stall(rig, 2.0)
    why = evidence(rig, [out])
    x = out.extra
    assert not x["transitions_changed"] and x["holders"] == ["lb1"], why
    assert x["vip_events"] == 0 and out.failed == 0, why
    assert x["longest_heartbeat_gap_on_the_wire_s"] < x["master_down_s"] * 0.75, why


def test_a_reload_that_changes_nothing_moves_nothing(rig: fe.Rig) -> None:
    """(Before the two tests below: they restart the pair with a 1 s control_timeout_s,
    and this one would restart it again with the default settings.)"""
    rig.steady(fe.DEFAULT)
    (out,) = fe.reload_unchanged(rig)
    why = evidence(rig, [out])
    assert not out.extra["transitions_changed"] and out.extra["holders"] == ["lb1"], why
    assert not out.extra["pending_logged"] and out.failed == 0, why


def test_a_wedged_control_process_gives_the_vip_away(rig: fe.Rig) -> None:
    """Silent past control_timeout_s (1 s here): the failover process counts its node as
    unhealthy, the healthy peer takes over; when it runs again, failback."""
    (out, back) = fe.control_wedged(rig, 1.0)
    why = evidence(rig, [out, back])
    assert out.extra["control_fault_s"] is not None, why
    # Silence counts from the control process's last message (a keepalive every 0.2 s here),
    # so a control process starved by other load just before the stop faults a bit sooner.
    assert 0.25 <= out.extra["control_fault_s"] <= 2.0, why
    assert out.takeover_s is not None and out.takeover_s <= 2.5, why
    assert out.failed <= 10, why
    assert "FAULT->BACKUP" in back.extra["lb1_transitions"], why
    assert rig.role("lb1") == "MASTER" and no_5xx(back) and back.failed <= 2, why


def test_both_control_processes_wedged_the_best_node_keeps_the_vip(rig: fe.Rig) -> None:
    """Both silent past control_timeout_s (an outside review: both went FAULT and neither
    held the VIP for 3.3 s). Both now count as unhealthy; with no healthy peer the best
    keeps the VIP, and nothing moves."""
    (out,) = fe.control_wedged_both(rig, 1.0, 2.5)
    why = evidence(rig, [out])
    x = out.extra
    assert x["silent_logged"] == ["lb1", "lb2"], why
    assert x["unheld_s"] == 0 and x["holders"] == ["lb1"], why
    assert out.failed == 0, why


# -- last: it tears down the pair every test above used ------------------------------------------


def test_rig_leaves_nothing_behind(rig: fe.Rig) -> None:
    """Teardown removes every namespace and process even after SIGSTOP (SIGCONT first).

    The module's own pair, after every scenario above and its restarts (not a second pair
    built for this): last in the module, as it closes it; the fixture's close after it
    finds nothing left to do."""
    prefix = rig.topo.prefix
    try:
        rig.steady(rig.settings)
        rig.signal_node("lb2", signal.SIGSTOP)
    finally:
        rig.close()
    assert netns.list_namespaces(prefix + "-") == []
