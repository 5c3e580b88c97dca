"""bench/tls.py still works: its --quick run (about half a minute) against pairlb, HAProxy (if
installed) and nginx reports every workload and the idle memory for each server, and leaves
nothing running.

Not a benchmark: the numbers are not judged, only that they exist and are sane
(docs/performance.md has the real table). It does check what the table's reading rests on:
every server speaks TLS 1.3 with the same certificate, resumes sessions, and answers the
HTTP/1.0 request openssl s_time sends; and wrk's Connection: close connections resume
(pairlb counts them), so that workload is the resumed one, not full handshakes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TLS_BENCH = ROOT / "bench" / "tls.py"
NEEDED = ("wrk", "nginx", "openssl", "taskset")
MISSING = [t for t in NEEDED if shutil.which(t) is None]
SERVERS = ["pairlb", "nginx"] + (["haproxy"] if shutil.which("haproxy") else [])
WORKLOADS = ("plain", "keepalive", "newconn", "full")

pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"benchmark tools not installed: {', '.join(MISSING)}"
)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_quick_run_reports_every_server_and_workload(tmp_path: Path) -> None:
    out = tmp_path / "tls.json"
    pin = [] if (os.cpu_count() or 1) >= 2 else ["--no-pin"]
    r = subprocess.run(
        [
            sys.executable,
            str(TLS_BENCH),
            "--quick",
            "--servers",
            ",".join(SERVERS),
            "--json",
            str(out),
            "--markdown",
            *pin,
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert not doc["skipped"], doc["skipped"]

    rows = {(row["workload"], row["server"]): row for row in doc["summary"]}
    assert set(rows) == {(w, s) for w in WORKLOADS for s in SERVERS}
    for key, row in rows.items():
        assert row["ok"], (key, row)
        assert row["rps"] > 10, (key, row["rps"])
        assert row["errors"] == 0, (key, row)
        assert row["cpu_us_per_req"] > 0, (key, row)
        assert row["cpu_us_by_role"], (key, row)
        if key[0] != "full":  # wrk's latency; s_time gives none
            assert 0 < row["p50_us"] <= row["p99_us"], (key, row)
        if "haproxy" in SERVERS:
            assert row["rps_vs_haproxy"] > 0 and row["per_core_vs_haproxy"] > 0, (key, row)

    for name in SERVERS:
        info = doc["servers"][name]["info"]
        assert info["version"] == "TLSv1.3", (name, info)
        assert info["alpn"] == "http/1.1", (name, info)
        assert info["resumes"] is True, (name, info)
        assert info["http10_status"] == 200, (name, info)
        mem = {m["tls"]: m for m in doc["memory"] if m["server"] == name}
        assert set(mem) == {False, True}, (name, doc["memory"])
        assert "error" not in mem[True] and "error" not in mem[False], mem
        assert mem[True]["kib_per_conn"] > 0, mem[True]

    # wrk -H "Connection: close" resumes: pairlb saw mostly resumed handshakes for it.
    hs = doc["pairlb_handshakes"]
    newconn = sum(
        s["requests"]
        for s in doc["samples"]
        if s["server"] == "pairlb" and s["workload"] == "newconn"
    )
    assert hs["resumed"] >= newconn / 2, (hs, newconn)
    assert hs["full"] > 0, hs

    assert "| workload | server | req/s |" in r.stdout
    assert "| server | plain KiB/conn | TLS KiB/conn |" in r.stdout
    assert doc["started_pids"], "the run recorded no PIDs"
    assert not [p for p in doc["started_pids"] if alive(p)], "processes left running"
