"""Real-host failover harness: two pairlb processes, a client and three backends in namespaces.

Shared by tests/test_failover_e2e.py (one run per scenario, asserts the targets of issue 4)
and bench/takeover.py (many runs, prints the table for docs/operations.md); the partition
guard's end-to-end test and bench/pair_scale.py build on `Rig` too.

`Rig` is a lab.pair.Pair (the topology, the nodes' and backends' processes, their logs, the
admin API, the kernel's record of the VIP): lb1 priority 150, lb2 priority 100, web1..3 on
port 8080, each node running `python -m lb run -c CFG` with the config of a `PairSettings`
(`Rig.config_text`) and its admin app on its own 127.0.0.1:9900 (namespaces have their own
loopback).

What is measured, and how, without trusting the code under test:

- `Prober`: a subprocess in the client namespace sends `GET /` to the VIP every 10 ms, each
  on a new connection with a short deadline (a fresh connection is what a new client does
  during a failover), and writes one line per attempt: start, end, status, and which LB
  carried it (the backends' `X-Peer` header: the address the request came from, i.e. the
  LB's own address; pairlb's own Via says only "pairlb").
- `rig.watch` (lab.vipwatch.VipWatch): rtnetlink address events from lb1 and lb2: exact
  times at which each kernel gained or lost the VIP, so "both held it at once, for how long"
  comes from the kernel itself.
- Heartbeats on the wire (`WireWatch`, `heartbeat_arrivals`): AF_PACKET in the receiver's
  namespace, the kernel's receive stamps.
- Times everywhere are CLOCK_MONOTONIC (time.monotonic), one clock for every process.

Run as a script it is the prober (`probe HOST[:PORT] OUT`). Imports lab.pair and lb.config
at the top (the prober pays for them once, before it starts probing), failover where a
scenario forges heartbeats; never pyroute2 (lab.vipwatch reads netlink).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from lab import netns
from lab.pair import ADMIN_PORT, LBS, PACKAGE_ROOT, Backend, Pair, Proc, failover_toml
from lb.config import DEFAULT_HEARTBEAT_INTERVAL_S

REPO = Path(PACKAGE_ROOT)
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable
BACKENDS = ("web1", "web2", "web3")
BACKEND_PORT = 8080
HTTP_PORT = 80
PROBE_INTERVAL_S = 0.01
PROBE_TIMEOUT_S = 0.5

# -- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairSettings:
    """What differs between runs: failover timing, preempt, and the node priorities."""

    interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S
    down_after: int = 3
    preempt: bool = True
    preempt_delay_s: float = 0.0
    priorities: tuple[int, int] = (150, 100)
    workers: int = 1
    health_interval_s: float = 0.2
    health_rise: int = 2
    health_fall: int = 2
    control_timeout_s: float = 10.0

    @property
    def label(self) -> str:
        text = f"interval {self.interval_s * 1000:g} ms, down_after {self.down_after}"
        return text if self.preempt else text + ", preempt off"


DEFAULT = PairSettings()
FAST = PairSettings(interval_s=0.01)
"""The fastest setting the docs name (interval 10 ms)."""


# -- the prober (runs in the client namespace) ----------------------------------------------


async def _probe_once(host: str, port: int, timeout_s: float) -> tuple[int, str, str]:
    """One GET on a new connection: (status, X-Peer, error); status 0 when none arrived."""
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = await reader.read(-1)
    except TimeoutError:
        return 0, "-", "timeout"
    except ConnectionRefusedError:
        return 0, "-", "refused"
    except OSError as exc:
        return 0, "-", f"errno{exc.errno}"
    finally:
        if writer is not None:
            writer.close()
    if not data:
        return 0, "-", "eof"
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    try:
        status = int(head[0].split()[1])
    except (IndexError, ValueError):
        return 0, "-", "garbled"
    peer = "-"
    for line in head[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "x-peer":
            peer = v.strip()
    return status, peer, "-" if status == 200 else f"http{status}"


async def _probe_loop(host: str, port: int, out: TextIO, interval_s: float,
                      timeout_s: float) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pending: set[asyncio.Task[None]] = set()

    async def one() -> None:
        t0 = time.monotonic()
        status, peer, err = await _probe_once(host, port, timeout_s)
        out.write(f"{t0:.6f} {time.monotonic():.6f} {status} {peer} {err}\n")

    due = time.monotonic()
    while not stop.is_set():
        task = asyncio.create_task(one())
        pending.add(task)
        task.add_done_callback(pending.discard)
        due += interval_s
        now = time.monotonic()
        if due < now:  # we stalled: keep the cadence from here, no burst
            due = now + interval_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), due - now)
    if pending:
        await asyncio.wait(pending, timeout=timeout_s + 1.0)


def probe_main(url_host: str, out_path: str, interval_s: float = PROBE_INTERVAL_S,
               timeout_s: float = PROBE_TIMEOUT_S) -> int:
    """Probe until SIGTERM; one line per request, line-buffered so readers see it at once."""
    host, _, port = url_host.partition(":")
    with open(out_path, "w", buffering=1, encoding="ascii") as out:
        asyncio.run(_probe_loop(host, int(port or HTTP_PORT), out, interval_s, timeout_s))
    return 0


# -- probe records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One client request: when it started and ended, its status, the LB that carried it."""

    t0: float
    t1: float
    status: int
    node: str
    error: str

    @property
    def ok(self) -> bool:
        return self.status == 200


# -- the rig --------------------------------------------------------------------------------


class RigError(AssertionError):
    """The rig could not reach the state a scenario needs (with the evidence)."""


