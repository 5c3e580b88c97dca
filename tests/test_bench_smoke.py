"""bench/perf.py still works: a very short run against direct/HAProxy/nginx, and a Ctrl-C.

Not a benchmark (the numbers are not judged, only that they exist and are sane), so CI
catches a broken script before someone needs the table. pairlb is left out on purpose: its
own tests cover it, and the benchmark's pairlb path is the same code as the others.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PERF = ROOT / "bench" / "perf.py"
MISSING = [t for t in ("wrk", "haproxy", "nginx", "taskset") if shutil.which(t) is None]

pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"benchmark tools not installed: {', '.join(MISSING)}"
)


def quick_args(*extra: str) -> list[str]:
    pin = [] if (os.cpu_count() or 1) >= 2 else ["--no-pin"]
    return [
        sys.executable,
        str(PERF),
        "--rounds",
        "1",
        "--sizes",
        "100",
        "--warmup",
        "0",
        "--settle",
        "0",
        "--noisy-retries",
        "0",
        "--start-timeout",
        "10",
        *pin,
        *extra,
    ]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""


def descendants(root: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


@pytest.mark.timeout(60)
def test_short_run_reports_every_target_and_leaves_nothing_running(tmp_path: Path) -> None:
    out = tmp_path / "perf.json"
    args = quick_args(
        "--duration", "1", "--targets", "direct,haproxy,nginx", "--json", str(out), "--markdown"
    )
    r = subprocess.run(args, capture_output=True, text=True, timeout=50)
    assert r.returncode == 0, r.stdout + r.stderr

    doc = json.loads(out.read_text())
    rows = {row["target"]: row for row in doc["summary"]}
    assert set(rows) == {"direct", "haproxy", "nginx"}
    for name, row in rows.items():
        assert row["ok"], (name, row)
        assert row["rps"] > 1000, (name, row["rps"])  # a working proxy does thousands
        assert row["non_2xx_3xx"] == 0 and row["socket_errors"] == 0, (name, row)
        assert 0 < row["p50_us"] <= row["p99_us"], (name, row)
    for name in ("haproxy", "nginx"):
        assert rows[name]["cpu_us_per_req"] > 0, rows[name]
        assert all(kb > 1000 for kb in rows[name]["rss_kb"].values()), rows[name]["rss_kb"]
        assert rows[name]["rps_vs_haproxy"] > 0
    assert rows["nginx"]["rss_kb"].keys() >= {"master", "worker1"}

    # The Markdown table docs/performance.md is made from.
    assert "| body | target | req/s |" in r.stdout
    assert sum(line.startswith("| 100 B |") for line in r.stdout.splitlines()) == 3

    # Every server it started is gone, and no other process was touched.
    assert doc["started_pids"], "the run recorded no PIDs"
    lingering = [p for p in doc["started_pids"] if alive(p)]
    assert not lingering, f"benchmark left processes running: {lingering}"


@pytest.mark.timeout(60)
def test_ctrl_c_stops_every_server_it_started(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        quick_args("--duration", "20", "--targets", "haproxy,nginx"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        # Wait until it is measuring: wrk is running among its descendants.
        deadline = time.monotonic() + 20
        started: list[int] = []
        while time.monotonic() < deadline:
            started = descendants(proc.pid)
            comms = {comm(p) for p in started}
            if "wrk" in comms and {"haproxy", "nginx"} <= comms:
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"benchmark never started measuring; descendants {started}")
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in started):
        time.sleep(0.05)
    assert not [p for p in started if alive(p)], "servers left running after Ctrl-C"


H2LOAD_REPORT = """\
finished in 2.00s, 499.50 req/s, 120.11KB/s
requests: 999 total, 1000 started, 999 done, 998 succeeded, 1 failed, 0 errored, 0 timeout
status codes: 998 2xx, 0 3xx, 1 4xx, 0 5xx
traffic: 240.22KB (245983) total, 178.55KB (182835) headers (space savings 0.00%), 97.56KB data
                     min         max         mean         sd        +/- sd
time for request:      128us      3.21ms       301us       162us    92.39%
"""


def test_h2load_report_is_parsed() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import _common
    finally:
        sys.path.pop(0)
    r = _common.parse_h2load(H2LOAD_REPORT, 0.5)
    assert (r.requests, r.rps, r.duration_s, r.non_2xx_3xx) == (999, 499.5, 2.0, 1)
    assert r.latency_us == {"mean": 301.0, "max": 3210.0}
    assert r.wrk_cpu_s == 0.5
    with pytest.raises(ValueError, match="no h2load report"):
        _common.parse_h2load("h2load: connection refused\n")


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load not installed")
@pytest.mark.timeout(60)
def test_fixed_rate_run_holds_the_rate_and_reports_cpu_per_request(tmp_path: Path) -> None:
    out = tmp_path / "perf.json"
    args = quick_args("--duration", "2", "--rate", "600", "--connections", "6",
                      "--targets", "direct,haproxy", "--json", str(out))
    r = subprocess.run(args, capture_output=True, text=True, timeout=50)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {row["target"]: row for row in json.loads(out.read_text())["summary"]}
    for name, row in rows.items():
        assert row["ok"], (name, row)
        assert 540 <= row["rps"] <= 660, (name, row["rps"])  # the rate, not saturation
        assert row["non_2xx_3xx"] == 0 and row["socket_errors"] == 0, (name, row)
        assert 0 < row["p50_us"] <= row["p99_us"], (name, row)  # mean <= max
    assert rows["haproxy"]["cpu_us_per_req"] > 0
    assert "--rate: a fixed 600 req/s" in r.stdout
    header = next(ln for ln in r.stdout.splitlines() if ln.startswith("body"))
    assert " mean " in header and " max " in header and "p99" not in header


@pytest.mark.timeout(90)
def test_ab_pairs_two_trees_round_by_round() -> None:
    """bench/ab.py with this tree as both A and B: one round, both measured, a ratio."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "ab.py"), str(ROOT), str(ROOT),
                        "--rounds", "1", "--seconds", "1"],
                       capture_output=True, text=True, timeout=80)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("round 0: A ") and " B/A " in r.stdout
    assert "B/A CPU per request: median " in r.stdout
