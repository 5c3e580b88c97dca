"""The TLS promise of a pair (issue 15): a client that got a session from the MASTER resumes it
on the BACKUP after the MASTER dies, with no certificate error and nothing configured for it.

Two real ``pairlb run`` nodes in network namespaces (lab.pair_rig.Rig: lb1 priority 150, lb2
100, three backends, the HTTP prober on the VIP's port 80) each get a TLS listener on
VIP:443 with the same certificate (``pair.test`` and the VIP's address, from the test CA of
tests/tls_helpers.py) and no ``ticket_key_file``: both derive the ticket key from the
failover key they share. A Python ssl client in the client namespace gets a session from
lb1 (TLS 1.3 and 1.2; it resumes there first), lb1 is killed with SIGKILL (the whole node),
and the client connects again with its saved session until one connection succeeds: that
connection is carried by lb2 (the backend's X-Peer is lb2's address), verifies the
certificate, and is resumed.

The control: each node with a ticket_key_file of its own (different keys). After the same
kill the connection to lb2 still succeeds, with a full handshake (not resumed).

Prometheus-like scraping through every fault, as the chaos suite does it
(bench/chaos_helpers.py ``scrape`` in each node's namespace, /metrics every 0.5 s, Prometheus's
Accept header and gzip): the survivor answers every scrape, the killed node every scrape
until the kill; the survivor's /metrics show the resumed handshakes.

Needs root (namespaces) and the openssl CLI (certificates); skipped otherwise.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPResponse
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import parse_metrics, total
from tls_helpers import Pki

from lab import netns
from lab import pair_rig as fe
from lab.pair import LBS

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(netns.skip_reason() is not None, reason=netns.skip_reason() or ""),
    pytest.mark.timeout(150),
]

TLS_PORT = 443
NAME = "pair.test"
SCRAPE_EVERY_S = 0.5
SCRAPE_FOR_S = 120.0
BASELINE_S = 1.2
"""Scraped, both nodes up, before the kill."""
AFTER_S = 1.5
"""Scraped after the kill (the survivor taking over, answering)."""
RECONNECT_FOR_S = 10.0
"""How long the client keeps trying after the kill (each try: a new TCP connection)."""
VERSIONS = {"1.3": ssl.TLSVersion.TLSv1_3, "1.2": ssl.TLSVersion.TLSv1_2}


class TlsRig(fe.ScrapedRig):
    """The failover rig with a TLS listener on VIP:443 on both nodes, and /metrics scrapers
    in each node's namespace (spared when a node is killed: they stand for a Prometheus
    elsewhere)."""

    scrape_every_s = SCRAPE_EVERY_S
    scrape_for_s = SCRAPE_FOR_S

    def __init__(self) -> None:
        self.ticket_files: dict[str, Path] | None = None
        super().__init__()
        try:
            self.pki = Pki(self.workdir / "pki")
            self.leaf = self.pki.leaf("vip", [NAME], [self.vip])
        except BaseException:
            self.close()
            raise

    def config_text(self, node: str, settings: fe.PairSettings) -> str:
        key = (f'ticket_key_file = "{self.ticket_files[node]}"\n'
               if self.ticket_files is not None else "")
        return super().config_text(node, settings) + f"""
[[listener]]
name = "tls"
bind = "{self.vip}:{TLS_PORT}"
pool = "web"

