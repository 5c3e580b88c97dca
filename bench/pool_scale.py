#!/usr/bin/env python3
"""A proxy worker's cost per request against the size of its pool: 50 vs 1000 vs 3000 backends.

One nginx (1 worker) listens on the largest N ports of 127.0.0.1 with keep-alive and answers
every path with a 100-byte body; a pool of N uses the first N of them. For each (variant,
balance mode, N) a fresh ``pairlb run`` (``[node] workers = 1``, health checks every
``--interval`` s) is started, every backend is waited UP (``pairlb_pool_usable_backends``), wrk
warms it up for ``--warmup`` s and then 2 s at a time while the worker is still opening
keep-alive connections to backends (up to ``--max-warmup`` s: with random picks reaching all
N backends takes ~N ln N requests, and a connect costs more than a pick), then drives it for
``--duration`` s. Reported per run:

- **worker CPU us/req**: utime+stime of the worker process during the wrk run / requests
  completed: the figure that says whether a request costs more with more backends (noise
  from other processes on the box barely moves it, unlike req/s);
- **req/s**, p50/p99 from wrk, errors (non-2xx + socket errors);
- **control cores**: CPU of the control process over the run (mostly health checks);
- the 1-minute load average at the end of the run.

Variants let one run compare code trees: ``--variant NAME=GITREF`` runs ``python -m lb`` from
``git archive GITREF`` unpacked in the work dir (PYTHONPATH, the same venv); ``current`` (always
measured unless ``--no-current``) is the installed ``pairlb``. Runs are interleaved: each round
runs every (variant, mode, N) once in a shuffled order, and the table reports the median
over rounds, plus each N's ratio to N=50 of the same variant and mode.

With 2+ CPUs the proxy (control + worker) is pinned to CPU 0 and wrk + nginx to CPU 1, as
in bench/perf.py. Every process is started by this script and stopped by PID, also on
Ctrl-C; all traffic stays on 127.0.0.1.

    .venv/bin/python bench/pool_scale.py                                  # 50,1000,3000 x rr
    .venv/bin/python bench/pool_scale.py --variant before=cf233fd --balance \\
        round_robin,least_connections,random_two --rounds 2 --markdown
    .venv/bin/python bench/pool_scale.py --quick                          # smoke: 50,200, 2 s
    .venv/bin/python bench/pool_scale.py --micro --variant before=GITREF  # picks alone, in-process

Imports nothing from lb: it measures the command (or the tree) it is given; `--micro` loads
lb/data/pool.py of each variant from its file (pure: no other import) and times picks in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

REPO = Path(__file__).resolve().parent.parent
MODES = ("round_robin", "least_connections", "random_two")
BODY = b"x" * 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--backends", default="50,1000,3000", help="comma-separated N values")
    ap.add_argument("--balance", default="round_robin", help="comma-separated balance modes")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=GITREF: also measure that tree (repeatable)")
    ap.add_argument("--no-current", action="store_true", help="measure only the --variant trees")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--duration", type=int, default=8, help="seconds of wrk per run")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured wrk before")
    ap.add_argument("--max-warmup", type=int, default=40,
                    help="keep warming (2 s at a time) up to this long while the worker is "
                         "still opening backend connections")
    ap.add_argument("--connections", type=int, default=50, help="wrk -c")
    ap.add_argument("--interval", type=float, default=1.0, help="health check interval_s")
    ap.add_argument("--up-timeout", type=float, default=90.0,
                    help="seconds to wait for every backend to be UP")
    ap.add_argument("--no-pin", action="store_true", help="never use taskset")
    ap.add_argument("--seed", type=int, default=None, help="shuffle seed (default: random)")
    ap.add_argument("--json", type=Path, help="write every sample and the summary here")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--keep-workdir", action="store_true", help="leave configs and logs")
    ap.add_argument("--micro", action="store_true",
                    help="no servers: time lb/data/pool.py's picks in-process for each variant")
    ap.add_argument("--report", type=Path,
                    help="print the table of a JSON written by --json (no run)")
    ap.add_argument("--quick", action="store_true", help="smoke run: N=50,200, 2 s, no warm-up")
    args = ap.parse_args(argv)
    if args.quick:
        args.backends, args.duration, args.warmup, args.interval = "50,200", 2, 0, 2.0
    args.sizes = sorted({int(n) for n in args.backends.split(",") if n.strip()})
    args.modes = [m.strip() for m in args.balance.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        ap.error(f"--balance: unknown {bad}; choose from {','.join(MODES)}")
    if not args.sizes or min(args.sizes) < 1:
        ap.error("--backends: positive integers")
    variants: dict[str, str | None] = {} if args.no_current else {"current": None}
    for v in args.variant:
        name, sep, ref = v.partition("=")
        if not sep or not name or not ref or name in variants:
            ap.error(f"--variant {v!r}: NAME=GITREF with a new NAME")
        variants[name] = ref
    if not variants:
        ap.error("nothing to measure")
    args.variants = variants
    args.pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    return args


def write_nginx(workdir: Path, ports: list[int]) -> Path:
    """One nginx, one worker, every port in one server block; keep-alive never recycled."""
    name = "backends"
    c.prepare_nginx_dirs(workdir, name)
    listens = "".join(f"        listen 127.0.0.1:{p} backlog=1024;\n" for p in ports)
    text = (
        c.nginx_head(1, workdir, name)
        + "http {\n"
        + c._NGINX_TEMP.format(dir=workdir, name=name)
        + "    access_log off;\n    tcp_nodelay on;\n"
        + "    keepalive_timeout 300s;\n    keepalive_requests 100000000;\n    server {\n"
        + listens
        + f'        location / {{ return 200 "{BODY.decode()}"; }}\n    }}\n}}\n'
    )
    conf = workdir / f"{name}.conf"
    conf.write_text(text)
    return conf


def pairlb_config(
    args: argparse.Namespace, workdir: Path, tag: str, mode: str, port: int, admin_port: int,
    ports: list[int],
) -> Path:
    entries = ",\n".join(
        f'  {{ name = "b{i}", address = "127.0.0.1:{p}" }}' for i, p in enumerate(ports, 1)
    )
    text = f"""# written by bench/pool_scale.py