class Rig(Pair):
    """The pair the failover scenarios drive: PairSettings configs, three backends and the
    long-lived client prober (and the VIP watch every Pair has)."""

    error = RigError
    evidence_lines = 40

    def __init__(self, workdir: Path | None = None) -> None:
        self._own_workdir = workdir is None
        super().__init__(workdir or Path(tempfile.mkdtemp(prefix="pairlb-e2e-")),
                         [Backend(name, BACKEND_PORT) for name in BACKENDS], PYTHON)
        try:
            self.settings = DEFAULT
            self.start_backends(10.0)
            self.probe_path = self.workdir / "probes.txt"
            self._probe_offset = 0
            self._attempts: list[Attempt] = []
            self.prober = self.popen(
                "client", [self.python, "-m", "lab.pair_rig", "probe", f"{self.vip}:{HTTP_PORT}",
                           str(self.probe_path)], self.log_path("probe"))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        super().close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # configs and nodes

    def config_text(self, node: str, settings: PairSettings) -> str:
        backends = ",\n".join(
            f'  {{ name = "{b}", address = "{self.addr[b]}:{BACKEND_PORT}" }}' for b in BACKENDS)
        s = settings
        more = f"preempt_delay_s = {s.preempt_delay_s}\n" + (
            "" if s.control_timeout_s == PairSettings.control_timeout_s
            else f"control_timeout_s = {s.control_timeout_s}\n")
        failover = failover_toml(node, addr=self.addr, vip=self.vip, key_file=self.key_file,
                                 priority=s.priorities[LBS.index(node)],
                                 interval_s=s.interval_s, down_after=s.down_after,
                                 preempt=s.preempt, more=more)
        return f"""\
[node]
name = "{node}"
workers = {s.workers}
shutdown_timeout_s = 2.0
state_dir = "{self.workdir / (node + '-state')}"

[[listener]]
name = "web"
bind = "{self.vip}:{HTTP_PORT}"
pool = "web"

[[pool]]
name = "web"
backends = [
{backends},
]

[pool.health]
interval_s = {s.health_interval_s}
timeout_s = {s.health_interval_s}
rise = {s.health_rise}
fall = {s.health_fall}

{failover}
[admin]
enabled = true
bind = "127.0.0.1:{ADMIN_PORT}"

[logging]
level = "info"
"""

    def start(self, node: str, settings: PairSettings | None = None) -> Proc:
        """Start pairlb in `node` (it must not run) with `settings` (default: the rig's)."""
        return self.start_lb(node, self.config_text(node, settings or self.settings))

    # the client's view

    def attempts(self, since: float = 0.0, until: float = float("inf")) -> list[Attempt]:
        """Client requests that started in [since, until], in the order they ended."""
        self._read_new_attempts()
        return [a for a in self._attempts if since <= a.t0 <= until]

    def _read_new_attempts(self) -> None:
        try:
            with open(self.probe_path, "rb") as f:
                f.seek(self._probe_offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for the next read
        self._probe_offset += end
        for line in chunk[:end].decode("ascii").splitlines():
            parts = line.split()
            if len(parts) == 5:
                self._attempts.append(Attempt(float(parts[0]), float(parts[1]), int(parts[2]),
                                              self.node_of_addr.get(parts[3], parts[3]),
                                              parts[4]))

    def served_by(self, node: str, since: float) -> bool:
        return any(a.ok and a.node == node for a in self.attempts(since))

    # steady state

    def steady(self, settings: PairSettings = DEFAULT, timeout_s: float = 15.0) -> None:
        """lb1 MASTER and lb2 BACKUP with `settings`, both healthy, the client served by lb1.

        Restarts nodes whose settings differ or that do not run.
        """
        for node in LBS:
            self.topo.isolate(node, False)
            self.topo.restore_link(node)
            self.unblock_backends(node)
        if settings != self.settings:
            for node in LBS:
                self.stop_lb(node)
            self.settings = settings
        for node in LBS:
            if not self.lb_running(node):
                self.signal_node(node, signal.SIGCONT)  # a SIGSTOPped leftover cannot die otherwise
                self.signal_node(node, signal.SIGKILL)
                self.start(node)
        self.wait_for("both nodes healthy with a role", lambda: all(
            (fo := self._fo_or_none(n)) is not None and fo["healthy"]
            and fo["role"] in ("MASTER", "BACKUP") for n in LBS), timeout_s)
        if self.role("lb1") != "MASTER":
            if self.role("lb2") == "MASTER":
                self.signal_control("lb2", signal.SIGUSR1)  # planned move back to lb1
            self.wait_role("lb1", "MASTER", timeout_s)
        self.wait_role("lb2", "BACKUP", timeout_s)
        self.wait_for("the VIP on lb1 only", lambda: self.watch.holding() == {"lb1"}, timeout_s)
        t = time.monotonic()
        try:
            self.wait_for("the client served by lb1", lambda: self._only_lb1_since(t), 3.0)
        except RigError:
            # An earlier scenario (already measured) may have left the client's ARP entry
            # on a MAC that no longer holds the VIP: start the client afresh.
            self.topo.run("client", ["ip", "neigh", "flush", "to", self.vip])
            t = time.monotonic()
            self.wait_for("the client served by lb1", lambda: self._only_lb1_since(t),
                          timeout_s)

    def _only_lb1_since(self, t: float) -> bool:
        recent = [a for a in self.attempts(t) if a.t1 > t]
        return len(recent) >= 5 and all(a.ok and a.node == "lb1" for a in recent[-5:])

    def _fo_or_none(self, node: str) -> dict[str, Any] | None:
        st = self.status(node)
        return None if st is None else st.get("failover")

    def renice_backends(self, nice: int) -> None:
        """Set the backends' nice value (they stand in for other hosts; on this box they
        compete with the LBs' control processes for the same CPUs)."""
        for name in BACKENDS:
            for pid in self.pids(name):
                with contextlib.suppress(ProcessLookupError):
                    os.setpriority(os.PRIO_PROCESS, pid, nice)

    # faults in the network

    def block_backends(self, node: str) -> None:
        """`node` can no longer reach any backend (unreachable routes in its namespace)."""
        for b in BACKENDS:
            self.topo.run(node, ["ip", "route", "replace", "unreachable", f"{self.addr[b]}/32"])

    def unblock_backends(self, node: str) -> None:
        for b in BACKENDS:
            self.topo.run(node, ["ip", "route", "del", "unreachable", f"{self.addr[b]}/32"],
                          check=False)


# -- outcomes ---------------------------------------------------------------------------------


class ScrapedRig(Rig):
    """The rig with a /metrics scraper in each node's namespace all along (bench/chaos_helpers.py
    ``scrape``: Prometheus's Accept header and gzip), standing for a Prometheus elsewhere:
    spared when a node's processes are killed. Fault tests run with it (docs: every fault
    test runs with Prometheus scraping)."""

    scrape_every_s = 0.5
    scrape_for_s = 150.0

    def __init__(self, workdir: Path | None = None) -> None:
        self.scrapers: dict[str, subprocess.Popen[bytes]] = {}
        super().__init__(workdir)

    def spared_pids(self) -> set[int]:
        return {p.pid for p in self.scrapers.values() if p.poll() is None}

    def start_scrapers(self) -> None:
        for node in LBS:
            every, for_s = self.scrape_every_s, self.scrape_for_s
            argv = [self.python, str(REPO / "bench" / "chaos_helpers.py"), "scrape",
                    str(self.scrape_file(node)), "--port", str(ADMIN_PORT), "--paths",
                    "/metrics", "--every", str(every), "--duration", str(for_s), "--max",
                    str(int(for_s / every) + 10), "--timeout", str(every * 4)]
            self.scrapers[node] = self.popen(node, argv, self.log_path(f"scrape-{node}"))

    def stop_scrapers(self) -> None:
        for p in self.scrapers.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
        for p in self.scrapers.values():
            try:
                p.wait(5.0)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(5.0)

    def scrape_file(self, node: str) -> Path:
        return self.workdir / f"scrapes-{node}.txt"

    def scrapes(self, node: str, since: float = 0.0, until: float = float("inf")
                ) -> list[tuple[float, float, int]]:
        """(start, end, status) of each scrape of `node` that started in [since, until]."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.scrape_file(node).read_text(encoding="ascii").splitlines():
                parts = line.split()
                if len(parts) == 6 and since <= float(parts[0]) <= until:
                    out.append((float(parts[0]), float(parts[1]), int(parts[3])))
        return out


@dataclass
class Outcome:
    """What one scenario run measured. Times in seconds; None when it did not happen."""

    scenario: str
    settings: str
    takeover_s: float | None = None
    """Fault to the first successful request through the other node (completion time)."""
    failed: int = 0
    """Client requests that failed in the window (refused, timed out, non-200)."""
    requests: int = 0
    max_gap_s: float = 0.0
    """Longest time between two consecutive successful completions in the window."""
    overlap_s: float = 0.0
    """Total time both kernels held the VIP at once, in the window."""
    unheld_s: float = 0.0
    """Total time no node held the VIP, in the window."""
    converge_s: float | None = None
    """SIGCONT (or heal) to a single VIP holder."""
    extra: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[float, float, str]] = field(default_factory=list)
    """Each failed request: start relative to the fault (s), duration (s), error."""
    vip_events: list[tuple[float, str, bool]] = field(default_factory=list)
    """VIP gained (True) or lost by a node, relative to the fault (s)."""

    def row(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "settings": self.settings,
                "takeover_s": self.takeover_s, "failed": self.failed,
                "requests": self.requests, "max_gap_s": self.max_gap_s,
                "overlap_s": self.overlap_s, "unheld_s": self.unheld_s,
                "converge_s": self.converge_s,
                "errors": self.errors, **self.extra}

    def describe(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v * 1000:.1f} ms"
        return (f"{self.scenario} [{self.settings}]: takeover {ms(self.takeover_s)}, "
                f"failed {self.failed}/{self.requests} {self.errors}, max gap "
                f"{ms(self.max_gap_s)}, both held {ms(self.overlap_s)}, none held "
                f"{ms(self.unheld_s)}, converge "
                f"{ms(self.converge_s)} {self.extra}")


def measure(rig: Rig, scenario: str, since: float, until: float, *, fault_at: float | None,
            new_node: str | None) -> Outcome:
    """Outcome of the window [since, until] from the prober's and the kernel's records."""
    attempts = rig.attempts(since, until)
    out = Outcome(scenario, rig.settings.label, requests=len(attempts))
    failed = [a for a in attempts if not a.ok]
    out.failed = len(failed)
    for a in failed:
        out.errors[a.error] = out.errors.get(a.error, 0) + 1
    ref = fault_at if fault_at is not None else since
    out.failures = [(round(a.t0 - ref, 4), round(a.t1 - a.t0, 4), a.error) for a in failed]
    ends = sorted(a.t1 for a in attempts if a.ok)
    if len(ends) >= 2:
        out.max_gap_s = max(b - a for a, b in itertools.pairwise(ends))
    if fault_at is not None and new_node is not None:
        firsts = [a.t1 for a in attempts if a.ok and a.node == new_node and a.t1 > fault_at]
        if firsts:
            out.takeover_s = min(firsts) - fault_at
    out.overlap_s = sum(e - s for s, e in rig.watch.overlaps(since, until))
    out.unheld_s = sum(e - s for s, e in rig.watch.unheld(since, until))
    out.vip_events = [(round(t - ref, 4), n, p) for t, n, p in rig.watch.events
                      if since <= t <= until]
    return out


def settle(rig: Rig, node: str, since: float, timeout_s: float = 5.0) -> float:
    """Wait until the client is served by `node`, then long enough for stragglers to end."""
    t = rig.wait_for(f"the client served by {node}", lambda: rig.served_by(node, since),
                     timeout_s, poll_s=0.01)
    time.sleep(PROBE_TIMEOUT_S + 0.1)
    return t


BLACKHOLE_LIMIT_S = 15.0
"""How long a scenario waits for the client to be served again before it records the
blackhole as at least this long (instead of failing the run)."""


# -- scenarios (each leaves the pair in some state; the next one calls rig.steady) -------------

BASELINE_S = 0.3


def kill9(rig: Rig) -> list[Outcome]:
    """kill -9 the whole active node; then restart it: stale VIP removed, failback."""
    rig.steady(rig.settings)
    since = time.monotonic()
    time.sleep(BASELINE_S)
    pids = rig.pids("lb1")
    t_fault = rig.signal_node("lb1", signal.SIGKILL, pids)
    settle(rig, "lb2", t_fault)
    out = measure(rig, "kill -9 active node", since, time.monotonic(), fault_at=t_fault,
                  new_node="lb2")
    out.extra["stale_vip_left"] = "lb1" in rig.watch.holding()
    return [out, *restart_after_kill(rig, "failback after kill -9")]


def restart_after_kill(rig: Rig, name: str) -> list[Outcome]:
    """Restart lb1 (killed): its stale VIP goes before it joins; failback per preempt."""
    since = time.monotonic()
    time.sleep(BASELINE_S)
    stale_before = "lb1" in rig.watch.holding()
    t_start = time.monotonic()
    rig.start("lb1")
    rig.wait_for("lb1 healthy", lambda: bool((rig._fo_or_none("lb1") or {}).get("healthy")),
                 10.0)
    if rig.settings.preempt:
        rig.wait_role("lb1", "MASTER", 10.0)
        settle(rig, "lb1", t_start)
        new_node = "lb1"
    else:
        time.sleep(1.0)
        new_node = "lb2"
    until = time.monotonic()
    out = measure(rig, name + ("" if rig.settings.preempt else " (preempt off)"), since,
                  until, fault_at=t_start, new_node=new_node)
    if not rig.settings.preempt:
        out.takeover_s = None
    removed = [t for t, present in rig.watch.changes("lb1", t_start) if not present]
    joined = rig.log_time("lb1", "from=INIT to=BACKUP")
    out.extra.update({
        "stale_vip_before_start": stale_before,
        "stale_vip_removed_s": round(removed[0] - t_start, 3) if removed else None,
        "joined_backup_s": None if joined is None else round(joined - t_start, 3),
        "lb1_transitions": rig.failover("lb1")["counters"]["transitions"],
        "masters": [n for n in LBS if rig.role(n) == "MASTER"],
    })
    return [out]


def failback_preempt_off(rig: Rig) -> list[Outcome]:
    """kill -9 lb1 with preempt off; restart it: lb2 keeps the VIP, no request lost."""
    rig.steady(replace(rig.settings, preempt=False))
    pids = rig.pids("lb1")
    t_fault = rig.signal_node("lb1", signal.SIGKILL, pids)
    settle(rig, "lb2", t_fault)
    return restart_after_kill(rig, "failback after kill -9")


def sigstop(rig: Rig, stopped_s: float = 1.0) -> list[Outcome]:
    """SIGSTOP the whole active node (hung), then SIGCONT: one holder again within one interval."""
    rig.steady(rig.settings)
    since = time.monotonic()
    time.sleep(BASELINE_S)
    pids = rig.pids("lb1")
    t_fault = rig.signal_node("lb1", signal.SIGSTOP, pids)
    try:
        rig.wait_for("lb2 to take the VIP", lambda: "lb2" in rig.watch.holding(), 5.0, 0.005)
        settle(rig, "lb2", t_fault)
        remaining = t_fault + stopped_s - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
    finally:
        t_cont = rig.signal_node("lb1", signal.SIGCONT, pids)
    t_single = rig.wait_for("a single VIP holder", lambda: len(rig.watch.holding()) == 1, 5.0,
                            0.002)
    time.sleep(PROBE_TIMEOUT_S + 0.5)
    until = time.monotonic()
    out = measure(rig, "SIGSTOP active node (hung)", since, t_cont, fault_at=t_fault,
                  new_node="lb2")
    after = measure(rig, "SIGCONT (hung node wakes up)", t_cont, until, fault_at=None,
                    new_node=None)
    # The last change that left one holder, from the kernel's own event times.
    last = [t for t, _n, p in rig.watch.events if t >= t_cont and not p]
    after.converge_s = (min(last) - t_cont) if last else (t_single - t_cont)
    after.overlap_s = sum(e - s for s, e in rig.watch.overlaps(t_cont, until))
    after.extra["holder_after"] = sorted(rig.watch.holding())
    return [out, after]


def link_cut(rig: Rig, down_s: float = 1.0) -> list[Outcome]:
    """Cut the active node's link (its bridge port); restore it: failback without 503s."""
    rig.steady(rig.settings)
    since = time.monotonic()
    time.sleep(BASELINE_S)
    t_fault = time.monotonic()
    rig.topo.cut_link("lb1")
    settle(rig, "lb2", t_fault)
    remaining = t_fault + down_s - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)
    out = measure(rig, "link cut of active node", since, time.monotonic(), fault_at=t_fault,
                  new_node="lb2")
    out.extra["lb1_role_during_cut"] = rig.role("lb1")
    since = time.monotonic()
    t_restore = time.monotonic()
    rig.topo.restore_link("lb1")
    if rig.settings.preempt:
        rig.wait_role("lb1", "MASTER", 10.0)
        settle(rig, "lb1", t_restore)
    else:
        time.sleep(1.0)
    back = measure(rig, "failback after link restored", since, time.monotonic(),
                   fault_at=t_restore, new_node="lb1")
    back.extra["lb1_transitions"] = rig.failover("lb1")["counters"]["transitions"]
    return [out, back]