[listener.tls]
{key}certificates = [
  {{ cert_file = "{self.leaf.cert}", key_file = "{self.leaf.key}" }},
]
"""

    def use_ticket_files(self, files: dict[str, Path] | None) -> None:
        """Both nodes with these ticket key files (None: derived from the failover key),
        restarted if they ran with others; then the steady pair (lb1 MASTER)."""
        if files != self.ticket_files:
            for node in LBS:
                self.stop_lb(node)
            self.ticket_files = files
        self.steady(self.settings)

    def metrics(self, node: str) -> Any:
        code, body = self.admin(node, "GET", "/metrics")
        assert code == 200, body
        return parse_metrics(body if isinstance(body, str) else str(body))


@pytest.fixture(scope="module")
def rig() -> Iterator[TlsRig]:
    with TlsRig() as r:
        r.start_scrapers()
        try:
            yield r
        finally:
            r.stop_scrapers()


# -- the client (runs in the client namespace) ---------------------------------------------------


@dataclass
class Answer:
    status: int
    peer: str
    reused: bool
    version: str
    session: ssl.SSLSession | None
    t: float


def tls_get(vip: str, ctx: ssl.SSLContext, session: ssl.SSLSession | None,
            timeout_s: float) -> Answer:
    """One GET /whoami on a new TLS connection to the VIP, offering ``session``."""
    with socket.create_connection((vip, TLS_PORT), timeout=timeout_s) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with ctx.wrap_socket(sock, server_hostname=NAME, session=session) as s:
            s.sendall(f"GET /whoami HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n"
                      .encode())
            resp = HTTPResponse(s)  # type: ignore[arg-type]
            resp.begin()
            resp.read()
            # The TLS 1.3 ticket came after the handshake and was read with the response.
            return Answer(resp.status, resp.getheader("X-Peer") or "-", s.session_reused,
                          s.version() or "?", s.session, time.monotonic())


def until_served(vip: str, ctx: ssl.SSLContext, session: ssl.SSLSession | None,
                 deadline_s: float) -> tuple[Answer, int, list[str]]:
    """Connect again and again (20 ms apart) until one connection is answered: (that
    answer, attempts, the errors before it). A certificate error ends it at once."""
    errors: list[str] = []
    end = time.monotonic() + deadline_s
    while True:
        try:
            return tls_get(vip, ctx, session, 0.5), len(errors) + 1, errors
        except ssl.SSLCertVerificationError:
            raise
        except (OSError, ssl.SSLError) as exc:
            errors.append(type(exc).__name__)
            if time.monotonic() > end:
                raise AssertionError(f"no answer from the VIP within {deadline_s}s: "
                                     f"{errors[-10:]}") from None
            time.sleep(0.02)


def client_ctx(rig: TlsRig, version: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(rig.pki.ca))
    ctx.minimum_version = ctx.maximum_version = VERSIONS[version]
    return ctx


# -- the scenario ---------------------------------------------------------------------------------


@dataclass
class Run:
    t_fault: float
    before: dict[str, list[Answer]]
    after: dict[str, tuple[Answer, int, list[str]]]
    vip_moved_s: float | None


def kill_master_and_reconnect(rig: TlsRig) -> Run:
    """Sessions from lb1 (each resumed there once), lb1 killed, each session offered to the
    VIP until a connection is answered."""
    ctxs = {v: client_ctx(rig, v) for v in VERSIONS}
    before: dict[str, list[Answer]] = {}
    for v, ctx in ctxs.items():
        first = rig.topo.call("client", tls_get, rig.vip, ctx, None, 5.0)
        again = rig.topo.call("client", tls_get, rig.vip, ctx, first.session, 5.0)
        before[v] = [first, again]
    time.sleep(BASELINE_S)  # scrapes of both nodes before the fault
    t_fault = rig.signal_node("lb1", signal.SIGKILL)
    after = {}
    for v, ctx in ctxs.items():
        after[v] = rig.topo.call("client", until_served, rig.vip, ctx, before[v][0].session,
                                 RECONNECT_FOR_S)
    rig.wait_role("lb2", "MASTER", 10.0)
    time.sleep(max(0.0, t_fault + AFTER_S - time.monotonic()))  # and of lb2, after it
    gained = [t for t, present in rig.watch.changes("lb2", t_fault) if present]
    return Run(t_fault, before, after, gained[0] - t_fault if gained else None)


def check_before(rig: TlsRig, run: Run) -> None:
    lb1 = rig.addr["lb1"]
    for v, (first, again) in run.before.items():
        assert (first.status, first.peer, first.reused) == (200, lb1, False), (v, first)
        assert first.version == f"TLSv{v}", first
        # lb1 resumes its own session: what the failover case is compared with.
        assert (again.status, again.peer, again.reused) == (200, lb1, True), (v, again)


def check_scrapes(rig: TlsRig, since: float, run: Run) -> dict[str, str]:
    """Scraping went on through the fault: the survivor answered every scrape, lb1 every
    scrape that ended before the kill."""
    now = time.monotonic()
    out = {}
    for node in LBS:
        rows = rig.scrapes(node, since, now)
        assert len(rows) >= (now - since) / SCRAPE_EVERY_S * 0.5, (node, len(rows))
        early = [r for r in rows if r[1] < run.t_fault]
        assert len(early) >= 2 and all(r[2] == 200 for r in early), (node, early)
        if node == "lb2":
            late = [r for r in rows if r[0] >= run.t_fault]
            assert len(late) >= 2 and all(r[2] == 200 for r in late), (node, late)
        out[node] = f"{sum(1 for r in rows if r[2] == 200)}/{len(rows)} scrapes answered"
    return out


def describe(run: Run) -> str:
    parts = [f"VIP on lb2 {run.vip_moved_s * 1000:.0f} ms after the kill"
             if run.vip_moved_s is not None else "VIP move not seen"]
    for v, (a, tries, errors) in run.after.items():
        parts.append(f"TLS {v}: answered {1000 * (a.t - run.t_fault):.0f} ms after the kill "
                     f"on try {tries} ({', '.join(sorted(set(errors))) or 'no errors'}), "
                     f"reused={a.reused}")
    return "; ".join(parts)


def test_session_resumes_on_the_peer_after_the_master_is_killed(rig: TlsRig) -> None:
    rig.use_ticket_files(None)
    since = time.monotonic()
    st = rig.status("lb1")
    assert st is not None and st["listeners"][1]["tls"]["ticket_key"] == "failover_key", st
    run = kill_master_and_reconnect(rig)
    why = describe(run)
    check_before(rig, run)
    for v, (a, _, _) in run.after.items():
        # Carried by lb2, the certificate verified (no exception), the session resumed.
        assert (a.status, a.peer) == (200, rig.addr["lb2"]), (v, a, why)
        assert a.version == f"TLSv{v}", (a, why)
        assert a.reused is True, (v, why)
    st = rig.status("lb2")
    assert st is not None
    tls = st["listeners"][1]["tls"]
    assert tls["ticket_key"] == "failover_key", tls
    rig.wait_for("lb2's /metrics to count the resumed handshakes", lambda: total(
        rig.metrics("lb2"), "pairlb_tls_handshakes_total", listener="tls", kind="resumed")
        >= 2, 5.0, 0.1)
    s = rig.metrics("lb2")
    assert total(s, "pairlb_tls_ticket_key_shared", listener="tls") == 1
    assert total(s, "pairlb_tls_handshake_failures_total", listener="tls") == 0
    scrapes = check_scrapes(rig, since, run)
    print(f"shared key (derived from the failover key): {why}; {scrapes}")


def test_different_ticket_keys_mean_a_full_handshake_after_failover(rig: TlsRig) -> None:
    files = {}
    for node in LBS:
        path = rig.workdir / f"ticket-{node}.key"
        path.write_text(os.urandom(80).hex() + "\n")
        path.chmod(0o600)
        files[node] = path
    rig.use_ticket_files(files)
    since = time.monotonic()
    st = rig.status("lb1")
    assert st is not None and st["listeners"][1]["tls"]["ticket_key"] == "file", st
    run = kill_master_and_reconnect(rig)
    why = describe(run)
    check_before(rig, run)
    for v, (a, _, _) in run.after.items():
        # lb2 cannot read lb1's ticket: a full handshake, and the request still succeeds.
        assert (a.status, a.peer) == (200, rig.addr["lb2"]), (v, a, why)
        assert a.reused is False, (v, why)
    rig.wait_for("lb2's /metrics to count the full handshakes", lambda: total(
        rig.metrics("lb2"), "pairlb_tls_handshakes_total", listener="tls", kind="full")
        >= 2, 5.0, 0.1)
    s = rig.metrics("lb2")
    assert total(s, "pairlb_tls_handshakes_total", listener="tls", kind="resumed") == 0, why
    assert total(s, "pairlb_tls_handshake_failures_total", listener="tls") == 0
    scrapes = check_scrapes(rig, since, run)
    # The ticket_key_file path is part of the listener, so of the config digest the nodes
    # compare: different paths show as a config mismatch (a warning, nothing more).
    match = [p.get("config_digest_match") for p in rig.failover("lb2")["peers"]]
    print(f"different ticket key files: {why}; {scrapes}; lb2 sees config digest match "
          f"{match}")
