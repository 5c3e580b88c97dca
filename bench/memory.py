#!/usr/bin/env python3
"""Memory of one pairlb node (control process + N workers), idle and under load, in a cgroup.

What the unit's ``MemoryHigh=``/``MemoryMax=`` are derived from (docs/operations.md,
"Memory"). One real node with ``--backends`` backends (default 3000) in one pool, every one
health-checked over HTTP every ``--interval`` s, in front of ONE nginx listening on all their
ports (the cheapest backend there is). The node runs in a memory cgroup of its own (v1 or
v2, created under this script's cgroup and removed at the end), so the figure is what the
kernel charges the service: anonymous memory, page cache and kernel memory together.

Phases, each measured at its end: **idle** (``--settle`` s after the node is ready), **load**
(``wrk -c --connections`` through the listener for ``--duration`` s while /metrics and
/status are fetched every second, as Prometheus and an operator would). Reported per worker
count (``--workers 1,2,4``): cgroup usage (total and its anon/cache split where the kernel
says), the cgroup's peak, and the RSS and peak RSS (VmHWM) of the control process and of
each worker.

    sudo .venv/bin/python bench/memory.py                      # 3000 backends, 1/2/4 workers
    sudo .venv/bin/python bench/memory.py --backends 50 --duration 5 --settle 2   # smoke

Root is needed for the cgroup (without it only per-process RSS is reported). Every process
is started by this script and stopped by PID; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as c

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", type=int, default=3000)
    ap.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    ap.add_argument("--interval", type=float, default=1.0, help="health-check interval, s")
    ap.add_argument("--settle", type=float, default=15.0, help="idle time before measuring")
    ap.add_argument("--duration", type=int, default=30, help="load phase, s")
    ap.add_argument("--connections", type=int, default=256)
    ap.add_argument("--pairlb", default=str(REPO / ".venv" / "bin" / "pairlb"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", action="store_true")
    return ap.parse_args(argv)


# -- a memory cgroup of our own ----------------------------------------------------------------


class Cgroup:
    """A fresh memory cgroup (v2 if this process is in a v2 hierarchy with the memory
    controller, else v1); ``None`` paths when that is not possible."""

    def __init__(self, name: str) -> None:
        self.path: Path | None = None
        self.v2 = False
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        v1 = [ln.split(":", 2)[2] for ln in lines if "memory" in ln.split(":", 2)[1].split(",")]
        v2 = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
        candidates: list[tuple[Path, bool]] = []
        if v1:
            candidates.append((Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/"), False))
        if v2:
            for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                ctl = root / "cgroup.controllers"
                if ctl.exists() and "memory" in ctl.read_text().split():
                    candidates.append((root / v2[0].lstrip("/"), True))
        for parent, is_v2 in candidates:
            p = parent / name
            try:
                p.mkdir()
            except OSError:
                continue
            self.path, self.v2 = p, is_v2
            return

    def read(self, v1: str, v2: str) -> int | None:
        if self.path is None:
            return None
        try:
            return int((self.path / (v2 if self.v2 else v1)).read_text().split()[0])
        except (OSError, ValueError):
            return None

    def usage(self) -> int | None:
        return self.read("memory.usage_in_bytes", "memory.current")

    def peak(self) -> int | None:
        return self.read("memory.max_usage_in_bytes", "memory.peak")

    def reset_peak(self) -> None:
        if self.path is not None and not self.v2:
            with contextlib.suppress(OSError):
                (self.path / "memory.max_usage_in_bytes").write_text("0")

    def stat(self) -> dict[str, int]:
        if self.path is None:
            return {}
        out = {}
        with contextlib.suppress(OSError):
            for line in (self.path / "memory.stat").read_text().splitlines():
                k, _, v = line.partition(" ")
                out[k] = int(v)
        return out

    def split(self) -> dict[str, int]:
        """anon / file (page cache) / kernel, as far as this cgroup version tells."""
        st = self.stat()
        if self.v2:
            return {"anon": st.get("anon", 0), "file": st.get("file", 0),
                    "kernel": st.get("kernel", st.get("slab", 0) + st.get("sock", 0))}
        kmem = self.read("memory.kmem.usage_in_bytes", "") or 0
        return {"anon": st.get("rss", 0), "file": st.get("cache", 0), "kernel": kmem}

    def remove(self) -> None:
        if self.path is None:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


# -- the node ----------------------------------------------------------------------------------


def write_nginx(workdir: Path, ports: list[int]) -> Path:
    name = "backends"
    c.prepare_nginx_dirs(workdir, name)
    listens = "".join(f"        listen 127.0.0.1:{p} backlog=512;\n" for p in ports)
    text = (
        c.nginx_head(1, workdir, name)
        + "http {\n" + c._NGINX_TEMP.format(dir=workdir, name=name)
        + "    access_log off;\n    keepalive_requests 100000000;\n    server {\n" + listens
        + '        location / { return 200 "0123456789abcdef0123456789abcdef"; }\n'
        + "    }\n}\n"
    )
    conf = workdir / f"{name}.conf"
    conf.write_text(text)
    return conf


def pairlb_config(port: int, admin_port: int, ports: list[int], workers: int,
                  interval: float) -> str:
    backends = ",\n".join(
        f'  {{ name = "b{i}", address = "127.0.0.1:{p}" }}' for i, p in enumerate(ports)
    )
    return f"""
[node]
name = "mem"
workers = {workers}
shutdown_timeout_s = 2.0

[[listener]]
name = "web"
bind = "127.0.0.1:{port}"
pool = "web"

[[pool]]
name = "web"
backends = [
{backends}
]

[pool.health]
interval_s = {interval}
timeout_s = {min(0.5, interval)}