def graceful_stop(rig: Rig) -> list[Outcome]:
    """SIGTERM the MASTER: priority 0, make-before-break; no request may fail."""
    rig.steady(rig.settings)
    since = time.monotonic()
    time.sleep(BASELINE_S)
    t_fault = rig.signal_control("lb1", signal.SIGTERM)
    settle(rig, "lb2", t_fault)
    rig.lbs["lb1"].proc.wait(timeout=10.0)
    time.sleep(0.2)
    out = measure(rig, "graceful stop (SIGTERM)", since, time.monotonic(), fault_at=t_fault,
                  new_node="lb2")
    out.extra["lb1_exit"] = rig.lbs["lb1"].proc.returncode
    return [out]


def switchover(rig: Rig) -> list[Outcome]:
    """SIGUSR1 to the MASTER: the peer takes the VIP first; no request may fail. Then back."""
    rig.steady(rig.settings)
    outs = []
    for old, new in (("lb1", "lb2"), ("lb2", "lb1")):
        since = time.monotonic()
        time.sleep(BASELINE_S)
        t_fault = rig.signal_control(old, signal.SIGUSR1)
        rig.wait_role(new, "MASTER", 5.0)
        settle(rig, new, t_fault)
        out = measure(rig, f"planned switchover {old} -> {new} (SIGUSR1)", since,
                      time.monotonic(), fault_at=t_fault, new_node=new)
        out.extra["old_role_after"] = rig.role(old)
        outs.append(out)
    return outs


