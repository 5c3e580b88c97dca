"""The namespace test library: topologies build fast, behave like a switched LAN, fail the way
the chaos bench needs (link cut, port isolation, killed processes) and always clean up.

Real namespaces, real iproute2; needs root, skipped otherwise. Never touches the root
namespace, and checks that it did not.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable

import pytest

from lab import netns

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(netns.skip_reason() is not None, reason=netns.skip_reason() or ""),
    pytest.mark.timeout(30),
]


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True)
    return {link["ifname"] for link in json.loads(out.stdout)}


def _sysctl(topo: netns.Topology, node: str, key: str) -> str:
    return topo.run(node, ["sysctl", "-n", key]).stdout.strip()


def test_topology_builds_quickly_with_addresses_sysctls_and_no_root_devices() -> None:
    before = _root_links()
    with netns.build(["client", "lb1", "lb2", "be1", "be2", "be3"],
                     ipv6=["client", "lb1", "lb2"]) as topo:
        assert topo.build_s < 1.0, f"7 namespaces took {topo.build_s:.3f}s"
        assert _root_links() == before, "a device appeared in the root namespace"
        assert netns.list_namespaces(topo.prefix + "-") == sorted(topo.namespaces)
        assert len(topo.namespaces) == 7
        lb1 = topo["lb1"]
        assert lb1.netns.startswith("plb") and len(lb1.port) <= 15
        assert topo.addresses("lb1") >= {lb1.cidr4, lb1.cidr6}
        assert topo["be1"].ipv6 is None
        assert not any(":" in a for a in topo.addresses("be1")), "IPv6 should be off on be1"
        link = topo.ip_json("lb1", "link", "show", "dev", "eth0")[0]
        assert link["address"] == lb1.mac and "LOWER_UP" in link["flags"]
        assert "UP" in topo.ip_json("lb1", "link", "show", "dev", "lo")[0]["flags"]
        # Set explicitly, not inherited from the host.
        assert _sysctl(topo, "lb1", "net.ipv4.conf.eth0.rp_filter") == "0"
        assert _sysctl(topo, "lb1", "net.ipv4.conf.eth0.arp_ignore") == "1"
        assert _sysctl(topo, "lb1", "net.ipv4.conf.eth0.arp_announce") == "2"
        assert _sysctl(topo, "lb1", "net.ipv4.ip_nonlocal_bind") == "1"
        assert _sysctl(topo, "lb1", "net.ipv6.conf.eth0.accept_dad") == "0"
        assert _sysctl(topo, "be1", "net.ipv6.conf.eth0.disable_ipv6") == "1"
        # A switched LAN: everybody reaches everybody, over IPv4 and IPv6.
        assert topo.tcp_probe("client", lb1.ipv4, 9) is netns.Probe.REFUSED
        assert topo.tcp_probe("client", topo["be3"].ipv4, 9) is netns.Probe.REFUSED
        assert lb1.ipv6 is not None
        assert topo.tcp_probe("client", lb1.ipv6, 9) is netns.Probe.REFUSED
        prefix = topo.prefix
    assert netns.list_namespaces(prefix) == []
    assert _root_links() == before


def test_cut_link_and_isolated_ports_partition_the_way_the_chaos_bench_needs() -> None:
    with netns.build(["client", "lb1", "lb2"]) as topo:
        lb1, lb2 = topo["lb1"].ipv4, topo["lb2"].ipv4
        topo.cut_link("lb1")
        assert topo.tcp_probe("client", lb1, 9, timeout_s=0.3) in (
            netns.Probe.TIMEOUT, netns.Probe.UNREACHABLE)
        flags = topo.ip_json("lb1", "link", "show", "dev", "eth0")[0]["flags"]
        assert "NO-CARRIER" in flags, flags
        topo.restore_link("lb1")
        # From lb1's side: the client's own ARP retry for lb1 would add up to a second.
        assert _eventually(lambda: topo.tcp_probe("lb1", topo["client"].ipv4, 9).reachable)

        topo.cut_link("lb2", side="node")
        assert "UP" not in topo.ip_json("lb2", "link", "show", "dev", "eth0")[0]["flags"]
        topo.restore_link("lb2", side="node")
        assert _eventually(lambda: topo.tcp_probe("client", lb2, 9).reachable)

        # Partition the pair while both still reach the client.
        topo.isolate("lb1")
        topo.isolate("lb2")
        assert not topo.tcp_probe("lb1", lb2, 9, timeout_s=0.3).reachable
        assert topo.tcp_probe("lb1", topo["client"].ipv4, 9).reachable
        assert topo.tcp_probe("lb2", topo["client"].ipv4, 9).reachable
        topo.isolate("lb1", on=False)
        assert _eventually(lambda: topo.tcp_probe("lb1", lb2, 9).reachable)


def test_kill_all_kills_stopped_processes_and_teardown_survives_a_failing_body() -> None:
    prefix = ""
    with pytest.raises(RuntimeError, match="boom"), netns.build(["lb1"]) as topo:
        prefix = topo.prefix
        hung = topo.popen("lb1", ["sleep", "60"])
        other = topo.popen("lb1", ["sleep", "60"])
        assert _eventually(lambda: set(topo.pids("lb1")) == {hung.pid, other.pid})
        hung.send_signal(signal.SIGSTOP)  # a hung node: SIGTERM alone would never land
        killed = topo.kill_all("lb1", grace_s=0.5)
        assert set(killed) == {hung.pid, other.pid}
        assert hung.wait(timeout=2) == -signal.SIGTERM
        assert topo.pids("lb1") == []
        topo.popen("lb1", ["sleep", "60"])  # left running for teardown to deal with
        raise RuntimeError("boom")
    assert prefix and netns.list_namespaces(prefix) == []


def test_cleanup_removes_leftovers_of_a_crashed_run_and_nothing_else() -> None:
    crashed = netns.build(["lb1", "lb2"])  # never torn down: as if pytest was killed
    survivor = netns.build(["lb1"])
    try:
        crashed.popen("lb1", ["sleep", "60"])
        removed = netns.cleanup(crashed.prefix)
        assert sorted(removed) == sorted(crashed.namespaces)
        assert netns.list_namespaces(crashed.prefix) == []
        assert netns.list_namespaces(survivor.prefix) == sorted(survivor.namespaces)
        with pytest.raises(ValueError, match="plb<hex>"):
            netns.cleanup("plb")  # would hit other people's runs
    finally:
        survivor.teardown()
        crashed.teardown()  # nothing left to delete; reaps our Popen handles


def test_a_failed_build_leaves_nothing_behind() -> None:
    prefix = netns.new_prefix()
    with pytest.raises(netns.NetnsError, match="no_such_knob"):
        netns.build(["lb1", "lb2"], prefix=prefix, sysctls={"net/ipv4/no_such_knob": "1"})
    assert netns.list_namespaces(prefix) == []
    with pytest.raises(ValueError, match="15 characters"):
        netns.build(["loadbalancer1"])


def test_code_runs_inside_a_node_without_forking() -> None:
    with netns.build(["lb1"]) as topo:
        def local_addresses() -> str:
            return subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True,
                                  check=True).stdout

        seen = topo.call("lb1", local_addresses)
        assert topo["lb1"].ipv4 in seen  # a child forked from that thread is inside too
        loop = topo.loop("lb1")

        async def hostname_addr() -> str:
            with socket.socket() as s:
                s.bind((topo["lb1"].ipv4, 0))  # only possible inside lb1
                return str(s.getsockname()[0])

        assert loop.run(hostname_addr()) == topo["lb1"].ipv4


def _eventually(pred: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return bool(pred())
