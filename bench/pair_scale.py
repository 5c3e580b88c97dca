#!/usr/bin/env python3
"""A pair at scale: do the heartbeats hold while the control processes are busy?

The namespace topology of lab/pair_rig.py (client, lb1, lb2, web1..3 on one bridge,
two real `pairlb run`), plus a second pool of `--backends` backends (default 1000): one
nginx in web3's namespace answers on that many ports (`200 ok`, then close), or without
nginx (`--backend-server python`) one asyncio process. Both nodes health-check all of them
(`--check-interval`, default 1 s). For `--duration` seconds (default 60) /metrics is scraped
on both nodes every `--scrape-every` s (default 1) while the client probes the VIP every
10 ms. Measured:

- role transitions on both nodes during the window (each one is a false failover);
- heartbeats on the wire: arrival times of each node's heartbeats at the other node's NIC
  (AF_PACKET in the receiver's namespace, not pairlb's own numbers): longest gap, p99 gap;
- each node's own figures (/status): heartbeat send lag p50/p99/max and the longest gap
  between heartbeats sent and received (pairlb_heartbeat_*), late sends;
- /metrics scrape time and size, client probe failures, CPU of each node's control and
  failover process.

`--source DIR` runs `pairlb run` from another source tree (e.g. `git archive` of an older
commit, to compare with the failover controller still inside the control process).
Prints a markdown table (and `--json`). Needs root. Reports numbers; asserts nothing.

    sudo .venv/bin/python bench/pair_scale.py                      # 1000 backends, 60 s
    sudo .venv/bin/python bench/pair_scale.py --backends 400 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

import _common as c  # noqa: E402

from lab import netns  # noqa: E402
from lab import pair_rig as fe  # noqa: E402
from lab.pair import ADMIN_PORT  # noqa: E402

FIRST_PORT = 10000
SCALE_HTTP_PORT = 81

# -- the many-port backend (runs in web3's namespace) -----------------------------------------


class _Answer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"  # type: ignore[attr-defined]
                                 b"Connection: close\r\n\r\nok")
            self.transport.close()


async def _serve(host: str, first: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = [await loop.create_server(_Answer, host, first + i, backlog=256)
               for i in range(count)]
    await stop.wait()
    for s in servers:
        s.close()


def serve_main(host: str, first: int, count: int) -> int:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_serve(host, first, count))
    return 0


# -- the rig ----------------------------------------------------------------------------------


class ScaleRig(fe.Rig):
    """fe.Rig with a second listener (VIP:81) and pool of `backends` backends on web3."""

    def __init__(self, backends: int, check_interval_s: float,
                 source: Path | None = None, failover_extra: str = "",
                 backend_server: str = "auto", workdir: Path | None = None,
                 health_extra: str = "") -> None:
        if workdir is not None:
            workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir)
        self.scale_backends = backends
        self.check_interval_s = check_interval_s
        self.failover_extra = failover_extra
        self.health_extra = health_extra
        if source is not None:
            self.source = source
        if backend_server == "auto":
            backend_server = "nginx" if shutil.which("nginx") else "python"
        self.backend_server = backend_server
        try:
            if backend_server == "nginx":
                # Two nodes checking 3000 backends ask for 6000 answers a second: the one
                # Python process fell behind (L7 timeouts before all were ever UP); nginx
                # answers them with a few percent of a core.
                os.chmod(self.workdir, 0o755)
                conf = c.write_nginx_many(
                    self.workdir, self.addr["web3"],
                    [FIRST_PORT + i for i in range(backends)])
                argv = c.nginx_argv(conf, self.workdir)
            else:
                argv = [fe.PYTHON, __file__, "serve", self.addr["web3"], str(FIRST_PORT),
                        str(backends)]
            self.scale_server = self.topo.popen(
                "web3", argv, stdout=subprocess_devnull(), stderr=None)
            self.wait_for("the many-port backend", lambda: self.topo.tcp_probe(
                "client", self.addr["web3"], FIRST_PORT + backends - 1, 0.2)
                is netns.Probe.OPEN, 30.0, 0.1)
        except BaseException:
            self.close()
            raise

    def config_text(self, node: str, settings: fe.PairSettings) -> str:
        text = super().config_text(node, settings)
        host = self.addr["web3"]
        backends = ",\n".join(f'  {{ name = "s{i}", address = "{host}:{FIRST_PORT + i}" }}'
                              for i in range(self.scale_backends))
        scale = f"""
[[listener]]
name = "scale"
bind = "{self.vip}:{SCALE_HTTP_PORT}"
pool = "scale"

[[pool]]
name = "scale"
backends = [
{backends},
]

