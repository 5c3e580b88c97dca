"""``pairlb demo``: the live demo on the embedded default config (what ``./dev demo`` runs).

With root (network namespaces need CAP_NET_ADMIN) it builds a client, two load balancers and
the default config's three backends in namespaces (lab.cluster), starts two real pairlb
nodes that share a VIP, sends steady HTTP load to the VIP from the client namespace
(lab.load) and plays a story: a backend killed and restarted, a backend drained and
enabled, two backends added at runtime on the standby (the MASTER gets them over the sync
channel), the active load balancer killed with -9 and brought back, the two backends removed
again (drained), a planned switchover.
The pair serves HTTPS too, with a certificate made at start with the openssl CLI (skipped,
in one line, without it): a second client sends HTTPS requests to the VIP all along, each
on a new connection resuming its TLS session, and the demo shows that it went through the
failover with no certificate error and resumed its session on the other node.
A live view (redrawn once per second with plain ANSI codes; one plain line per second when
stdout is not a terminal) shows requests/s, errors, who holds the VIP and each backend's
state. At the end a table shows, per event, the outage it caused (the longest time without
a successful request) and the failed requests. Everything is torn down at the end, on
Ctrl-C and on errors; ``--keep`` leaves it running instead and prints where to look, and
``pairlb demo --cleanup`` removes what was kept.

Without root it says so in one line and runs the loopback version: the default config's
node and backends on 127.0.0.1, a backend killed and restarted, one drained and enabled.

The story runs on a thread of its own so the view keeps moving while an action waits; only
the main thread prints. Work files (configs, key, token, logs, records) live in a temporary
directory that is removed at the end.

Imports lab (cluster, pair, netns, load) and lb.config; failover only to write the loopback
run's admin token (the namespace run's nodes, key and token are lab.cluster's), healthcheck
not at all, and nothing here touches the root namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from lab import cluster as demo_net
from lab import netns, pair
from lab.load import Record, RecordLog, window_stats
from lab.ports import free_port
from lb import config as config_mod

DEFAULT_DURATION_S = 60.0
MIN_DURATION_S = 15.0
TICK_S = 1.0
RATE = 100.0
"""Requests per second sent by the load generator (10 ms apart: the outage resolution)."""
REQUEST_TIMEOUT_S = 2.0
DRAIN_GRACE_S = 0.05
"""A worker applies a new pool snapshot within milliseconds of the admin call returning."""
NONE_BELOW_S = 0.05
"""Gaps shorter than five request intervals are the load's own rhythm, not an outage."""
EXTRA_PORT = 8081
"""Where the backends the story adds at runtime listen (beside two of the config's)."""
HTTPS_EVERY_S = 0.25
"""The HTTPS client's pace (each request a new connection resuming the last session)."""


class DemoError(Exception):
    """The demo cannot go on; the message is one line for a person."""


class NoNamespaces(Exception):
    """Building the namespaces failed although we are root (a restricted container)."""


@dataclass
class Event:
    label: str
    t: float
    note: str = ""


@dataclass
class Step:
    """One beat of the story: run `action` at fraction `at` of the duration."""

    at: float
    label: str
    action: Callable[[], tuple[str, float]]
    """Does it; returns the event's label (may add details, e.g. which node) and the moment
    it happened (after any wait for the right state)."""


@dataclass
class BackendView:
    name: str
    state: str
    rps: int


@dataclass
class Frame:
    """What the live view shows at one tick."""

    elapsed_s: float
    duration_s: float
    ok_rps: int
    failed_rps: int
    total: int
    failed_total: int
    target: str
    """What the client sends to (the VIP, or the single node on loopback)."""
    holder: str
    """Who holds the VIP ("lb1", "lb1 and lb2", "nobody"; "-" without failover)."""
    nodes: list[tuple[str, str]]
    backends: list[BackendView]
    step: str
    https_ok: int | None = None
    """HTTPS answers in the last second (None: no HTTPS client)."""
    https_resumed: int = 0
    https_failed: int = 0


@dataclass
class Row:
    event: str
    outage_s: float
    failed: int
    requests: int
    errors: str
    note: str = ""

    @property
    def outage_text(self) -> str:
        return "none" if self.outage_s < NONE_BELOW_S else f"{self.outage_s:.3f} s"


# -- rendering (pure) ---------------------------------------------------------------------------

_BOLD, _RED, _GREEN, _YELLOW, _DIM, _RESET = (
    "\x1b[1m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[2m", "\x1b[0m")


def _colour(text: str, state: str, ansi: bool) -> str:
    if not ansi:
        return text
    s = state.lower()
    if s in ("up", "master", "standalone"):
        return _GREEN + text + _RESET
    if s in ("draining", "maintenance", "backup", "init", "ejected", "starting"):
        return _YELLOW + text + _RESET
    return _RED + text + _RESET


def render(frame: Frame, ansi: bool, width: int = 100) -> list[str]:
    """The live view's lines (no trailing newline), each cut to `width` visible columns."""
    b = (_BOLD, _RESET) if ansi else ("", "")
    nodes = "   ".join(f"{n} {_colour(r, r.split()[0], ansi)}" for n, r in frame.nodes)
    bes = "   ".join(f"{v.name} {_colour(v.state, v.state.split()[0], ansi)} {v.rps}/s"
                     for v in frame.backends)
    failed = frame.failed_rps
    failed_text = f"{failed} failed" if not ansi or not failed else f"{_RED}{failed} failed{_RESET}"
    https = ""
    if frame.https_ok is not None:
        https = f"   HTTPS {frame.https_ok} ok, {frame.https_resumed} resumed"
        if frame.https_failed:
            more = f"{frame.https_failed} failed"
            https += ", " + (f"{_RED}{more}{_RESET}" if ansi else more)
    lines = [
        f"{b[0]}pairlb demo{b[1]}  {frame.elapsed_s:3.0f} s of {frame.duration_s:.0f} s"
        f"   now: {frame.step}",
        f"  requests/s  {frame.ok_rps} ok, {failed_text}"
        f"   (so far {frame.total} requests, {frame.failed_total} failed){https}",
        (f"  VIP         {frame.target} held by {frame.holder}   {nodes}" if frame.holder != "-"
         else f"  serving     {frame.target} (one node, no VIP)   {nodes}"),
        f"  backends    {bes}",
    ]
    return [_cut(line, width) for line in lines]


