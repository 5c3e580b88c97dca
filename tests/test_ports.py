"""lab.ports: a port handed to one test process is not handed to another while leased, and a
backend that lost its port to another server is caught at start, not by a wrong answer later
(CI once saw every key of backend b5 answered by another test's b3)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import backend_app, ports

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(60)

ASK = """\
import json, sys
from lab import ports
print(json.dumps([ports.free_port() for _ in range(int(sys.argv[1]))]))
"""


def test_processes_asking_at_once_never_share_a_port(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", ASK, "300"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    got = [json.loads(p.communicate(timeout=50)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    every = [port for one in got for port in one]
    assert len(every) == 1200 and len(set(every)) == 1200
    book = (tmp_path / ports.BOOK.name).read_text().split()
    assert sorted(int(p) for p in book[::2]) == sorted(every)


def test_many_ports_at_once_are_distinct_and_leased(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "BOOK", tmp_path / "book")
    many = ports.free_ports(3000)
    assert len(set(many)) == 3000
    assert set(ports.free_ports(50)).isdisjoint(many)
    assert len((tmp_path / "book").read_text().split()) == 2 * 3050


def test_a_lease_holds_then_lapses_and_a_torn_book_is_ignored(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    book = tmp_path / "book"
    monkeypatch.setattr(ports, "BOOK", book)
    offers: list[int] = []
    monkeypatch.setattr(ports, "_kernel_port", lambda host, kind: offers.pop(0))
    now = time.clock_gettime(time.CLOCK_BOOTTIME)
    book.write_text(f"40001 {now:.3f}\n40002 {now - ports.LEASE_S - 5:.3f}\ngarbage\n"
                    f"12 x\n13 1e999\n14 {now + 3600:.3f}\n")
    offers[:] = [40001, 40001, 40002]
    assert ports.free_port() == 40002, "40001's lease holds, 40002's has lapsed"
    assert offers == []
    kept = book.read_text().split()[::2]
    assert sorted(kept) == ["40001", "40002"], "garbage and a lease from the future dropped"
    offers[:] = [40001] * ports.TRIES
    with pytest.raises(RuntimeError, match="no unleased port"):
        ports.free_port()


def test_a_book_planted_by_someone_else_is_refused_not_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/tmp is shared: a symlink there (to a file root may write) or another user's file
    is never followed or rewritten."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    book = tmp_path / "book"
    book.symlink_to(victim)
    monkeypatch.setattr(ports, "BOOK", book)
    with pytest.raises(OSError):
        ports.free_port()
    assert victim.read_text() == "precious\n"
    book.unlink()
    book.write_text("")
    if os.getuid() != 0:
        pytest.skip("giving the file to another user needs root")
    os.chown(book, 65534, -1)
    with pytest.raises(RuntimeError, match="not a regular file of uid"):
        ports.free_port()
    assert book.read_text() == ""


def test_udp_and_ipv6_ports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "BOOK", tmp_path / "book")
    u = ports.free_udp_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", u))
    v6 = ports.free_port("::1")
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", v6))


def test_a_backend_whose_port_another_server_holds_is_refused_at_start(
        tmp_path: Path) -> None:
    port = ports.free_port()
    first = subprocess.Popen([sys.executable, "-m", "lab.backend_app", "b3",
                              f"127.0.0.1:{port}"], cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        backend_app.wait_answering("127.0.0.1", port, "b3")
        second = subprocess.Popen([sys.executable, "-m", "lab.backend_app", "b5",
                                   f"127.0.0.1:{port}"], cwd=ROOT, stderr=subprocess.DEVNULL)
        try:
            with pytest.raises(RuntimeError, match="answered by 'b3', not backend 'b5'"):
                backend_app.wait_answering("127.0.0.1", port, "b5")
            assert second.wait(15) != 0, "b5 could not bind the port"
        finally:
            second.kill()
            second.wait()
    finally:
        first.kill()
        first.wait()
    with pytest.raises(TimeoutError, match="not answering"):
        backend_app.wait_answering("127.0.0.1", port, "b3", timeout_s=0.3)
