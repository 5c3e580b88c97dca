#!/usr/bin/env python3
"""Where a saturated pairlb worker spends its CPU: a py-spy flame graph of the hot path.

Starts nginx backends (bench/_common), pairlb with one worker pinned to CPU 0 (the config of
bench/perf.py), drives it with wrk pinned to CPU 1, and samples the worker with py-spy
(``record --idle`` off: only on-CPU stacks; ``--native`` adds the C frames of uvloop,
httptools and CPython). Writes an SVG flame graph (or speedscope / raw collapsed stacks with
``--format``) and prints the top functions by self time from the collapsed stacks.

    .venv/bin/python bench/profile.py --out docs/img/hot-path-100b.svg
    .venv/bin/python bench/profile.py --size 65536 --seconds 10 --native
    .venv/bin/python bench/profile.py --access-log json --out /tmp/alog.svg
    .venv/bin/python bench/profile.py --mode tcp --size 65536 --perf --out /tmp/tcp.svg

py-spy is a tool of this script only (``pip install py-spy``); it needs ptrace rights over
the worker (root here). Bounded: wrk runs ``--seconds`` + 3 s, every process started is
stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import collections
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import _common as c
import perf

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--seconds", type=int, default=8, help="sampling time")
    ap.add_argument("--size", type=int, default=100, help="response body bytes")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    ap.add_argument("--access-log", default=None, help="json or combined: log on")
    ap.add_argument("--mode", default="http", choices=("http", "tcp"),
                    help="the listener's mode (tcp: wrk's HTTP piped through)")
    ap.add_argument("--format", default="flamegraph", choices=("flamegraph", "speedscope", "raw"))
    ap.add_argument("--perf", action="store_true",
                    help="also sample with Linux perf (cpu-clock): C functions by self time")
    ap.add_argument("--syscalls", action="store_true",
                    help="also count the worker's system calls per request (perf stat on the "
                    "syscall tracepoints: cheap, unlike strace)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/pairlb-profile.svg"))
    ap.add_argument("--top", type=int, default=25, help="functions listed by self time")
    ap.add_argument("--pairlb-cmd", default="{venv}/bin/pairlb run -c {config}")
    ap.add_argument("--venv", type=Path, default=REPO / ".venv")
    return ap.parse_args(argv)


def worker_pid(root: int, timeout_s: float = 10.0) -> int:
    """The one worker process under pairlb's control process (skipping mp helpers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in c.tree_pids(root):
            if pid == root:
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"resource_tracker" not in cmd and b"forkserver" not in cmd:
                return pid
        time.sleep(0.1)
    raise RuntimeError("no pairlb worker found")