[node]
name = "poolscale"
workers = 1
shutdown_timeout_s = 1

[[listener]]
name = "web"
bind = "127.0.0.1:{port}"
mode = "http"
pool = "web"

[[pool]]
name = "web"
balance = "{mode}"
backends = [
{entries},
]

[pool.health]
path = "/healthz"
interval_s = {args.interval}
timeout_s = 0.5

[admin]
bind = "127.0.0.1:{admin_port}"

[logging]
level = "warning"
"""
    conf = workdir / f"pairlb-{tag}.toml"
    conf.write_text(text)
    return conf


def unpack_tree(ref: str, dest: Path) -> Path:
    """``git archive ref`` unpacked into dest (read-only use of the repository)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "lb", "healthcheck", "failover"],
        check=True, capture_output=True, timeout=60,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
    return dest


def check_tree(venv: Path, tree: Path) -> None:
    """The tree's lb is the one that runs (not the repository's, nor the installed one)."""
    argv = ["env", "-C", str(tree), f"PYTHONPATH={tree}", str(venv / "bin" / "python"), "-c",
            "import lb.data.pool; print(lb.data.pool.__file__)"]
    where = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout
    if not where.strip().startswith(str(tree)):
        raise RuntimeError(f"{tree}: python imports lb from {where.strip()}")


def pairlb_argv(venv: Path, tree: Path | None, conf: Path) -> list[str]:
    if tree is None:
        return [str(venv / "bin" / "pairlb"), "run", "-c", str(conf)]
    # `env` execs python, so the PID we track is the control process itself. The working
    # directory is the tree too: `-m` puts it first on sys.path, and the workers inherit it.
    return ["env", "-C", str(tree), f"PYTHONPATH={tree}", str(venv / "bin" / "python"), "-m",
            "lb", "run", "-c", str(conf)]


