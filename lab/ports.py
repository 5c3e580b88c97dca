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
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time
from pathlib import Path

LEASE_S = 900.0
"""Longer than any test module holds a port; a full run leases a few thousand ports of the
kernel's ~28,000 ephemeral ones."""
TRIES = 200
BOOK = Path(tempfile.gettempdir()) / f"pairlb-ports.{os.getuid()}"


def free_port(host: str = "127.0.0.1", kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port on ``host`` that is free now and leased to this caller for ``LEASE_S``."""
    with open(BOOK, "a+", encoding="ascii") as book:
        fcntl.flock(book, fcntl.LOCK_EX)
        now = time.time()
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
        for _ in range(TRIES):
            port = _kernel_port(host, kind)
            if port not in leased:
                break
        else:
            raise RuntimeError(f"no unleased port on {host} in {TRIES} tries ({BOOK})")
        leased[port] = now
        book.seek(0)
        book.truncate()
        book.write("".join(f"{p} {t:.3f}\n" for p, t in leased.items()))
        return port


def _kernel_port(host: str, kind: socket.SocketKind) -> int:
    """A port free on ``host`` right now, as ``bind(0)`` picks it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_udp_port(host: str = "127.0.0.1") -> int:
    return free_port(host, socket.SOCK_DGRAM)
