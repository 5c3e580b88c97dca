"""The control process: the composition root that wires config, workers, checks and failover.

Runs on the stdlib asyncio loop (pyroute2 does not run on uvloop). It owns the listening
sockets (created once, shared by every worker), the control-side pool state
(``lb.control.rotation``), the health checker, the admin app and sd_notify, and supervises the
proxy workers and the failover process (lb.control.failover_process: heartbeats and the VIP run
there, on a loop of their own, and this process only keeps the status it last reported).
Phases are separate and ordered: startup, main loop (signals are queued by their handlers
and dispatched here), shutdown. A second SIGTERM or SIGINT during shutdown forces exit.

Nothing here should block the loop (health verdicts, admin answers and worker supervision
wait on it), but nothing here can delay a heartbeat either: a control process silent for
``failover.control_timeout_s`` makes the failover process give the VIP away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import ipaddress
import logging
import os
import signal
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from healthcheck import CheckResult, Health, HealthBook, HealthChecker, HealthCounter, Lateness
from lb import __version__, sysutil
from lb import config as config_mod
from lb import worker_link as wl
from lb.config import Config, PoolConfig
from lb.control import status as status_mod
from lb.control.acceptwatch import ACCEPT_WATCH_S, AcceptWatch
from lb.control.backends import BackendTable
from lb.control.elastic import Elastic
from lb.control.hashing import HashTables
from lb.control.rotation import AdminState, Snapshot
from lb.control.supervisor import Supervisor, WorkerHandle
from lb.control.tls import (
    TICKET_KEY_ROTATE_S,
    TlsKeeper,
    log_certificates,
    shadowed,
    tls_changes,
)
from lb.listen import accept_queue, make_listen_sockets, update_listen_sockets
from lb.sdnotify import Notifier, watchdog_interval_s

logger = logging.getLogger("lb.control.daemon")

RECENT_EVENTS = 50
FAILOVER_RELOADABLE = ("key_file", "key_files", "max_clock_skew_s")
"""[failover] keys a reload applies (FailoverController.reconfigure); the rest need a restart."""
ACCEPT_GRACE_S = 0.1
"""After a graceful stop handed the VIP over: how long the listeners stay open (see shutdown)."""
HEALTH_PUSH_GAP_S = 0.01
"""Health transitions and ejections go to the workers in one snapshot per loop pass, and at
most one such snapshot per this many seconds: a snapshot costs O(backends), so 3000 backends
changing state one snapshot each (start-up, a rack that died) would cost O(N^2) and starve
the loop."""


def failover_spec(cfg: Config) -> Any:
    """The failover.FailoverSpec of `cfg` (which has a [failover]), keys loaded from disk.

    Raises failover.FailoverError (KeyFileError, FailoverConfigError) naming the problem.
    """
    import failover

    fcfg = cfg.failover
    assert fcfg is not None
    keys = [failover.load_key(path) for path in fcfg.key_paths]
    return failover.FailoverSpec(
        node_name=cfg.node.name,
        interface=fcfg.interface,
        vips=fcfg.vips,
        priority=fcfg.priority,
        peers=fcfg.peers,
        key=keys[0],
        verify_keys=tuple(keys[1:]),
        port=fcfg.port,
        bind=fcfg.bind,
        multicast_group=fcfg.multicast_group,
        interval_s=fcfg.interval_s,
        down_after=fcfg.down_after,
        preempt=fcfg.preempt,
        preempt_delay_s=fcfg.preempt_delay_s,
        notify=fcfg.notify,
        notify_timeout_s=fcfg.notify_timeout_s,
        config_digest=cfg.digest_bytes(failover.DIGEST_LEN),
        max_clock_skew_s=fcfg.max_clock_skew_s,
        handover_forward_s=fcfg.handover_forward_s,
        track_gateway=fcfg.track_gateway,
        track_gateway_interval_s=fcfg.track_gateway_interval_s,
        track_gateway_timeout_s=fcfg.track_gateway_timeout_s,
        track_gateway_fall=fcfg.track_gateway_fall,
        track_gateway_rise=fcfg.track_gateway_rise,
    )


def merge_counts(dst: dict[str, Any], delta: dict[str, Any]) -> None:
    """Add a worker's counter delta (nested dicts/lists of numbers) into the totals."""
    for k, v in delta.items():
        if isinstance(v, dict):
            merge_counts(dst.setdefault(k, {}), v)
        elif isinstance(v, list):
            cur = dst.setdefault(k, [0] * len(v))
            if len(cur) < len(v):
                cur.extend([0] * (len(v) - len(cur)))
            for i, x in enumerate(v):
                cur[i] += x
        elif isinstance(v, (int, float)):
            dst[k] = dst.get(k, 0) + v


class StartupError(Exception):
    """A startup problem with a message that tells the operator what to fix."""


@dataclass
class ReloadResult:
    ok: bool
    at: float
    generation: int
    errors: list[str] = field(default_factory=list)
    changes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "at": self.at,
            "generation": self.generation,
            "errors": self.errors,
            "changes": self.changes,
        }


