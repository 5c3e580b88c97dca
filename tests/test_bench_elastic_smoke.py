"""bench/elastic.py still works: a quick run (200 backends added and removed one by one
through the admin API under load, 20 reloads the old way, HAProxy's runtime API if it is
installed) completes, fails no request and leaves nothing running. Not a benchmark: the
bounds are generous (docs/performance.md has the real table)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "elastic.py"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed (the backends)")
@pytest.mark.timeout(75)
def test_quick_run_adds_and_removes_every_backend_and_fails_no_request(tmp_path: Path) -> None:
    out = tmp_path / "elastic.json"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out), "--markdown"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    add, remove = doc["add"], doc["remove"]
    assert add["ok"] == add["count"] == 200 and not add["truncated"], add
    assert remove["ok"] == remove["count"] == 200 and not remove["truncated"], remove
    assert add["usable_after"] == 203 and add["until_in_rotation_s"] is not None, add
    assert remove["until_gone_s"] is not None and remove["left_in_status"] == 0, remove
    for phase in (add, remove):
        assert 0 < phase["all"]["p50_ms"] <= phase["all"]["p99_ms"] < 1000, phase["all"]
        assert phase["cpu_all"]["control_cpu_s"] > 0, phase["cpu_all"]
    assert doc["load"]["requests"] > 500 and doc["load"]["failed"] == 0, doc["load"]
    assert doc["load"]["late_to_removed"] == 0, doc["load"]
    assert doc["scrape"]["scrapes"] >= 3 and doc["scrape"]["failed"] == 0, doc["scrape"]
    assert doc["reload"]["ok"] == 20 and doc["reload_load"]["failed"] == 0, doc["reload"]
    assert doc["reload"]["until_in_rotation_s"] is not None, doc["reload"]
    assert doc["reload_at_n_runtime"]["kept_runtime_backends"], doc["reload_at_n_runtime"]
    assert doc["workers"]["same_pids"] and doc["workers"]["crashes"] == 0, doc["workers"]
    if shutil.which("haproxy"):
        assert doc["haproxy"]["add"]["ok"] == 200, doc["haproxy"]
        assert doc["haproxy"]["remove"]["ok"] == 200, doc["haproxy"]
    assert "| pairlb `POST /pools/web/backends` (3 -> 203 backends) | 200/200 |" in r.stdout
    assert f"results: {out}" in r.stdout
    assert doc["started_pids"], "the run recorded no PIDs"
    assert not [p for p in doc["started_pids"] if alive(p)], "processes left running"
