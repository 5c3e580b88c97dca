"""One listening socket per worker (``[listener] reuseport``), with real processes.

A real ``pairlb run`` (control process + 2 workers, admin on) in front of three real
backends on 127.0.0.1, /metrics scraped every 0.25 s through every test. What is shown:
keep-alive connections spread over both workers; a worker that hangs (SIGSTOP), is in its
restart backoff, or was killed costs new connections no error and at most a few hundred
ms, because the other worker takes its socket's queue (lb.control.acceptwatch); help ends
when the worker serves again; a reload changes the backlog in place and keeps reuseport.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_process_model import Node, free_port, wait_http


class AdminNode(Node):
    """test_process_model's node with the admin endpoint on and fast worker pings."""

    def __init__(self, tmp: Path, reuseport: bool = True) -> None:
        super().__init__(tmp)
        self.admin_port = free_port()
        self.reuseport = reuseport
        self.listener_extra = ""
        self.scraper: Scraper | None = None

    def config(self, backends: int = 3, extra: str = "") -> str:
        text = super().config(backends, extra)
        text = text.replace("shutdown_timeout_s = 5.0", "shutdown_timeout_s = 5.0\n"
                            "worker_ping_interval_s = 0.2\nworker_ping_timeout_s = 5.0")
        text = text.replace('pool = "web"\n[[pool]]', f'pool = "web"\nreuseport = '
                            f'{str(self.reuseport).lower()}\n{self.listener_extra}[[pool]]')
        return text.replace("[admin]\nenabled = false",
                            f'[admin]\nbind = "127.0.0.1:{self.admin_port}"')

    def get(self, path: str) -> str:
        c = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read().decode()
        assert r.status == 200, (path, r.status, body[:300])
        return body

    def status(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.get("/status"))  # type: ignore[no-any-return]

    def listener(self) -> dict:  # type: ignore[type-arg]
        return self.status()["listeners"][0]  # type: ignore[no-any-return]

    def slot_pid(self, index: int) -> int:
        for w in self.status()["workers"]:
            if w["index"] == index and w["ready"] and w["pid"]:
                return int(w["pid"])
        raise AssertionError(f"no serving worker in slot {index}")

    def metric(self, name: str, labels: str) -> float:
        sel = f"{{{re.escape(labels)}}}" if labels else ""
        m = re.search(rf"^{name}{sel} (\S+)$", self.get("/metrics"), re.M)
        assert m, f"{name}{{{labels}}} not scraped"
        return float(m.group(1))


class Scraper:
    """GET /metrics every 0.25 s (what Prometheus does to a node through a fault)."""

    def __init__(self, node: AdminNode) -> None:
        self.node = node
        self.results: list[int | str] = []
        self.stopped_at: float | None = None
        """Set by a test that stops the node: scrapes after it are not counted."""
        self._stop = threading.Event()
        self._th = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.scrape()
            if self._stop.wait(0.25):
                return

    def scrape(self) -> None:
        if self.stopped_at is not None:
            return
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.node.admin_port, timeout=5)
            c.request("GET", "/metrics")
            r = c.getresponse()
            r.read()
            self.results.append(r.status)
        except (OSError, http.client.HTTPException) as exc:
            self.results.append(type(exc).__name__)

    def __enter__(self) -> Scraper:
        self._th.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._th.join(10)
        self.scrape()  # and one after the fault


@pytest.fixture
def node(tmp_path: Path) -> Iterator[AdminNode]:
    n = AdminNode(tmp_path)
    try:
        n.start()
        wait_http(n.admin_port, "/healthz")
        end = time.monotonic() + 10
        while any(not w["ready"] for w in n.status()["workers"]):
            assert time.monotonic() < end, n.status()["workers"]
            time.sleep(0.05)
        # A slot is helped from its start until its worker answers a ping sent after that
        # (up to ~1 s after Ready, pings are 1 s apart): a test that stops a worker before
        # then can see that help end on an answer given just before the stop (the worker was
        # alive then), after its connections were served, and read no help at all.
        while n.listener()["accept"]["helped"]:
            assert time.monotonic() < end, n.listener()
            time.sleep(0.05)
        with Scraper(n) as scraper:
            n.scraper = scraper
            yield n
        assert scraper.results, "no scrape"
        assert set(scraper.results) == {200}, scraper.results
    finally:
        n.stop()


def one_request(port: int, timeout_s: float = 5.0) -> tuple[float, int | str]:
    """A new connection, one request: (seconds it took, status or error)."""
    t0 = time.monotonic()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
        c.request("GET", "/")
        r = c.getresponse()
        r.read()
        c.close()
        return time.monotonic() - t0, r.status
    except (OSError, http.client.HTTPException) as exc:
        return time.monotonic() - t0, type(exc).__name__


