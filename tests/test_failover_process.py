"""The failover process's own settings (lb.failoverd.main): scheduling and the OOM score,
each in a fresh process (they change the process they run in). The process itself, its
crash, hang and the control process's death are tested with real pairs in namespaces
(tests/test_failover_e2e.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setuid, rlimits)")


def run_in_fresh_process(body: str, *, as_nobody: bool = False, nice_rlimit: int | None = None
                         ) -> dict[str, object]:
    """Run `body` (which sets `result`) after the identity/rlimit changes; its JSON result."""
    prelude = textwrap.dedent(f"""
        import json, logging, os, resource, sys
        from lb.failoverd import main as fm
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        NICE_RLIMIT = {nice_rlimit!r}
        if NICE_RLIMIT is not None:
            try:
                resource.setrlimit(resource.RLIMIT_NICE, (NICE_RLIMIT, NICE_RLIMIT))
            except (ValueError, OSError) as exc:
                print(json.dumps({{"skip": f"cannot set RLIMIT_NICE here: {{exc}}"}}))
                sys.exit(0)
        if {as_nobody!r}:
            os.setgroups([])
            os.setgid({NOBODY})
            os.setuid({NOBODY})
    """)
    code = prelude + textwrap.dedent(body) + "\nprint(json.dumps(result))\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(str(result["skip"]))
    result["log"] = proc.stderr
    return result


@needs_root
def test_sched_rr_when_permitted_and_children_get_normal_scheduling_back() -> None:
    r = run_in_fresh_process("""
        got = fm.apply_scheduling(5, -5)
        pid = os.fork()
        if pid == 0:
            os._exit(os.sched_getscheduler(0))
        _, status = os.waitpid(pid, 0)
        result = {"got": got, "policy": os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK,
                  "prio": os.sched_getparam(0).sched_priority,
                  "child_policy": os.waitstatus_to_exitcode(status)}
    """)
    assert r["got"] == "rr:5", r
    assert r["policy"] == os.SCHED_RR and r["prio"] == 5, r
    assert r["child_policy"] == os.SCHED_OTHER, r  # nft, ip, notify scripts


@needs_root
def test_refused_real_time_falls_back_to_nice_with_one_warning_each() -> None:
    r = run_in_fresh_process("""
        got = fm.apply_scheduling(5, -5)
        result = {"got": got, "nice": os.getpriority(os.PRIO_PROCESS, 0),
                  "policy": os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK}
    """, as_nobody=True, nice_rlimit=0)
    assert r["policy"] == os.SCHED_OTHER and r["nice"] == 0 and r["got"] == "nice:0", r
    log = str(r["log"])
    assert log.count("failover_sched_not_permitted") == 1, log
    assert log.count("failover_nice_not_permitted") == 1, log


@needs_root
def test_the_units_limitnice_lets_an_unprivileged_failover_process_lower_its_nice() -> None:
    """LimitNICE=-10 in the unit is RLIMIT_NICE 30: nice -10 without CAP_SYS_NICE."""
    r = run_in_fresh_process("""
        got = fm.apply_scheduling(0, -10)
        result = {"got": got, "nice": os.getpriority(os.PRIO_PROCESS, 0)}
    """, as_nobody=True, nice_rlimit=30)
    assert r["got"] == "nice:-10" and r["nice"] == -10, r
    assert "not_permitted" not in str(r["log"]), r["log"]


def test_the_unit_grants_what_the_default_nice_needs() -> None:
    unit = (ROOT / "deploy" / "systemd" / "pairlb.service").read_text()
    from lb.config import FailoverConfig

    default_nice = FailoverConfig.model_fields["nice"].default
    assert f"\nLimitNICE={default_nice}\n" in unit
    assert FailoverConfig.model_fields["sched_priority"].default == 0  # needs a drop-in


def test_the_failover_process_starts_with_little_imported() -> None:
    """What `python -m lb.failoverd.main` loads before the spec arrives: failover (with the
    netlink code, loaded early on purpose) and the small lb modules, not the control
    process's (config models, aiohttp, prometheus_client, health checks)."""
    code = ("import sys; from lb.failoverd import main; import failover; failover.VipAdapter; "
            "print(' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, check=True).stdout.split()
    for heavy in ("aiohttp", "prometheus_client", "pydantic", "healthcheck", "lb.config",
                  "lb.control.daemon", "lb.admin.metrics", "uvloop"):
        assert heavy not in out, heavy
