"""bench/accesslog.py still runs: its --quick run reports every column for both formats.

Not a benchmark: the numbers are only checked to exist and be sane (positive, formatting a
hostile line costs more than a typical one, write() costs about a typical line's format).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "accesslog.py"


def test_quick_run_reports_both_formats(tmp_path: Path) -> None:
    out = tmp_path / "accesslog.json"
    r = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--markdown", "--json", str(out)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| format | write() us |")
    assert [line.split("|")[1].strip() for line in table[1:]] == ["json", "combined"]
    data = json.loads(out.read_text())
    assert data["meta"]["quick"] is True
    for row in data["rows"]:
        # write() formats the line: it costs about what the formatter does
        assert row["write_us"] > 0 and row["tuple_write_us"] > 0
        assert row["format_typical_us"] / 3 < row["write_us"] < row["format_hostile_us"]
        assert row["format_typical_us"] < row["format_hostile_us"]
        assert row["cpu_per_req_us"] != 0