def new_connections(port: int, n: int) -> list[tuple[float, int | str]]:
    """``n`` new connections from 8 threads, each with one request."""
    out: list[tuple[float, int | str]] = []
    lock = threading.Lock()
    left = iter(range(n))

    def run() -> None:
        for _ in left:
            r = one_request(port)
            with lock:
                out.append(r)

    ths = [threading.Thread(target=run) for _ in range(8)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(60)
    return out


@pytest.mark.timeout(90)
def test_keep_alive_connections_spread_over_both_workers(node: AdminNode) -> None:
    listener = node.listener()
    assert len(listener["accept"]["queues"]) == 2  # one socket per worker slot
    conns = []
    try:
        for _ in range(64):
            c = http.client.HTTPConnection("127.0.0.1", node.port, timeout=5)
            c.request("GET", "/")
            r = c.getresponse()
            r.read()
            assert r.status == 200
            conns.append(c)  # kept open: keep-alive, each on the worker that accepted it
        time.sleep(0.8)  # the workers report their open connections every 0.25 s
        per = [node.metric("pairlb_worker_connections_active", f'worker="{i}"')
               for i in range(2)]
    finally:
        for c in conns:
            c.close()
    # The kernel hashes each connection to a slot: 64 land ~32/32 (16 would be 4 sd off).
    assert sum(per) == 64, per
    assert min(per) >= 16, per
    assert node.metric("pairlb_listener_accept_helped", 'listener="web",worker="0"') == 0


@pytest.mark.timeout(90)
def test_a_hung_worker_s_queue_is_taken_by_the_other_until_it_answers(
        node: AdminNode) -> None:
    pid = node.slot_pid(1)
    os.kill(pid, signal.SIGSTOP)
    try:
        results = new_connections(node.port, 60)
        listener = node.listener()
        helped = node.metric("pairlb_listener_accept_helped", 'listener="web",worker="1"')
        helps = node.metric("pairlb_listener_accept_helps_total", 'listener="web",worker="1"')
    finally:
        os.kill(pid, signal.SIGCONT)
    # About half of them hashed to the stopped worker's socket: the other took them.
    assert [o for _, o in results] == [200] * 60, results
    slowest = max(t for t, _ in results)
    assert slowest < 1.5, f"slowest {slowest:.2f} s (the ping timeout is 5 s)"
    # Slot 1 is helped; slot 0 may be too (alone with eight clients its queue can hold
    # connections at two looks, and nobody is there to take them).
    assert 1 in listener["accept"]["helped"] and listener["accept"]["helps"][1] >= 1
    assert helped == 1 and helps >= 1
    # Resumed: it answers a ping, its queue is empty, and the help ends; it was never killed.
    end = time.monotonic() + 5
    while node.listener()["accept"]["helped"]:
        assert time.monotonic() < end, node.listener()
        time.sleep(0.1)
    assert node.slot_pid(1) == pid


@pytest.mark.timeout(120)
def test_a_worker_in_its_restart_backoff_costs_new_connections_nothing(
        node: AdminNode) -> None:
    # Kill slot 1 until its backoff is over a second (0.05 s doubling each crash).
    for _ in range(6):
        pid = node.slot_pid(1)
        os.kill(pid, signal.SIGKILL)
        end = time.monotonic() + 10
        while True:
            with contextlib.suppress(AssertionError):
                if node.slot_pid(1) != pid:
                    break
            assert time.monotonic() < end
            time.sleep(0.02)
    os.kill(node.slot_pid(1), signal.SIGKILL)
    time.sleep(0.3)
    assert re.search(r"event=worker_died index=1 .*restart_in_s=(1\.[0-9]|[2-9])",
                     node.log_text()), node.log_text()[-2000:]
    results = new_connections(node.port, 60)
    assert [o for _, o in results] == [200] * 60, results
    assert max(t for t, _ in results) < 1.0, results
    assert 1 in node.listener()["accept"]["helped"]


@pytest.mark.timeout(90)
def test_a_reload_changes_the_backlog_in_place_and_keeps_reuseport(node: AdminNode) -> None:
    assert node.proc is not None
    pids = sorted(node.worker_pids())
    node.listener_extra = "backlog = 77\nfreebind = false\n"
    node.reuseport = False  # the same bind: needs a restart, so it is kept
    node.cfg.write_text(node.config())
    node.proc.send_signal(signal.SIGHUP)
    end = time.monotonic() + 10
    while "event=reloaded generation=2" not in node.log_text():
        assert time.monotonic() < end, node.log_text()[-2000:]
        time.sleep(0.05)
    log = node.log_text()
    assert "listener web backlog 77" in log
    assert "listener web reuseport changed: needs a restart, ignored" in log
    assert "listener web freebind false: applies when its sockets are made again" in log
    assert sorted(node.worker_pids()) == pids  # the sockets and the workers stayed
    assert len(node.listener()["accept"]["queues"]) == 2
    results = new_connections(node.port, 20)
    assert [o for _, o in results] == [200] * 20, results
    # The sockets' own backlog (tcpi_sacked of a listening socket; ss shows it as Send-Q).
    out = os.popen(f"ss -Hltn 'sport = :{node.port}'").read()
    assert [line.split()[2] for line in out.splitlines()] == ["77", "77"], out


@pytest.mark.timeout(90)
def test_a_second_pairlb_on_the_same_port_is_refused(node: AdminNode, tmp_path: Path) -> None:
    """SO_REUSEPORT would let a second process of the same user share the port and take
    half of the connections; the first bind without it refuses that."""
    other = AdminNode(tmp_path / "b")
    (tmp_path / "b").mkdir()
    other.port = node.port
    other.cfg.write_text(other.config())
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "lb", "run", "-c", str(other.cfg)],
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[1])
    assert p.returncode != 0
    assert f"listener web: cannot bind 127.0.0.1:{node.port}" in p.stderr, p.stderr[-2000:]
    with socket.create_connection(("127.0.0.1", node.port), timeout=5):
        pass  # the first one serves on


