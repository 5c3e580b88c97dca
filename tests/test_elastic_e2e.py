"""Backends added and removed at runtime on a real node: real backends, real workers, an
open-loop client (lab.load) and Prometheus-style scraping of /metrics throughout.

The promise: scaling a pool up by two and down by two under load fails no request; an
added backend gets no request before its first passing check; a removed one drains (its
requests in flight finish) and is then gone from /status.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from admin_helpers import (
    LOOPBACK,
    PYTHON,
    ROOT,
    Backends,
    Pairlb,
    free_port,
    get_json,
    http,
    wait_until,
)

from lab.load import RecordLog

MIN_LOAD_S = 7.5
"""Of the scaling test's 9 s client (its --duration is a bound): 1,125 requests at 150/s,
> 1,000 wanted."""


class Scraper:
    """GET /metrics every 0.5 s in a thread, as Prometheus would; counts failures."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.ok = 0
        self.failed: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                status, _, _ = http("GET", self.url + "/metrics", timeout_s=5.0)
                if status == 200:
                    self.ok += 1
                else:
                    self.failed.append(str(status))
            except OSError as exc:
                self.failed.append(repr(exc))

    def __enter__(self) -> Scraper:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def api(node: Pairlb, method: str, path: str, body: Any = None,
        token: str | None = "default") -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    status, _, raw = http(method, node.admin + path, body=data,
                          token=node.token if token == "default" else token,
                          headers={"Content-Type": "application/json"})
    return status, json.loads(raw) if raw else None


def members(node: Pairlb, pool: str = "web") -> dict[str, dict[str, Any]]:
    st = node.status()
    return {b["name"]: b for p in st["pools"] if p["name"] == pool for b in p["backends"]}


def served(be: Backends, name: str) -> int:
    return int(sum(be.stats(name)["by_method"].values()))


