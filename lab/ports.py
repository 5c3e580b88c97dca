"""Free ports for test servers that no other test process is handed at the same time.

A port from ``bind(0)`` is free only until that socket closes; the server that is meant to
take it binds it later. Two processes (pytest-xdist workers, a lab script and its test) that
ask in the same moment can be given the same port, and then the server that loses the race
exits while the other one answers on its address: a test's "backend b5" answered as another
test's "b3" and every key of b5 seemed to move. A port handed out here is **leased** for
``LEASE_S`` to everyone on the machine through a small book under the temp directory, guarded
by ``flock``; ``bind(0)`` still picks it (so a port in use by anything is never handed out),
the book only refuses one leased to somebody else. A lease outlives the test that asked for
it, which keeps a killed backend's port for its restart.

The book is per user and per temp directory (runs as root and as another user, or with
another ``TMPDIR``, do not see each other's leases); it is opened without following a
symlink and used only if it is a regular file of this user (``/tmp`` is shared). Leases are
timed by ``CLOCK_BOOTTIME``, which no wall-clock step moves.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import TextIO

LEASE_S = 900.0
"""Longer than any test module holds a port; a full run leases a few thousand ports of the
kernel's ~28,000 ephemeral ones."""
TRIES = 200
BOOK = Path(tempfile.gettempdir()) / f"pairlb-ports.{os.getuid()}"


def free_port(host: str = "127.0.0.1", kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port on ``host`` that is free now and leased to this caller for ``LEASE_S``."""
    return free_ports(1, host, kind)[0]


def free_ports(n: int, host: str = "127.0.0.1",
               kind: socket.SocketKind = socket.SOCK_STREAM) -> list[int]:
    """``n`` distinct ports, leased in one turn of the book (a benchmark's thousands of
    backends: one read and one write of it, not one per port)."""
    with _open_book() as book:
        fcntl.flock(book, fcntl.LOCK_EX)
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        book.seek(0)
        leased: dict[int, float] = {}
        for line in book:
            fields = line.split()
            if len(fields) == 2 and fields[0].isdigit():
                try:
                    at = float(fields[1])
                except ValueError:
                    continue
                if now - LEASE_S < at <= now + 1.0:
                    leased[int(fields[0])] = at
        got: list[int] = []
        while len(got) < n:
            for _ in range(TRIES):
                port = _kernel_port(host, kind)
                if port not in leased:
                    break
            else:
                raise RuntimeError(f"no unleased port on {host} in {TRIES} tries ({BOOK})")
            leased[port] = now
            got.append(port)
        book.seek(0)
        book.truncate()
        book.write("".join(f"{p} {t:.3f}\n" for p, t in leased.items()))
        return got


def _open_book() -> TextIO:
    fd = os.open(BOOK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        raise RuntimeError(f"{BOOK} is not a regular file of uid {os.getuid()}: remove it")
    return os.fdopen(fd, "r+", encoding="ascii")


def _kernel_port(host: str, kind: socket.SocketKind) -> int:
    """A port free on ``host`` right now, as ``bind(0)`` picks it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_udp_port(host: str = "127.0.0.1") -> int:
    return free_port(host, socket.SOCK_DGRAM)
