"""The kernel's record of who held the VIP: rtnetlink address events from inside each node.

``VipWatch(topo, nodes, vip)`` opens one pyroute2 socket per node inside that node's
namespace (a netlink socket stays in the namespace it was made in), subscribed to IPv4
address events, and reads the node's current addresses with a dump before any later event.
Each socket lives on an event loop of its own (lab.netns.NetnsLoop: a thread that entered
the namespace) that does nothing but read it, so an event's time, time.monotonic() when it
is read, trails the kernel's change by well under a millisecond: the failover tests and
benchmarks measure overlaps and gaps of VIP ownership of tens of ms from these times.

pyroute2's sockets belong to the thread that made them (a call from another thread opens a
fresh socket in that thread's namespace), which is why each one is made, read and closed on
its node's loop, and never touched from the caller's thread.

The lab's only netlink code (the runtime's is failover/adapters/rtnl.py). Every lab.pair.Pair
has one (`watch`: the demo, the chaos bench, the failover tests and benchmarks); the
partition-guard tests use it directly. lab.pair imports it lazily, so the helper programs
that import lab.pair do not load pyroute2.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.rtnl import RTM_DELADDR, RTM_NEWADDR, RTMGRP_IPV4_IFADDR

from lab import netns


class VipWatch:
    """When did each node's kernel gain and lose the VIP (rtnetlink events, monotonic).

    `events` lists (time, node, present) for every change, the dump's included (a node
    that already holds the VIP when the watch starts shows one event at that time).
    """

    def __init__(self, topo: netns.Topology, nodes: Sequence[str], vip: str) -> None:
        self.vip = vip
        self.nodes = tuple(nodes)
        self.events: list[tuple[float, str, bool]] = []
        self._state: dict[str, bool] = dict.fromkeys(self.nodes, False)
        self._lock = threading.Lock()
        self._loops: dict[str, netns.NetnsLoop] = {}
        self._readers: dict[str, tuple[Any, asyncio.Task[None]]] = {}
        try:
            for node in self.nodes:
                self._loops[node] = topo.loop(node)
                self._readers[node] = self._loops[node].run(self._open(node))
        except BaseException:
            self.close()
            raise

    # -- on the node's loop ------------------------------------------------------------------

    async def _open(self, node: str) -> tuple[Any, asyncio.Task[None]]:
        """Subscribe, then dump: the current state before any later event."""
        ipr = AsyncIPRoute()
        try:
            await ipr.bind(groups=RTMGRP_IPV4_IFADDR)
            async for msg in await ipr.addr("dump", family=socket.AF_INET):
                self._see(node, msg)
        except BaseException:
            ipr.close()
            raise
        return ipr, asyncio.get_running_loop().create_task(self._read(node, ipr))

    async def _read(self, node: str, ipr: Any) -> None:
        while True:
            got = 0
            async for msg in ipr.get():
                got += 1
                self._see(node, msg)
            if got == 0:  # the socket closed
                return

    def _see(self, node: str, msg: Any) -> None:
        now = time.monotonic()
        kind = msg["header"]["type"]
        if kind not in (RTM_NEWADDR, RTM_DELADDR) or msg["family"] != socket.AF_INET:
            return
        local = msg.get_attr("IFA_LOCAL")
        if (local if local is not None else msg.get_attr("IFA_ADDRESS")) != self.vip:
            return
        present = kind == RTM_NEWADDR
        with self._lock:
            if self._state[node] != present:
                self._state[node] = present
                self.events.append((now, node, present))

    @staticmethod
    async def _shut(ipr: Any, task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        ipr.close()

    # -- reading the record ------------------------------------------------------------------

    def holding(self) -> set[str]:
        with self._lock:
            return {n for n, v in self._state.items() if v}

    def intervals(self, node: str, until: float) -> list[tuple[float, float]]:
        """[start, end) spans during which `node` held the VIP, up to `until`."""
        with self._lock:
            events = [(t, p) for t, n, p in self.events if n == node]
        spans: list[tuple[float, float]] = []
        start: float | None = None
        for t, present in events:
            if present and start is None:
                start = t
            elif not present and start is not None:
                spans.append((start, t))
                start = None
        if start is not None:
            spans.append((start, until))
        return spans

    def overlaps(self, since: float, until: float) -> list[tuple[float, float]]:
        """Spans within [since, until] during which two watched nodes held the VIP at once."""
        out = []
        for a, b in itertools.combinations(self.nodes, 2):
            for s1, e1 in self.intervals(a, until):
                for s2, e2 in self.intervals(b, until):
                    s, e = max(s1, s2, since), min(e1, e2, until)
                    if e > s:
                        out.append((s, e))
        return sorted(out)

    def unheld(self, since: float, until: float) -> list[tuple[float, float]]:
        """Spans within [since, until] during which no watched node held the VIP."""
        with self._lock:
            events = sorted(self.events)
            state = dict.fromkeys(self._state, False)
        out: list[tuple[float, float]] = []
        gap_start: float | None = None
        for t, node, present in events:
            state[node] = present
            held = any(state.values())
            if t < since:
                gap_start = None if held else since
                continue
            if t > until:
                break
            if not held and gap_start is None:
                gap_start = t
            elif held and gap_start is not None:
                if t > gap_start:
                    out.append((gap_start, t))
                gap_start = None
        if gap_start is not None and until > gap_start:
            out.append((gap_start, until))
        return out

    def changes(self, node: str, since: float) -> list[tuple[float, bool]]:
        """(time, held) of each change of `node` at or after `since`."""
        with self._lock:
            return [(t, p) for t, n, p in self.events if n == node and t >= since]

    def close(self) -> None:
        """Close every socket on its own loop, then stop the loops (their threads end).
        Idempotent; the record stays readable."""
        for node, loop in self._loops.items():
            reader = self._readers.pop(node, None)
            if reader is not None:
                with contextlib.suppress(Exception):
                    loop.run(self._shut(*reader), timeout_s=5.0)
            loop.close()
        self._loops.clear()
