#!/usr/bin/env python3
"""Health-check measurements: how long a broken backend stays in rotation, what clients see.

Reruns the real-process scenarios of lab/health_scenarios.py (which tests/test_health_e2e.py
asserts: kill -9, kill -9 with POSTs, SIGSTOP with and without ``retry_on_timeout``,
/healthz 500, 503 on traffic, operator drain, all backends down, reload) with more clients
and several repetitions, each in a fresh temporary directory with its own backends and
``pairlb run`` on free 127.0.0.1 ports, and prints a Markdown table: time to leave rotation,
to be marked DOWN, to come back; requests sent; client errors; whether every promise of the
scenario held (and which did not).

``--write`` puts the table into docs/operations.md between ``<!-- BEGIN health table -->`` and
``<!-- END health table -->`` (nothing else in that file is touched; a file without the
markers is left alone), or into docs/health-measurements.md when operations.md has no
such section. Every load is bounded (requests and seconds); every process is started and
stopped by the scenario helpers, by PID.

    .venv/bin/python bench/health.py                       # 3 runs each, 24 clients
    .venv/bin/python bench/health.py --runs 1 --scenarios kill,drain --clients 8
    .venv/bin/python bench/health.py --write --json /tmp/health.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab import health_scenarios as scen  # noqa: E402

BEGIN = "<!-- BEGIN health table -->"
END = "<!-- END health table -->"
OPERATIONS = REPO / "docs" / "operations.md"
FALLBACK = REPO / "docs" / "health-measurements.md"
SUBSECTION = (
    "### Health checks: a backend dies, hangs, fails or is drained (bench/health.py)\n\n"
    "What a broken backend costs clients and how long it stays in rotation, measured with "
    "real processes (the scenarios `tests/test_health_e2e.py` asserts, rerun with more "
    "clients).\n\n"
)

WHAT_LEAVES = {
    "kill": "kill -9 -> out of rotation (passive)",
    "kill_post": "kill -9 -> out of rotation (passive)",
    "hang": "SIGSTOP -> ejected (response timeouts)",
    "hang_no_retry": "SIGSTOP -> ejected (response timeouts)",
    "health_500": "/healthz 500 -> out (DOWN after fall)",
    "traffic_503": "first 503 -> ejected (passive)",
    "drain": "drain call -> out of rotation",
    "all_down": "kill all -> every backend DOWN",
    "reload": "-",
    "reload_check_change": "kill -9 after a check-changing reload -> DOWN",
    "restart_ends_ejection": "kill -9 -> ejected (passive, eject_s 10)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--runs", type=int, default=3, help="repetitions of each scenario")
    ap.add_argument("--clients", type=int, default=24, help="concurrent keep-alive clients")
    ap.add_argument("--think", type=float, default=0.002, help="seconds between requests")
    ap.add_argument("--steady", type=float, default=2.0, help="seconds of load before the fault")
    ap.add_argument(
        "--scenarios", default=",".join(scen.SCENARIOS), help="comma-separated subset"
    )
    ap.add_argument("--write", action="store_true", help="update the table in docs/")
    ap.add_argument("--json", type=Path, help="write every run's measurements here")
    ap.add_argument("--keep-workdir", action="store_true", help="leave logs and configs behind")
    ap.add_argument("--from-json", type=Path, help="no runs: redo the table from a --json file")
    return ap.parse_args(argv)


def run_one(name: str, knobs: scen.Knobs, keep: bool) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"plb-health-{name}-"))
    t0 = time.monotonic()
    try:
        out: scen.Outcome = asyncio.run(scen.SCENARIOS[name](workdir, knobs))
        row = out.row()
        row["problems"] = out.problems
    except (AssertionError, TimeoutError, OSError) as exc:
        # A wait that timed out is a broken promise too (e.g. never marked DOWN).
        row = {"scenario": name, "requests": 0, "client_errors": None, "problems": [str(exc)]}
    row["key"] = name
    row["wall_s"] = round(time.monotonic() - t0, 1)
    row["workdir"] = str(workdir) if keep else None
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return row


def _fmt(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    med = statistics.median(vals)
    return f"{med:.2f}" if len(vals) == 1 else f"{med:.2f} / {max(vals):.2f}"


def summarize(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    held = sum(1 for r in rows if not r["problems"])
    errors = [r.get("client_errors") for r in rows]
    notes: dict[str, Any] = {}
    for key in (
        "attempts_on_dead", "up_s", "ramp_share", "posts", "posts_failed",
        "posts_failed_delivered", "posts_twice", "max_latency_s", "served_after_down",
        "ejections", "in_flight_at_drain", "drained_s", "slow_on_b2", "max_503_latency_ms",
        "p50_503_latency_ms", "load_max_503_latency_ms", "errors_before_all_down",
        "first_200_after_listen_s", "reload_applied_s", "first_check_of_new_s",
        "transitions_after_reload",
    ):
        vals = [r[key] for r in rows if key in r]
        if vals:
            notes[key] = vals if len(vals) > 1 else vals[0]
    problems = sorted({p for r in rows for p in r["problems"]})
    return {
        "key": name,
        "scenario": next((r["scenario"] for r in rows if r.get("leave_s") is not None
                          or r.get("down_s") is not None), rows[0]["scenario"]),
        "runs": len(rows),
        "requests": sum(r.get("requests") or 0 for r in rows),
        "errors": errors,
        "leave": _fmt([r.get("leave_s") for r in rows]),
        "down": _fmt([r.get("down_s") for r in rows]),
        "back": _fmt([r.get("back_s") for r in rows]),
        "held": f"{held}/{len(rows)}",
        "notes": notes,
        "problems": problems,
    }


def _note_text(key: str, notes: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {n}" for k, n in v.items()) + "}"
        return str(v)

    def one(k: str) -> Any:
        v = notes.get(k)
        if isinstance(v, list) and k != "ramp_share":
            return ", ".join(map(fmt, v))
        return fmt(v)

    if key in ("kill", "kill_post"):
        text = (f"failed attempts on the dead backend, all retried elsewhere: "
                f"{one('attempts_on_dead')}; UP {one('up_s')} s after it listens again")
        if key == "kill_post":
            text += (f"; POSTs sent {one('posts')}, failed {one('posts_failed')} (of which "
                     f"reached the killed backend: {one('posts_failed_delivered')}), "
                     f"delivered twice: {one('posts_twice')}")
        else:
            share = notes.get("ramp_share")
            first = share[0] if share and isinstance(share[0], list) else share
            text += f"; slow-start share per {scen.SLOW_START_S / 4:g} s: {first}"
        return text
    if key.startswith("hang"):
        return (f"worst client latency: {one('max_latency_s')} s; back = SIGCONT -> in "
                "rotation")
    if key == "health_500":
        return f"requests reaching it after DOWN: {one('served_after_down')}"
    if key == "traffic_503":
        return ("the errors are its own 503s before the ejection (bound: workers x "
                "consecutive_failures + clients); active checks stay UP")
    if key == "drain":
        return (f"in flight on it at the drain call: {one('in_flight_at_drain')}, all "
                f"finished with 200; in flight 0 after {one('drained_s')} s (2 s requests); "
                "nothing new reached it; back = enable -> in rotation")
    if key == "all_down":
        return (f"while all down, single requests get 503 in p50 {one('p50_503_latency_ms')} "
                f"ms, max {one('max_503_latency_ms')} ms (under the full load: max "
                f"{one('load_max_503_latency_ms')} ms); errors before all were DOWN: "
                f"{one('errors_before_all_down')}; first 200 {one('first_200_after_listen_s')} "
                f"s after a backend listens")
    if key == "reload":
        return (f"applied in {one('reload_applied_s')} s; a DOWN and two UP backends kept "
                f"their state, no flap; health transitions after it: "
                f"{one('transitions_after_reload')} (the new backend, which got no traffic "
                f"before its first passing check; back = its /healthz fixed -> in rotation)")
    if key == "reload_check_change":
        return ("a passing check change moved nobody; expect_body nobody sends: every live "
                "backend DOWN within fall x interval and unused; fixed: back within rise x "
                "interval (down = kill -9 after the reload -> DOWN)")
    if key == "restart_ends_ejection":
        return ("restarted 1 s after the kill; back = listening -> in rotation, ended by its "
                "passing checks, not by the 10 s ejection")
    return ""


def markdown(summaries: list[dict[str, Any]], args: argparse.Namespace, started: str) -> str:
    cpu = os.cpu_count()
    lines = [
        f"Measured {started} on {platform.node() or 'this host'} ({cpu} CPUs, "
        f"Python {platform.python_version()}), {args.runs} run(s) per scenario, "
        f"{args.clients} keep-alive clients ({args.think * 1000:g} ms think time), 3 backends, "
        f"2 workers. Checks every {scen.INTERVAL_S} s (timeout {scen.TIMEOUT_S} s, rise "
        f"{scen.RISE}, fall {scen.FALL}, jitter {scen.JITTER}); passive: "
        f"{scen.CONSECUTIVE_FAILURES} failures in a row, eject_s {scen.EJECT_S}; "
        f"slow_start_s {scen.SLOW_START_S} (kill only); response_timeout_s "
        f"{scen.RESPONSE_TIMEOUT_S} (hang only). Times are median / max over runs, in seconds,",
        "from the fault to what /status showed (polled every 20 ms). Rerun: "
        f"`.venv/bin/python bench/health.py --runs {args.runs} --clients {args.clients} --write`.",
        "",
        "| scenario | leaves rotation | time to leave (s) | marked DOWN (s) | back in rotation (s) "
        "| requests sent | client errors (per run) | promises held | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        errs = ", ".join("-" if e is None else str(e) for e in s["errors"])
        lines.append(
            f"| {s['scenario']} | {WHAT_LEAVES.get(s['key'], '')} | {s['leave']} | {s['down']} "
            f"| {s['back']} | {s['requests']} | {errs} | {s['held']} "
            f"| {_note_text(s['key'], s['notes'])} |"
        )
    broken = [s for s in summaries if s["problems"]]
    if broken:
        lines += ["", "Promises that did not hold in some run:", ""]
        for s in broken:
            for p in s["problems"]:
                lines.append(f"- {s['scenario']}: {p}")
    lines += [
        "",
        "Client errors in *all backends down* are expected: 502 while the dead backends are "
        "still being tried, then the immediate 503s the row describes. In *kill -9 (GET+POST)* "
        "a POST in flight on the killed backend fails and is never resent elsewhere; in *hang, "
        "no retry_on_timeout* the requests in flight on the hung backend get 504 after "
        "response_timeout_s. Every other scenario promises zero client errors.",
    ]
    return "\n".join(lines) + "\n"


def _replace_block(path: Path, block: str) -> bool:
    text = path.read_text()
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        path.write_text(head + block + tail)
        return True
    return False


def write_table(table: str) -> Path:
    """Replace our delimited section only; the rest of the file belongs to others.

    operations.md without the markers gets them once, in a subsection appended at its end
    (under "Measured behaviour", where engineers add measured tables).
    """
    block = f"{BEGIN}\n{table}{END}"
    if OPERATIONS.exists():
        if _replace_block(OPERATIONS, block):
            return OPERATIONS
        text = OPERATIONS.read_text()
        if "## Measured behaviour" in text:
            OPERATIONS.write_text(text.rstrip("\n") + "\n\n" + SUBSECTION + block + "\n")
            return OPERATIONS
    if FALLBACK.exists() and _replace_block(FALLBACK, block):
        return FALLBACK
    FALLBACK.write_text("# Health checks: measurements\n\n" + SUBSECTION + block + "\n")
    return FALLBACK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in scen.SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; choose from {list(scen.SCENARIOS)}", file=sys.stderr)
        return 2
    knobs = scen.Knobs(clients=args.clients, think_s=args.think, steady_s=args.steady)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows: list[dict[str, Any]] = []
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        rows = [r for r in saved["rows"] if r["key"] in names]
        started = saved.get("started", started)
        for key in ("runs", "clients", "think", "steady"):
            setattr(args, key, saved["args"][key])
    # Interleave repetitions (all scenarios, then again) so machine noise spreads evenly.
    for rep in range(0 if args.from_json else args.runs):
        for name in names:
            row = run_one(name, knobs, args.keep_workdir)
            rows.append(row)
            status = "ok" if not row["problems"] else f"BROKEN: {row['problems']}"
            print(f"[{rep + 1}/{args.runs}] {name}: {row.get('requests')} requests, "
                  f"{row.get('client_errors')} errors, leave {row.get('leave_s')} s, "
                  f"down {row.get('down_s')} s, {row['wall_s']} s wall; {status}",
                  file=sys.stderr, flush=True)
    summaries = [summarize(n, [r for r in rows if r["key"] == n]) for n in names]
    table = markdown(summaries, args, started)
    print(table)
    if args.json:
        doc = {"args": vars(args), "started": started, "rows": rows, "summary": summaries}
        args.json.write_text(json.dumps(doc, indent=2, default=str))
    if args.write:
        where = write_table(table)
        print(f"wrote the table to {where.relative_to(REPO)}", file=sys.stderr)
    return 0 if all(not s["problems"] for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
