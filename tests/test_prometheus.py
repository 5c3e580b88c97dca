"""A real pairlb (2 workers, real backends) scraped by promtool and by a real Prometheus.

- N requests through 2 workers (half each, the other paused) show N: in pairlb_requests_total,
  in the histogram's count, in GET /status, and at the backends themselves.
- ``promtool check metrics`` passes on the real scrape.
- Debian's Prometheus scrapes the admin endpoint and answers PromQL about it, including every
  query of the Grafana dashboard.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import (
    LOOPBACK,
    ROOT,
    Backends,
    Pairlb,
    drive,
    failover_pair,
    free_port,
    get_json,
    http,
    parse_metrics,
    promql_metric_names,
    total,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

from lb.admin import metrics

N = 400
DASHBOARD = ROOT / "deploy" / "grafana" / "pairlb-dashboard.json"

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pairlb, Backends]]:
    tmp = tmp_path_factory.mktemp("pairlb")
    with Backends(["b1", "b2"]) as be, Pairlb(tmp, be, workers=2, response_timeout_s=0.5) as lb:
        yield lb, be


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with failover_pair(tmp_path_factory.mktemp("pair")) as p:
        yield p


@pytest.fixture(scope="module")
def prom(
    node: tuple[Pairlb, Backends], pair: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus not installed")
    lb, _ = node
    jobs = {
        "pairlb": [f"{LOOPBACK}:{lb.admin_port}"],
        "pairlb-pair": [u.removeprefix("http://") for u in pair["urls"].values()],
        # The same node scraped without per-backend series (big pools, issue 12).
        "pairlb-pools": [f"{LOOPBACK}:{lb.admin_port}"],
    }
    params = {"pairlb-pools": {"backend_series": ["none"]}}
    p = Prometheus(tmp_path_factory.mktemp("prometheus"), jobs, params)
    try:
        yield p
    finally:
        p.stop()


def scrape(lb: Pairlb) -> Any:
    return parse_metrics(lb.metrics())


def test_n_requests_through_two_workers_show_n(node: tuple[Pairlb, Backends]) -> None:
    """Both workers serve half of N each (the other one is SIGSTOPped meanwhile, so the
    split is certain: an idle worker that wakes first would otherwise win every accept), and
    the control process's sum is exactly N."""
    lb, be = node
    pids = [w["pid"] for w in sorted(lb.status()["workers"], key=lambda w: w["index"])]
    assert len(pids) == 2
    base = scrape(lb)
    assert total(base, "pairlb_requests_total") == 0
    conns_before = total(base, "pairlb_connections_accepted_total")
    per_worker: list[float] = []
    for serving, paused in ((0, 1), (1, 0)):
        os.kill(pids[paused], signal.SIGSTOP)
        try:
            with socket.create_connection((LOOPBACK, lb.listen_port), 2):  # held: who took it?
                wait_until(lambda w=str(serving): total(
                    scrape(lb), "pairlb_worker_connections_active", worker=w) == 1,
                    5, "accepted", 0.05)
            counts = drive(lb.url + "/", N // 2, concurrency=8)
            assert counts == {200: N // 2}
        finally:
            os.kill(pids[paused], signal.SIGCONT)
        per_worker.append(N // 2)
    assert [w["pid"] for w in sorted(lb.status()["workers"], key=lambda w: w["index"])] == pids

    def settled() -> Any:
        s = scrape(lb)
        return s if total(s, "pairlb_requests_total") >= N else None

    s = wait_until(settled, 5, f"{N} requests in the metrics", 0.1)
    time.sleep(0.6)  # two more stats intervals: nothing may be counted twice
    s = scrape(lb)
    assert total(s, "pairlb_requests_total") == N
    assert total(s, "pairlb_requests_total", code_class="2xx") == N
    assert total(s, "pairlb_request_duration_seconds_count") == N
    assert total(s, "pairlb_request_duration_seconds_bucket", le="+Inf") == N
    assert total(s, "pairlb_connections_accepted_total") == conns_before + N + 2
    st = lb.status()
    by_backend = {b["name"]: b["requests"] for b in st["pools"][0]["backends"]}
    seen = {n: be.stats(n)["by_method"].get("GET", 0) for n in ("b1", "b2")}
    assert sum(by_backend.values()) == N
    assert by_backend == seen  # the backends' own count agrees, backend by backend
    for n in ("b1", "b2"):
        assert total(s, "pairlb_requests_total", backend=n) == seen[n]
    print(f"{N} requests: metrics {total(s, 'pairlb_requests_total'):.0f}, backends {seen}, "
          f"served per worker {per_worker}")


def test_promtool_check_metrics_on_a_real_scrape(node: tuple[Pairlb, Backends]) -> None:
    lb, _ = node
    text = lb.metrics()
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed")
    res = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr
    declared = set(metrics.declared_names())
    names = {
        fam.name + ("_total" if fam.type == "counter" else "_info" if fam.type == "info" else "")
        for fam in text_string_to_metric_families(text)
    }
    assert names <= declared, names - declared
    s = parse_metrics(text)
    for w in ("0", "1"):
        assert total(s, "pairlb_worker_ready", worker=w) == 1
        assert total(s, "pairlb_worker_cpu_seconds_total", worker=w) > 0
        assert total(s, "pairlb_worker_resident_memory_bytes", worker=w) > 5 << 20
    assert total(s, "pairlb_process_resident_memory_bytes") > 5 << 20
    assert total(s, "pairlb_ready") == 1
    assert total(s, "pairlb_backend_healthy") == 2
    assert total(s, "pairlb_health_checks_total", status="L7_OK") > 0


def _substitute(expr: str, job: str = "pairlb") -> str:
    for var, value in (("$__rate_interval", "10s"), ("$__range", "1m"), ("$job", job),
                       ("$instance", ".*")):
        expr = expr.replace(var, value)
    return expr


class Prometheus:
    """Debian's prometheus scraping every second, in a temp dir; stopped by PID."""

    def __init__(
        self,
        tmp: Path,
        jobs: dict[str, list[str]],
        params: dict[str, dict[str, list[str]]] | None = None,
    ) -> None:
        self.port = free_port()
        self.tmp = tmp
        params = params or {}
        scrape = "".join(
            f"  - job_name: {job}\n    static_configs:\n      - targets: {targets!r}\n"
            + (f"    params: {json.dumps(params[job])}\n" if job in params else "")
            for job, targets in jobs.items()
        )
        (tmp / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"scrape_configs:\n{scrape}"
        )
        self.started = time.monotonic()
        self.log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                shutil.which("prometheus") or "prometheus",
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address={LOOPBACK}:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def query(self, expr: str) -> Any:
        q = urllib.parse.urlencode({"query": expr})
        return get_json(f"http://{LOOPBACK}:{self.port}/api/v1/query?{q}")

    def value(self, expr: str) -> float | None:
        try:
            res = self.query(expr)["data"]["result"]
        except (OSError, AssertionError):
            return None
        return float(res[0]["value"][1]) if res else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()


def test_real_prometheus_scrapes_pairlb_and_runs_the_dashboard(
    node: tuple[Pairlb, Backends], prom: Prometheus
) -> None:
    lb, _ = node
    # Some of everything the dashboard shows: a backend too slow (504, response_timeout),
    # a malformed request (400), and ordinary traffic.
    assert http("GET", lb.url + "/sleep/1")[0] == 504
    with socket.create_connection((LOOPBACK, lb.listen_port), 2) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        assert c.recv(100).startswith(b"HTTP/1.1 400")
    drive(lb.url + "/", 50)
    wait_until(lambda: total(scrape(lb), "pairlb_bad_requests_total") == 1, 5, "bad request")
    wait_until(lambda: total(scrape(lb), "pairlb_backend_errors_total") == 1, 5, "504 error")
    time.sleep(0.6)
    want = total(scrape(lb), "pairlb_requests_total")
    q = 'sum(pairlb_requests_total{job="pairlb"})'
    wait_until(lambda: prom.value(q) == want, 25, f"Prometheus to see {want:.0f} requests", 0.2)
    took = time.monotonic() - prom.started
    assert prom.value('up{job="pairlb"}') == 1
    assert prom.value('pairlb_role{job="pairlb", role="STANDALONE"}') == 1
    assert prom.value('count(pairlb_worker_ready{job="pairlb"} == 1)') == 2
    # Rates need two scrapes of the same series.
    rate = 'count(rate(pairlb_requests_total{job="pairlb"}[10s]))'
    wait_until(lambda: prom.value(rate), 10, "a rate")
    print(f"Prometheus answered sum(pairlb_requests_total) = {want:.0f} "
          f"{took:.1f} s after it started")

    # Every dashboard query runs; the core panels have data from a standalone node.
    dash = json.loads(DASHBOARD.read_text())
    scraped = {
        fam.name + ("_total" if fam.type == "counter" else "")
        for fam in text_string_to_metric_families(lb.metrics())
    } | {"pairlb_build_info", "pairlb_config_info"}
    failover_only = {m.name for m in metrics.METRICS if m.failover_only}
    # TLS series exist only on a TLS listener (tests/test_tls_e2e.py scrapes them); their
    # panels' queries still run through Prometheus here.
    failover_only |= {m.name for m in metrics.METRICS if m.name.startswith("pairlb_tls_")}
    # Discovery and sync series exist only with [pool.discovery] and a peer
    # (tests/test_discovery_e2e.py and tests/test_elastic_pair.py scrape them).
    failover_only |= {m.name for m in metrics.METRICS
                      if m.name.startswith(("pairlb_discovery_", "pairlb_sync_"))}
    # Access log, sticky and maglev series exist only with [logging] access_log and such
    # pools (tests/test_access_log_e2e.py and tests/test_affinity_e2e.py scrape them).
    failover_only |= {m.name for m in metrics.METRICS if m.name.startswith(
        ("pairlb_access_log_", "pairlb_sticky_", "pairlb_maglev_"))}
    exprs: dict[str, list[str]] = {}
    for p in dash["panels"]:
        for t in p.get("targets", []):
            expr = _substitute(t["expr"])
            for name in promql_metric_names(expr):
                fam = metrics.family_of(name)
                assert fam in scraped | failover_only, (p["title"], name)
            res = prom.query(expr)
            assert res["status"] == "success", (p["title"], expr, res)
            exprs.setdefault(p["title"], []).append(expr)
    for title in ("Role per node", "Request rate per backend", "Latency percentiles",
                  "Backend health timeline", "Pools", "Worker restarts", "CPU",
                  "Memory and reloads"):
        wait_until(lambda e=exprs[title]: any(prom.query(x)["data"]["result"] for x in e),
                   10, f"panel {title!r} to show a live node", 0.3)


def _alert_expr(name: str) -> str:
    from test_alert_rules import rules

    return rules()[name]


def test_prometheus_shows_the_pair_and_follows_a_switchover(
    pair: dict[str, Any], prom: Prometheus
) -> None:
    """Two nodes with real failover controllers: the dashboard's failover panels and the
    split-brain alerts see the truth, before and after a switchover through the admin API."""
    dash = json.loads(DASHBOARD.read_text())
    panel = {p["title"]: p for p in dash["panels"]}

    def active() -> list[str]:
        expr = _substitute(panel["Active node"]["targets"][0]["expr"], "pairlb-pair")
        try:
            res = prom.query(expr)["data"]["result"]
        except (OSError, AssertionError):
            return []
        return sorted(r["metric"]["node"] for r in res)

    wait_until(lambda: active() == ["lb1"], 20, "Prometheus to show lb1 active", 0.2)
    roles = prom.query(_substitute(panel["Role per node"]["targets"][0]["expr"], "pairlb-pair"))
    by_node = {r["metric"]["node"]: r["value"][1] for r in roles["data"]["result"]}
    assert by_node == {"lb1": "4", "lb2": "3"}  # the panel's mapping: MASTER, BACKUP
    for title in ("Peer heartbeat age", "Heartbeats", "VIP and peers"):
        exprs = [_substitute(t["expr"], "pairlb-pair") for t in panel[title]["targets"]]
        # Rates need two scrapes: give Prometheus a few seconds.
        wait_until(lambda e=exprs: any(prom.query(x)["data"]["result"] for x in e), 10,
                   f"panel {title!r} to show the pair", 0.3)
    for alert in ("PairlbNoMaster", "PairlbTwoMasters", "PairlbConfigDigestMismatch"):
        assert prom.query(_alert_expr(alert))["data"]["result"] == [], alert
    assert prom.value('sum(pairlb_role{job="pairlb-pair", role="MASTER"})') == 1

    token = (pair["daemons"]["lb1"].cfg.admin.token_file and
             Path(pair["daemons"]["lb1"].cfg.admin.token_file).read_text().strip())
    status, _, body = http("POST", pair["urls"]["lb1"] + "/failover/switchover", token=token)
    assert status == 200, body
    wait_until(lambda: active() == ["lb2"], 10, "Prometheus to show lb2 active", 0.2)
    changes = prom.value(
        'sum(increase(pairlb_role_transitions_total{job="pairlb-pair", to="MASTER"}[1m]))'
    )
    assert changes is not None and changes >= 1


def test_prometheus_scrapes_pool_totals_without_per_backend_series(
    node: tuple[Pairlb, Backends], prom: Prometheus
) -> None:
    """?backend_series=none (the option for pools of thousands): Prometheus gets one
    backend="*" series per pool and class, whose sums equal the per-backend job's."""
    lb, _ = node
    drive(lb.url + "/", 20)
    time.sleep(0.6)
    full = 'sum(pairlb_requests_total{job="pairlb"})'
    pools = 'sum(pairlb_requests_total{job="pairlb-pools"})'
    wait_until(lambda: prom.value(full) is not None and prom.value(full) == prom.value(pools),
               15, "the same request total from both jobs", 0.3)
    res = prom.query('count by (backend) (pairlb_requests_total{job="pairlb-pools"})')
    assert {r["metric"]["backend"] for r in res["data"]["result"]} <= {"*", "-"}
    assert prom.query('pairlb_backend_healthy{job="pairlb-pools"}')["data"]["result"] == []
    assert prom.value('sum(pairlb_pool_usable_backends{job="pairlb-pools"})') == 2
