"""The partition guard (failover.track_gateway, issue 12): a node that cannot reach its
gateway must not hold the VIP.

Rings: the target syntax and the fall/rise table (pure); the TCP probe on loopback (open,
refused and silent ports); then real namespaces: lb1, lb2, a gateway host `gw` and a client
on one bridge, two real FailoverControllers with the real VIP adapter, the kernel's
rtnetlink events as the record of who held the VIP, and cuts made in the bridge with nft
(frames between two ports dropped, ARP included). The heartbeats have two paths, the bridge
and a route through `gw` (docs/operations.md, "Partitions"), so:

- lb1 cut from lb2 only: the heartbeats go round through the gateway; exactly one holder,
  as before the cut. (Without the second path both become MASTER: the guard cannot tell
  which one clients reach, and the control experiment shows it.)
- lb1 cut from the gateway only: lb1 goes to FAULT and releases; lb2, hearing that, takes
  over at once: never two holders.
- lb1 cut from lb2 and the gateway (it still reaches the client, link up): lb2 takes over
  after master_down; lb1 holds the VIP too only until its guard's fall rounds have passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from failover import (
    FailoverController,
    FailoverSpec,
    GatewayTracker,
    Role,
    parse_target,
)
from failover.adapters.track import ArpProber, tcp_probe
from lab import netns

KEY = b"partition-guard-test-key-0123456789"


# -- targets and the fall/rise rule ------------------------------------------------------------


@pytest.mark.parametrize("text,want", [
    ("192.0.2.1:22", "tcp:192.0.2.1:22"),
    ("tcp:192.0.2.1:22", "tcp:192.0.2.1:22"),
    ("[2001:db8::1]:443", "tcp:[2001:db8::1]:443"),
    ("tcp:[2001:db8::1]:443", "tcp:[2001:db8::1]:443"),
    (" arp:192.0.2.1 ", "arp:192.0.2.1"),
])
def test_target_syntax(text: str, want: str) -> None:
    assert str(parse_target(text)) == want


@pytest.mark.parametrize("text", ["192.0.2.1", "gw.example:22", "192.0.2.1:0", "192.0.2.1:x",
                                  "arp:2001:db8::1", "arp:gw", "[2001:db8::1]", "2001:db8::1:22",
                                  "tcp:", ""])
def test_bad_targets_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_target(text)


def test_fall_rise_and_the_first_answer() -> None:
    seen: list[bool] = []
    t = GatewayTracker(["192.0.2.1:22"], interface="eth0", fall=3, rise=2,
                       on_change=seen.append)
    assert t.up is None
    for _ in range(2):
        t.record(False)
    assert t.up is None and seen == []  # unknown: the node is in FAULT already
    t.record(True)
    assert t.up is True and seen == [True]  # one answer after start-up is enough
    for reachable in (False, False, True, False, False):  # a blip resets the streak
        t.record(reachable)
    assert t.up is True
    t.record(False)
    assert t.up is False and seen == [True, False]
    t.record(True)
    t.record(False)
    t.record(True)
    assert t.up is False  # rise counts answers in a row
    t.record(True)
    assert t.up is True and seen == [True, False, True] and t.transitions == 2
    never: list[bool] = []
    u = GatewayTracker(["arp:192.0.2.1"], interface="eth0", fall=2, on_change=never.append)
    u.record(False)
    u.record(False)
    assert u.up is False and never == [False]  # a verdict for the status page too


# -- the TCP probe on loopback -----------------------------------------------------------------


@pytest.mark.timeout(20)
def test_tcp_probe_open_refused_and_silent() -> None:
    async def scenario() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        open_port = listener.getsockname()[1]
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))  # bound, never listening: the kernel answers RST
        closed_port = closed.getsockname()[1]
        # A full accept queue drops SYNs without a word: what a silent firewall does.
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        full_port = full.getsockname()[1]
        fillers = []
        for _ in range(3):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", full_port))
            fillers.append(s)
        await asyncio.sleep(0.1)
        try:
            r_open = await tcp_probe("127.0.0.1", open_port, 1.0)
            r_refused = await tcp_probe("127.0.0.1", closed_port, 1.0)
            t0 = time.monotonic()
            r_silent = await tcp_probe("127.0.0.1", full_port, 0.3)
            silent_s = time.monotonic() - t0
        finally:
            for s in (listener, closed, full, *fillers):
                s.close()
        assert (r_open.ok, r_open.detail) == (True, "open") and r_open.rtt_s is not None
        assert (r_refused.ok, r_refused.detail) == (True, "refused")  # an RST is an answer
        assert (r_silent.ok, r_silent.detail) == (False, "timeout")
        assert 0.3 <= silent_s < 0.6

    asyncio.run(scenario())


def test_the_daemon_builds_the_guard_and_the_key_list_from_the_config(tmp_path: Path) -> None:
    import failover
    from lb import config as config_mod
    from lb.control.daemon import failover_spec

    old, new = tmp_path / "old.key", tmp_path / "new.key"
    k_old, k_new = failover.write_key_file(str(old)), failover.write_key_file(str(new))
    def node(failover_lines: str) -> config_mod.Config:
        return config_mod.loads(f"""
