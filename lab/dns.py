"""A real DNS server for discovery tests and benchmarks: dnsmasq in a throw-away namespace.

``with dns_lab(local_ttl=1) as lab:`` builds two namespaces with lab.netns (``plbXXXX-dns``
runs dnsmasq, ``plbXXXX-cli`` is where the code under test resolves from; both on one bridge,
IPv4 from TEST-NET-1 and a random ULA /64), starts dnsmasq, and on exit kills the dnsmasq it
started (by PID) and removes the namespaces, also when the test failed. Nothing is added to
the root namespace: the test process reaches the server from a thread inside ``cli``
(:meth:`DnsLab.loop` is an event loop living there, uvloop or asyncio; :meth:`DnsLab.query`
asks once, blocking).

Records, and how fast a change is served (measured with dnsmasq 2.90, Debian 12):

- A/AAAA: :meth:`DnsLab.set_hosts` writes a hosts file into dnsmasq's ``hostsdir=``, atomically
  (written in a sibling directory, then renamed in: dnsmasq would read a temp file inside the
  hostsdir too). dnsmasq sees it through inotify, no signal: the next query after the rename
  already gets the new set (under 1 ms). A name no file holds is NXDOMAIN (``local=``).
- SRV: dnsmasq serves SRV only from ``srv-host=`` in its config, and SIGHUP re-reads hosts
  files but never the config (``man dnsmasq``). :meth:`DnsLab.set_srv` therefore rewrites the
  config and restarts dnsmasq (SIGTERM, wait, start, wait until it answers): a gap of a few
  ms (returned) in which a query goes unanswered, i.e. a discovery ``timeout`` if it falls
  there. unbound's ``unbound-control local_data`` would change SRV without a gap, at the
  price of a second server package; the gap is a failure discovery must survive anyway.
- ``local_ttl`` is the TTL of every answer (dnsmasq's default is 0); :meth:`DnsLab.restart`
  changes it. Queries are logged (``log_queries``) so a test can count them
  (:meth:`DnsLab.query_count`).
- :meth:`DnsLab.stop_server` / :meth:`DnsLab.start_server` kill and bring back dnsmasq;
  :class:`StubDns` is a one-line DNS server that answers every query with a fixed rcode
  (SERVFAIL, REFUSED, NOERROR without records) or never answers, for the failures dnsmasq
  cannot be made to give.

``python -m lab.dns bench`` measures discovery's cost (CPU per resolution on both loops, a
3,000-name round) and the lag from a record change to the discovery callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.resolver

from lab import netns

DOMAIN = "svc.test"
"""The zone dnsmasq answers for (``local=``): names under it that no file holds are NXDOMAIN;
names outside it are REFUSED (no upstream)."""
START_TIMEOUT_S = 5.0


def skip_reason() -> str | None:
    """Why these tests cannot run here, or None."""
    why = netns.skip_reason()
    if why:
        return why
    if shutil.which("dnsmasq") is None and not os.path.exists("/usr/sbin/dnsmasq"):
        return "dnsmasq not installed (Debian: apt-get install dnsmasq-base)"
    return None


def _dnsmasq() -> str:
    return shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


@dataclass(frozen=True)
class Srv:
    """One SRV record: ``srv-host=name,target,port,priority,weight``."""

    target: str
    port: int
    priority: int = 0
    weight: int = 0


@dataclass
class DnsLab:
    """dnsmasq on ``dns``, resolvers on ``cli`` (module docstring)."""

    topo: netns.Topology
    workdir: Path
    local_ttl: int = 1
    log_queries: bool = True
    srv: dict[str, list[Srv]] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    _loops: list[netns.NetnsLoop] = field(default_factory=list)
    _stubs: list[StubDns] = field(default_factory=list)
    _closed: bool = False

    # -- addresses

    @property
    def server4(self) -> str:
        return self.topo["dns"].ipv4

    @property
    def server6(self) -> str:
        ip = self.topo["dns"].ipv6
        assert ip is not None
        return ip

    @property
    def resolver(self) -> str:
        """``ip:port`` of dnsmasq for DnsSpec.resolvers."""
        return f"{self.server4}:53"

    @property
    def resolver6(self) -> str:
        return f"[{self.server6}]:53"

    @property
    def hostsdir(self) -> Path:
        return self.workdir / "hostsdir"

    @property
    def logfile(self) -> Path:
        return self.workdir / "dnsmasq.log"

    # -- records

    def set_hosts(self, records: Mapping[str, Iterable[str]], file: str = "pool") -> None:
        """Replace one hosts file: ``{"web.svc.test": ["10.0.0.1", "fd00::1"], ...}``
        (names without a domain get ``.svc.test``). Served from the next query on."""
        lines = []
        for name, addrs in records.items():
            fq = name if "." in name else f"{name}.{DOMAIN}"
            lines += [f"{a} {fq}\n" for a in addrs]
        staging = self.workdir / "staging"
        tmp = staging / f"{file}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text("".join(lines))
        os.replace(tmp, self.hostsdir / file)

    def remove_hosts(self, file: str = "pool") -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.hostsdir / file).unlink()

    def set_srv(self, name: str, records: Sequence[Srv]) -> float:
        """Replace the SRV records of `name` (empty: none; the name then is NXDOMAIN unless a
        hosts file holds it). Restarts dnsmasq; returns the gap in seconds."""
        self.srv[name] = list(records)
        return self.restart()

    # -- the server

    def _config(self) -> str:
        addrs = [self.server4, self.server6]
        lines = [
            "no-resolv", "no-hosts", "keep-in-foreground", "bind-interfaces", "user=root",
            "pid-file=", f"listen-address={','.join(addrs)}", "port=53",
            f"hostsdir={self.hostsdir}", f"local-ttl={self.local_ttl}", f"local=/{DOMAIN}/",
            f"log-facility={self.logfile}", "cache-size=0",
        ]
        if self.log_queries:
            lines.append("log-queries")
        for name, recs in self.srv.items():
            if not recs:
                continue
            for r in recs:
                lines.append(f"srv-host={name},{r.target},{r.port},{r.priority},{r.weight}")
        return "".join(line + "\n" for line in lines)

    def start_server(self) -> float:
        """Start dnsmasq and wait until it answers; returns how long that took."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("dnsmasq already running")
        conf = self.workdir / "dnsmasq.conf"
        conf.write_text(self._config())
        t0 = time.monotonic()
        self.proc = self.topo.popen(
            "dns", [_dnsmasq(), f"--conf-file={conf}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = t0 + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise netns.NetnsError(f"dnsmasq exited {self.proc.returncode}: {err.strip()}")
            if self._answers():
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise netns.NetnsError("dnsmasq did not answer within "
                                       f"{START_TIMEOUT_S}s")
            time.sleep(0.001)

    def stop_server(self) -> None:
        """Kill the dnsmasq this lab started (only that PID)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        if not _wait_exit(proc, 2.0):
            proc.kill()
            proc.wait(timeout=2.0)
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(self, local_ttl: int | None = None) -> float:
        """Stop and start dnsmasq (new config); returns the gap: stop begun to answering."""
        if local_ttl is not None:
            self.local_ttl = local_ttl
        t0 = time.monotonic()
        self.stop_server()
        self.start_server()
        return time.monotonic() - t0

    def _answers(self) -> bool:
        """Does dnsmasq answer yet (any answer, even NXDOMAIN)?"""
        wire = dns.message.make_query(f"ready.{DOMAIN}", "A").to_wire()

        def ask() -> bool:
            # connected: a closed port fails at once (ECONNREFUSED), no timeout to wait out
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(0.2)
                try:
                    s.connect((self.server4, 53))
                    s.send(wire)
                    s.recv(4096)
                except OSError:
                    return False
            return True

        return self.topo.call("cli", ask)

    # -- the client side

    def loop(self, kind: str = "asyncio") -> netns.NetnsLoop:
        """An event loop on a thread inside ``cli`` (``asyncio`` or ``uvloop``); closed by
        teardown."""
        if kind == "asyncio":
            lp = netns.NetnsLoop(self.topo["cli"].netns)
        elif kind == "uvloop":
            import uvloop

            lp = _FactoryNetnsLoop(self.topo["cli"].netns, uvloop.new_event_loop)
        else:
            raise ValueError(f"loop kind {kind!r}: asyncio or uvloop")
        self._loops.append(lp)
        return lp

    def query(self, name: str, rdtype: str = "A", *, timeout_s: float = 1.0) -> list[str]:
        """Ask dnsmasq once from ``cli`` (blocking); [] for NODATA, NXDOMAIN raises."""

        def ask() -> list[str]:
            r = dns.resolver.Resolver(configure=False)
            r.nameservers = [self.server4]
            r.lifetime = timeout_s
            ans = r.resolve(name, rdtype, search=False, raise_on_no_answer=False)
            return [] if ans.rrset is None else sorted(str(x) for x in ans.rrset)

        return self.topo.call("cli", ask)

    def query_count(self, name: str, rdtype: str = "A") -> int:
        """Queries dnsmasq logged for name/type so far (needs log_queries)."""
        try:
            text = self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return 0
        needle = f" query[{rdtype}] {name} from "
        return text.count(needle)

    def stub(self, rcode: str, port: int) -> StubDns:
        """A :class:`StubDns` on the server's address, ``port``; closed by teardown."""
        s = StubDns(self.topo["dns"].netns, self.server4, port, rcode)
        self._stubs.append(s)
        return s

    # -- teardown

    def teardown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for lp in self._loops:
                lp.close()
            for s in self._stubs:
                s.close()
            self.stop_server()
        finally:
            try:
                self.topo.teardown()
            finally:
                shutil.rmtree(self.workdir, ignore_errors=True)


def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Wait for the process to exit, woken by its pidfd (Popen.wait polls in steps of up
    to 50 ms, which would count towards the measured restart gap)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (OSError, AttributeError):
        fd = -1
    try:
        if fd >= 0:
            select.select([fd], [], [], timeout_s)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return False
    finally:
        if fd >= 0:
            os.close(fd)
    return True


class _FactoryNetnsLoop(netns.NetnsLoop):
    """lab.netns.NetnsLoop with a loop of our choosing (uvloop)."""

    def __init__(self, ns: str, factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.netns = ns
        self._loop = factory()
        started: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._main, args=(started,), name=f"netns-loop-{ns}", daemon=True,
        )
        self._thread.start()
        started.result(timeout=5.0)


class StubDns:
    """A UDP DNS server that answers every query with ``rcode`` (``SERVFAIL``, ``REFUSED``,
    ``NOERROR`` = no records) or, with ``"drop"``, never. Runs on a loop inside ``netns``."""

    def __init__(self, ns: str, host: str, port: int, rcode: str) -> None:
        self.rcode = rcode
        self.queries = 0
        self._lp = netns.NetnsLoop(ns)
        self._transport: asyncio.DatagramTransport | None = None
        self._lp.run(self._start(host, port))

    async def _start(self, host: str, port: int) -> None:
        stub = self

        class Proto(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                stub._transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
                stub.queries += 1
                if stub.rcode == "drop" or stub._transport is None:
                    return
                try:
                    q = dns.message.from_wire(data)
                except Exception:
                    return
                r = dns.message.make_response(q)
                r.set_rcode(dns.rcode.from_text(stub.rcode))
                stub._transport.sendto(r.to_wire(), addr)

        await asyncio.get_running_loop().create_datagram_endpoint(
            Proto, local_addr=(host, port))

    def close(self) -> None:
        async def _close() -> None:
            if self._transport is not None:
                self._transport.close()

        with contextlib.suppress(Exception):
            self._lp.run(_close(), timeout_s=2.0)
        self._lp.close()


def build(*, local_ttl: int = 1, log_queries: bool = True,
          srv: Mapping[str, Sequence[Srv]] | None = None) -> DnsLab:
    """Namespaces and a running dnsmasq; everything is removed again if any step fails."""
    topo = netns.build(["dns", "cli"], ipv6=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{topo.prefix}-dns-"))
    lab = DnsLab(topo=topo, workdir=workdir, local_ttl=local_ttl, log_queries=log_queries,
                 srv={k: list(v) for k, v in (srv or {}).items()})
    try:
        # Port-unreachable for every probe while dnsmasq restarts (the kernel would send one
        # a second per destination): the start-up probe then never waits out a timeout.
        topo.sysctl("dns", {"net/ipv4/icmp_ratelimit": "0", "net/ipv6/icmp/ratelimit": "0"})
        (workdir / "hostsdir").mkdir()
        (workdir / "staging").mkdir()
        lab.start_server()
    except BaseException:
        lab.teardown()
        raise
    return lab


@contextlib.contextmanager
def dns_lab(**kwargs: Any) -> Iterator[DnsLab]:
    """``with dns_lab(local_ttl=1) as lab:`` (see :func:`build`)."""
    lab = build(**kwargs)
    try:
        yield lab
    finally:
        lab.teardown()


# -- measurements ----------------------------------------------------------------------------


def _cpu_of_round(lab: DnsLab, kind: str, names: int, in_flight: int) -> dict[str, float]:
    """Resolve `names` names once through Discovery runners (refresh_once) on a loop of
    `kind`; CPU time of the loop's thread."""
    from lb.control import discovery as disc

    lp = lab.loop(kind)
    changes = 0

    def on_change(pool: str, backends: list[tuple[str, str, int]], source: str) -> None:
        nonlocal changes
        changes += 1

    runners = [
        disc.Discovery(f"p{i}", disc.DnsSpec(f"n{i:04d}.{DOMAIN}", port=80,
                                            resolvers=(lab.resolver,)), on_change)
        for i in range(names)
    ]

    async def go() -> tuple[float, float]:
        sem = asyncio.Semaphore(in_flight)

        async def one(r: disc.Discovery) -> None:
            async with sem:
                await r.refresh_once()

        c0, w0 = time.thread_time(), time.monotonic()
        await asyncio.gather(*(one(r) for r in runners))
        return time.thread_time() - c0, time.monotonic() - w0

    cpu, wall = lp.run(go(), timeout_s=120.0)
    failures = sum(r.status()["failures_total"] for r in runners)
    lp.close()
    return {"names": names, "cpu_s": cpu, "wall_s": wall, "cpu_per_resolution_us":
            cpu / names * 1e6, "failures": failures, "changes": changes}


def _lag(lab: DnsLab, kind: str, rounds: int, min_ttl_s: float, max_ttl_s: float,
         ) -> list[float]:
    """Record change (rename into hostsdir) -> discovery callback, `rounds` times."""
    from lb.control import discovery as disc

    lp = lab.loop(kind)
    seen: list[tuple[float, list[tuple[str, str, int]]]] = []
    cond = threading.Condition()

    def on_change(pool: str, backends: list[tuple[str, str, int]], source: str) -> None:
        with cond:
            seen.append((time.monotonic(), backends))
            cond.notify_all()

    lab.set_hosts({"lag": ["10.9.0.1"]}, file="lag")
    spec = disc.DnsSpec(f"lag.{DOMAIN}", port=80, resolvers=(lab.resolver,),
                        min_ttl_s=min_ttl_s, max_ttl_s=max_ttl_s)
    r = disc.Discovery("lag", spec, on_change)

    async def start() -> None:
        r.start()

    lp.run(start())
    lags = []

    def wait_calls(n: int, timeout_s: float) -> bool:
        with cond:
            return cond.wait_for(lambda: len(seen) >= n, timeout=timeout_s)

    for i in range(rounds):
        wait_calls(i + 1, 10.0)
        time.sleep(random.uniform(0, max_ttl_s))  # change at any phase of the refresh cycle
        t0 = time.monotonic()
        lab.set_hosts({"lag": ["10.9.0.1", f"10.9.1.{i + 1}"]}, file="lag")
        if not wait_calls(i + 2, max_ttl_s * 3 + 5):
            raise RuntimeError("no callback after a record change")
        lags.append(seen[i + 1][0] - t0)

    async def stop() -> None:
        await r.stop()

    lp.run(stop())
    lp.close()
    return lags


def _steady(lab: DnsLab, kind: str, names: int, ttl_s: float, window_s: float,
            ) -> dict[str, float]:
    """`names` runners (TTL ttl_s, first refreshes spread over one TTL) running for
    window_s after their first round: the loop thread's CPU share and the queries made."""
    from lb.control import discovery as disc

    lp = lab.loop(kind)
    runners = [
        disc.Discovery(f"p{i}", disc.DnsSpec(f"n{i:04d}.{DOMAIN}", port=80,
                                            resolvers=(lab.resolver,)), lambda *a: None)
        for i in range(names)
    ]

    async def start() -> None:
        for i, r in enumerate(runners):
            r.start(initial_delay_s=ttl_s * i / names)

    async def sample() -> tuple[float, float]:
        return time.thread_time(), time.monotonic()

    async def stop() -> None:
        for r in runners:
            await r.stop()

    lp.run(start())
    time.sleep(ttl_s * 1.05)  # every runner has made its first round
    q0 = sum(r.status()["resolutions_total"] for r in runners)
    c0, w0 = lp.run(sample())
    time.sleep(window_s)
    c1, w1 = lp.run(sample())
    q1 = sum(r.status()["resolutions_total"] for r in runners)
    failures = sum(r.status()["failures_total"] for r in runners)
    lp.run(stop(), timeout_s=60)
    lp.close()
    return {"names": names, "ttl_s": ttl_s, "window_s": round(w1 - w0, 2),
            "queries": q1 - q0, "cpu_s": round(c1 - c0, 3),
            "cpu_pct_of_a_core": round((c1 - c0) / (w1 - w0) * 100, 2),
            "cpu_per_resolution_us": round((c1 - c0) / max(1, q1 - q0) * 1e6, 1),
            "failures": failures}


def bench(argv: Sequence[str]) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m lab.dns bench")
    ap.add_argument("--names", type=int, default=3000)
    ap.add_argument("--in-flight", type=int, default=100)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lag-rounds", type=int, default=6)
    ap.add_argument("--steady-s", type=float, default=0.0,
                    help="also run --names runners at TTL 30 s for this long (e.g. 60)")
    args = ap.parse_args(argv)
    why = skip_reason()
    if why:
        print(f"cannot run: {why}")
        return 2
    out: dict[str, Any] = {}
    with dns_lab(local_ttl=30, log_queries=False) as lab:
        lab.set_hosts({f"n{i:04d}": [f"10.{1 + i // 65536}.{i // 256 % 256}.{i % 256}"]
                       for i in range(args.names)}, file="bench")
        for kind in ("asyncio", "uvloop"):
            best = min((_cpu_of_round(lab, kind, args.names, args.in_flight)
                        for _ in range(args.runs)), key=lambda x: x["cpu_s"])
            best["cpu_share_every_30s_pct"] = best["cpu_s"] / 30 * 100
            out[kind] = best
        out["lag_s"] = {
            f"{kind} ttl {lo:g}-{hi:g}s": sorted(round(x, 4) for x in
                                              _lag(lab, kind, args.lag_rounds, lo, hi))
            for kind in ("asyncio", "uvloop") for lo, hi in ((0.05, 0.2), (0.2, 1.0))
        }
        if args.steady_s > 0:
            out["steady"] = {kind: _steady(lab, kind, args.names, 30.0, args.steady_s)
                             for kind in ("asyncio", "uvloop")}
    print(json.dumps(out, indent=2))
    return 0


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "bench":
        return bench(argv[1:])
    print("usage: python -m lab.dns bench [--names N] [--in-flight N] [--runs N] "
          "[--lag-rounds N] [--steady-s S]")
    return 2


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
