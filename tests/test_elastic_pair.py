"""Both nodes agree on runtime pool changes: real pairlb nodes in network namespaces, the
VIP, a client probing it every 10 ms on new connections, and /metrics scraped in both
namespaces all along (they stand for a Prometheus elsewhere).

- A backend added on the standby reaches the MASTER over the sync channel and serves there;
  after the MASTER is killed, the new holder serves the same pool (the added backend too).
- A change the peer cannot take (its config has no such pool) is refused there, and the
  refusal is reported on both nodes: the API answer, /status, /metrics.
- With the peer's control process stopped, a change is ``pending``; it applies there once
  the process runs again, and both overlays end equal.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import parse_metrics, total

from lab import netns
from lab import pair_rig as fe
from lab.pair import ADMIN_PORT, LBS

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(netns.skip_reason() is not None, reason=netns.skip_reason() or ""),
    pytest.mark.timeout(180),
]

SCRAPE_EVERY_S = 0.5
SCRAPE_FOR_S = 150.0
TOKEN = "elastic-pair-token"


class ElasticRig(fe.ScrapedRig):
    """The failover rig with a token, web1 and web2 in the config (web3 comes at runtime),
    and on lb2 only a second pool ``extra`` (a config drift the peer must refuse)."""

    scrape_every_s = SCRAPE_EVERY_S
    scrape_for_s = SCRAPE_FOR_S

    def __init__(self) -> None:
        super().__init__()
        try:
            self.token = TOKEN
            self.token_file = self.workdir / "admin.token"
            import failover

            failover.write_secret(str(self.token_file), TOKEN.encode() + b"\n", replace=True)
        except BaseException:
            self.close()
            raise

    def config_text(self, node: str, settings: fe.PairSettings) -> str:
        text = super().config_text(node, settings)
        lines = [ln for ln in text.splitlines() if '"web3"' not in ln]
        text = "\n".join(lines) + "\n"
        text = text.replace("[admin]\nenabled = true\n",
                            f'[admin]\nenabled = true\ntoken_file = "{self.token_file}"\n')
        if node == "lb2":
            text += f"""