class Daemon:
    def __init__(self, cfg: Config, config_path: str | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.generation = 1
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.sockets: dict[str, list[socket.socket]] = {}
        """Listener -> its listening sockets: one per worker slot (``reuseport``) or one."""
        self.sockets_closed = False
        """A stop closed the sockets: the queue watch ends (until then it helps the slots
        whose worker is gone while the accept grace takes in the last connections)."""
        self.accept = AcceptWatch()
        """Which slots' sockets the other workers help accept from."""
        book = HealthBook()
        self.table = BackendTable(book, cfg.pool)
        """Every backend's state (the health book + admin/ejection records)."""
        self.snapshots: dict[str, Snapshot] = {}
        """The rotation last pushed to the workers: derived from ``table``, never edited."""
        self.snap_version = 0
        self.health = HealthChecker(
            on_result=self._on_check_result, on_transition=self._on_transition, book=book
        )
        self.check_counts: dict[tuple[str, str, str], int] = {}
        self.notifier = Notifier()
        self.signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self.totals: dict[str, Any] = {}
        self.inflight: dict[int, dict[str, int]] = {}
        self.worker_active: dict[int, dict[str, int]] = {}
        self.check_observers: list[Callable[[tuple[str, str], CheckResult], None]] = []
        """Called for every health-check result (metrics registers here)."""
        self.failover: Any = None
        """With [failover]: the failover process
        (lb.control.failover_process.FailoverProcess); tests may attach an in-process
        failover.FailoverController, which has the same surface."""
        self.admin_runner: Any = None
        self.events: deque[dict[str, Any]] = deque(maxlen=RECENT_EVENTS)
        self.last_reload: ReloadResult | None = None
        self.reloads = {"success": 0, "failure": 0}
        self._snap_timer: asyncio.TimerHandle | None = None
        self._snap_due: float | None = None
        """When the rotation changes next by time alone (the timer pushes it then)."""
        self._push_handle: asyncio.TimerHandle | None = None
        self._last_push = 0.0
        self._force_push: set[tuple[str, str]] = set()
        """Ejections the workers applied locally but the control process refused: pushed
        regardless, with these backends' entries (which override the local ejection)."""
        self._pushed: dict[str, dict[str, Any]] = {}
        """The entries of each pool the workers last got (lb.control.rotation.Entry)."""
        self._pushed_ver: int | None = None
        self._push_gap_s = HEALTH_PUSH_GAP_S
        self._reload_lock = asyncio.Lock()
        self._config_failures: dict[int, tuple[int, str]] = {}
        """Worker slot -> (generation, error) of the last config it refused."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        self._pushes_closed = False
        """Set once the workers are gone at a stop (pushes go on through the drain)."""
        self.supervisor = Supervisor(
            cfg.node.workers or os.cpu_count() or 1,
            listener_fds=self._listener_fds,
            welcome=self._welcome,
            on_message=self._on_worker_message,
            ping_interval_s=cfg.node.worker_ping_interval_s,
            ping_timeout_s=cfg.node.worker_ping_timeout_s,
            worker_args=lambda: self.worker_identity.args() if self.worker_identity else [],
        )
        self.tls = TlsKeeper()
        self.hashing = HashTables(self.supervisor.broadcast, self._on_hash_table)
        """Maglev pools' lookup tables (lb.control.hashing)."""
        """Certificates, keys and ticket keys the workers get (lb.control.tls)."""
        self.elastic = Elastic(self)
        """Backends added and removed at runtime (lb.control.elastic)."""
        self.worker_identity: sysutil.Identity | None = None
        """Whom the workers run as (resolved at startup from node.worker_user/worker_group)."""

    # -- phases ------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                    signal.SIGUSR2):
            loop.add_signal_handler(sig, self.signals.put_nowait, sig)
        try:
            await self.startup()
        except StartupError as exc:
            logger.error("event=startup_failed error=%r", str(exc))
            await self.shutdown(0.0)
            return 1
        except Exception:
            logger.exception("event=startup_failed")
            await self.shutdown(0.0)
            return 1
        settle_gc()
        self.notifier.ready(self.status_line())
        logger.info(
            "event=ready version=%s node=%s workers=%d listeners=%s",
            __version__,
            self.cfg.node.name,
            self.supervisor.count,
            ",".join(f"{lst.name}@{lst.bind}" for lst in self.cfg.listener),
        )
        while True:
            sig = await self.signals.get()
            if sig == signal.SIGHUP:
                await self.reload()
                continue
            if sig == signal.SIGUSR2:
                self.reopen_logs()
                continue
            if sig == signal.SIGUSR1:
                result = await self.switchover()
                logger.info(
                    "event=switchover_result %s", " ".join(f"{k}={v}" for k, v in result.items())
                )
                continue
            logger.info("event=stop_requested signal=%s", sig.name)
            break
        stop = asyncio.create_task(self.shutdown(self.cfg.node.shutdown_timeout_s))
        second = asyncio.create_task(self._second_signal())
        done, _ = await asyncio.wait({stop, second}, return_when=asyncio.FIRST_COMPLETED)
        if second in done:
            logger.warning("event=forced_exit reason=second_signal")
            await self.supervisor.kill_all()
            stop.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await stop
            return 1
        second.cancel()
        return 0

    async def _second_signal(self) -> None:
        while True:
            sig = await self.signals.get()
            if sig in (signal.SIGTERM, signal.SIGINT):
                return

    async def startup(self) -> None:
        self._set_privileges()
        from lb.control.overlay_store import OverlayStoreError

        try:
            for warning in self.elastic.load():
                logger.warning("event=overlay_repaired detail=%r", warning)
        except OverlayStoreError as exc:
            raise StartupError(f"node.state_dir: {exc}") from None
        pools, notes = self.elastic.compose(self.cfg)
        self.table.apply(pools)
        for note in notes:
            logger.warning("event=overlay_note %s", note)
        if self.tls.needed(self.cfg):
            material, errors = await asyncio.to_thread(self.tls.load, self.cfg)
            if errors:
                raise StartupError("; ".join(errors))
            await self.tls.selftest(material)
            self.tls.material = self.tls.apply_selftest(material)
            log_certificates(self.tls.material)
            for line in shadowed(self.cfg, material):
                logger.warning("event=tls_certificate_never_served %s", line)
        for lcfg in self.cfg.listener:
            try:
                self.sockets[lcfg.name] = make_listen_sockets(lcfg, self.supervisor.count)
            except OSError as exc:
                raise StartupError(
                    f"listener {lcfg.name}: cannot bind {lcfg.bind}: {exc.strerror}"
                ) from None
        self.health.set_targets(self.table.targets(self.tls.material.pool_ca))
        self._compute_snapshots()
        self.hashing.refresh(self.table.pools, self.elastic.removing)  # built while the rest starts
        if self.cfg.admin.enabled:
            self._make_admin()
        await self.health.start()
        self.elastic.start()  # discovery and the peer channel
        if self.cfg.failover is not None:
            await self._spawn_failover()  # its imports overlap with the workers' start
        await self.hashing.settled()  # workers get the maglev tables in their welcome
        await self.supervisor.start()
        self._spawn(self._accept_watch_loop(), "accept_watch")  # helps slots still starting
        if not await self.supervisor.wait_ready(10.0):
            if self.supervisor.refused:
                raise StartupError(
                    "the proxy workers could not drop their privileges (event="
                    "worker_privilege_drop_failed above says why); they never serve privileged"
                )
            logger.warning("event=workers_slow_to_start")
        if self.cfg.failover is not None:
            import failover

            try:
                await self._start_failover()
            except failover.FailoverError as exc:
                raise StartupError(str(exc)) from None
        if self.cfg.admin.enabled:
            await self._start_admin()
        self._spawn(self._status_loop(), "status")
        self._spawn(self._ticket_key_loop(), "tls_ticket_keys")  # sleeps 12 h at a time
        wd = watchdog_interval_s()
        if wd is not None:
            self._spawn(self._watchdog_loop(wd), "watchdog")

    def _set_privileges(self) -> None:
        """Every check check-config makes (lb.control.preflight); who the workers will be; this
        process last in the OOM killer's choice; the descriptor limit up to the hard one."""
        from lb.control import preflight

        errors, _ = preflight.check(self.cfg, inside_service=True, tls=False)
        if errors:
            raise StartupError("; ".join(errors))
        node = self.cfg.node
        try:
            self.worker_identity = sysutil.worker_identity(node.worker_user, node.worker_group)
        except sysutil.PrivilegeError as exc:
            raise StartupError(str(exc)) from None
        ident = self.worker_identity
        adj = sysutil.lower_oom_score_adj(sysutil.OOM_SCORE_ADJ_CONTROL)
        nofile_was, nofile = sysutil.raise_nofile_limit()
        logger.info(
            "event=privileges workers_user=%s workers_group=%s oom_score_adj=%d "
            "workers_oom_score_adj=%d nofile=%s nofile_was=%s",
            ident.user, ident.group, adj, sysutil.worker_oom_score_adj(adj),
            "unlimited" if nofile < 0 else nofile, "unlimited" if nofile_was < 0 else nofile_was,
        )

    async def _spawn_failover(self) -> None:
        from lb.control.failover_process import FailoverProcess

        self.failover = FailoverProcess(
            on_role_change=self._on_role_change, on_event=self.record_event,
            hung_timeout_s=self.cfg.node.worker_ping_timeout_s)
        await self.failover.spawn()

    async def _start_failover(self) -> None:
        """Heartbeats and the VIP, in the failover process: it removes stale VIPs, then
        joins as BACKUP (or FAULT); this returns once it has."""
        if self.failover is None:
            await self._spawn_failover()
        self._update_local_health()
        await self.failover.start(self._failover_process_spec())

    def _failover_process_spec(self) -> Any:
        """What the failover process runs (lb.failoverd.link.Spec): the controller's spec and
        the settings of the process around it."""
        from lb.failoverd import link as failover_link

        fcfg = self.cfg.failover
        assert fcfg is not None
        return failover_link.Spec(
            generation=self.generation,
            failover=failover_spec(self.cfg),
            garp_count=fcfg.garp_count,
            garp_interval_s=fcfg.garp_interval_s,
            garp_repeat_after_s=fcfg.garp_repeat_after_s,
            handover_ports=tuple(self._vip_ports(fcfg.vips)),
            track_interfaces=fcfg.track_interfaces,
            control_timeout_s=fcfg.control_timeout_s,
            sched_priority=fcfg.sched_priority,
            nice=fcfg.nice,
            oom_score_adj=sysutil.OOM_SCORE_ADJ_CONTROL,
            log_level=self.cfg.logging.level,
            journald=self.cfg.logging.journald_prefix,
        )

    def _vip_ports(self, vips: Sequence[str]) -> list[int]:
        """Ports of the listeners clients reach through a VIP (bound to it, or to any)."""
        addrs = {str(ipaddress.ip_interface(v).ip) for v in vips}
        ports = []
        for lcfg in self.cfg.listener:
            host, port = lcfg.host_port
            if host in addrs or ipaddress.ip_address(host).is_unspecified:
                ports.append(port)
        return ports

    def _on_role_change(self, old: Any, new: Any) -> None:
        old_s, new_s = old.label, new.label
        logger.info("event=role_change node=%s from=%s to=%s", self.cfg.node.name, old_s, new_s)
        self.record_event("role", f"{old_s} -> {new_s}")
        if old_s == "MASTER":
            # Clients now reach the new MASTER; keep-alive connections still open here would
            # be reset when their next packet arrives there. Close them after their current
            # response instead, so clients reconnect (to the new holder) cleanly.
            self.supervisor.broadcast(wl.CloseIdle())
        self.notifier.status(self.status_line())

    def _update_local_health(self) -> None:
        """Tell failover whether this node can serve (its own checks found backends)."""
        if self.failover is None:
            return
        usable = sum(s.usable for s in self.snapshots.values())
        total = sum(len(r.records) for r in self.table.rotations.values())
        self.failover.set_local_health(usable > 0, usable, total)

    async def switchover(self) -> dict[str, Any]:
        """Planned handover: the peer takes the VIP first, then this node lets go."""
        if self.failover is None:
            return {"ok": False, "error": "no failover configured"}
        if not self.failover.request_switchover():
            return {"ok": False, "error": f"not MASTER (role {self.role()})"}
        logger.info("event=switchover_requested node=%s", self.cfg.node.name)
        self.record_event("switchover", "planned handover requested")
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if self.role() != "MASTER":
                return {"ok": True, "role": self.role()}
            await asyncio.sleep(0.01)
        self.failover.cancel_switchover()
        return {"ok": False, "error": "no peer took over within 5 s; still MASTER"}

    def failover_view(self) -> status_mod.FailoverView | None:
        if self.failover is None:
            return None
        fcfg = self.cfg.failover
        assert fcfg is not None
        view = status_mod.FailoverView(self.failover.status(), fcfg.interface, tuple(fcfg.vips))
        process_status = getattr(self.failover, "process_status", None)
        if process_status is None:  # a controller attached in this process (tests)
            return view
        gaps = self.failover.heartbeat_gaps
        return dataclasses.replace(
            view, sent_gap_max_s=gaps.sent_max_s, received_gap_max_s=gaps.received_max_s,
            process=process_status(),
        )

    def _make_admin(self) -> None:
        """Build the admin app early: a bad token file fails start-up before any worker."""
        from aiohttp import web

        from lb.admin import server as admin

        try:
            app = admin.make_app(self)
        except admin.AdminError as exc:
            raise StartupError(str(exc)) from None
        self.admin_runner = web.AppRunner(app, access_log=None, handle_signals=False)

    async def _start_admin(self) -> None:
        from aiohttp import web

        assert self.admin_runner is not None
        await self.admin_runner.setup()
        host, port = config_mod.parse_hostport(self.cfg.admin.bind)
        site = web.TCPSite(self.admin_runner, host, port, reuse_address=True)
        await site.start()
        logger.info("event=admin_listening bind=%s", self.cfg.admin.bind)

    async def shutdown(self, timeout_s: float) -> None:
        self.stopping = True
        self.notifier.stopping()
        if self.failover is not None:
            # MASTER first hands the VIP over (priority 0, make-before-break), then drains.
            try:
                await self.failover.stop(graceful=timeout_s > 0)
            except Exception:
                logger.exception("event=failover_stop_failed")
            # Connections whose handshake finished before the VIP left are still in the
            # accept queue; closing the listeners now would reset them. The workers take
            # them within milliseconds, and no new ones arrive for an address we dropped.
            await asyncio.sleep(ACCEPT_GRACE_S)
        # Our copies of the listening sockets go first; the workers close theirs when they
        # stop accepting, and from then on the kernel refuses new connections.
        self.sockets_closed = True
        for socks in self.sockets.values():
            for sock in socks:
                sock.close()
        await self.supervisor.stop(timeout_s)
        # Rotation changes were pushed through the drain (its requests still retry on
        # other backends); no worker is left to take one now.
        self._pushes_closed = True
        if self._snap_timer:
            self._snap_timer.cancel()
            self._snap_timer, self._snap_due = None, None
        if self._push_handle:
            self._push_handle.cancel()
            self._push_handle = None
        if self.failover is not None:
            await self.failover.close_handover()  # the workers have finished with it
        await self.elastic.stop()
        await self.hashing.stop()
        await self.health.stop()
        if self.admin_runner is not None:
            await self.admin_runner.cleanup()
        for t in list(self._tasks):
            t.cancel()
        logger.info("event=stopped")

    # -- reload ------------------------------------------------------------------------

    async def reload(self) -> ReloadResult:
        """SIGHUP: validate; keep the old config on any error; apply only the difference."""
        async with self._reload_lock:  # SIGHUP and POST /reload may overlap
            self.notifier.reloading()
            try:
                result = await self._reload()
            finally:
                settle_gc()
                self.notifier.ready(self.status_line())
        self.last_reload = result
        self.reloads["success" if result.ok else "failure"] += 1
        return result

    async def _reload(self) -> ReloadResult:
        now = time.time()
        if self.config_path is None:
            return ReloadResult(False, now, self.generation, ["no config file to reload"])
        try:
            new = config_mod.load(self.config_path)
        except config_mod.ConfigError as exc:
            for err in exc.errors:
                logger.error("event=reload_rejected file=%s error=%r", exc.source, err)
            logger.error("event=reload_failed kept_generation=%d", self.generation)
            return ReloadResult(False, now, self.generation, exc.errors)
        from lb.control import preflight

        errors, _ = preflight.check(new, inside_service=True, tls=False)
        if errors:  # what ExecReload's check-config refuses, refused here too
            for err in errors:
                logger.error("event=reload_rejected file=%s error=%r", self.config_path, err)
            logger.error("event=reload_failed kept_generation=%d", self.generation)
            return ReloadResult(False, now, self.generation, errors)
        material = self.tls.material
        if self.tls.needed(new):
            # Off the loop: a thousand certificates take seconds to read and check, and the
            # loop answers the workers' pings and the admin API meanwhile.
            material, errors = await asyncio.to_thread(self.tls.load, new)
            if errors:  # a bad certificate keeps the old ones (and the old config) serving
                for err in errors:
                    logger.error("event=reload_rejected file=%s error=%r", self.config_path, err)
                logger.error("event=reload_failed kept_generation=%d", self.generation)
                return ReloadResult(False, now, self.generation, errors)
            await self.tls.selftest(material)
            material = self.tls.apply_selftest(material)
        old = self.cfg
        changes: list[str] = tls_changes(self.tls.material, material)
        if new.node.name != old.node.name:
            changes.append("node.name changed: needs a restart, ignored")
            new = new.model_copy(
                update={"node": old.node.model_copy(update={"name": old.node.name})}
            )
        who = ("worker_user", "worker_group")
        if any(getattr(new.node, k) != getattr(old.node, k) for k in who):
            changes.append("node.worker_user/worker_group changed: needs a restart, ignored")
            new = new.model_copy(update={"node": new.node.model_copy(
                update={k: getattr(old.node, k) for k in who})})
        old_l = {lst.name: lst for lst in old.listener}
        same_port = [lst.name for lst in new.listener if lst.name in old_l
                     and old_l[lst.name].bind == lst.bind
                     and old_l[lst.name].reuseport != lst.reuseport]
        if same_port:  # new sockets on a port ours hold: the kernel would refuse them
            changes += [f"listener {n} reuseport changed: needs a restart, ignored"
                        for n in same_port]
            new = new.model_copy(update={"listener": tuple(
                lst.model_copy(update={"reuseport": old_l[lst.name].reuseport})
                if lst.name in same_port else lst for lst in new.listener)})
        if new.failover != old.failover:
            kept = old.failover
            if old.failover is not None and new.failover is not None:
                # A key rotation and the clock window apply live; nothing else moves the VIP.
                kept = old.failover.model_copy(
                    update={k: getattr(new.failover, k) for k in FAILOVER_RELOADABLE})
            if kept != new.failover:
                changes.append("failover section changed: applied at next restart (the VIP "
                               "never moves on reload)")
            new = new.model_copy(update={"failover": kept})
        fo_spec = None
        if self.failover is not None and new.failover is not None:
            import failover

            try:  # the key files are read again: a rotation, or a key replaced in place
                fo_spec = failover_spec(new)
            except failover.FailoverError as exc:
                logger.error("event=reload_failed error=%r kept_generation=%d", str(exc),
                             self.generation)
                return ReloadResult(False, now, self.generation, [str(exc)])
        # Listeners: new sockets first, so a bind error leaves everything as it was.
        new_l = {lst.name: lst for lst in new.listener}
        fresh: dict[str, list[socket.socket]] = {}
        in_place: list[str] = []
        rebuilt = [  # a worker builds a listener's server for its mode and TLS: new workers
            n for n, lcfg in new_l.items() if n in old_l and (
                old_l[n].mode != lcfg.mode or (old_l[n].tls is None) != (lcfg.tls is None))
        ]
        try:
            for name, lcfg in new_l.items():
                prev = old_l.get(name)
                if prev is None or prev.bind != lcfg.bind:
                    fresh[name] = make_listen_sockets(lcfg, self.supervisor.count)
                else:
                    if prev.backlog != lcfg.backlog or prev.transparent != lcfg.transparent:
                        in_place.append(name)
                    if prev.freebind != lcfg.freebind:  # only a bind reads it
                        changes.append(f"listener {name} freebind "
                                       f"{str(lcfg.freebind).lower()}: applies when its "
                                       f"sockets are made again (a new bind, a restart)")
        except OSError as exc:
            for socks in fresh.values():
                for s in socks:
                    s.close()
            err = f"listener bind failed: {exc}"
            logger.error("event=reload_failed error=%r kept_generation=%d", err, self.generation)
            return ReloadResult(False, now, self.generation, [err])
        replace_workers = bool(fresh) or bool(rebuilt) or set(old_l) != set(new_l)
        retired = [s for n in old_l if n not in new_l or n in fresh for s in self.sockets[n]]
        for name in old_l:
            if name not in new_l or name in fresh:
                self.sockets.pop(name, None)
        self.sockets.update(fresh)
        for name in in_place:  # the same address: the sockets, their queues, the workers stay
            update_listen_sockets(self.sockets[name], old_l[name], new_l[name])
            changes.append(f"listener {name} backlog {new_l[name].backlog}, transparent "
                           f"{str(new_l[name].transparent).lower()}")
        changes += [f"listener {n} added" for n in new_l if n not in old_l]
        changes += [f"listener {n} removed" for n in old_l if n not in new_l]
        changes += [f"listener {n} rebound" for n in fresh if n in old_l]
        changes += [f"listener {n} now {new_l[n].mode}{' with TLS' if new_l[n].tls else ''}: "
                    f"new workers" for n in rebuilt if n not in fresh]
        # Pools: the table keeps admin state and ejections; the book keeps health by the
        # rules in healthcheck.book (a changed check restarts from the state it is in).
        # The effective pools: the file's, discovery's, the runtime overlay on top.
        pools, notes = self.elastic.compose(new)
        changes += self.table.apply(pools)
        changes += notes
        if fo_spec is not None:
            before = self.failover.status()
            self.failover.reconfigure(fo_spec)
            after = self.failover.status()
            if [k.key_id for k in before.keys] != [k.key_id for k in after.keys]:
                changes.append("failover keys: " + ", ".join(
                    k.key_id + (" (signing)" if k.signing else "") for k in after.keys))
            if before.max_clock_skew_s != after.max_clock_skew_s:
                changes.append(f"failover.max_clock_skew_s {after.max_clock_skew_s:g}")
        self.cfg = new
        self.tls.material = material
        self.generation += 1
        changes += self.elastic.reconfigured(new)
        self.health.set_targets(self.table.targets(self.tls.material.pool_ca),
                               self.table.in_service)
        self._compute_snapshots()
        self.hashing.refresh(self.table.pools, self.elastic.removing)
        if replace_workers:
            # The old workers serve until their turn: they follow the rotation meanwhile
            # (the new ones get it in their welcome, and deltas build on it).
            self.supervisor.broadcast(self._snapshot_message())
            await self.supervisor.replace_all(new.node.shutdown_timeout_s)
        else:
            self.supervisor.broadcast(self._config_message())
            self.supervisor.broadcast(self._snapshot_message())
        refused = [] if replace_workers else await self._workers_applied(
            self.generation, WORKER_APPLY_TIMEOUT_S)
        for s in retired:
            s.close()
        logger.info(
            "event=reloaded generation=%d digest=%s changes=%r",
            self.generation,
            new.digest(),
            "; ".join(changes) or "none",
        )
        self.record_event(
            "reload", f"generation {self.generation}: {'; '.join(changes) or 'no changes'}"
        )
        if refused:  # the control process took the config, these workers did not
            for err in refused:
                logger.error("event=reload_not_applied error=%r", err)
            return ReloadResult(False, now, self.generation, refused, changes)
        return ReloadResult(True, now, self.generation, [], changes)

    async def _workers_applied(self, gen: int, timeout_s: float) -> list[str]:
        """Wait until every serving worker has applied config ``gen`` (a reload's answer
        then means the new settings serve new connections); what each one refused, or
        did not confirm in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            pending, refused = [], []
            for h in self.supervisor.slots.values():
                if h.retiring or h.stopped.is_set() or h.chan is None:
                    continue
                fail = self._config_failures.get(h.index)
                if fail is not None and fail[0] == gen:
                    refused.append(f"worker {h.index} refused the config: {fail[1]}")
                elif (h.applied_generation or 0) < gen:
                    pending.append(h.index)
            if not pending:
                return refused
            if time.monotonic() >= deadline:
                return refused + [f"worker {i} did not confirm the config within "
                                  f"{timeout_s:g} s" for i in pending]
            await asyncio.sleep(0.01)

    # -- pools, checks and snapshots --------------------------------------------------

    def _on_check_result(
        self, key: tuple[str, str], result: CheckResult, counter: HealthCounter
    ) -> None:
        ck = (key[0], key[1], str(result.status))
        self.check_counts[ck] = self.check_counts.get(ck, 0) + 1
        for observe in self.check_observers:
            observe(key, result)
        ended = self.table.on_check(key[0], key[1], result, time.monotonic())
        if ended is None:
            return
        logger.info(
            "event=ejection_ended pool=%s backend=%s reason=%s status=%s",
            ended.pool,
            ended.backend,
            ended.reason,
            result.status,
        )
        self.record_event("eject", f"{ended.pool}/{ended.backend} back early ({ended.reason})")
        self._push_soon()

    def _on_transition(
        self, key: tuple[str, str], old: Health, new: Health, result: CheckResult
    ) -> None:
        # The book has the new state already; the rotation is derived from it at the push.
        why = f"{result.status} {result.detail}".strip()
        self.record_event("health", f"{key[0]}/{key[1]} {old} -> {new} ({why})")
        self._push_soon()

    def _checked(self, pool: str) -> bool:
        """Checks of this pool have produced results (panic before that is not news)."""
        pcfg = self.table.pools.get(pool)
        if pcfg is None or not pcfg.health.enabled:
            return False
        return any(
            (st := self.health.state((pool, b.name))) is not None and st.checks > 0
            for b in pcfg.backends
        )

    def _push_soon(self) -> None:
        """Push a snapshot on the next loop pass, coalescing (see HEALTH_PUSH_GAP_S)."""
        if self._push_handle is not None or self._pushes_closed:
            return
        delay = max(0.0, self._last_push + self._push_gap_s - time.monotonic())
        self._push_handle = asyncio.get_running_loop().call_later(delay, self._pushed_soon)

    def force_entry(self, pool: str, backend: str) -> None:
        """The next push carries this backend's entry even if it did not change (a worker
        reset it: a backend added again, an ejection the control process refused)."""
        self._force_push.add((pool, backend))
        self._push_soon()

    def push_soon(self) -> None:
        """A rotation change (a backend joined, left or was re-weighted): pushed on the next
        loop pass, coalesced with the others (HEALTH_PUSH_GAP_S)."""
        self._push_soon()

    def _pushed_soon(self) -> None:
        self._push_handle = None
        self.push_snapshots()

    def set_admin_state(self, pool: str, backend: str, state: AdminState) -> bool:
        """Operator action (admin API): drain, maintenance or enable a backend."""
        if not self.table.set_admin(pool, backend, state):
            return False
        logger.info("event=admin_state pool=%s backend=%s state=%s", pool, backend, state)
        self.record_event("admin", f"{pool}/{backend} -> {state}")
        self.push_snapshots()
        return True

    async def add_backend(self, pool: str, name: str, address: str,
                          weight: int) -> dict[str, Any]:
        """Admin API: a backend added at runtime (lb.control.elastic; raises ChangeRefused)."""
        return await self.elastic.add(pool, name, address, weight)

    async def remove_backend(self, pool: str, name: str) -> dict[str, Any]:
        """Admin API: drain a backend, then remove it (lb.control.elastic)."""
        return await self.elastic.remove(pool, name)

    def is_removing(self, pool: str, name: str) -> bool:
        return (pool, name) in self.elastic.removing

    def forget_backend(self, pool: str, name: str) -> None:
        """A backend left its pool at runtime: its counters leave /metrics with it (else a
        pool scaled by discovery or an autoscaler would grow the series without bound)."""
        for what in ("requests", "errors", "tcp"):
            self.totals.get(what, {}).get(pool, {}).pop(name, None)
        for key in [k for k in self.check_counts if k[0] == pool and k[1] == name]:
            del self.check_counts[key]

    def has_backend(self, pool: str, name: str) -> bool | None:
        """None: no such pool."""
        if pool not in self.table.rotations:
            return None
        return name in self.table.rotations[pool].records

    def backend_inflight(self, pool: str, backend: str) -> int:
        key = f"{pool}/{backend}"
        return sum(d.get(key, 0) for d in self.inflight.values())

    def _compute_snapshots(self) -> bool:
        now = time.monotonic()
        changed = False
        snaps, next_change = self.table.derive(now)
        for name, snap in snaps.items():
            rot = self.table.rotations[name]
            prev = self.snapshots.get(name)
            if prev is None or prev.entries != snap.entries or prev.panic != snap.panic:
                changed = True
                turned = snap.panic != (prev.panic if prev is not None else False)
                checked = turned and self._checked(name)  # O(pool): only when it matters
                if snap.panic and (prev is None or not prev.panic) and checked:
                    logger.error(
                        "event=pool_panic pool=%s usable=%d enabled=%d mode=%s",
                        name,
                        snap.usable,
                        snap.enabled,
                        rot.panic_mode,
                    )
                    self.record_event(
                        "panic", f"pool {name} in panic ({snap.usable}/{snap.enabled} usable)"
                    )
                elif prev is not None and prev.panic and not snap.panic and checked:
                    logger.warning("event=pool_panic_over pool=%s usable=%d", name, snap.usable)
            self.snapshots[name] = snap
        for name in list(self.snapshots):
            if name not in self.table.rotations:
                del self.snapshots[name]
                changed = True
        if changed:
            self.snap_version += 1
        self._schedule_snapshot_timer(now, next_change)
        return changed

    def push_snapshots(self) -> None:
        t0 = self._last_push = time.monotonic()
        # A build only when members changed (and draining removals are out of the table).
        self.hashing.refresh(self.table.pools, self.elastic.removing)
        forced, self._force_push = self._force_push, set()
        if forced:
            self.snap_version += 1  # the workers apply only a newer version than theirs
        if self._compute_snapshots() or forced:
            self.supervisor.broadcast(self._snapshot_delta(forced))
            self._update_local_health()
        # A push derives every backend's entry (O(pool)): spaced so they take at most a
        # quarter of the loop however fast changes come (10 ms apart up to ~3,000 backends).
        self._push_gap_s = max(HEALTH_PUSH_GAP_S, 3 * (time.monotonic() - t0))

    def _snapshot_delta(self, forced: set[tuple[str, str]]) -> wl.Snap:
        """What changed since the last snapshot the workers got (every worker got every
        one since its whole welcome snapshot, in order): the entries that differ, and
        ``forced`` ones (a local ejection the control process refused must be undone).
        A whole snapshot when none was sent before."""
        base = self._pushed_ver
        if base is None:
            msg = self._snapshot_message()
        else:
            pools: dict[str, wl.PoolSnap] = {}
            for name, snap in self.snapshots.items():
                prev = self._pushed.get(name, {})
                # Entries are shared objects (rotation.entry): unchanged ones are identical.
                changed = {bn: (e.eligible, e.weight) for bn, e in snap.entries.items()
                           if prev.get(bn) is not e and prev.get(bn) != e}
                for pool, bn in forced:
                    e = snap.entries.get(bn) if pool == name else None
                    if e is not None:
                        changed[bn] = (e.eligible, e.weight)
                pools[name] = wl.PoolSnap(snap.panic, changed)
            msg = wl.Snap(self.snap_version, pools, base)
        self._pushed = {name: snap.entries for name, snap in self.snapshots.items()}
        self._pushed_ver = self.snap_version
        return msg

    def _schedule_snapshot_timer(self, now: float, nxt: float | None) -> None:
        if self._snap_timer:
            self._snap_timer.cancel()
            self._snap_timer = None
        self._snap_due = None
        if nxt is not None and not self._pushes_closed:
            self._snap_due = nxt
            delay = max(0.0, nxt - now) + 0.001
            self._snap_timer = asyncio.get_running_loop().call_later(delay, self.push_snapshots)

    def _snapshot_message(self) -> wl.Snap:
        """The whole rotation (a worker's welcome, a reload's broadcast)."""
        self._pushed = {name: snap.entries for name, snap in self.snapshots.items()}
        self._pushed_ver = self.snap_version
        return wl.Snap(
            self.snap_version,
            {
                name: wl.PoolSnap(
                    s.panic, {bn: (e.eligible, e.weight) for bn, e in s.entries.items()}
                )
                for name, s in self.snapshots.items()
            },
        )

    def effective_config(self) -> Config:
        """The config file's config with each pool's members as they are now (runtime
        changes included): what the workers run. The file's own stays in ``cfg`` (its
        digest is what the peer compares)."""
        pools = tuple(self.table.pools.get(p.name, p) for p in self.cfg.pool)
        if all(a is b for a, b in zip(pools, self.cfg.pool, strict=True)):
            return self.cfg
        return self.cfg.model_copy(update={"pool": pools})

    def _listener_fds(self) -> dict[str, tuple[int, ...]]:
        """Listener -> its sockets' fd numbers (a worker inherits them all: it accepts on
        its slot's, and on another slot's while the control process asks it to help)."""
        return {n: tuple(s.fileno() for s in socks) for n, socks in self.sockets.items()}

    def _config_message(self) -> wl.Config:
        return wl.Config(
            self.generation,
            self.effective_config().wire(),
            self._listener_fds(),
            self.tls.material.wire(),
        )

    # -- workers -----------------------------------------------------------------------

    def _welcome(self, handle: WorkerHandle) -> list[wl.Message]:
        # The tables before the snapshot: a worker serves once it has a snapshot.
        helping = [wl.Help(dict(self.accept.help))] if self.accept.help else []
        return [self._config_message(), *self.hashing.messages(), self._snapshot_message(),
                *helping]

    def reopen_logs(self) -> int:
        """SIGUSR2 (or POST /logs/reopen), after logrotate moved the access log: every
        worker reopens it (SIGUSR1 to the main process is the planned switchover, so
        logrotate signals USR2; a worker also reopens on a SIGUSR1 of its own)."""
        self.supervisor.broadcast(wl.ReopenLogs())
        for h in self.supervisor.retiring:  # still serving their last requests
            h.send(wl.ReopenLogs())
        n = len(self.supervisor.slots) + len(self.supervisor.retiring)
        logger.info("event=access_log_reopen workers=%d", n)
        return n

    def _hashing_status(self, pcfg: PoolConfig) -> dict[str, Any] | None:
        st = self.hashing.status(pcfg.name)
        if st is None:
            return None
        return {"hash_on": pcfg.hash_on, "sticky_cookie": pcfg.sticky_cookie, **st}

    def _on_hash_table(self, pool: str, built: Any) -> None:
        self.record_event("maglev", f"pool {pool}: lookup table for {len(built.members)} "
                          f"backends built in {built.build_s * 1000:.0f} ms "
                          f"({built.message.digest})")

    def _on_worker_message(self, handle: WorkerHandle, msg: wl.Message) -> None:
        if isinstance(msg, wl.Stats):
            delta = msg.d
            # Gauges travel as changes; keep them per worker so a dead worker's share can go.
            active = self.worker_active.setdefault(handle.index, {})
            for listener, c in delta.get("connections", {}).items():
                active[listener] = active.get(listener, 0) + c.pop("active", 0)
            merge_counts(self.totals, delta)
            self.inflight[handle.index] = msg.inflight
        elif isinstance(msg, wl.Hello):
            # A new process in this slot: the previous one's gauges died with it.
            self.worker_active.pop(handle.index, None)
            self.inflight.pop(handle.index, None)
        elif isinstance(msg, wl.Eject):
            pool, backend, reason = msg.pool, msg.backend, msg.reason
            ej = self.table.eject(pool, backend, reason, time.monotonic())
            if ej is not None:
                logger.warning(
                    "event=backend_ejected pool=%s backend=%s reason=%s for_s=%.1f worker=%d",
                    pool,
                    backend,
                    reason,
                    ej.duration_s,
                    handle.index,
                )
                self.record_event(
                    "eject", f"{pool}/{backend} ejected for {ej.duration_s:.0f}s ({reason})"
                )
            # Push even when refused: the worker's local ejection must be overridden. One
            # push per loop pass for all the ejections a failing rack sends at once.
            self._force_push.add((pool, backend))
            self._push_soon()
        elif isinstance(msg, wl.ConfigFailed) and msg.error.startswith("pool_edit"):
            # A runtime change that raced a reload (the worker is on another generation):
            # a worker that stays gets the whole effective config again.
            logger.warning("event=worker_pool_edit_resync index=%d error=%r", handle.index,
                           msg.error)
            if not handle.retiring:
                handle.send(self._config_message())
                handle.send(self._snapshot_message())
        elif isinstance(msg, wl.ConfigFailed):
            self._config_failures[handle.index] = (msg.gen, msg.error)
            logger.error(
                "event=worker_config_failed index=%d gen=%d error=%r",
                handle.index, msg.gen, msg.error,
            )
        elif isinstance(msg, wl.Stopped):
            logger.debug("event=worker_stopped index=%d pid=%d", handle.index, msg.pid)

    # -- status ------------------------------------------------------------------------

    def record_event(self, kind: str, text: str) -> None:
        self.events.append({"at": time.time(), "kind": kind, "text": text})

    @property
    def rotation_apply(self) -> Lateness:
        """Each pushed snapshot's time to a worker's SnapApplied (lb.admin.metrics)."""
        return self.supervisor.rotation_apply

    def status(self) -> status_mod.NodeStatus:
        """Everything the admin API, the status page and /metrics show, typed
        (lb.control.status; the admin edge serialises it once)."""
        now_m = time.monotonic()
        pools = []
        totals = self.totals
        # Derived now, like the reasons beside each backend, so one answer never mixes a
        # fresh verdict with a rotation pushed a moment ago (the workers get the same
        # rotation within HEALTH_PUSH_GAP_S).
        live = self.table.snapshots(now_m)
        elastic = self.elastic
        for file_pcfg in self.cfg.pool:
            pcfg = self.table.pools.get(file_pcfg.name, file_pcfg)
            rot = self.table.rotations.get(pcfg.name)
            snap = live.get(pcfg.name)
            if rot is None or snap is None:
                continue
            backends = []
            for b in pcfg.backends:
                rec = rot.records[b.name]
                origin = elastic.origin(pcfg.name, b.name)
                entry = snap.entries.get(b.name)
                hs = self.health.state((pcfg.name, b.name))
                res = hs.last_result if hs is not None else None
                verdict = self.table.verdict(pcfg.name, b.name)
                backends.append(
                    status_mod.BackendStatus(
                        name=b.name,
                        address=b.address,
                        weight=b.weight,
                        effective_weight=entry.weight if entry else 0.0,
                        in_rotation=bool(entry and entry.eligible),
                        up=verdict.up,
                        out_of_rotation=tuple(rot.explain(b.name, now_m, verdict, snap)),
                        checks_enabled=pcfg.health.enabled,
                        admin_state=str(rec.admin),
                        ejected=rec.ejected(now_m),
                        ejected_for_s=max(0.0, rec.ejected_until - now_m),
                        ejections=rec.ejections_total,
                        last_ejection_reason=rec.last_ejection_reason or None,
                        ejections_ended_by_checks=rec.ejections_ended_early,
                        last_check=None if res is None else status_mod.CheckView(
                            str(res.status), res.code, res.duration_s, res.detail),
                        in_flight=self.backend_inflight(pcfg.name, b.name),
                        requests=_backend_total(totals, pcfg.name, b.name, "requests"),
                        errors=_backend_total(totals, pcfg.name, b.name, "errors"),
                        source=origin.source,
                        shadows=origin.shadows,
                        removing=(pcfg.name, b.name) in elastic.removing,
                    )
                )
            pools.append(
                status_mod.PoolStatus(
                    pcfg.name, pcfg.balance, snap.panic, snap.usable, snap.enabled,
                    tuple(backends), elastic.discovery_status(pcfg.name),
                    tuple(n for p, n in elastic.tombstoned if p == pcfg.name),
                    self._hashing_status(pcfg),
                )
            )
        lat = self.health.lateness
        return status_mod.NodeStatus(
            node=self.cfg.node.name,
            version=__version__,
            pid=os.getpid(),
            started_at=self.started_at,
            uptime_s=round(now_m - self.started_mono, 3),
            config=status_mod.ConfigStatus(
                self.config_path, self.generation, self.cfg.digest(),
                self.last_reload.as_dict() if self.last_reload else None,
            ),
            listeners=tuple(self._listener_status(lst) for lst in self.cfg.listener),
            pools=tuple(pools),
            workers=self.supervisor.status(),
            failover=self.failover_view(),
            role=self.role(),
            events=tuple(self.events),
            health_checks=status_mod.HealthChecksStatus(
                targets=len(self.health.book.keys()),
                in_flight=self.health.in_flight,
                checks=lat.count,
                lateness_p50_s=lat.quantile(0.5),
                lateness_p99_s=lat.quantile(0.99),
                lateness_max_s=lat.max_s,
                lateness_max_10s_s=lat.max_over(10, now_m),
                lateness_max_60s_s=lat.max_over(60, now_m),
            ),
            ready=self.ready(),
            runtime=elastic.status(),
            workers_retiring=self.supervisor.retiring_status(),
            rotation=status_mod.RotationStatus(
                self._pushed_ver or 0,
                # A time-driven change (slow start, an ejection's end) /status derives
                # already is pending until its timer pushes it.
                self._push_handle is not None
                or (self._snap_due is not None and self._snap_due <= now_m),
                applied=(ra := self.supervisor.rotation_apply).count,
                apply_p50_s=ra.quantile(0.5), apply_p99_s=ra.quantile(0.99),
                apply_max_10s_s=ra.max_over(10, now_m), apply_max_60s_s=ra.max_over(60, now_m),
            ),
        )

    def _listener_status(self, lst: config_mod.ListenerConfig) -> status_mod.ListenerStatus:
        tls = None
        m = self.tls.material.listeners.get(lst.name)
        if lst.tls is not None and m is not None:
            counts = self.totals.get("tls", {}).get(lst.name, {})
            full, resumed = counts.get("full", {}), counts.get("resumed", {})
            tls = status_mod.ListenerTlsStatus(
                certificates=tuple(
                    status_mod.CertificateStatus(
                        b.cert_file, b.names, b.ips, b.not_before, b.not_after, b.fingerprint,
                        i == 0, full.get(b.cert_id, 0), resumed.get(b.cert_id, 0))
                    for i, b in enumerate(m.bundles)),
                min_version=lst.tls.min_version,
                ticket_key=m.ticket_key_source,
                failures=dict(counts.get("failed", {})),
                loaded_at=self.tls.material.loaded_at,
                ticket_key_id=(hashlib.sha256(m.ticket_key).hexdigest()[:8]
                               if m.ticket_key else None),
            )
        routes = decisions = None
        if lst.sni_routes:
            routes = {r.server_name: r.pool for r in lst.sni_routes}
            decisions = dict(self.totals.get("sni", {}).get(lst.name, {}))
        return status_mod.ListenerStatus(
            lst.name, lst.bind, lst.mode, lst.pool, tls, routes, decisions,
            tuple(self.accept.queues.get(lst.name, ())), self.accept.help.get(lst.name, ()),
            tuple(self.accept.episodes(lst.name, k)
                  for k in range(len(self.sockets.get(lst.name, ())))))

    def status_json(self) -> dict[str, Any]:
        """GET /status's JSON (tests and tools; the admin edge does the same)."""
        return status_mod.to_json(self.status())

    def role(self) -> str:
        """MASTER/BACKUP/FAULT/INIT with failover; STANDALONE without."""
        if self.failover is None:
            return status_mod.STANDALONE
        return str(self.failover.role.label)

    def ready(self) -> bool:
        """Able to serve: workers up and at least one pool with a usable backend."""
        workers_ok = any(h.ready for h in self.supervisor.slots.values())
        return workers_ok and any(s.usable > 0 for s in self.snapshots.values())

    def status_line(self) -> str:
        usable = sum(s.usable for s in self.snapshots.values())
        total = sum(len(r.records) for r in self.table.rotations.values())
        return f"role={self.role()} backends_up={usable}/{total} workers={self.supervisor.count}"

    async def _ticket_key_loop(self) -> None:
        """Rotate the ticket keys pairlb makes at each period's start (lb.control.tls)."""
        while True:
            now = time.time()
            nxt = (self.tls.epoch(now) + 1) * TICKET_KEY_ROTATE_S
            await asyncio.sleep(nxt - now + 0.05)
            async with self._reload_lock:
                rotated = self.tls.rotate(self.tls.material)
                if rotated is None:
                    continue
                self.tls.material = rotated
                self.supervisor.broadcast(self._config_message())
            logger.info("event=tls_ticket_keys_rotated listeners=%s", ",".join(
                n for n, m in rotated.listeners.items()
                if m.ticket_key_source in ("failover_key", "random")))

    async def _status_loop(self) -> None:
        last = ""
        while True:
            await asyncio.sleep(1.0)
            line = self.status_line()
            if line != last:
                self.notifier.status(line)
                last = line

    async def _accept_watch_loop(self) -> None:
        """Reads every per-slot socket's accept queue each ACCEPT_WATCH_S and tells the
        workers which slots to help (lb.control.acceptwatch)."""
        while not self.sockets_closed:  # (a stop closes them after handing the VIP over)
            await asyncio.sleep(ACCEPT_WATCH_S)
            if self.sockets_closed:
                return
            try:
                queues = {n: [accept_queue(s) for s in socks]
                          for n, socks in self.sockets.items()}
                if self.accept.look(time.monotonic(), queues, self.supervisor.slot_states()):
                    self.supervisor.broadcast(wl.Help(dict(self.accept.help)))
                    # Debug: under a high rate of new connections help comes and goes with
                    # the load (pairlb_listener_accept_helps_total counts it; the alert
                    # PairlbWorkerSocketHelped is for help that lasts).
                    logger.debug("event=accept_help slots=%s", ",".join(
                        f"{n}:{'+'.join(map(str, ks))}" for n, ks in self.accept.help.items())
                        or "none")
            except Exception:
                logger.exception("event=accept_watch_failed")

    async def _watchdog_loop(self, interval_s: float) -> None:
        # Runs on the control loop itself: if the loop is blocked, no WATCHDOG=1 goes out
        # and systemd restarts us, which is the point.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval_s)

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


WORKER_APPLY_TIMEOUT_S = 5.0
"""How long a reload waits for the workers to confirm the new config."""


def settle_gc() -> None:
    """Move what exists now (the config, pools, check targets: long-lived) out of the cyclic
    GC's reach. With thousands of backends a full collection walks every one of those
    objects and stopped the control loop for up to 260 ms, late checks and heartbeats."""
    gc.collect()
    gc.freeze()


def run(cfg: Config, config_path: str | None) -> int:
    """Entry point of ``pairlb run``: the control process on the stdlib loop."""
    return asyncio.run(Daemon(cfg, config_path).run())


def _backend_total(totals: dict[str, Any], pool: str, backend: str, what: str) -> int:
    """Sum of a per-backend counter in the merged worker stats: what -> pool -> backend."""
    node = totals.get(what, {}).get(pool, {}).get(backend, 0)
    if isinstance(node, dict):
        return int(sum(v for v in node.values() if isinstance(v, (int, float))))
    return int(node)
