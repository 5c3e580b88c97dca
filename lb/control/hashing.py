"""The Maglev lookup tables of the pools with ``balance = "maglev"``: built here, once per
node, and sent to every worker.

Why in the control process: a table depends only on the pool's members (names and
configured weights) and its size, never on health, so it changes only when a backend joins
or leaves (a reload, the admin API, the peer, discovery). Building one is O(M log M) in
Python (0.3 s for 3,000 backends at the default M = 524,309), too long for a worker's event
loop and wasted work in every worker. It runs in a helper process (``Builder``), debounced
and paced (a burst of runtime adds is a few builds), and the workers get the table as bytes
(``HashTable``), in their welcome too, before the snapshot that lets them serve.

Why a process, not a thread: the build is pure Python and holds the GIL; in a thread of
this process every system call of the event loop (each health check makes several) waited
up to the interpreter's switch interval (5 ms) to get it back, so while tables were built
back to back during a burst of 300 runtime adds at 3,000 backends, checks ran seconds late,
timed out and took healthy backends DOWN (bench/maglev_scale.py, docs/maglev-scale.md).

Until a new table arrives a worker keeps the old one: a backend that left is never picked
(the pool forgets it), one that joined gets no hashed traffic yet. Health and drain are the
pool's business at lookup time (lb.maglev.lookup skips a backend out of rotation and
tries the key's next choice), so a health change costs no build.

Both nodes of a pair build the same table from the same members, so a key goes to the
same backend whichever node holds the VIP; ``digest`` (in /status) lets an operator check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sys
import time
from array import array
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from lb import maglev
from lb import worker_link as wl
from lb.config import HASH_TABLE_MAX, PoolConfig

logger = logging.getLogger(__name__)

DEBOUNCE_S = 0.05
"""A membership change waits this long for more before a build starts (a burst of runtime
adds or discovery's whole answer is one build)."""
RETRY_S = 10.0
"""A pool whose build failed is tried again this long after (its old table serves)."""
PACE = 1.0
"""After a table of B seconds is sent, the next build starts no sooner than PACE x B later:
during a burst of changes each worker installs a new table (~1.4 MB on the channel and ~20
ms of its loop at 3,000 backends) at most every ~2 B. A build whose members changed while it
ran is dropped and redone at once: it cost the helper's CPU only, and waiting would only
delay the table of the burst's end."""

Members = tuple[tuple[str, int], ...]


def members_of(pcfg: PoolConfig, leaving: Collection[str] = ()) -> Members:
    """What a pool's table depends on besides its size: every member and its configured
    weight, in name order (slow start and health change nothing here). ``leaving``: backends
    removed at runtime and draining; never picked again, they are out of the table at once,
    so their keys move once, to their new owner (not to an interim choice, then again)."""
    return tuple(sorted((b.name, b.weight) for b in pcfg.backends if b.name not in leaving))


def size_of(pcfg: PoolConfig, members: Members) -> int:
    """``hash_table_size``, else the ladder's (at most HASH_TABLE_MAX: what the worker
    channel carries; past 41,943 backends the table is below 100 x N)."""
    return pcfg.hash_table_size or min(maglev.table_size(len(members)), HASH_TABLE_MAX)


@dataclass(frozen=True)
class Built:
    members: Members
    size: int
    message: wl.HashTable
    build_s: float
    built_at: float


def build_message(pool: str, members: Members, size: int) -> wl.HashTable:
    """The table (lb.maglev.build) as the workers get it, built here (tests, a fallback)."""
    names, table = maglev.build(members, size)
    return table_message(pool, names, size, table)


def table_message(pool: str, names: tuple[str, ...], size: int, table: array[int]
                  ) -> wl.HashTable:
    raw = table.tobytes()
    digest = hashlib.blake2b(raw, digest_size=8).hexdigest()
    return wl.HashTable(pool, tuple(names), size, table.typecode, raw, digest)


_HELPER = r"""
import json, os, sys
from lb import maglev
with __import__("contextlib").suppress(OSError):
    os.nice(10)  # requests and health checks first: the old table serves meanwhile
inp, out = sys.stdin.buffer, sys.stdout.buffer
for line in inp:
    try:
        req = json.loads(line)
        names, table = maglev.build([(n, w) for n, w in req["members"]], req["size"])
        raw = table.tobytes()
        head = {"names": list(names), "typecode": table.typecode, "nbytes": len(raw)}
    except Exception as exc:
        raw, head = b"", {"error": repr(exc)}
    out.write(json.dumps(head).encode() + b"\n" + raw)
    out.flush()
"""
"""The builder process: one JSON line in ({members, size}), one JSON line out ({names,
typecode, nbytes} or {error}) followed by the table's bytes. It ends when its stdin does
(the control process stopped or died)."""


class Builder:
    """``lb.maglev.build`` in a helper process of its own (started at the first build,
    kept; started again if it dies). If it cannot be started, builds run in a thread."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self._thread_only = False

    async def build(self, members: Members, size: int) -> tuple[tuple[str, ...], array[int]]:
        async with self._lock:
            if self._thread_only:
                return await asyncio.to_thread(maglev.build, members, size)
            if self.proc is None or self.proc.returncode is not None:
                try:
                    self.proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-P", "-c", _HELPER, stdin=asyncio.subprocess.PIPE,
                        stdout=asyncio.subprocess.PIPE, limit=32 << 20)
                except OSError as exc:
                    logger.warning("event=maglev_builder_unavailable error=%r fallback=thread",
                                   str(exc))
                    self._thread_only = True
                    return await asyncio.to_thread(maglev.build, members, size)
            proc = self.proc
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(json.dumps({"members": members, "size": size}).encode()
                                 + b"\n")
                await proc.stdin.drain()
                head = json.loads(await proc.stdout.readline())
                raw = await proc.stdout.readexactly(int(head.get("nbytes", 0)))
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
                self.close()
                raise RuntimeError(f"maglev builder process: {exc!r}") from None
            except BaseException:  # cancelled mid-build: its answer would come unasked
                self.close()
                raise
            if "error" in head:
                raise ValueError(head["error"])
            return tuple(head["names"]), array(head["typecode"], raw)

    def close(self) -> asyncio.subprocess.Process | None:
        """Kill the builder process (mid-build, its answer would come unasked)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        return proc

    async def aclose(self) -> None:
        proc = self.close()
        if proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 2.0)


