"""The health scenarios with real processes (issue 3): health checks drain dead backends and
clients see no error.

Every scenario runs 3 real backend processes and ``pairlb run`` with 2 workers on 127.0.0.1,
drives steady concurrent keep-alive clients through it and breaks one backend the way
production does (kill -9, SIGSTOP, a failing /healthz, 503s on traffic, an operator drain, a
config reload, all of them dying). It records every client response and polls /status, then
checks the promise of the issue.

Each ``scenario_*`` coroutine returns an :class:`Outcome`: what was measured (time to leave
rotation, to be marked DOWN, to come back; requests sent; client errors) and the list of
broken promises (empty when all held). tests/test_health_e2e.py asserts that list is empty;
``bench/health.py`` reruns the same coroutines with more load and repetitions and writes the
table in docs/operations.md. Health settings are short (0.3 s interval, rise 2, fall 3) so
the tests stay well under the suite budget; the bounds below are computed from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.node_rig import (
    Backend,
    Backends,
    HttpError,
    Load,
    Pairlb,
    Sample,
    StatusWatch,
    request,
    summarize_failures,
    wait_until_async,
)

NAMES = ("b1", "b2", "b3")
WORKERS = 2
INTERVAL_S = 0.3
TIMEOUT_S = 0.25
RISE = 2
FALL = 3
JITTER = 0.1
HEALTH = {"interval_s": INTERVAL_S, "timeout_s": TIMEOUT_S, "rise": RISE, "fall": FALL,
          "jitter": JITTER}
CONSECUTIVE_FAILURES = 3
EJECT_S = 1.0
PASSIVE = {"consecutive_failures": CONSECUTIVE_FAILURES, "eject_s": EJECT_S, "max_eject_s": 5.0}
SLOW_START_S = 2.0
RESPONSE_TIMEOUT_S = 0.5
SLACK_S = 0.35
"""Poll period of /status, snapshot push to workers and a loaded 2-core box."""

# Worst cases from healthcheck.scheduler's docstring, with our settings.
DOWN_MIN_S = (FALL - 1) * INTERVAL_S * (1 - JITTER)
"""Fewer than ``fall`` probes cannot fit in less time than this."""
DOWN_MAX_REFUSED_S = FALL * INTERVAL_S * (1 + JITTER) + SLACK_S
DOWN_MAX_TIMEOUT_S = FALL * INTERVAL_S * (1 + JITTER) + FALL * TIMEOUT_S + SLACK_S
UP_MIN_S = (RISE - 1) * INTERVAL_S * (1 - JITTER)
UP_MAX_S = RISE * INTERVAL_S * (1 + JITTER) + SLACK_S
DOWN_BOUNDS = f"DOWN after fall={FALL} probes: in [{DOWN_MIN_S:.2f}, {DOWN_MAX_REFUSED_S:.2f}]s"


@dataclass(frozen=True)
class Knobs:
    """How hard a scenario pushes: the tests use the defaults, the bench more."""

    clients: int = 8
    think_s: float = 0.005
    steady_s: float = 1.0
    """Load before the fault and after recovery."""


@dataclass
class Outcome:
    scenario: str
    requests: int = 0
    client_errors: int = 0
    leave_s: float | None = None
    """Fault (or action) to out of rotation, as seen in /status."""
    down_s: float | None = None
    """Fault to marked DOWN by active checks."""
    back_s: float | None = None
    """Backend listening/healthy again to back in rotation."""
    notes: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    failures: list[Sample] = field(default_factory=list)
    log_tail: str = ""

    def expect(self, ok: bool, text: str) -> None:
        """Record a broken promise (``text``) unless ``ok``."""
        if not ok:
            self.problems.append(text)

    def explain(self) -> str:
        lines = [f"{self.scenario}: {len(self.problems)} broken promise(s)"]
        lines += [f"  - {p}" for p in self.problems]
        lines.append(f"  measured: {self.row()}")
        if self.failures:
            lines.append("  client failures: " + summarize_failures(self.failures))
        lines.append("  pairlb log tail:\n" + self.log_tail)
        return "\n".join(lines)

    def row(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 3)

        return {
            "scenario": self.scenario,
            "requests": self.requests,
            "client_errors": self.client_errors,
            "leave_s": r(self.leave_s),
            "down_s": r(self.down_s),
            "back_s": r(self.back_s),
            **self.notes,
        }


def _finish(out: Outcome, load: Load, lb: Pairlb, method: str | None = None) -> None:
    out.requests = len(load.samples)
    out.failures = load.failures(method=method)
    out.client_errors = len(load.failures())
    out.log_tail = lb.logs(4000)


def _out(b: dict[str, Any]) -> bool:
    return not b["in_rotation"]


def _in(b: dict[str, Any]) -> bool:
    return bool(b["in_rotation"])


def _down(b: dict[str, Any]) -> bool:
    return bool(b["health"] == "down")


def _up(b: dict[str, Any]) -> bool:
    return bool(b["health"] == "up")


def _full(b: dict[str, Any]) -> bool:
    return bool(b["in_rotation"]) and b["effective_weight"] == b["weight"]


def _late(load: Load, backend: str, after: float) -> list[Sample]:
    """Responses from ``backend`` to requests that started after ``after``."""
    return [s for s in load.samples if s.backend == backend and s.t0 > after]


def _p(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _backend_requests(b: Backend) -> int:
    """Requests the backend itself counted (not health checks)."""
    resp = await request(b.port, "GET", "/stats", timeout_s=3.0)
    by_method: dict[str, int] = json.loads(resp.body)["by_method"]
    return sum(by_method.values())


def _pairlb(wd: Path, bs: Backends, **pool: Any) -> Pairlb:
    return Pairlb(wd, bs.members(), workers=WORKERS, pool=pool, health=HEALTH, passive=PASSIVE)


# -- scenarios ---------------------------------------------------------------------------------


async def scenario_kill(wd: Path, k: Knobs, *, posts: bool = False) -> Outcome:
    """kill -9 b1 under load, restart it: out at once, DOWN after ``fall``, back ramped.

    ``posts``: half the requests are POSTs and every request waits 20 ms at the backend, so
    some POSTs are in flight on b1 when it dies; none may be delivered to a second backend.
    """
    out = Outcome("kill -9 (GET+POST)" if posts else "kill -9")
    mix = [("GET", "/?delay=0.02"), ("POST", "/?delay=0.02")] if posts else [("GET", "/")]
    with Backends(wd, NAMES) as bs, _pairlb(wd, bs, slow_start_s=SLOW_START_S) as lb:
        b1 = bs["b1"]
        async with StatusWatch(lb.admin_port) as watch:
            load = Load(lb.listen_port, clients=k.clients, mix=mix, think_s=k.think_s)
            async with load:
                await asyncio.sleep(k.steady_s)
                errors_before = watch.backends(await watch.poll())["b1"]["errors"]
                t_kill = time.monotonic()
                b1.kill()
                t_out = await watch.wait("b1", _out, 5.0, "out of rotation", t_kill)
                t_down = await watch.wait("b1", _down, 5.0, "marked DOWN", t_kill)
                await asyncio.sleep(0.3)
                errors_down = watch.backends(await watch.poll())["b1"]["errors"]
                await asyncio.sleep(0.5)
                errors_later = watch.backends(await watch.poll())["b1"]["errors"]
                b1.spawn()
                t_listen = await b1.wait_listening_async()
                t_up = await watch.wait("b1", _up, 5.0, "UP again", t_listen)
                t_in = await watch.wait("b1", _in, 5.0, "back in rotation", t_listen)
                t_full = await watch.wait("b1", _full, SLOW_START_S + 3, "full weight", t_in)
                await asyncio.sleep(max(k.steady_s, 0.6))
        _finish(out, load, lb, method="GET")
        out.leave_s, out.down_s, out.back_s = t_out - t_kill, t_down - t_kill, t_in - t_listen
        step = SLOW_START_S / 4
        shares = load.share("b1", t_in, t_full + 0.5, step)
        out.notes.update(
            ramp_share=[round(x, 2) for x in shares],
            ramp_s=round(t_full - t_in, 2),
            attempts_on_dead=errors_down - errors_before,
        )
        out.expect(not out.failures, "GETs must see zero errors")
        out.expect(out.leave_s < INTERVAL_S,
                   f"out of rotation (passive) within one probe interval {INTERVAL_S}s")
        out.expect(DOWN_MIN_S <= out.down_s <= DOWN_MAX_REFUSED_S,
                   DOWN_BOUNDS)
        down_lines = [ln for ln in lb.log_lines("event=health_transition", "backend=b1 ")
                      if "to=DOWN" in ln]
        out.expect(len(down_lines) == 1 and "status=L4_REFUSED" in down_lines[0],
                   f"one DOWN transition, labelled L4_REFUSED ({down_lines})")
        out.expect(errors_later == errors_down,
                   f"no attempts on b1 once DOWN ({errors_down} -> {errors_later} errors)")
        up_s = t_up - t_listen
        out.notes["up_s"] = round(up_s, 3)
        out.expect(UP_MIN_S <= up_s <= UP_MAX_S,
                   f"UP after rise={RISE} probes: in [{UP_MIN_S:.2f}, {UP_MAX_S:.2f}]s")
        out.expect(load.by_backend(t_full, float("inf"))["b1"] > 0, "b1 gets traffic again")
        out.expect(len(shares) >= 3 and shares[0] < 0.2 and shares[0] < shares[-1]
                   and shares[-1] > 0.2,
                   f"slow start: b1's share grows from < 20% to about 1/3 ({shares})")
        if posts:
            _check_posts(out, load, bs, t_kill)
    return out


def _check_posts(out: Outcome, load: Load, bs: Backends, t_kill: float) -> None:
    """No POST reached two backends; every answered POST reached exactly the one that said so."""
    seen: Counter[str] = Counter()
    where: dict[str, str] = {}
    for b in bs:
        for cid in b.journal_ids("POST"):
            seen[cid] += 1
            where[cid] = b.name
    twice = [cid for cid, n in seen.items() if n > 1]
    posts = load.window(method="POST")
    failed = [s for s in posts if not s.ok]
    wrong = [s.client_id for s in posts if s.ok and (seen[s.client_id] != 1
                                                   or where.get(s.client_id) != s.backend)]
    delivered_failed = [s for s in failed if seen[s.client_id]]
    out.notes.update(
        posts=len(posts),
        posts_failed=len(failed),
        posts_failed_delivered=len(delivered_failed),
        posts_twice=len(twice),
    )
    out.expect(not twice, f"no POST delivered to two backends (got {twice[:5]})")
    out.expect(not wrong, f"each answered POST reached exactly its backend once ({wrong[:5]})")
    out.expect(all(where.get(s.client_id, "b1") == "b1" for s in failed),
               "a failed POST may only have reached the killed backend")
    out.expect(len(failed) <= load.clients,
               f"failed POSTs bounded by those in flight at the kill ({len(failed)})")
    out.expect(all(s.t0 < t_kill + 0.5 for s in failed),
               "POSTs fail only around the kill")


async def scenario_hang(wd: Path, k: Knobs, *, retry_on_timeout: bool = True) -> Outcome:
    """SIGSTOP b2 under load (response_timeout_s 0.5): ejected; SIGCONT brings it back."""
    out = Outcome("SIGSTOP (hang)" + ("" if retry_on_timeout else ", no retry_on_timeout"))
    with (
        Backends(wd, NAMES) as bs,
        _pairlb(wd, bs, response_timeout_s=RESPONSE_TIMEOUT_S,
                retry_on_timeout=retry_on_timeout) as lb,
    ):
        b2 = bs["b2"]
        async with StatusWatch(lb.admin_port) as watch:
            load = Load(lb.listen_port, clients=k.clients, think_s=k.think_s)
            async with load:
                await asyncio.sleep(k.steady_s)
                t_stop = time.monotonic()
                b2.stop()
                try:
                    t_out = await watch.wait("b2", _out, 5.0, "out of rotation", t_stop)
                    t_down = await watch.wait("b2", _down, 5.0, "marked DOWN", t_stop)
                    await asyncio.sleep(0.3)
                finally:
                    t_cont = time.monotonic()
                    b2.cont()
                t_up = await watch.wait("b2", _up, 5.0, "UP again", t_cont)
                t_in = await watch.wait("b2", _in, 10.0, "back in rotation", t_cont)
                await asyncio.sleep(k.steady_s)
        _finish(out, load, lb)
        out.leave_s, out.down_s, out.back_s = t_out - t_stop, t_down - t_stop, t_in - t_cont
        hit = [s.latency_s for s in load.window(t_stop, t_down)]
        out.notes.update(
            max_latency_s=round(max(hit, default=0.0), 3),
            p50_latency_during_s=round(_p(hit, 0.5), 3),
            up_s=round(t_up - t_cont, 3),
        )
        if retry_on_timeout:
            out.expect(not out.failures, "GETs see zero errors with retry_on_timeout")
        else:
            out.expect(all(s.status == 504 for s in out.failures), "errors are 504s")
            out.expect(len(out.failures) <= 2 * load.clients,
                       f"errors bounded by the requests in flight ({len(out.failures)})")
        out.expect(out.leave_s <= RESPONSE_TIMEOUT_S + SLACK_S,
                   f"ejected within response_timeout_s {RESPONSE_TIMEOUT_S}s (+{SLACK_S}s)")
        out.expect(DOWN_MIN_S <= out.down_s <= DOWN_MAX_TIMEOUT_S,
                   f"DOWN after fall={FALL} timed-out probes: <= {DOWN_MAX_TIMEOUT_S:.2f}s")
        out.expect(load.by_backend(t_in, float("inf"))["b2"] > 0, "b2 gets traffic after SIGCONT")
    return out


async def scenario_health_500(wd: Path, k: Knobs) -> Outcome:
    """b3's /healthz answers 500: DOWN after ``fall`` probes, then no request reaches it."""
    out = Outcome("/healthz 500")
    with Backends(wd, NAMES) as bs, _pairlb(wd, bs) as lb:
        b3 = bs["b3"]
        async with StatusWatch(lb.admin_port) as watch:
            load = Load(lb.listen_port, clients=k.clients, think_s=k.think_s)
            async with load:
                await asyncio.sleep(k.steady_s)
                t_set = time.monotonic()
                await b3.set_health_async(500)
                t_down = await watch.wait("b3", _down, 5.0, "marked DOWN", t_set)
                t_out = await watch.wait("b3", _out, 5.0, "out of rotation", t_set)
                t_routed = await watch.wait_rotation_applied()
                await asyncio.sleep(0.2)
                served_then = await _backend_requests(b3)
                await asyncio.sleep(max(k.steady_s, 0.8))
                served_later = await _backend_requests(b3)
                t_fix = time.monotonic()
                await b3.set_health_async(200)
                t_in = await watch.wait("b3", _in, 5.0, "back in rotation", t_fix)
                await asyncio.sleep(0.5)
        _finish(out, load, lb)
        out.leave_s, out.down_s, out.back_s = t_out - t_set, t_down - t_set, t_in - t_fix
        late = _late(load, "b3", t_routed)
        late = [s for s in late if s.t0 < t_fix]
        out.notes["served_after_down"] = served_later - served_then
        out.expect(not out.failures, "clients see zero errors")
        out.expect(DOWN_MIN_S <= out.down_s <= DOWN_MAX_REFUSED_S,
                   DOWN_BOUNDS)
        out.expect(not late, f"no request reaches b3 once DOWN ({len(late)} did)")
        out.expect(served_later == served_then,
                   f"b3 itself saw no requests while DOWN ({served_then} -> {served_later})")
        out.expect(load.by_backend(t_in, float("inf"))["b3"] > 0, "b3 gets traffic when healthy")
    return out


