"""The partition guard through real `pairlb run` processes (issue 12).

tests/test_partition_guard.py drives FailoverControllers directly; this runs the whole chain
as deployed: `[failover] track_gateway` in the config file, the control process, the
failover process (which probes with the capabilities it keeps: ARP needs CAP_NET_RAW), the
status it reports back, /status and the client's view. The rig is lab/pair_rig.py's
(client, lb1, lb2, three backends, a client sending a request to the VIP every 10 ms).

The fault: lb1, the MASTER, loses the client side of the network (frames between its
bridge port and the client's dropped, carrier up), while it still hears lb2 and reaches its
backends. Nothing in plain VRRP notices: lb2 hears a healthy MASTER, and the clients get
nothing for as long as the cut lasts. With the client side's anchor (here the client host
itself, by ARP and a closed TCP port) tracked, lb1 goes to FAULT and lb2 takes over.
"""

from __future__ import annotations

import dataclasses
import subprocess
import time
from collections.abc import Iterator

import pytest

from lab import netns
from lab import pair_rig as fe

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(netns.skip_reason() is not None, reason=netns.skip_reason() or ""),
    pytest.mark.timeout(150),
]

TRACK_INTERVAL_S = 0.1
TRACK_FALL = 2


@dataclasses.dataclass(frozen=True)
class GuardSettings(fe.PairSettings):
    track: bool = True


class GuardRig(fe.Rig):
    def config_text(self, node: str, settings: fe.PairSettings) -> str:
        text = super().config_text(node, settings)
        if not getattr(settings, "track", False):
            return text
        anchor = self.addr["client"]
        lines = (f'track_gateway = ["arp:{anchor}", "{anchor}:9"]\n'
                 f"track_gateway_interval_s = {TRACK_INTERVAL_S}\n"
                 f"track_gateway_timeout_s = {TRACK_INTERVAL_S}\n"
                 f"track_gateway_fall = {TRACK_FALL}\n")
        head, sep, tail = text.partition("\n[admin]")
        assert sep, "the rig's config has no [admin] section"
        return head + "\n" + lines + sep + tail


def cut_client_side(rig: fe.Rig, node: str, on: bool) -> None:
    ports = (rig.topo[node].port, rig.topo["client"].port)
    script = "table bridge plbcut {}\ndelete table bridge plbcut\n"
    if on:
        script += ("table bridge plbcut {\n  chain forward {\n"
                   "    type filter hook forward priority 0; policy accept;\n"
                   f'    iifname "{ports[0]}" oifname "{ports[1]}" drop\n'
                   f'    iifname "{ports[1]}" oifname "{ports[0]}" drop\n  }}\n}}\n')
    res = subprocess.run(["ip", "netns", "exec", rig.topo.bridge_netns, "nft", "-f", "-"],
                         input=script, text=True, capture_output=True, timeout=10)
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def rig() -> Iterator[fe.Rig]:
    with GuardRig() as r:
        yield r


def test_a_master_cut_off_from_its_clients_keeps_the_vip_without_the_guard(rig: fe.Rig
                                                                            ) -> None:
    """The control experiment: no guard, the same cut. lb1 stays MASTER, nobody is served."""
    rig.steady(GuardSettings(track=False))
    t0 = time.monotonic()
    cut_client_side(rig, "lb1", True)
    try:
        time.sleep(2.0)
        served = [a for a in rig.attempts(t0 + 0.5) if a.ok]
        assert rig.role("lb1") == "MASTER" and rig.role("lb2") == "BACKUP"
        assert served == [], served[:3]
    finally:
        cut_client_side(rig, "lb1", False)
    print(f"\nwithout the guard: lb1 kept the VIP; 0 of "
          f"{len(rig.attempts(t0 + 0.5, t0 + 2.0))} requests answered in 1.5 s")


def test_the_guard_moves_the_vip_to_the_node_clients_can_reach(rig: fe.Rig) -> None:
    settings = GuardSettings(track=True)
    rig.steady(settings)
    gw = rig.failover("lb1")["gateway"]
    assert gw["up"] is True and {t["detail"] for t in gw["targets"]} == {"reply", "refused"}
    t0 = time.monotonic()
    cut_client_side(rig, "lb1", True)
    try:
        rig.wait_role("lb1", "FAULT", 5.0)
        t_served = rig.wait_for("the client served by lb2", lambda: rig.served_by("lb2", t0),
                                5.0, poll_s=0.01)
        first = min(a.t1 for a in rig.attempts(t0) if a.ok and a.node == "lb2")
        fo = rig.failover("lb1")
        assert fo["faults"] == ["gateway"] and fo["vip_held"] is False
        assert rig.failover("lb2")["role"] == "MASTER"
        time.sleep(1.0)
        assert rig.watch.holding() == {"lb2"}
        overlap = sum(e - s for s, e in rig.watch.overlaps(t0, time.monotonic()))
        failed = [a for a in rig.attempts(t0, first) if not a.ok]
        assert overlap == 0.0  # lb1 released before lb2 took it: it heard lb1 say FAULT
        # The guard decides within fall rounds (+ one timeout); scheduling slack on top.
        bound = TRACK_FALL * TRACK_INTERVAL_S + TRACK_INTERVAL_S + 0.4
        assert first - t0 <= bound, (first - t0, bound)
        print(f"\nwith the guard: lb1 FAULT, client served by lb2 {first - t0:.3f} s after "
              f"the cut ({len(failed)} requests failed meanwhile), no overlap; "
              f"seen at {t_served - t0:.3f} s")
    finally:
        cut_client_side(rig, "lb1", False)
    t_heal = time.monotonic()
    rig.wait_for("lb1 MASTER again", lambda: rig.watch.holding() == {"lb1"}, 5.0)
    print(f"repaired: lb1 holds the VIP again {time.monotonic() - t_heal:.3f} s later")
