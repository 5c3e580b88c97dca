"""A pool fed by a watched JSON file, on a real node with real backends: a file replaced by
rename is applied under load with no failed request; a half-written file keeps the last good
set (counted, exported); a runtime API change and the file coexist, and a reload keeps both.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from admin_helpers import LOOPBACK, Backends, Daemon, free_port, http, parse_metrics, total
from test_elastic_e2e import Scraper, load, members, served

from lab.load import RecordLog

MIN_LOAD_S = 5.5
"""Of the client's 7 s (its --duration is a bound): 825 requests at 150/s, > 700 wanted."""


class FileNode(Daemon):
    def __init__(self, tmp: Path, listfile: Path) -> None:
        super().__init__(tmp)
        self.listen_port = free_port()
        self.config.write_text(f"""\
[node]
name = "filenode"
workers = 2
shutdown_timeout_s = 2.0
state_dir = "{tmp / 'state'}"

[[listener]]
name = "web"
bind = "{LOOPBACK}:{self.listen_port}"
pool = "web"

[[pool]]
name = "web"
drain_timeout_s = 5.0

[pool.discovery]
type = "file"
path = "{listfile}"
interval_s = 0.2

[pool.health]
interval_s = 0.2
timeout_s = 0.2
rise = 1
fall = 2

[admin]
bind = "{LOOPBACK}:{self.admin_port}"
token_file = "{self.token_file}"
""")

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.listen_port}"


def write_atomically(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)


def test_a_watched_file_scales_the_pool_under_load_and_keeps_the_last_good_set(
        tmp_path: Path) -> None:
    with Backends(["f1", "f2", "f3", "f4", "api1"]) as be:
        listfile = tmp_path / "web.json"

        def entries(*names: str) -> list[dict[str, Any]]:
            return [{"name": n, "address": f"{LOOPBACK}:{be.ports[n]}"} for n in names]

        write_atomically(listfile, entries("f1", "f2"))
        with FileNode(tmp_path, listfile) as node, Scraper(node.admin) as scraper:
            assert {b["source"] for b in members(node).values()} == {"file"}
            out = tmp_path / "load.txt"
            client = load(node, out, rate=150, duration_s=7)  # type: ignore[arg-type]
            t_load = time.monotonic()
            try:
                time.sleep(1)
                write_atomically(listfile, entries("f1", "f2", "f3", "f4"))
                t0 = time.monotonic()
                while not all(members(node).get(n, {}).get("in_rotation") for n in ("f3", "f4")):
                    assert time.monotonic() - t0 < 5, members(node)
                    time.sleep(0.05)
                # A runtime addition beside the file's backends.
                status, _, raw = http("POST", node.admin + "/pools/web/backends",
                                      token=node.token, body=json.dumps(
                                          {"name": "api1",
                                           "address": f"{LOOPBACK}:{be.ports['api1']}"}).encode())
                assert status == 201, raw
                time.sleep(1)
                write_atomically(listfile, entries("f3", "f4"))
                t0 = time.monotonic()
                while {"f1", "f2"} & set(members(node)):
                    assert time.monotonic() - t0 < 10, members(node)
                    time.sleep(0.1)
                # A half-written file (not replaced by rename): the last good set stays.
                listfile.write_text('[{"name": "f1", "address": ')
                t0 = time.monotonic()
                while not (members(node)["f3"] and node.status()["pools"][0]["discovery"][
                        "consecutive_failures"]):
                    assert time.monotonic() - t0 < 5
                    time.sleep(0.1)
                assert set(members(node)) == {"f3", "f4", "api1"}
                # The changes are over (in ~3 s): 1 s more, at least MIN_LOAD_S in all, then
                # SIGTERM (lab.load sends no more and waits for what is in flight).
                time.sleep(max(1.0, t_load + MIN_LOAD_S - time.monotonic()))
                client.terminate()
            finally:
                client.communicate(timeout=30)
            records = RecordLog(out).poll()
            failed = [r for r in records if not r.ok]
            assert len(records) > 700 and failed == [], (len(records), failed[:5])
            by = Counter(r.backend for r in records)
            assert all(by[n] > 0 for n in ("f1", "f3", "api1")), by
            m = parse_metrics(node.metrics())
            assert total(m, "pairlb_discovery_up", pool="web") == 0
            assert total(m, "pairlb_discovery_failures_total", pool="web") >= 1
            assert total(m, "pairlb_pool_backends", pool="web", source="file") == 2
            assert total(m, "pairlb_pool_backends", pool="web", source="api") == 1
            # A reload keeps the file's last good set and the runtime addition.
            write_atomically(listfile, entries("f3", "f4"))
            status, _, raw = http("POST", node.admin + "/reload", token=node.token)
            assert status == 200, raw
            m2 = members(node)
            assert set(m2) == {"f3", "f4", "api1"}, m2
            assert m2["api1"]["source"] == "api" and m2["f3"]["source"] == "file"
            assert served(be, "f4") > 0
            assert scraper.failed == [], scraper.failed