def _cut(line: str, width: int) -> str:
    """Cut to `width` visible characters, keeping ANSI codes intact (no wrapped lines, so
    the cursor arithmetic of the redraw stays right)."""
    out, seen, i = [], 0, 0
    while i < len(line):
        if line[i] == "\x1b":
            j = line.find("m", i)
            if j < 0:
                break
            out.append(line[i:j + 1])
            i = j + 1
            continue
        if seen >= width:
            i += 1
            continue
        out.append(line[i])
        seen += 1
        i += 1
    return "".join(out)


def plain_line(frame: Frame) -> str:
    """One line per tick when stdout is not a terminal (logs, CI)."""
    nodes = " ".join(f"{n}={r.replace(' ', '_')}" for n, r in frame.nodes)
    bes = " ".join(f"{v.name}={v.state.replace(' ', '_')}" for v in frame.backends)
    https = ("" if frame.https_ok is None else
             f"https_ok/s={frame.https_ok} https_failed/s={frame.https_failed} ")
    return (f"t={frame.elapsed_s:.0f}s ok/s={frame.ok_rps} failed/s={frame.failed_rps} "
            f"{https}vip={frame.holder.split(' (')[0].replace(' and ', '+')} {nodes} {bes}")


def summarize(events: Sequence[Event], records: Sequence[Record], start: float,
              end: float) -> list[Row]:
    """One row per event: the requests that ended between it and the next event."""
    marks = [Event("steady load, no fault yet", start), *events]
    rows = []
    for i, ev in enumerate(marks):
        until = marks[i + 1].t if i + 1 < len(marks) else end
        ws = window_stats(records, ev.t, until)
        errors = ws.errors_text()
        if ws.failed_post:  # a POST in flight on a killed backend fails: it is never resent
            errors += f"; POST {ws.failed_post} (never resent)"
        rows.append(Row(ev.label, ws.max_gap_s, ws.failed, ws.requests, errors, ev.note))
    return rows