async def scenario_traffic_503(wd: Path, k: Knobs) -> Outcome:
    """b3 passes its checks but answers 503 to traffic: ejected passively, errors bounded."""
    out = Outcome("503 on traffic, /healthz 200")
    with Backends(wd, NAMES) as bs, _pairlb(wd, bs) as lb:
        b3 = bs["b3"]
        async with StatusWatch(lb.admin_port) as watch:
            load = Load(lb.listen_port, clients=k.clients, think_s=k.think_s)
            async with load:
                await asyncio.sleep(k.steady_s)
                t_flip = time.monotonic()
                await b3.set_traffic_status_async(503)
                t_out = await watch.wait("b3", _out, 5.0, "ejected", t_flip)
                t_routed = await watch.wait_rotation_applied()
                # Stay inside the first ejection (EJECT_S) to see that nothing reaches it.
                await asyncio.sleep(EJECT_S * 0.7)
                health_values = watch.values("b3", "health", t_flip)
        _finish(out, load, lb)
        out.leave_s = t_out - t_flip
        errors = out.failures
        late = _late(load, "b3", t_routed)
        bound = WORKERS * CONSECUTIVE_FAILURES + load.clients
        out.notes.update(ejections=watch.backends(watch.latest())["b3"]["ejections"])
        out.expect(all(s.t1 > t_flip for s in errors), "no errors before the fault")
        out.expect(all(s.status == 503 and s.backend == "b3" for s in errors),
                   "the only errors are b3's own 503s")
        out.expect(len(errors) <= bound,
                   f"503s seen by clients <= workers x consecutive_failures + clients = {bound}")
        out.expect(out.leave_s < INTERVAL_S, f"ejected within one probe interval {INTERVAL_S}s")
        out.expect(not late, f"no request reaches b3 while ejected ({len(late)} did)")
        out.expect(health_values == ["up"], f"active checks still say UP ({health_values})")
    return out