[node]
name = "lb1"
[[listener]]
name = "web"
bind = "127.0.0.1:8080"
pool = "web"
[[pool]]
name = "web"
backends = [{{ name = "a", address = "127.0.0.1:9001" }}]
[failover]
interface = "eth0"
vips = ["192.0.2.100/24"]
peers = ["192.0.2.12"]
{failover_lines}""")

    cfg = node(f"""key_files = ["{new}", "{old}"]
max_clock_skew_s = 90
track_gateway = "arp:192.0.2.1"
track_gateway_interval_s = 0.2
track_gateway_fall = 4
""")
    spec = failover_spec(cfg)
    assert spec.keys == (k_new, k_old) and spec.key == k_new
    assert spec.max_clock_skew_s == 90.0
    assert spec.track_gateway == ("arp:192.0.2.1",)
    assert (spec.track_gateway_interval_s, spec.track_gateway_fall) == (0.2, 4)
    # A wildcard bind is no tie-break address (it was passed as one: every node sent 0.0.0.0)
    wild = node(f'key_file = "{new}"\nbind = "0.0.0.0"\n')
    assert failover_spec(wild).tiebreak_address is None
    with pytest.raises(config_mod.ConfigError, match="is not one of key_files"):
        config_mod.loads(cfg_text_with_both(str(old), str(new)))
    both = config_mod.loads(cfg_text_with_both(str(old), f'{new}", "{old}'))
    assert both.failover is not None and both.failover.key_paths == (str(new), str(old))


def cfg_text_with_both(a: str, b: str) -> str:
    return f"""
[node]
name = "lb1"
[[listener]]
name = "web"
bind = "127.0.0.1:8080"
pool = "web"
[[pool]]
name = "web"
backends = [{{ name = "a", address = "127.0.0.1:9001" }}]
[failover]
interface = "eth0"
vips = ["192.0.2.100/24"]
peers = ["192.0.2.12"]
key_file = "{a}"
key_files = ["{b}"]
"""


# -- namespaces ---------------------------------------------------------------------------------

INTERVAL_S = 0.03
TRACK = {"track_gateway_interval_s": 0.1, "track_gateway_timeout_s": 0.1,
         "track_gateway_fall": 2, "track_gateway_rise": 2}
GUARD_S = 2 * 0.1 + 0.1
"""Longest time from a cut to the guard's verdict: fall rounds, the last one's timeout."""
SLACK_S = 0.2
"""Scheduling on a shared 2-core box, VIP add/remove and the rtnetlink event."""
WATCH_SKEW_S = 0.001
"""How far apart the VIP watch can stamp two events of different namespaces."""


def _nft(topo: netns.Topology, script: str) -> None:
    res = subprocess.run(["ip", "netns", "exec", topo.bridge_netns, "nft", "-f", "-"],
                         input=script, text=True, capture_output=True, timeout=10)
    if res.returncode != 0:
        raise AssertionError(f"nft: {res.stderr}")


def cut(topo: netns.Topology, *pairs: tuple[str, str]) -> None:
    """Drop every frame between the bridge ports of each pair (ARP too); replaces any cut."""
    rules = "".join(
        f'    iifname "{topo[x].port}" oifname "{topo[y].port}" drop\n'
        f'    iifname "{topo[y].port}" oifname "{topo[x].port}" drop\n' for x, y in pairs)
    _nft(topo, "table bridge plbcut {}\ndelete table bridge plbcut\n"
               "table bridge plbcut {\n  chain forward {\n"
               "    type filter hook forward priority 0; policy accept;\n"
               f"{rules}  }}\n}}\n")


def heal(topo: netns.Topology) -> None:
    _nft(topo, "table bridge plbcut {}\ndelete table bridge plbcut\n")


class Pair:
    """lb1 (priority 200) and lb2 (100), each a FailoverController on a loop in its own
    namespace; heartbeats to the peer's bridge address and to its address behind gw."""

    def __init__(self, topo: netns.Topology) -> None:
        from lab.vipwatch import VipWatch

        self.topo = topo
        self.vip_ip = topo.host4(100)
        self.vip = f"{self.vip_ip}/24"
        self.loops = {n: topo.loop(n) for n in ("lb1", "lb2")}
        self.ctl: dict[str, FailoverController] = {}
        self.watch = VipWatch(topo, ("lb1", "lb2"), self.vip_ip)
        gw = topo["gw"].ipv4
        for name, prio in (("lb1", 200), ("lb2", 100)):
            other = "lb2" if name == "lb1" else "lb1"
            self.loops[name].run(self._start(name, prio, other, gw))

    @staticmethod
    def routed(topo: netns.Topology, name: str) -> str:
        """The node's second address, reached through gw (198.51.100.0/24)."""
        return f"198.51.100.{topo[name].ipv4.rsplit('.', 1)[1]}"

    async def _start(self, name: str, priority: int, other: str, gw: str) -> None:
        from failover.adapters.vip import VipAdapter

        adapter = VipAdapter("eth0", [self.vip], garp_count=1, garp_repeat_after_s=None)
        spec = FailoverSpec(
            node_name=name, interface="eth0", vips=(self.vip,), priority=priority,
            peers=(self.topo[other].ipv4, self.routed(self.topo, other)), key=KEY,
            address=self.topo[name].ipv4, interval_s=INTERVAL_S,
            track_gateway=(f"{gw}:9", f"arp:{gw}"), **TRACK)  # type: ignore[arg-type]
        ctl = FailoverController(spec, adapter)
        ctl.set_local_health(True, 1, 1)
        await ctl.start()
        self.ctl[name] = ctl

    def role(self, name: str) -> Role:
        async def get() -> Role:
            return self.ctl[name].role

        return self.loops[name].run(get())

    def status(self, name: str) -> Any:
        async def get() -> Any:
            return self.ctl[name].status()

        return self.loops[name].run(get())

    def stop(self) -> None:
        for name, ctl in self.ctl.items():
            self.loops[name].run(ctl.stop(), timeout_s=15)
        self.watch.close()

    def overlap_s(self, since: float, until: float) -> float:
        return sum(e - s for s, e in self.watch.overlaps(since, until))


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> float:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out: {what}")
        time.sleep(0.01)
    return time.monotonic()