def venv_of() -> Path:
    return REPO / ".venv" if (REPO / ".venv").is_dir() else Path(sys.prefix)


def usable_backends(admin_port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=30)
    try:
        conn.request("GET", "/metrics?scope=pool")
        r = conn.getresponse()
        text = r.read().decode()
    except (OSError, http.client.HTTPException):
        return -1
    finally:
        conn.close()
    if r.status != 200:
        # An older tree without ?scope: the whole text.
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=30)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        except (OSError, http.client.HTTPException):
            return -1
        finally:
            conn.close()
    vals = re.findall(r"^pairlb_pool_usable_backends(?:\{[^}]*\})? (\S+)$", text, re.M)
    return int(sum(float(v) for v in vals)) if vals else -1


def worker_pids(root: int) -> list[int]:
    out = []
    for pid in c.tree_pids(root):
        with contextlib.suppress(OSError):
            if b"lb.data.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
    return out


def sockets(pids: list[int]) -> int:
    """Open sockets of these processes (client and backend connections, listeners)."""
    n = 0
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        with contextlib.suppress(OSError):
            for fd in os.listdir(fd_dir):
                with contextlib.suppress(OSError):
                    n += os.readlink(fd_dir / fd).startswith("socket:")
    return n


def cpu_of(pids: list[int]) -> float:
    return sum(s.cpu_s for p in pids if (s := c.read_stat(p)) is not None)


