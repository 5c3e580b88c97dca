#!/usr/bin/env python3
"""Failover benchmark: the real-host scenarios of issue 4, many times each, and a soak.

Builds the namespace topology of lab/pair_rig.py (client, lb1, lb2, three backends on a
bridge; two real `pairlb run` processes), then runs each scenario `--reps` times with the
default settings (interval 50 ms, down_after 3) and the fast ones (interval 10 ms): kill -9 of
the whole active node, SIGSTOP/SIGCONT, link cut, graceful stop, planned switchover,
partition then heal, failback with preempt on and off, restart without healthy backends, and
bad heartbeats. A client in its own namespace sends a request to the VIP every 10 ms; the
kernel's address events say who held the VIP when.

Then a bounded soak per setting: wrk saturates the proxy through the VIP from the client
namespace for `--soak-duration` seconds while both control processes keep heartbeating; a
role transition during it is a false failover. Heartbeat send lag comes from /status.

Prints a markdown table and writes it between `<!-- BEGIN failover table -->` and
`<!-- END failover table -->` in docs/operations.md (docs/failover-measurements.md when that
file does not exist yet). Needs root. Reports numbers; asserts nothing (the tests do).

    sudo .venv/bin/python bench/takeover.py                    # 10 runs each, 60 s soaks
    sudo .venv/bin/python bench/takeover.py --reps 3 --soak-duration 20 --no-docs
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# This file is named like the `failover` package: the repo must come before bench/ (which
# Python puts first for a script), or `import failover` in the harness would find us.
sys.path[:0] = [str(REPO), str(HERE)]

import _common as c  # noqa: E402

from lab import netns  # noqa: E402
from lab import pair_rig as fe  # noqa: E402

BEGIN = "<!-- BEGIN failover table -->"
END = "<!-- END failover table -->"
OPERATIONS = REPO / "docs" / "operations.md"
FALLBACK = REPO / "docs" / "failover-measurements.md"
HEADING = "### Failover (bench/takeover.py)"

DEFAULT_SCENARIOS = ("kill9", "sigstop", "link_cut", "graceful", "switchover", "partition",
                     "preempt_off", "unhealthy", "bad_heartbeats")
FAST_SCENARIOS = ("kill9", "sigstop", "link_cut", "switchover")
ONCE = ("bad_heartbeats",)
"""Scenarios whose outcome does not vary: run once."""


@dataclass
class Row:
    """All runs of one measured situation (one Outcome.scenario under one setting)."""

    scenario: str
    settings: str
    interval_s: float
    outcomes: list[fe.Outcome] = field(default_factory=list)

    def values(self, get: Callable[[fe.Outcome], float | None]) -> list[float]:
        return [v for o in self.outcomes if (v := get(o)) is not None]


def ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def spread(values: list[float]) -> str:
    """`median (min-max)` in ms."""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return ms(med)
    return f"{ms(med)} ({ms(min(values))}-{ms(max(values))})"


def target_of(row: Row) -> tuple[str, bool | None]:
    """The issue-4 target for this row and whether the runs met it (None: no target)."""
    s = row.scenario
    bound = 0.05 if row.interval_s <= 0.01 else 0.15
    takeovers = row.values(lambda o: o.takeover_s)
    if s.startswith(("kill -9 active", "link cut of", "SIGSTOP active", "kill -9 failover",
                     "failover process of the MASTER hung", "kill -9 control")):
        med = statistics.median(takeovers) if takeovers else None
        return f"median <= {bound * 1000:.0f} ms", med is not None and med <= bound
    if s.startswith("SIGCONT"):
        conv = row.values(lambda o: o.converge_s)
        return (f"one holder within {row.interval_s * 1000:g} ms",
                bool(conv) and max(conv) <= row.interval_s)
    if s.startswith(("graceful stop", "planned switchover", "partition healed")):
        return "0 failed", all(o.failed == 0 for o in row.outcomes)
    if s.startswith(("its failover process restarted", "hung failover process replaced")):
        return (f"both held <= {row.interval_s * 1000:g} ms after recovery, no 5xx", all(
            o.extra["longest_overlap_after_recovery_s"] <= row.interval_s
            and not any(e.startswith("http5") for e in o.errors) for o in row.outcomes))
    if s.startswith(("control process of the MASTER stopped 2", "reload with nothing")):
        return "nothing moves, 0 failed", all(
            not o.extra["transitions_changed"] and o.failed == 0 and not o.vip_events
            for o in row.outcomes)
    if s.startswith("control process of the MASTER stopped >"):
        return "the peer takes over", all(o.takeover_s is not None for o in row.outcomes)
    if s.startswith(("failback", "checks pass", "control process runs again")):
        return "no 5xx", all(not any(e.startswith("http5") for e in o.errors)
                             for o in row.outcomes)
    if s.startswith("restart without healthy"):
        return "no takeover, 0 failed", all(
            "MASTER" not in o.extra.get("lb1_roles_seen", []) and o.failed == 0
            for o in row.outcomes)
    if s.startswith("forged"):
        return "all counted, nothing changes", all(
            all(o.extra["rejected_delta"].get(k) == n for k, n in o.extra["sent"].items())
            and not o.extra["transitions_changed"] and o.failed == 0 for o in row.outcomes)
    return "-", None


def notes_of(row: Row) -> str:
    """Scenario-specific facts worth a column of their own."""
    out = []
    errors: dict[str, int] = {}
    for o in row.outcomes:
        for k, n in o.errors.items():
            errors[k] = errors.get(k, 0) + n
    if errors:
        out.append("errors " + ", ".join(f"{k} {n}" for k, n in sorted(errors.items())))
    conv = row.values(lambda o: o.converge_s)
    if conv:
        out.append(f"converge {spread(conv)} ms")
    holes = row.values(lambda o: o.extra.get("blackhole_s"))
    if holes:
        out.append(f"blackhole max {ms(max(holes))} ms")
    stuck = sum(1 for o in row.outcomes if o.extra.get("served_again") is False)
    if stuck:
        out.append(f"{stuck} run(s) not served again within {fe.BLACKHOLE_LIMIT_S:g} s")
    stale = row.values(lambda o: o.extra.get("stale_vip_removed_s"))
    if stale:
        out.append(f"stale VIP removed {spread(stale)} ms after start")
    loads = row.values(lambda o: o.extra.get("foreign_load"))
    if loads and max(loads) >= 0.3:
        out.append(f"foreign load up to {max(loads):.1f} cores")
    for key, what in (("longest_heartbeat_gap_on_the_wire_s", "longest heartbeat gap on the "
                       "peer's wire"), ("control_fault_s", "counted unhealthy after"),
                      ("killed_after_s", "killed after"), ("recovered_s", "rejoined after"),
                      ("vip_released_s", "VIP released after"),
                      ("failover_exit_s", "failover process exited after")):
        got = row.values(lambda o, k=key: o.extra.get(k))
        if got:
            out.append(f"{what} {spread(got)} ms")
    winners = [o.extra["winner"] for o in row.outcomes if "winner" in o.extra]
    if winners:
        out.append("winner " + "/".join(sorted(set(winners))))
    return "; ".join(out)


def table(rows: list[Row]) -> str:
    lines = [
        "| scenario | settings | runs | fault to first success via the other node, ms: "
        "median (min-max) | failed requests per run: median (max) | both nodes held the "
        "VIP, ms: median (max) | no node held it, ms: median (max) | target | met | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        failed = [o.failed for o in r.outcomes]
        both = r.values(lambda o: o.overlap_s)
        none_ = r.values(lambda o: o.unheld_s)
        target, met = target_of(r)
        lines.append(
            f"| {r.scenario} | {r.settings} | {len(r.outcomes)} | "
            f"{spread(r.values(lambda o: o.takeover_s))} | "
            f"{statistics.median(failed):g} ({max(failed)}) | "
            f"{ms(statistics.median(both))} ({ms(max(both))}) | "
            f"{ms(statistics.median(none_))} ({ms(max(none_))}) | {target} | "
            f"{'-' if met is None else ('yes' if met else '**no**')} | {notes_of(r)} |")
    return "\n".join(lines)


# -- soak ------------------------------------------------------------------------------------


@dataclass
class Soak:
    settings: str
    foreign_nice: int
    duration_s: float
    rps: float
    wrk_errors: int
    probe_failed: int
    probe_requests: int
    probe_errors: dict[str, int]
    transitions: dict[str, dict[str, int]]
    late_sends: dict[str, int]
    send_lag_ms: dict[str, dict[str, float]]
    roles: dict[str, str]


def _counters(rig: fe.Rig) -> dict[str, dict[str, Any]]:
    return {n: rig.failover(n) for n in fe.LBS}


def soak(rig: fe.Rig, settings: fe.PairSettings, duration_s: int, connections: int,
         foreign_nice: int) -> Soak:
    """wrk through the VIP at full load; count role transitions (each one a false failover).

    wrk and the backends would run on other hosts; here they share the two nodes' CPUs.
    `foreign_nice` is their nice value: 10 models other hosts (the proxy workers, at nice 5,
    get the CPU and saturate), 0 lets them compete with the control processes as equals.
    """
    rig.steady(settings)
    rig.renice_backends(foreign_nice)
    before = _counters(rig)
    t0 = time.monotonic()
    try:
        res = rig.topo.run("client", ["nice", "-n", str(foreign_nice), "wrk", "-t2",
                                      f"-c{connections}", f"-d{duration_s}s", "--timeout", "2s",
                                      "--latency", f"http://{rig.vip}/"],
                           timeout_s=duration_s + 30.0)
    finally:
        rig.renice_backends(0)
    t1 = time.monotonic()
    wrk = c.parse_wrk(res.stdout)
    after = _counters(rig)
    attempts = rig.attempts(t0, t1)

    def delta(n: str) -> dict[str, int]:
        a, b = after[n]["counters"]["transitions"], before[n]["counters"]["transitions"]
        return {k: v - b.get(k, 0) for k, v in a.items() if v - b.get(k, 0)}

    return Soak(
        settings=settings.label, foreign_nice=foreign_nice, duration_s=t1 - t0, rps=wrk.rps,
        wrk_errors=wrk.errors,
        probe_failed=sum(1 for a in attempts if not a.ok), probe_requests=len(attempts),
        probe_errors={e: sum(1 for a in attempts if a.error == e)
                      for e in sorted({a.error for a in attempts if not a.ok})},
        transitions={n: delta(n) for n in fe.LBS},
        late_sends={n: after[n]["counters"]["late_sends"] - before[n]["counters"]["late_sends"]
                    for n in fe.LBS},
        send_lag_ms={n: after[n]["send_lag_ms"] for n in fe.LBS},
        roles={n: after[n]["role"] for n in fe.LBS},
    )


def _errs(errors: dict[str, int]) -> str:
    return " (" + ", ".join(f"{k} {n}" for k, n in errors.items()) + ")" if errors else ""


def soak_table(soaks: list[Soak]) -> str:
    lines = [
        "| settings | wrk and backends at nice | duration s | wrk req/s through the VIP | "
        "wrk errors | 10 ms probe failures | role transitions (false failovers) | late "
        "heartbeats lb1/lb2 | send lag lb1 p50/p99/max ms | send lag lb2 p50/p99/max ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in soaks:
        trans = sum(sum(d.values()) for d in s.transitions.values())
        lag = {n: "/".join(f"{s.send_lag_ms[n][k]:.2f}" for k in ("p50", "p99", "max"))
               for n in fe.LBS}
        lines.append(
            f"| {s.settings} | {s.foreign_nice} | {s.duration_s:.0f} | {s.rps:.0f} | "
            f"{s.wrk_errors} | "
            f"{s.probe_failed}/{s.probe_requests}{_errs(s.probe_errors)} | {trans} | "
            f"{s.late_sends['lb1']}/{s.late_sends['lb2']} | {lag['lb1']} | {lag['lb2']} |")
    return "\n".join(lines)


# -- docs ------------------------------------------------------------------------------------


def write_docs(section: str) -> Path:
    """Replace our delimited section, or add it at the end of "## Measured behaviour";
    never touch the rest of the file (other engineers own it)."""
    block = f"{BEGIN}\n{HEADING}\n\n{section.rstrip()}\n{END}\n"
    if not OPERATIONS.exists():
        FALLBACK.write_text(block, encoding="utf-8")
        return FALLBACK
    text = OPERATIONS.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        at = text.find("\n## Measured behaviour")
        nxt = re.search(r"^## ", text[at + 2:], re.M) if at >= 0 else None
        if at >= 0 and nxt is not None:
            cut = at + 2 + nxt.start()
            text = text[:cut] + block + "\n" + text[cut:]
        else:
            text = text.rstrip() + "\n\n" + block
    OPERATIONS.write_text(text, encoding="utf-8")
    return OPERATIONS


def section(rows: list[Row], soaks: list[Soak], args: argparse.Namespace, took_s: float) -> str:
    cpus = os.cpu_count()
    return f"""\
