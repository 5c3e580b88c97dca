"""The failover process: the failover controller alone on its own event loop.

Started by the control process (lb.control.failover_process) as ``python -m lb.failoverd.main FD
PARENT_PID``; FD is its end of a socketpair carrying lb.failoverd.link messages. It runs
heartbeats, the role machine, the VIP adapter, connection handover, the carrier watch and
the notify hooks, and nothing else: health checks, /metrics, /status, admin calls and
reloads stay in the control process, so none of them can delay a heartbeat (at 1000
backends one /metrics render of the control process used to stall its loop long enough
for the peer to take the VIP).

Nothing on the heartbeat path waits for the control process: its messages are handled as
they arrive, and between them the last local-health verdict stands. Only a control process
silent for longer than `Spec.control_timeout_s` counts: the fault "control" (the node gives
the VIP away) until it speaks again. When the control process is gone (channel EOF, or
SIGTERM from PR_SET_PDEATHSIG) this process leaves the pair gracefully (priority 0, the peer
takes over first), removes the handover state and exits: it never outlives its parent
holding the VIP.

Runs on the stdlib asyncio loop (pyroute2 needs it). Imports only failover and the small
lb modules listed in tests/test_imports.py, so it starts in a few hundred milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import failover
from lb import channel, sysutil
from lb import log as log_setup
from lb.failoverd import link

log = logging.getLogger("lb.failoverd.main")

MAX_BACKLOG = 256 * 1024
"""Unsent bytes toward a control process that does not read, beyond which periodic status
messages are dropped (role changes and answers still go)."""
MAX_TIMED_SOURCES = 256
"""Addresses whose receive gaps are timed at once (in multicast mode without peers, anyone)."""
_PR_SET_PDEATHSIG = 1


class HeartbeatMeter:
    """Wraps the controller's transport and times the gaps between heartbeats: between our
    own sends (per destination) and between datagrams from each peer address."""

    def __init__(self, inner: Any, clock: Any,
                 from_peer: Callable[[str], bool] = lambda _host: True) -> None:
        self._inner = inner
        self._clock = clock
        self._from_peer = from_peer
        self._last_sent: dict[Any, float] = {}
        self._last_received: dict[str, float] = {}
        self.sent_gaps: deque[float] = deque(maxlen=link.GAP_SAMPLES)
        self.received_gaps: deque[float] = deque(maxlen=link.GAP_SAMPLES)

    @property
    def send_errors(self) -> int:
        return int(self._inner.send_errors)

    @send_errors.setter
    def send_errors(self, value: int) -> None:
        self._inner.send_errors = value

    def __getattr__(self, name: str) -> Any:  # whatever else the controller uses
        return getattr(self._inner, name)

    async def start(self, on_datagram: Any) -> None:
        def received(data: bytes, source: failover.Address) -> None:
            # Only the peers' datagrams are timed: a stranger's would grow the table
            # without bound and overwrite the real gaps (an outside review: 200,000
            # spoofed sources, 36 MiB; a flood hid a 0.9 s gap).
            if self._from_peer(source[0]):
                now = self._clock()
                last = self._last_received.get(source[0])
                if last is not None:
                    self.received_gaps.append(now - last)
                elif len(self._last_received) >= MAX_TIMED_SOURCES:
                    self._last_received.clear()
                self._last_received[source[0]] = now
            on_datagram(data, source)

        await self._inner.start(received)

    def destinations(self) -> Sequence[failover.Address]:
        result: Sequence[failover.Address] = self._inner.destinations()
        return result

    def send(self, data: bytes, dest: failover.Address) -> None:
        now = self._clock()
        last = self._last_sent.get(dest)
        if last is not None:
            self.sent_gaps.append(now - last)
        self._last_sent[dest] = now
        self._inner.send(data, dest)

    def close(self) -> None:
        self._inner.close()

    def gaps(self) -> link.HeartbeatGaps:
        return link.HeartbeatGaps(
            samples=len(self.sent_gaps), sent_max_s=max(self.sent_gaps, default=0.0),
            received_max_s=max(self.received_gaps, default=0.0))


def setup_logging(level: str, journald: str) -> None:
    """lb.log's setup: lines go through its bounded queue and writer thread, so a slow or
    stalled journal (or a disk under writeback throttling) blocks that thread, never the loop
    that sends the heartbeats; past the queue's bound lines are dropped and counted."""
    log_setup.setup(level, journald, "failover")