def run_one(
    args: argparse.Namespace, workdir: Path, procs: c.ProcessSet, variant: str,
    tree: Path | None, mode: str, n: int, ports: list[int], rnd: int,
) -> dict[str, Any]:
    port, admin_port = c.free_ports(2)
    c.require_free([port, admin_port])
    tag = f"{variant}-{mode}-{n}-r{rnd}"
    conf = pairlb_config(args, workdir, tag, mode, port, admin_port, ports[:n])
    venv = venv_of()
    cpus = "0" if args.pin else None
    lb = procs.start("pairlb", pairlb_argv(venv, tree, conf), workdir / f"{tag}.log", cpus=cpus)
    try:
        t_start = time.monotonic()
        c.wait_http_ok("127.0.0.1", admin_port, "/healthz", 30.0, proc=lb)
        deadline = time.monotonic() + args.up_timeout
        up = -1
        while time.monotonic() < deadline:
            if not lb.alive():
                raise RuntimeError(f"pairlb exited:\n{lb.log_tail()}")
            up = usable_backends(admin_port)
            if up >= n:
                break
            time.sleep(0.3)
        else:
            raise RuntimeError(f"only {up}/{n} backends usable after {args.up_timeout} s")
        up_s = time.monotonic() - t_start
        url = f"http://127.0.0.1:{port}/"
        load_cpus = "1" if args.pin else None
        wrk_kw: dict[str, Any] = {"connections": args.connections, "cpus": load_cpus,
                                  "log_path": workdir / "wrk.out"}
        lb.remember_tree()
        workers = worker_pids(lb.pid)
        warm_s = 0
        if args.warmup:
            c.run_wrk(url, args.warmup, **wrk_kw)
            warm_s = args.warmup
            # Until the worker has its keep-alive connections: with random picks, reaching
            # all N backends takes ~N ln N requests, and a connect costs far more than a pick.
            while warm_s < args.max_warmup:
                before = sockets(workers)
                c.run_wrk(url, 2, **wrk_kw)
                warm_s += 2
                if sockets(workers) - before <= max(5, n // 100):
                    break
        w0, k0, t0 = cpu_of(workers), cpu_of([lb.pid]), time.monotonic()
        res = c.run_wrk(url, args.duration, **wrk_kw)
        w1, k1, t1 = cpu_of(workers), cpu_of([lb.pid]), time.monotonic()
        open_sockets = sockets(workers)
        if not lb.alive():
            raise RuntimeError(f"pairlb exited during the run:\n{lb.log_tail()}")
    finally:
        lb.remember_tree()
        procs.stop(lb, timeout_s=5)
    return {
        "pids": sorted(lb.known),
        "variant": variant, "mode": mode, "backends": n, "round": rnd,
        "requests": res.requests, "rps": round(res.rps, 1),
        "worker_us_per_req": round((w1 - w0) / res.requests * 1e6, 2) if res.requests else None,
        "worker_cores": round((w1 - w0) / (t1 - t0), 3),
        "control_cores": round((k1 - k0) / (t1 - t0), 3),
        "p50_us": res.latency_us.get("50"), "p99_us": res.latency_us.get("99"),
        "errors": res.errors, "up_s": round(up_s, 2), "warmup_s": warm_s,
        "worker_sockets": open_sockets,
        "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
    }


def summarize(samples: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for variant in args.variants:
        for mode in args.modes:
            base = None
            for n in args.sizes:
                ss = [s for s in samples
                      if (s["variant"], s["mode"], s["backends"]) == (variant, mode, n)]
                us = [s["worker_us_per_req"] for s in ss if s["worker_us_per_req"]]
                if not us:
                    continue
                row = {
                    "variant": variant, "mode": mode, "backends": n, "runs": len(ss),
                    "worker_us_per_req": round(statistics.median(us), 1),
                    "worker_us_best": round(min(us), 1),
                    "rps": round(statistics.median(s["rps"] for s in ss)),
                    "p99_us": statistics.median(s["p99_us"] or 0 for s in ss),
                    "control_cores": round(statistics.median(s["control_cores"] for s in ss), 2),
                    "errors": sum(s["errors"] for s in ss),
                    "loadavg_1m": max(s["loadavg_1m"] for s in ss),
                }
                if base is None:
                    base = row
                row["us_vs_first"] = round(row["worker_us_per_req"] / base["worker_us_per_req"], 2)
                row["best_vs_first"] = round(row["worker_us_best"] / base["worker_us_best"], 2)
                row["rps_vs_first"] = round(row["rps"] / base["rps"], 2) if base["rps"] else None
                rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], markdown: bool) -> str:
    head = ["variant", "balance", "backends", "worker CPU us/req", "vs first N", "best",
            "vs first N", "req/s",
            "vs first N", "p99", "control cores", "errors", "load avg"]
    lines = []
    for r in rows:
        p99 = r["p99_us"]
        lines.append([
            r["variant"], r["mode"], str(r["backends"]), f"{r['worker_us_per_req']:.1f}",
            f"{r['us_vs_first']:.2f}x", f"{r['worker_us_best']:.1f}",
            f"{r['best_vs_first']:.2f}x", f"{r['rps']:,}",
            f"{r['rps_vs_first']:.2f}x" if r["rps_vs_first"] is not None else "-",
            f"{p99 / 1000:.2f} ms" if p99 else "-", f"{r['control_cores']:.2f}",
            str(r["errors"]), f"{r['loadavg_1m']:.2f}",
        ])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(x) + " |" for x in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h)
              for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out += ["  ".join(v.ljust(w) for v, w in zip(x, widths, strict=True)) for x in lines]
    return "\n".join(out)


