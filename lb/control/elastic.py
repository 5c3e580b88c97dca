"""Pools that change at runtime: backends added and removed by the admin API, discovery and
the peer, applied without a reload and without rebuilding any pool.

One path for every change of a pool's members (:meth:`Elastic.set_members` and the single
steps it takes), whoever asks:

- **join**: the backend gets a rotation record and a health-check target (checked at once,
  DOWN until its first passing check: no request reaches it before), and every worker a
  ``PoolEdit`` adding it out of rotation; the next snapshot puts it in when it is UP. O(1)
  in the pool's size: no other backend loses its load, round-robin place or ejection.
- **leave**: the backend is drained first (no new requests from the next snapshot on; the
  requests in flight finish), and taken out of the table, the checker and the workers when
  the workers report none in flight or after ``[pool] drain_timeout_s``.

Where the members come from, and which wins, is lb.control.overlay's composition (config,
then discovery, then the runtime overlay on top); this module applies its result and keeps
the source of each backend for /status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from lb import worker_link as wl
from lb.config import BackendConfig
from lb.control.rotation import AdminState

if TYPE_CHECKING:
    from lb.control.daemon import Daemon

logger = logging.getLogger("lb.control.elastic")

MAX_BACKENDS_PER_POOL = 10_000
"""Runtime additions stop here: a runaway script must not grow a pool without bound."""
STATS_SETTLE_S = 0.6
"""A drain trusts the workers' in-flight counts only after this long: they report every
0.25 s, so a request picked just before the drain snapshot arrived shows up in the next
report, not the one before it."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a backend of the effective pool comes from (shown in /status)."""

    source: str  # "config" | "api" | "dns" | "file"
    shadows: str | None = None
    """The source whose backend of the same name this one replaces (the overlay wins)."""
    patched: bool = False
    """A config backend whose weight the overlay changed."""


