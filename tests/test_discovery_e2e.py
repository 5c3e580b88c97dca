"""A pool found in DNS, on a real node, while its records change under load: dnsmasq in a
namespace of its own (lab.dns), pairlb, its backends, an open-loop client (lab.load) and a
/metrics scraper in the namespace next to it. Scaling up by two and down by two through DNS
fails no request; the DNS server dying keeps the last good set, counted and exported.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import PYTHON, ROOT, parse_metrics, total

from lab import dns as dnslab
from lab.load import RecordLog

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(dnslab.skip_reason() is not None, reason=dnslab.skip_reason() or ""),
    pytest.mark.timeout(150),
]

LISTEN = 8000
ADMIN = 9900
BACKEND_PORT = 8080
ADDRS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
HELPERS = ROOT / "bench" / "chaos_helpers.py"
MIN_LOAD_S = 8.0
"""The load runs at least this long (1200 requests at 150/s), and 1 s past the last change:
its --duration (11 s) is only a bound, and the changes are over in 6-7 s."""


def config(lab: dnslab.DnsLab, tmp: Path) -> str:
    return f"""\
[node]
name = "dnsnode"
workers = 2
shutdown_timeout_s = 2.0
state_dir = "{tmp / 'state'}"

[[listener]]
name = "web"
bind = "127.0.0.1:{LISTEN}"
pool = "web"

[[pool]]
name = "web"
drain_timeout_s = 5.0

[pool.discovery]
type = "dns"
name = "web.{dnslab.DOMAIN}"
record = "A"
port = {BACKEND_PORT}
resolvers = ["{lab.resolver}"]
min_ttl_s = 0.5
max_ttl_s = 2.0
timeout_s = 0.5

[pool.health]
interval_s = 0.2
timeout_s = 0.2
rise = 1
fall = 2

[admin]
bind = "127.0.0.1:{ADMIN}"
"""


def get(lab: dnslab.DnsLab, path: str) -> Any:
    def inside() -> tuple[int, bytes]:
        from lb.admin import client

        status, _, raw = client.exchange("GET", f"http://127.0.0.1:{ADMIN}{path}",
                                         timeout_s=3.0)
        return status, raw

    status, raw = lab.topo.call("cli", inside)
    assert status == 200, (status, raw[:300])
    return raw if path == "/metrics" else json.loads(raw)


def pool(lab: dnslab.DnsLab) -> dict[str, Any]:
    st = get(lab, "/status")
    found: dict[str, Any] = st["pools"][0]
    return found


def in_rotation(lab: dnslab.DnsLab) -> set[str]:
    return {b["address"].split(":")[0] for b in pool(lab)["backends"] if b["in_rotation"]}


def wait(what: str, cond: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
        except OSError as exc:  # not listening yet
            last = repr(exc)
        else:
            if last:
                return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last {last!r})")


def test_dns_records_changing_under_load_fail_no_request(tmp_path: Path) -> None:
    with dnslab.dns_lab(local_ttl=1) as lab:
        topo = lab.topo
        lab.set_hosts({"web": ADDRS[:2]})
        procs: list[subprocess.Popen[bytes]] = []
        log = open(tmp_path / "pairlb.log", "ab")  # noqa: SIM115 - closed in finally
        try:
            for i, addr in enumerate(ADDRS):
                procs.append(topo.popen("cli", [PYTHON, "-m", "lab.backend_app", f"b{i}",
                                                f"{addr}:{BACKEND_PORT}"], cwd=ROOT,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            cfg = tmp_path / "pairlb.toml"
            cfg.write_text(config(lab, tmp_path))
            lb = topo.popen("cli", [PYTHON, "-m", "lb", "run", "-c", str(cfg)], cwd=ROOT,
                            stdout=log, stderr=log)
            procs.append(lb)
            wait("both DNS backends in rotation", lambda: in_rotation(lab) == set(ADDRS[:2]),
                 20)
            assert {b["source"] for b in pool(lab)["backends"]} == {"dns"}
            out = tmp_path / "load.txt"
            client = topo.popen("cli", [PYTHON, "-m", "lab.load", f"127.0.0.1:{LISTEN}",
                                        str(out), "--rate", "150", "--duration", "11",
                                        "--max-requests", "5000"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(client)
            t_load = time.monotonic()
            scraper = topo.popen("cli", [PYTHON, str(HELPERS), "scrape",
                                         str(tmp_path / "scrapes.txt"), "--port", str(ADMIN),
                                         "--paths", "/metrics", "--every", "0.5", "--duration",
                                         "20", "--max", "60", "--timeout", "2"], cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(scraper)
            time.sleep(1)
            t_up = time.monotonic()
            lab.set_hosts({"web": ADDRS})  # up by two
            wait("four backends in rotation", lambda: in_rotation(lab) == set(ADDRS), 10)
            lag_up = time.monotonic() - t_up
            time.sleep(1)
            lab.set_hosts({"web": ADDRS[2:]})  # down by two: they drain, then leave
            wait("the first two gone", lambda: {b["address"].split(":")[0] for b in
                                                pool(lab)["backends"]} == set(ADDRS[2:]), 15)
            time.sleep(1)
            lab.stop_server()  # the DNS server dies: the last good set stays
            wait("the failure counted", lambda: (pool(lab)["discovery"] or {}).get(
                "consecutive_failures", 0) >= 1, 10)
            assert in_rotation(lab) == set(ADDRS[2:])
            m = parse_metrics(get(lab, "/metrics").decode())
            assert total(m, "pairlb_discovery_up", pool="web") == 0
            assert total(m, "pairlb_discovery_failures_total", pool="web") >= 1
            assert total(m, "pairlb_discovery_backends", pool="web") == 2
            lab.start_server()
            wait("discovery back up", lambda: (pool(lab)["discovery"] or {}).get(
                "consecutive_failures") == 0, 10)
            time.sleep(max(1.0, t_load + MIN_LOAD_S - time.monotonic()))
            client.terminate()  # SIGTERM: it sends no more and waits for what is in flight
            client.wait(40)
            records = RecordLog(out).poll()
            failed = [r for r in records if not r.ok]
            assert len(records) > 1000, len(records)
            assert failed == [], (len(failed), failed[:5])
            by = Counter(r.backend for r in records)
            assert all(by[f"b{i}"] > 30 for i in range(4)), by
            scrapes = (tmp_path / "scrapes.txt").read_text().splitlines()
            assert len(scrapes) >= 8 and all(line.split()[3] == "200" for line in scrapes[2:])
            print(f"\nDNS scale up seen in rotation {lag_up:.2f} s after the records changed;"
                  f" {len(records)} requests, 0 failed; per backend {dict(by)}")
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
            log.close()