def cli(node: Pairlb, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "lb", *args, "--admin", node.admin, "--token-file", str(node.token_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=30)


def load(node: Pairlb, out: Path, rate: float, duration_s: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [PYTHON, "-m", "lab.load", f"{LOOPBACK}:{node.listen_port}", str(out),
         "--rate", str(rate), "--duration", str(duration_s), "--max-requests", "20000"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_scaling_up_by_two_and_down_by_two_under_load_fails_no_request(tmp_path: Path) -> None:
    with Backends(["web1", "web2", "web3", "web4"]) as be:
        cfg_backends = Backends.__new__(Backends)
        cfg_backends.ports = {n: be.ports[n] for n in ("web1", "web2")}
        with Pairlb(tmp_path, cfg_backends) as node, Scraper(node.admin) as scraper:
            out = tmp_path / "load.txt"
            client = load(node, out, rate=150, duration_s=9)
            t_load = time.monotonic()
            try:
                time.sleep(1)
                # Up by two: one through the CLI, one through the API.
                r = cli(node, "backend", "add", "web", "web3", f"{LOOPBACK}:{be.ports['web3']}")
                assert r.returncode == 0, r.stderr
                assert "web/web3 added" in r.stdout
                status, body = api(node, "POST", "/pools/web/backends",
                                   {"name": "web4", "address": f"{LOOPBACK}:{be.ports['web4']}",
                                    "weight": 2})
                assert status == 201, body
                assert body["backend"] == {"name": "web4",
                                           "address": f"{LOOPBACK}:{be.ports['web4']}",
                                           "weight": 2}
                wait_until(lambda: all(members(node)[n]["in_rotation"] for n in ("web3", "web4")),
                           5, "web3 and web4 in rotation")
                m = members(node)
                assert m["web3"]["source"] == "api" and m["web1"]["source"] == "config"
                wait_until(lambda: served(be, "web4") > 0, 5, "web4 served")
                time.sleep(1)
                # Down by two: the config's own backends.
                status, body = api(node, "DELETE", "/pools/web/backends/web1")
                assert status == 202, body
                r = cli(node, "backend", "remove", "web", "web2", "--wait", "15")
                assert r.returncode == 0, r.stderr
                wait_until(lambda: not ({"web1", "web2"} & set(members(node))), 15,
                           "web1 and web2 gone from /status")
                seen = {n: served(be, n) for n in ("web1", "web2")}
                time.sleep(1)
                after = {n: served(be, n) for n in ("web1", "web2")}
                assert after == seen, "removed backends still get requests"
                # The changes are over (in ~6 s): at least MIN_LOAD_S of load in all, then
                # SIGTERM (lab.load sends no more and waits for what is in flight).
                time.sleep(max(0.0, t_load + MIN_LOAD_S - time.monotonic()))
                client.terminate()
            finally:
                _, err = client.communicate(timeout=30)
            records = RecordLog(out).poll()
            assert len(records) > 1000, len(records)
            failed = [r for r in records if not r.ok]
            assert failed == [], (len(failed), failed[:5], err[-2000:])
            by_backend = Counter(r.backend for r in records)
            assert by_backend["web3"] > 50 and by_backend["web4"] > 50, by_backend
            assert scraper.failed == [] and scraper.ok >= 10, (scraper.ok, scraper.failed)
            assert set(members(node)) == {"web3", "web4"}


def test_an_added_backend_gets_no_request_before_its_first_passing_check(
        tmp_path: Path) -> None:
    with Backends(["web1"]) as be, Pairlb(tmp_path, be) as node:
        dead = free_port()  # nothing listens there
        status, body = api(node, "POST", "/pools/web/backends",
                           {"name": "ghost", "address": f"{LOOPBACK}:{dead}"})
        assert status == 201, body
        assert body["in_rotation"] is False
        wait_until(lambda: (members(node)["ghost"]["last_check"] or {}).get("status"), 5,
                   "a check of ghost")
        counts = Counter()
        for _ in range(60):
            counts[http("GET", node.url + "/", timeout_s=5)[0]] += 1
        assert counts == {200: 60}, counts
        ghost = members(node)["ghost"]
        assert ghost["in_rotation"] is False and ghost["health"] == "down"
        assert ghost["requests"] == 0 and ghost["errors"] == 0


def test_runtime_changes_are_refused_with_a_reason_and_change_nothing(tmp_path: Path) -> None:
    with Backends(["web1"]) as be, Pairlb(tmp_path, be) as node:
        addr = f"{LOOPBACK}:{be.ports['web1']}"
        cases: list[tuple[str, str, Any, str | None, int, str]] = [
            ("POST", "/pools/web/backends", {"name": "x", "address": addr}, None, 401, "token"),
            ("POST", "/pools/web/backends", {"name": "x", "address": addr}, "wrong", 403,
             "wrong token"),
            ("DELETE", "/pools/web/backends/web1", None, None, 401, "token"),
            ("POST", "/pools/nope/backends", {"name": "x", "address": addr}, "default", 404,
             "no pool named 'nope'"),
            ("POST", "/pools/web/backends", {"name": "web1", "address": addr}, "default", 409,
             "has a backend named 'web1'"),
            ("POST", "/pools/web/backends", {"name": "x y", "address": addr}, "default", 400,
             "invalid backend name"),
            ("POST", "/pools/web/backends", {"name": "x", "address": "nope"}, "default", 400,
             "body.address"),
            ("POST", "/pools/web/backends", {"name": "x", "address": addr, "weight": 5000},
             "default", 400, "body.weight"),
            ("POST", "/pools/web/backends", {"name": "x", "address": addr, "weight": "2"},
             "default", 400, "body.weight"),
            ("POST", "/pools/web/backends", {"name": "x", "address": addr, "extra": 1},
             "default", 400, "unknown key"),
            ("POST", "/pools/web/backends", ["x"], "default", 400, "JSON object"),
            ("POST", "/pools/web/backends", {"address": addr}, "default", 400, "body.name"),
            ("DELETE", "/pools/web/backends/nope", None, "default", 404, "no backend named"),
            ("DELETE", "/pools/nope/backends/web1", None, "default", 404, "no pool named"),
        ]
        for method, path, body, token, want, text in cases:
            status, got = api(node, method, path, body, token)
            assert status == want and text in got["error"], (method, path, body, status, got)
        status, _, raw = http("POST", node.admin + "/pools/web/backends", body=b"{not json",
                              token=node.token)
        assert status == 400 and b"not JSON" in raw
        assert set(members(node)) == {"web1"}
        assert get_json(node.admin + "/readyz")["ready"] is True


def test_runtime_changes_survive_reloads_and_restarts_and_the_config_takes_over(
        tmp_path: Path) -> None:
    """Precedence (docs/elastic-pools.md): the config is the base, runtime changes an overlay
    kept in state_dir; a reload or restart keeps them, and an entry the config now carries
    identically is retired (the config shows through again), with a note saying so."""
    with Backends(["web1", "web2", "web3"]) as be:
        base = Backends.__new__(Backends)
        base.ports = {n: be.ports[n] for n in ("web1", "web2")}
        web3 = f"{LOOPBACK}:{be.ports['web3']}"
        with Pairlb(tmp_path, base) as node:
            status, _ = api(node, "POST", "/pools/web/backends", {"name": "web3", "address": web3})
            assert status == 201
            assert api(node, "DELETE", "/pools/web/backends/web1")[0] == 202
            wait_until(lambda: "web1" not in members(node), 10, "web1 gone")
            status, body = api(node, "POST", "/reload")
            assert status == 200, body
            m = members(node)
            assert set(m) == {"web2", "web3"} and m["web3"]["source"] == "api"
            st = node.status()
            assert st["pools"][0]["tombstoned"] == ["web1"]
            assert st["runtime"]["overlay"]["entries"] == 2
            digest = st["runtime"]["overlay"]["digest"]
        with Pairlb(tmp_path, base) as node:  # a restart: same state_dir
            wait_until(lambda: members(node).get("web3", {}).get("in_rotation"), 5,
                       "web3 back in rotation after the restart")
            assert set(members(node)) == {"web2", "web3"}
            assert node.status()["runtime"]["overlay"]["digest"] == digest
            # The config now lists web3 as the API made it: the runtime entry retires.
            text = node.config.read_text().replace(
                "backends = [ ", f'backends = [ {{ name = "web3", address = "{web3}" }}, ')
            node.config.write_text(text)
            status, body = api(node, "POST", "/reload")
            assert status == 200, body
            assert any("web3: now in the config, runtime entry retired" in c
                       for c in body["changes"]), body["changes"]
            m = members(node)
            assert m["web3"]["source"] == "config" and "web1" not in m
            assert node.status()["runtime"]["overlay"]["entries"] == 1  # web1's tombstone