def partition_heal(rig: Rig, partitioned_s: float = 1.0) -> list[Outcome]:
    """Isolate lb1 and lb2 from each other (both still reach the client); then heal."""
    rig.steady(rig.settings)
    since = time.monotonic()
    time.sleep(BASELINE_S)
    t_fault = time.monotonic()
    rig.topo.isolate("lb1")
    rig.topo.isolate("lb2")
    rig.wait_for("both MASTER", lambda: rig.watch.holding() == {"lb1", "lb2"}, 5.0, 0.005)
    time.sleep(partitioned_s)
    split = measure(rig, "partition (both MASTER)", since, time.monotonic(), fault_at=t_fault,
                    new_node="lb2")
    t_heal = time.monotonic()
    rig.topo.isolate("lb1", False)
    rig.topo.isolate("lb2", False)
    t_single = rig.wait_for("a single VIP holder", lambda: len(rig.watch.holding()) == 1, 5.0,
                            0.002)
    winner = next(iter(rig.watch.holding()))
    # A blackhole lasts until the client's ARP entry for the VIP times out (seconds): wait
    # for it rather than fail, so its length is measured.
    served = True
    try:
        settle(rig, winner, t_single, timeout_s=BLACKHOLE_LIMIT_S)
    except RigError:
        served = False
    time.sleep(0.5)
    healed = measure(rig, "partition healed", t_heal, time.monotonic(), fault_at=t_heal,
                     new_node=winner)
    healed.extra["served_again"] = served
    last = [t for t, _n, p in rig.watch.events if t >= t_heal and not p]
    healed.converge_s = (min(last) - t_heal) if last else (t_single - t_heal)
    healed.extra["winner"] = winner
    healed.extra["blackhole_s"] = blackhole(rig.attempts(t_heal), t_heal)
    return [split, healed]


