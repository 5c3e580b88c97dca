"""/metrics for big pools: the direct text renderer, scopes, per-backend series, gzip.

- The renderer writes exactly what prometheus_client writes for the same samples, in the
  text and OpenMetrics formats (label values that need escaping included).
- ``?scope=`` and ``[admin] metrics_backend_series`` / ``?backend_series=`` choose what a
  scrape holds; pool totals (``backend="*"``) stay right and never count a backend twice;
  promtool accepts every variant.
- gzip when the client accepts it.
"""

from __future__ import annotations

import asyncio
import gzip
import shutil
import subprocess
from typing import Any

import aiohttp
import pytest
from admin_helpers import (
    FakeFailover,
    attach_fake_failover,
    config_text,
    free_port,
    in_process_daemon,
    parse_metrics,
    serve,
    total,
)
from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as om_latest
from prometheus_client.parser import text_string_to_metric_families
from test_metrics import busy_daemon, check_done

from lb.admin import metrics
from lb.admin import server as admin
from lb.control.daemon import merge_counts
from lb.control.rotation import AdminState

pytestmark = pytest.mark.timeout(60)

CLOCK_READINGS = ("pairlb_role_changed_timestamp_seconds", "pairlb_peer_heartbeat_age_seconds")
OM = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def without_process(text: str) -> str:
    """The control process's own metrics change between two renders (CPU time): drop them."""
    return "".join(
        line + "\n" for line in text.splitlines() if "pairlb_process_" not in line
    )


def weird_daemon() -> Any:
    d = busy_daemon()
    # Label values that need escaping reach the exposition through worker stats.
    merge_counts(d.totals, {"bad_requests": {"web": {'quo"te\\back\nline': {"400": 2}}}})
    attach_fake_failover(d, FakeFailover())
    return d


def test_renderer_writes_what_prometheus_client_writes() -> None:
    async def body() -> None:
        d = weird_daemon()
        exp = metrics.Exposition(d)
        check_done(d)
        reg = exp.registry()
        for openmetrics, reference in ((False, generate_latest), (True, om_latest)):
            fast = exp.render(openmetrics).decode()
            slow = reference(reg).decode()
            fast_lines = without_process(fast).splitlines()
            slow_lines = without_process(slow).splitlines()
            assert len(fast_lines) == len(slow_lines)
            for a, b in zip(fast_lines, slow_lines, strict=True):
                if a != b:  # only a clock reading may differ between the two renders
                    assert a.startswith(CLOCK_READINGS), (a, b)
                    assert a.rsplit(" ", 1)[0] == b.rsplit(" ", 1)[0]
            assert "pairlb_process_cpu_seconds_total" in fast
        assert 'reason="quo\\"te\\\\back\\nline"' in fast
        # The scrape path: a copy taken on the loop, formatted (and gzipped) in a thread.
        threaded, gzipped = await exp.render_async(True, gzip_min=1)
        assert gzipped
        def names(text: str) -> list[str]:  # clock readings differ between two renders
            return [line.rsplit(" ", 1)[0] for line in without_process(text).splitlines()]

        assert names(gzip.decompress(threaded).decode()) == names(exp.render(True).decode())
        plain, gzipped = await exp.render_async(False, gzip_min=None)
        assert not gzipped and plain.startswith(b"# HELP pairlb_build_info")

    asyncio.run(body())


def up_daemon(n: int) -> Any:
    text = config_text(
        listen_port=free_port(),
        admin_port=free_port(),
        backends=[(f"b{i}", 20000 + i) for i in range(n)],
    ).replace("[pool.health]\n", '[pool.health]\ninitial = "up"\n')
    d = in_process_daemon(text)
    from lb.stats import Stats

    w = Stats()
    for i in range(n):
        for code in (200, 200, 503):
            w.request("web", f"b{i}", code, 0.001 * i)
        w.error("web", f"b{i}", "timeout")
    w.request("web", "-", 503, 0.0001)
    merge_counts(d.totals, w.take_delta())
    d.inflight = {0: {f"web/b{i}": 1 for i in range(n)}}
    return d


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def backends_in(text: str) -> set[str]:
    return {
        labels["backend"]
        for rows in samples(text).values()
        for labels, _ in rows
        if "backend" in labels
    }


