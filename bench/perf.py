#!/usr/bin/env python3
"""Proxy throughput benchmark: pairlb against HAProxy, nginx and no proxy, in one run.

Starts one nginx (own config in a temp dir, never the system one) serving 3 backend ports,
then HAProxy, nginx-as-proxy and ``pairlb run`` in front of them, and drives each with wrk.
Targets are measured interleaved: every round runs each (target, body size) once in a
shuffled order, so machine noise lands on all of them alike; the report is the median over
rounds. For each: req/s, proxy CPU microseconds per request (utime+stime of the proxy's whole
process tree / requests), p50/p99 latency, RSS per proxy process, wrk errors, and how busy each
CPU was (to tell a proxy limit from a load-generator limit).

With --workers 1 (default) the proxy under test is pinned to CPU 0 and wrk and the backends to
CPU 1. With more workers nothing is pinned (there are not enough cores to separate them).

Logging variants (what an access log costs): ``pairlb+json`` and ``pairlb+combined`` are
pairlb with ``[logging] access_log`` to a file in the work directory (on disk), in that format;
``haproxy+httplog`` is HAProxy with ``option httplog`` to stdout (a file). ``--access-log
json,combined`` adds the pairlb ones (and pairlb itself) to --targets. Each runs beside its
base in the same shuffled rounds; the notes give its CPU per request over the base's, paired
per round, and the log bytes written per request (lines really written, not dropped).
With ``--same-process`` the pairlb variants are one pairlb process switched between them by
a reload (``[logging]`` rewritten, SIGHUP, the switch seen in the log files) before each
run: a log-on run and its log-off pair then share a memory layout, and their ratio no
longer carries the up to ~10 %% one process differs from another (add ``--fresh`` to
average the ratio over several processes).

    .venv/bin/python bench/perf.py --targets pairlb --access-log json,combined \
        --sizes 100 --rounds 6 --duration 5 --markdown

``--mode tcp``: the proxies forward bytes, not requests: pairlb with a ``mode = "tcp"``
listener (``pairlb+nosplice``: the same without splice(2)), HAProxy ``mode tcp``
(``haproxy+splice``: the same with ``option splice-auto``), in front of the same nginx
backends; wrk's keep-alive HTTP goes through each as over a
pipe (one backend connection per wrk connection). nginx has no stream module here: not a
target in this mode.

    .venv/bin/python bench/perf.py --mode tcp --rounds 4 --duration 5 --markdown

``--rate R``: a fixed total rate instead of saturation, from h2load (``--h1``, --connections
keep-alive clients, R/connections requests per second each): CPU per request at a load every
target keeps up with, without the batching a saturated event loop gets (latency columns are
then h2load's mean and max; a target that fell short of R is flagged).

    .venv/bin/python bench/perf.py --rate 3000 --connections 30 --sizes 100 --rounds 4

Only processes this script started are stopped, by PID, also on Ctrl-C, SIGTERM or error.
Imports nothing from lb: it measures the installed ``pairlb`` command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import random
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

ALL_TARGETS = ("direct", "haproxy", "nginx", "pairlb")
TCP_TARGETS = ("direct", "haproxy", "pairlb")
"""--mode tcp's default targets (nginx-light has no stream module)."""
TCP_ONLY = {"haproxy+splice": "haproxy", "pairlb+nosplice": "pairlb"}
"""--mode tcp only: HAProxy with ``option splice-auto`` (zero-copy both ways); pairlb with
``PAIRLB_TCP_SPLICE=0`` (every pipe on the loop's transports, no splice(2))."""
ACCESS_LOG_FORMATS = ("json", "combined")
VARIANTS = {f"pairlb+{f}": "pairlb" for f in ACCESS_LOG_FORMATS} | {"haproxy+httplog": "haproxy"}
"""Logging variants -> the target they are compared with (same proxy, log off)."""
SOCKET_VARIANTS = {"pairlb+shared": "pairlb"}
"""pairlb with ``reuseport = false``: one listening socket every worker shares (the default
is one per worker); with ``--workers 2`` the CPU split between the workers shows the
difference."""
REPO = Path(__file__).resolve().parent.parent
DEFAULT_PAIRLB_CMD = "{venv}/bin/pairlb run -c {config}"
ROOT_ROLE = {"haproxy": "haproxy", "nginx": "master", "pairlb": "control"}
CHILD_ROLE = {"haproxy": "thread", "nginx": "worker", "pairlb": "worker"}
LOG_DIR: Path | None = None
ACCESS_LOG_BUFFER = 0
"""--access-log-buffer: pairlb's access_log_buffer_bytes (0: its default)."""
"""--log-dir: where the access logs go (default: the work directory, on /tmp's disk)."""


@dataclass
class Target:
    name: str
    port: int
    proc: c.Managed | None
    """None for 'direct' (wrk talks to a backend port)."""
    conf: Path | None = None
    """--same-process: the shared pairlb config file, rewritten to switch the log."""
    admin_port: int = 0


