"""bench/scale.py still works: a quick run (50 backends, a few seconds) reports every column
and leaves nothing running. Not a benchmark: the numbers are not judged, only that they
exist and are sane (docs/performance.md has the real table)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCALE = ROOT / "bench" / "scale.py"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("server", ["auto", "python"])
def test_quick_run_reports_every_column_and_leaves_nothing_running(
    tmp_path: Path, server: str
) -> None:
    out = tmp_path / "scale.json"
    r = subprocess.run(
        [sys.executable, str(SCALE), "--quick", "--duration", "4", "--backend-server", server,
         "--json", str(out), "--markdown"],
        capture_output=True, text=True, timeout=110,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert row["backends"] == 50
    assert row["transitions"] == 0 and row["not_usable_at_end"] == 0, json.dumps(row)
    assert row["checks_per_s"] > 20, row  # 50 backends every second
    assert row["lateness_p50_ms"] is not None and row["lateness_p99_ms"] is not None, row
    assert row["control_cores"] > 0, row
    assert row["metrics_scrapes"] >= 3 and row["metrics_bytes"] > 10_000, row
    assert row["metrics_wire_bytes"] < row["metrics_bytes"], row  # gzipped on the wire
    for key in ("metrics_s", "status_s", "page_s"):
        assert row[key]["n"] >= 1 and 0 < row[key]["p50"] <= row[key]["max"], (key, row)
    assert "| backends | transitions |" in r.stdout and "| 50 | 0 |" in r.stdout
    assert doc["started_pids"], "the run recorded no PIDs"
    assert not [p for p in doc["started_pids"] if alive(p)], "processes left running"
