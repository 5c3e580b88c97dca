"""bench/maglev.py still works: a quick run (N = 10 and 100) prints its table and writes every
figure. Not a benchmark: the numbers are not judged (tests/test_maglev.py asserts the
properties)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "maglev.py"


@pytest.mark.timeout(30)
def test_quick_run_reports_each_pool_size(tmp_path: Path) -> None:
    out = tmp_path / "maglev.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--markdown", "--json", str(out)],
                       capture_output=True, text=True, timeout=25, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [row["backends"] for row in rows] == [10, 100]
    for row in rows:
        assert row["size"] == 65537 and row["table_bytes"] == 2 * 65537, row
        for key in ("build_s", "hash_ns", "lookup_ns", "pick_ns", "rr_ns", "fallback_ns"):
            assert row[key] > 0, (key, row)
        assert 0.99 / row["backends"] <= row["moved_remove"] < 1 / row["backends"] + 0.01, row
    assert "| 100 | 65537 |" in r.stdout
