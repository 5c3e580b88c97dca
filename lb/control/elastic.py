"""Pools that change at runtime: backends added and removed by the admin API, discovery and
the peer, applied without a reload and without rebuilding any pool.

One path for every change of a pool's members (:meth:`Elastic.set_member`, one name at a
time), whoever asks:

- **join**: the backend gets a rotation record and a health-check target (checked at once,
  DOWN until its first passing check: no request reaches it before), and every worker a
  ``PoolEdit`` adding it out of rotation; the next snapshot puts it in when it is UP. O(1)
  in the pool's size: no other backend loses its load, round-robin place or ejection.
- **leave**: the backend is drained first (no new requests from the next snapshot on; the
  requests in flight finish), and taken out of the table, the checker and the workers when
  the workers report none in flight or after ``[pool] drain_timeout_s``. Then the name is
  decided again: a replacement (the name at a new address) joins only now, so one name is
  never two servers at once. A reload in the middle of a drain keeps the draining backend
  (it is not in the new composition, or is there at a new address) until the drain ends.

Where the members come from, and which wins, is lb.control.overlay's composition (config,
then discovery, then the runtime overlay on top); this module applies its result and keeps
the source of each backend for /status.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from lb import worker_link as wl
from lb.config import BackendConfig, Config, DiscoveryConfig, PoolConfig, parse_hostport
from lb.control import overlay as ov
from lb.control.rotation import AdminState

if TYPE_CHECKING:
    from lb.control.daemon import Daemon

logger = logging.getLogger("lb.control.elastic")

MAX_BACKENDS_PER_POOL = 10_000
"""Runtime additions stop here: a runaway script must not grow a pool without bound."""
RECENT_REFUSALS = 20
SYNC_MAX_FRAME = 32 << 20
"""Largest frame to and from the peer: the whole overlay in one ``state`` frame after a
reconnect, up to overlay.MAX_ENTRIES entries of ~180 bytes (a pool of 10,000 backends and
months of removals fit)."""
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
        self.overlay = ov.Overlay(daemon.cfg.node.name)
        """Runtime intents (lb.control.overlay), loaded from the state dir at start-up."""
        self.store: Any = None
        """lb.control.overlay_store.OverlayStore of ``[node] state_dir`` (None: in memory)."""
        self.discovered: dict[str, tuple[str, tuple[BackendConfig, ...]]] = {}
        """pool -> (source, the backends discovery last found) (lb.control.discovery)."""
        self._config_index: dict[str, dict[str, BackendConfig]] = {}
        self._discovered_index: dict[str, dict[str, BackendConfig]] = {}
        self.notes: list[str] = []
        """What the last composition reported (shadowing, retirements, orphans)."""
        self.tombstoned: list[tuple[str, str]] = []
        self.discoveries: dict[str, tuple[Any, Any]] = {}
        """pool -> (its DiscoveryConfig, the lb.control.discovery.Discovery running it)."""
        self._stopping: set[asyncio.Task[Any]] = set()
        self.sync_error: str | None = None
        self._compacting = False
        self.store_error: str | None = None
        self.sync: Any = None
        """lb.control.sync.SyncChannel to the peer (with [failover] and [sync] enabled)."""
        self.refusals: deque[dict[str, Any]] = deque(maxlen=RECENT_REFUSALS)
        """Runtime changes refused by the peer (ours) or here (the peer's), newest last."""
        self.counts: dict[str, int] = {"applied_local": 0, "applied_peer": 0,
                                       "refused_by_peer": 0, "refused_here": 0,
                                       "conflicts": 0, "pending": 0}
        self._pending: set[tuple[str, str]] = set()
        """Changes being written to disk: a second change of the same name waits (409)."""
        self.peer_seen: dict[str, int] | None = None
        """The peer's replication cursors from its last whole state (None: no peer). A
        removal is forgotten only once the peer has merged it (lb.control.overlay)."""
        self._cancelled: list[tuple[str, str]] = []
        """Drains a reload ended (the name is wanted again at that address): re-enabled."""

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
        # The workers' new backend starts out of rotation whatever they last got for that
        # name (a re-add, a replacement): the next push names it even if its entry did not
        # change.
        d.force_entry(pool, backend.name)

    def leave_now(self, pool: str, name: str) -> bool:
        """Take the backend out everywhere at once (after its drain); then the name is what
        the overlay and the config want now (a replacement's new server joins)."""
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
        d.forget_backend(pool, name)
        d.push_soon()
        self.apply_key(pool, name)
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
        d.push_soon()  # coalesced: a burst of removals is one snapshot, not one each
        self.removing[key] = time.monotonic() + timeout_s
        self._drains[key] = asyncio.get_running_loop().create_task(
            self._drain(pool, name, timeout_s), name=f"drain {pool}/{name}")

    def _cancel_drain(self, key: tuple[str, str]) -> None:
        task = self._drains.pop(key, None)
        if task is not None:
            task.cancel()
        self.removing.pop(key, None)

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

    def set_member(self, pool: str, name: str, want: tuple[BackendConfig, Origin] | None) -> None:
        """Make one name of ``pool`` what ``want`` says (None: not a member): leave
        (drained), join, or replace a name now at another address (a new server: the old
        one drains, the new one joins once it has left); a new weight goes to the record.
        A name that is draining is decided again when it has left (:meth:`leave_now`)."""
        key = (pool, name)
        if key in self.removing:
            return
        have = self.d.table.backend(pool, name)
        if have is None:
            if want is not None:
                self.join(pool, *want)
            return
        if want is None or want[0].address != have.address:
            self.drain_then_leave(pool, name)
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

    # -- composition --------------------------------------------------------------------------

    def compose(self, cfg: Config) -> tuple[list[PoolConfig], list[str]]:
        """The effective pools of ``cfg`` (its pools, discovery, the overlay on top: the
        precedence of lb.control.overlay.compose) and the notes to report. Sets each
        backend's origin and retires the overlay entries the config now carries."""
        wanted_discovery = {p.name for p in cfg.pool if p.discovery is not None}
        for pool in [p for p in self.discovered if p not in wanted_discovery]:
            del self.discovered[pool]  # [pool.discovery] removed: its set goes at once
            self._discovered_index.pop(pool, None)
        comp = ov.compose(cfg.pool, self.overlay, self.discovered, now=time.time(),
                          peer_seen=(self.peer_seen or {}) if self._paired(cfg) else None)
        retired = [r for key in comp.retire if (r := self.overlay.retire(*key)) is not None]
        if retired:
            self._journal_now(retired)
        self.notes = list(comp.notes)
        self.tombstoned = list(comp.tombstoned)
        self._config_index = {p.name: {b.name: b for b in p.backends} for p in cfg.pool}
        origins: dict[tuple[str, str], Origin] = {}
        members: dict[str, dict[str, BackendConfig]] = {}
        for pcfg in cfg.pool:
            eff = comp.pools.get(pcfg.name, [])
            members[pcfg.name] = {e.backend.name: e.backend for e in eff}
            for e in eff:
                origins[(pcfg.name, e.backend.name)] = Origin(e.source, e.shadows, e.patched)
        # Drains outlive a reload: a backend draining stays (as it is) until its drain
        # ends, unless the new composition wants it back at the same address.
        self._cancelled = []
        for key in list(self.removing):
            pool, name = key
            have = self.d.table.backend(pool, name)
            if pool not in members or have is None:
                self._cancel_drain(key)  # the pool is gone: everything of it goes
                continue
            want = members[pool].get(name)
            if want is not None and want.address == have.address:
                self._cancel_drain(key)
                self._cancelled.append(key)
                continue
            members[pool][name] = have  # the old server drains; a new one joins after
            origins[key] = self.origins.get(key, Origin("config"))
        self.origins = origins
        pools = [pcfg.model_copy(update={"backends": tuple(members[pcfg.name].values())})
                 for pcfg in cfg.pool]
        return pools, self.notes

    def _paired(self, cfg: Config) -> bool:
        return cfg.failover is not None and cfg.sync.enabled

    def want(self, pool: str, name: str) -> tuple[BackendConfig, Origin] | None:
        """What one name of ``pool`` should be now: lb.control.overlay.compose's rules for
        one register (tests check both agree), in O(1) instead of O(pool)."""
        base: tuple[BackendConfig, str] | None = None
        b = self._config_index.get(pool, {}).get(name)
        if b is not None:
            base = (b, "config")
        else:
            b = self._discovered_index.get(pool, {}).get(name)
            if b is not None:
                base = (b, self.discovered[pool][0])
        intent = self.overlay.entries.get((pool, name))
        if intent is None:
            return None if base is None else (base[0], Origin(base[1]))
        if intent.state == "removed":
            return None
        if intent.address is None:  # a weight patch of a base backend
            if base is None:
                return None
            if base[1] == "config" and base[0].weight == intent.weight:
                return base[0], Origin("config")
            return (base[0].model_copy(update={"weight": intent.weight}),
                    Origin(base[1], None, True))
        added = BackendConfig.model_construct(
            name=name, address=intent.address, weight=intent.weight)
        if base is None:
            return added, Origin("api")
        same = ov.same_definition(base[0], intent)
        if same and base[1] == "config":
            return base[0], Origin("config")
        return added, Origin("api", None if same else base[1])

    def apply_key(self, pool: str, name: str) -> None:
        if pool in self.d.table.rotations:
            self.set_member(pool, name, self.want(pool, name))

    # -- start, reload, stop ----------------------------------------------------------------

    def load(self) -> list[str]:
        """Read the overlay from ``[node] state_dir`` (start-up, before the first
        composition); warnings to log. Raises OverlayStoreError naming the file and line:
        never start on a silently emptied overlay (it would resurrect or withdraw
        backends)."""
        from lb.control.overlay_store import OverlayStore, OverlayStoreError

        cfg = self.d.cfg
        store = OverlayStore(cfg.node.state_dir, cfg.node.name)
        try:
            self.overlay = store.load()
        except OverlayStoreError as exc:
            if "state_dir" in cfg.node.model_fields_set or os.path.exists(cfg.node.state_dir):
                raise
            # The default directory cannot be made (not root, no StateDirectory=): run,
            # but say that runtime changes will not outlive this process.
            self.store_error = str(exc)
            self._clock_floor()
            return [f"{exc}: runtime pool changes are kept in memory only; set [node] "
                    f"state_dir to a directory pairlb can write"]
        self.store = store
        self._clock_floor()
        return list(store.warnings)

    def _clock_floor(self) -> None:
        """Start the overlay's Lamport clock no lower than the wall clock in ms: a node
        restored from an old state_dir (its counter went back) then still stamps its next
        changes above the ones it made before, instead of reusing their stamps."""
        self.overlay.lamport = max(self.overlay.lamport,
                                   min(ov.INT_MAX - 1, int(time.time() * 1000)))

    def start(self) -> None:
        """Discovery runners and the sync channel (after the checker and the table)."""
        self._reconfigure_discovery(self.d.cfg)
        self._start_sync(self.d.cfg)

    def reconfigured(self, cfg: Config) -> list[str]:
        """A reload took ``cfg``: runners for new or changed ``[pool.discovery]``, stopped
        for the rest; the peer channel rekeyed; a drain the reload ended (the name is wanted
        again at the same address) puts the backend back in rotation."""
        for key in self._cancelled:  # wanted back at the same address: serves again
            if self.d.table.backend(*key) is not None:
                self.d.table.set_admin(*key, AdminState.ENABLED)
        self._cancelled = []
        changes = self._reconfigure_discovery(cfg)
        if self.sync is not None and cfg.failover is not None:
            import failover

            self.sync.rekey([failover.load_key(p) for p in cfg.failover.key_paths])
        return changes

    def _reconfigure_discovery(self, cfg: Config) -> list[str]:
        from lb.control import discovery as disc

        changes = []
        wanted = {p.name: p.discovery for p in cfg.pool if p.discovery is not None}
        for pool, (dcfg, runner) in list(self.discoveries.items()):
            if wanted.get(pool) != dcfg:
                del self.discoveries[pool]
                self._background(runner.stop())
                if pool not in wanted:
                    self.discovered.pop(pool, None)
                    self._discovered_index.pop(pool, None)
                    changes.append(f"pool {pool}: discovery stopped")
        for pool, dcfg in wanted.items():
            if pool in self.discoveries:
                continue
            current = self.discovered.get(pool)
            initial = None if current is None else [
                (b.name, b.address, b.weight) for b in current[1]]
            runner = disc.Discovery(pool, discovery_spec(dcfg), self.on_discovered,
                                    initial=initial)
            runner.start()
            self.discoveries[pool] = (dcfg, runner)
            changes.append(f"pool {pool}: discovery {dcfg.type} started")
        return changes

    def _start_sync(self, cfg: Config) -> None:
        fcfg = cfg.failover
        if fcfg is None or not cfg.sync.enabled:
            return
        import failover
        from lb.control.sync import SyncChannel

        port = cfg.sync.port or fcfg.port
        peers = [(peer_host(p), port) for p in fcfg.peers]
        v6 = any(":" in h for h, _ in peers)
        host = cfg.sync.bind or fcfg.bind or ("::" if v6 else "0.0.0.0")
        channel = SyncChannel(cfg.node.name, [failover.load_key(p) for p in fcfg.key_paths],
                              (host, port), peers, self, op_timeout_s=cfg.sync.op_timeout_s,
                              max_frame=SYNC_MAX_FRAME)
        try:
            channel.start()
        except OSError as exc:
            self.sync_error = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
            logger.error("event=sync_start_failed error=%r", self.sync_error)
            self.d.record_event("sync", f"not started: {self.sync_error}")
            return
        self.sync = channel

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    # -- discovery -------------------------------------------------------------------------

    def on_discovered(self, pool: str, backends: list[tuple[str, str, int]], source: str
                      ) -> None:
        """lb.control.discovery found a new set for ``pool``: apply the difference."""
        if pool not in self.d.table.rotations:
            return
        new = {n: BackendConfig.model_construct(name=n, address=a, weight=w)
               for n, a, w in backends}
        old = self._discovered_index.get(pool, {})
        self.discovered[pool] = (source, tuple(new.values()))
        self._discovered_index[pool] = new
        changed = [n for n in new.keys() | old.keys()
                   if n not in old or n not in new or old[n].address != new[n].address
                   or old[n].weight != new[n].weight]
        for name in sorted(changed):
            self.apply_key(pool, name)
        logger.info("event=discovery_changed pool=%s source=%s backends=%d changed=%d",
                    pool, source, len(new), len(changed))
        self.d.record_event("discovery", f"pool {pool}: {source} now gives {len(new)} "
                                         f"backend(s), {len(changed)} changed")

    # -- the peer (lb.control.sync's SyncHandler) ----------------------------------------------

    def config_digest(self) -> str:
        return self.d.cfg.digest()

    def overlay_digest(self) -> str:
        return self.overlay.digest()

    def state(self) -> dict[str, Any]:
        return {"entries": ov.entries_to_wire(self.overlay.entries.values()),
                "seen": dict(self.overlay.seen)}

    async def on_op(self, op: dict[str, Any]) -> tuple[str, str]:
        """One change from the peer: merged (LWW) and kept on disk whatever this node's
        config says, so both overlays converge; applied if this node's config allows it,
        else refused with the reason (reported on both nodes; it applies here at a reload
        that brings the pool)."""
        try:
            intent = ov.from_wire(op)
        except ov.OverlayError as exc:
            return self._refuse_here(op, f"malformed: {exc}")
        merged = self.overlay.merge(intent)
        if merged.conflict is not None:
            self._conflict(intent, merged.conflict, merged.won)
        if merged.won:
            await self._journal([intent])
        pool, name = intent.key
        if pool not in self.d.table.rotations:
            return self._refuse_here(op, f"pool {pool}: no such pool on {self.d.cfg.node.name} "
                                         f"(config digest {self.d.cfg.digest()} here)")
        if (intent.state == "present" and intent.address is not None and merged.won
                and self.d.table.backend(pool, name) is None
                and len(self.d.table.rotations[pool].records) >= MAX_BACKENDS_PER_POOL):
            return self._refuse_here(op, f"pool {pool}: {MAX_BACKENDS_PER_POOL} backends "
                                         f"already")
        if merged.won:
            self.apply_key(pool, name)
            self.counts["applied_peer"] += 1
            what = "removed" if intent.state == "removed" else f"set to {intent.address}"
            self.d.record_event("backend", f"{pool}/{name} {what} (from {intent.origin})")
        elif not merged.duplicate:
            cur = self.overlay.entries.get(intent.key)
            by = cur.origin if cur is not None else "?"
            return ("refused", f"superseded: {pool}/{name} has a later change here "
                               f"(from {by}), which both nodes keep")
        return ("applied", "")

    async def on_state(self, state: dict[str, Any]) -> None:
        """The peer's whole overlay (after a reconnect, or when the digests differ)."""
        try:
            entries = ov.entries_from_wire(state.get("entries"), "state.entries")
            seen = ov.seen_from_wire(state.get("seen", {}), "state.seen")
        except ov.OverlayError as exc:
            logger.error("event=sync_state_refused error=%r", str(exc))
            return
        merged = dict(self.peer_seen or {})
        for origin, seq in seen.items():
            merged[origin] = max(seq, merged.get(origin, 0))
        self.peer_seen = merged
        changed = self.overlay.merge_state(entries, seen, self._conflict)
        if not changed:
            return
        await self._journal([self.overlay.entries[k] for k in changed
                             if k in self.overlay.entries])
        for pool, name in changed:
            self.apply_key(pool, name)
        logger.info("event=sync_state_merged changed=%d", len(changed))
        self.d.record_event("sync", f"{len(changed)} runtime change(s) from the peer merged")

    def on_ack(self, origin: str, seq: int, result: str, reason: str) -> None:
        if result != "applied":
            self.counts["refused_by_peer"] += 1
            self.refusals.append({"at": time.time(), "where": "peer", "reason": reason})
            logger.error("event=sync_refused_by_peer seq=%d reason=%r", seq, reason)
            self.d.record_event("sync", f"the peer refused change {seq}: {reason}")

    def on_peer(self, node: str | None) -> None:
        self.d.record_event("sync", f"peer {node} connected" if node else "a peer disconnected")

    def _refuse_here(self, op: dict[str, Any], reason: str) -> tuple[str, str]:
        self.counts["refused_here"] += 1
        what = f"{op.get('pool', '?')}/{op.get('backend', '?')}" if isinstance(op, dict) else "?"
        self.refusals.append({"at": time.time(), "where": "here", "change": what[:140],
                              "reason": reason})
        logger.error("event=sync_op_refused change=%s reason=%r", what[:140], reason)
        self.d.record_event("sync", f"refused {what[:140]} from the peer: {reason}")
        return ("refused", reason)

    def _conflict(self, intent: ov.Intent, other: ov.Intent, won: bool) -> None:
        self.counts["conflicts"] += 1
        winner, loser = (intent, other) if won else (other, intent)
        logger.warning("event=sync_conflict pool=%s backend=%s winner=%s loser=%s",
                       intent.pool, intent.backend, winner.origin, loser.origin)
        self.d.record_event("sync", f"{intent.pool}/{intent.backend}: concurrent changes, "
                                    f"{winner.origin}'s kept")

    # -- persistence -----------------------------------------------------------------------

    async def _journal(self, records: list[Any]) -> None:
        """Durable before the caller answers (group-committed with concurrent changes);
        the journal compacted into the snapshot when it has grown."""
        store = self.store
        if store is None or not records:
            return
        await store.append_async(records)
        if store.needs_compaction() and not self._compacting:
            self._compacting = True
            self._background(self._compact())

    async def _compact(self) -> None:
        try:
            await self.store.compact_async(self.overlay)
        except Exception as exc:  # the journal still holds everything: retried next time
            logger.error("event=overlay_compaction_failed error=%r", str(exc))
        finally:
            self._compacting = False

    def _journal_now(self, records: list[Any]) -> None:
        """Retirements found by a composition: journaled in the background (they are
        found again from the same config if this write is lost)."""
        if self.store is not None and records:
            self._background(self.store.append_async(records))

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
        adding = sum(1 for p, _ in self._pending if p == pool)  # their journal writes run
        if len(d.table.rotations[pool].records) + adding >= MAX_BACKENDS_PER_POOL:
            raise ChangeRefused(409, f"pool {pool!r} has {MAX_BACKENDS_PER_POOL} backends, "
                                     f"the most a pool may have")
        self._pending.add(key)
        try:
            peer = await self._record(pool, name, "present", b.address, b.weight, via)
            self.apply_key(pool, name)
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
        if key in self.removing and self.want(pool, name) is None:
            return self._removing_answer(pool, name, {})  # removed already, draining
        # (Draining as the old server of a replacement: the removal is recorded, so the
        # new server never joins.)
        self._pending.add(key)
        try:
            peer = await self._record(pool, name, "removed", None, None, via)
            self.apply_key(pool, name)
        finally:
            self._pending.discard(key)
        d.record_event("backend", f"{pool}/{name} removed ({via}): draining")
        return self._removing_answer(pool, name, peer)

    def _removing_answer(self, pool: str, name: str, peer: dict[str, str]) -> dict[str, Any]:
        until = self.removing.get((pool, name))
        return {"pool": pool, "backend": name, "removing": until is not None,
                "drain_timeout_s": self.d.table.pools[pool].drain_timeout_s,
                "in_flight": self.d.backend_inflight(pool, name), "peer": peer}

    async def _record(self, pool: str, name: str, state: ov.State, address: str | None,
                      weight: int | None, via: str) -> dict[str, str]:
        """Make the change an intent of the overlay, keep it on disk (durable before the
        API answers) and send it to the peer; the peer's answer by node name."""
        from lb.control.overlay_store import OverlayStoreError

        previous = self.overlay.entries.get((pool, name))
        try:
            intent = self.overlay.local(pool, name, state, address, weight, via, time.time())
        except ov.OverlayError as exc:
            raise ChangeRefused(400, f"body: {exc}") from None
        try:
            await self._journal([intent])
        except OverlayStoreError as exc:
            # Not on disk: not made at all (a 201 promises the change survives a restart).
            self.overlay.restore(intent, previous)
            logger.error("event=overlay_write_failed pool=%s backend=%s error=%r",
                         pool, name, str(exc))
            raise ChangeRefused(503, f"node.state_dir: {exc}: the change was not made") from None
        self.counts["applied_local"] += 1
        sync = self.sync
        if sync is None:
            return {}
        ack = await sync.send_op(ov.to_wire(intent))
        self.counts["pending"] += sum(1 for r in ack.peers.values() if r == "pending")
        return dict(ack.peers)

    def origin(self, pool: str, name: str) -> Origin:
        return self.origins.get((pool, name), Origin("config"))


    async def stop(self) -> None:
        if self.sync is not None:
            await self.sync.stop()
        for _, runner in self.discoveries.values():
            await runner.stop()
        self.discoveries.clear()
        tasks = list(self._drains.values())
        self._drains.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for t in list(self._stopping):  # journal writes and runner stops: let them finish
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(t, 5.0)
        if self.store is not None:
            self.store.close()

    def discovery_status(self, pool: str) -> dict[str, Any] | None:
        found = self.discoveries.get(pool)
        return None if found is None else dict(found[1].status())

    def status(self) -> dict[str, Any]:
        """/status ``runtime``: the overlay, what the last composition said, the changes
        made and refused, the peer channel."""
        sync: dict[str, Any] | None = None
        if self.sync is not None:
            sync = self.sync.status()
        elif self.sync_error is not None:
            sync = {"error": self.sync_error}
        return {
            "state_dir": self.d.cfg.node.state_dir,
            "persistent": self.store is not None,
            "overlay": {"entries": len(self.overlay), "digest": self.overlay.digest(),
                        "lamport": self.overlay.lamport,
                        "journal_lines": getattr(self.store, "log_lines", 0)},
            "notes": list(self.notes),
            "removing": [f"{p}/{n}" for p, n in self.removing],
            "changes": dict(self.counts),
            "refusals": list(self.refusals),
            "sync": sync,
        }


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


def discovery_spec(dcfg: DiscoveryConfig) -> Any:
    """The lb.control.discovery spec of a ``[pool.discovery]`` section."""
    from lb.control import discovery as disc

    if dcfg.type == "file":
        assert dcfg.path is not None
        return disc.FileSpec(dcfg.path, interval_s=dcfg.interval_s)
    assert dcfg.name is not None
    return disc.DnsSpec(dcfg.name, record=dcfg.record, port=dcfg.port,
                        resolvers=dcfg.resolvers, min_ttl_s=dcfg.min_ttl_s,
                        max_ttl_s=dcfg.max_ttl_s, timeout_s=dcfg.timeout_s, weight=dcfg.weight)


def peer_host(peer: str) -> str:
    """The address of a ``[failover] peers`` entry (``ip``, ``ip:port``, ``[v6]:port``)."""
    bare = peer[1:-1] if peer.startswith("[") and peer.endswith("]") else peer
    try:
        ipaddress.ip_address(bare)
        return bare
    except ValueError:
        return parse_hostport(peer)[0]
