#!/usr/bin/env python3
"""Chaos suite: a seeded random schedule of faults under steady load, and what must hold.

Builds the demo's network (lb.demo_net: a client, lb1 and lb2 sharing a VIP, three backends,
in namespaces; two real `pairlb run` processes with 2 workers each), sends 100 requests/s to
the VIP from the client (lb.demo_load: GETs, every 4th a POST with a unique X-Client-Id,
every 10th a GET the backend answers after 0.2 s, half on reused keep-alive connections,
open loop), and plays faults one after another, each
followed by a wait for a steady pair (one MASTER, one BACKUP, the VIP on the MASTER only,
every backend in rotation). The first round has every kind of fault in a seeded order; later
rounds pick at random; no fault of a later round starts after `--duration`.

Faults: kill -9 / SIGSTOP / graceful restart of a backend; kill -9 of one proxy worker;
kill -9 / SIGSTOP / link cut / graceful restart of the active node; SIGHUP with a changed
(valid) config and with a broken one; drain then maintenance then enable of a backend (on
both nodes, as an operator would); planned switchover (admin API).

Invariants, from records that do not trust pairlb (client records, the backends' kill-proof
journals, the kernel's address events):

- no POST reaches a backend twice, and no POST the client saw succeed is missing from the
  journals;
- no request that started after a drain took effect on a node (its admin call returned, plus
  50 ms for the workers' snapshot) is answered by that backend through that node, until it
  is enabled again (client records and backend journals both checked);
- never two VIP holders answering the client for longer than one heartbeat interval
  (successive successful requests, by start time, alternating between lb1 and lb2);
- after every fault the pair converges to exactly one MASTER holding the VIP;
- each fault's outage (longest time without a successful request) and failed requests
  within the earlier issues' targets: median outage after kill -9 and link cut of the active
  node <= 0.15 s (the same bound for a hung node), 0 failed requests for a graceful stop,
  a switchover, a hung node waking up, a reload (valid or broken), a drain or enable, 0
  failed GETs when a backend is killed, and after a worker kill only requests in flight on
  it may fail.

Prints a table per fault and writes it to docs/reliability.md (with the seed and command)
unless --no-docs; --json writes everything for tests. Needs root. Bounded: --duration for
the faults (plus the time the last one needs to settle), the load capped in requests too.

    sudo .venv/bin/python bench/chaos.py --duration 120 --seed 1
    sudo .venv/bin/python bench/chaos.py --duration 30 --seed 7 --no-docs --json /tmp/c.json

Imports lb.demo_net, lb.demo_load and lb.netns (the rig and the load the demo uses), never
pyroute2 or pairlb's internals: what it judges is the running processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# bench/failover.py would shadow the failover package: the repo first, bench/ not at all.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from lb import demo_net, netns  # noqa: E402
from lb.demo_load import (  # noqa: E402
    Record,
    RecordLog,
    attributed_at,
    handovers,
    window_stats,
)

RATE = 100.0
SLOW_EVERY = 10
SLOW_S = 0.2
"""Every 10th request is a GET the backend answers after 0.2 s: at any moment a few requests
are in flight, as with real traffic, so a fault that loses in-flight requests shows."""
REQUEST_TIMEOUT_S = 2.0
SETTLE_TIMEOUT_S = 20.0
BASELINE_S = 0.3
STABLE_S = 0.5
DRAIN_GRACE_S = 0.05
"""Issue 5: a worker applies a pool snapshot within milliseconds of the change."""
OUTAGE_TARGET_S = 0.15
"""Issue 4: median outage after kill -9 and link cut of the active node, default settings."""
DOCS = REPO / "docs" / "reliability.md"
KEEP_MARKER = "<!-- kept by bench/chaos.py: everything below is not the chaos report -->"

# What each fault costs in time, roughly (for the schedule: no fault starts after the end).
FAULTS: dict[str, float] = {
    "backend_kill": 4.0,
    "backend_stop": 4.0,
    "backend_restart": 3.0,
    "worker_kill": 2.0,
    "node_kill": 6.0,
    "node_stop": 3.0,
    "link_cut": 3.5,
    "node_restart": 6.0,
    "reload_ok": 1.5,
    "reload_bad": 1.5,
    "drain": 3.0,
    "switchover": 2.0,
}

# Per phase kind: (target text, check(stats) -> ok). Kinds without a check are reported only.
ZERO_FAILED = "0 failed"


@dataclass
class Phase:
    """One stretch of a fault: from its mark to the next mark (or to the settled pair)."""

    fault: int
    kind: str
    label: str
    t0: float
    t1: float = 0.0
    requests: int = 0
    failed: int = 0
    failed_get: int = 0
    failed_post: int = 0
    retried: int = 0
    five_xx: int = 0
    outage_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    target: str = ""
    ok: bool = True
    note: str = ""


@dataclass
class Report:
    seed: int
    duration_s: float
    command: str
    prefix: str = ""
    schedule: list[str] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    requests: int = 0
    failed: int = 0
    posts: int = 0
    elapsed_s: float = 0.0
    error: str = ""


def schedule(seed: int, duration_s: float) -> list[str]:
    """Every fault once in a seeded order, then seeded random picks, about `duration_s` long
    in total (the runner also stops starting faults once the time is up)."""
    rng = random.Random(seed)
    first = list(FAULTS)
    rng.shuffle(first)
    out, budget = [], 0.0
    for name in first:
        out.append(name)
        budget += FAULTS[name]
    names = list(FAULTS)
    while budget < duration_s:
        name = rng.choice(names)
        out.append(name)
        budget += FAULTS[name]
    return out


class ChaosError(RuntimeError):
    pass


class Chaos:
    """Runs the schedule on a Cluster and records marks; `analyse` computes the report."""

    def __init__(self, cluster: demo_net.Cluster, report: Report, rng: random.Random,
                 log: Callable[[str], None]) -> None:
        self.c = cluster
        self.report = report
        self.rng = rng
        self.say = log
        self.records = RecordLog(cluster.workdir / "requests.txt")
        self.phases: list[Phase] = []
        self.drains: list[dict[str, Any]] = []
        """Each drain: backend, {node: time the drain call returned}, enable time."""
        self.worker_kills: list[tuple[int, float]] = []
        self.variant = ""
        self.fault_no = 0
        self.started = time.monotonic()

    # marks and settling

    def mark(self, kind: str, label: str, t: float | None = None) -> Phase:
        t = time.monotonic() if t is None else t
        if self.phases and not self.phases[-1].t1:
            self.phases[-1].t1 = t
        ph = Phase(self.fault_no, kind, label, t)
        self.phases.append(ph)
        self.say(f"  {t - self.started:6.1f} s  #{self.fault_no} {label}")
        return ph

    def settle(self) -> None:
        """Wait for a steady pair served to the client by its MASTER; then close the phase."""
        c = self.c
        calm: dict[str, Any] = {"since": None, "master": None}

        def steady() -> bool:
            # Steady for STABLE_S with the same MASTER: a node that just came back passes its
            # checks first and preempts a moment later; that move belongs to this fault.
            if c.steady_problem() is not None:
                calm["since"] = None
                return False
            m, now = c.master(), time.monotonic()
            if calm["since"] is None or calm["master"] != m:
                calm["since"], calm["master"] = now, m
            return bool(now - calm["since"] >= STABLE_S)

        try:
            c.wait_for("a steady pair", steady, SETTLE_TIMEOUT_S, 0.05)
        except demo_net.DemoError:
            why = c.steady_problem()
            self.report.violations.append(
                f"fault #{self.fault_no} ({self.phases[-1].label}): the pair did not converge "
                f"to one MASTER with the VIP within {SETTLE_TIMEOUT_S:g} s: {why}")
            raise ChaosError(f"no steady pair after fault #{self.fault_no}: {why}") from None
        master = c.master()
        assert master is not None
        since = time.monotonic()

        def served() -> bool:
            self.records.poll()
            recent = [r for r in self.records.records if r.t0 > since and r.ok]
            m = c.master() or master
            return len(recent) >= 5 and all(r.peer == c.addr[m] for r in recent[-5:])

        try:
            c.wait_for(f"the client served by {master}", served, 5.0, 0.05)
        except demo_net.DemoError:
            self.report.violations.append(
                f"fault #{self.fault_no}: steady pair but the client is not served by the "
                f"MASTER {master} within 5 s (a blackhole)")
            c.topo.run(demo_net.CLIENT, ["ip", "neigh", "flush", "to", c.vip], check=False)
        time.sleep(BASELINE_S)
        self.phases[-1].t1 = time.monotonic()

    # the run

    def run(self, names: Sequence[str], duration_s: float) -> None:
        """The first round (every kind once) always plays; later faults only before the end."""
        self.started = time.monotonic()
        end = self.started + duration_s
        for i, name in enumerate(names):
            if i >= len(FAULTS) and time.monotonic() >= end:
                break
            self.fault_no += 1
            self.report.schedule.append(name)
            getattr(self, f"f_{name}")()
            self.settle()

    def master(self) -> str:
        m = self.c.master()
        if m is None:
            raise ChaosError("no single MASTER to hurt")
        return m

    def backend(self) -> str:
        return self.rng.choice(self.c.backend_names)

    # backends

    def f_backend_kill(self) -> None:
        b = self.backend()
        t = self.c.signal_backend(b, signal.SIGKILL)
        self.mark("backend_kill", f"kill -9 backend {b}", t)
        time.sleep(1.0)
        self.mark("backend_back", f"backend {b} started again")
        self.c.start_backend(b)
        self.c.wait_backend(b)

    def f_backend_stop(self) -> None:
        b = self.backend()
        t = self.c.signal_backend(b, signal.SIGSTOP)
        self.mark("backend_stop", f"SIGSTOP backend {b} (hung)", t)
        time.sleep(1.5)
        t = self.c.signal_backend(b, signal.SIGCONT)
        self.mark("backend_back", f"SIGCONT backend {b}", t)

    def f_backend_restart(self) -> None:
        b = self.backend()
        self.mark("backend_term", f"graceful restart of backend {b} (SIGTERM, start)")
        self.c.stop_backend(b)
        self.c.start_backend(b)
        self.c.wait_backend(b)

    def f_worker_kill(self) -> None:
        m = self.master()
        pids = self.c.worker_pids(m)
        if not pids:
            raise ChaosError(f"{m}: no worker pids in /status")
        pid = self.rng.choice(pids)
        t = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        self.worker_kills.append((self.fault_no, t))
        self.mark("worker_kill", f"kill -9 one proxy worker of {m} (pid {pid})", t)
        self.c.wait_for(f"{m}: worker replaced", lambda: len(
            [w for w in self.c.worker_pids(m) if w != pid]) == self.c.settings.workers, 10.0)

    # the active node

    def f_node_kill(self) -> None:
        m = self.master()
        t = self.c.signal_node(m, signal.SIGKILL)
        self.mark("node_kill", f"kill -9 the active node {m}", t)
        time.sleep(1.0)
        self.mark("node_back", f"{m} started again (stale VIP removed, rejoins)")
        self.c.start_lb(m)

    def f_node_stop(self) -> None:
        m = self.master()
        t = self.c.signal_node(m, signal.SIGSTOP)
        self.mark("node_stop", f"SIGSTOP the active node {m} (hung)", t)
        time.sleep(1.0)
        t = self.c.signal_node(m, signal.SIGCONT)
        self.mark("node_cont", f"SIGCONT {m} (the hung node wakes up)", t)

    def f_link_cut(self) -> None:
        m = self.master()
        t = time.monotonic()
        self.c.topo.cut_link(m)
        self.mark("link_cut", f"cut the link of the active node {m}", t)
        time.sleep(1.0)
        t = time.monotonic()
        self.c.topo.restore_link(m)
        self.mark("link_back", f"link of {m} restored", t)

    def f_node_restart(self) -> None:
        m = self.master()
        t = self.c.signal_control(m, signal.SIGTERM)
        self.mark("node_term", f"graceful restart of the active node {m}: SIGTERM", t)
        proc = self.c.lbs[m].proc
        proc.wait(15.0)
        self.mark("node_start", f"{m} started again")
        self.c.start_lb(m)

    # config and operator actions

    def _generations(self) -> dict[str, tuple[int, Any]]:
        out = {}
        for n in demo_net.LBS:
            st = self.c.status(n) or {}
            cfg = st.get("config") or {}
            out[n] = (int(cfg.get("generation", -1)), cfg.get("last_reload"))
        return out

    def f_reload_ok(self) -> None:
        self.variant = "alt" if self.variant == "" else ""
        before = self._generations()
        for n in demo_net.LBS:
            self.c.write_config(n, self.variant)
        t = time.monotonic()
        for n in demo_net.LBS:
            self.c.signal_control(n, signal.SIGHUP)
        self.mark("reload_ok", "SIGHUP both nodes with a changed, valid config", t)
        self.c.wait_for("both nodes reloaded", lambda: all(
            g[0] == before[n][0] + 1 for n, g in self._generations().items()), 10.0)
        time.sleep(0.5)

    def f_reload_bad(self) -> None:
        before = self._generations()
        for n in demo_net.LBS:
            self.c.write_config(n, "broken")
        t = time.monotonic()
        for n in demo_net.LBS:
            self.c.signal_control(n, signal.SIGHUP)
        self.mark("reload_bad", "SIGHUP both nodes with a broken config", t)

        def refused() -> bool:
            now = self._generations()
            return all(g[1] is not None and g[1] != before[n][1] and not g[1].get("ok")
                       for n, g in now.items())

        self.c.wait_for("both nodes to refuse the reload", refused, 10.0)
        after = self._generations()
        for n in demo_net.LBS:
            if after[n][0] != before[n][0]:
                self.report.violations.append(
                    f"fault #{self.fault_no}: {n} changed generation on a broken config "
                    f"({before[n][0]} -> {after[n][0]})")
            self.c.write_config(n, self.variant)  # the good file back, for later restarts
        time.sleep(0.5)

    def f_drain(self) -> None:
        b = self.backend()
        t = time.monotonic()
        done = self.c.set_admin_state(b, "drain")
        self.mark("drain", f"drain backend {b} on both nodes, then maintenance", t)
        entry = {"fault": self.fault_no, "backend": b, "effective": done, "until": 0.0}
        self.drains.append(entry)

        def idle() -> bool:
            for n in demo_net.LBS:
                st = self.c.status(n) or {}
                if self.c.backend_states(st).get(b, {}).get("in_flight", 1) != 0:
                    return False
            return True

        self.c.wait_for(f"{b}: nothing in flight", idle, 5.0)
        self.c.set_admin_state(b, "maintenance")
        time.sleep(1.0)
        t = time.monotonic()
        entry["until"] = t
        self.mark("enable", f"enable backend {b} again", t)
        self.c.set_admin_state(b, "enable")

    def f_switchover(self) -> None:
        m = self.master()
        peer = next(n for n in demo_net.LBS if n != m)
        t = time.monotonic()
        self.mark("switchover", f"planned switchover {m} -> {peer} (admin API)", t)
        self.c.switchover(m)


# -- analysis ------------------------------------------------------------------------------

TARGETS: dict[str, str] = {
    "backend_kill": "0 failed GETs",
    "backend_back": ZERO_FAILED,
    "backend_stop": "0 failed GETs (retried on timeout)",
    "backend_term": ZERO_FAILED,
    "worker_kill": "only requests in flight fail",
    "node_kill": f"median outage <= {OUTAGE_TARGET_S} s",
    "link_cut": f"median outage <= {OUTAGE_TARGET_S} s",
    "node_stop": f"median outage <= {OUTAGE_TARGET_S} s",
    "node_back": "no 5xx",
    "link_back": "no 5xx",
    "node_cont": ZERO_FAILED,
    "node_term": ZERO_FAILED,
    "node_start": "no 5xx",
    "reload_ok": ZERO_FAILED,
    "reload_bad": ZERO_FAILED,
    "drain": ZERO_FAILED,
    "enable": ZERO_FAILED,
    "switchover": ZERO_FAILED,
}


def analyse(chaos: Chaos, report: Report) -> None:
    c = chaos.c
    chaos.records.poll()
    recs = chaos.records.records
    report.requests = len(recs)
    report.failed = sum(1 for r in recs if not r.ok)
    report.posts = sum(1 for r in recs if r.method == "POST")
    journal = c.journal_entries()
    for ph in chaos.phases:
        ws = window_stats(recs, ph.t0, ph.t1 or time.monotonic(), SLOW_S)
        ph.requests, ph.failed, ph.retried = ws.requests, ws.failed, ws.retried
        ph.failed_get, ph.failed_post, ph.five_xx = ws.failed_get, ws.failed_post, ws.five_xx
        ph.outage_s = ws.max_gap_s
        ph.errors = dict(ws.errors)
        ph.target = TARGETS.get(ph.kind, "")
        if ph.target == ZERO_FAILED:
            ph.ok = ph.failed == 0
        elif ph.target.startswith("0 failed GETs"):
            ph.ok = ph.failed_get == 0
        elif ph.target == "no 5xx":
            ph.ok = ph.five_xx == 0
    for ph in chaos.phases:
        if not ph.ok:
            report.violations.append(
                f"fault #{ph.fault} {ph.label}: target {ph.target}, got {ph.failed} failed "
                f"({ph.failed_get} GET, {ph.failed_post} POST, {ph.five_xx} 5xx: "
                f"{ph.errors})")
    _check_worker_kills(chaos, recs, report)
    _check_outage_medians(chaos, report)
    _check_posts(recs, journal, report)
    _check_drains(chaos, recs, journal, report)
    _check_dual_answers(chaos, recs, report)
    _check_final(chaos, report)
    report.phases = chaos.phases


def _check_worker_kills(chaos: Chaos, recs: Sequence[Record], report: Report) -> None:
    for ph in chaos.phases:
        if ph.kind != "worker_kill":
            continue
        late = [r for r in recs if not r.ok and ph.t0 <= attributed_at(r, SLOW_S) < ph.t1
                and r.t0 > ph.t0 + 0.01]
        ph.note = f"{ph.failed} failed, all in flight at the kill" if not late else \
            f"{len(late)} failed that started after the kill"
        ph.ok = not late
        if late:
            report.violations.append(
                f"fault #{ph.fault} {ph.label}: {len(late)} requests that started after the "
                f"kill failed, e.g. {late[0]}")


def _check_outage_medians(chaos: Chaos, report: Report) -> None:
    groups = {"kill -9 and link cut of the active node": ("node_kill", "link_cut"),
              "hung (SIGSTOP) active node": ("node_stop",)}
    medians: dict[str, float | None] = {}
    for what, kinds in groups.items():
        values = [ph.outage_s for ph in chaos.phases if ph.kind in kinds]
        med = statistics.median(values) if values else None
        medians[what] = med
        if med is not None and med > OUTAGE_TARGET_S:
            report.violations.append(
                f"median outage after {what}: {med:.3f} s > {OUTAGE_TARGET_S} s "
                f"(each: {', '.join(f'{v:.3f}' for v in values)})")
    report.checks["outage_medians_s"] = medians


def _check_posts(recs: Sequence[Record], journal: Sequence[tuple[float, str, str, str, str]],
                 report: Report) -> None:
    seen = Counter(cid for _, _, method, cid, _ in journal if method == "POST")
    twice = {cid: n for cid, n in seen.items() if n > 1}
    where: dict[str, list[str]] = {}
    for t, b, _method, cid, peer in journal:
        if cid in twice:
            where.setdefault(cid, []).append(f"{b} via {peer} at {t:.3f}")
    for cid, places in list(where.items())[:10]:
        report.violations.append(f"POST {cid} delivered {len(places)} times: {places}")
    ok_posts = [r.cid for r in recs if r.method == "POST" and r.ok]
    missing = [cid for cid in ok_posts if cid not in seen]
    if missing:
        report.violations.append(
            f"{len(missing)} POSTs answered 2xx but never reached a backend, e.g. {missing[:5]}")
    report.checks["posts"] = {"sent": sum(1 for r in recs if r.method == "POST"),
                              "answered_ok": len(ok_posts), "delivered": len(seen),
                              "delivered_twice": len(twice), "ok_but_not_delivered":
                                  len(missing)}


def _check_drains(chaos: Chaos, recs: Sequence[Record],
                  journal: Sequence[tuple[float, str, str, str, str]], report: Report) -> None:
    c = chaos.c
    out = []
    for d in chaos.drains:
        b, until = d["backend"], d["until"] or time.monotonic()
        last_start = None
        bad_client, bad_server = [], []
        for node, t_eff in d["effective"].items():
            addr = c.addr[node]
            after = [r for r in recs if r.ok and r.backend == b and r.peer == addr
                     and t_eff < r.t0 < until]
            if after:
                last = max(r.t0 for r in after) - t_eff
                last_start = last if last_start is None else max(last_start, last)
            bad_client += [r for r in after if r.t0 > t_eff + DRAIN_GRACE_S]
            bad_server += [e for e in journal if e[1] == b and e[4] == addr
                           and t_eff + DRAIN_GRACE_S < e[0] < until]
        out.append({"fault": d["fault"], "backend": b, "last_request_started_after_s":
                    last_start, "violations_client": len(bad_client),
                    "violations_server": len(bad_server)})
        for ph in chaos.phases:
            if ph.fault == d["fault"] and ph.kind == "drain":
                ph.note = (f"{b}: no request routed to it after the drain call returned"
                           if last_start is None else
                           f"{b}: last request routed to it started "
                           f"{1000 * last_start:.0f} ms after the drain call returned")
                if bad_client or bad_server:
                    ph.ok = False
        if bad_client:
            report.violations.append(
                f"fault #{d['fault']}: {len(bad_client)} requests that started after the drain "
                f"of {b} took effect were answered by it, e.g. {bad_client[0]}")
        if bad_server:
            report.violations.append(
                f"fault #{d['fault']}: {b}'s journal shows {len(bad_server)} requests after "
                f"its drain took effect, e.g. {bad_server[0]}")
    report.checks["drains"] = out


def _check_dual_answers(chaos: Chaos, recs: Sequence[Record], report: Report) -> None:
    interval = chaos.c.settings.interval_s
    stretches = handovers(recs)
    worst = max((e - s for s, e, _ in stretches), default=0.0)
    report.checks["dual_answer_stretches"] = [
        {"at_s": round(s - chaos.started, 3), "length_s": round(e - s, 4), "changes": n}
        for s, e, n in stretches]
    report.checks["dual_answer_max_s"] = worst
    for s, e, n in stretches:
        if e - s > interval:
            report.violations.append(
                f"both nodes answered the client for {e - s:.3f} s ({n} alternations) at "
                f"{s - chaos.started:.1f} s: longer than one heartbeat interval ({interval} s)")
    watch = chaos.c.watch
    if watch is not None:
        report.checks["kernel_overlaps"] = [
            {"at_s": round(s - chaos.started, 3), "length_s": round(e - s, 4)}
            for s, e in watch.overlaps(chaos.started, time.monotonic())]


def _check_final(chaos: Chaos, report: Report) -> None:
    roles = {n: chaos.c.role(n) for n in demo_net.LBS}
    report.checks["final_roles"] = roles
    masters = [n for n, r in roles.items() if r == "MASTER"]
    if len(masters) != 1:
        report.violations.append(f"at the end: roles {roles}, not exactly one MASTER")
    elif chaos.c.holding() != set(masters):
        report.violations.append(
            f"at the end: MASTER {masters[0]} but the VIP is on {sorted(chaos.c.holding())}")


# -- output --------------------------------------------------------------------------------


def table(report: Report) -> list[str]:
    head = ("#", "fault", "target", "req", "failed (GET/POST)", "retried", "outage",
            "errors", "ok")
    rows = [head]
    for ph in report.phases:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(ph.errors.items(),
                                                           key=lambda kv: -kv[1])[:3]) or "-"
        rows.append((str(ph.fault), ph.label, ph.target or "-", str(ph.requests),
                     f"{ph.failed} ({ph.failed_get}/{ph.failed_post})", str(ph.retried),
                     f"{ph.outage_s:.3f} s", errors, "yes" if ph.ok else "NO"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out = ["| " + " | ".join(r[i].ljust(widths[i]) for i in range(len(head))) + " |"
           for r in rows]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return out


def summary_lines(report: Report) -> list[str]:
    ch = report.checks
    posts = ch.get("posts", {})
    med = ch.get("outage_medians_s", {})
    lines = [
        f"- requests: {report.requests} ({report.posts} POSTs), failed {report.failed}; "
        f"faults: {len(report.schedule)}",
        f"- POSTs: {posts.get('sent', 0)} sent, {posts.get('delivered', 0)} delivered, "
        f"{posts.get('delivered_twice', 0)} delivered twice, "
        f"{posts.get('ok_but_not_delivered', 0)} answered 2xx but not delivered",
    ]
    for d in ch.get("drains", []):
        last = d["last_request_started_after_s"]
        when = ("no request was routed to it after the drain call returned" if last is None
                else f"the last request routed to it started {1000 * last:.0f} ms after the "
                     "drain call returned")
        lines.append(f"- drain of {d['backend']} (fault #{d['fault']}): {when}; violations: "
                     f"{d['violations_client']} (client), {d['violations_server']} "
                     "(backend journal)")
    lines.append(f"- longest stretch with both nodes answering the client: "
                 f"{1000 * ch.get('dual_answer_max_s', 0):.1f} ms "
                 f"({len(ch.get('dual_answer_stretches', []))} stretches)")
    for what, v in med.items():
        lines.append(f"- median outage, {what}: "
                     + ("-" if v is None else f"{v:.3f} s") + f" (target <= {OUTAGE_TARGET_S} s)")
    lines.append(f"- final roles: {ch.get('final_roles')}")
    lines.append(f"- invariant violations: {len(report.violations)}")
    lines += [f"  - {v}" for v in report.violations]
    return lines


def write_docs(report: Report, path: Path = DOCS) -> None:
    body = "\n".join([
        "# Reliability: the chaos suite",
        "",
        "Produced by `bench/chaos.py` (the short version runs in `tests/test_chaos.py`). It",
        "builds the demo's network in namespaces (a client, lb1 and lb2 sharing a VIP, three",
        "backends; two real `pairlb run` processes with 2 workers each, heartbeat interval",
        f"{demo_net.Settings().interval_s * 1000:g} ms, the default), sends 100 requests/s to"
        " the VIP (GETs and every 4th a POST with a unique",
        "`X-Client-Id`; every 10th a GET the backend answers after 0.2 s, so requests are in",
        "flight when a fault hits; half on reused keep-alive connections; a GET that fails on a",
        "reused connection before any response byte is retried once, as browsers do; a POST",
        "never), and plays a seeded schedule of faults, each followed by a wait for a steady",
        "pair.",
        "Client records, the backends' kill-proof journals and the kernel's address events are",
        "the evidence; pairlb's own counters are not.",
        "",
        "A request belongs to the phase in which its answer was due (its start + 50 ms, + 0.2 s",
        "for a slow GET): one in flight when a fault hits belongs to the fault, however late it",
        "failed. Outage: the longest time between two successful completions in the phase. At",
        "100 requests/s, 10-30 ms is the load's own rhythm. Targets come from the earlier",
        "issues (see the docstring of bench/chaos.py).",
        "",
        f"Run: `{report.command}` (seed {report.seed}), {time.strftime('%Y-%m-%d')}, "
        f"{platform.node() or 'host'}: {os.cpu_count()} CPUs, Linux {platform.release()}; "
        f"{report.elapsed_s:.0f} s.",
        "",
        "## Invariants",
        "",
        *summary_lines(report),
        "",
        "## Per fault",
        "",
        *table(report),
        "",
    ])
    # Sections after KEEP_MARKER (the hostile-input table) are not ours: carried over.
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    if KEEP_MARKER in old:
        body += "\n" + old[old.index(KEEP_MARKER):]
    path.write_text(body, encoding="utf-8")


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(seed: int, duration_s: float, command: str, say: Callable[[str], None] = print,
        keep_workdir: bool = False) -> Report:
    """Build, run the schedule, analyse, tear down. Raises only on interrupt."""
    report = Report(seed=seed, duration_s=duration_s, command=command)
    reason = netns.skip_reason()
    if reason is not None:
        report.error = f"cannot run: {reason}"
        return report
    rng = random.Random(seed)
    names = schedule(seed, duration_s)
    workdir = Path(tempfile.mkdtemp(prefix=demo_net.WORKDIR_PREFIX + "chaos-"))
    t_start = time.monotonic()
    try:
        with demo_net.Cluster(workdir) as c:
            report.prefix = c.prefix
            say(f"chaos: seed {seed}, {duration_s:g} s of faults; namespaces {c.prefix}-*, "
                f"work dir {workdir}")
            c.start_backends()
            c.start_pair(timeout_s=30.0)
            c.wait_for("a steady pair", lambda: c.steady_problem() is None, 30.0, 0.05)
            c.start_load(workdir / "requests.txt", rate=RATE, duration_s=duration_s + 120.0,
                         timeout_s=REQUEST_TIMEOUT_S, slow_every=SLOW_EVERY, slow_s=SLOW_S)
            chaos = Chaos(c, report, rng, say)
            chaos.started = time.monotonic()
            time.sleep(1.0)
            try:
                chaos.run(names, duration_s)
            except (ChaosError, demo_net.DemoError, netns.NetnsError, OSError) as exc:
                report.error = str(exc).splitlines()[0]
                report.violations.append(f"run aborted: {report.error}")
                (workdir / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
            finally:
                if chaos.phases and not chaos.phases[-1].t1:
                    chaos.phases[-1].t1 = time.monotonic()
            time.sleep(REQUEST_TIMEOUT_S / 2)
            c.stop_load()
            analyse(chaos, report)
            if report.violations and keep_workdir:
                say(f"logs kept in {workdir}")
    finally:
        report.elapsed_s = time.monotonic() - t_start
        if not (keep_workdir and report.violations):
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--duration", type=float, default=120.0,
                    help="seconds of faults (no fault starts later; default 120)")
    ap.add_argument("--seed", type=int, default=None, help="schedule seed (default: random)")
    ap.add_argument("--no-docs", action="store_true", help="do not write docs/reliability.md")
    ap.add_argument("--json", metavar="FILE", help="write the report as JSON")
    ap.add_argument("--keep-logs", action="store_true",
                    help="keep the work dir (configs, logs, records) when an invariant fails")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 16)
    command = "sudo .venv/bin/python bench/chaos.py " + " ".join(
        shlex.quote(a) for a in ["--duration", f"{args.duration:g}", "--seed", str(seed)])
    old = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        report = run(seed, args.duration, command, keep_workdir=args.keep_logs)
    except KeyboardInterrupt:
        print("chaos: interrupted; everything was torn down", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
    if report.error and not report.phases:
        print(f"chaos: {report.error}", file=sys.stderr)
        return 2
    print()
    for line in table(report):
        print(line)
    print()
    for line in summary_lines(report):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(report), indent=1, default=str),
                                   encoding="utf-8")
    if not args.no_docs:
        write_docs(report)
        print(f"\nwrote {DOCS.relative_to(REPO)}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