def micro(args: argparse.Namespace) -> int:
    """In-process: CPU per pick + release (and per retry pick) of lb/data/pool.py of each variant,
    loaded from the file alone (it is pure), for each N and mode. No servers."""
    import importlib.util

    out = []
    for variant, ref in args.variants.items():
        src = (REPO / "lb" / "pool.py").read_text() if ref is None else subprocess.run(
            ["git", "-C", str(REPO), "show", f"{ref}:lb/data/pool.py"],
            check=True, capture_output=True, text=True, timeout=30).stdout
        path = Path(tempfile.mkdtemp(prefix="pool-micro-")) / f"pool_{variant}.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"pool_{variant}", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up
        spec.loader.exec_module(mod)
        shutil.rmtree(path.parent, ignore_errors=True)
        for mode in args.modes:
            for n in args.sizes:
                pool = mod.build_pool("p", mode, [(f"b{i}", "127.0.0.1", 1, 1.0 + i % 3)
                                                  for i in range(n)], seed=1)
                k = max(2000, min(100_000, 20_000_000 // (n * 50)))
                t0 = time.process_time()
                for _ in range(k):
                    pool.release(pool.pick(0.0))
                pick_us = (time.process_time() - t0) / k * 1e6
                t0 = time.process_time()
                for _ in range(k // 2):
                    b = pool.pick(0.0)
                    c2 = pool.pick(0.0, [b])
                    pool.release(b)
                    pool.release(c2)
                retry_us = (time.process_time() - t0) / (k // 2) * 1e6
                out.append((variant, mode, n, pick_us, retry_us))
                print(f"{variant:>10} {mode:>17} N={n:<5} pick+release {pick_us:8.2f} us   "
                      f"pick + retry pick {retry_us:8.2f} us", flush=True)
    print()
    print("| variant | balance | backends | pick + release, us CPU | pick + retry pick, us CPU |")
    print("|---|---|---|---|---|")
    for variant, mode, n, pick_us, retry_us in out:
        print(f"| {variant} | {mode} | {n} | {pick_us:.2f} | {retry_us:.2f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.micro:
        return micro(args)
    if args.report:
        samples = json.loads(args.report.read_text())["samples"]
        args.variants = dict.fromkeys(dict.fromkeys(s["variant"] for s in samples))
        args.modes = [m for m in MODES if any(s["mode"] == m for s in samples)]
        args.sizes = sorted({s["backends"] for s in samples})
        print(table(summarize(samples, args), args.markdown))
        return 0
    for tool in ("wrk", "nginx"):
        if shutil.which(tool) is None:
            print(f"{tool} not found", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="pool-scale-"))
    workdir.chmod(0o755)
    samples: list[dict[str, Any]] = []
    nginx_pids: list[int] = []
    rng = random.Random(args.seed)
    t_begin = time.monotonic()
    try:
        with c.sigterm_as_exit(), c.ProcessSet() as procs:
            trees = {
                v: None if ref is None else unpack_tree(ref, workdir / f"tree-{v}")
                for v, ref in args.variants.items()
            }
            for tree in trees.values():
                if tree is not None:
                    check_tree(venv_of(), tree)
            ports = c.free_ports(max(args.sizes))
            conf = write_nginx(workdir, ports)
            cpus = "1" if args.pin else None
            nginx = procs.start("backends", c.nginx_argv(conf, workdir),
                                workdir / "backends.log", cpus=cpus)
            for p in (ports[0], ports[-1]):
                c.wait_http_ok("127.0.0.1", p, "/", 20.0, proc=nginx)
            nginx_pids = nginx.remember_tree()
            for rnd in range(1, args.rounds + 1):
                order = [(v, m, n) for v in args.variants for m in args.modes for n in args.sizes]
                rng.shuffle(order)
                for v, m, n in order:
                    s = run_one(args, workdir, procs, v, trees[v], m, n, ports, rnd)
                    samples.append(s)
                    print(f"round {rnd} {v:>10} {m:>17} N={n:<5} "
                          f"{s['worker_us_per_req']} us/req  {s['rps']:,.0f} req/s  "
                          f"control {s['control_cores']} cores  errors {s['errors']}  "
                          f"load {s['loadavg_1m']}", flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"workdir kept: {workdir}")
    rows = summarize(samples, args)
    print()
    print(table(rows, args.markdown))
    print(f"\nseed {args.seed}, {len(samples)} runs in {time.monotonic() - t_begin:.0f} s, "
          f"pinned: {args.pin}, health interval {args.interval} s, wrk -c{args.connections} "
          f"-d{args.duration}s after {args.warmup} s warm-up")
    if args.json:
        started = sorted({*nginx_pids, *(p for s in samples for p in s["pids"])})
        args.json.write_text(json.dumps({"samples": samples, "summary": rows,
                                         "seed": args.seed, "started_pids": started}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