async def scenario_drain(wd: Path, k: Knobs) -> Outcome:
    """Operator drains b2 under load: in-flight requests (/sleep/2) finish, no new ones."""
    out = Outcome("drain (admin API)")
    with Backends(wd, NAMES) as bs, _pairlb(wd, bs) as lb:
        b2 = bs["b2"]
        async with StatusWatch(lb.admin_port) as watch:
            load = Load(lb.listen_port, clients=k.clients, think_s=k.think_s)
            async with load:
                await asyncio.sleep(k.steady_s / 2)
                slow = Load(lb.listen_port, clients=6, mix=[("GET", "/sleep/2")], think_s=0,
                            max_requests=6, prefix="slow")
                t_slow = time.monotonic()
                slow.start()
                await watch.wait("b2", lambda b: b["in_flight"] > 0, 1.5, "in flight on b2", t_slow)
                t_drain = time.monotonic()
                code, body = await lb.action_async("b2", "drain")
                t_out = await watch.wait("b2", _out, 2.0, "out of rotation", t_drain)
                t_routed = await watch.wait_rotation_applied()
                t_zero = await watch.wait("b2", lambda b: b["in_flight"] == 0, 5.0,
                                          "no request in flight", t_drain)
                code_m, body_m = await lb.action_async("b2", "maintenance")
                served_then = await _backend_requests(b2)
                await slow.stop()
                await asyncio.sleep(max(k.steady_s / 2, 0.5))
                served_later = await _backend_requests(b2)
                t_enable = time.monotonic()
                code_e, _ = await lb.action_async("b2", "enable")
                t_in = await watch.wait("b2", _in, 2.0, "back in rotation", t_enable)
                await asyncio.sleep(0.5)
        _finish(out, load, lb)
        out.requests += len(slow.samples)
        out.failures += slow.failures()
        out.client_errors += len(slow.failures())
        out.leave_s, out.back_s = t_out - t_drain, t_in - t_enable
        on_b2 = [s for s in slow.samples if s.backend == "b2"]
        late = [s for s in _late(load, "b2", t_routed) if s.t0 < t_enable]
        out.notes.update(
            in_flight_at_drain=body.get("in_flight"),
            drained_s=round(t_zero - t_drain, 3),
            slow_on_b2=len(on_b2),
        )
        out.expect((code, body.get("admin_state")) == (200, "draining"), f"drain: {code} {body}")
        out.expect((code_m, body_m.get("admin_state")) == (200, "maintenance"),
                   f"maintenance: {code_m} {body_m}")
        out.expect(code_e == 200, f"enable: {code_e}")
        out.expect(not out.failures, "clients (fast and in-flight) see zero errors")
        out.expect(len(slow.samples) == 6 and all(s.status == 200 for s in slow.samples),
                   "all 6 slow requests answered 200")
        out.expect(bool(on_b2) and all(s.t1 > t_drain for s in on_b2),
                   f"requests in flight on b2 finished after the drain ({len(on_b2)})")
        out.expect(out.leave_s < 0.2, "out of rotation at once")
        out.expect(not late, f"no new request reaches b2 after the drain ({len(late)} did)")
        out.expect(served_later == served_then, "b2 saw no request in maintenance")
        out.expect(load.by_backend(t_in, float("inf"))["b2"] > 0, "b2 gets traffic when enabled")
    return out


