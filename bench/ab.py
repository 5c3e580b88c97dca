#!/usr/bin/env python3
"""A/B of two pairlb trees: worker CPU per request, fresh processes, alternating.

For a change to the proxy that bench/perf.py (one tree per run) cannot pair: each round
starts pairlb from tree A and from tree B (each tree's own ``.venv/bin/pairlb``, so each runs
its own build), in alternating order, behind the same nginx backends, one worker pinned to
CPU 0, wrk and the backends on CPU 1, and reports B's CPU per request over A's per round.
A new process each round: one pairlb process differs from another by up to ~10 % (memory
layout, hash seed), so read the median over 8 or more rounds.

    .venv/bin/python bench/ab.py /work/old /work/new --rounds 10 --size 100

Bounded: each wrk run is ``--seconds`` (+1 s warm-up); every process started is stopped by
PID at the end of its round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as c
import perf


def one(tree: Path, size: int, seconds: int, access_log: str | None) -> tuple[float, float]:
    """(req/s, proxy CPU us per request) of one fresh pairlb from ``tree``."""
    workdir = Path(tempfile.mkdtemp(prefix="pairlb-ab-"))
    with c.ProcessSet() as procs:
        ports = c.free_ports(3)
        c.prepare_nginx_dirs(workdir, "backends")
        bconf = c.write_nginx_backends(workdir, ports, [size])
        be = procs.start("backends", c.nginx_argv(bconf, workdir), workdir / "b.log", cpus="1")
        for p in ports:
            c.wait_http_ok("127.0.0.1", p, "/healthz", 20, proc=be)
        port, admin = c.free_ports(2)
        conf = perf.pairlb_config(workdir, port, admin, ports, 1, access_log, "pairlb")
        lb = procs.start("pairlb", [str(tree / ".venv" / "bin" / "pairlb"), "run", "-c",
                                    str(conf)], workdir / "lb.log", cpus="0")
        url = f"http://127.0.0.1:{port}{c.body_path(size)}"
        c.wait_http_ok("127.0.0.1", port, c.body_path(size), 30, proc=lb, successes=6)
        c.run_wrk(url, 1, connections=50, cpus="1")
        lb.remember_tree()
        t0 = c.tree_cpu_s(lb.pid)
        res = c.run_wrk(url, seconds, connections=50, cpus="1")
        if access_log:
            time.sleep(0.4)  # the last batch of lines belongs to this run
        cpu = c.tree_cpu_s(lb.pid) - t0
    return res.rps, cpu / max(res.requests, 1) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path, help="tree A (has .venv/bin/pairlb)")
    ap.add_argument("b", type=Path, help="tree B")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--size", type=int, default=100, help="response body bytes")
    ap.add_argument("--seconds", type=int, default=6, help="wrk run per measurement")
    ap.add_argument("--access-log", default=None, help="json or combined: the log on in both")
    args = ap.parse_args(argv)
    for tree in (args.a, args.b):
        if not (tree / ".venv" / "bin" / "pairlb").exists():
            ap.error(f"{tree}: no .venv/bin/pairlb (run ./dev setup there)")
    ra: list[tuple[float, float]] = []
    rb: list[tuple[float, float]] = []
    for i in range(args.rounds):
        order = [(args.a, ra), (args.b, rb)] if i % 2 == 0 else [(args.b, rb), (args.a, ra)]
        for tree, acc in order:
            acc.append(one(tree, args.size, args.seconds, args.access_log))
        print(f"round {i}: A {ra[-1][0]:,.0f} req/s {ra[-1][1]:.2f} us, "
              f"B {rb[-1][0]:,.0f} req/s {rb[-1][1]:.2f} us, B/A {rb[-1][1] / ra[-1][1]:.3f}",
              flush=True)
    ratios = [y[1] / x[1] for x, y in zip(ra, rb, strict=True)]
    print(f"A: median {statistics.median(x[1] for x in ra):.2f} us/request, "
          f"{statistics.median(x[0] for x in ra):,.0f} req/s; "
          f"B: median {statistics.median(x[1] for x in rb):.2f} us/request, "
          f"{statistics.median(x[0] for x in rb):,.0f} req/s")
    print(f"B/A CPU per request: median {statistics.median(ratios):.3f}, "
          f"mean {statistics.mean(ratios):.3f}, sd {statistics.pstdev(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
