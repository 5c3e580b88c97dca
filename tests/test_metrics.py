"""GET /metrics of the admin app, scraped over HTTP from a real Daemon object (no workers).

What an operator relies on: the histogram's buckets say how many requests took at most
``le`` seconds, summed over every worker; names follow Prometheus conventions and
``promtool check metrics``; label values come only from the config or from closed sets;
failover metrics follow the controller; the dashboard and the docs name only real metrics.
The cross-process proof (N requests through 2 workers show N) is in test_prometheus.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from admin_helpers import (
    ROOT,
    FakeFailover,
    attach_fake_failover,
    config_text,
    free_port,
    in_process_daemon,
    parse_metrics,
    promql_metric_names,
    serve,
    total,
)
from prometheus_client.parser import text_string_to_metric_families

from healthcheck import CheckResult, CheckStatus
from lb.admin import metrics
from lb.admin import server as admin
from lb.control.daemon import merge_counts
from lb.control.rotation import AdminState
from lb.stats import CLASSES, DURATION_BUCKETS_S, Stats

DASHBOARD = ROOT / "deploy" / "grafana" / "pairlb-dashboard.json"
DOCS = ROOT / "docs" / "admin-api.md"
BACKENDS = ["b1", "b2", "b3"]


def cfg() -> str:
    return config_text(
        listen_port=free_port(),
        admin_port=free_port(),
        backends=[(n, i + 1) for i, n in enumerate(BACKENDS)],
    )


async def scrape(url: str, accept: str = "") -> tuple[str, str]:
    async with aiohttp.ClientSession() as s, s.get(
        url + "/metrics", headers={"Accept": accept} if accept else {}
    ) as r:
        assert r.status == 200
        return await r.text(), r.headers["Content-Type"]


def check_done(d: Any) -> None:
    """A health check finished (after make_app registered the metrics observer)."""
    for observe in d.check_observers:
        observe(("web", "b1"), CheckResult(CheckStatus.L7_OK, 0.003, 200))


def busy_daemon() -> Any:
    """A daemon whose totals hold what two workers reported: some of everything."""
    d = in_process_daemon(cfg())
    w0, w1 = Stats(), Stats()
    for i in range(30):
        w0.request("web", BACKENDS[i % 3], (200, 201, 304, 404, 502)[i % 5], 0.001 * i)
        w1.request("web", BACKENDS[(i + 1) % 3], 200, 0.002)
    w0.request("web", "-", 503, 0.0001)
    w0.error("web", "b2", "connect_refused")
    w1.error("web", "b2", "timeout")
    w0.bad_request("web", "bad_header", 400)
    w1.retry("web", "connect_refused")
    w0.connection_opened("web")
    w1.connection_opened("web")
    w1.connection_closed("web")
    w0.tcp_connection("web", "b1")
    w0.tcp_bytes("web", "b1", 100, 2000)
    for index, w in enumerate((w0, w1)):
        delta = w.take_delta()
        active = d.worker_active.setdefault(index, {})
        for listener, c in delta.get("connections", {}).items():
            active[listener] = active.get(listener, 0) + c.pop("active", 0)
        merge_counts(d.totals, delta)
    d.reloads["failure"] += 1
    d.check_counts[("web", "b1", "L7_OK")] = 1
    d.check_counts[("web", "b3", "L4_REFUSED")] = 4
    return d


# -- the request histogram --------------------------------------------------------------------


def test_histogram_counts_requests_at_most_le_seconds_over_two_workers() -> None:
    """Bucket edges included (le is <=), beyond 30 s lands in +Inf, rounds accumulate."""
    first = [0.0001, 0.0005, 0.0007, 0.001, 0.02, 0.3, 2.0, 29.9, 30.0, 45.0]
    second = [0.0004, 0.004, 0.04, 0.4, 4.0, 12.0, 0.0005]
    third = [0.0025, 0.25, 31.0]
    statuses = [200, 204, 301, 404, 500, 503, 101]

    async def body() -> None:
        d = in_process_daemon(cfg())
        async with serve(admin.make_app(d)) as url:
            seen: list[float] = []
            w1, w2 = Stats(), Stats()
            for worker, durations in ((w1, first), (w2, second), (w1, third)):
                for i, dur in enumerate(durations):
                    worker.request("web", BACKENDS[i % 3], statuses[i % len(statuses)], dur)
                merge_counts(d.totals, worker.take_delta())
                seen += durations
                samples = parse_metrics((await scrape(url))[0])
                name = "pairlb_request_duration_seconds"
                for le in DURATION_BUCKETS_S:
                    got = total(samples, f"{name}_bucket", le=repr(le))
                    assert got == sum(1 for x in seen if x <= le), (le, got)
                assert total(samples, f"{name}_bucket", le="+Inf") == len(seen)
                assert total(samples, f"{name}_count") == len(seen)
                assert total(samples, f"{name}_sum") == pytest.approx(sum(seen))
                assert total(samples, "pairlb_requests_total") == len(seen)
            counted = [statuses[i % len(statuses)] // 100 for d_ in (first, second, third)
                       for i in range(len(d_))]
            for n, cls in enumerate(CLASSES, start=1):
                got = total(samples, "pairlb_requests_total", code_class=cls)
                assert got == counted.count(n), cls

    asyncio.run(body())


# -- names, types, labels -----------------------------------------------------------------------


def _check_families(text: str, failover: bool) -> set[str]:
    declared = {m.name: m for m in metrics.ALL_METRICS}
    bounded = {
        "pool": {"web"},
        "backend": {*BACKENDS, "-"},
        "listener": {"web"},
        "code_class": set(CLASSES),
        "role": set(metrics.ROLES),
        "state": {str(s) for s in AdminState},
        "status": {str(s) for s in CheckStatus},
        "result": {"success", "failure", "written", "dropped"},
        "outcome": {"applied_local", "applied_peer", "refused_by_peer", "refused_here",
                    "conflicts", "pending", "hit", "set", "written", "dropped"},
        "source": {"config", "api", "dns", "file"},
        "process": {"control", "failover"},
        "direction": {"in", "out"},
        "peer": {"lb2"},
        "from": set(metrics.ROLES),
        "to": set(metrics.ROLES),
    }
    exported: set[str] = set()
    for fam in text_string_to_metric_families(text):
        exposed = fam.name + "_total" if fam.type == "counter" else fam.name
        if fam.type == "info":
            exposed = fam.name + "_info"
        assert exposed.startswith("pairlb_"), exposed
        assert exposed in declared, f"{exposed} is exported but not declared in METRICS"
        m = declared[exposed]
        assert fam.type == m.kind or (m.kind == "info" and fam.type == "gauge"), exposed
        exported.add(exposed)
        for s in fam.samples:
            if fam.type == "counter":
                assert s.name.endswith(("_total", "_created")), s.name
            extra = set(s.labels) - set(m.labels) - {"le"}
            assert not extra, f"{s.name} has undeclared labels {extra}"
            for label, value in s.labels.items():
                if label in bounded:
                    assert value in bounded[label], f"{s.name}{{{label}={value!r}}}"
    failover_names = {m.name for m in metrics.METRICS if m.failover_only}
    if failover:
        assert failover_names <= exported, failover_names - exported
    else:
        assert not exported & failover_names, exported & failover_names
    return exported


@pytest.mark.timeout(60)
def test_families_are_declared_typed_and_bounded_and_promtool_agrees(tmp_path: Path) -> None:
    async def body() -> tuple[str, str, str]:
        d = busy_daemon()
        async with serve(admin.make_app(d)) as url:
            check_done(d)
            standalone, ctype = await scrape(url)
            assert ctype.startswith("text/plain; version=0.0.4")
            attach_fake_failover(d, FakeFailover())
            paired, _ = await scrape(url)
            om, om_type = await scrape(url, "application/openmetrics-text; version=1.0.0")
            assert om_type.startswith("application/openmetrics-text")
            assert om.rstrip().endswith("# EOF")
            return standalone, paired, om

    standalone, paired, _ = asyncio.run(body())
    alone = _check_families(standalone, failover=False)
    both = _check_families(paired, failover=True)
    # Everything a busy standalone node can say is said, and ProcessCollector is namespaced.
    # (TLS, SNI-routing and local-answer series exist only with such listeners:
    # tests/test_tls_e2e.py scrapes them from a daemon that has them; discovery and sync
    # series only with [pool.discovery] and a peer: tests/test_elastic_pair.py; maglev,
    # sticky and access log series only with such pools and [logging] access_log:
    # tests/test_affinity_e2e.py and tests/test_access_log_e2e.py; accept queue series only
    # with bound listeners: tests/test_accept_balance.py.)
    missing = {
        m.name for m in metrics.METRICS if not m.failover_only and not m.name.startswith(
            ("pairlb_worker_", "pairlb_tls_", "pairlb_sni_", "pairlb_local_",
             "pairlb_discovery_", "pairlb_sync_", "pairlb_maglev_", "pairlb_sticky_",
             "pairlb_access_log_", "pairlb_listener_accept_")
        )
    } - alone
    assert not missing, missing
    assert "pairlb_process_cpu_seconds_total" in both
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    for text in (standalone, paired):
        res = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
        )
        assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_values_match_the_daemon_state() -> None:
    async def body() -> None:
        d = busy_daemon()
        d.set_admin_state("web", "b2", AdminState.DRAINING)
        d.inflight = {0: {"web/b2": 2}, 1: {"web/b2": 1}}
        async with serve(admin.make_app(d)) as url:
            s = parse_metrics((await scrape(url))[0])
        assert total(s, "pairlb_backend_admin_state", backend="b2", state="draining") == 1
        assert total(s, "pairlb_backend_admin_state", backend="b2", state="enabled") == 0
        assert total(s, "pairlb_backend_admin_state", backend="b1", state="enabled") == 1
        assert total(s, "pairlb_backend_inflight_requests", backend="b2") == 3
        assert total(s, "pairlb_backend_errors_total", backend="b2") == 2
        assert total(s, "pairlb_backend_errors_total", reason="timeout") == 1
        assert total(s, "pairlb_requests_total", backend="-", code_class="5xx") == 1
        assert total(s, "pairlb_connections_accepted_total") == 2
        assert total(s, "pairlb_connections_active") == 1
        assert total(s, "pairlb_tcp_bytes_total", direction="out") == 2000
        assert total(s, "pairlb_config_reloads_total", result="failure") == 1
        assert total(s, "pairlb_config_last_reload_successful") == 1  # no reload yet
        assert total(s, "pairlb_health_checks_total", backend="b3", status="L4_REFUSED") == 4
        # Backends start DOWN until a check passes (initial = "down"): not ready.
        assert total(s, "pairlb_backend_healthy") == 0
        assert total(s, "pairlb_ready") == 0
        assert total(s, "pairlb_role", role="STANDALONE") == 1
        assert total(s, "pairlb_role", role="MASTER") == 0

    asyncio.run(body())


def test_failover_metrics_follow_the_controller() -> None:
    async def body() -> None:
        d = in_process_daemon(cfg())
        fake = FakeFailover(role="MASTER", peer_role="BACKUP", match=True)
        attach_fake_failover(d, fake)
        async with serve(admin.make_app(d)) as url:
            s = parse_metrics((await scrape(url))[0])
            assert {r: total(s, "pairlb_role", role=r) for r in metrics.ROLES} == {
                "MASTER": 1, "BACKUP": 0, "FAULT": 0, "INIT": 0, "STANDALONE": 0
            }
            assert total(s, "pairlb_vip_held") == 1
            assert total(s, "pairlb_role_transitions_total", to="MASTER") == 1
            assert total(s, "pairlb_role_transitions_total", **{"from": "INIT"}) == 1
            assert total(s, "pairlb_heartbeats_rejected_total", reason="bad_mac") == 3
            assert total(s, "pairlb_heartbeats_sent_total") == 1200
            assert total(s, "pairlb_peer_heartbeat_age_seconds", peer="lb2") == 0.031
            assert total(s, "pairlb_peer_config_digest_match", peer="lb2") == 1
            assert total(s, "pairlb_peer_role", peer="lb2", role="BACKUP") == 1
            assert total(s, "pairlb_failover_alive_peers") == 1
            # The peer took over and its config differs: the next scrape says so.
            fake.role, fake.peer_role, fake.match = "BACKUP", "MASTER", False
            s = parse_metrics((await scrape(url))[0])
            assert total(s, "pairlb_role", role="BACKUP") == 1
            assert total(s, "pairlb_role", role="MASTER") == 0
            assert total(s, "pairlb_vip_held") == 0
            assert total(s, "pairlb_peer_role", peer="lb2", role="MASTER") == 1
            assert total(s, "pairlb_peer_config_digest_match", peer="lb2") == 0

    asyncio.run(body())


def test_health_check_histogram_only_for_configured_backends() -> None:
    async def body() -> None:
        d = in_process_daemon(cfg())
        async with serve(admin.make_app(d)) as url:
            results = [
                (("web", "b1"), CheckResult(CheckStatus.L7_OK, 0.0004, 200)),
                (("web", "b1"), CheckResult(CheckStatus.L7_OK, 0.003, 200)),
                (("web", "b2"), CheckResult(CheckStatus.L4_TIMEOUT, 0.5)),
                (("web", "gone"), CheckResult(CheckStatus.L4_REFUSED, 0.001)),
            ]
            for key, res in results:
                for observe in d.check_observers:
                    observe(key, res)
            s = parse_metrics((await scrape(url))[0])
        name = "pairlb_health_check_duration_seconds"
        assert total(s, f"{name}_count", backend="b1") == 2
        assert total(s, f"{name}_bucket", backend="b1", le="0.0005") == 1
        assert total(s, f"{name}_bucket", backend="b1", le="0.005") == 2
        assert total(s, f"{name}_bucket", backend="b2", le="0.25") == 0
        assert total(s, f"{name}_bucket", backend="b2", le="0.5") == 1
        assert total(s, f"{name}_sum", backend="b2") == pytest.approx(0.5)
        assert total(s, f"{name}_count", backend="gone") == 0

    asyncio.run(body())


def test_proc_reader_sees_cpu_and_memory_and_dead_processes() -> None:
    here = metrics.read_proc(os.getpid())
    assert here is not None and here.cpu_s > 0 and here.rss_bytes > 10 << 20
    child = subprocess.Popen(
        ["python3", "-c", "x = bytearray(64 << 20); import time; time.sleep(30)"],
        stdout=subprocess.PIPE,
    )
    try:
        import time

        deadline = time.monotonic() + 10
        sample = metrics.read_proc(child.pid)
        while (sample is None or sample.rss_bytes < 64 << 20) and time.monotonic() < deadline:
            time.sleep(0.05)
            sample = metrics.read_proc(child.pid)
        assert sample is not None and sample.rss_bytes >= 64 << 20
    finally:
        child.kill()
        child.wait()
    assert metrics.read_proc(child.pid) is None


# -- the dashboard and the docs -----------------------------------------------------------------


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    for a in dash["annotations"]["list"]:
        if "expr" in a:
            out.append(("annotation " + a["name"], a["expr"]))
    for v in dash["templating"]["list"]:
        q = v.get("query")
        if isinstance(q, dict) and "label_values(" in q["query"]:
            inner = q["query"].split("label_values(", 1)[1].rsplit(",", 1)[0]
            out.append(("variable " + v["name"], inner))
    return out


def test_dashboard_is_valid_and_covers_what_operators_look_for() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for want in ("active node", "failovers", "request rate per backend", "errors per backend",
                 "latency percentiles", "backend health timeline", "heartbeat age",
                 "worker restarts"):
        assert want in titles, want
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"], p["title"]
    for title, expr in dashboard_exprs():
        used = promql_metric_names(expr)
        assert used, (title, expr)
        unknown = {m for m in used if metrics.family_of(m) is None}
        assert not unknown, f"panel {title!r} queries {unknown}, which pairlb does not export"


def test_docs_list_every_metric_and_endpoint() -> None:
    text = DOCS.read_text()
    for m in metrics.ALL_METRICS:
        assert f"`{m.name}`" in text, f"{m.name} missing from {DOCS.name}"
    for route in ("GET /status", "GET /healthz", "GET /readyz", "GET /metrics", "GET /",
                  "POST /backends/{pool}/{backend}/drain", "POST /failover/switchover",
                  "POST /reload"):
        assert route in text, route