@pytest.mark.timeout(90)
def test_a_graceful_stop_ends_the_watch_with_the_sockets(node: AdminNode) -> None:
    """SIGTERM closes the control process's sockets first: the queue watch stops with them
    (it read closed sockets every 0.1 s through the drain, an error line each time)."""
    assert node.proc is not None
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert c.recv(100).startswith(b"HTTP/1.1 200")
        assert node.scraper is not None
        node.scraper.stopped_at = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)  # a keep-alive connection open: a 5 s drain
        time.sleep(1.0)
    assert node.proc.wait(20) == 0
    log = node.log_text()
    assert "event=accept_watch_failed" not in log, log[-3000:]


@pytest.mark.timeout(120)
def test_a_worker_paused_at_max_connections_is_helped_for_as_long_as_it_lasts(
        tmp_path: Path) -> None:
    """max_connections = 1 and a keep-alive connection held on worker 0: it stops accepting
    and says so, and the other worker takes its socket's queue until it resumes (help that
    ended at its next pong cost every second some new connections 100-200 ms)."""
    n = AdminNode(tmp_path)
    n.listener_extra = "max_connections = 1\n"
    try:
        n.start()
        wait_http(n.admin_port, "/healthz")
        held = None
        for _ in range(40):  # a connection the kernel hashed to worker 0's socket
            c = http.client.HTTPConnection("127.0.0.1", n.port, timeout=5)
            c.request("GET", "/")
            c.getresponse().read()
            time.sleep(0.6)
            per = [n.metric("pairlb_worker_connections_active", f'worker="{i}"')
                   for i in range(2)]
            if per == [1.0, 0.0]:
                held = c
                break
            c.close()
            time.sleep(0.3)
        assert held is not None, "no connection landed on worker 0"
        with Scraper(n) as scraper:
            end = time.monotonic() + 5
            while n.listener()["accept"]["helped"] != [0]:  # paused: helped at once
                assert time.monotonic() < end, n.listener()
                time.sleep(0.05)
            # (The search above may have paused worker 0 briefly before: count from here.)
            helps0 = n.metric("pairlb_listener_accept_helps_total",
                              'listener="web",worker="0"')
            lat = []
            end = time.monotonic() + 4
            while time.monotonic() < end:  # new connections, one at a time
                lat.append(one_request(n.port))
                time.sleep(0.05)
            helps = n.metric("pairlb_listener_accept_helps_total",
                             'listener="web",worker="0"') - helps0
            assert n.listener()["accept"]["helped"] == [0]
            held.close()
            end = time.monotonic() + 5
            while n.listener()["accept"]["helped"]:  # resumed: help ends
                assert time.monotonic() < end, n.listener()
                time.sleep(0.1)
        assert set(scraper.results) == {200}, scraper.results
        assert [o for _, o in lat] == [200] * len(lat), lat
        slow = [round(t, 3) for t, _ in lat if t > 0.1]
        assert not slow, f"{len(slow)} of {len(lat)} over 100 ms: {slow}"
        assert helps == 0, helps  # one episode, the whole pause: none began during it
    finally:
        n.stop()