async def scenario_all_down(wd: Path, k: Knobs) -> Outcome:
    """Every backend killed: fast 503 with a clear body, no hanging; one returns: 200 again."""
    out = Outcome("all backends down")
    with Backends(wd, NAMES) as bs, _pairlb(wd, bs) as lb:
        async with StatusWatch(lb.admin_port) as watch:
            load = Load(lb.listen_port, clients=max(2, k.clients // 2), think_s=0.01)
            async with load:
                await asyncio.sleep(k.steady_s / 2)
                t_kill = time.monotonic()
                for b in bs:
                    b.kill()

                def all_down() -> bool:
                    st = watch.latest()
                    pool = st["pools"][0]
                    return pool["usable"] == 0 and all(
                        b["health"] == "down" for b in pool["backends"]
                    )

                await wait_until_async(all_down, 5.0, "every backend DOWN")
                t_all_down = time.monotonic()
                t_routed = await watch.wait_rotation_applied()
                probes = []
                for _ in range(20):
                    # One at a time on a fresh connection: the latency of pairlb's answer,
                    # not of our own busy client loop.
                    t0 = time.monotonic()
                    resp = await request(lb.listen_port, "GET", "/", timeout_s=5.0)
                    probes.append((time.monotonic() - t0, resp.status, resp.body))
                    await asyncio.sleep(0.02)
                await asyncio.sleep(max(k.steady_s - 0.5, 0.3))
                bs["b2"].spawn()
                t_listen = await bs["b2"].wait_listening_async()
                t_in = await watch.wait("b2", _in, 5.0, "back in rotation", t_listen)
                t_back = await watch.wait_rotation_applied()
                await asyncio.sleep(max(k.steady_s, 0.8))
        _finish(out, load, lb)
        out.down_s, out.back_s = t_all_down - t_kill, t_in - t_listen
        # Like every other window here, from when every worker said it routes by the
        # rotation /status showed (a request between the two can still go by the old one:
        # 502 after trying every backend; a worker's loop on a loaded 2-core box once took
        # over 100 ms to read the push).
        dark = load.window(t_routed, t_listen)
        dark_lat = [s.latency_s for s in dark]
        transition = Counter(s.status for s in load.failures(t_kill, t_all_down))
        after = load.window(t_back)
        first_ok = min((s.t1 for s in load.samples if s.ok and s.t0 > t_listen), default=None)
        probe_lat = [lat for lat, _, _ in probes]
        out.notes.update(
            answers_while_all_down=dict(Counter(s.status for s in dark)),
            max_503_latency_ms=round(max(probe_lat) * 1000, 1),
            p50_503_latency_ms=round(_p(probe_lat, 0.5) * 1000, 1),
            load_max_503_latency_ms=round(max(dark_lat, default=0.0) * 1000, 1),
            errors_before_all_down=dict(transition),
            first_200_after_listen_s=None if first_ok is None else round(first_ok - t_listen, 3),
        )
        bodies = {s.body for s in dark} | {body for _, _, body in probes}
        statuses = Counter(s.status for s in dark) + Counter(st for _, st, _ in probes)
        out.expect(set(statuses) == {503},
                   f"every request while all are down gets 503 ({statuses})")
        out.expect(bodies == {b"Service unavailable: no backend is available.\n"},
                   f"the 503 says why ({bodies})")
        out.expect(max(probe_lat) < 0.1,
                   f"503s come at once: < 100 ms (max {max(probe_lat) * 1000:.1f} ms)")
        worst = max(dark_lat, default=0.0)
        out.expect(worst < 1.0, f"no request hangs while all are down (max {worst:.3f} s)")
        out.expect(bool(after) and all(s.ok for s in after),
                   f"all requests succeed once one backend is back "
                   f"({Counter(s.status for s in after)})")
        out.client_errors = len(load.failures())
        out.failures = [s for s in load.failures() if not t_all_down <= s.t0 < t_listen]
    return out


async def scenario_reload(wd: Path, k: Knobs) -> Outcome:
    """SIGHUP adding b4: DOWN b2 stays DOWN, UP b1/b3 stay UP (no flap), b4 joins after checks.

    b4's /healthz fails at first, so we can see it is out of rotation (and unused) until a
    check passes, however fast the first check comes after the reload.
    """
    out = Outcome("reload (SIGHUP, backend added)")
    with Backends(wd, NAMES) as bs, _pairlb(wd, bs) as lb:
        b4 = bs.add(Backend("b4", wd))
        b4.start()
        b4.set_health(500)
        bs["b2"].set_health(500)
        async with StatusWatch(lb.admin_port) as watch:
            await watch.wait("b2", _down, 5.0, "b2 DOWN before the reload")
            transitions_before = len(lb.log_lines("event=health_transition"))
            load = Load(lb.listen_port, clients=k.clients, think_s=k.think_s)
            async with load:
                await asyncio.sleep(k.steady_s / 2)
                lb.write_config(bs.members())
                t_hup = time.monotonic()
                lb.reload()

                def reloaded() -> bool:
                    return bool(watch.latest()["config"]["generation"] >= 2)

                await wait_until_async(reloaded, 5.0, "config generation 2")
                t_gen = time.monotonic()
                checked = await watch.wait(
                    "b4", lambda b: b["last_check"] is not None, 5.0, "b4 checked", t_hup
                )
                await asyncio.sleep(max(k.steady_s / 2, 0.5))
                b4_before = watch.values("b4", "in_rotation", t_hup)
                b4_served = await _backend_requests(b4)
                t_fix = time.monotonic()
                await b4.set_health_async(200)
                t_b4_in = await watch.wait("b4", _in, 5.0, "b4 in rotation", t_fix)
                await asyncio.sleep(max(k.steady_s, 0.8))
        _finish(out, load, lb)
        out.back_s = t_b4_in - t_fix
        new_transitions = lb.log_lines("event=health_transition")[transitions_before:]
        unchanged = [ln for ln in new_transitions if "backend=b4 " not in ln]
        b4_lines = [ln for ln in new_transitions if "backend=b4 " in ln]
        out.notes.update(
            reload_applied_s=round(t_gen - t_hup, 3),
            first_check_of_new_s=round(checked - t_hup, 3),
            transitions_after_reload=len(new_transitions),
        )
        out.expect(not out.failures, "clients see zero errors across the reload")
        for name, health, rotation in (("b1", "up", True), ("b3", "up", True),
                                       ("b2", "down", False)):
            seen_h = watch.values(name, "health", t_hup)
            seen_r = watch.values(name, "in_rotation", t_hup)
            out.expect(seen_h == [health] and seen_r == [rotation],
                       f"{name} stays {health} through the reload (health {seen_h}, "
                       f"in_rotation {seen_r})")
        out.expect(not unchanged, f"no health transition of unchanged backends: {unchanged}")
        out.expect(b4_before == [False] and b4_served == 0,
                   f"b4 is out of rotation and unused before a check passes "
                   f"(in_rotation {b4_before}, served {b4_served})")
        out.expect(len(b4_lines) == 1 and "from=DOWN to=UP" in b4_lines[0],
                   f"b4 goes from DOWN to UP once ({b4_lines})")
        out.expect(load.by_backend(t_b4_in)["b4"] > 0, "b4 gets traffic once healthy")
        reload_events = [e for e in watch.latest()["events"] if e["kind"] == "reload"]
        out.expect(bool(reload_events), "the reload is in /status events")
    return out


async def scenario_reload_check_change(wd: Path, k: Knobs) -> Outcome:
    """Reloads that change ``[pool.health]``: the verdict is what the NEW checks say.

    1. a passing change (interval, under load): no transition, no client error;
    2. then kill -9 b1: DOWN within ``fall`` probes (the old code kept it UP for ever);
    3. ``expect_body`` that no backend sends: every live backend DOWN at its first new
       result, out of rotation, and no request reaches it;
    4. back to a passing ``expect_body``: the live backends come back, dead b1 stays DOWN.
    """
    out = Outcome("reload changing [pool.health]")
    health = {**HEALTH, "expect_body": "ok"}
    with Backends(wd, NAMES) as bs, Pairlb(
        wd, bs.members(), workers=WORKERS, health=health, passive=PASSIVE
    ) as lb:

        async def reload_with(**changes: Any) -> float:
            gen = watch.latest()["config"]["generation"]
            lb.settings["health"] = {**lb.settings["health"], **changes}
            lb.write_config(bs.members())
            lb.reload()
            await wait_until_async(
                lambda: watch.latest()["config"]["generation"] > gen, 5.0, "reloaded"
            )
            return time.monotonic()

        async with StatusWatch(lb.admin_port) as watch:
            load = Load(lb.listen_port, clients=k.clients, think_s=k.think_s)
            async with load:
                await asyncio.sleep(k.steady_s)
                transitions_before = len(lb.log_lines("event=health_transition"))
                checks_before = {n: b["last_check"] for n, b in watch.backends(
                    await watch.poll()).items()}
                t_r1 = await reload_with(interval_s=INTERVAL_S * 0.9)
                await asyncio.sleep(FALL * INTERVAL_S * 2)
                flaps = lb.log_lines("event=health_transition")[transitions_before:]
                out.expect(not flaps, f"a passing check change moves nobody: {flaps}")
                for name in NAMES:
                    seen = watch.values(name, "in_rotation", t_r1)
                    out.expect(seen == [True], f"{name} stays in rotation ({seen})")
                out.expect(all(checks_before.values()), "every backend was checked before")
                t_kill = time.monotonic()
                bs["b1"].kill()
                t_down = await watch.wait("b1", _down, 5.0, "b1 DOWN after the reload", t_kill)
                out.down_s = t_down - t_kill
                out.expect(out.down_s <= DOWN_MAX_REFUSED_S,
                           f"killed after a reload: DOWN within {DOWN_MAX_REFUSED_S:.2f}s "
                           f"(took {out.down_s:.2f}s)")
                await asyncio.sleep(k.steady_s / 2)
            _finish(out, load, lb, method="GET")
            out.expect(not out.failures, "clients see zero errors through reload and kill")
            # 3. a check nobody passes.
            t_r2 = await reload_with(expect_body="NOPE")
            deadline = FALL * INTERVAL_S * (1 + JITTER) + SLACK_S
            for name in ("b2", "b3"):
                t = await watch.wait(name, _down, 5.0, f"{name} DOWN on the new check", t_r2)
                out.expect(t - t_r2 <= deadline,
                           f"{name} DOWN within fall x interval of the reload "
                           f"({t - t_r2:.2f}s > {deadline:.2f}s)")
                b = watch.backends(watch.latest())[name]
                out.expect(not b["in_rotation"] and "health" in b["out_of_rotation"],
                           f"{name} out of rotation with the reason beside it ({b})")
                out.expect(b["last_check"]["status"] == "L7_BODY_MISMATCH",
                           f"{name}: last check L7_BODY_MISMATCH ({b['last_check']})")
            await asyncio.sleep(0.2)
            served = {n: await _backend_requests(bs[n]) for n in ("b2", "b3")}
            for _ in range(20):
                with contextlib.suppress(OSError, TimeoutError, HttpError):
                    await request(lb.listen_port, "GET", "/", timeout_s=2.0)
            later = {n: await _backend_requests(bs[n]) for n in ("b2", "b3")}
            out.expect(served == later, f"no request reaches a DOWN backend ({served} -> {later})")
            # 4. a check they pass again.
            t_r3 = await reload_with(expect_body="ok")
            for name in ("b2", "b3"):
                t = await watch.wait(name, _in, 5.0, f"{name} back on the fixed check", t_r3)
                out.expect(t - t_r3 <= RISE * INTERVAL_S * (1 + JITTER) + SLACK_S,
                           f"{name} back within rise x interval ({t - t_r3:.2f}s)")
            await asyncio.sleep(INTERVAL_S * 2)
            b1 = watch.backends(await watch.poll())["b1"]
            out.expect(b1["health"] == "down" and not b1["in_rotation"],
                       f"dead b1 stays DOWN after the fix ({b1['health']})")
        out.log_tail = lb.logs(4000)
    return out


async def scenario_restart_ends_ejection(wd: Path, k: Knobs) -> Outcome:
    """kill -9 b1 (ejected for 10 s), restart it 1 s later: back once its checks pass."""
    out = Outcome("restart ends ejection")
    eject_s = 10.0
    passive = {**PASSIVE, "eject_s": eject_s, "max_eject_s": 30.0}
    with Backends(wd, NAMES) as bs, Pairlb(
        wd, bs.members(), workers=WORKERS, health=HEALTH, passive=passive
    ) as lb:
        b1 = bs["b1"]
        async with StatusWatch(lb.admin_port) as watch:
            load = Load(lb.listen_port, clients=k.clients, think_s=k.think_s)
            async with load:
                await asyncio.sleep(k.steady_s)
                t_kill = time.monotonic()
                b1.kill()
                t_ej = await watch.wait("b1", lambda b: b["ejected"], 5.0, "ejected", t_kill)
                out.leave_s = t_ej - t_kill
                await asyncio.sleep(1.0)
                b1.spawn()
                t_listen = await b1.wait_listening_async()
                t_in = await watch.wait("b1", _in, eject_s, "back in rotation", t_listen)
                out.back_s = t_in - t_listen
                await asyncio.sleep(max(k.steady_s, 0.6))
        _finish(out, load, lb, method="GET")
        bound = UP_MAX_S
        out.expect(not out.failures, "GETs see zero errors")
        out.expect(out.back_s <= bound,
                   f"back within rise x interval of listening ({out.back_s:.2f}s > {bound:.2f}s)"
                   f", not after the {eject_s:.0f}s ejection")
        b = watch.backends(watch.latest())["b1"]
        out.expect(b["ejections_ended_by_checks"] >= 1 and not b["ejected"],
                   f"the ejection was ended by the checks ({b})")
        lines = lb.log_lines("event=ejection_ended", "backend=b1 ")
        out.expect(bool(lines), "the early end is logged with its reason")
        out.expect(load.by_backend(t_in, float("inf"))["b1"] > 0,
                   "b1 gets traffic again")
    return out


SCENARIOS: dict[str, Callable[..., Any]] = {
    "kill": scenario_kill,
    "kill_post": lambda wd, k: scenario_kill(wd, k, posts=True),
    "hang": scenario_hang,
    "hang_no_retry": lambda wd, k: scenario_hang(wd, k, retry_on_timeout=False),
    "health_500": scenario_health_500,
    "traffic_503": scenario_traffic_503,
    "drain": scenario_drain,
    "all_down": scenario_all_down,
    "reload": scenario_reload,
    "reload_check_change": scenario_reload_check_change,
    "restart_ends_ejection": scenario_restart_ends_ejection,
}
"""Name -> coroutine(workdir, Knobs) -> Outcome; bench/health.py runs these."""