def top_self(collapsed: Path, n: int) -> list[tuple[float, str]]:
    """Share of samples whose innermost frame is each function (self time)."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, num = line.rpartition(" ")
        if not num.isdigit():
            continue
        k = int(num)
        total += k
        counts[stack.rsplit(";", 1)[-1]] += k
    return [(v / total * 100, f) for f, v in counts.most_common(n)] if total else []


def perf_profile(
    port: int, path: str, wpid: int, args: argparse.Namespace, workdir: Path
) -> list[str]:
    """Linux perf's view of the worker under the same load: CPython, uvloop, httptools and
    kernel functions by self time (what a Python-level profile hides in one line)."""
    exe = shutil.which("perf")
    if exe is None:
        return ["  (perf not found)"]
    data = workdir / "perf.data"
    load = threading.Thread(target=lambda: c.run_wrk(
        f"http://127.0.0.1:{port}{path}", args.seconds + 3,
        connections=args.connections, cpus="1"))
    load.start()
    time.sleep(1.5)
    subprocess.run([exe, "record", "-e", "cpu-clock", "-F", "999", "-p", str(wpid), "-o",
                    str(data), "--", "sleep", str(args.seconds)],
                   check=True, capture_output=True, timeout=args.seconds + 30)
    load.join(args.seconds + 30)
    rep = subprocess.run([exe, "report", "-i", str(data), "--no-children", "--stdio",
                          "--sort", "dso,symbol", "--percent-limit", "0.2"],
                         capture_output=True, text=True, timeout=120)
    rows = [ln for ln in rep.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    return ["  " + " ".join(r.split()) for r in rows[: args.top]]


SYSCALLS = ("read", "recvfrom", "readv", "write", "writev", "sendto", "sendmsg", "epoll_wait",
            "epoll_pwait", "epoll_ctl", "accept4", "close", "getsockopt", "setsockopt", "ioctl",
            "futex", "getpid")


def requests_served(admin: int) -> float:
    """pairlb_requests_total summed over every series (the control process's merge of the
    workers' counters, sent every 0.25 s)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("pairlb_requests_total{"))


def syscall_counts(
    port: int, admin: int, path: str, wpid: int, args: argparse.Namespace
) -> list[str]:
    """System calls of the worker per request under the same load: which ones a request
    costs, and how many (batching: fewer epoll_wait per request as load rises)."""
    exe = shutil.which("perf")
    if exe is None:
        return ["  (perf not found)"]
    load = threading.Thread(target=lambda: c.run_wrk(
        f"http://127.0.0.1:{port}{path}", args.seconds + 3,
        connections=args.connections, cpus="1"))
    load.start()
    time.sleep(1.5)
    events = ",".join(f"syscalls:sys_enter_{n}" for n in SYSCALLS)
    r0 = requests_served(admin)
    out = subprocess.run([exe, "stat", "-x", ",", "-e", events, "-p", str(wpid), "--", "sleep",
                          str(args.seconds)], capture_output=True, text=True,
                         timeout=args.seconds + 30)
    time.sleep(0.6)  # the workers' counters reach the control process every 0.25 s
    n = requests_served(admin) - r0
    load.join(args.seconds + 30)
    rows = []
    for line in out.stderr.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2].startswith("syscalls:sys_enter_") and parts[0].isdigit():
            calls = int(parts[0])
            if calls:
                rows.append((calls, parts[2].removeprefix("syscalls:sys_enter_")))
    lines = ([f"  {calls / n:8.3f}  {name}" for calls, name in sorted(rows, reverse=True)]
             if n else [])
    total = sum(calls for calls, _ in rows)
    return [f"  ({n:,.0f} requests in {args.seconds} s; {total / n:.2f} system calls each)"
            if n else "  (no requests counted)", *lines]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    spy = shutil.which("py-spy") or str(args.venv / "bin" / "py-spy")
    if not Path(spy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="pairlb-profile-"))
    with c.ProcessSet() as procs:
        ports = c.free_ports(3)
        c.prepare_nginx_dirs(workdir, "backends")
        bconf = c.write_nginx_backends(workdir, ports, [args.size])
        backends = procs.start("backends", c.nginx_argv(bconf, workdir),
                               workdir / "backends.log", cpus="1")
        for p in ports:
            c.wait_http_ok("127.0.0.1", p, "/healthz", 20, proc=backends)
        port, admin = c.free_ports(2)
        conf = perf.pairlb_config(workdir, port, admin, ports, 1, args.access_log, "pairlb",
                                  mode=args.mode)
        cmd = args.pairlb_cmd.format(venv=args.venv, config=conf, python=sys.executable)
        lb = procs.start("pairlb", shlex.split(cmd), workdir / "pairlb.log", cpus="0")
        path = c.body_path(args.size)
        c.wait_http_ok("127.0.0.1", port, path, 30, proc=lb, successes=6)
        wpid = worker_pid(lb.pid)
        res: list[c.WrkResult] = []
        load = threading.Thread(target=lambda: res.append(c.run_wrk(
            f"http://127.0.0.1:{port}{path}", args.seconds + 3,
            connections=args.connections, cpus="1")))
        load.start()
        time.sleep(1.5)  # past wrk's ramp-up
        raw = workdir / "stacks.txt"
        base = [spy, "record", "-p", str(wpid), "-d", str(args.seconds), "-r", str(args.rate),
                "--nonblocking"] + (["--native"] if args.native else [])
        t0 = c.tree_cpu_s(lb.pid)
        subprocess.run([*base, "-f", "raw", "-o", str(raw)], check=True,
                       capture_output=True, timeout=args.seconds + 30)
        cpu = c.tree_cpu_s(lb.pid) - t0
        load.join(args.seconds + 30)
        perf_top: list[str] = []
        if args.perf:
            perf_top = perf_profile(port, path, wpid, args, workdir)
        sys_top: list[str] = []
        if args.syscalls:
            sys_top = syscall_counts(port, admin, path, wpid, args)
        if args.format == "raw":
            shutil.copyfile(raw, args.out)
        else:
            # The picture from the same stacks (py-spy cannot render a raw file: record
            # again for the SVG/speedscope, a second sample of the same steady state).
            load2 = threading.Thread(target=lambda: c.run_wrk(
                f"http://127.0.0.1:{port}{path}", args.seconds + 3,
                connections=args.connections, cpus="1"))
            load2.start()
            time.sleep(1.5)
            subprocess.run([*base, "-f", args.format, "-o", str(args.out)], check=True,
                           capture_output=True, timeout=args.seconds + 30)
            load2.join(args.seconds + 30)
    rps = res[0].rps if res else 0.0
    print(f"pairlb worker {wpid}: {rps:,.0f} req/s under py-spy (it slows the worker), "
          f"{cpu / max(args.seconds, 1) * 100:.0f}% of a core; {args.size} B bodies"
          + (", mode tcp" if args.mode == "tcp" else "")
          + (f", access log {args.access_log}" if args.access_log else ""))
    print(f"picture: {args.out}")
    print("self time, % of samples:")
    for share, fn in top_self(raw, args.top):
        print(f"  {share:5.1f}  {fn}")
    if perf_top:
        print("perf (cpu-clock), C functions by self time:")
        print("\n".join(perf_top))
    if sys_top:
        print("system calls of the worker per request:")
        print("\n".join(sys_top))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