def blackhole(attempts: Sequence[Attempt], since: float) -> float:
    """Longest run of failed attempts after `since`, start of first to end of last, in s."""
    worst, start = 0.0, None
    for a in sorted(attempts, key=lambda a: a.t0):
        if a.t0 < since:
            continue
        if a.ok:
            start = None
            continue
        if start is None:
            start = a.t0
        worst = max(worst, a.t1 - start)
    return worst


def unhealthy_no_takeover(rig: Rig, hold_s: float = 1.5) -> list[Outcome]:
    """lb1 restarts while it cannot reach any backend: it must not preempt; once its checks
    pass it takes the VIP back without a failed request."""
    rig.steady(rig.settings)
    rig.stop_lb("lb1")  # graceful: lb2 takes over without loss
    settle(rig, "lb2", time.monotonic())
    rig.block_backends("lb1")
    since = time.monotonic()
    time.sleep(BASELINE_S)
    rig.start("lb1")
    rig.wait_for("lb1 up", lambda: rig.status("lb1") is not None, 10.0)
    roles: set[str] = set()
    deadline = time.monotonic() + hold_s
    while time.monotonic() < deadline:
        r = rig.role("lb1")
        if r:
            roles.add(r)
        time.sleep(0.02)
    fo = rig.failover("lb1")
    held = measure(rig, "restart without healthy backends (no preempt)", since,
                   time.monotonic(), fault_at=None, new_node=None)
    held.extra.update({"lb1_roles_seen": sorted(roles), "lb1_healthy": fo["healthy"],
                       "vip_on_lb1": "lb1" in rig.watch.holding(), "lb1_faults": fo["faults"]})
    since = time.monotonic()
    t_fix = time.monotonic()
    rig.unblock_backends("lb1")
    t_master = rig.wait_for("lb1 MASTER again", lambda: rig.role("lb1") == "MASTER", 10.0)
    settle(rig, "lb1", t_fix)
    back = measure(rig, "checks pass, then preempt", since, time.monotonic(),
                   fault_at=t_fix, new_node="lb1")
    back.extra["backends_reachable_to_master_s"] = t_master - t_fix
    return [held, back]


def bad_heartbeats(rig: Rig, each: int = 50) -> list[Outcome]:
    """Forged, truncated, replayed and wrong-key heartbeats from lb2's address (a listed
    peer: they reach the MAC and replay checks), and correctly signed ones of a better
    "lb2" from the client (not a listed peer: dropped before the MAC) to lb1: counted, and
    nothing changes."""
    from failover import Heartbeat, HeartbeatFlags, Role, encode, generate_key

    rig.steady(rig.settings)
    captured = rig.topo.call("lb2", _capture_heartbeats, rig.addr["lb1"], 10, 2.0)
    if len(captured) < 5:
        raise RigError(f"captured only {len(captured)} heartbeats of lb2")
    time.sleep(0.2)  # every captured sequence number is now old
    before = rig.failover("lb1")
    before2 = rig.failover("lb2")
    now_ms = int(time.time() * 1000)
    forged_hb = Heartbeat(name="lb2", role=Role.MASTER, priority=254, epoch=7, seq=1 << 40,
                          timestamp_ms=now_ms, interval_ms=50, flags=HeartbeatFlags.HEALTHY,
                          healthy_count=3, total_count=3)
    wrong_key = encode(forged_hb, generate_key())
    good_shape = encode(forged_hb, rig.key)
    forged = good_shape[:-32] + bytes(32)  # right layout, made-up MAC
    truncated = captured[-1][: len(captured[-1]) // 2]
    packets: list[tuple[str, bytes]] = []
    for i in range(each):
        packets += [("bad_mac", forged), ("bad_mac", wrong_key), ("truncated", truncated),
                    ("replayed", captured[i % len(captured)])]
    stranger = [("unknown_source", good_shape)] * each
    since = time.monotonic()
    time.sleep(BASELINE_S)
    t_fault = time.monotonic()
    rig.topo.call("lb2", _send_udp, packets, (rig.addr["lb1"], 5405), 0.002)
    rig.topo.call("client", _send_udp, stranger, (rig.addr["lb1"], 5405), 0.002)
    packets += stranger
    time.sleep(0.5)
    after = rig.failover("lb1")
    after2 = rig.failover("lb2")
    out = measure(rig, "forged/truncated/replayed/wrong-key heartbeats", since,
                  time.monotonic(), fault_at=t_fault, new_node=None)
    expect: dict[str, int] = {}
    for reason, _ in packets:
        expect[reason] = expect.get(reason, 0) + 1
    got = {k: after["counters"]["rejected"].get(k, 0) - before["counters"]["rejected"].get(k, 0)
           for k in set(after["counters"]["rejected"]) | set(expect)}
    out.extra.update({
        "sent": expect, "rejected_delta": got,
        "roles": (after["role"], after2["role"]),
        "transitions_changed": (after["counters"]["transitions"]
                                != before["counters"]["transitions"]
                                or after2["counters"]["transitions"]
                                != before2["counters"]["transitions"]),
        "holders": sorted(rig.watch.holding()),
        "lb2_seen_by_lb1": [(p["name"], p["role"], p["priority"]) for p in after["peers"]],
    })
    return [out]


def _capture_heartbeats(dst: str, count: int, timeout_s: float) -> list[bytes]:
    """UDP payloads of heartbeats this namespace sends to `dst` (AF_PACKET sees outgoing
    frames only with ETH_P_ALL)."""
    eth_p_all = 0x0003
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(eth_p_all))
    try:
        s.bind((netns.NODE_IFNAME, eth_p_all))
        s.settimeout(0.1)
        out: list[bytes] = []
        dst_raw = socket.inet_aton(dst)
        deadline = time.monotonic() + timeout_s
        while len(out) < count and time.monotonic() < deadline:
            try:
                frame = s.recv(2048)
            except TimeoutError:
                continue
            if frame[12:14] != b"\x08\x00":
                continue
            ip = frame[14:]
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != socket.IPPROTO_UDP or ip[16:20] != dst_raw:
                continue
            if struct.unpack_from("!H", ip, ihl + 2)[0] == 5405:
                out.append(bytes(ip[ihl + 8:]))
        return out
    finally:
        s.close()


SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
SO_ATTACH_FILTER = 26
SOL_PACKET = 263
PACKET_STATISTICS = 6


def _heartbeat_filter(src: str) -> tuple[bytes, Any]:
    """Classic BPF for an AF_PACKET/SOCK_DGRAM socket (data starts at the IP header):
    UDP from `src` to port 5405. Returns the sock_fprog and the buffer it points to."""
    import ctypes

    src_k = int.from_bytes(socket.inet_aton(src), "big")
    prog = [
        (0x30, 0, 0, 9),        # A = protocol
        (0x15, 0, 6, 17),       # UDP?            else drop
        (0x20, 0, 0, 12),       # A = source address
        (0x15, 0, 4, src_k),    # from src?       else drop
        (0xB1, 0, 0, 0),        # X = IP header length
        (0x48, 0, 0, 2),        # A = UDP destination port
        (0x15, 0, 1, 5405),     # heartbeat port? else drop
        (0x06, 0, 0, 0xFFFF),   # accept
        (0x06, 0, 0, 0),        # drop
    ]
    raw = b"".join(struct.pack("HBBI", *ins) for ins in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    return struct.pack("HL", len(prog), ctypes.addressof(buf)), buf


def heartbeat_arrivals(src: str, stop: threading.Event, limit_s: float = 120.0
                       ) -> tuple[list[float], int]:
    """Arrival times of heartbeats from `src` at this namespace's eth0, until `stop` is set,
    and how many the capture dropped: the peer's view, taken from the wire (AF_PACKET, a BPF
    filter so nothing else fills the buffer), not from pairlb. The times are the kernel's
    receive stamps (SO_TIMESTAMPNS), on the monotonic clock, so a busy caller does not
    stretch the gaps."""
    eth_p_ip = 0x0800
    s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(eth_p_ip))
    try:
        fprog, keep = _heartbeat_filter(src)
        s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((netns.NODE_IFNAME, eth_p_ip))
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)  # resets the counters
        s.settimeout(0.05)
        src_raw = socket.inet_aton(src)
        out: list[float] = []
        offset = time.time() - time.monotonic()
        deadline = time.monotonic() + limit_s
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                ip, anc, _flags, _addr = s.recvmsg(2048, 64)
            except TimeoutError:
                continue
            stamp = time.time()
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
                    sec, nsec = struct.unpack_from("qq", data)
                    stamp = sec + nsec / 1e9
            ihl = (ip[0] & 0x0F) * 4
            if ip[9] != socket.IPPROTO_UDP or ip[12:16] != src_raw:
                continue
            if struct.unpack_from("!H", ip, ihl + 2)[0] == 5405:
                out.append(stamp - offset)
        _packets, drops = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        del keep
        return out, drops
    finally:
        s.close()


class WireWatch:
    """Heartbeats from one node as another node's NIC sees them, in a background thread:
    `longest_gap()` is the longest silence the receiver had to sit through (inf when the
    capture itself dropped packets: then it cannot tell)."""

    def __init__(self, rig: Rig, sender: str, receiver: str, limit_s: float = 600.0) -> None:
        self._stop = threading.Event()
        self._result: tuple[list[float], int] = ([], 0)
        src = rig.addr[sender]

        def run() -> None:
            self._result = netns.call_in_netns(rig.topo[receiver].netns, heartbeat_arrivals,
                                               src, self._stop, limit_s, timeout_s=limit_s + 5)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        time.sleep(0.1)  # the socket is open before the caller acts

    def stop(self) -> list[float]:
        """The arrival times (stops the capture); `drops` says how many it missed."""
        self._stop.set()
        self._thread.join(10.0)
        return self._result[0]

    @property
    def drops(self) -> int:
        return self._result[1]

    def longest_gap(self) -> float:
        times = self.stop()
        if self.drops:
            return float("inf")
        return max((b - a for a, b in itertools.pairwise(times)), default=float("inf"))


def _send_udp(packets: Sequence[tuple[str, bytes]], dest: tuple[str, int], gap_s: float) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, data in packets:
            s.sendto(data, dest)
            time.sleep(gap_s)
    return len(packets)


# -- the failover process (issue 12): its crash, the control process's crash or stall -------


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