[pool.health]
interval_s = {self.check_interval_s}
timeout_s = 1.0
rise = 2
fall = 3
{self.health_extra}"""
        head, sep, tail = text.partition("\n[failover]\n")
        return head + scale + sep + self.failover_extra + tail


def subprocess_devnull() -> Any:
    import subprocess

    return subprocess.DEVNULL


# -- measuring --------------------------------------------------------------------------------


def _get(addr: tuple[str, int], path: str, timeout_s: float) -> tuple[int, int]:
    conn = http.client.HTTPConnection(addr[0], addr[1], timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, len(resp.read())
    finally:
        conn.close()


@dataclass
class Scraper:
    """GET /metrics on one node every `every_s` seconds, from its namespace, in a thread."""

    rig: fe.Rig
    node: str
    every_s: float
    times: list[float] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                status, size = self.rig.topo.call(self.node, _get, ("127.0.0.1", ADMIN_PORT),
                                                  "/metrics", 30.0)
                if status == 200:
                    self.times.append(time.monotonic() - t0)
                    self.sizes.append(size)
                else:
                    self.errors += 1
            except (OSError, http.client.HTTPException, TimeoutError):
                self.errors += 1
            due += self.every_s
            self._stop.wait(max(0.0, due - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60.0)


def failover_status(rig: fe.Rig, node: str) -> dict[str, Any]:
    """/status's failover section; /status of 1000 backends may take a while on a busy box."""
    for _ in range(5):
        st = rig.status(node, 15.0)
        if st is not None and st.get("failover"):
            fo: dict[str, Any] = st["failover"]
            return fo
        time.sleep(1.0)
    raise fe.RigError(f"{node}: no /status\n{rig.log_tail(node)}")


def cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * len(values)) - 1))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = fe.PairSettings(workers=args.workers)
    extra = "".join(f"{line}\n" for line in args.failover_setting)
    health = "".join(f"{line}\n" for line in args.health_setting)
    with ScaleRig(args.backends, args.check_interval, args.source, extra,
                  args.backend_server, args.keep_logs, health) as rig:
        t0 = time.monotonic()
        rig.steady(settings, timeout_s=120.0)
        rig.wait_for(f"all {args.backends} backends up on both nodes", lambda: all(
            (st := rig.status(n, 10.0)) is not None and next(
                (p["usable"] for p in st["pools"] if p["name"] == "scale"), 0) >= args.backends
            for n in fe.LBS), args.up_timeout, 1.0)
        up_s = time.monotonic() - t0
        time.sleep(args.settle)
        before = {n: failover_status(rig, n) for n in fe.LBS}
        pids = {n: (rig.lbs[n].proc.pid, rig.failover_pid(n)) for n in fe.LBS}
        cpu0 = {n: (cpu_s(pids[n][0]), cpu_s(pids[n][1])) for n in fe.LBS}
        wires = {n: fe.WireWatch(rig, n, other) for n, other in zip(fe.LBS, fe.LBS[::-1],
                                                                       strict=True)}
        scrapers = [Scraper(rig, n, args.scrape_every) for n in fe.LBS]
        since = time.monotonic()
        for s in scrapers:
            s.start()
        reloads: list[float] = []
        if args.reloads:
            step = args.duration / (args.reloads + 1)
            for k in range(args.reloads):
                time.sleep(max(0.0, since + step * (k + 1) - time.monotonic()))
                reloads.append(reload_both(rig, settings, k))
        time.sleep(max(0.0, since + args.duration - time.monotonic()))
        for s in scrapers:
            s.stop()
        until = time.monotonic()
        arrivals = {n: w.stop() for n, w in wires.items()}
        drops = {n: w.drops for n, w in wires.items()}
        cpu1 = {n: (cpu_s(pids[n][0]), cpu_s(pids[n][1])) for n in fe.LBS}
        after = {n: failover_status(rig, n) for n in fe.LBS}
        out = fe.measure(rig, "scrape soak", since, until, fault_at=None, new_node=None)
        window = until - since
        nodes = {}
        for n, s in zip(fe.LBS, scrapers, strict=True):
            g = gaps([t for t in arrivals[n] if since <= t <= until])
            tr0, tr1 = before[n]["counters"]["transitions"], after[n]["counters"]["transitions"]
            nodes[n] = {
                "role": after[n]["role"],
                "transitions": sum(tr1.values()) - sum(tr0.values()),
                "late_sends": (after[n]["counters"].get("late_sends", 0)
                               - before[n]["counters"].get("late_sends", 0)),
                "send_lag_ms": after[n].get("send_lag_ms"),
                "heartbeat_gap_ms": after[n].get("heartbeat_gap_ms"),
                "wire_heartbeats": len(g) + 1 if g else 0,
                "wire_capture_drops": drops[n],
                "wire_gap_max_ms": round(max(g, default=float("nan")) * 1000, 2),
                "wire_gap_p99_ms": round(pct(g, 0.99) * 1000, 2),
                "scrapes": len(s.times), "scrape_errors": s.errors,
                "scrape_p50_s": round(statistics.median(s.times), 3) if s.times else None,
                "scrape_max_s": round(max(s.times), 3) if s.times else None,
                "metrics_bytes": max(s.sizes, default=0),
                "control_cpu": round((cpu1[n][0] - cpu0[n][0]) / window, 3),
                "failover_cpu": (round((cpu1[n][1] - cpu0[n][1]) / window, 3)
                                 if pids[n][1] else None),
            }
        return {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs, Linux {platform.release()}, "
                       f"Python {platform.python_version()})",
            "source": str(args.source or REPO), "backends": args.backends,
            "failover_settings": args.failover_setting,
            "health_settings": args.health_setting,
            "check_interval_s": args.check_interval, "duration_s": round(window, 1),
            "all_up_s": round(up_s, 1), "probe_requests": out.requests,
            "probe_failed": out.failed, "probe_errors": out.errors,
            "vip_events": len(out.vip_events), "nodes": nodes,
            "reloads": reloads, "backend_server": rig.backend_server,
            "load_1m": round(os.getloadavg()[0], 2),
        }


