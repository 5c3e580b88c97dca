"""The control process's handle on the failover process (lb.failoverd.main).

Spawns it, sends it the spec, the local health verdict and requests (lb.failoverd.link), and
keeps the last status it reported, which is what /status, /metrics, sd_notify STATUS= and
`role` show. It never waits on the failover process except in `start()` and at shutdown:
a slow control process can only make that status older, never a heartbeat later.

Supervised like a worker (lb.control.supervisor's backoff and crash-loop rules): an unexpected exit
is logged (`event=failover_process_died`), counted, shown as role FAULT until the new
process reports, and the process is restarted after the backoff. The peer takes over on
the missing heartbeats; the control process removes the VIPs the dead one left
(`VipAdapter.remove_stale`) once the peer could have, before any restart (the new one would
too, but a crash loop or a start that keeps failing would leave them on both nodes). A
failover process that reports nothing for `hung_timeout_s` is killed and restarted the
same way. The control process sends its health verdict at least every `keepalive_s`: that
is how the failover process tells a wedged control process from a quiet one.

Has the same surface as failover.FailoverController where the daemon uses it (`role`,
`status()`, `set_local_health`, `request_switchover`, `cancel_switchover`, `stop`,
`close_handover`), so tests can still attach an in-process controller to a daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import failover
from lb import channel
from lb.control.status import ProcessStatus
from lb.control.supervisor import BACKOFF_MAX_S, BACKOFF_MIN_S, STABLE_AFTER_S, SlotStats
from lb.failoverd import link
from lb.log import LogCounts

logger = logging.getLogger("lb.control.failover_process")

PROCESS_FAULT = "failover_process"
"""The fault shown while no failover process runs (between a crash and its restart)."""
START_GRACE_S = 15.0
"""On top of the VIP timeout: how long a new failover process may take to start (imports)."""
RELEASE_TIMEOUT_S = 2.0
"""How long removing a dead failover process's VIPs may take (netlink answers in ms)."""


