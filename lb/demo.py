"""``pairlb demo``: pairlb on its embedded default config, in front of demo backends it starts.

This is the loopback demo: three backends on 127.0.0.1:9001-9003 and one pairlb node on
127.0.0.1:8080, nothing written to disk. It prints where to point curl, shows a few requests
spread by weight, and runs until ``--duration`` ends or Ctrl-C; everything it started is
stopped by PID on the way out.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import signal
import subprocess
import sys
import time
from collections import Counter

from lb import config as config_mod

BACKENDS = [("web1", "127.0.0.1:9001"), ("web2", "127.0.0.1:9002"), ("web3", "127.0.0.1:9003")]


def _get(host: str, port: int, path: str = "/", timeout_s: float = 1.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("X-Backend") or ""
    finally:
        conn.close()


def _wait_http(host: str, port: int, path: str, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            if _get(host, port, path, 0.5)[0] == 200:
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(args: argparse.Namespace) -> int:
    cfg = config_mod.loads(config_mod.DEFAULT_CONFIG_TOML)
    host, port = cfg.listener[0].host_port
    procs: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        for name, addr in BACKENDS:
            procs.append(
                subprocess.Popen([sys.executable, "-m", "lb.backend_app", name, addr], env=env)
            )
        for _, addr in BACKENDS:
            bh, bp = config_mod.parse_hostport(addr)
            if not _wait_http(bh, bp, "/healthz", 10):
                print(f"demo: backend {addr} did not start (is the port in use?)", file=sys.stderr)
                return 1
        procs.append(subprocess.Popen([sys.executable, "-m", "lb", "run"], env=env))
        if not _wait_http(host, port, "/", 15):
            print(f"demo: pairlb did not answer on {host}:{port}", file=sys.stderr)
            return 1
        # Backends start DOWN until their first passing check; give them a moment.
        end = time.monotonic() + 5
        seen: Counter[str] = Counter()
        while time.monotonic() < end and len(seen) < 3:
            seen.clear()
            for _ in range(8):
                status, backend = _get(host, port)
                if status == 200:
                    seen[backend] += 1
            time.sleep(0.2)
        print()
        print(f"pairlb is serving on http://{host}:{port}/ in front of {len(BACKENDS)} backends")
        print(f"  try:  curl -si http://{host}:{port}/   (X-Backend says who answered)")
        print(f"  8 requests went to: {dict(sorted(seen.items()))} (web2 has weight 2)")
        print(
            "  Ctrl-C stops everything."
            if not args.duration
            else f"  stopping in {args.duration:.0f} s"
        )
        print(flush=True)
        end = time.monotonic() + args.duration if args.duration else float("inf")
        while time.monotonic() < end:
            if any(p.poll() is not None for p in procs):
                print("demo: a process exited early", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if not getattr(args, "keep", False):
            _stop(list(reversed(procs)))