class HashTables:
    """Keeps one current table per maglev pool and sends new ones with ``broadcast``."""

    def __init__(self, broadcast: Callable[[wl.Message], None],
                 on_built: Callable[[str, Built], None] | None = None) -> None:
        self._broadcast = broadcast
        self._on_built = on_built
        self.tables: dict[str, Built] = {}
        self._want: dict[str, tuple[Members, int]] = {}
        self._task: asyncio.Task[None] | None = None
        self.builds = 0
        self.failures = 0
        self.last_error: str | None = None
        self._failed: dict[str, tuple[tuple[Members, int], float]] = {}
        """Pool -> (what failed to build, when to try again): skipped until then, so one
        bad pool never holds up the others."""
        self._retry: asyncio.TimerHandle | None = None
        self._seen: dict[str, tuple[PoolConfig, frozenset[str], tuple[Members, int]]] = {}
        """Each pool's config object and removals at the last refresh: a push (every health
        change) re-derives a pool's members only when those changed (a sort of 3,000)."""
        self.builder = Builder()
        self._next_at = 0.0
        """Monotonic time before which no build starts (``PACE``)."""

    def refresh(self, pools: Mapping[str, PoolConfig],
                leaving: Collection[tuple[str, str]] = ()) -> None:
        """Note each maglev pool's members (O(N) for those pools only); start a build for
        the ones whose table is out of date. ``leaving``: (pool, backend) removed at
        runtime, draining."""
        want: dict[str, tuple[Members, int]] = {}
        for name, pcfg in pools.items():
            if pcfg.balance != "maglev":
                continue
            gone = frozenset(b for p, b in leaving if p == name) if leaving else frozenset()
            seen = self._seen.get(name)
            if seen is not None and seen[0] is pcfg and seen[1] == gone:
                want[name] = seen[2]  # same pool object, same removals: same members
                continue
            members = members_of(pcfg, gone)
            want[name] = (members, size_of(pcfg, members))
            self._seen[name] = (pcfg, gone, want[name])
        for name in list(self.tables):
            if name not in want:
                del self.tables[name]
        for name in list(self._seen):
            if name not in want:
                del self._seen[name]
        self._want = want
        self._kick()

    def _kick(self) -> None:
        self._retry = None
        if self._stale() and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="maglev_builds")

    def _stale(self, *, with_failed: bool = False) -> list[str]:
        """Pools whose table is out of date (not those whose build failed and waits for its
        retry, unless ``with_failed``)."""
        out = []
        now = time.monotonic()
        for name, want in self._want.items():
            cur = self.tables.get(name)
            if cur is not None and (cur.members, cur.size) == want:
                continue
            failed = self._failed.get(name)
            if not with_failed and failed is not None and failed[0] == want and failed[1] > now:
                continue
            out.append(name)
        return out

    async def _run(self) -> None:
        while True:
            stale = self._stale()
            if not stale:
                return
            await asyncio.sleep(max(DEBOUNCE_S, self._next_at - time.monotonic()))
            for name in self._stale():
                want = self._want.get(name)
                if want is None:
                    continue  # the pool left (a reload) while another one was built
                members, size = want
                t0 = time.monotonic()
                try:
                    names, table = await self.builder.build(members, size)
                    msg = table_message(name, names, size, table)
                except Exception as exc:  # never silent: the old table keeps serving
                    self.failures += 1
                    self.last_error = f"pool {name}: {exc!r}"
                    logger.exception("event=maglev_build_failed pool=%s retry_s=%g", name,
                                     RETRY_S)
                    self._failed[name] = (want, time.monotonic() + RETRY_S)
                    if self._retry is None:
                        self._retry = asyncio.get_running_loop().call_later(RETRY_S,
                                                                            self._kick)
                    continue
                self._failed.pop(name, None)
                if self._want.get(name) != (members, size):
                    continue  # changed while building: the next round builds it again
                t1 = time.monotonic()
                self._next_at = t1 + PACE * (t1 - t0)  # paced: a table the workers install
                built = Built(members, size, msg, time.monotonic() - t0, time.time())
                self.tables[name] = built
                self.builds += 1
                logger.info("event=maglev_table pool=%s members=%d size=%d build_ms=%.1f "
                            "digest=%s", name, len(members), size, built.build_s * 1000,
                            msg.digest)
                self._broadcast(msg)
                if self._on_built is not None:
                    self._on_built(name, built)

    async def settled(self, timeout_s: float = 30.0) -> None:
        """Wait until every table is current, or a build failed (tests; a node's start)."""
        async with asyncio.timeout(timeout_s):
            while self._stale():
                task = self._task
                if task is None or task.done():
                    self._task = task = asyncio.get_running_loop().create_task(self._run())
                await asyncio.shield(task)

    def messages(self) -> list[wl.HashTable]:
        """A new worker's tables (its welcome, before the snapshot)."""
        return [b.message for b in self.tables.values()]

    def status(self, pool: str) -> dict[str, Any] | None:
        want = self._want.get(pool)
        if want is None:
            return None
        b = self.tables.get(pool)
        return {
            "size": want[1],
            "members": len(want[0]),
            "digest": b.message.digest if b is not None else None,
            "built_members": len(b.members) if b is not None else 0,
            "current": b is not None and b.members == want[0] and b.size == want[1],
            "build_ms": round(b.build_s * 1000, 1) if b is not None else None,
            "built_at": b.built_at if b is not None else None,
        }

    async def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        if self._task is not None:
            self._task.cancel()
        await self.builder.aclose()