def apply_scheduling(sched_priority: int, nice: int) -> str:
    """SCHED_RR at `sched_priority` if > 0 and permitted, else `nice`; returns what holds.

    Children (nft, ip, notify scripts) get normal scheduling back (SCHED_RESET_ON_FORK).
    Each refusal is one warning: the process then runs as it was, which is still apart from
    the control process's work.
    """
    if sched_priority > 0:
        try:
            os.sched_setscheduler(0, os.SCHED_RR | os.SCHED_RESET_ON_FORK,
                                  os.sched_param(sched_priority))
        except OSError as exc:
            log.warning("failover_sched_not_permitted policy=rr priority=%d error=%r "
                        "fallback=nice fix='CAP_SYS_NICE or LimitRTPRIO=, RestrictRealtime=no "
                        "(docs/operations.md)'", sched_priority, exc.strerror or str(exc))
        else:
            log.info("failover_sched policy=rr priority=%d", sched_priority)
            return f"rr:{sched_priority}"
    with contextlib.suppress(OSError, AttributeError):  # filtered by the unit: harmless
        os.sched_setscheduler(0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError as exc:
            log.warning("failover_nice_not_permitted nice=%d error=%r fix='CAP_SYS_NICE or "
                        "LimitNICE= (the shipped unit sets it)'", nice,
                        exc.strerror or str(exc))
            return f"nice:{os.getpriority(os.PRIO_PROCESS, 0)}"
    return f"nice:{nice}"


def drop_privileges() -> None:
    """Keep CAP_NET_ADMIN and CAP_NET_RAW (the VIP, ARP, the TPROXY rule, nft), also for the
    programs this process runs; nothing else (after the scheduling and OOM settings, which may need
    more). A refusal is logged: failover without it is better than none."""
    try:
        st = sysutil.drop_privileges(None, {sysutil.CAP_NET_ADMIN, sysutil.CAP_NET_RAW},
                                     keep_ambient=True)
    except sysutil.PrivilegeError as exc:
        log.error("failover_privilege_drop_failed error=%r action=continue", str(exc))
        return
    log.info("failover_privileges cap_eff=%#x", st.cap_eff)


def _die_with_parent(parent_pid: int) -> bool:
    """SIGTERM when the control process dies (PR_SET_PDEATHSIG); False if it already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == parent_pid


class FailoverMain:
    """The failover process's life: wait for the spec, run the controller, stop on request
    or when the control process is gone."""

    def __init__(self, fd: int, parent_pid: int) -> None:
        self.fd = fd
        self.parent_pid = parent_pid
        self.chan: channel.ChannelProtocol | None = None
        self.spec: link.Spec | None = None
        self.ctl: failover.FailoverController | None = None
        self.meter: HeartbeatMeter | None = None
        self.vip: Any = None
        self.health: link.LocalHealth | None = None
        self.stopping = False
        self.control_silent = False
        self.last_heard = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[int] | None = None
        self._close_requested = asyncio.Event()
        self._start_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def run(self) -> int:
        loop = self._loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        sock = socket.socket(fileno=self.fd)
        chan = self.chan = channel.ChannelProtocol(self._on_frame, self._on_channel_closed)
        await loop.connect_accepted_socket(lambda: chan, sock)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.last_heard = loop.time()
        self._send(link.Hello(os.getpid()))
        self._spawn(self._tick_loop(), "failover-ticks")
        try:
            return await self._done
        finally:
            for t in list(self._tasks):
                t.cancel()
            if chan.transport is not None:
                chan.transport.close()

    # -- the channel ------------------------------------------------------------------------

    def _send(self, msg: link.Message, *, droppable: bool = False) -> None:
        chan = self.chan
        if chan is None or chan.transport is None:
            return
        if droppable and chan.transport.get_write_buffer_size() > MAX_BACKLOG:
            return
        chan.send(link.encode(msg))

    def _on_frame(self, frame: dict[str, Any]) -> None:
        try:
            msg = link.decode(frame)
        except link.LinkError as exc:
            log.error("failover_channel_refused error=%r action=exit", str(exc))
            self._finish(3)
            return
        assert self._loop is not None
        self.last_heard = self._loop.time()
        if self.control_silent:
            self.control_silent = False
            log.warning("failover_control_back action=restore_health")
            self._event("failover", "control process answers again: its health verdict counts")
            self._apply_health()
        try:
            self._handle(msg)
        except Exception:
            log.exception("failover_message_failed type=%s", msg.TYPE)

    def _handle(self, msg: link.Message) -> None:
        ctl = self.ctl
        if isinstance(msg, link.LocalHealth):
            self.health = msg
            self._apply_health()
        elif isinstance(msg, link.Spec):
            if self.spec is None:
                self.spec = msg
                self._start_task = self._spawn(self._start(msg), "failover-start")
            else:
                self._reconfigure(msg)
        elif isinstance(msg, link.Switchover):
            if ctl is None or not ctl.request_switchover():
                role = ctl.role.label if ctl is not None else "-"
                self._event("switchover", f"refused: not MASTER (role {role})")
            self._send_status()
        elif isinstance(msg, link.CancelSwitchover):
            if ctl is not None:
                ctl.cancel_switchover()
            self._send_status()
        elif isinstance(msg, link.Stop):
            self._spawn(self._stop(msg.mode), "failover-stop")
        elif isinstance(msg, link.CloseHandover):
            self._close_requested.set()
        else:
            log.warning("failover_message_unexpected type=%s", msg.TYPE)

    def _on_channel_closed(self, exc: Exception | None) -> None:
        self._close_requested.set()
        if not self.stopping:
            self._spawn(self._leave("control process gone (channel closed)"), "failover-leave")

    def _on_signal(self, sig: signal.Signals) -> None:
        if os.getppid() != self.parent_pid:  # PR_SET_PDEATHSIG: the control process died
            self._close_requested.set()
            if not self.stopping:
                self._spawn(self._leave(f"control process gone ({sig.name})"), "failover-leave")
        else:
            # The control process owns shutdown (a signal to the whole group reaches it too).
            log.info("failover_signal_ignored signal=%s reason='the control process stops us'",
                     sig.name)

    def _event(self, kind: str, text: str) -> None:
        self._send(link.Event(kind, text))

    def _send_status(self) -> None:
        if self.ctl is None or self.meter is None or self._loop is None:
            return
        silent = self._loop.time() - self.last_heard
        self._send(link.Status(self.ctl.status(), self.meter.gaps(), round(silent, 3),
                               log_setup.counts()), droppable=True)

    # -- life -------------------------------------------------------------------------------

    async def _start(self, spec: link.Spec) -> None:
        setup_logging(spec.log_level, spec.journald)
        adj = sysutil.lower_oom_score_adj(spec.oom_score_adj)
        if adj > spec.oom_score_adj:
            log.info("failover_oom_score_adj_kept wanted=%d current=%d reason='not permitted "
                     "to lower it (OOMScoreAdjust= of the unit sets it)'", spec.oom_score_adj, adj)
        apply_scheduling(spec.sched_priority, spec.nice)
        drop_privileges()
        fs = spec.failover
        try:
            self.vip = vip = failover.VipAdapter(
                fs.interface, fs.vips, garp_count=spec.garp_count,
                garp_interval_s=spec.garp_interval_s,
                garp_repeat_after_s=spec.garp_repeat_after_s or None)
            handover = failover.Handover(fs.node_name, fs.interface, fs.vips,
                                         spec.handover_ports)
            ctl = failover.FailoverController(fs, vip, handover=handover,
                                              on_role_change=self._role_changed)
            assert self._loop is not None
            # The controller's own transport, timed (pairlb_heartbeat_*_gap_max_seconds).
            self.meter = HeartbeatMeter(ctl._transport, self._loop.time, ctl.from_peer)
            ctl._transport = self.meter
            self.ctl = ctl
            self._apply_health()
            if self.spec is not None and self.spec is not spec:
                # A reload read while the controller was being built (before self.ctl was
                # set) only reached self.spec: apply it now, or e.g. a key rotation step is
                # silently lost (an outside review).
                ctl.reconfigure(self.spec.failover)
            await ctl.start()
        except Exception as exc:
            log.error("failover_start_failed error=%r", str(exc))
            self._send(link.StartFailed(str(exc) or type(exc).__name__))
            self.ctl = None
            self._finish(1)
            return
        self._send_status()
        self._send(link.Started())
        tracked = tuple(dict.fromkeys((fs.interface, *spec.track_interfaces)))
        self._spawn(vip.watch_carrier(tracked, ctl.carrier_changed,
                                      peers=lambda: ctl.peer_hosts), "failover-carrier")

    def _apply_health(self) -> None:
        """The controller's local health, derived from the control process's last verdict
        and whether it has gone silent (then: no healthy backends here)."""
        ctl, h = self.ctl, self.health
        if ctl is None or h is None:
            return
        if self.control_silent:
            ctl.set_local_health(False, 0, h.total)
        else:
            ctl.set_local_health(h.healthy, h.healthy_count, h.total)

    def _reconfigure(self, spec: link.Spec) -> None:
        """A reload: what may change live is applied (the controller's reconfigure: keys,
        clock skew, config digest; and the log level); the rest waits for a restart. The
        role is never touched, so a reload that changed nothing changes nothing."""
        old = self.spec
        assert old is not None
        self.spec = spec
        if spec.log_level != old.log_level:
            setup_logging(spec.log_level, spec.journald)
        pending = old.restart_only_changes(spec)
        if self.ctl is not None:
            pending += [f"failover.{name}" for name in self.ctl.reconfigure(spec.failover)]
        if pending:
            log.warning("failover_reload_pending keys=%s reason='applied at the next restart "
                        "(the VIP never moves on reload)'", ",".join(pending))
            self._event("reload", f"failover: {', '.join(pending)} changed: applied at the "
                                  "next restart")

    def _role_changed(self, old: failover.Role, new: failover.Role) -> None:
        reason = self.ctl.status().role_reason if self.ctl is not None else ""
        self._send(link.RoleChanged(str(old), str(new), reason))
        self._send_status()

    async def _await_start(self) -> None:
        if self._start_task is not None and not self._start_task.done():
            with contextlib.suppress(Exception):
                await self._start_task

    async def _stop(self, mode: link.StopMode) -> None:
        if self.stopping:
            return
        self.stopping = True
        await self._await_start()
        ctl = self.ctl
        if ctl is not None:
            try:
                await ctl.stop(graceful=mode == "graceful")
            except Exception:
                log.exception("failover_stop_failed mode=%s", mode)
            self._send_status()
        self._send(link.Stopped())
        await self._close_requested.wait()
        if ctl is not None:
            await ctl.close_handover()
        self._finish(0)

    async def _leave(self, why: str) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.warning("failover_control_gone reason=%r action=leave", why)
        await self._await_start()
        if self.ctl is not None:
            try:
                await self.ctl.stop(graceful=True)
            except Exception:
                log.exception("failover_stop_failed mode=graceful")
            await self.ctl.close_handover()
        self._finish(0)

    def _finish(self, code: int) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(code)

    async def _tick_loop(self) -> None:
        """Status to the control process; its silence checked; our own stalls forgiven."""
        assert self._loop is not None
        loop = self._loop
        last = loop.time()
        while True:
            interval = self.spec.status_interval_s if self.spec is not None else 0.2
            await asyncio.sleep(interval)
            now = loop.time()
            if now - last > interval + link.STALL_S:
                # We were stopped or starved ourselves: that is not the control's silence.
                self.last_heard = max(self.last_heard, now - interval)
            last = now
            ctl, spec = self.ctl, self.spec
            if ctl is None or spec is None or self.stopping:
                continue
            runner = getattr(ctl, "_runner", None)
            if runner is not None and runner.done():
                log.critical("failover_controller_dead action=exit reason='heartbeats stopped'")
                self._finish(2)
                return
            silent = now - self.last_heard
            if silent > spec.control_timeout_s and not self.control_silent:
                # Counted as "no healthy backends here", not as a fault: a healthy peer gets
                # the VIP (make-before-break), but when both control processes are silent
                # (both stopped, one heavy reload on both) the best node keeps it, where two
                # faults left the VIP on neither (an outside review: 3.3 s, no holder).
                self.control_silent = True
                log.error("failover_control_silent silent_s=%.1f limit_s=%.1f action=demote",
                          silent, spec.control_timeout_s)
                self._apply_health()
                self._event("failover", f"control process silent for {silent:.1f} s: "
                                        "counted as unhealthy")
            self._send_status()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("failover_task_failed task=%s", task.get_name(), exc_info=task.exception())
            self._finish(2)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    fd, parent_pid = int(args[0]), int(args[1])
    setup_logging("info", "auto")
    if not _die_with_parent(parent_pid):
        log.warning("failover_parent_gone_at_start action=exit")
        log_setup.flush()
        return 0
    # Load the netlink code now, while the control process starts its workers, so the
    # spec finds everything ready.
    with contextlib.suppress(Exception):
        failover.VipAdapter  # noqa: B018 (a lazy import: failover.adapters.vip and pyroute2)
    try:
        return asyncio.run(FailoverMain(fd, parent_pid).run())
    except OSError as exc:
        if exc.errno == errno.EBADF:
            log.error("failover_channel_missing fd=%d", fd)
            return 1
        raise
    finally:
        log_setup.flush()  # what is queued, unless the sink is stalled (bounded wait)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
