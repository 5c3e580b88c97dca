"""bench/pool_scale.py still works: a quick run (pools of 50 and 200 backends, 2 s each) reports
a worker CPU per request for each and leaves nothing running. Not a benchmark: the numbers
are not judged (docs/performance.md has the real table)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "pool_scale.py"
MISSING = [t for t in ("wrk", "nginx") if shutil.which(t) is None]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(bool(MISSING), reason=f"benchmark tools not installed: {MISSING}")
@pytest.mark.timeout(120)
def test_quick_run_reports_each_pool_size_and_leaves_nothing_running(tmp_path: Path) -> None:
    out = tmp_path / "pool_scale.json"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out), "--markdown"],
        capture_output=True, text=True, timeout=110,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    rows = doc["summary"]
    assert [row["backends"] for row in rows] == [50, 200], rows
    for row in rows:
        assert row["variant"] == "current" and row["mode"] == "round_robin", row
        assert row["worker_us_per_req"] > 0 and row["rps"] > 0 and row["errors"] == 0, row
    assert "| current | round_robin | 200 |" in r.stdout
    assert doc["started_pids"], "the run recorded no PIDs"
    assert not [p for p in doc["started_pids"] if alive(p)], "processes left running"
