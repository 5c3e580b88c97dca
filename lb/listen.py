"""Listening sockets: made once by the control process and inherited by every worker.

Apart from the proxy so that the control process, which makes them, never imports the data
plane's engine (lb.data) to do it.
"""

from __future__ import annotations

import contextlib
import socket

from lb.config import ListenerConfig

__all__ = ["make_listen_socket", "set_transparent"]

_IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
_IPV6_TRANSPARENT = 75  # linux/in6.h; not exported by the socket module


def set_transparent(sock: socket.socket, family: int) -> None:
    """Let ``sock`` and the connections it accepts send from an address this host no
    longer has, so a handover does not strand responses in flight. Skipped without
    CAP_NET_ADMIN (then a released VIP stops in-flight responses, as before)."""
    level, option = ((socket.IPPROTO_IPV6, _IPV6_TRANSPARENT) if family == socket.AF_INET6
                     else (socket.SOL_IP, _IP_TRANSPARENT))
    with contextlib.suppress(PermissionError):
        sock.setsockopt(level, option, 1)


def make_listen_socket(listener: ListenerConfig) -> socket.socket:
    """A non-blocking listening socket for ``listener`` (created once, shared by workers)."""
    host, port = listener.host_port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if listener.freebind:
            # Lets a standby bind the VIP before it holds it (Linux IP_FREEBIND = 15).
            sock.setsockopt(socket.SOL_IP, getattr(socket, "IP_FREEBIND", 15), 1)
        if listener.transparent:
            set_transparent(sock, family)
        sock.bind((host, port))
        sock.listen(listener.backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