def test_backend_series_none_keeps_pool_totals_exact() -> None:
    async def body() -> None:
        d = up_daemon(40)
        exp = metrics.Exposition(d)
        from healthcheck import CheckResult, CheckStatus

        for i in range(40):
            for observe in d.check_observers:
                observe(("web", f"b{i}"), CheckResult(CheckStatus.L7_OK, 0.001 * i, 200))
        full = exp.render(False).decode()
        none = exp.render(False, metrics.Selection(backend_series="none")).decode()
        assert backends_in(none) == {"*", "-"}
        # What is left does not grow with the pool: the per-backend part was ~90 % at 40.
        assert len(none) < len(full) / 8
        for name in ("pairlb_requests_total", "pairlb_backend_errors_total",
                     "pairlb_backend_inflight_requests",
                     "pairlb_health_check_duration_seconds_count",
                     "pairlb_health_check_duration_seconds_sum"):
            want = total(parse_metrics(full), name)
            assert total(parse_metrics(none), name) == pytest.approx(want), name
        # Per code class too, and the "no backend chosen" series stays as it was.
        for cls in ("2xx", "5xx"):
            assert total(parse_metrics(none), "pairlb_requests_total", code_class=cls) == (
                total(parse_metrics(full), "pairlb_requests_total", code_class=cls)
            )
        assert total(parse_metrics(none), "pairlb_requests_total", backend="-") == 1
        # State gauges have no meaningful sum: gone; pool gauges stay.
        s = samples(none)
        for gone in ("pairlb_backend_healthy", "pairlb_backend_in_rotation",
                     "pairlb_backend_admin_state", "pairlb_backend_effective_weight"):
            assert gone not in s, gone
        assert total(parse_metrics(none), "pairlb_pool_usable_backends") == 40
        buckets = [v for labels, v in s["pairlb_health_check_duration_seconds_bucket"]]
        assert buckets == sorted(buckets)  # still cumulative after summing

    asyncio.run(body())


def test_backend_series_unhealthy_shows_only_backends_out_of_service() -> None:
    async def body() -> None:
        d = up_daemon(30)
        d.set_admin_state("web", "b7", AdminState.DRAINING)
        d.set_admin_state("web", "b9", AdminState.MAINTENANCE)
        exp = metrics.Exposition(d)
        text = exp.render(True, metrics.Selection(backend_series="unhealthy")).decode()
        s = parse_metrics(text)
        assert {labels["backend"] for labels, _ in samples(text)["pairlb_backend_healthy"]} == {
            "b7", "b9"
        }
        assert total(s, "pairlb_backend_admin_state", backend="b7", state="draining") == 1
        # Counters still as pool totals only (a backend's series must not come and go).
        assert {labels["backend"] for labels, _ in samples(text)["pairlb_requests_total"]} == {
            "*", "-"
        }
        assert total(s, "pairlb_requests_total") == 91

    asyncio.run(body())


def test_scope_selects_families_and_pool_scope_alone_has_the_totals() -> None:
    async def body() -> None:
        d = up_daemon(5)
        exp = metrics.Exposition(d)
        node = samples(exp.render(False, metrics.parse_selection(["node"], None, "all")).decode())
        assert "pairlb_ready" in node and "pairlb_process_cpu_seconds_total" in node
        assert "pairlb_role" in node  # alerts need it on every node
        assert not [n for n in node if n.startswith(("pairlb_backend", "pairlb_pool",
                                                     "pairlb_worker", "pairlb_requests"))]
        pool_text = exp.render(True, metrics.parse_selection(["pool"], None, "all")).decode()
        pool = samples(pool_text)
        assert "pairlb_pool_usable_backends" in pool and "pairlb_ready" not in pool
        assert backends_in(pool_text) == {"*", "-"}
        assert total(parse_metrics(pool_text), "pairlb_requests_total") == 16
        both = metrics.parse_selection(["pool,backend"], None, "all")
        assert backends_in(exp.render(False, both).decode()) == {f"b{i}" for i in range(5)} | {
            "-"
        }  # per backend, so no "*" on top (no double count)
        assert metrics.parse_selection([], None, "none") == metrics.Selection(
            backend_series="none"
        )
        assert metrics.parse_selection(["*"], "all", "none") == metrics.ALL
        for bad in ((["bogus"], None), ([], "some")):
            with pytest.raises(ValueError):
                metrics.parse_selection(bad[0], bad[1], "all")

    asyncio.run(body())