Produced by `bench/takeover.py --reps {args.reps} --fast-reps {args.fast_reps} \
--soak-duration {args.soak_duration}` on {platform.node() or "this host"} ({cpus} CPUs, \
Linux {platform.release()}, Python {platform.python_version()}), {time.strftime('%Y-%m-%d')}, \
{took_s / 60:.0f} min. Topology: client, lb1 (priority 150), lb2 (priority 100) and three \
backends on one bridge in network namespaces; each node runs `pairlb run` with one worker; \
health checks every 0.2 s (rise 2, fall 2). The client opens a new connection to the VIP every \
10 ms (0.5 s deadline); "failed" counts refused, reset, timed-out and non-200 requests. VIP \
holders come from the kernels' rtnetlink address events. Times are from the fault (signal, \
link or bridge change; for failback rows, the restart or the repair) to the first successful \
request through the other node. After kill -9 the dead node keeps its VIP in the kernel until \
it restarts (that is the "both held" of that row; pairlb removes it at start-up).

{table(rows)}

Bounded soak: wrk (2 threads, {args.connections} connections) saturates the proxy through the \
VIP from the client namespace while both nodes heartbeat; every role transition is a false \
failover. wrk and the backends stand in for other hosts but share these 2 CPUs: at nice 10 the \
proxy workers (nice 5) get the CPU and saturate, as on a real LB host; at nice 0 they compete \
with the control processes as equals (a harsher case than production). Send lag: how late \
each heartbeat left (the last 4096 sends, so it includes some time before the soak).