class Elastic:
    """Runtime membership of the daemon's pools (module docstring)."""

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self.origins: dict[tuple[str, str], Origin] = {}
        self.removing: dict[tuple[str, str], float] = {}
        """Backends draining before they leave: key -> when the drain gives up (monotonic)."""
        self._drains: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._pending: set[tuple[str, str]] = set()
        """Changes being written to disk: a second change of the same name waits (409)."""
        self._after_leave: dict[tuple[str, str], tuple[BackendConfig, Origin]] = {}
        """Wanted again (or at a new address) while draining: joins once it has left."""

    # -- single steps -----------------------------------------------------------------------

    def join(self, pool: str, backend: BackendConfig, origin: Origin) -> None:
        """Add ``backend`` to ``pool`` everywhere (module docstring). The caller has checked
        the name is free; raises ValueError if it is not."""
        d = self.d
        d.table.add_backend(pool, backend)
        target = d.table.target(pool, backend)
        if target is not None:
            d.health.add_target(target)
        self.origins[(pool, backend.name)] = origin
        d.supervisor.broadcast(wl.PoolEdit(
            d.generation, pool, add=((backend.name, backend.address, backend.weight),)))
        d.push_soon()

    def leave_now(self, pool: str, name: str) -> bool:
        """Take the backend out everywhere at once (after its drain)."""
        d = self.d
        key = (pool, name)
        task = self._drains.pop(key, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self.removing.pop(key, None)
        if not d.table.remove_backend(pool, name):
            return False
        d.health.remove_target(key)
        self.origins.pop(key, None)
        d.supervisor.broadcast(wl.PoolEdit(d.generation, pool, remove=(name,)))
        d.push_soon()
        again = self._after_leave.pop(key, None)
        if again is not None:
            self.join(pool, *again)
        return True

    def drain_then_leave(self, pool: str, name: str, timeout_s: float | None = None) -> None:
        """No new requests to it from the next snapshot; it leaves when the workers report
        nothing in flight (or after the pool's drain_timeout_s)."""
        d = self.d
        key = (pool, name)
        if key in self._drains:
            return
        if timeout_s is None:
            timeout_s = d.table.pools[pool].drain_timeout_s
        d.table.set_admin(pool, name, AdminState.DRAINING)
        d.push_snapshots()
        self.removing[key] = time.monotonic() + timeout_s
        self._drains[key] = asyncio.get_running_loop().create_task(
            self._drain(pool, name, timeout_s), name=f"drain {pool}/{name}")

    async def _drain(self, pool: str, name: str, timeout_s: float) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        await asyncio.sleep(min(STATS_SETTLE_S, timeout_s))
        # The counts arrive with the workers' stats, not as events: polled.
        while time.monotonic() < deadline and self.d.backend_inflight(pool, name) > 0:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        left = self.d.backend_inflight(pool, name)
        self._drains.pop((pool, name), None)
        logger.info("event=backend_removed pool=%s backend=%s drained_s=%.2f in_flight_left=%d",
                    pool, name, time.monotonic() - t0, left)
        self.leave_now(pool, name)

    def set_members(self, pool: str, wanted: Mapping[str, tuple[BackendConfig, Origin]]) -> None:
        """Make ``pool``'s members ``wanted`` (:meth:`set_member` for every name either
        side has)."""
        d = self.d
        if pool not in d.table.rotations:
            return
        names = [b.name for b in d.table.pools[pool].backends]
        names += [n for n in wanted if d.table.backend(pool, n) is None]
        names += [n for p, n in self._after_leave if p == pool and n not in wanted]
        for name in names:
            self.set_member(pool, name, wanted.get(name))

    def set_member(self, pool: str, name: str, want: tuple[BackendConfig, Origin] | None) -> None:
        """Make one name of ``pool`` what ``want`` says (None: not a member): leave
        (drained), join, or replace a name now at another address (a new server: the old
        one drains, the new one joins once it has left); a new weight goes to the record."""
        key = (pool, name)
        if key in self.removing:
            if want is None:
                self._after_leave.pop(key, None)
            else:
                self._after_leave[key] = want  # joins, as a new server, once it has left
            return
        have = self.d.table.backend(pool, name)
        if have is None:
            if want is not None:
                self.join(pool, *want)
            return
        if want is None or want[0].address != have.address:
            self.drain_then_leave(pool, name)
            if want is not None:
                self._after_leave[key] = want
            return
        self.origins[key] = want[1]
        if have.weight != want[0].weight:
            self.set_weight(pool, want[0])

    def set_weight(self, pool: str, backend: BackendConfig) -> None:
        d = self.d
        rec = d.table.rotations[pool].records.get(backend.name)
        if rec is None or rec.weight == backend.weight:
            return
        rec.weight = backend.weight
        pcfg = d.table.pools[pool]
        d.table.pools[pool] = pcfg.model_copy(update={"backends": tuple(
            backend if b.name == backend.name else b for b in pcfg.backends)})
        d.push_soon()

    # -- the admin API's changes -------------------------------------------------------------

    async def add(self, pool: str, name: str, address: str, weight: int,
                  via: str = "api") -> dict[str, Any]:
        """``POST /pools/{pool}/backends``: validated, kept on disk, applied here, sent to
        the peer. Raises ChangeRefused (400/404/409) before changing anything."""
        d = self.d
        if pool not in d.table.rotations:
            raise ChangeRefused(404, f"no pool named {pool!r}")
        try:
            b = BackendConfig(name=name, address=address, weight=weight)
        except ValidationError as exc:
            raise ChangeRefused(400, first_error(exc, "body")) from None
        key = (pool, name)
        if key in self.removing or key in self._pending:
            raise ChangeRefused(409, f"{pool}/{name} is being removed or changed: try again "
                                     f"once /status no longer lists it as removing")
        have = d.table.backend(pool, name)
        if have is not None:
            raise ChangeRefused(409, f"pool {pool!r} has a backend named {name!r} (at "
                                     f"{have.address}): remove it first")
        if len(d.table.rotations[pool].records) >= MAX_BACKENDS_PER_POOL:
            raise ChangeRefused(409, f"pool {pool!r} has {MAX_BACKENDS_PER_POOL} backends, "
                                     f"the most a pool may have")
        self._pending.add(key)
        try:
            peer = await self._record(pool, name, "present", b.address, b.weight, via)
            self.set_member(pool, name, (b, Origin("api")))
        finally:
            self._pending.discard(key)
        d.record_event("backend", f"{pool}/{name} added at {b.address} ({via})")
        logger.info("event=backend_added pool=%s backend=%s address=%s weight=%d via=%s",
                    pool, name, b.address, b.weight, via)
        return {"pool": pool, "backend": {"name": name, "address": b.address,
                                          "weight": b.weight},
                "source": "api", "in_rotation": False, "peer": peer}

    async def remove(self, pool: str, name: str, via: str = "api") -> dict[str, Any]:
        """``DELETE /pools/{pool}/backends/{name}``: a tombstone kept on disk and sent to
        the peer; the backend drains, then leaves (module docstring)."""
        d = self.d
        if pool not in d.table.rotations:
            raise ChangeRefused(404, f"no pool named {pool!r}")
        key = (pool, name)
        if key in self._pending:
            raise ChangeRefused(409, f"{pool}/{name} is being changed: try again")
        have = d.table.backend(pool, name)
        if have is None:
            raise ChangeRefused(404, f"no backend named {name!r} in pool {pool!r}")
        if key in self.removing:
            return self._removing_answer(pool, name, {})
        self._pending.add(key)
        try:
            peer = await self._record(pool, name, "removed", None, None, via)
            self.set_member(pool, name, None)
        finally:
            self._pending.discard(key)
        d.record_event("backend", f"{pool}/{name} removed ({via}): draining")
        return self._removing_answer(pool, name, peer)

    def _removing_answer(self, pool: str, name: str, peer: dict[str, str]) -> dict[str, Any]:
        until = self.removing.get((pool, name))
        return {"pool": pool, "backend": name, "removing": until is not None,
                "drain_timeout_s": self.d.table.pools[pool].drain_timeout_s,
                "in_flight": self.d.backend_inflight(pool, name), "peer": peer}

    async def _record(self, pool: str, name: str, state: str, address: str | None,
                      weight: int | None, via: str) -> dict[str, str]:
        """Keep the change on disk and send it to the peer (lb.control.overlay, sync);
        the peer's answer by node name."""
        return {}

    def origin(self, pool: str, name: str) -> Origin:
        return self.origins.get((pool, name), Origin("config"))

    def forget_pool(self, pool: str) -> None:
        for key in [k for k in self._drains if k[0] == pool]:
            self._drains.pop(key).cancel()
            self.removing.pop(key, None)
        for key in [k for k in self.origins if k[0] == pool]:
            del self.origins[key]
        for key in [k for k in self._after_leave if k[0] == pool]:
            del self._after_leave[key]

    async def stop(self) -> None:
        tasks = list(self._drains.values())
        self._drains.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def status(self) -> dict[str, Any]:
        return {"removing": [f"{p}/{n}" for p, n in self.removing]}


class ChangeRefused(Exception):
    """A runtime change that cannot be made: ``status`` is the admin API's answer (400 bad
    input, 404 unknown pool or backend, 409 a conflict), ``message`` names the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def first_error(exc: ValidationError, prefix: str) -> str:
    """One line naming the field, as the config's errors do."""
    e = exc.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = str(e["msg"]).removeprefix("Value error, ")
    return f"{prefix}{'.' + loc if loc else ''}: {msg}"