class FailoverProcess:
    """See the module docstring. One per daemon; use from the control loop only."""

    def __init__(
        self,
        *,
        on_role_change: Callable[[failover.Role, failover.Role], None] | None = None,
        on_event: Callable[[str, str], None] | None = None,
        hung_timeout_s: float = 5.0,
        keepalive_s: float = 1.0,
        python: str = sys.executable,
    ) -> None:
        self.on_role_change = on_role_change
        self.on_event = on_event
        self.hung_timeout_s = hung_timeout_s
        self.keepalive_s = keepalive_s
        self.python = python
        self.spec: link.Spec | None = None
        self.stats = SlotStats()
        self.stopping = False
        self.proc: asyncio.subprocess.Process | None = None
        self.chan: channel.ChannelProtocol | None = None
        self.started_at = 0.0
        self.last_heard = 0.0
        self.running = False
        """The current process has started the controller (and has not exited)."""
        self._status: failover.FailoverStatus | None = None
        self._status_at = 0.0
        self._gaps = link.HeartbeatGaps()
        self._control_silent_s = 0.0
        self._log = LogCounts()
        self._health = link.LocalHealth(False, 0, 0)
        self._start_result: asyncio.Future[str | None] | None = None
        self._stopped = asyncio.Event()
        self._exited = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._keepalive: asyncio.Task[None] | None = None

    # -- what the daemon reads ----------------------------------------------------------------

    @property
    def role(self) -> failover.Role:
        if self._status is None and self.spec is None:
            return failover.Role.INIT  # spawned, not started yet
        return self.status().role

    def status(self) -> failover.FailoverStatus:
        if self._status is not None:
            return self._status
        if self.spec is not None:
            return link.placeholder_status(self.spec.failover)
        raise failover.FailoverError("failover process not started")

    @property
    def heartbeat_gaps(self) -> link.HeartbeatGaps:
        return self._gaps

    def process_status(self) -> ProcessStatus:
        now = time.monotonic()
        return ProcessStatus(
            pid=self.proc.pid if self.proc is not None and self._alive() else None,
            running=self.running,
            uptime_s=round(now - self.started_at, 3) if self.running else 0.0,
            status_age_s=round(now - self._status_at, 3) if self._status_at else None,
            restarts=self.stats.restarts,
            crashes=self.stats.crashes,
            hung_kills=self.stats.hung_kills,
            crash_loop=self.stats.crash_loop(now),
            control_silent_s=self._control_silent_s,
            heartbeat_gap_samples=self._gaps.samples,
            log_lines_written=self._log.written,
            log_lines_dropped=self._log.dropped,
        )

    # -- what the daemon tells it -------------------------------------------------------------

    def set_local_health(self, healthy: bool, healthy_count: int = 0, total: int = 0) -> None:
        health = link.LocalHealth(healthy, max(0, healthy_count), max(0, total))
        if health != self._health:
            self._health = health
            self._send(health)

    def request_switchover(self) -> bool:
        """Ask the MASTER to hand over; False unless it is MASTER (as last reported)."""
        if not self.running or self.role is not failover.Role.MASTER:
            return False
        return self._send(link.Switchover())

    def cancel_switchover(self) -> None:
        self._send(link.CancelSwitchover())

    def reconfigure(self, spec: failover.FailoverSpec) -> tuple[str, ...]:
        """A reload (as FailoverController.reconfigure): the failover process applies what
        may change live (keys, max_clock_skew_s, the config digest) and logs the rest, which
        waits for a restart; the role is never touched. Returns the names of those others."""
        if self.spec is None:
            return ()
        old = self.spec.failover
        self.spec = dataclasses.replace(self.spec, generation=self.spec.generation + 1,
                                        failover=spec)
        self._send(self.spec)
        if self._status is not None:  # what /status shows until the process reports
            verified = {k.key_id: k.verified for k in self._status.keys}
            ids = [failover.key_id(k) for k in spec.keys]
            self._status = dataclasses.replace(
                self._status, max_clock_skew_s=spec.max_clock_skew_s,
                keys=tuple(failover.KeyStatus(i, n == 0, verified.get(i, 0))
                           for n, i in enumerate(ids)))
        return tuple(f.name for f in dataclasses.fields(spec) if f.name not in failover.LIVE_FIELDS
                     and getattr(spec, f.name) != getattr(old, f.name))

    # -- life ---------------------------------------------------------------------------------

    async def spawn(self) -> None:
        """Start the process (it loads its code and waits for the spec). Early, so its imports
        overlap with the workers' start."""
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                self.python, "-P", "-m", "lb.failoverd.main", str(child_sock.fileno()),
                str(os.getpid()), pass_fds=[child_sock.fileno()],
                stdin=asyncio.subprocess.DEVNULL)
        finally:
            child_sock.close()
        proc = self.proc
        self.started_at = self.last_heard = time.monotonic()
        self.running = False
        self._exited = asyncio.Event()
        self._stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        _, self.chan = await loop.connect_accepted_socket(
            lambda: channel.ChannelProtocol(self._on_frame, lambda exc: None), parent_sock)
        self._spawn_task(self._watch(proc), "failover-process-watch")
        if self._keepalive is None:
            self._keepalive = self._spawn_task(self._keepalive_loop(), "failover-keepalive")
        logger.info("event=failover_process_started pid=%s", proc.pid)

    async def start(self, spec: link.Spec) -> None:
        """Send the spec (spawning first if needed) and wait until the controller runs:
        stale VIPs removed, joined as BACKUP or FAULT. FailoverError if it cannot."""
        self.spec = spec
        if self.proc is None or self.proc.returncode is not None:
            await self.spawn()
        # Loaded now (pyroute2: ~0.1 s), so a crash's VIPs go at once, not after the peer
        # took over (_release_left_vips).
        failover.VipAdapter  # noqa: B018
        error = await self._begin(spec)
        if error is not None:
            raise failover.FailoverError(error)

    async def _begin(self, spec: link.Spec) -> str | None:
        """Spec and health to the current process; its start result (None: it runs)."""
        loop = asyncio.get_running_loop()
        self._start_result = result = loop.create_future()
        self._send(spec)
        self._send(self._health)
        exited = asyncio.ensure_future(self._exited.wait())
        try:
            async with asyncio.timeout(spec.failover.vip_timeout_s + START_GRACE_S):
                await asyncio.wait({result, exited}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            self._kill()
            return "failover process did not start in time"
        finally:
            exited.cancel()
        if result.done():
            outcome: str | None = result.result()
            return outcome
        code = self.proc.returncode if self.proc is not None else None
        return f"failover process exited (code {code}) before it started"

    async def stop(self, *, graceful: bool = True) -> None:
        """Leave the pair (graceful: hand the VIP over first). The process stays until
        close_handover(), after the workers drained."""
        self.stopping = True
        if not self._alive():
            return
        mode: link.StopMode = "graceful" if graceful else "fast"
        self._send(link.Stop(mode))
        fs = self.spec.failover if self.spec is not None else None
        bound = 5.0 if fs is None else (
            fs.leave_timeout_s + 2 * fs.vip_timeout_s + fs.notify_timeout_s + 3.0)
        stopped = asyncio.ensure_future(self._stopped.wait())
        exited = asyncio.ensure_future(self._exited.wait())
        try:
            done, _ = await asyncio.wait({stopped, exited}, timeout=bound,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            exited.cancel()
        if not done:
            logger.error("event=failover_stop_timeout bound_s=%.1f action=kill", bound)
            self._kill()

    async def close_handover(self) -> None:
        """Remove the handover's netfilter state (the failover process does it), then it exits."""
        self.stopping = True
        if self._alive():
            self._send(link.CloseHandover())
            try:
                async with asyncio.timeout(10.0):
                    await self._exited.wait()
            except TimeoutError:
                logger.error("event=failover_exit_timeout action=kill")
                self._kill()
        if self._keepalive is not None:
            self._keepalive.cancel()
        for t in list(self._tasks):
            if t is not asyncio.current_task():
                t.cancel()

    async def kill(self) -> None:
        """Forced exit (the daemon's second signal): no handover."""
        self.stopping = True
        self._kill()

    # -- internals ----------------------------------------------------------------------------

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def _send(self, msg: link.Message) -> bool:
        return self.chan is not None and self.chan.send(link.encode(msg))

    def _kill(self) -> None:
        if self._alive():
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)

    def _on_frame(self, frame: dict[str, Any]) -> None:
        try:
            msg = link.decode(frame)
        except link.LinkError as exc:
            logger.error("event=failover_channel_refused error=%r", str(exc))
            return
        self.last_heard = time.monotonic()
        try:
            self._handle(msg)
        except Exception:
            logger.exception("event=failover_message_failed type=%s", msg.TYPE)

    def _handle(self, msg: link.Message) -> None:
        if isinstance(msg, link.Status):
            self._status = msg.status
            self._status_at = time.monotonic()
            self._gaps = msg.gaps
            self._control_silent_s = msg.control_silent_s
            self._log = msg.log
        elif isinstance(msg, link.RoleChanged):
            old, new = failover.Role(msg.old), failover.Role(msg.new)
            if self._status is not None:
                self._status = dataclasses.replace(self._status, role=new,
                                                   role_reason=msg.reason)
            if self.on_role_change is not None:
                self.on_role_change(old, new)
        elif isinstance(msg, link.Event):
            if self.on_event is not None:
                self.on_event(msg.kind, msg.text)
        elif isinstance(msg, link.Started):
            self.running = True
            if self._start_result is not None and not self._start_result.done():
                self._start_result.set_result(None)
        elif isinstance(msg, link.StartFailed):
            logger.error("event=failover_start_failed error=%r", msg.error)
            if self._start_result is not None and not self._start_result.done():
                self._start_result.set_result(msg.error)
        elif isinstance(msg, link.Stopped):
            self.running = False
            self._stopped.set()
        elif isinstance(msg, link.Hello):
            logger.debug("event=failover_process_hello pid=%d", msg.pid)

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if proc is not self.proc:
            return
        self.running = False
        self._exited.set()
        if self.chan is not None and self.chan.transport is not None:
            self.chan.transport.close()
        if self.stopping:
            logger.info("event=failover_process_exited pid=%s code=%s", proc.pid, code)
            return
        await self._restart_after_crash(proc, code)

    async def _restart_after_crash(self, proc: asyncio.subprocess.Process, code: int) -> None:
        now = time.monotonic()
        st = self.stats
        ran_s = now - self.started_at
        how = f"signal={signal.Signals(-code).name}" if code < 0 else f"code={code}"
        st.crashes += 1
        st.backoff_s = (0.0 if ran_s >= STABLE_AFTER_S
                        else min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, st.backoff_s * 2)))
        st.recent.append(now)
        if st.crash_loop(now):
            logger.error("event=failover_process_crash_loop restarts_in_window=%d backoff_s=%.2f",
                         len(st.recent), st.backoff_s)
        logger.error("event=failover_process_died pid=%s %s ran_s=%.2f restart_in_s=%.2f",
                     proc.pid, how, ran_s, st.backoff_s)
        self._mark_down(f"failover process died ({how})")
        waited_s = await self._release_left_vips()
        if st.backoff_s > waited_s:
            await asyncio.sleep(st.backoff_s - waited_s)
        while not self.stopping and self.spec is not None:
            st.restarts += 1
            try:
                await self.spawn()
            except Exception:
                logger.exception("event=failover_spawn_failed")
            else:
                error = await self._begin(self.spec)
                if error is None:
                    logger.info("event=failover_process_restarted pid=%s",
                                self.proc.pid if self.proc else None)
                    return
                logger.error("event=failover_restart_failed error=%r", error)
                if self._alive():
                    self._kill()
                    return  # its watch restarts it
                if self.proc is not None and self._exited.is_set():
                    return  # ... likewise, already under way
            st.backoff_s = min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, st.backoff_s * 2))
            await asyncio.sleep(st.backoff_s)

    async def _release_left_vips(self) -> float:
        """Remove the VIPs a dead failover process left on the interface once the peer has
        had its master_down to take over; return how long that took.

        kill -9 releases nothing, and the peer takes over after master_down on the missing
        heartbeats: until a new process got far enough to remove them, both nodes held the
        VIP (an outside review: 0.4-3.5 s per crash in a crash loop, 23-25 s when the new
        process kept failing to start). Released at once, nobody held it for ~80 ms; after
        the longest master_down a peer can have ((down_after + 1) x interval) the peer holds
        it first, and this node's workers answer the clients still on its MAC meanwhile.
        Before any restart, so a new process never races it. The control process keeps
        CAP_NET_ADMIN for this.
        """
        spec = self.spec
        if spec is None:
            return 0.0
        fs = spec.failover
        started = time.monotonic()
        await asyncio.sleep((fs.down_after + 1) * fs.interval_s)
        try:
            vip = failover.VipAdapter(fs.interface, fs.vips, garp_count=0)
            try:
                async with asyncio.timeout(RELEASE_TIMEOUT_S):
                    removed = await vip.remove_stale()
            finally:
                await vip.close()
        except Exception as exc:  # never stops the restart
            logger.error("event=failover_vips_not_released error=%r", str(exc) or repr(exc))
            return time.monotonic() - started
        if removed:
            logger.warning("event=failover_vips_released_after_crash vips=%s",
                           ",".join(removed))
        return time.monotonic() - started

    def _mark_down(self, why: str) -> None:
        """No failover process: this node sends no heartbeats and acts on nothing. Shown as
        FAULT (the peer takes the VIP) until the new process reports."""
        old = self._status
        if old is None:
            return
        self._status = dataclasses.replace(
            old, role=failover.Role.FAULT, role_reason=why,
            faults=tuple(sorted({*old.faults, PROCESS_FAULT})), switchover_pending=False)
        if self.on_event is not None:
            self.on_event("failover", why)
        if old.role is not failover.Role.FAULT and self.on_role_change is not None:
            self.on_role_change(old.role, failover.Role.FAULT)

    async def _keepalive_loop(self) -> None:
        """The health verdict every keepalive_s (the failover process's proof that we live);
        a failover process silent for hung_timeout_s is killed (and restarted)."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            # Several keepalives within the failover process's limit, so it notices a stall
            # of about that limit, not up to one keepalive earlier.
            every = self.keepalive_s if self.spec is None else min(
                self.keepalive_s, self.spec.control_timeout_s / 5)
            await asyncio.sleep(every)
            now = loop.time()
            if now - last > every + link.STALL_S:
                self.last_heard = max(self.last_heard, time.monotonic())  # we stalled, not it
            last = now
            if self.stopping or not self._alive():
                continue
            self._send(self._health)
            silent = time.monotonic() - self.last_heard
            if self.running and silent > self.hung_timeout_s:
                logger.error("event=failover_process_hung pid=%s silent_s=%.1f action=kill",
                             self.proc.pid if self.proc else None, silent)
                self.stats.hung_kills += 1
                self.last_heard = time.monotonic()
                self._kill()

    def _spawn_task(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