@dataclass
class Sample:
    target: str
    size: int
    round: int
    ok: bool
    error: str = ""
    requests: int = 0
    rps: float = 0.0
    proxy_cpu_s: float | None = None
    cpu_us_per_req: float | None = None
    p50_us: float = 0.0
    p99_us: float = 0.0
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    wrk_cpu_s: float = 0.0
    backend_cpu_s: float = 0.0
    wall_s: float = 0.0
    other_cores: float = 0.0
    """Cores kept busy by processes this script did not start (other people's work)."""
    steal_cores: float = 0.0
    """Part of other_cores the hypervisor took (host contention, invisible to ps)."""
    attempts: int = 1
    cpu_busy: dict[str, float] = field(default_factory=dict)
    mem: list[dict[str, Any]] = field(default_factory=list)
    cpu_us_by_role: dict[str, float] = field(default_factory=dict)
    """Proxy CPU microseconds per request split by process (control, worker1...)."""
    log_bytes: int = 0
    """Logging variants: bytes their log file grew by during the measured run."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run (integer)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--targets", default=None,
        help="subset of " + ",".join(ALL_TARGETS) + " (default: all; --mode tcp: "
        + ",".join(TCP_TARGETS) + ", and haproxy+splice may be added)",
    )
    ap.add_argument(
        "--mode", default="http", choices=("http", "tcp"),
        help="tcp: pairlb with a mode = \"tcp\" listener, HAProxy mode tcp (wrk's HTTP "
        "piped through them)",
    )
    ap.add_argument("--sizes", default="100,65536", help="response body sizes in bytes")
    ap.add_argument(
        "--rate", type=int, default=0,
        help="a fixed total request rate (h2load --h1 --rps over --connections keep-alive "
        "clients) instead of saturation with wrk: CPU per request without a saturated "
        "loop's batching; latency columns are then h2load's mean and max",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=1,
        help="pairlb workers = HAProxy nbthread = nginx worker_processes; >1 disables pinning",
    )
    ap.add_argument("--connections", type=int, default=50, help="wrk -c")
    ap.add_argument("--close", action="store_true",
                    help="a new connection per request (wrk sends Connection: close; the "
                    "backends close after answering)")
    ap.add_argument("--wrk-threads", type=int, default=1, help="wrk -t")
    ap.add_argument(
        "--warmup", type=int, default=1, help="seconds of unmeasured wrk before each run"
    )
    ap.add_argument(
        "--access-log",
        default="off",
        help="off, or formats (json,combined): adds pairlb and pairlb+FORMAT to --targets",
    )
    ap.add_argument("--json", type=Path, help="write every sample and the summary here")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument(
        "--pairlb-cmd",
        default=DEFAULT_PAIRLB_CMD,
        help="command template; placeholders {venv}, {config}, {python}",
    )
    ap.add_argument("--venv", type=Path, default=None, help="default: REPO/.venv or sys.prefix")
    ap.add_argument("--no-pin", action="store_true", help="never use taskset")
    ap.add_argument("--proxy-cpus", default="0", help="CPU list for the proxy under test")
    ap.add_argument("--load-cpus", default="1", help="CPU list for wrk and the backends")
    ap.add_argument("--backend-workers", type=int, default=1, help="nginx workers of the backends")
    ap.add_argument(
        "--start-timeout", type=float, default=30.0, help="seconds for a server to answer"
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="before each run, wait up to this many seconds for other processes' load to drop",
    )
    ap.add_argument(
        "--max-other",
        type=float,
        default=0.2,
        help="cores of other processes' load above which a run is repeated",
    )
    ap.add_argument("--noisy-retries", type=int, default=2, help="repeats of a disturbed run")
    ap.add_argument("--seed", type=int, default=None, help="shuffle seed (default: random)")
    ap.add_argument("--keep-workdir", action="store_true", help="leave configs and logs behind")
    ap.add_argument("--log-dir", type=Path, default=None,
                    help="a directory for the access logs (e.g. /dev/shm: no disk); "
                         "default: the work directory")
    ap.add_argument("--access-log-buffer", type=int, default=0,
                    help="pairlb's [logging] access_log_buffer_bytes (0: the default; a "
                         "hand-over to the writer is an eighth of it, at most 256 KiB)")
    ap.add_argument("--same-process", action="store_true",
                    help="the pairlb logging variants are one pairlb process, switched by a "
                         "reload before each run (their ratio is then free of the "
                         "process-to-process spread)")
    ap.add_argument("--fresh", action="store_true",
                    help="restart every proxy before each round: one process's memory layout "
                         "(ASLR, hash seed) moves a Python worker's speed by up to ~10%%, so a "
                         "comparison of two pairlb configs needs several processes of each")
    args = ap.parse_args(argv)
    if args.targets is None:
        args.targets = ",".join(TCP_TARGETS if args.mode == "tcp" else ALL_TARGETS)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    known: tuple[str, ...] = (*ALL_TARGETS, *VARIANTS, *SOCKET_VARIANTS)
    if args.mode == "tcp":
        known = (*[t for t in known if t != "nginx"], *TCP_ONLY)
    bad = [t for t in args.targets if t not in known]
    if bad or not args.targets:
        ap.error(f"--targets: unknown {bad}"
                 + (" (nginx has no TCP proxy here)" if "nginx" in bad else "")
                 + f"; choose from {','.join(known)}")
    formats = [f.strip() for f in args.access_log.split(",") if f.strip()]
    if formats != ["off"]:
        wrong = [f for f in formats if f not in ACCESS_LOG_FORMATS]
        if wrong or not formats:
            ap.error(f"--access-log: off or a list of {','.join(ACCESS_LOG_FORMATS)}")
        for t in ["pairlb", *(f"pairlb+{f}" for f in formats)]:
            if t not in args.targets:
                args.targets.append(t)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error("--sizes: comma-separated integers")
    if not args.sizes or any(s < 1 for s in args.sizes):
        ap.error("--sizes: each size must be >= 1")
    for name in ("duration", "rounds", "workers", "connections", "wrk_threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')}: must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup: must be >= 0")
    if args.rate < 0:
        ap.error("--rate: must be >= 0")
    if args.rate and args.close:
        ap.error("--rate with --close: not supported (h2load keeps its connections)")
    if args.rate and args.rate < 10 * args.connections:
        # h2load paces each client alone and sends its first request at once: at a few
        # requests per second per client a short run overshoots the rate
        ap.error("--rate: at least 10 requests per second per connection (--connections)")
    if args.venv is None:
        args.venv = REPO / ".venv" if (REPO / ".venv").is_dir() else Path(sys.prefix)
    args.pin = not args.no_pin and args.workers == 1 and (os.cpu_count() or 1) >= 2
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    return args


def pairlb_config(
    workdir: Path,
    port: int,
    admin_port: int,
    backends: list[int],
    workers: int,
    access_log: str | None = None,
    name: str = "pairlb",
    log_name: str | None = None,
    mode: str = "http",
    reuseport: bool = True,
) -> Path:
    """A pairlb config in front of the backends: round robin, health checks on, little logging
    (``access_log``: a format, the access log on to ``workdir/access-FORMAT.log``; ``mode``:
    the listener's, http or tcp)."""
    entries = ",\n".join(
        f'  {{ name = "b{i}", address = "127.0.0.1:{p}" }}' for i, p in enumerate(backends, 1)
    )
    text = f"""# written by bench/perf.py
[node]
name = "bench"
workers = {workers}
shutdown_timeout_s = 2

[[listener]]
name = "bench"
bind = "127.0.0.1:{port}"
mode = "{mode}"
pool = "bench"
reuseport = {str(reuseport).lower()}

[[pool]]
name = "bench"
balance = "round_robin"
backends = [
{entries},
]

[pool.health]
path = "/healthz"
interval_s = 1.0
timeout_s = 0.5

[admin]
bind = "127.0.0.1:{admin_port}"

[logging]
level = "warning"
"""
    if access_log:
        if ACCESS_LOG_BUFFER:
            text += f"access_log_buffer_bytes = {ACCESS_LOG_BUFFER}\n"
        text += (f'access_log = "{access_log_path(workdir, log_name or name)}"\n'
                 f'access_log_format = "{access_log}"\n')
    conf = workdir / f"{name}.toml"
    conf.write_text(text)
    return conf


def access_log_path(workdir: Path, name: str) -> Path:
    """Where a logging variant's log goes (pairlb's file; HAProxy's stdout), in a directory
    pairlb's workers can create it in: run as root, they run as ``nobody``."""
    d = (LOG_DIR or workdir) / "access-logs"
    if not d.is_dir():
        d.mkdir()
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(d, nobody.pw_uid, nobody.pw_gid)
    return d / f"{name}.log"


def haproxy_httplog(workdir: Path, port: int, backends: list[int], nbthread: int,
                    mode: str = "http") -> Path:
    """bench/_common's HAProxy config plus ``option httplog`` (mode tcp: ``tcplog``) to
    stdout (its own file)."""
    sub = workdir / "haproxy-httplog"
    sub.mkdir(exist_ok=True)
    conf = c.write_haproxy(sub, port, backends, nbthread=nbthread, mode=mode)
    text = conf.read_text()
    text = text.replace("global\n", "global\n    log stdout format raw local0\n", 1)
    text = text.replace("defaults\n", f"defaults\n    log global\n    option {mode}log\n", 1)
    conf.write_text(text)
    return conf


def log_size(target: Target, workdir: Path) -> int:
    if target.name not in VARIANTS:
        return 0
    try:
        return access_log_path(workdir, target.name).stat().st_size
    except FileNotFoundError:
        return 0


def start_target(
    name: str, args: argparse.Namespace, workdir: Path, procs: c.ProcessSet, backends: list[int]
) -> Target:
    """Start one proxy and wait until it answers through to a backend; raise if it cannot."""
    cpus = args.proxy_cpus if args.pin else None
    size_path = c.body_path(args.sizes[0])
    if name == "direct":
        return Target(name, backends[0], None)
    port, admin_port = c.free_ports(2)
    c.require_free([port, admin_port])
    log = workdir / f"{name}.log"
    if name == "haproxy":
        conf = c.write_haproxy(workdir, port, backends, nbthread=args.workers, mode=args.mode)
        proc = procs.start(name, c.haproxy_argv(conf), log, cpus=cpus)
    elif name == "haproxy+splice":
        sub = workdir / "haproxy-splice"
        sub.mkdir(exist_ok=True)
        conf = c.write_haproxy(sub, port, backends, nbthread=args.workers, mode=args.mode,
                               extra="option splice-auto")
        proc = procs.start(name, c.haproxy_argv(conf), log, cpus=cpus)
    elif name == "haproxy+httplog":
        conf = haproxy_httplog(workdir, port, backends, args.workers, args.mode)
        proc = procs.start(name, c.haproxy_argv(conf), access_log_path(workdir, name), cpus=cpus)
    elif name == "nginx":
        c.prepare_nginx_dirs(workdir, "nginx-proxy")
        conf = c.write_nginx_proxy(workdir, port, backends, workers=args.workers)
        proc = procs.start(name, c.nginx_argv(conf, workdir), log, cpus=cpus)
    elif args.same_process and name in VARIANTS and VARIANTS[name] == "pairlb":
        raise AssertionError("--same-process variants are views of pairlb (start_views)")
    else:
        fmt = (name.partition("+")[2] or None) if name in VARIANTS else None
        conf = pairlb_config(workdir, port, admin_port, backends, args.workers, fmt, name,
                             mode=args.mode, reuseport=name != "pairlb+shared")
        cmd = args.pairlb_cmd.format(venv=args.venv, config=conf, python=sys.executable)
        argv = shlex.split(cmd)
        if name == "pairlb+nosplice":
            argv = ["env", "PAIRLB_TCP_SPLICE=0", *argv]
        if not argv or shutil.which(argv[0]) is None:
            raise RuntimeError(f"pairlb command not found: {argv[0] if argv else cmd!r}")
        proc = procs.start(name, argv, log, cpus=cpus)
    try:
        # Several answers in a row: every backend reached, pools warm, checks passed.
        c.wait_http_ok(
            "127.0.0.1", port, size_path, args.start_timeout, proc=proc, successes=2 * len(backends)
        )
    except RuntimeError:
        procs.stop(proc, timeout_s=5)
        raise
    proc.remember_tree()
    if name == "pairlb":
        return Target(name, port, proc, conf, admin_port)
    return Target(name, port, proc)


def same_process_view(name: str, base: Target) -> Target:
    """--same-process: a logging variant measured on the pairlb process ``base``."""
    return Target(name, base.port, base.proc, base.conf, base.admin_port)


def switch_log(target: Target, args: argparse.Namespace, workdir: Path,
               backends: list[int], state: dict[str, str]) -> None:
    """--same-process: make the shared pairlb log as ``target`` says (off for ``pairlb``,
    its format for ``pairlb+FORMAT``): rewrite the config, SIGHUP, and wait until the
    worker shows it (the wanted log file grows under requests; off: the last one stops)."""
    assert target.proc is not None and target.conf is not None
    want = target.name
    if state.get(target.conf.name) == want:
        return
    fmt = want.partition("+")[2] or None
    pairlb_config(workdir, target.port, target.admin_port, backends, args.workers, fmt,
                  "pairlb", log_name=want, mode=args.mode)
    os.kill(target.proc.pid, signal.SIGHUP)
    prev = state.get(target.conf.name, "pairlb")
    watch = access_log_path(workdir, want if fmt else prev)
    path = c.body_path(args.sizes[0])

    def size() -> int:
        try:
            return watch.stat().st_size
        except FileNotFoundError:
            return -1

    deadline = time.monotonic() + 20
    last = size()
    while time.monotonic() < deadline:
        for _ in range(5):
            c.http_get_status("127.0.0.1", target.port, path)
        time.sleep(0.4)  # a batch of lines is written within 0.15 s
        now = size()
        if (now > last) if fmt else (now == last):
            state[target.conf.name] = want
            return
        last = now
    raise RuntimeError(f"pairlb did not switch its access log to {want} within 20 s")


def restart_all(
    targets: list[Target],
    args: argparse.Namespace,
    workdir: Path,
    procs: c.ProcessSet,
    backend_ports: list[int],
    own_roots: list[int],
    started_pids: list[int],
) -> None:
    """--fresh: stop each proxy and start it again (new processes, same config)."""
    for i, t in enumerate(targets):
        if t.proc is None:
            continue
        with contextlib.suppress(ValueError):
            own_roots.remove(t.proc.pid)
        if args.same_process and t.name in VARIANTS and VARIANTS[t.name] == "pairlb":
            continue  # a view of pairlb: re-pointed below
        procs.stop(t.proc, timeout_s=10)
        new = start_target(t.name, args, workdir, procs, backend_ports)
        if new.proc is not None:
            started_pids.extend(new.proc.remember_tree())
            own_roots.append(new.proc.pid)
        targets[i] = new
    base = next((t for t in targets if t.name == "pairlb"), None)
    if args.same_process and base is not None:
        for i, t in enumerate(targets):
            if t.name in VARIANTS and VARIANTS[t.name] == "pairlb":
                targets[i] = same_process_view(t.name, base)


def mem_of(target: Target) -> list[dict[str, Any]]:
    """RSS of each process in the proxy's tree, labelled control/worker (pairlb) etc."""
    if target.proc is None:
        return []
    out = []
    base = (VARIANTS.get(target.name) or SOCKET_VARIANTS.get(target.name)
            or TCP_ONLY.get(target.name, target.name))
    for i, m in enumerate(c.tree_mem(target.proc.pid)):
        role = ROOT_ROLE[base] if i == 0 else f"{CHILD_ROLE[base]}{i}"
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{m.pid}/cmdline").read_bytes()
            if b"resource_tracker" in cmdline or b"forkserver" in cmdline:
                role = "mp-helper"
        out.append({"role": role, **asdict(m)})
    return out


def measure(
    target: Target,
    size: int,
    rnd: int,
    args: argparse.Namespace,
    backends: c.Managed,
    own_roots: list[int],
    workdir: Path,
) -> Sample:
    """One measurement; repeated (up to --noisy-retries) when other processes loaded the box,
    keeping the least disturbed attempt."""
    best: Sample | None = None
    for attempt in range(args.noisy_retries + 1):
        if args.settle > 0:
            c.wait_quiet(own_roots, args.settle, args.max_other / 2)
        s = measure_once(target, size, rnd, args, backends, own_roots, workdir)
        s.attempts = attempt + 1
        if best is None or not best.ok or (s.ok and s.other_cores < best.other_cores):
            best = s
        if not s.ok or s.other_cores <= args.max_other:
            break
    assert best is not None
    return best


def measure_once(
    target: Target,
    size: int,
    rnd: int,
    args: argparse.Namespace,
    backends: c.Managed,
    own_roots: list[int],
    workdir: Path,
) -> Sample:
    url = f"http://127.0.0.1:{target.port}{c.body_path(size)}"
    load_cpus = args.load_cpus if args.pin else None
    wrk_kw: dict[str, Any] = {
        "connections": args.connections,
        "threads": args.wrk_threads,
        "cpus": load_cpus,
        "log_path": workdir / "wrk.out",
        "headers": ["Connection: close"] if args.close else [],
    }
    try:
        if target.proc is not None and not target.proc.alive():
            raise RuntimeError(f"{target.name} is no longer running:\n{target.proc.log_tail()}")
        if args.warmup:
            c.run_wrk(url, args.warmup, **wrk_kw)
        root = target.proc.pid if target.proc else None
        if target.proc:
            target.proc.remember_tree()
        pc0 = c.tree_cpu_by_pid(root) if root else {}
        b0 = c.tree_cpu_s(backends.pid)
        own0 = sum(c.tree_cpu_s(p) for p in own_roots) + sum(os.times()[:2])
        log0 = log_size(target, workdir)
        cpu0, st0, t0 = c.cpu_times(), c.steal_s(), time.monotonic()
        if args.rate:
            res = c.run_h2load_rate(
                url, args.duration, args.rate, connections=args.connections, cpus=load_cpus,
                log_path=workdir / "h2load.out")
        else:
            res = c.run_wrk(url, args.duration, **wrk_kw)
        cpu1, st1, t1 = c.cpu_times(), c.steal_s(), time.monotonic()
        if target.name in VARIANTS or target.name in VARIANTS.values():
            # The last batch of lines is written within ~0.15 s of the last request: its
            # CPU and its bytes belong to this run (the base waits alike, for a fair pair).
            time.sleep(0.4)
        own1 = sum(c.tree_cpu_s(p) for p in own_roots) + sum(os.times()[:2])
        b1 = c.tree_cpu_s(backends.pid)
        pc1 = c.tree_cpu_by_pid(root) if root else {}
        log1 = log_size(target, workdir)
    except RuntimeError as exc:
        return Sample(target.name, size, rnd, ok=False, error=str(exc))
    proxy_cpu = sum(pc1.values()) - sum(pc0.values()) if root else None
    mem = mem_of(target)
    role_of = {m["pid"]: m["role"] for m in mem}
    cpu_by_role = {
        role_of.get(pid, f"pid{pid}"): (t - pc0.get(pid, 0.0)) / res.requests * 1e6
        for pid, t in pc1.items()
        if res.requests
    }
    # Busy time of every CPU minus ours (all servers we started, wrk, this script).
    other = c.busy_cpu_s(cpu0, cpu1) - (own1 - own0) - res.wrk_cpu_s
    return Sample(
        target=target.name,
        size=size,
        round=rnd,
        ok=res.requests > 0,
        error="" if res.requests > 0 else "no requests completed",
        requests=res.requests,
        rps=res.rps,
        proxy_cpu_s=proxy_cpu,
        cpu_us_per_req=(proxy_cpu / res.requests * 1e6)
        if proxy_cpu is not None and res.requests
        else None,
        p50_us=res.latency_us.get("50", res.latency_us.get("mean", 0.0)),
        p99_us=res.latency_us.get("99", res.latency_us.get("max", 0.0)),
        non_2xx_3xx=res.non_2xx_3xx,
        socket_errors=res.socket_errors,
        wrk_cpu_s=res.wrk_cpu_s,
        backend_cpu_s=b1 - b0,
        wall_s=t1 - t0,
        cpu_busy=c.cpu_busy(cpu0, cpu1),
        other_cores=max(0.0, other) / (t1 - t0),
        steal_cores=(st1 - st0) / (t1 - t0),
        mem=mem,
        cpu_us_by_role=cpu_by_role,
        log_bytes=log1 - log0,
    )


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(
    samples: list[Sample], args: argparse.Namespace, skipped: dict[str, str]
) -> list[dict[str, Any]]:
    """Median over rounds per (size, target), plus req/s relative to HAProxy in the same run."""
    rows = []
    for size in args.sizes:
        by_target = {}
        for t in args.targets:
            ss = [s for s in samples if s.target == t and s.size == size and s.ok]
            failed = [s for s in samples if s.target == t and s.size == size and not s.ok]
            if not ss:
                by_target[t] = {
                    "size": size,
                    "target": t,
                    "ok": False,
                    "error": skipped.get(t) or (failed[0].error if failed else "not measured"),
                }
                continue
            rps = [s.rps for s in ss]
            cpus = sorted({k for s in ss for k in s.cpu_busy})
            # Peak RSS per role over rounds.
            mem: dict[str, int] = {}
            for s in ss:
                for m in s.mem:
                    mem[m["role"]] = max(mem.get(m["role"], 0), m["rss_kb"])
            by_target[t] = {
                "size": size,
                "target": t,
                "ok": True,
                "rounds": len(ss),
                "failed_rounds": len(failed),
                "rps": _median(rps),
                "rps_min": min(rps),
                "rps_max": max(rps),
                "cpu_us_per_req": _median(
                    [s.cpu_us_per_req for s in ss if s.cpu_us_per_req is not None]
                ),
                "p50_us": _median([s.p50_us for s in ss]),
                "p99_us": _median([s.p99_us for s in ss]),
                "non_2xx_3xx": sum(s.non_2xx_3xx for s in ss),
                "socket_errors": sum(sum(s.socket_errors.values()) for s in ss),
                "wrk_cpu_us_per_req": _median([s.wrk_cpu_s / s.requests * 1e6 for s in ss]),
                "backend_cpu_us_per_req": _median([s.backend_cpu_s / s.requests * 1e6 for s in ss]),
                "load_gen_busy": _median([(s.wrk_cpu_s + s.backend_cpu_s) / s.wall_s for s in ss]),
                "other_cores": _median([s.other_cores for s in ss]),
                "steal_cores": _median([s.steal_cores for s in ss]),
                "cpu_busy": {k: _median([s.cpu_busy.get(k, 0.0) for s in ss]) for k in cpus},
                "rss_kb": mem,
                "log_bytes_per_req": _median([s.log_bytes / s.requests for s in ss]),
                "cpu_us_by_role": {
                    role: _median([s.cpu_us_by_role[role] for s in ss if role in s.cpu_us_by_role])
                    for role in sorted({k for s in ss for k in s.cpu_us_by_role})
                },
            }
        hap = by_target.get("haproxy", {})
        hap_rps = {s.round: s.rps for s in samples if s.target == "haproxy" and s.size == size}
        for row in by_target.values():
            if row.get("ok") and hap.get("ok"):
                # Paired in the round: slow drifts of the machine cancel out.
                row["rps_vs_haproxy_by_round"] = [
                    s.rps / hap_rps[s.round]
                    for s in samples
                    if s.target == row["target"]
                    and s.size == size
                    and s.ok
                    and hap_rps.get(s.round)
                ]
                row["rps_vs_haproxy"] = row["rps"] / hap["rps"]
                if row.get("cpu_us_per_req") and hap.get("cpu_us_per_req"):
                    row["cpu_vs_haproxy"] = row["cpu_us_per_req"] / hap["cpu_us_per_req"]
            base_name = (VARIANTS.get(row["target"]) or SOCKET_VARIANTS.get(row["target"])
                         or TCP_ONLY.get(row["target"], ""))
            base = by_target.get(base_name, {})
            if row.get("ok") and base.get("ok") and base.get("cpu_us_per_req"):
                # The logging (or TCP) variant against its base, paired in the round.
                base_cpu = {
                    s.round: s.cpu_us_per_req
                    for s in samples
                    if s.target == base["target"] and s.size == size and s.ok and s.cpu_us_per_req
                }
                row["cpu_vs_base_by_round"] = [
                    s.cpu_us_per_req / base_cpu[s.round]
                    for s in samples
                    if s.target == row["target"]
                    and s.size == size
                    and s.ok
                    and s.cpu_us_per_req
                    and base_cpu.get(s.round)
                ]
                row["cpu_vs_base"] = row["cpu_us_per_req"] / base["cpu_us_per_req"]
            rows.append(row)
    return rows


def _fmt_us(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} us"


def _fmt_size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 and n % 1024 == 0 else f"{n} B"


def _fmt_mem(rss: dict[str, int]) -> str:
    if not rss:
        return "-"
    return ", ".join(f"{role} {kb / 1024:.1f}" for role, kb in rss.items())


def table(rows: list[dict[str, Any]], args: argparse.Namespace, markdown: bool) -> str:
    head = [
        "body",
        "target",
        "req/s",
        "spread",
        "vs HAProxy",
        "proxy CPU us/req",
        "req/s per proxy core",
        "mean" if args.rate else "p50",
        "max" if args.rate else "p99",
        "RSS MB",
        "errors",
        "busy " + "/".join(_cpu_names(rows)),
        "foreign load",
    ]
    lines = []
    for r in rows:
        if not r.get("ok"):
            why = r.get("error", "").splitlines()[0][:60] if r.get("error") else ""
            lines.append([_fmt_size(r["size"]), r["target"], "skipped", *[""] * 9, why])
            continue
        spread = (r["rps_max"] - r["rps_min"]) / r["rps"] * 100 if r["rps"] else 0.0
        busy = "/".join(f"{r['cpu_busy'].get(k, 0) * 100:.0f}%" for k in _cpu_names(rows))
        lines.append(
            [
                _fmt_size(r["size"]),
                r["target"],
                f"{r['rps']:,.0f}",
                f"{spread:.0f}%",
                f"{r['rps_vs_haproxy']:.2f}x" if "rps_vs_haproxy" in r else "-",
                f"{r['cpu_us_per_req']:.1f}" if r.get("cpu_us_per_req") else "-",
                f"{1e6 / r['cpu_us_per_req']:,.0f}" if r.get("cpu_us_per_req") else "-",
                _fmt_us(r["p50_us"]),
                _fmt_us(r["p99_us"]),
                _fmt_mem(r["rss_kb"]),
                str(r["non_2xx_3xx"] + r["socket_errors"]),
                busy,
                f"{r['other_cores']:.2f} cores",
            ]
        )
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(x.replace("|", "/") for x in ln) + " |" for ln in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(ln[i]) for ln in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), *(fmt.format(*ln) for ln in lines)])


