"""Affinity survives a failover (issue 17): two real ``pairlb run`` nodes in network
namespaces (lab.pair_rig: lb1 priority 150, lb2 100, web1..web3, the VIP), the same config
on both:

- pool ``web`` (VIP:80): ``balance = "maglev"``, ``hash_on = "header:X-User"``;
- pool ``sticky`` (VIP:81): round robin with ``sticky_cookie``.

Neither node tells the other anything about keys or cookies: both build the same Maglev
table from the same members (the same ``hashing.digest`` in /status) and derive the same
cookie tokens. A client in its own namespace sends 100 keys through the VIP to lb1, lb1 is
killed (SIGKILL, the whole node), and the same 100 keys through the VIP reach the same
backends on lb2: 100/100. A sticky cookie lb1 set sends the client to the same backend on
lb2. /metrics is scraped in both namespaces all along (a Prometheus elsewhere); the
survivor answers every scrape.
"""

from __future__ import annotations

import http.client
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from admin_helpers import parse_metrics, total

from lab import netns
from lab import pair_rig as fe
from lb import maglev

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(netns.skip_reason() is not None, reason=netns.skip_reason() or ""),
    pytest.mark.timeout(120),
]

STICKY_PORT = 81
COOKIE = "plbsticky"
KEYS = [f"user-{i}" for i in range(100)]
SCRAPE_EVERY_S = 0.5


class AffinityRig(fe.ScrapedRig):
    """The failover rig with pool web keyed on X-User (maglev) and a sticky pool on :81."""

    scrape_every_s = SCRAPE_EVERY_S
    scrape_for_s = 90.0

    def config_text(self, node: str, settings: fe.PairSettings) -> str:
        text = super().config_text(node, settings)
        pool = '[[pool]]\nname = "web"\n'
        assert pool in text
        text = text.replace(pool, pool + 'balance = "maglev"\nhash_on = "header:X-User"\n')
        backends = ", ".join(f'{{ name = "{b}", address = "{self.addr[b]}:{fe.BACKEND_PORT}" }}'
                             for b in fe.BACKENDS)
        return text + f"""
[[listener]]
name = "sticky"
bind = "{self.vip}:{STICKY_PORT}"
pool = "sticky"

[[pool]]
name = "sticky"
sticky_cookie = "{COOKIE}"
backends = [ {backends} ]

[pool.health]
interval_s = {settings.health_interval_s}
timeout_s = {settings.health_interval_s}
rise = {settings.health_rise}
fall = {settings.health_fall}
"""

    def hashing(self, node: str) -> dict[str, Any]:
        st = self.status(node)
        assert st is not None, node
        h: dict[str, Any] = next(p for p in st["pools"] if p["name"] == "web")["hashing"]
        return h

    def metrics(self, node: str) -> Any:
        code, body = self.admin(node, "GET", "/metrics")
        assert code == 200, body
        return parse_metrics(body if isinstance(body, str) else str(body))


@pytest.fixture(scope="module")
def rig() -> Iterator[AffinityRig]:
    with AffinityRig() as r:
        r.start_scrapers()
        try:
            r.steady(r.settings)
            yield r
        finally:
            r.stop_scrapers()


# -- the client (runs in the client namespace) ------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    backend: str
    peer: str
    """The address the backend saw the request come from: the node that carried it."""
    set_cookie: str | None


def fetch(host: str, port: int, headers: list[dict[str, str]]) -> list[Answer]:
    """One GET / per entry of ``headers``, each on a new connection (what a client that
    comes back after a failover does)."""
    out = []
    for h in headers:
        conn = http.client.HTTPConnection(host, port, timeout=2.0)
        try:
            conn.request("GET", "/", headers={**h, "Connection": "close"})
            r = conn.getresponse()
            r.read()
            out.append(Answer(r.status, r.getheader("X-Backend") or "-",
                              r.getheader("X-Peer") or "-", r.getheader("Set-Cookie")))
        except (OSError, http.client.HTTPException) as exc:
            out.append(Answer(0, repr(exc), "-", None))
        finally:
            conn.close()
    return out


def via_vip(rig: AffinityRig, port: int, headers: list[dict[str, str]]) -> list[Answer]:
    answers: list[Answer] = rig.topo.call("client", fetch, rig.vip, port, headers)
    return answers


def route_keys(rig: AffinityRig, node: str) -> dict[str, str]:
    """Each key's backend through the VIP; every answer a 200 carried by ``node``."""
    answers = via_vip(rig, fe.HTTP_PORT, [{"X-User": k} for k in KEYS])
    bad = [(k, a) for k, a in zip(KEYS, answers, strict=True)
           if a.status != 200 or a.peer != rig.addr[node]]
    assert bad == [], (node, len(bad), bad[:5])
    return {k: a.backend for k, a in zip(KEYS, answers, strict=True)}