@pytest.fixture(scope="module")
def topo() -> Iterator[netns.Topology]:
    if netns.skip_reason() is not None:
        pytest.skip(netns.skip_reason() or "")
    with netns.build(["lb1", "lb2", "gw", "client"]) as t:
        # gw routes 198.51.100.0/24 back onto the same segment: the heartbeats' second path.
        t.sysctl("gw", {"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/send_redirects": "0",
                        "net/ipv4/conf/eth0/send_redirects": "0"})
        t.run("gw", ["ip", "addr", "add", "198.51.100.1/24", "dev", "eth0"])
        for name in ("lb1", "lb2"):
            mine = Pair.routed(t, name)
            t.sysctl(name, {"net/ipv4/conf/all/accept_redirects": "0",
                            "net/ipv4/conf/eth0/accept_redirects": "0"})
            t.run(name, ["ip", "addr", "add", f"{mine}/32", "dev", "eth0"])
            t.run(name, ["ip", "route", "add", "198.51.100.0/24", "via", t["gw"].ipv4,
                         "src", mine])
        yield t


@pytest.mark.netns
@pytest.mark.timeout(30)
@pytest.mark.skipif(netns.skip_reason() is not None, reason=netns.skip_reason() or "")
def test_arp_probe_gets_a_reply_and_times_out_on_silence(topo: netns.Topology) -> None:
    async def scenario() -> tuple[Any, Any]:
        prober = ArpProber("eth0")
        prober.open()
        try:
            there = await prober.probe(topo["gw"].ipv4, 0.5)
            nobody = await prober.probe(topo.host4(77), 0.2)
        finally:
            prober.close()
        return there, nobody

    there, nobody = topo.loop("client").run(scenario())
    assert (there.ok, there.detail) == (True, "reply") and there.rtt_s < 0.1
    assert (nobody.ok, nobody.detail) == (False, "timeout")


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(netns.skip_reason() is not None, reason=netns.skip_reason() or "")
def test_partitions_leave_exactly_one_vip_holder(topo: netns.Topology) -> None:
    pair = Pair(topo)
    topo.tcp_probe("client", pair.vip_ip, 9)  # the client has an ARP entry for the VIP
    report: list[str] = []
    try:
        wait_until(lambda: pair.watch.holding() == {"lb1"}
                   and pair.role("lb2") is Role.BACKUP, 5.0, "lb1 MASTER, lb2 BACKUP")
        time.sleep(0.3)
        gw_state = pair.status("lb1").gateway
        assert gw_state.up and {t.detail for t in gw_state.targets} == {"refused", "reply"}
        both = {p.address for p in pair.status("lb2").peers[0].paths}
        assert both == {topo["lb1"].ipv4, Pair.routed(topo, "lb1")}  # two heartbeat paths

        # 1. lb1 cut from lb2 only: the heartbeats go round through gw. Nothing moves.
        t0 = time.monotonic()
        cut(topo, ("lb1", "lb2"))
        time.sleep(1.5)
        t1 = time.monotonic()
        assert pair.watch.holding() == {"lb1"} and pair.watch.changes("lb2", t0) == []
        assert pair.role("lb2") is Role.BACKUP and pair.status("lb2").peers[0].alive
        report.append("lb1|lb2 cut, second path via gw: one holder throughout "
                      f"({pair.overlap_s(t0, t1):.3f} s overlap)")
        # 1b. The control experiment: without the second path the guard cannot help.
        topo.sysctl("gw", {"net/ipv4/ip_forward": "0"})
        t0 = time.monotonic()
        wait_until(lambda: pair.watch.holding() == {"lb1", "lb2"}, 2.0, "two holders")
        report.append(f"lb1|lb2 cut, no second path: lb2 took the VIP too after "
                      f"{time.monotonic() - t0:.3f} s (both reach the gateway)")
        t_heal = time.monotonic()
        topo.sysctl("gw", {"net/ipv4/ip_forward": "1"})
        wait_until(lambda: pair.watch.holding() == {"lb1"}, 2.0, "one holder again")
        report.append(f"  second path back: one holder after {time.monotonic() - t_heal:.3f} s")
        heal(topo)
        time.sleep(0.5)

        # 2. lb1 cut from the gateway only: FAULT, released; lb2 hears that and takes over.
        t0 = time.monotonic()
        cut(topo, ("lb1", "gw"))
        t_b = wait_until(lambda: pair.watch.holding() == {"lb2"}, GUARD_S + 2 * SLACK_S + 1,
                         "lb2 alone holds the VIP")
        time.sleep(1.0)
        t1 = time.monotonic()
        assert pair.role("lb1") is Role.FAULT and pair.status("lb1").faults == ("gateway",)
        # The watch stamps each namespace's netlink events as its thread reads them: a
        # release and the peer's add that follows it can come out tens of us apart either
        # way (seen once in CI-sized runs: 40 us). Anything longer is a real overlap.
        assert pair.watch.holding() == {"lb2"} and pair.overlap_s(t0, t1) < WATCH_SKEW_S
        assert t_b - t0 <= GUARD_S + 2 * SLACK_S
        report.append(f"lb1|gw cut: lb2 holds it {t_b - t0:.3f} s after the cut, overlap "
                      f"{pair.overlap_s(t0, t1):.3f} s, lb1 FAULT")
        heal(topo)
        t_heal = time.monotonic()
        wait_until(lambda: pair.watch.holding() == {"lb1"} and pair.role("lb2") is Role.BACKUP,
                   3.0, "lb1 back (rise, then preempt)")
        report.append(f"  healed: lb1 MASTER again after {time.monotonic() - t_heal:.3f} s")
        time.sleep(0.5)

        # 3. lb1 cut from lb2 and the gateway (it still reaches the client; link up).
        t0 = time.monotonic()
        cut(topo, ("lb1", "lb2"), ("lb1", "gw"))
        wait_until(lambda: pair.watch.holding() == {"lb2"}, GUARD_S + 2 * SLACK_S + 1,
                   "lb2 alone holds the VIP")
        settled = time.monotonic()
        time.sleep(1.0)
        t1 = time.monotonic()
        overlap = pair.overlap_s(t0, t1)
        assert pair.role("lb1") is Role.FAULT and pair.role("lb2") is Role.MASTER
        assert pair.watch.holding() == {"lb2"}
        assert overlap <= GUARD_S + SLACK_S, overlap  # and none after the guard's verdict
        assert pair.overlap_s(t0 + GUARD_S + SLACK_S, t1) < WATCH_SKEW_S
        assert topo.neighbour("client", pair.vip_ip) == topo["lb2"].mac  # clients follow
        report.append(f"lb1|lb2+gw cut: two holders for {overlap:.3f} s (lb2 after "
                      f"master_down, lb1 released after the guard's fall rounds), lb2 alone "
                      f"{settled - t0:.3f} s after the cut")
        heal(topo)
        wait_until(lambda: pair.watch.holding() == {"lb1"}, 3.0, "lb1 back")
    finally:
        heal(topo)
        print("\n" + "\n".join(report))
        pair.stop()