def _cpu_names(rows: list[dict[str, Any]]) -> list[str]:
    names: set[str] = set()
    for r in rows:
        names.update(r.get("cpu_busy", {}))
    return sorted(names, key=lambda n: int(n[3:]))


def notes(
    rows: list[dict[str, Any]], args: argparse.Namespace, skipped: dict[str, str]
) -> list[str]:
    """Plain-language lines under the table: ratios, and whether the load generator saturated."""
    out = []
    for size in args.sizes:
        pl = next((r for r in rows if r["size"] == size and r["target"] == "pairlb"), None)
        if pl and "rps_vs_haproxy" in pl:
            cpu = f", CPU/request {pl['cpu_vs_haproxy']:.2f}x" if "cpu_vs_haproxy" in pl else ""
            paired = pl.get("rps_vs_haproxy_by_round") or []
            rounds = " ".join(f"{x:.2f}" for x in paired)
            mode = " (mode tcp)" if args.mode == "tcp" else ""
            out.append(
                f"pairlb/HAProxy req/s at {_fmt_size(size)}{mode}: "
                f"{pl['rps_vs_haproxy']:.2f}{cpu}"
                + (f"; same-round ratios {rounds}" if len(paired) > 1 else "")
            )
    for r in rows:
        if r.get("ok") and "cpu_vs_base" in r:
            paired = r["cpu_vs_base_by_round"]
            med = statistics.median(paired) if paired else r["cpu_vs_base"]
            spread = f" (min {min(paired):.3f}, max {max(paired):.3f})" if paired else ""
            logged = r["target"] in VARIANTS
            base = (VARIANTS.get(r["target"]) or SOCKET_VARIANTS.get(r["target"])
                    or TCP_ONLY[r["target"]])
            out.append(
                f"{r['target']}/{base} CPU per "
                f"request at {_fmt_size(r['size'])}: {r['cpu_vs_base']:.3f}x of medians; "
                f"same-round ratios median {med:.3f}{spread}: "
                + " ".join(f"{x:.3f}" for x in paired)
                + (f"; log {r['log_bytes_per_req']:.0f} bytes/request" if logged else "")
            )
    if args.pin:
        load_cpu = "cpu" + args.load_cpus.split(",")[0].split("-")[0]
        for r in rows:
            if r.get("ok") and r["target"] != "direct":
                busy = r["cpu_busy"].get(load_cpu, 0.0)
                if busy > 0.9:
                    out.append(
                        f"warning: {load_cpu} (wrk + backends) was {busy:.0%} busy during "
                        f"{r['target']} {_fmt_size(r['size'])}: the load generator may be the limit"
                    )
    for r in rows:
        split = r.get("cpu_us_by_role") or {}
        if r.get("ok") and len(split) > 1:
            parts = ", ".join(f"{role} {us:.1f}" for role, us in split.items() if us is not None)
            out.append(f"{r['target']} {_fmt_size(r['size'])} CPU us/req by process: {parts}")
    for r in rows:
        if r.get("ok") and r["other_cores"] > args.max_other:
            out.append(
                f"warning: {r['other_cores']:.2f} cores of other processes' load "
                f"({r['steal_cores']:.2f} of it hypervisor steal) during "
                f"{r['target']} {_fmt_size(r['size'])}: numbers are noisy"
            )
    if args.close:
        out.append("--close: every request on a new connection (Connection: close)")
    if args.rate:
        out.append(f"--rate: a fixed {args.rate:,} req/s (h2load --h1, {args.connections} "
                   "keep-alive clients), not saturation: CPU per request is the comparison; "
                   "latency columns are h2load's mean and max")
        for r in rows:
            if r.get("ok") and r["rps"] < 0.97 * args.rate:
                out.append(f"warning: {r['target']} {_fmt_size(r['size'])} kept "
                           f"{r['rps']:,.0f} of {args.rate:,} req/s: it could not hold the rate")
    if args.mode == "tcp":
        out.append("mode tcp: pairlb's listener and HAProxy pipe bytes (one backend connection "
                   "per wrk connection); wrk's keep-alive HTTP passes through unread")
    if not args.pin:
        out.append(f"not pinned (workers={args.workers}): proxy, wrk and backends share all CPUs")
    for t, why in skipped.items():
        out.append(f"{t} skipped: {why.splitlines()[0] if why else '?'}")
    return out