def predicted() -> dict[str, str]:
    """What lb.maglev computes from the members alone (weight 1 each)."""
    names, table = maglev.build([(b, 1) for b in fe.BACKENDS], maglev.table_size(3))
    return {k: names[table[maglev.key_hash(k.encode()) % len(table)]] for k in KEYS}


# -- the scenario -----------------------------------------------------------------------------


def test_keys_and_sticky_cookies_go_to_the_same_backends_after_the_master_dies(
        rig: AffinityRig) -> None:
    rig.steady(rig.settings)
    since = time.monotonic()
    h1, h2 = rig.hashing("lb1"), rig.hashing("lb2")
    assert h1["current"] and h2["current"], (h1, h2)
    assert h1["digest"] == h2["digest"] and h1["size"] == h2["size"] == 65537, (h1, h2)

    before = route_keys(rig, "lb1")
    assert before == predicted()
    spread = Counter(before.values())
    assert set(spread) == set(fe.BACKENDS), spread

    first = via_vip(rig, STICKY_PORT, [{}])[0]
    assert first.status == 200 and first.set_cookie, first
    cookie = first.set_cookie.split(";", 1)[0]
    assert cookie == f"{COOKIE}={maglev.sticky_token('sticky', first.backend)}", first
    owner = first.backend
    on_lb1 = via_vip(rig, STICKY_PORT, [{"Cookie": cookie}] * 5)
    assert {(a.status, a.backend, a.peer, a.set_cookie) for a in on_lb1} == {
        (200, owner, rig.addr["lb1"], None)}, on_lb1

    time.sleep(0.5)  # scrapes of both nodes before the fault
    t_kill = rig.signal_node("lb1", signal.SIGKILL)
    rig.wait_role("lb2", "MASTER", 5.0)
    fe.settle(rig, "lb2", t_kill)
    t_moved = next((t for t, present in rig.watch.changes("lb2", t_kill) if present), None)

    after = route_keys(rig, "lb2")
    same = sum(1 for k in KEYS if after[k] == before[k])
    assert same == len(KEYS), [(k, before[k], after[k]) for k in KEYS if after[k] != before[k]]

    on_lb2 = via_vip(rig, STICKY_PORT, [{"Cookie": cookie}] * 6)
    assert {(a.status, a.backend, a.peer, a.set_cookie) for a in on_lb2} == {
        (200, owner, rig.addr["lb2"], None)}, on_lb2
    plain = via_vip(rig, STICKY_PORT, [{}] * 6)  # without it lb2 goes round
    assert {a.status for a in plain} == {200} and len({a.backend for a in plain}) >= 2, plain

    rig.wait_for("lb2's /metrics to count the sticky hits", lambda: total(
        rig.metrics("lb2"), "pairlb_sticky_requests_total", pool="sticky", outcome="hit")
        >= 6, 3.0, 0.1)
    assert total(rig.metrics("lb2"), "pairlb_maglev_table_current", pool="web") == 1

    # Scraping went on: lb2 answered every scrape, before the kill and after it.
    rig.wait_for("two of lb2's scrapes after the kill", lambda: len(
        [r for r in rig.scrapes("lb2", since) if r[0] >= t_kill]) >= 2, 5.0, 0.2)
    rows = rig.scrapes("lb2", since)
    late = [r for r in rows if r[0] >= t_kill]
    assert len(rows) >= 3 and len(late) >= 2, (len(rows), len(late))
    assert all(r[2] == 200 for r in rows), rows
    early1 = [r for r in rig.scrapes("lb1", since) if r[1] < t_kill]
    assert early1 and all(r[2] == 200 for r in early1), early1
    # The prober's requests that ended before the kill all succeeded (the pair was sound;
    # those cut by the kill are the failover tests' business).
    failed = [a for a in rig.attempts(since, t_kill) if not a.ok and a.t1 < t_kill]
    assert failed == [], failed[:5]
    print(f"\naffinity pair: {same}/{len(KEYS)} keys on the same backend after the failover "
          f"(spread {dict(sorted(spread.items()))}), sticky cookie -> {owner} on both, "
          f"digest {h1['digest']}, VIP on lb2 "
          f"{'-' if t_moved is None else f'{(t_moved - t_kill) * 1000:.0f} ms'} after the "
          f"kill, lb2 answered {len(rows)}/{len(rows)} scrapes ({len(late)} after the kill)")
