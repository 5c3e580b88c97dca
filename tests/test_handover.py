"""failover.adapters.handover: the nft scripts (pure), and installing, arming and removing them in a
real network namespace (root). The end-to-end proof is in tests/test_failover_e2e.py
(connections open at a switchover are finished by the old holder)."""

from __future__ import annotations

import asyncio
import subprocess

import pytest

from failover.adapters import handover as ho
from lab import netns


def test_base_ruleset_flags_foreign_flows_and_delivers_ours_per_family() -> None:
    text = ho.base_ruleset("lb-1", ["192.0.2.100/24", "2001:db8::100/64"], [443, 80, 80])
    assert "table ip pairlb_lb_1 {" in text and "table ip6 pairlb_lb_1 {" in text
    assert "ip daddr 192.0.2.100 tcp dport { 80, 443 } ct state new tcp flags & syn == 0 " \
           f"ct mark set {ho.FOREIGN_MARK:#x}" in text
    assert f"ip6 daddr 2001:db8::100 tcp dport {{ 80, 443 }} socket transparent 1 meta mark " \
           f"set {ho.TPROXY_MARK:#x}" in text
    assert "dup to" not in text  # forwarding is armed only after a takeover


def test_forward_rules_only_for_the_peers_family() -> None:
    text = ho.forward_rules("lb1", ["192.0.2.100/24", "2001:db8::100/64"], "eth0", "192.0.2.12")
    assert text.count("add rule") == 1
    assert (f"add rule ip pairlb_lb1 pre ip daddr 192.0.2.100 ct mark {ho.FOREIGN_MARK:#x} "
            'dup to 192.0.2.12 device "eth0" drop') in text
    assert ho.forward_rules("lb1", ["192.0.2.100/24"], "eth0", "2001:db8::12") == ""


@pytest.mark.netns
@pytest.mark.skipif(netns.skip_reason() is not None, reason=netns.skip_reason() or "")
def test_install_arm_disarm_and_remove_in_a_namespace() -> None:
    with netns.topology(["lb"], ipv6=True) as topo:
        ns = topo["lb"].netns

        def nft_list() -> str:
            return subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"],
                                  capture_output=True, text=True, check=True).stdout

        def ip(*args: str) -> str:
            return subprocess.run(["ip", "netns", "exec", ns, "ip", *args],
                                  capture_output=True, text=True, check=True).stdout

        h = ho.Handover("lb", "eth0", ["192.0.2.100/24", "2001:db8::100/64"], [80])

        async def install() -> bool:
            return await h.start()

        assert topo.call("lb", asyncio.run, install())
        assert topo.call("lb", asyncio.run, install())  # a restart after kill -9: no second rule
        assert "socket transparent 1" in nft_list() and "dup to" not in nft_list()
        rule = f"fwmark {ho.TPROXY_MARK:#x} lookup {ho.TPROXY_TABLE}"
        for family in ("-4", "-6"):
            assert ip(family, "rule").count(rule) == 1, ip(family, "rule")
            routes = ip(family, "route", "show", "table", str(ho.TPROXY_TABLE))
            assert routes.startswith("local default dev lo"), routes

        async def arm() -> None:
            await h.forward_to("192.0.2.12", 0.3)
            await h.forward_to("192.0.2.12", 0.3)  # a re-announce: extended, no new nft run

        topo.call("lb", asyncio.run, arm())
        assert 'dup to 192.0.2.12 device "eth0" drop' in nft_list()
        assert nft_list().count("dup to") == 1 and h.forwards == 1

        async def arm_and_expire() -> None:
            await h.forward_to("192.0.2.13", 0.1)  # replaces the first: one peer at a time
            assert h.forwarding_to == "192.0.2.13"
            await asyncio.sleep(0.3)

        topo.call("lb", asyncio.run, arm_and_expire())
        assert "dup to" not in nft_list() and h.forwarding_to is None

        async def remove() -> None:
            await h.close()

        topo.call("lb", asyncio.run, remove())
        assert "pairlb" not in nft_list()
        for family in ("-4", "-6"):
            assert f"{ho.TPROXY_MARK:#x}" not in ip(family, "rule")
            assert ip(family, "route", "show", "table", str(ho.TPROXY_TABLE)) == ""