async def get(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    headers = {"Accept-Encoding": "identity", **headers}  # aiohttp asks for gzip by default
    async with aiohttp.ClientSession(auto_decompress=False) as s, s.get(
        url, headers=headers
    ) as r:
        return r.status, dict(r.headers), await r.read()


def test_http_query_parameters_config_default_and_gzip() -> None:
    async def body() -> None:
        d = up_daemon(20)
        app = admin.make_app(d)
        async with serve(app) as url:
            status, hdrs, raw = await get(url + "/metrics", {"Accept-Encoding": "gzip",
                                                             "Accept": OM})
            assert status == 200 and hdrs["Content-Encoding"] == "gzip"
            assert hdrs["Content-Type"].startswith("application/openmetrics-text")
            text = gzip.decompress(raw).decode()
            assert text.endswith("# EOF\n") and "b19" in backends_in(text)
            status, hdrs, raw = await get(url + "/metrics?scope=worker", {"Accept-Encoding":
                                                                         "gzip"})
            assert status == 200 and "Content-Encoding" not in hdrs  # too small to bother
            status, hdrs, raw = await get(url + "/metrics", {"Accept-Encoding": "gzip;q=0"})
            assert "Content-Encoding" not in hdrs
            status, _, raw = await get(url + "/metrics?backend_series=none", {})
            assert backends_in(raw.decode()) == {"*", "-"}
            for query in ("scope=bogus", "backend_series=most"):
                status, _, raw = await get(url + "/metrics?" + query, {})
                assert status == 400 and b"unknown" in raw, raw
            # The config's default, overridable per scrape.
            d.cfg = d.cfg.model_copy(update={"admin": d.cfg.admin.model_copy(
                update={"metrics_backend_series": "none"})})
            _, _, raw = await get(url + "/metrics", {})
            assert backends_in(raw.decode()) == {"*", "-"}
            _, _, raw = await get(url + "/metrics?backend_series=all", {})
            assert "b3" in backends_in(raw.decode())

    asyncio.run(body())


def test_accept_encoding_parsing() -> None:
    yes = ("gzip", "deflate, gzip", "GZIP;q=0.5", "*", "br;q=1, gzip;q=0.1")
    no = ("", "identity", "gzip;q=0", "deflate", "gzip;q=oops", "gzipx")
    assert all(admin.accepts_gzip(h) for h in yes)
    assert not any(admin.accepts_gzip(h) for h in no)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_every_selection() -> None:
    async def body() -> list[str]:
        d = up_daemon(10)
        d.set_admin_state("web", "b2", AdminState.DRAINING)
        exp = metrics.Exposition(d)
        out = []
        for series in metrics.BACKEND_SERIES:
            for scopes in ([], ["pool"], ["backend"], ["node", "worker"]):
                sel = metrics.parse_selection(scopes, series, "all")
                out.append(exp.render(False, sel).decode())
        return out

    for text in asyncio.run(body()):
        res = subprocess.run(
            ["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
            timeout=30,
        )
        assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_status_page_pages_big_pools_problems_first_and_status_says_how_checks_keep_up() -> (
    None
):
    import json

    import jsonschema
    from admin_helpers import SCHEMA

    async def body() -> None:
        d = up_daemon(450)
        d.set_admin_state("web", "b300", AdminState.DRAINING)
        async with serve(admin.make_app(d)) as url:
            status, _, raw = await get(url + "/", {})
            page = raw.decode()
            assert status == 200
            assert page.count("<tr class='row-") == 200  # the default status_page_backends
            assert "<b>b300</b>" in page  # a problem: on the first page
            assert "450 backends: draining 1 · up 449" in page
            assert "href='/?pool=web&amp;page=3'" in page
            _, _, raw = await get(url + "/?pool=web&page=3", {})
            assert raw.decode().count("<tr class='row-") == 50
            _, _, raw = await get(url + "/?pool=web&page=99", {})  # past the end: the last
            assert raw.decode().count("<tr class='row-") == 50
            for query in ("page=x", "page=0", "pool=no%20such"):
                status, _, _ = await get(url + "/?" + query, {})
                assert status == 400, query
            status, _, raw = await get(url + "/status", {})
            st = json.loads(raw)
            jsonschema.validate(st, json.loads(SCHEMA.read_text()))
            hc = st["health_checks"]
            assert hc["targets"] == 450 and hc["in_flight"] == 0 and hc["checks"] == 0

    asyncio.run(body())