[[pool]]
name = "extra"
backends = [ {{ name = "x1", address = "{self.addr['web1']}:{fe.BACKEND_PORT}" }} ]
"""
        return text

    def call(self, node: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        import json

        from lab.pair import admin_call  # noqa: F401  (the rig's admin client)

        def inside() -> tuple[int, Any]:
            from lb.admin import client

            data = None if body is None else json.dumps(body).encode()
            status, _, raw = client.exchange(
                method, f"http://127.0.0.1:{ADMIN_PORT}{path}", token=TOKEN, body=data,
                headers={"Content-Type": "application/json"}, timeout_s=5.0)
            return status, json.loads(raw) if raw else None

        result: tuple[int, Any] = self.topo.call(node, inside)
        return result

    def members(self, node: str, pool: str = "web") -> dict[str, dict[str, Any]]:
        st = self.status(node) or {}
        return {b["name"]: b for p in st.get("pools", []) if p["name"] == pool
                for b in p["backends"]}

    def metrics(self, node: str) -> Any:
        code, body = self.admin(node, "GET", "/metrics")
        assert code == 200, body
        return parse_metrics(body if isinstance(body, str) else str(body))

    def runtime(self, node: str) -> dict[str, Any]:
        st = self.status(node)
        assert st is not None, node
        rt: dict[str, Any] = st["runtime"]
        return rt


@pytest.fixture(scope="module")
def rig() -> Iterator[ElasticRig]:
    with ElasticRig() as r:
        r.start_scrapers()
        try:
            r.steady(r.settings)
            r.wait_for("the sync channel up on both nodes", lambda: all(
                any(p["connected"] for p in (r.runtime(n)["sync"] or {}).get("peers", []))
                for n in LBS), 10.0)
            yield r
        finally:
            r.stop_scrapers()


def test_a_backend_added_on_the_standby_serves_on_the_master_and_after_failover(
        rig: ElasticRig) -> None:
    web3 = f"{rig.addr['web3']}:{fe.BACKEND_PORT}"
    t_add = time.monotonic()
    status, body = rig.call("lb2", "POST", "/pools/web/backends",
                            {"name": "web3", "address": web3})
    assert status == 201, body
    assert body["peer"] == {"lb1": "applied"}, body
    for node in LBS:
        rig.wait_for(f"web3 in rotation on {node}", lambda n=node: rig.members(n).get(
            "web3", {}).get("in_rotation", False), 5.0)
        assert rig.members(node)["web3"]["source"] == "api"
    assert rig.runtime("lb1")["overlay"]["digest"] == rig.runtime("lb2")["overlay"]["digest"]
    rig.wait_for("web3 served through the VIP (lb1)", lambda: rig.members("lb1")[
        "web3"]["requests"] > 0, 5.0)
    assert rig.members("lb2")["web3"]["requests"] == 0  # the standby carries nothing
    # The MASTER dies: lb2 takes the VIP and serves the same pool, web3 included.
    t_kill = rig.signal_node("lb1", signal.SIGKILL)
    rig.wait_role("lb2", "MASTER", 5.0)
    rig.wait_for("lb2 carrying the client", lambda: rig.served_by("lb2", t_kill + 0.5), 5.0)
    rig.wait_for("web3 served by lb2 after the failover", lambda: rig.members("lb2")[
        "web3"]["requests"] > 0, 5.0)
    # Up to the kill, the add cost nothing; a request in flight at the SIGKILL of the whole
    # node dies with the node's TCP connection (CI saw one, 10 ms long, end in EOF).
    failed = [a for a in rig.attempts(t_add, t_kill) if not a.ok and a.t1 < t_kill]
    if failed:
        for node in ("lb1", "lb2", "probe"):
            Path(f"/tmp/elastic_pair_{node}.log").write_text(rig.log_text(node))
    assert failed == [], (t_add, failed[:5])
    late = [a for a in rig.attempts(t_kill + 1.0) if not a.ok]
    assert late == [], late[:5]
    m = rig.metrics("lb2")
    assert total(m, "pairlb_pool_backends", pool="web", source="api") == 1
    assert total(m, "pairlb_runtime_changes_total", outcome="applied_local") >= 1
    # lb1 comes back, from its own state_dir: web3 is there at once.
    rig.steady(rig.settings)
    assert rig.members("lb1")["web3"]["source"] == "api"
    # lb2 answered every scrape through the change and the failover (lb1 until it died).
    # A scrape is on record once it ends (every 0.5 s, each up to 2 s): a quick run of the
    # steps above can end with three on record, so wait for the fourth.
    rig.wait_for("four scrapes of lb2 since the add", lambda: len(rig.scrapes(
        "lb2", t_add)) >= 4, 5.0)
    scrapes = [status for _, _, status in rig.scrapes("lb2", t_add)]
    assert all(s == 200 for s in scrapes), scrapes


def test_a_change_the_peer_cannot_take_is_refused_there_and_reported_on_both(
        rig: ElasticRig) -> None:
    rig.steady(rig.settings)
    x2 = f"{rig.addr['web2']}:{fe.BACKEND_PORT}"
    status, body = rig.call("lb2", "POST", "/pools/extra/backends",
                            {"name": "x2", "address": x2})
    assert status == 201, body
    reason = body["peer"]["lb1"]
    assert reason.startswith("refused: pool extra: no such pool on lb1"), body
    rt1, rt2 = rig.runtime("lb1"), rig.runtime("lb2")
    assert any("no such pool" in r["reason"] for r in rt1["refusals"]), rt1
    rig.wait_for("lb2 to record lb1's refusal", lambda: any(
        "no such pool" in r["reason"] for r in rig.runtime("lb2")["refusals"]), 3.0)
    assert rt1["changes"]["refused_here"] >= 1 and rt2["changes"]["applied_local"] >= 1
    assert total(rig.metrics("lb1"), "pairlb_runtime_changes_total",
                 outcome="refused_here") >= 1
    assert total(rig.metrics("lb2"), "pairlb_runtime_changes_total",
                 outcome="refused_by_peer") >= 1
    # The drift itself is visible: the config digests differ, per peer.
    assert total(rig.metrics("lb1"), "pairlb_peer_config_digest_match") == 0


def test_a_change_made_while_the_peer_is_stopped_is_pending_then_applied(
        rig: ElasticRig) -> None:
    rig.steady(rig.settings)
    t0 = rig.signal_control("lb1", signal.SIGSTOP)
    try:
        status, body = rig.call("lb2", "DELETE", "/pools/web/backends/web2")
        assert status == 202, body
        assert body["peer"] == {"lb1": "pending"}, body
    finally:
        rig.signal_control("lb1", signal.SIGCONT)
    rig.wait_for("web2 gone on lb1 too", lambda: "web2" not in rig.members("lb1"), 10.0)
    rig.wait_for("both overlays equal", lambda: rig.runtime("lb1")["overlay"]["digest"]
                 == rig.runtime("lb2")["overlay"]["digest"], 10.0)
    assert rig.role("lb1") == "MASTER", "a stopped control process must not move the VIP"
    failed = [a for a in rig.attempts(t0) if not a.ok]
    assert failed == [], failed[:5]
    # The peer's digest comes with its pings (every 5 s): the metric follows within that.
    rig.wait_for("lb2's metric to see equal overlays", lambda: total(
        rig.metrics("lb2"), "pairlb_sync_peer_overlay_digest_match") == 1, 8.0, 0.2)
