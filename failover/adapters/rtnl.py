"""The one rtnetlink edge of pairlb: pyroute2, one exchange at a time, under a deadline.

Every module that talks to the kernel's routing netlink goes through here: the VIP adapter
(addresses, links, neighbours) and handover (its TPROXY rule and route). One dialect
(pyroute2; no ``ip`` subprocesses, no hand-packed messages), one deadline policy and one
translation of netlink errors into the caller's exception, naming the step. pyroute2 does
not run on uvloop, so callers run on the stdlib asyncio loop (the failover process does).
Imports nothing from lb or healthcheck.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import AsyncIterator

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

__all__ = ["AsyncIPRoute", "NetlinkError", "Rtnl", "close_quietly", "strerror"]

SCOPE_HOST = 254  # <linux/rtnetlink.h> RT_SCOPE_HOST: the kernel refuses a local route without it


class Rtnl:
    """A lazily opened netlink socket whose exchanges are serialised and bounded.

    `error` is the caller's exception type (e.g. VipError): a netlink error, an OS error or
    a missed deadline inside :meth:`exchange` is raised as ``error("<what>: <reason>")``. A
    timed-out, cancelled or broken exchange may leave replies queued on the socket, so the
    socket is dropped and the next exchange opens a fresh one.
    """

    def __init__(self, timeout_s: float, error: type[Exception]) -> None:
        self.timeout_s = timeout_s
        self._error = error
        self._ipr: AsyncIPRoute | None = None
        self._lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def exchange(self, what: str) -> AsyncIterator[AsyncIPRoute]:
        async with self._lock:
            try:
                if self._ipr is None:
                    self._ipr = AsyncIPRoute()
                async with asyncio.timeout(self.timeout_s):
                    yield self._ipr
            except NetlinkError as e:
                raise self._error(f"{what}: {strerror(e.code)}") from e
            except TimeoutError as e:
                self._drop()
                raise self._error(f"{what}: no answer from netlink within {self.timeout_s}s") from e
            except asyncio.CancelledError:
                self._drop()
                raise
            except OSError as e:
                self._drop()
                raise self._error(f"{what}: {e}") from e

    async def close(self) -> None:
        """Close the socket once no exchange is using it (the next exchange reopens it)."""
        async with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._ipr is not None:
            close_quietly(self._ipr)
            self._ipr = None


def strerror(code: int) -> str:
    """``Operation not permitted (EPERM)``: the text and the name an operator can search."""
    try:
        name = errno.errorcode[code]
    except KeyError:
        name = f"errno {code}"
    return f"{os.strerror(code)} ({name})"


def close_quietly(ipr: AsyncIPRoute) -> None:
    with contextlib.suppress(Exception):
        ipr.close()