def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "cpu_model": c.cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "haproxy": c.tool_version(["haproxy", "-v"]),
        "nginx": c.tool_version(["nginx", "-v"]),
        "wrk": c.tool_version(["wrk", "-v"]),
        "h2load": c.tool_version(["h2load", "--version"]),
        "pinned": args.pin,
        "proxy_cpus": args.proxy_cpus if args.pin else None,
        "load_cpus": args.load_cpus if args.pin else None,
    }


def run(args: argparse.Namespace) -> int:
    needs_haproxy = any(t.startswith("haproxy") for t in args.targets)
    for tool in ("wrk", "nginx", *(["haproxy"] if needs_haproxy else [])):
        if shutil.which(tool) is None:
            print(f"error: {tool} not found", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="pairlb-bench-"))
    global LOG_DIR, ACCESS_LOG_BUFFER
    ACCESS_LOG_BUFFER = args.access_log_buffer
    if args.log_dir is not None:
        LOG_DIR = Path(tempfile.mkdtemp(prefix="pairlb-bench-logs-", dir=args.log_dir))
        LOG_DIR.chmod(0o755)  # the workers (nobody, when run as root) reach access-logs/
    samples: list[Sample] = []
    skipped: dict[str, str] = {}
    started_pids: list[int] = []
    rng = random.Random(args.seed)
    t_start = time.monotonic()
    procs = c.ProcessSet()
    try:
        backend_ports = c.free_ports(3)
        c.require_free(backend_ports)
        c.prepare_nginx_dirs(workdir, "backends")
        bconf = c.write_nginx_backends(
            workdir, backend_ports, args.sizes, workers=args.backend_workers
        )
        backends = procs.start(
            "backends",
            c.nginx_argv(bconf, workdir),
            workdir / "backends.log",
            cpus=args.load_cpus if args.pin else None,
        )
        for p in backend_ports:
            c.wait_http_ok("127.0.0.1", p, "/healthz", args.start_timeout, proc=backends)
        started_pids.extend(backends.remember_tree())
        targets: list[Target] = []
        own_roots = [backends.pid]
        views = [n for n in args.targets if args.same_process
                 and n in VARIANTS and VARIANTS[n] == "pairlb"]
        if views and "pairlb" not in args.targets:
            args.targets.append("pairlb")
        for name in args.targets:
            if name in views:
                continue
            try:
                t = start_target(name, args, workdir, procs, backend_ports)
            except RuntimeError as exc:
                if not name.startswith("pairlb"):
                    raise
                first, _, rest = str(exc).partition("\n")
                last = rest.strip().splitlines()[-1][:200] if rest.strip() else ""
                skipped[name] = f"did not come up: {first}" + (
                    f" (last log line: {last})" if last else ""
                )
                print(f"pairlb skipped: {exc}", file=sys.stderr)
                continue
            if t.proc is not None:
                started_pids.extend(t.proc.remember_tree())
                own_roots.append(t.proc.pid)
            targets.append(t)
        base = next((t for t in targets if t.name == "pairlb"), None)
        if base is not None:
            targets += [same_process_view(n, base) for n in views]
        log_state: dict[str, str] = {}
        print(
            f"workdir {workdir}; pinned={args.pin}; targets "
            + ", ".join(f"{t.name}:{t.port}" for t in targets),
            file=sys.stderr,
        )
        for rnd in range(1, args.rounds + 1):
            if args.fresh and rnd > 1:
                restart_all(targets, args, workdir, procs, backend_ports, own_roots,
                            started_pids)
                log_state.clear()  # a new pairlb starts with its log off
            plan = [(t, size) for t in targets for size in args.sizes]
            rng.shuffle(plan)
            for t, size in plan:
                if args.same_process and t.conf is not None:
                    try:
                        switch_log(t, args, workdir, backend_ports, log_state)
                    except RuntimeError as exc:
                        samples.append(Sample(t.name, size, rnd, ok=False, error=str(exc)))
                        continue
                s = measure(t, size, rnd, args, backends, own_roots, workdir)
                samples.append(s)
                status = (
                    f"{s.rps:10,.0f} req/s  cpu/req {s.cpu_us_per_req or 0:6.1f} us  "
                    f"busy {' '.join(f'{k}={v:.0%}' for k, v in s.cpu_busy.items())}"
                    if s.ok
                    else f"FAILED: {s.error.splitlines()[0] if s.error else ''}"
                )
                print(f"round {rnd} {t.name:8} {_fmt_size(size):>7}  {status}", file=sys.stderr)
    finally:
        procs.close()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
            if LOG_DIR is not None:
                shutil.rmtree(LOG_DIR, ignore_errors=True)
    rows = summarize(samples, args, skipped)
    cmd = " ".join(shlex.quote(a) for a in ["bench/perf.py", *sys.argv[1:]])
    text_notes = notes(rows, args, skipped)
    print(f"\n$ {cmd}")
    print(table(rows, args, markdown=args.markdown))
    print()
    for line in text_notes:
        print(("- " if args.markdown else "") + line)
    if args.json:
        doc = {
            "command": cmd,
            "machine": machine_info(args),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "elapsed_s": time.monotonic() - t_start,
            "skipped": skipped,
            "started_pids": started_pids,
            "summary": rows,
            # with --rate, p50_us/p99_us hold h2load's mean and max (it gives no percentiles)
            "latency_fields": "mean/max" if args.rate else "p50/p99",
            "notes": text_notes,
            "samples": [asdict(s) for s in samples],
        }
        args.json.write_text(json.dumps(doc, indent=2))
    failed_required = [r for r in rows if not r.get("ok") and r["target"] not in skipped]
    return 1 if failed_required else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A shell starts background jobs with SIGINT ignored; Ctrl-C/kill -INT must still clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with c.sigterm_as_exit():
        try:
            return run(args)
        except KeyboardInterrupt:
            print("interrupted; servers stopped", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