def render_summary(rows: Sequence[Row]) -> list[str]:
    head = ("event", "outage", "failed", "requests", "errors", "note")
    table = [head] + [(r.event, r.outage_text, str(r.failed), str(r.requests), r.errors,
                       r.note) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines = []
    for n, t in enumerate(table):
        cells = [t[i].ljust(widths[i]) if i in (0, 4, 5) else t[i].rjust(widths[i])
                 for i in range(len(head))]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


# -- the shared engine ----------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class _Demo:
    """Setup, a story thread, the live view on the main thread, the summary, teardown."""

    kind = ""

    def __init__(self, duration_s: float, keep: bool, out: TextIO) -> None:
        self.duration_s = duration_s
        self.keep = keep
        self.out = out
        self.ansi = out.isatty() and os.environ.get("TERM", "") != "dumb"
        self.workdir = Path(tempfile.mkdtemp(prefix=demo_net.WORKDIR_PREFIX))
        self.records_path = self.workdir / "requests.txt"
        self.log = RecordLog(self.records_path)
        self.events: list[Event] = []
        self.pending: list[Event] = []
        self.problems: list[str] = []
        self.stop = threading.Event()
        self.step_text = "starting"
        self.started_at = 0.0
        self.story_done = threading.Event()
        self._lock = threading.Lock()
        self._drawn = 0
        self.process_note: dict[str, str] = {}
        """Backend or node name -> what the story did to its process ("killed")."""

    # hooks for the two variants

    def setup(self) -> None:
        raise NotImplementedError

    def steps(self) -> list[Step]:
        raise NotImplementedError

    def look(self) -> tuple[str, str, list[tuple[str, str]], dict[str, str]]:
        """(target, VIP holder, [(node, role text)], {backend: state}) right now."""
        raise NotImplementedError

    def stop_load(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        raise NotImplementedError

    def keep_lines(self) -> list[str]:
        raise NotImplementedError

    def note(self, ev: Event, until: float) -> str:
        return ev.note

    def https_rates(self, now: float) -> tuple[int, int, int] | None:
        """HTTPS (ok, resumed, failed) that ended in the last tick; None: no HTTPS client."""
        return None

    def live_lines(self) -> list[str]:
        """Lines to print above the view at this tick (things the story does not time)."""
        return []

    def summary_lines(self) -> list[str]:
        """Lines after the summary table."""
        return []

    # output

    def say(self, text: str) -> None:
        """A line above the live view (the view is redrawn under it at the next tick)."""
        if threading.current_thread() is threading.main_thread():
            self._clear()
            print(text, file=self.out, flush=True)
        else:
            with self._lock:
                self.pending.append(Event(text, time.monotonic()))

    def _clear(self) -> None:
        if self.ansi and self._drawn:
            self.out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    # running

    def run(self) -> int:
        old = signal.signal(signal.SIGTERM, _raise_interrupt)
        interrupted = False
        try:
            self.setup()
            self.started_at = time.monotonic()
            story = threading.Thread(target=self._play, name="demo-story", daemon=True)
            story.start()
            self._watch()
            self._finish()
            return 1 if self.problems else 0
        except KeyboardInterrupt:
            interrupted = True
            self.stop.set()
            self._clear()
            print("\ninterrupted: tearing everything down", file=self.out, flush=True)
            with contextlib.suppress(Exception):
                self._finish(partial=True)
            return 130
        except (DemoError, demo_net.DemoError, netns.NetnsError, OSError) as exc:
            self.stop.set()
            self._clear()
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"pairlb demo: {first}", file=self.out, flush=True)
            detail = str(exc).splitlines()[1:]
            if detail:
                (self.workdir / "error.txt").write_text("\n".join(detail), encoding="utf-8")
            return 1
        finally:
            self.stop.set()
            keep = self.keep and not interrupted and not self.problems
            if not keep:
                with contextlib.suppress(KeyboardInterrupt):
                    self._teardown_quietly()
            signal.signal(signal.SIGTERM, old)

    def _teardown_quietly(self) -> None:
        try:
            self.teardown()
        except Exception as exc:  # a teardown problem must not hide the story's result
            print(f"pairlb demo: teardown: {exc}", file=self.out, flush=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _play(self) -> None:
        try:
            for step in self.steps():
                due = self.started_at + step.at * self.duration_s
                while time.monotonic() < due:
                    if self.stop.wait(0.05):
                        return
                self.step_text = step.label
                t = time.monotonic()
                try:
                    label, t = step.action()
                except Exception as exc:  # the story thread's error boundary: report, go on
                    first = (str(exc).splitlines() or [type(exc).__name__])[0]
                    label = f"{step.label} - FAILED: {first}"
                    self.problems.append(label)
                with self._lock:
                    self.events.append(Event(label, t))
                    self.pending.append(Event(
                        f"  {t - self.started_at:5.1f} s  {label}", t))
                if self.stop.is_set():
                    return
            self.step_text = "steady again; the story is over"
        finally:
            self.story_done.set()

    def _watch(self) -> None:
        end = self.started_at + self.duration_s
        next_tick = time.monotonic() + TICK_S
        while True:
            now = time.monotonic()
            if now >= end and self.story_done.is_set():
                break
            time.sleep(max(0.0, next_tick - now))
            next_tick += TICK_S
            self._tick()

    def _tick(self) -> None:
        self.log.poll()
        now = time.monotonic()
        with self._lock:
            lines, self.pending = [e.label for e in self.pending], []
        lines += self.live_lines()
        https = self.https_rates(now)
        recent = [r for r in self.log.records if now - TICK_S <= r.t1 < now]
        ok = [r for r in recent if r.ok]
        per_backend = Counter(r.backend for r in ok)
        target, holder, nodes, states = self.look()
        names = self.backend_names()
        names += [n for n in states if n not in names]  # added at runtime
        backends = [BackendView(name, states.get(name, "?"), per_backend.get(name, 0))
                    for name in names]
        failed_total = sum(1 for r in self.log.records if not r.ok)
        frame = Frame(now - self.started_at, self.duration_s, len(ok), len(recent) - len(ok),
                      len(self.log.records), failed_total, target, holder, nodes, backends,
                      self.step_text)
        if https is not None:
            frame.https_ok, frame.https_resumed, frame.https_failed = https
        if self.ansi:
            self._clear()
            for line in lines:
                print(line, file=self.out)
            width = shutil.get_terminal_size((100, 24)).columns - 1
            view = render(frame, True, width)
            self.out.write("\n".join(view) + "\n")
            self.out.flush()
            self._drawn = len(view)
        else:
            for line in lines:
                print(line, file=self.out)
            print(plain_line(frame), file=self.out, flush=True)

    def backend_names(self) -> list[str]:
        return [b.name for b in demo_net.default_layout()[1]]

    def _finish(self, partial: bool = False) -> None:
        self.stop.set()
        self.story_done.wait(10.0)
        end = time.monotonic()
        self.stop_load()
        self.log.poll()
        self._clear()
        with self._lock:
            for e in self.pending:
                print(e.label, file=self.out)
            self.pending = []
            events = list(self.events)
        if not self.started_at:
            return  # interrupted before the story started: nothing to sum up
        rows = summarize(events, self.log.records, self.started_at, end)
        for i, (row, ev) in enumerate(zip(rows[1:], events, strict=True)):
            row.note = self.note(ev, events[i + 1].t if i + 1 < len(events) else end)
        total = len(self.log.records)
        failed = sum(1 for r in self.log.records if not r.ok)
        title = "summary so far" if partial else "summary"
        print(f"\n{title}: {total} requests at {RATE:.0f}/s, {failed} failed; outage = the "
              f"longest time without a successful request (none: under "
              f"{NONE_BELOW_S * 1000:.0f} ms)", file=self.out)
        for line in render_summary(rows):
            print("  " + line, file=self.out)
        extra = self.summary_lines()
        if extra:
            print("", file=self.out)
            for line in extra:
                print(line, file=self.out)
        if self.problems:
            print(f"\n{len(self.problems)} step(s) did not go as planned:", file=self.out)
            for p in self.problems:
                print(f"  {p}", file=self.out)
        if self.keep and not partial and not self.problems:
            print("", file=self.out)
            for line in self.keep_lines():
                print(line, file=self.out)
        self.out.flush()


# -- with namespaces -----------------------------------------------------------------------


class NamespaceDemo(_Demo):
    """Two real pairlb nodes sharing a VIP in front of three backends, all in namespaces."""

    kind = "namespaces"

    def __init__(self, duration_s: float, keep: bool, out: TextIO) -> None:
        super().__init__(duration_s, keep, out)
        self.cluster: demo_net.Cluster | None = None
        _, layout = demo_net.default_layout()
        self.victim = layout[-1].name
        self.drained = max(layout, key=lambda b: b.weight).name
        self.killed_node = ""
        self.killed_at = 0.0
        self.https: demo_net.HttpsProbe | None = None
        self.https_told = False
        hosts = [b.name for b in layout[:2]]
        self.extra = {f"web{len(layout) + 1 + i}": host for i, host in enumerate(hosts)}
        """Backends the story adds at runtime and removes again: name -> the backend
        namespace it runs in (on EXTRA_PORT, beside that backend)."""

    @property
    def c(self) -> demo_net.Cluster:
        assert self.cluster is not None
        return self.cluster

    def setup(self) -> None:
        t0 = time.monotonic()
        try:
            self.cluster = demo_net.Cluster(self.workdir)
        except netns.NetnsError as exc:
            raise NoNamespaces(str(exc).splitlines()[0]) from None
        c = self.c
        names = ", ".join(c.nodes)
        self.say(f"network: {names} in namespaces {c.prefix}-* "
                 f"(built in {c.topo.build_s:.2f} s; VIP {c.vip})")
        try:
            c.tls = demo_net.make_demo_tls(self.workdir / "tls", [c.vip])
            self.say(f"HTTPS: a CA and a certificate for {c.tls.name} made with openssl; "
                     f"the nodes also serve https://{c.tls.name}:{c.tls.port}/ on the VIP "
                     "(session ticket key derived from the failover key both share)")
        except demo_net.DemoTlsUnavailable as exc:
            self.say(f"HTTPS: skipped ({exc}); the pair serves HTTP only this time")
        c.start_backends()
        for name, host in self.extra.items():  # not in the config: added during the story
            argv = [c.python, "-m", "lab.pair", "backend", name,
                    f"{c.addr[host]}:{EXTRA_PORT}", str(c.journal(name))]
            c.popen(host, argv, c.log_path(name))
        self.say(f"backends {', '.join(c.backend_names)} listening (and "
                 f"{' and '.join(self.extra)}, not in the config yet); starting pairlb on lb1 "
                 "(priority 150) and lb2 (priority 100)")
        c.start_pair(timeout_s=30.0)
        c.wait_for("a steady pair", lambda: c.steady_problem() is None, 30.0, 0.05)
        c.start_load(self.records_path, rate=RATE, duration_s=self.duration_s + 60.0,
                     timeout_s=REQUEST_TIMEOUT_S)
        self.say(f"lb1 is MASTER, lb2 BACKUP ({time.monotonic() - t0:.1f} s); the client "
                 f"sends {RATE:.0f} requests/s to http://{c.vip}:{c.listen_port}/ "
                 "(GETs, and every 4th a POST)")
        if c.tls is not None:
            self.https = demo_net.HttpsProbe(c, c.vip, c.tls, every_s=HTTPS_EVERY_S,
                                             timeout_s=REQUEST_TIMEOUT_S,
                                             max_requests=int((self.duration_s + 60.0)
                                                              / HTTPS_EVERY_S))
            self.https.start()
            self.say(f"a second client sends HTTPS to https://{c.tls.name}:{c.tls.port}/ "
                     f"({1 / HTTPS_EVERY_S:.0f}/s, each on a new connection resuming its TLS "
                     "session; it trusts the demo's CA only)")
        self.say("")

    def steps(self) -> list[Step]:
        c = self.c

        def kill_backend() -> tuple[str, float]:
            t = c.signal_backend(self.victim, signal.SIGKILL)
            self.process_note[self.victim] = "killed"
            return f"backend {self.victim} killed (kill -9)", t

        def restart_backend() -> tuple[str, float]:
            t = time.monotonic()
            c.start_backend(self.victim)
            self.process_note.pop(self.victim, None)
            return f"backend {self.victim} restarted", t

        def drain() -> tuple[str, float]:
            t = time.monotonic()
            c.set_admin_state(self.drained, "drain")
            return f"backend {self.drained} drained (admin API, both nodes)", t

        def enable() -> tuple[str, float]:
            t = time.monotonic()
            c.set_admin_state(self.drained, "enable")
            return f"backend {self.drained} enabled again", t

        pool = c.base.listener[0].pool
        extra = " and ".join(self.extra)

        def scale_up() -> tuple[str, float]:
            # On the standby: the change reaches the MASTER over the sync channel.
            node = next((n for n in pair.LBS if c.role(n) == "BACKUP"), pair.LBS[1])
            t = time.monotonic()
            for name, host in self.extra.items():
                code, body = c.admin(node, "POST", f"/pools/{pool}/backends", 3.0,
                                     {"name": name, "address": f"{c.addr[host]}:{EXTRA_PORT}"})
                if code != 201:
                    raise DemoError(f"adding {name} on {node}: {code} {body}")
            return f"backends scaled up: {extra} added on the standby {node}", t

        def scale_down() -> tuple[str, float]:
            node = c.master() or pair.LBS[0]
            t = time.monotonic()
            for name in self.extra:
                code, body = c.admin(node, "DELETE", f"/pools/{pool}/backends/{name}", 3.0)
                if code != 202:
                    raise DemoError(f"removing {name} on {node}: {code} {body}")
            return f"backends scaled down: {extra} removed on {node}", t

        def kill_active() -> tuple[str, float]:
            c.wait_for("a MASTER holding the VIP",
                       lambda: (m := c.master()) is not None and c.holding() == {m}, 15.0)
            node = c.master()
            if node is None:
                raise DemoError("no MASTER to kill")
            self.killed_node = node
            t = c.signal_node(node, signal.SIGKILL)
            self.killed_at = t
            self.process_note[node] = "killed"
            return f"active load balancer {node} killed (kill -9)", t

        def bring_back() -> tuple[str, float]:
            node = self.killed_node or "lb1"
            t = time.monotonic()
            c.start_lb(node)
            self.process_note.pop(node, None)
            return f"{node} brought back (rejoins as BACKUP, then takes the VIP back)", t

        def switchover() -> tuple[str, float]:
            # After the restart the higher-priority node takes the VIP back (preempt) once its
            # own checks pass; switch over only after that, from a steady pair.
            c.wait_for("a steady pair before the switchover",
                       lambda: c.steady_problem() is None and c.master() == pair.LBS[0],
                       30.0, 0.1)
            node = c.master()
            if node is None:
                raise DemoError("no MASTER to switch over from")
            peer = next(n for n in pair.LBS if n != node)
            t, _ = c.switchover(node)
            return f"planned switchover {node} -> {peer} (admin API)", t

        return [
            Step(0.08, f"killing backend {self.victim}", kill_backend),
            Step(0.18, f"restarting backend {self.victim}", restart_backend),
            Step(0.28, f"draining backend {self.drained}", drain),
            Step(0.37, f"enabling backend {self.drained}", enable),
            Step(0.45, f"scaling up: adding {extra}", scale_up),
            Step(0.55, "killing the active load balancer", kill_active),
            Step(0.66, "bringing it back", bring_back),
            Step(0.78, f"scaling down: removing {extra}", scale_down),
            Step(0.88, "planned switchover", switchover),
        ]

    def look(self) -> tuple[str, str, list[tuple[str, str]], dict[str, str]]:
        c = self.c
        holders = sorted(c.holding())
        nodes = []
        sts: dict[str, dict[str, Any] | None] = {}
        for n in pair.LBS:
            st = c.status(n, timeout_s=0.4)
            sts[n] = st
            if n in self.process_note:
                nodes.append((n, f"down ({self.process_note[n]})"))
            elif st is None:
                nodes.append((n, "starting" if c.lb_running(n) else "down"))
            else:
                nodes.append((n, str(st.get("role", "?"))))
        view = next((st for st in sts.values() if st and st.get("role") == "MASTER"), None)
        view = view or next((st for st in sts.values() if st), None)
        # A node whose processes are dead (or not up yet) holds a stale copy at most.
        live = [n for n in holders if (sts[n] or {}).get("role") == "MASTER"]
        stale = [n for n in holders if n not in live]
        holder = " and ".join(live) or "nobody"
        if stale:
            # kill -9 leaves the address on the dead node's interface; pairlb removes it when
            # the node starts again (and the peer's gratuitous ARP already moved the clients).
            holder += f" (stale copy on {' and '.join(stale)})"
        return f"{c.vip}:{c.listen_port}", holder, nodes, _backend_states(view, self.process_note)

    def note(self, ev: Event, until: float) -> str:
        c = self.c
        label = ev.label
        if "load balancer" in label and "killed" in label:
            node = label.split()[3]
            other = next(n for n in pair.LBS if n != node)
            first = _first_answer(self.log.records, c.addr[other], ev.t, until)
            if not first:
                return ""
            text = f"{other} answered {first} after the kill"
            https = self._https_after(other, ev.t, until)
            if https is not None:
                rec, _ = https
                text += f" (HTTPS {1000 * (rec.t1 - ev.t):.0f} ms, " + (
                    "session resumed)" if rec.reused else "full handshake)")
            return text
        if "brought back" in label:
            node = label.split()[0]
            first = _first_answer(self.log.records, c.addr[node], ev.t, until)
            return f"{node} answers again {first} later (after its checks passed)" \
                if first else ""
        if "switchover" in label:
            peer = label.split()[4]
            first = _first_answer(self.log.records, c.addr[peer], ev.t, until)
            both = sum(e - s for s, e in c.watch.overlaps(ev.t, until))
            return (f"{peer} answered {first} later; both held the VIP "
                    f"{1000 * both:.0f} ms (make-before-break)") if first else ""
        if "drained" in label:
            return _drain_note(self.drained, ev.t, until, self.log.records)
        if "scaled up" in label:
            firsts = [_first_answer(self.log.records, "", ev.t, until, n) for n in self.extra]
            if not all(firsts):
                return "not served yet"
            nodes = sorted({r.peer for r in self.log.records if r.ok and r.backend in
                            self.extra and ev.t < r.t1 < until})
            via = ", ".join(n for n in pair.LBS if c.addr[n] in nodes)
            return (f"served {max(firsts)} later, through {via} "
                    f"(in rotation after their first passing check)")
        if "scaled down" in label:
            late = [r for r in self.log.records if r.backend in self.extra
                    and ev.t + DRAIN_GRACE_S < r.t0 < until]
            return (f"{len(late)} requests started after the removal reached them" if late
                    else "drained: no new request reached them, none failed")
        return ""

    # HTTPS

    def _https_after(self, node: str, t: float, until: float = float("inf")
                     ) -> tuple[demo_net.HttpsRecord, int] | None:
        """The first HTTPS answer from `node` that ended after `t` (and before `until`),
        and how many HTTPS requests ended between `t` and it."""
        if self.https is None or self.cluster is None:
            return None
        recs = [r for r in self.https.snapshot() if r.t1 > t]
        for i, r in enumerate(recs):
            if r.ok and r.peer == self.cluster.addr[node] and r.t1 < until:
                return r, i
        return None

    def https_rates(self, now: float) -> tuple[int, int, int] | None:
        if self.https is None:
            return None
        recent = [r for r in self.https.snapshot() if now - TICK_S <= r.t1 < now]
        ok = [r for r in recent if r.ok]
        return len(ok), sum(1 for r in ok if r.reused), len(recent) - len(ok)

    def live_lines(self) -> list[str]:
        if self.https is None or not self.killed_at or self.https_told:
            return []
        other = next(n for n in pair.LBS if n != self.killed_node)
        found = self._https_after(other, self.killed_at)
        if found is None:
            if time.monotonic() - self.killed_at > 10.0:
                self.https_told = True  # reported in the summary instead
            return []
        rec, _ = found
        self.https_told = True
        how = ("resumed the client's TLS session (no new handshake)" if rec.reused
               else "a full handshake (the session was not resumed)")
        cert = self._https_cert_errors()
        return [f"  {rec.t1 - self.started_at:5.1f} s  HTTPS through the failover: {other} "
                f"answered {1000 * (rec.t1 - self.killed_at):.0f} ms after the kill, {how}; "
                f"certificate errors so far: {cert}"]

    def _https_cert_errors(self) -> int:
        if self.https is None:
            return 0
        return sum(1 for r in self.https.snapshot() if r.error == "certificate")

    def summary_lines(self) -> list[str]:
        c = self.cluster
        if self.https is None or c is None or c.tls is None:
            return []
        self.https.stop()
        recs = self.https.snapshot()
        failed = [r for r in recs if not r.ok]
        cert = self._https_cert_errors()
        resumed = sum(1 for r in recs if r.ok and r.reused)
        again = sum(1 for r in recs if r.ok and r.tries > 1)
        errors = Counter(r.error for r in failed)
        lines = [f"HTTPS: {len(recs)} requests to https://{c.tls.name}:{c.tls.port}/, "
                 f"{len(failed)} failed, {cert} certificate errors, {resumed} resumed their "
                 f"TLS session ({again} reconnected to get an answer)"
                 + (f"; errors: {', '.join(f'{k} {v}' for k, v in errors.items())}"
                    if errors else "")]
        if self.killed_at:
            other = next(n for n in pair.LBS if n != self.killed_node)
            found = self._https_after(other, self.killed_at)
            if found is None:
                lines.append(f"  {self.killed_node} killed: no HTTPS answer from {other} "
                             "after it")
            else:
                rec, _ = found
                how = (f"and resumed the TLS session {self.killed_node} had issued (no new "
                       "handshake)" if rec.reused else
                       f"with a full handshake (the session {self.killed_node} had issued "
                       "was not resumed)")
                lines.append(f"  {self.killed_node} killed: {other} answered HTTPS "
                             f"{1000 * (rec.t1 - self.killed_at):.0f} ms later {how}")
        if cert:
            self.problems.append(f"HTTPS: {cert} certificate errors")
        return lines

    def stop_load(self) -> None:
        if self.https is not None:
            self.https.stop()
        if self.cluster is not None:
            self.cluster.stop_load()

    def teardown(self) -> None:
        if self.https is not None:
            self.https.stop()
        if self.cluster is not None:
            self.cluster.close()

    def keep_lines(self) -> list[str]:
        c = self.c
        c.keep = True
        ports = {n: free_port() for n in (*pair.LBS, "vip")}
        pid = c.start_forwarder(ports)
        c.write_state(kept=True, forwarder_pid=pid, mode=self.kind)
        ns = {n: c.topo[n].netns for n in c.nodes}
        return [
            "left running (pairlb demo --cleanup removes it all):",
            f"  admin lb1   http://127.0.0.1:{ports['lb1']}/   (status page; /status is JSON)",
            f"  admin lb2   http://127.0.0.1:{ports['lb2']}/",
            f"  the VIP     http://127.0.0.1:{ports['vip']}/   (forwarded to "
            f"{c.vip}:{c.listen_port} from the client namespace)",
            f"  inside      sudo ip netns exec {ns['client']} curl -si "
            f"http://{c.vip}:{c.listen_port}/",
            *([f"              sudo ip netns exec {ns['client']} curl -si --cacert "
               f"{c.tls.ca} --resolve {c.tls.name}:{c.tls.port}:{c.vip} "
               f"https://{c.tls.name}:{c.tls.port}/"] if c.tls is not None else []),
            f"              sudo ip netns exec {ns['lb1']} pairlb status -c "
            f"{c.config_path('lb1')}",
            f"              sudo ip netns exec {ns['lb2']} pairlb switchover -c "
            f"{c.config_path('lb2')}",
            f"              sudo ip netns exec {ns['lb1']} bash   (a shell on lb1)",
            f"  files       {self.workdir} (configs, key, token, logs)",
            "  tear down   pairlb demo --cleanup",
        ]


def _backend_states(st: dict[str, Any] | None, notes: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    pools = (st or {}).get("pools") or []
    for b in pools[0]["backends"] if pools else []:
        admin = str(b.get("admin_state", "enabled"))
        health = str(b.get("health", "?"))
        state = admin if admin != "enabled" else ("up" if health == "up" else health.upper())
        if state == "up" and b.get("ejected"):
            # Passive checks took it out (errors seen by the proxy); it returns when the
            # ejection time is over and its active checks pass.
            state = f"ejected {float(b.get('ejected_for_s', 0)):.0f}s"
        if b["name"] in notes:
            state = f"{state} ({notes[b['name']]})"
        out[b["name"]] = state
    return out


def _first_answer(records: Sequence[Record], peer: str, since: float, until: float,
                  backend: str | None = None) -> str:
    """How long after `since` the first success through `peer` (or, with `backend`, from
    that backend) arrived ("" if none)."""
    times = [r.t1 for r in records if r.ok and since <= r.t1 < until
             and (r.backend == backend if backend is not None else r.peer == peer)]
    if not times:
        return ""
    dt = min(times) - since
    return f"{dt * 1000:.0f} ms" if dt < 1 else f"{dt:.1f} s"


def _drain_note(backend: str, t: float, until: float, records: Sequence[Record]) -> str:
    late = [r for r in records
            if r.backend == backend and t + DRAIN_GRACE_S < r.t0 < until]
    return (f"{backend} answered {len(late)} requests started after the drain"
            if late else f"{backend} got no new request after the drain")


# -- loopback ----------------------------------------------------------------------------------


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LoopbackDemo(_Demo):
    """One pairlb node and the default config's backends on 127.0.0.1 (no root needed)."""

    kind = "loopback"

    def __init__(self, duration_s: float, keep: bool, out: TextIO) -> None:
        super().__init__(duration_s, keep, out)
        self.base, self.layout = demo_net.default_layout()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.victim = self.layout[-1].name
        self.drained = max(self.layout, key=lambda b: b.weight).name
        self.token = os.urandom(16).hex()
        self.host, self.port = self.base.listener[0].host_port
        self.ports = {b.name: b.port for b in self.layout}
        self.admin_port = 9900

    def _spawn(self, name: str, argv: list[str]) -> None:
        with open(self.workdir / f"{name}.log", "ab") as log:
            self.procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=pair.child_env(),
                start_new_session=True)

    def _choose_ports(self) -> None:
        wanted = [self.port, self.admin_port, *self.ports.values()]
        if all(_port_free(p) for p in wanted):
            return
        self.port = free_port()
        self.admin_port = free_port()
        self.ports = {n: free_port() for n in self.ports}
        self.say(f"the default ports ({', '.join(map(str, wanted))}) are in use here: "
                 "using free ones instead")

    def config_text(self) -> str:
        """The embedded default with free ports if needed, an admin token and fast checks."""
        import failover

        token_file = self.workdir / "admin.token"
        failover.write_secret(str(token_file), self.token.encode() + b"\n", replace=True)
        lst = self.base.listener[0]
        pool = self.base.pool_by_name(lst.pool)
        backends = ",\n".join(
            f'  {{ name = "{b.name}", address = "127.0.0.1:{self.ports[b.name]}", '
            f"weight = {b.weight} }}" for b in pool.backends)
        text = f"""\
# Written by pairlb demo (loopback): the embedded default config, plus an admin token and
# faster health checks so the story is quick.
[node]
name = "{self.base.node.name}"
workers = 1
shutdown_timeout_s = 2.0
state_dir = "{self.workdir / 'state'}"

[[listener]]
name = "{lst.name}"
bind = "127.0.0.1:{self.port}"
mode = "{lst.mode}"
pool = "{pool.name}"

[[pool]]
name = "{pool.name}"
balance = "{pool.balance}"
response_timeout_s = 0.5
retry_on_timeout = true
backends = [
{backends},
]

[pool.health]
interval_s = 0.2
timeout_s = 0.2
rise = 2
fall = 2

[pool.passive]
eject_s = 2.0
max_eject_s = 10.0

[admin]
bind = "127.0.0.1:{self.admin_port}"
token_file = "{token_file}"
"""
        config_mod.loads(text, "<loopback demo config>")
        return text

    def admin(self, method: str, path: str, timeout_s: float = 2.0) -> tuple[int, Any]:
        return pair.admin_call(f"http://127.0.0.1:{self.admin_port}", method, path,
                                   self.token if method == "POST" else None, timeout_s)

    def status(self) -> dict[str, Any] | None:
        code, body = self.admin("GET", "/status", 0.5)
        return body if code == 200 and isinstance(body, dict) else None

    def _wait(self, what: str, cond: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            for name, p in self.procs.items():
                if p.poll() is not None and name not in self.process_note:
                    tail = (self.workdir / f"{name}.log").read_text(errors="replace")
                    last = tail.strip().splitlines()[-1:] or ["(no output)"]
                    raise DemoError(f"{name} exited while waiting for {what}: {last[0]}")
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout_s:g} s waiting for {what}")
            time.sleep(0.05)

    def start_backend(self, name: str) -> None:
        self._spawn(name, [sys.executable, "-m", "lab.pair", "backend", name,
                           f"127.0.0.1:{self.ports[name]}",
                           str(self.workdir / f"{name}.journal")])

    def setup(self) -> None:
        self._choose_ports()
        cfg = self.workdir / "pairlb.toml"
        cfg.write_text(self.config_text(), encoding="utf-8")
        for b in self.layout:
            self.start_backend(b.name)
        self._wait("the backends", lambda: all(not _port_free(p) for p in self.ports.values()),
                   15.0)
        self._spawn("lb1", [sys.executable, "-m", "lb", "run", "-c", str(cfg)])

        def all_up() -> bool:
            st = self.status()
            states = _backend_states(st, {})
            return bool(states) and all(s == "up" for s in states.values())

        self._wait("pairlb and its backends", all_up, 30.0)
        self._spawn("load", [sys.executable, "-m", "lab.load", f"127.0.0.1:{self.port}",
                             str(self.records_path), "--rate", str(RATE), "--duration",
                             str(self.duration_s + 60.0), "--timeout", str(REQUEST_TIMEOUT_S),
                             "--max-requests", str(int(RATE * (self.duration_s + 60.0)))])
        self.say(f"pairlb (one node, {self.base.node.name}) serves http://127.0.0.1:{self.port}/ "
                 f"in front of {', '.join(self.ports)}; the demo sends {RATE:.0f} requests/s")
        self.say("")

    def steps(self) -> list[Step]:
        pool = self.base.listener[0].pool

        def kill_backend() -> tuple[str, float]:
            p = self.procs[self.victim]
            t = time.monotonic()
            os.kill(p.pid, signal.SIGKILL)
            p.wait(5.0)
            self.process_note[self.victim] = "killed"
            return f"backend {self.victim} killed (kill -9)", t

        def restart_backend() -> tuple[str, float]:
            t = time.monotonic()
            self.start_backend(self.victim)
            self.process_note.pop(self.victim, None)
            return f"backend {self.victim} restarted", t

        def action(verb: str) -> tuple[str, float]:
            t = time.monotonic()
            code, body = self.admin("POST", f"/backends/{pool}/{self.drained}/{verb}")
            if code != 200:
                raise DemoError(f"{verb} {self.drained}: {code} {body}")
            return (f"backend {self.drained} drained (admin API)" if verb == "drain"
                    else f"backend {self.drained} enabled again"), t

        return [
            Step(0.15, f"killing backend {self.victim}", kill_backend),
            Step(0.35, f"restarting backend {self.victim}", restart_backend),
            Step(0.55, f"draining backend {self.drained}", lambda: action("drain")),
            Step(0.75, f"enabling backend {self.drained}", lambda: action("enable")),
        ]

    def look(self) -> tuple[str, str, list[tuple[str, str]], dict[str, str]]:
        st = self.status()
        role = "down" if st is None else str(st.get("role", "?"))
        return (f"127.0.0.1:{self.port}", "-",
                [("lb1", role)], _backend_states(st, self.process_note))

    def note(self, ev: Event, until: float) -> str:
        if "drained" in ev.label:
            return _drain_note(self.drained, ev.t, until, self.log.records)
        return ""

    def backend_names(self) -> list[str]:
        return [b.name for b in self.layout]

    def stop_load(self) -> None:
        p = self.procs.get("load")
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(5.0)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(5.0)

    def teardown(self) -> None:
        self.stop_load()
        order = ["lb1", *(n for n in self.procs if n not in ("lb1", "load"))]
        for name in order:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            os.kill(p.pid, signal.SIGCONT)
            os.kill(p.pid, signal.SIGTERM)
            try:
                p.wait(10.0)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(5.0)

    def keep_lines(self) -> list[str]:
        pids = {n: p.pid for n, p in self.procs.items() if p.poll() is None}
        state = {"mode": self.kind, "kept": True, "workdir": str(self.workdir),
                 "pids": pids, "pid": os.getpid()}
        (self.workdir / demo_net.STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        return [
            "left running (pairlb demo --cleanup stops it):",
            f"  pairlb      http://127.0.0.1:{self.port}/",
            f"  admin       http://127.0.0.1:{self.admin_port}/   (status page; /status is "
            "JSON)",
            f"  try         pairlb status --admin http://127.0.0.1:{self.admin_port}",
            f"              pairlb drain web {self.drained} --admin "
            f"http://127.0.0.1:{self.admin_port} --token-file {self.workdir / 'admin.token'}",
            f"  files       {self.workdir}",
            "  tear down   pairlb demo --cleanup",
        ]


# -- --cleanup ----------------------------------------------------------------------------


def cleanup(out: TextIO) -> int:
    """Remove every demo left running with --keep (or left behind by a crash)."""
    runs = demo_net.kept_runs()
    if not runs:
        print("pairlb demo --cleanup: nothing to clean up", file=out)
        return 0
    rc = 0
    for state in runs:
        pid = state.get("pid")
        if (not state.get("kept") and isinstance(pid, int)
                and (pair.is_ours(pid, "demo") or pair.is_ours(pid, "chaos.py"))):
            print(f"skipped {state.get('workdir')}: its demo is still running (pid {pid})",
                  file=out)
            continue
        if state.get("mode") == "loopback":
            for name, p in (state.get("pids") or {}).items():
                needles = (("lb run",) if name == "lb1" else ("lab.load",) if name == "load"
                           else ("lab.pair backend", "lab.cluster backend"))  # older demos
                if isinstance(p, int) and any(pair.is_ours(p, n) for n in needles):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGCONT)
                        os.kill(p, signal.SIGTERM)
                    print(f"stopped {name} (pid {p})", file=out)
            wd = Path(str(state.get("workdir", "")))
            if wd.name.startswith(demo_net.WORKDIR_PREFIX):
                shutil.rmtree(wd, ignore_errors=True)
                print(f"removed {wd}", file=out)
            continue
        if os.geteuid() != 0:
            print(f"{state.get('prefix')}: removing namespaces needs root", file=out)
            rc = 1
            continue
        for line in demo_net.cleanup_run(state):
            print(line, file=out)
    return rc


# -- entry point --------------------------------------------------------------------------


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if getattr(args, "cleanup", False):
        return cleanup(out)
    duration = float(args.duration or DEFAULT_DURATION_S)
    if duration < MIN_DURATION_S:
        print(f"pairlb demo: --duration {duration:g} is too short to play the story; "
              f"using {MIN_DURATION_S:g} s", file=out)
        duration = MIN_DURATION_S
    keep = bool(getattr(args, "keep", False))
    reason = netns.skip_reason()
    if reason is None:
        print(f"pairlb demo: a {duration:.0f} s story (--duration to change, Ctrl-C to stop "
              "early): two pairlb nodes share a VIP in front of three backends, in network "
              "namespaces", file=out, flush=True)
        try:
            return NamespaceDemo(duration, keep, out).run()
        except NoNamespaces as exc:
            reason = str(exc)
    why = "network namespaces need root (CAP_NET_ADMIN)"
    if os.geteuid() == 0:
        why = f"network namespaces are not available here ({reason})"
    print(f"pairlb demo: {why}; running the loopback version instead: one node and three "
          f"backends on 127.0.0.1, a {duration:.0f} s story (--duration to change)",
          file=out, flush=True)
    return LoopbackDemo(duration, keep, out).run()


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m lab.demo`` (what ``pairlb demo`` becomes)."""
    p = argparse.ArgumentParser(prog="pairlb demo",
                                description="the live demo on the embedded default config")
    p.add_argument("--duration", type=float, default=DEFAULT_DURATION_S)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--cleanup", action="store_true")
    try:
        return main(p.parse_args(argv))
    except KeyboardInterrupt:
        return 130  # as `pairlb` exits on Ctrl-C: quietly


if __name__ == "__main__":
    sys.exit(cli())
