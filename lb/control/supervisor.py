"""Supervision of proxy worker processes (gunicorn's arbiter, in asyncio).

A worker that exits unexpectedly (crash, kill -9, OOM) is restarted with exponential
backoff and counted; a burst of restarts is reported as a crash loop rather than hidden.
A worker that stops answering pings is killed and replaced: a live pid is not proof of a
live event loop. The listening sockets are created once by the control process and kept
by it, so a dying worker loses only the connections it had accepted: queued ones wait in
the shared accept queue for its siblings, or (one socket per slot) in its slot's queue,
which the siblings take while lb.control.acceptwatch says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from healthcheck import Lateness
from lb import channel, sysutil
from lb import worker_link as wl
from lb.control.acceptwatch import SlotState
from lb.control.status import RetiringWorkerStatus, WorkerStatus

logger = logging.getLogger("lb.control.supervisor")

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 10.0
STABLE_AFTER_S = 10.0
"""A worker that ran this long resets the backoff."""
CRASH_LOOP_WINDOW_S = 60.0
CRASH_LOOP_RESTARTS = 5
SNAPS_KEPT = 1024
"""Snapshots waiting to be applied kept per worker with their send times: ten seconds of
pushes at their fastest (HEALTH_PUSH_GAP_S); more are folded into the newest."""


@dataclass(eq=False)
class WorkerHandle:
    index: int
    generation: int
    proc: asyncio.subprocess.Process | None = None
    chan: channel.ChannelProtocol | None = None
    started_at: float = 0.0
    last_pong: float = 0.0
    answered: float = 0.0
    """When the last ping it answered was sent (pongs come back in order): a real answer
    to a question asked then (``last_pong`` is moved forward after a stall of our own
    loop, and set at spawn and at a kill)."""
    pings: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    """When each ping not answered yet was sent."""
    ready: bool = False
    applied_generation: int | None = None
    """The config generation this worker last applied (its ConfigApplied)."""
    retiring: bool = False
    killed: bool = False
    """Sent SIGKILL (hung): no longer counted as serving while it dies."""
    paused: set[str] = field(default_factory=set)
    """Listeners it paused accepting on at max_connections (wl.Paused)."""
    snap_ver: int = 0
    """The rotation snapshot it routes by (its last wl.SnapApplied)."""
    snap_max: int = 0
    """The newest snapshot sent to it: an answer beyond it (or going back) is refused."""
    snaps_sent: deque[tuple[int, float, bool]] = field(default_factory=deque)
    """(version, when, a push) of each snapshot sent and not applied yet, oldest first, at
    most SNAPS_KEPT. Not a push: a whole snapshot sent to this worker alone (the welcome, a
    resync), and any sent before it applied its welcome: they wait for the process to
    start. A reload's whole snapshot, broadcast, is one (with the new config's apply)."""
    snaps_folded: int = 0
    """Pushes merged into the newest entry because SNAPS_KEPT were waiting: not observed."""
    stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def serving(self) -> bool:
        """Said Ready, and neither exited nor being killed."""
        return self.ready and not self.killed and not self.stopped.is_set()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def send(self, msg: wl.Message) -> bool:
        if isinstance(msg, wl.Snap):
            self.snap_sent(msg.ver, push=False)
        return self.chan is not None and self.chan.send(wl.encode(msg))

    @property
    def alive(self) -> bool:
        """Has a channel and has not exited (it may be stopped, or dying)."""
        return self.chan is not None and not self.stopped.is_set() and not self.killed

    def snap_sent(self, ver: int, push: bool = True) -> None:
        sent = self.snaps_sent
        self.snap_max = max(self.snap_max, ver)
        push = push and self.snap_ver > 0
        if len(sent) >= SNAPS_KEPT:
            # Folded into the newest entry: its send time stays (the lag is never reported
            # smaller than it is), this push is not observed.
            _, t, p = sent.pop()
            sent.append((ver, t, p))
            self.snaps_folded += 1
            return
        sent.append((ver, time.monotonic(), push))

    def snap_applied(self, ver: int, now: float, delays: Lateness | None = None,
                     at: float = 0.0) -> bool:
        """Snapshot ``ver`` (and every older one) is applied, at the worker's ``at`` (0:
        unknown, ``now``); each push's time from send to applied goes to ``delays``. False
        (nothing changed) for a version never sent to this worker or older than the one it
        said before."""
        if ver < self.snap_ver or ver > self.snap_max:
            return False
        self.snap_ver = ver
        sent = self.snaps_sent
        while sent and sent[0][0] <= ver:
            _, t, push = sent.popleft()
            if push and delays is not None:
                # The worker's clock is ours (CLOCK_MONOTONIC), its answer between the two.
                delays.observe(min(max(at, t), now) - t if at else now - t, now)
        return True

    def rotation_lag_s(self, now: float) -> float:
        """How long the oldest snapshot it has not applied has been on its way (0: none, or
        the process is gone: it routes nothing)."""
        if not self.snaps_sent or self.stopped.is_set():
            return 0.0
        return now - self.snaps_sent[0][1]

    def send_frame(self, frame: channel.Message) -> bool:
        """An already encoded message (a broadcast encodes once for every worker)."""
        return self.chan is not None and self.chan.send(frame)


@dataclass
class SlotStats:
    restarts: int = 0
    crashes: int = 0
    hung_kills: int = 0
    backoff_s: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=CRASH_LOOP_RESTARTS))

    def crash_loop(self, now: float) -> bool:
        return (
            len(self.recent) == CRASH_LOOP_RESTARTS and now - self.recent[0] < CRASH_LOOP_WINDOW_S
        )


class Supervisor:
    """Keeps ``count`` workers alive; ``welcome(handle)`` gives a new worker its messages."""

    def __init__(
        self,
        count: int,
        listener_fds: Callable[[], dict[str, tuple[int, ...]]],
        welcome: Callable[[WorkerHandle], list[wl.Message]],
        on_message: Callable[[WorkerHandle, wl.Message], None],
        ping_interval_s: float = 1.0,
        ping_timeout_s: float = 5.0,
        worker_args: Callable[[], list[str]] = list,
    ) -> None:
        self.count = count
        self.worker_args = worker_args
        """Extra arguments of each new worker (its user and group: lb.sysutil.Identity)."""
        self.refused = 0
        """Workers that exited because they could not drop their privileges."""
        self.listener_fds = listener_fds
        self.welcome = welcome
        self.on_message = on_message
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.generation = 0
        self.slots: dict[int, WorkerHandle] = {}
        self.slot_stats: dict[int, SlotStats] = {}
        self.retiring: set[WorkerHandle] = set()
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._ping_task: asyncio.Task[None] | None = None
        self.rotation_apply = Lateness()
        """Each pushed snapshot's time from send to a worker's SnapApplied (the rotation's
        propagation: ``pairlb_rotation_apply_seconds``, /status rotation.apply_ms)."""

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        for i in range(self.count):
            self.slot_stats[i] = SlotStats()
            await self._spawn(i)
        self._ping_task = asyncio.create_task(self._ping_loop(), name="worker-ping")

    async def wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(h.ready for h in self.slots.values()):
                return True
            if self.refused:
                return False
            await asyncio.sleep(0.01)
        return False

    async def stop(self, timeout_s: float) -> None:
        """Ask every worker to drain for ``timeout_s``; SIGKILL the ones still there after."""
        self.stopping = True
        if self._ping_task:
            self._ping_task.cancel()
        handles = [*self.slots.values(), *self.retiring]
        for h in handles:
            h.send(wl.Stop(timeout_s))
        await self._reap(handles, timeout_s + 2.0)
        for t in list(self._tasks):
            t.cancel()

    async def kill_all(self) -> None:
        """Forced exit (second signal): no draining."""
        self.stopping = True
        for h in [*self.slots.values(), *self.retiring]:
            self._kill(h, signal.SIGKILL)

    async def replace_all(self, drain_s: float) -> None:
        """Rolling replacement (new listeners): new workers first, then old ones drain."""
        self.generation += 1
        old = list(self.slots.values())
        for h in old:
            h.retiring = True
            if not h.stopped.is_set():  # one in its restart backoff has nothing to retire
                self.retiring.add(h)
        for i in range(self.count):
            await self._spawn(i)
        await self.wait_ready(10.0)
        for h in old:
            h.send(wl.Stop(drain_s))
        task = asyncio.create_task(self._reap(old, drain_s + 2.0))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def broadcast(self, msg: wl.Message) -> None:
        frame = wl.encode(msg)
        if not isinstance(msg, wl.Snap):
            for h in self.slots.values():
                h.send_frame(frame)
            return
        current = set(self.slots.values())
        for h in current:
            if h.alive:
                h.snap_sent(msg.ver)
                h.send_frame(frame)
        # Retiring workers accept until every new one is Ready, then finish their requests
        # (retries pick backends): they get every backend taken out, as a delta on the last
        # snapshot each was sent (they got every one, in order).
        frames: dict[int, channel.Message] = {}
        for h in self.retiring:
            if h in current or not h.alive or not h.snap_max:
                continue
            base = h.snap_max
            if base not in frames:
                frames[base] = wl.encode(retiring_snap(msg, base))
            h.snap_sent(msg.ver)
            h.send_frame(frames[base])

    def slot_states(self) -> list[SlotState]:
        """Each slot's current worker, for lb.control.acceptwatch (a slot in its restart
        backoff still holds its dead handle: not serving)."""
        out = []
        for i in range(self.count):
            h = self.slots.get(i)
            out.append(SlotState(h is not None and h.serving, h.answered if h else 0.0,
                                 frozenset(h.paused) if h else frozenset()))
        return out

    def status(self) -> tuple[WorkerStatus, ...]:
        now = time.monotonic()
        out = []
        for i, h in sorted(self.slots.items()):
            st = self.slot_stats[i]
            out.append(
                WorkerStatus(
                    index=i,
                    pid=h.pid,
                    ready=h.serving,
                    alive=h.alive,
                    uptime_s=round(now - h.started_at, 3) if h.started_at else 0.0,
                    restarts=st.restarts,
                    crashes=st.crashes,
                    hung_kills=st.hung_kills,
                    crash_loop=st.crash_loop(now),
                    rotation_version=h.snap_ver,
                    rotation_lag_s=h.rotation_lag_s(now),
                )
            )
        return tuple(out)

    def retiring_status(self) -> tuple[RetiringWorkerStatus, ...]:
        """Old workers of a rolling replacement still running (they accept until every new
        one is Ready, then finish their requests); not one still in its slot."""
        now = time.monotonic()
        current = set(self.slots.values())
        return tuple(
            RetiringWorkerStatus(h.index, h.pid, h.snap_ver, h.rotation_lag_s(now))
            for h in sorted(self.retiring, key=lambda h: (h.index, h.pid or 0))
            if h.alive and h not in current
        )

    # -- internals ---------------------------------------------------------------------

    async def _spawn(self, index: int) -> WorkerHandle:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        handle = WorkerHandle(index, self.generation)
        fds = self.listener_fds()
        try:
            handle.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",  # never the working directory's modules (the daemon may run as root)
                "-m",
                "lb.data.worker",
                str(child_sock.fileno()),
                str(index),
                *self.worker_args(),
                pass_fds=[child_sock.fileno(), *(fd for f in fds.values() for fd in f)],
                stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            child_sock.close()
        # First in the OOM killer's choice from the start, not only once the worker has
        # imported its modules and set this itself (it does that too).
        with contextlib.suppress(OSError):
            sysutil.set_oom_score_adj(
                sysutil.worker_oom_score_adj(sysutil.get_oom_score_adj()), handle.proc.pid)
        handle.started_at = handle.last_pong = time.monotonic()
        loop = asyncio.get_running_loop()
        _, handle.chan = await loop.connect_accepted_socket(
            lambda: channel.ChannelProtocol(
                lambda m: self._on_message(handle, m), lambda exc: None
            ),
            parent_sock,
        )
        self.slots[index] = handle
        for msg in self.welcome(handle):
            handle.send(msg)
        task = asyncio.create_task(self._watch(handle), name=f"worker-{index}-watch")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        logger.info(
            "event=worker_started index=%d pid=%s gen=%d", index, handle.pid, handle.generation
        )
        return handle

    def _on_message(self, handle: WorkerHandle, frame: channel.Message) -> None:
        try:
            msg = wl.decode(frame)
        except wl.WorkerLinkError as exc:
            logger.error("event=worker_message_invalid index=%d error=%s", handle.index, exc)
            return
        if isinstance(msg, wl.Pong):
            handle.last_pong = time.monotonic()
            if handle.pings:
                handle.answered = handle.pings.popleft()
        elif isinstance(msg, wl.Ready):
            handle.ready = True
        elif isinstance(msg, wl.ConfigApplied):
            handle.applied_generation = msg.gen
        elif isinstance(msg, wl.Paused):
            (handle.paused.add if msg.paused else handle.paused.discard)(msg.listener)
        elif isinstance(msg, wl.SnapApplied) and not handle.snap_applied(
                msg.ver, time.monotonic(), self.rotation_apply, msg.at):
            logger.error("event=worker_message_invalid index=%d error=%r", handle.index,
                         f"applied snapshot {msg.ver}: sent {handle.snap_max}, "
                         f"applied {handle.snap_ver} before")
            return
        try:
            self.on_message(handle, msg)
        except Exception:
            logger.exception("event=worker_message_failed type=%s", msg.TYPE)

    async def _watch(self, handle: WorkerHandle) -> None:
        assert handle.proc is not None
        code = await handle.proc.wait()
        handle.stopped.set()
        if handle.chan is not None and handle.chan.transport is not None:
            handle.chan.transport.close()
        if self.stopping or handle.retiring:
            self.retiring.discard(handle)
            logger.info(
                "event=worker_exited index=%d pid=%s code=%s", handle.index, handle.pid, code
            )
            return
        now = time.monotonic()
        st = self.slot_stats[handle.index]
        ran_s = now - handle.started_at
        how = f"signal={signal.Signals(-code).name}" if code < 0 else f"code={code}"
        if code == sysutil.EXIT_PRIVILEGES:
            self.refused += 1
            logger.error(
                "event=worker_refused_to_serve index=%d pid=%s reason=privilege_drop_failed",
                handle.index,
                handle.pid,
            )
        st.crashes += 1
        st.backoff_s = (
            0.0
            if ran_s >= STABLE_AFTER_S
            else min(BACKOFF_MAX_S, max(BACKOFF_MIN_S, st.backoff_s * 2))
        )
        st.recent.append(now)
        if st.crash_loop(now):
            logger.error(
                "event=worker_crash_loop index=%d restarts_in_window=%d window_s=%.0f "
                "backoff_s=%.2f",
                handle.index,
                len(st.recent),
                CRASH_LOOP_WINDOW_S,
                st.backoff_s,
            )
        logger.warning(
            "event=worker_died index=%d pid=%s %s ran_s=%.2f restart_in_s=%.2f",
            handle.index,
            handle.pid,
            how,
            ran_s,
            st.backoff_s,
        )
        if st.backoff_s:
            await asyncio.sleep(st.backoff_s)
        if self.stopping or self.slots.get(handle.index) is not handle:
            return
        st.restarts += 1
        try:
            await self._spawn(handle.index)
        except Exception:
            logger.exception("event=worker_spawn_failed index=%d", handle.index)

    async def _ping_loop(self) -> None:
        prev = time.monotonic()
        while True:
            await asyncio.sleep(self.ping_interval_s)
            now = time.monotonic()
            late = now - prev - self.ping_interval_s
            prev = now
            if late > self.ping_interval_s:
                # This loop was stalled (a long reload, no CPU): the workers' answers may be
                # waiting unread. Their silence counts only while we were listening.
                logger.warning("event=control_loop_stalled late_s=%.1f", late)
                for h in self.slots.values():
                    h.last_pong += late
                continue
            for h in list(self.slots.values()):
                if h.stopped.is_set():
                    continue
                if now - h.last_pong > self.ping_timeout_s:
                    logger.error(
                        "event=worker_hung index=%d pid=%s silent_s=%.1f action=kill",
                        h.index,
                        h.pid,
                        now - h.last_pong,
                    )
                    self.slot_stats[h.index].hung_kills += 1
                    h.last_pong = now
                    h.killed = True
                    self._kill(h, signal.SIGKILL)
                    continue
                if h.send(wl.Ping()):
                    h.pings.append(now)

    async def _reap(self, handles: list[WorkerHandle], timeout_s: float) -> None:
        waits = [h.stopped.wait() for h in handles if h.proc is not None]
        if not waits:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*waits)
        except TimeoutError:
            for h in handles:
                if not h.stopped.is_set():
                    logger.warning("event=worker_kill_after_drain pid=%s", h.pid)
                    self._kill(h, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await asyncio.gather(*(h.stopped.wait() for h in handles))

    @staticmethod
    def _kill(handle: WorkerHandle, sig: signal.Signals) -> None:
        if handle.proc is not None and handle.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(handle.proc.pid, sig)


def retiring_snap(msg: wl.Snap, base: int) -> wl.Snap:
    """What a retiring worker gets of a rotation change: the backends taken out, never one
    put in. The names it knows may be other servers by now (removed at runtime and added
    again elsewhere, or moved by the reload that retires it): a name put back in could send
    its requests to a server that left."""
    pools = {
        name: wl.PoolSnap(p.panic, {b: e for b, e in p.entries.items() if not e[0]})
        for name, p in msg.pools.items()
    }
    return wl.Snap(msg.ver, pools, base)