def reload_both(rig: ScaleRig, settings: fe.PairSettings, k: int) -> float:
    """Every scale target's check changes (interval x1.1 and back: each of them re-planned,
    none loses its state), written to both nodes' files and SIGHUP to both at once; returns
    how long until both logged the reload."""
    rig.check_interval_s = round(rig.check_interval_s * (1.1 if k % 2 == 0 else 1 / 1.1), 3)
    for n in fe.LBS:
        rig.install_config(n, rig.config_text(n, settings))
    t = time.monotonic()
    for n in fe.LBS:
        rig.signal_control(n, signal.SIGHUP)
    for n in fe.LBS:
        rig.wait_for(f"{n} reloaded", lambda n=n: rig.log_time(n, "event=reloaded", after=t)
                     is not None or rig.log_time(n, "event=reload_failed", after=t)
                     is not None, 60.0, 0.2)
        if rig.log_time(n, "event=reload_failed", after=t) is not None:
            raise fe.RigError(f"{n}: reload refused\n{rig.log_tail(n)}")
    return round(time.monotonic() - t, 3)


def table(r: dict[str, Any], label: str) -> str:
    rows = []
    for n, x in r["nodes"].items():
        lag = x["send_lag_ms"] or {}
        gap = x["heartbeat_gap_ms"] or {}
        fo_cpu = "-" if x["failover_cpu"] is None else f"{x['failover_cpu']:.2f}"
        drops = f" ({x['wire_capture_drops']} lost by the capture)" if x.get(
            "wire_capture_drops") else ""
        rows.append(
            f"| {label} | {n} ({x['role']}) | {x['transitions']} | {x['wire_gap_max_ms']} / "
            f"{x['wire_gap_p99_ms']}{drops} | {lag.get('p50', '-')} / {lag.get('p99', '-')} / "
            f"{lag.get('max', '-')} | {gap.get('sent_max', '-')} / {gap.get('received_max', '-')}"
            f" | {x['late_sends']} | {x['scrapes']} ({x['scrape_errors']} failed), "
            f"{x['scrape_p50_s']} / {x['scrape_max_s']} s, {x['metrics_bytes'] / 1e6:.1f} MB | "
            f"{x['control_cpu']:.2f} / {fo_cpu} |")
    return "\n".join(rows)


HEADER = ("| code | node | role changes | heartbeats on the peer's wire: longest / p99 gap ms "
          "| send lag p50 / p99 / max ms | pairlb's own longest gap sent / received ms "
          "| late sends | /metrics scrapes, p50 / max, size | CPU control / failover (cores) |\n"
          "|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"] and len(argv) == 4:
        return serve_main(argv[1], int(argv[2]), int(argv[3]))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", type=int, default=1000)
    p.add_argument("--check-interval", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--scrape-every", type=float, default=1.0)
    p.add_argument("--reloads", type=int, default=0,
                   help="SIGHUP both nodes this many times during the window (every check "
                        "re-planned)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--backend-server", choices=("auto", "nginx", "python"), default="auto",
                   help="what answers the many backends in web3's namespace (auto: nginx "
                        "if installed)")
    p.add_argument("--settle", type=float, default=5.0)
    p.add_argument("--up-timeout", type=float, default=180.0)
    p.add_argument("--source", type=Path, help="run pairlb from this source tree")
    p.add_argument("--label", default="this tree")
    p.add_argument("--failover-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra [failover] line, e.g. 'sched_priority = 10' (repeatable)")
    p.add_argument("--health-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra [pool.health] line of the big pool, e.g. "
                        "'reuse_connection = true' (repeatable)")
    p.add_argument("--json", type=Path)
    p.add_argument("--keep-logs", type=Path, metavar="DIR",
                   help="work in DIR and keep it (configs, both nodes' logs, probes)")
    args = p.parse_args(argv)
    if reason := netns.skip_reason():
        print(f"pair_scale: {reason}", file=sys.stderr)
        return 2
    if args.backends > 20000:
        p.error("--backends: at most 20000")
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"\nMeasured {result['when']} on {result['machine']} (load {result['load_1m']}): "
          f"{result['backends']} backends ({result['backend_server']}) checked every "
          f"{result['check_interval_s']} s by each node, /metrics scraped on both "
          f"every {args.scrape_every} s for {result['duration_s']} s; client probes "
          f"{result['probe_requests']}, failed {result['probe_failed']}, VIP changes "
          f"{result['vip_events']}; reloads of both nodes (s until both applied): "
          f"{result['reloads'] or 'none'}.\n")
    print(HEADER)
    print(table(result, args.label))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