{soak_table(soaks)}
"""


# -- main ------------------------------------------------------------------------------------


def run_all(args: argparse.Namespace) -> tuple[list[Row], list[Soak]]:
    rows: dict[tuple[str, str], Row] = {}
    plan: list[tuple[fe.PairSettings, str, int]] = []
    for name in args.scenarios:
        plan.append((fe.DEFAULT, name, 1 if name in ONCE else args.reps))
    for name in args.fast_scenarios:
        plan.append((fe.FAST, name, args.fast_reps))
    soaks: list[Soak] = []
    with fe.Rig() as rig:
        for settings, name, reps in plan:
            for i in range(reps):
                # Other people's load on this box delays heartbeats and probes alike: wait
                # (bounded) for it to pass, and record what was left of it.
                foreign = c.wait_quiet([os.getpid()], args.settle, 0.3)
                try:
                    rig.steady(settings)
                    outs = fe.SCENARIOS[name](rig)
                except Exception as exc:  # one bad run must not lose the others
                    print(f"!! {name} run {i + 1} [{settings.label}]: {exc}", file=sys.stderr)
                    if args.verbose:
                        traceback.print_exc()
                    continue
                for o in outs:
                    o.extra["foreign_load"] = round(foreign, 2)
                    key = (o.scenario, o.settings)
                    row = rows.setdefault(key, Row(o.scenario, o.settings, settings.interval_s))
                    row.outcomes.append(o)
                    print(o.describe(), flush=True)
                    if args.verbose and o.failures:
                        print(f"   failures: {o.failures[:15]}")
        if args.soak_duration > 0:
            for settings, nice in itertools.product((fe.DEFAULT, fe.FAST), args.soak_nice):
                c.wait_quiet([os.getpid()], args.settle, 0.3)
                try:
                    s = soak(rig, settings, args.soak_duration, args.connections, nice)
                except Exception as exc:
                    print(f"!! soak [{settings.label}, nice {nice}]: {exc}", file=sys.stderr)
                    continue
                print(f"soak [{s.settings}]: {s}", flush=True)
                soaks.append(s)
    return list(rows.values()), soaks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=10, help="runs per scenario, default settings")
    p.add_argument("--fast-reps", type=int, default=10, help="runs per scenario, interval 10 ms")
    p.add_argument("--scenarios", nargs="*", default=list(DEFAULT_SCENARIOS),
                   choices=sorted(fe.SCENARIOS))
    p.add_argument("--fast-scenarios", nargs="*", default=list(FAST_SCENARIOS),
                   choices=sorted(fe.SCENARIOS))
    p.add_argument("--soak-duration", type=int, default=60, help="seconds per setting; 0: none")
    p.add_argument("--connections", type=int, default=64, help="wrk connections in the soak")
    p.add_argument("--soak-nice", type=int, nargs="+", default=[10, 0],
                   help="nice values of wrk and the backends in the soaks (one soak each)")
    p.add_argument("--settle", type=float, default=10.0,
                   help="seconds to wait (at most) for other processes' CPU load to pass")
    p.add_argument("--json", type=Path, help="also write every outcome as JSON here")
    p.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    reason = netns.skip_reason()
    if reason is not None:
        print(f"bench/takeover.py: {reason}", file=sys.stderr)
        return 2
    started = time.monotonic()
    rows, soaks = run_all(args)
    text = section(rows, soaks, args, time.monotonic() - started)
    print()
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "rows": [{"scenario": r.scenario, "settings": r.settings,
                      "runs": [o.row() for o in r.outcomes]} for r in rows],
            "soaks": [s.__dict__ for s in soaks],
        }, indent=1, default=str), encoding="utf-8")
    if not args.no_docs:
        path = write_docs(text)
        print(f"wrote the table to {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