def kill9_failover_process(rig: Rig) -> list[Outcome]:
    """kill -9 the MASTER's failover process only (its control process and workers live on).
    The peer takes the VIP on the missing heartbeats; the control process removes the one
    the dead process left (kill -9 releases nothing) once the peer could have, restarts the
    failover process, which joins as BACKUP, then takes the VIP back (preempt,
    make-before-break)."""
    rig.steady(rig.settings)
    since = time.monotonic()
    time.sleep(BASELINE_S)
    old = rig.failover_pid("lb1")
    if old is None:
        raise RigError(f"lb1 has no failover process\n{rig.log_tail('lb1')}")
    t_fault = time.monotonic()
    os.kill(old, signal.SIGKILL)
    rig.wait_for("lb2 to take the VIP", lambda: "lb2" in rig.watch.holding(), 5.0, 0.002)
    rig.wait_for("a new failover process on lb1",
                 lambda: rig.failover_pid("lb1") not in (None, old), 10.0, 0.01)
    new = rig.failover_pid("lb1")
    rig.wait_for("lb1 MASTER again", lambda: rig.role("lb1") == "MASTER", 10.0)
    rig.wait_for("the VIP on lb1 only", lambda: rig.watch.holding() == {"lb1"}, 5.0, 0.005)
    t_recovered = rig.log_time("lb1", "from=INIT to=BACKUP", after=t_fault)
    if t_recovered is None:
        raise RigError(f"lb1's new failover process never joined\n{rig.log_tail('lb1')}")
    settle(rig, "lb1", t_recovered)
    until = time.monotonic()
    out = measure(rig, "kill -9 failover process of the MASTER", since, t_recovered,
                  fault_at=t_fault, new_node="lb2")
    back = measure(rig, "its failover process restarted: failback", t_recovered, until,
                   fault_at=t_recovered, new_node="lb1")
    removed = [t for t, present in rig.watch.changes("lb1", t_fault) if not present]
    after = rig.watch.overlaps(t_recovered, until)
    before = rig.watch.overlaps(t_fault, t_recovered)
    st = rig.failover("lb1")
    out.extra.update({
        "old_pid": old, "new_pid": new,
        "recovered_s": round(t_recovered - t_fault, 3),
        "stale_vip_removed_s": round(removed[0] - t_fault, 3) if removed else None,
        "longest_overlap_before_recovery_s": max((e - s for s, e in before), default=0.0),
        "process": st.get("process"),
        "lb1_transitions": st["counters"]["transitions"],
    })
    back.extra.update({
        "longest_overlap_after_recovery_s": max((e - s for s, e in after), default=0.0),
        "masters": [n for n in LBS if rig.role(n) == "MASTER"],
    })
    return [out, back]


