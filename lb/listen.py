"""Listening sockets: made once by the control process and inherited by every worker.

One per worker slot with SO_REUSEPORT (``[listener] reuseport``), or one shared by all.

Apart from the proxy so that the control process, which makes them, never imports the data
plane's engine (lb.data) to do it.
"""

from __future__ import annotations

import contextlib
import socket
import sys

from lb.config import ListenerConfig

__all__ = [
    "accept_queue", "make_listen_socket", "make_listen_sockets", "set_transparent",
    "update_listen_sockets",
]

_IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
_IPV6_TRANSPARENT = 75  # linux/in6.h; not exported by the socket module


def set_transparent(sock: socket.socket, family: int, on: bool = True) -> None:
    """Let ``sock`` and the connections it accepts send from an address this host no
    longer has, so a handover does not strand responses in flight. Skipped without
    CAP_NET_ADMIN (then a released VIP stops in-flight responses, as before)."""
    level, option = ((socket.IPPROTO_IPV6, _IPV6_TRANSPARENT) if family == socket.AF_INET6
                     else (socket.SOL_IP, _IP_TRANSPARENT))
    with contextlib.suppress(PermissionError):
        sock.setsockopt(level, option, int(on))


def _bound(listener: ListenerConfig, reuseport: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in listener.host_port[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if listener.freebind:
            # Lets a standby bind the VIP before it holds it (Linux IP_FREEBIND = 15).
            sock.setsockopt(socket.SOL_IP, getattr(socket, "IP_FREEBIND", 15), 1)
        if listener.transparent:
            set_transparent(sock, family)
        sock.bind(listener.host_port)
    except BaseException:
        sock.close()
        raise
    return sock


def make_listen_sockets(listener: ListenerConfig, workers: int) -> list[socket.socket]:
    """The non-blocking listening sockets of ``listener``: with ``reuseport`` and more than
    one worker, one per worker slot (SO_REUSEPORT; slot ``i`` accepts on element ``i``),
    else one that every worker shares. Made once by the control process, which keeps them
    (a restarted worker gets its slot's socket, and what queued there, back).

    A port some other socket holds fails here even with SO_REUSEPORT: a first bind without
    it proves the port free, so a second pairlb (or anything of the same user that set
    SO_REUSEPORT) is refused instead of silently taking a share of the connections."""
    n = workers if listener.reuseport and workers > 1 else 1
    if n == 1:
        socks = [_bound(listener, reuseport=False)]
    else:
        _bound(listener, reuseport=False).close()
        socks = []
    try:
        while len(socks) < n:
            socks.append(_bound(listener, reuseport=True))
        for sock in socks:
            sock.listen(listener.backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def make_listen_socket(listener: ListenerConfig) -> socket.socket:
    """One listening socket for ``listener``, shared by whoever accepts on it."""
    return make_listen_sockets(listener, 1)[0]


def update_listen_sockets(socks: list[socket.socket], old: ListenerConfig,
                          new: ListenerConfig) -> None:
    """A reload's backlog and IP_TRANSPARENT for sockets that stay (the same address and
    ``reuseport``): set in place, so the queues and the workers stay too. (IP_FREEBIND
    only matters when a socket binds: these are bound.)"""
    for sock in socks:
        if new.backlog != old.backlog:
            sock.listen(new.backlog)
        if new.transparent != old.transparent:
            set_transparent(sock, sock.family, new.transparent)


def accept_queue(sock: socket.socket) -> int:
    """Connections waiting in a listening socket's accept queue: TCP_INFO's ``tcpi_unacked``
    is the queue's length for a socket in LISTEN (Linux tcp_get_info), one syscall."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    return int.from_bytes(info[24:28], sys.byteorder)
