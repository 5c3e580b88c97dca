"""bench/perf.py --mode tcp still works: a very short run of pairlb's TCP listener (spliced
and not) against HAProxy mode tcp, every server stopped afterwards."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from test_bench_smoke import MISSING, alive, quick_args

pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"benchmark tools not installed: {', '.join(MISSING)}"
)


@pytest.mark.timeout(90)
def test_a_tcp_mode_run_reports_pairlb_and_haproxy(tmp_path: Path) -> None:
    if shutil.which("pairlb", path=str(Path(__file__).resolve().parents[1] / ".venv/bin")) \
            is None:
        pytest.skip("no .venv/bin/pairlb (./dev setup)")
    out = tmp_path / "perf.json"
    args = quick_args("--duration", "1", "--mode", "tcp", "--targets",
                      "haproxy,pairlb,pairlb+nosplice", "--json", str(out), "--markdown")
    r = subprocess.run(args, capture_output=True, text=True, timeout=80)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(out.read_text())
    rows = {row["target"]: row for row in doc["summary"]}
    assert set(rows) == {"haproxy", "pairlb", "pairlb+nosplice"}
    for name, row in rows.items():
        assert row["ok"], (name, row)
        assert row["rps"] > 1000, (name, row["rps"])
        assert row["non_2xx_3xx"] == 0 and row["socket_errors"] == 0, (name, row)
        assert row["cpu_us_per_req"] > 0, row
    assert "pairlb+nosplice/pairlb CPU per request" in r.stdout
    assert "(mode tcp)" in r.stdout
    assert doc["settings"]["mode"] == "tcp"
    lingering = [p for p in doc["started_pids"] if alive(p)]
    assert not lingering, f"benchmark left processes running: {lingering}"


def test_nginx_is_no_tcp_target() -> None:
    r = subprocess.run([*quick_args("--mode", "tcp", "--targets", "nginx")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "nginx has no TCP proxy here" in r.stderr
