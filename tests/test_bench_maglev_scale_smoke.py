"""bench/maglev_scale.py still works: a quick run (300 backends in a maglev pool and in a
round_robin pool, a burst of 30 runtime adds and removes, two reloads, under load with
/metrics scraped) completes, fails no request, moves no key whose backend stayed, and
leaves nothing running. Not a benchmark: the bounds are generous (docs/maglev-scale.md has
the real numbers)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "maglev_scale.py"


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx not installed (the backends)")
@pytest.mark.timeout(90)
def test_quick_run_reports_builds_affinity_and_no_failed_request(tmp_path: Path) -> None:
    out = tmp_path / "maglev-scale.json"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out), "--markdown"],
        capture_output=True, text=True, timeout=80,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert set(doc["nodes"]) == {"maglev", "round_robin"}, doc.get("error")
    assert doc["failed_requests"] == 0, doc["failed_requests"]
    mg, rr = doc["nodes"]["maglev"], doc["nodes"]["round_robin"]
    for nd in (mg, rr):
        assert nd["load"]["requests"] > 100 and nd["load"]["failed"] == 0, nd["load"]
        assert nd["adds"]["ok"] == 30 and nd["removes"]["ok"] == 30, (nd["adds"], nd["removes"])
        assert nd["adds"]["settled_s"] is not None and nd["removes"]["settled_s"] is not None
        assert nd["reload_same"]["ok"] and nd["reload_plus1"]["ok"], nd["reload_plus1"]
        assert nd["scrape"]["scrapes"] >= 3 and nd["scrape"]["failed"] == 0, nd["scrape"]
        assert nd["workers"]["same_pids"] and nd["workers"]["crashes"] == 0, nd["workers"]
        assert set(nd["windows"]) == {"steady", "adds", "removes", "reload_same",
                                      "reload_plus1"}, nd["windows"].keys()
    # startup: one table, and the tables the changes asked for
    assert mg["startup"]["builds"] == 1 and mg["startup"]["first_table_s"] is not None
    assert mg["startup"]["build_ms_status"] > 0 and mg["startup"]["table_size"] == 65537
    assert mg["windows"]["adds"]["builds"] >= 1 and mg["windows"]["removes"]["builds"] >= 1
    assert mg["windows"]["reload_same"]["builds"] == 0, mg["windows"]["reload_same"]
    assert mg["windows"]["reload_plus1"]["builds"] == 1, mg["windows"]["reload_plus1"]
    assert rr["builds_total"] == 0 and "affinity" not in rr
    assert mg["hashing_end"]["current"] and mg["hashing_end"]["members"] == 301
    # affinity: the adds moved some keys, the removes brought every one back, and no key
    # whose backend stayed was served elsewhere meanwhile
    aff = mg["affinity"]
    assert aff["before->after_adds"]["moved"] > 0, aff
    assert aff["before_vs_after_removes"]["moved"] == 0, aff
    for step in ("before->after_adds", "after_adds->after_removes",
                 "after_removes->after_plus1"):
        assert aff[step]["keys"] == 300, aff[step]
        if aff[step]["to_down"] == 0:  # (a check that timed out on a loaded box moves keys)
            assert aff[step]["served_elsewhere"] == 0, aff[step]
    assert "| maglev | adds (30/30) |" in r.stdout
    assert f"results: {out}" in r.stdout
    assert doc["started_pids"], "the run recorded no PIDs"
    assert not [p for p in doc["started_pids"] if alive(p)], "processes left running"
