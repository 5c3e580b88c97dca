"""lb.sdnotify against a real AF_UNIX datagram socket that the test owns, as systemd's is.

``NotifySocket`` stands in for the service manager's end: it binds the socket, turns on
SO_PASSCRED so every datagram carries the sender's pid (systemd's NotifyAccess=main check
uses exactly these credentials) and parses each datagram into KEY=value fields the way
systemd does. test_systemd.py uses it to watch a real daemon.
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lb.sdnotify import Notifier, watchdog_interval_s

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True)
class Notification:
    fields: dict[str, str]
    pid: int
    at: float
    """time.monotonic() when it was received."""


class NotifySocket:
    """The service manager's end of $NOTIFY_SOCKET, with a reader thread and a log."""

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if path is None:
            name = f"plb-notify-{secrets.token_hex(6)}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(str(path))
            self.address = str(path)
        self.messages: list[Notification] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, name="notify-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        self.sock.settimeout(0.05)
        while not self._closed:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            pid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[: _UCRED.size])[0]
            # systemd: newline-separated assignments; a line without '=' is ignored.
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if "=" in line)
            with self._cond:
                self.messages.append(Notification(fields, pid, at))
                self._cond.notify_all()

    def wait_for(
        self, pred: Callable[[Notification], bool], timeout_s: float, start: int = 0
    ) -> tuple[int, Notification]:
        """The first message at index >= start matching pred, and its index; fail on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for i in range(start, len(self.messages)):
                    if pred(self.messages[i]):
                        return i, self.messages[i]
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [m.fields for m in self.messages[start:]][-10:]
                    raise AssertionError(f"no matching notification in {timeout_s} s; got {got}")
                self._cond.wait(left)

    def snapshot(self) -> list[Notification]:
        with self._cond:
            return list(self.messages)

    def close(self) -> None:
        self._closed = True
        self._thread.join(2.0)
        self.sock.close()


def has(key: str, value: str | None = None) -> Callable[[Notification], bool]:
    return lambda m: key in m.fields and (value is None or m.fields[key] == value)


@pytest.fixture
def notify_sock(tmp_path: Path):  # type: ignore[no-untyped-def]
    ns = NotifySocket(tmp_path / "notify")
    yield ns
    ns.close()


def _mono_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_without_notify_socket_every_call_is_a_silent_no_op(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert [n.ready("x"), n.status("x"), n.watchdog(), n.reloading(), n.stopping()] == [False] * 5
    n.close()


@pytest.mark.parametrize("addr", ["", "relative/notify", "notify"])
def test_an_address_systemd_would_never_give_disables_notification(addr: str) -> None:
    assert not Notifier(addr).enabled


@pytest.mark.timeout(20)
def test_each_message_arrives_as_systemd_parses_it(notify_sock: NotifySocket) -> None:
    n = Notifier(notify_sock.address)
    assert n.enabled
    assert n.ready("role=STANDALONE backends_up=2/3 workers=2")
    assert n.status("role=MASTER backends_up=3/3 workers=2")
    assert n.watchdog()
    before = _mono_usec()
    assert n.reloading()
    after = _mono_usec()
    assert n.ready()
    assert n.stopping()
    n.close()

    notify_sock.wait_for(has("STOPPING"), 5.0)
    got = notify_sock.snapshot()
    assert [m.fields for m in got[:3]] == [
        {"READY": "1", "STATUS": "role=STANDALONE backends_up=2/3 workers=2"},
        {"STATUS": "role=MASTER backends_up=3/3 workers=2"},
        {"WATCHDOG": "1"},
    ]
    reload_msg = got[3].fields
    assert reload_msg.keys() == {"RELOADING", "MONOTONIC_USEC"}
    assert reload_msg["RELOADING"] == "1"
    # CLOCK_MONOTONIC in microseconds, as systemd >= 253 checks it against its own clock.
    assert before <= int(reload_msg["MONOTONIC_USEC"]) <= after
    assert [m.fields for m in got[4:]] == [{"READY": "1"}, {"STOPPING": "1"}]
    # Every datagram is credited to this process, which is what NotifyAccess=main checks.
    assert {m.pid for m in got} == {os.getpid()}


@pytest.mark.timeout(20)
def test_notify_socket_is_taken_from_the_environment(
    notify_sock: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_sock.address)
    n = Notifier()
    assert n.ready()
    notify_sock.wait_for(has("READY", "1"), 5.0)
    n.close()


@pytest.mark.timeout(20)
def test_abstract_socket_names_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd in containers and with private /run passes '@name' (Linux abstract namespace)."""
    ns = NotifySocket(None)
    try:
        assert ns.address.startswith("@")
        monkeypatch.setenv("NOTIFY_SOCKET", ns.address)
        n = Notifier()
        assert n.status("abstract ok")
        _, m = ns.wait_for(has("STATUS"), 5.0)
        assert m.fields == {"STATUS": "abstract ok"}
        n.close()
    finally:
        ns.close()


@pytest.mark.timeout(20)
def test_a_vanished_socket_returns_false_and_never_raises(tmp_path: Path) -> None:
    """systemd restarting (daemon-reexec) must not crash the load balancer."""
    ns = NotifySocket(tmp_path / "gone")
    n = Notifier(ns.address)
    ns.close()
    (tmp_path / "gone").unlink()
    assert n.enabled
    assert n.watchdog() is False
    assert n.ready("x") is False


@pytest.mark.timeout(30)
def test_a_child_process_sends_with_its_own_pid(notify_sock: NotifySocket) -> None:
    """Why the unit says NotifyAccess=main: systemd tells senders apart by these pids."""
    code = "from lb.sdnotify import Notifier; import sys; Notifier(sys.argv[1]).ready('child')"
    proc = subprocess.run([sys.executable, "-c", code, notify_sock.address], timeout=20, check=True)
    assert proc.returncode == 0
    _, m = notify_sock.wait_for(has("READY"), 5.0)
    assert m.pid not in (os.getpid(), -1)


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),  # no WatchdogSec=
        ("0", None, None),
        ("abc", None, None),
        ("10000000", None, 5.0),  # WatchdogSec=10s: ping every 5 s
        ("200000", "self", 0.1),
        ("200000", "other", None),  # meant for another process (e.g. a wrapper's child)
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_pid_only(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    for var, val in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if val is None:
            monkeypatch.delenv(var, raising=False)
        else:
            val = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(val, val)
            monkeypatch.setenv(var, val)
    assert watchdog_interval_s() == expected
