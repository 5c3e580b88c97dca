"""The control <-> failover process messages (lb.failoverd.link): every message survives the
channel exactly (through JSON, as lb.channel sends it), and what is not a message of this
version is refused rather than guessed at."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

import failover
from lb.failoverd import link

KEY = b"link-test-key-0123456789abcdef"


def spec(**over: Any) -> failover.FailoverSpec:
    base: dict[str, Any] = dict(
        node_name="lb1", interface="eth0", vips=("192.0.2.10/24", "2001:db8::10/64"),
        priority=150, peers=("192.0.2.3", "[2001:db8::3]:5405"), key=KEY, port=5405,
        bind="192.0.2.2", notify=("/bin/true",), config_digest=bytes(range(failover.DIGEST_LEN)),
    )
    base.update(over)
    return failover.FailoverSpec(**base)


def through_the_channel(msg: link.Message) -> link.Message:
    frame = json.loads(json.dumps(link.encode(msg)))
    return link.decode(frame)


def a_status() -> failover.FailoverStatus:
    """A status with every container filled: peers with paths, counters keyed by enums and
    by (Role, Role) pairs."""
    R = failover.Role
    st = link.placeholder_status(spec())
    peer_fields = {f.name for f in dataclasses.fields(failover.PeerStatus)}
    peer_kw: dict[str, Any] = dict(
        name="lb2", role=R.BACKUP, priority=100, alive=True, last_heard_age_s=0.012,
        paths=(failover.PathStatus("192.0.2.3", 0.012),), healthy=True, healthy_count=3,
        total_count=3, config_digest_match=True, leaving=False, switchover=False)
    peer = failover.PeerStatus(**{k: v for k, v in peer_kw.items() if k in peer_fields})
    counters = failover.FailoverCounters(
        heartbeats_sent=10, heartbeats_received=9,
        rejected={failover.RejectReason.BAD_MAC: 2, failover.RejectReason.REPLAYED: 1},
        transitions={(R.INIT, R.BACKUP): 1, (R.BACKUP, R.MASTER): 1}, late_sends=1)
    more: dict[str, Any] = {}
    status_fields = {f.name for f in dataclasses.fields(failover.FailoverStatus)}
    if "keys" in status_fields:
        more["keys"] = (failover.KeyStatus("0123abcd", True, 7),
                        failover.KeyStatus("89abcdef", False, 0))
    if "gateway" in status_fields:
        from failover.adapters.track import GatewayStatus, TargetStatus

        more["gateway"] = GatewayStatus(
            up=None, targets=(TargetStatus("192.0.2.1:80", None, "", None, 0, 0),
                              TargetStatus("arp:192.0.2.1", True, "ok", 0.001, 3, 1)),
            interval_s=0.5, timeout_s=0.5, fall=3, rise=2, transitions=1)
    return dataclasses.replace(
        st, role=R.MASTER, role_reason="highest priority", role_since=1.7e9, faults=("x",),
        vip_holding=True, peers=(peer,), counters=counters,
        send_lag=failover.SendLag(100, 0.0001, 0.002, 0.004), handover_forwarding_to=None,
        **more)


def test_every_message_round_trips_through_json() -> None:
    msgs: list[link.Message] = [
        link.Spec(3, spec(), handover_ports=(80, 443), track_interfaces=("eth1",),
                  sched_priority=10, nice=-5, oom_score_adj=-500),
        link.LocalHealth(True, 2, 3), link.Switchover(), link.CancelSwitchover(),
        link.Stop("fast"), link.CloseHandover(), link.Hello(42), link.Started(),
        link.StartFailed("no interface"), link.RoleChanged("backup", "master", "peer dead"),
        link.Status(a_status(), link.HeartbeatGaps(10, 0.031, 0.035), 0.2),
        link.Event("failover", "text"), link.Stopped(),
    ]
    assert {type(m) for m in msgs} == set(link._CODEC.types.values()), "a message type is untested"
    for msg in msgs:
        assert through_the_channel(msg) == msg, msg


def test_the_spec_keeps_its_bytes_and_tuples() -> None:
    s = through_the_channel(link.Spec(1, spec()))
    assert isinstance(s, link.Spec)
    assert s.failover.key == KEY and isinstance(s.failover.vips, tuple)
    assert s.failover == spec()


def test_the_status_keeps_enum_and_pair_keys() -> None:
    st = through_the_channel(link.Status(a_status()))
    assert isinstance(st, link.Status)
    c = st.status.counters
    assert c.rejected == {failover.RejectReason.BAD_MAC: 2, failover.RejectReason.REPLAYED: 1}
    assert (failover.Role.BACKUP, failover.Role.MASTER) in c.transitions
    assert st.status.peers[0].role is failover.Role.BACKUP
    assert st.status == a_status()


@pytest.mark.parametrize("frame,why", [
    ({"t": "health", "v": link.VERSION + 1, "healthy": True, "healthy_count": 1, "total": 1},
     "version"),
    ({"t": "health", "healthy": True, "healthy_count": 1, "total": 1}, "version"),
    ({"t": "nope", "v": link.VERSION}, "unknown"),
    ({"t": "health", "v": link.VERSION, "healthy": "yes", "healthy_count": 1, "total": 1},
     "bool"),
    ({"t": "health", "v": link.VERSION, "healthy": True, "total": 1}, "healthy_count"),
    ({"t": "stop", "v": link.VERSION, "mode": "later"}, "later"),
])
def test_what_is_not_a_message_of_this_version_is_refused(frame: dict[str, Any],
                                                          why: str) -> None:
    with pytest.raises(link.LinkError, match=why):
        link.decode(frame)


def test_unknown_fields_are_ignored_and_missing_ones_take_their_default() -> None:
    frame = link.encode(link.Spec(1, spec()))
    frame["from_a_newer_minor"] = 1
    del frame["nice"]
    decoded = link.decode(frame)
    assert isinstance(decoded, link.Spec) and decoded.nice == link.Spec.nice


def test_restart_only_changes_name_what_a_reload_cannot_apply() -> None:
    a = link.Spec(1, spec(), handover_ports=(80,))
    assert a.restart_only_changes(dataclasses.replace(a, generation=2, log_level="debug")) == []
    b = dataclasses.replace(a, handover_ports=(80, 443), nice=-5)
    assert a.restart_only_changes(b) == ["handover_ports", "nice"]