[admin]
bind = "127.0.0.1:{admin_port}"

[logging]
level = "warning"
"""


def proc_mem(root: int) -> dict[str, Any]:
    tree = c.tree_mem(root)
    if not tree:
        return {}
    control, workers = tree[0], tree[1:]
    return {
        "control_rss_mb": control.rss_kb / 1024,
        "control_hwm_mb": control.hwm_kb / 1024,
        "worker_rss_mb": [w.rss_kb / 1024 for w in workers],
        "worker_hwm_mb": [w.hwm_kb / 1024 for w in workers],
        "sum_rss_mb": sum(p.rss_kb for p in tree) / 1024,
    }


def scrape(admin_port: int, stop: threading.Event, sizes: dict[str, int]) -> None:
    while not stop.is_set():
        for path in ("/metrics", "/status"):
            conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn.request("GET", path)
                sizes[path] = max(sizes.get(path, 0), len(conn.getresponse().read()))
            conn.close()
        stop.wait(1.0)


def run_one(args: argparse.Namespace, workers: int, ports: list[int], procs: c.ProcessSet,
            workdir: Path) -> dict[str, Any]:
    port, admin_port = c.free_ports(2)
    conf = workdir / f"pairlb-{workers}.toml"
    conf.write_text(pairlb_config(port, admin_port, ports, workers, args.interval))
    cg = Cgroup(f"plbmem{os.getpid()}w{workers}")
    procs_file = None
    if cg.path is not None:
        procs_file = cg.path / "cgroup.procs"
    argv = [args.pairlb, "run", "-c", str(conf)]
    if procs_file is not None:
        argv = ["sh", "-c", f'echo $$ > {procs_file} && exec "$@"', "sh", *argv]
    node = procs.start(f"pairlb-{workers}", argv, workdir / f"pairlb-{workers}.log")
    row: dict[str, Any] = {"workers": workers, "cgroup": "v2" if cg.v2 else
                           ("v1" if cg.path else None)}
    try:
        c.wait_http_ok("127.0.0.1", port, "/", 60, proc=node)
        time.sleep(args.settle)
        row["idle"] = {"cgroup_mb": _mb(cg.usage()),
                       **{k + "_mb": v / 2**20 for k, v in cg.split().items()},
                       **proc_mem(node.pid)}
        cg.reset_peak()
        stop = threading.Event()
        sizes: dict[str, int] = {}
        scraper = threading.Thread(target=scrape, args=(admin_port, stop, sizes), daemon=True)
        scraper.start()
        peak_usage = 0
        sampler_stop = threading.Event()

        def sample() -> None:
            nonlocal peak_usage
            while not sampler_stop.is_set():
                peak_usage = max(peak_usage, cg.usage() or 0)
                sampler_stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        wrk = c.run_wrk(f"http://127.0.0.1:{port}/", args.duration,
                        connections=args.connections, threads=2)
        stop.set()
        sampler_stop.set()
        scraper.join(15)
        sampler.join(5)
        row["load"] = {
            "cgroup_mb": _mb(cg.usage()),
            "cgroup_peak_mb": _mb(cg.peak() or peak_usage or None),
            **{k + "_mb": v / 2**20 for k, v in cg.split().items()},
            **proc_mem(node.pid),
            "rps": wrk.rps,
            "errors": wrk.errors,
            "metrics_bytes": sizes.get("/metrics"),
            "status_bytes": sizes.get("/status"),
        }
    finally:
        procs.stop(node)
        cg.remove()
    return row


def _mb(v: int | None) -> float | None:
    return None if v is None else v / 2**20


def _f(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return "/".join(f"{x:.0f}" for x in v)
    return f"{v:.0f}"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (
        f"Measured {time.strftime('%Y-%m-%d')} on {platform.node()} ({os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}), {args.backends} backends health-checked every "
        f"{args.interval:g} s, load: wrk -t2 -c{args.connections} for {args.duration} s with "
        f"/metrics and /status fetched every second. MB = MiB. Rerun: `sudo .venv/bin/python "
        f"bench/memory.py --markdown`.\n\n"
        "| workers | phase | cgroup total | cgroup peak | anon | page cache | kernel | "
        "control RSS (peak) | worker RSS each (peak) | req/s |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        for phase in ("idle", "load"):
            m = r.get(phase, {})
            lines.append(
                f"| {r['workers']} | {phase} | {_f(m.get('cgroup_mb'))} | "
                f"{_f(m.get('cgroup_peak_mb'))} | {_f(m.get('anon_mb'))} | "
                f"{_f(m.get('file_mb'))} | {_f(m.get('kernel_mb'))} | "
                f"{_f(m.get('control_rss_mb'))} ({_f(m.get('control_hwm_mb'))}) | "
                f"{_f(m.get('worker_rss_mb'))} ({_f(m.get('worker_hwm_mb'))}) | "
                f"{_f(m.get('rps')) if phase == 'load' else '-'} |"
            )
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("nginx") is None or shutil.which("wrk") is None:
        print("needs nginx and wrk (./dev setup installs them)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="plb-mem-"))
    workdir.chmod(0o755)
    rows = []
    with c.sigterm_as_exit(), c.ProcessSet() as procs:
        ports = c.free_ports(args.backends)
        conf = write_nginx(workdir, ports)
        backends = procs.start("nginx", c.nginx_argv(conf, workdir), workdir / "nginx.log")
        for p in (ports[0], ports[-1]):
            c.wait_http_ok("127.0.0.1", p, "/", 30, proc=backends)
        for n in (int(x) for x in args.workers.split(",")):
            row = run_one(args, n, ports, procs, workdir)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=2))
    if args.markdown:
        print(markdown(rows, args))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