def failover_hung(rig: Rig) -> list[Outcome]:
    """SIGSTOP the MASTER's failover process only: the peer takes over on the missing
    heartbeats; the control process kills the silent process after node.worker_ping_timeout_s
    and starts a new one, which removes the stale VIP and takes the VIP back (preempt)."""
    rig.steady(rig.settings)
    since = time.monotonic()
    time.sleep(BASELINE_S)
    old = rig.failover_pid("lb1")
    if old is None:
        raise RigError(f"lb1 has no failover process\n{rig.log_tail('lb1')}")
    t_fault = time.monotonic()
    os.kill(old, signal.SIGSTOP)
    try:
        rig.wait_for("lb2 to take the VIP", lambda: "lb2" in rig.watch.holding(), 5.0, 0.002)
        settle(rig, "lb2", t_fault)
        rig.wait_for("a new failover process on lb1",
                     lambda: rig.failover_pid("lb1") not in (None, old), 20.0, 0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(old, signal.SIGCONT)  # dead by now, or it must not stay stopped
    rig.wait_for("lb1 MASTER again", lambda: rig.role("lb1") == "MASTER", 10.0)
    rig.wait_for("the VIP on lb1 only", lambda: rig.watch.holding() == {"lb1"}, 5.0, 0.005)
    t_recovered = rig.log_time("lb1", "from=INIT to=BACKUP", after=t_fault)
    if t_recovered is None:
        raise RigError(f"lb1's new failover process never joined\n{rig.log_tail('lb1')}")
    settle(rig, "lb1", t_recovered)
    until = time.monotonic()
    out = measure(rig, "failover process of the MASTER hung (SIGSTOP)", since, t_recovered,
                  fault_at=t_fault, new_node="lb2")
    back = measure(rig, "hung failover process replaced: failback", t_recovered, until,
                   fault_at=t_recovered, new_node="lb1")
    killed = rig.log_time("lb1", "event=failover_process_hung", after=t_fault)
    out.extra.update({
        "killed_after_s": None if killed is None else round(killed - t_fault, 3),
        "recovered_s": round(t_recovered - t_fault, 3),
        "process": rig.failover("lb1").get("process"),
    })
    back.extra["longest_overlap_after_recovery_s"] = max(
        (e - s for s, e in rig.watch.overlaps(t_recovered, until)), default=0.0)
    return [out, back]


def kill9_control(rig: Rig) -> list[Outcome]:
    """kill -9 the MASTER's control process only: its failover process sees the channel
    close, hands the VIP to the peer (priority 0, make-before-break) and exits; the
    workers drain and exit. No orphan keeps the VIP."""
    rig.steady(rig.settings)
    since = time.monotonic()
    time.sleep(BASELINE_S)
    lp = rig.lbs["lb1"]
    fo = rig.failover_pid("lb1")
    if fo is None:
        raise RigError(f"lb1 has no failover process\n{rig.log_tail('lb1')}")
    t_fault = time.monotonic()
    os.kill(lp.proc.pid, signal.SIGKILL)
    rig.wait_for("lb2 to take the VIP", lambda: "lb2" in rig.watch.holding(), 5.0, 0.002)
    settle(rig, "lb2", t_fault)
    t_exit = rig.wait_for("lb1's failover process to exit", lambda: _gone(fo), 10.0, 0.005)
    with contextlib.suppress(subprocess.TimeoutExpired):
        lp.proc.wait(timeout=5.0)
    rig.wait_for("lb1's workers to exit", lambda: all(_gone(p) for p in rig.pids("lb1")),
                 10.0, 0.05)
    out = measure(rig, "kill -9 control process of the MASTER", since, time.monotonic(),
                  fault_at=t_fault, new_node="lb2")
    released = [t for t, present in rig.watch.changes("lb1", t_fault) if not present]
    out.extra.update({
        "failover_exit_s": round(t_exit - t_fault, 3),
        "vip_released_s": round(released[0] - t_fault, 3) if released else None,
        "vip_on_lb1": "lb1" in rig.watch.holding(),
        "left_gracefully": rig.log_time("lb1", "failover_control_gone", after=t_fault)
        is not None,
    })
    return [out]


def control_stall(rig: Rig, stopped_s: float = 2.0) -> list[Outcome]:
    """SIGSTOP the MASTER's control process only, for less than control_timeout_s (a long
    /metrics render, a reload of thousands of backends): heartbeats go on from the failover
    process, nothing moves, and the workers serve on."""
    rig.steady(rig.settings)
    before = {n: rig.failover(n)["counters"]["transitions"] for n in LBS}
    since = time.monotonic()
    wire = WireWatch(rig, "lb1", "lb2")
    time.sleep(BASELINE_S)
    t_fault = rig.signal_control("lb1", signal.SIGSTOP)
    try:
        time.sleep(stopped_s)
    finally:
        rig.signal_control("lb1", signal.SIGCONT)
    time.sleep(PROBE_TIMEOUT_S + 0.2)
    gap = wire.longest_gap()
    out = measure(rig, f"control process of the MASTER stopped {stopped_s:g} s", since,
                  time.monotonic(), fault_at=t_fault, new_node=None)
    after = {n: rig.failover(n) for n in LBS}
    out.extra.update({
        "transitions_changed": any(after[n]["counters"]["transitions"] != before[n]
                                   for n in LBS),
        "holders": sorted(rig.watch.holding()),
        "vip_events": len(out.vip_events),
        "longest_heartbeat_gap_on_the_wire_s": round(gap, 4),
        "master_down_s": after["lb2"]["master_down_s"],
    })
    return [out]


def control_wedged(rig: Rig, timeout_s: float = 1.0) -> list[Outcome]:
    """SIGSTOP the MASTER's control process for longer than control_timeout_s (set to
    `timeout_s`): its failover process counts the node as unhealthy, so the VIP goes to the
    healthy peer (make-before-break); once it runs again, the node takes it back (preempt)."""
    rig.steady(replace(rig.settings, control_timeout_s=timeout_s))
    since = time.monotonic()
    time.sleep(BASELINE_S)
    t_fault = rig.signal_control("lb1", signal.SIGSTOP)
    try:
        rig.wait_for("lb2 to take the VIP", lambda: "lb2" in rig.watch.holding(),
                     timeout_s + 5.0, 0.005)
        settle(rig, "lb2", t_fault, timeout_s=timeout_s + 5.0)
    finally:
        t_cont = rig.signal_control("lb1", signal.SIGCONT)
    rig.wait_for("lb1 MASTER again", lambda: rig.role("lb1") == "MASTER", 10.0)
    settle(rig, "lb1", t_cont)
    until = time.monotonic()
    out = measure(rig, f"control process of the MASTER stopped > control_timeout_s "
                       f"({timeout_s:g} s)", since, t_cont, fault_at=t_fault, new_node="lb2")
    back = measure(rig, "control process runs again: failback", t_cont, until,
                   fault_at=t_cont, new_node="lb1")
    faulted = rig.log_time("lb1", "failover_control_silent", after=t_fault)
    out.extra["control_fault_s"] = None if faulted is None else round(faulted - t_fault, 3)
    back.extra["lb1_transitions"] = rig.failover("lb1")["counters"]["transitions"]
    return [out, back]


def control_wedged_both(rig: Rig, timeout_s: float = 1.0, stop_s: float = 2.5) -> list[Outcome]:
    """SIGSTOP both control processes for longer than control_timeout_s: both failover
    processes count their node as unhealthy, none has a healthy peer, so the best keeps
    the VIP (two faults used to leave it on neither). Then both run again."""
    rig.steady(replace(rig.settings, control_timeout_s=timeout_s))
    since = time.monotonic()
    time.sleep(BASELINE_S)
    t_fault = rig.signal_control("lb1", signal.SIGSTOP)
    rig.signal_control("lb2", signal.SIGSTOP)
    try:
        time.sleep(stop_s)
    finally:
        t_cont = rig.signal_control("lb1", signal.SIGCONT)
        rig.signal_control("lb2", signal.SIGCONT)
    settle(rig, "lb1", t_cont)
    until = time.monotonic()
    out = measure(rig, f"both control processes stopped {stop_s:g} s > control_timeout_s "
                       f"({timeout_s:g} s)", since, until, fault_at=t_fault, new_node=None)
    out.extra.update({
        "silent_logged": [n for n in LBS
                          if rig.log_time(n, "failover_control_silent", after=t_fault)],
        "unheld_s": sum(e - s for s, e in rig.watch.unheld(t_fault, until)),
        "holders": sorted(rig.watch.holding()),
    })
    return [out]


def reload_unchanged(rig: Rig) -> list[Outcome]:
    """SIGHUP the MASTER with the same file: the failover process gets the spec again and
    nothing moves."""
    rig.steady(rig.settings)
    before = rig.failover("lb1")["counters"]["transitions"]
    since = time.monotonic()
    time.sleep(BASELINE_S)
    t_fault = rig.signal_control("lb1", signal.SIGHUP)
    rig.wait_for("the reload", lambda: rig.log_time("lb1", "event=reloaded", after=t_fault)
                 is not None, 10.0)
    time.sleep(0.5)
    out = measure(rig, "reload with nothing changed (SIGHUP)", since, time.monotonic(),
                  fault_at=t_fault, new_node=None)
    out.extra.update({
        "transitions_changed": rig.failover("lb1")["counters"]["transitions"] != before,
        "holders": sorted(rig.watch.holding()),
        "pending_logged": rig.log_time("lb1", "failover_reload_pending", after=t_fault)
        is not None,
    })
    return [out]


SCENARIOS: dict[str, Callable[[Rig], list[Outcome]]] = {
    "kill9": kill9,
    "sigstop": sigstop,
    "link_cut": link_cut,
    "graceful": graceful_stop,
    "switchover": switchover,
    "preempt_off": failback_preempt_off,
    "partition": partition_heal,
    "unhealthy": unhealthy_no_takeover,
    "bad_heartbeats": bad_heartbeats,
    "kill9_failover": kill9_failover_process,
    "kill9_control": kill9_control,
    "failover_hung": failover_hung,
    "control_stall": control_stall,
    "control_wedged": control_wedged,
    "control_wedged_both": control_wedged_both,
    "reload_unchanged": reload_unchanged,
}


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def main(argv: list[str]) -> int:
    if argv[:1] == ["probe"] and len(argv) == 3:
        return probe_main(argv[1], argv[2])
    print("usage: python -m lab.pair_rig probe HOST[:PORT] OUT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
