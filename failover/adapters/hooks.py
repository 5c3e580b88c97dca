"""Notify hooks: operator scripts run on every role transition, in order, one at a time.

Each script runs as `SCRIPT ROLE_FROM ROLE_TO NODE` in its own process group, under a timeout
after which the whole group is killed. It gets only what docs/configuration.md ("Notify
scripts") promises: a clean environment (PATH=HOOK_PATH, PAIRLB_ROLE_FROM, PAIRLB_ROLE_TO,
PAIRLB_NODE, PAIRLB_REASON, and RUNTIME_DIRECTORY when the service has one; nothing else of
pairlb's own environment, so no NOTIFY_SOCKET or CREDENTIALS_DIRECTORY), stdin from
/dev/null, and no privilege it did not have as a plain process of its user: before the exec
the child sets no_new_privs and empties its ambient and inheritable capabilities, so it
execs with no permitted or effective ones either (pairlb's own capabilities never reach it;
a script run by a pairlb started by hand as root is root, with root's capabilities). That is
done by util-linux's `setpriv` in front of the script, so the child is spawned without a
Python `preexec_fn` (vfork, no copy of the failover process's page tables: forking one
stalled its loop 7-8 ms per script); without `setpriv` the child does it itself before the
exec (`_ChildPrivileges`). The outcome (exit status, duration, last
lines of output) is logged and counted (`counters()`: runs, failures, timeouts, transitions
dropped; the failover status carries them to /metrics and /status). Transitions queue up
and run strictly in order in one worker task, so a slow script delays later scripts but
never a heartbeat: the controller only enqueues. Imports nothing from lb or healthcheck.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

_TAIL_BYTES = 2048
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""PATH of every notify script (fixed: not pairlb's own)."""
PASSED_THROUGH = ("RUNTIME_DIRECTORY",)
"""Variables of pairlb's environment a script also gets when set (under the unit,
RUNTIME_DIRECTORY=/run/pairlb, writable, for a path unit to watch)."""


def hook_environment(base: Mapping[str, str]) -> dict[str, str]:
    """The environment every script starts from (PAIRLB_* are added per transition)."""
    env = {"PATH": HOOK_PATH}
    env.update({k: base[k] for k in PASSED_THROUGH if k in base})
    return env


class _ChildPrivileges:
    """Run in the forked child just before exec (``preexec_fn``): no_new_privs, then the
    ambient set cleared and the other capability sets emptied. The C functions are looked
    up in the parent; the child only calls them (no import, no allocation by Python code
    beyond the call). Every step may fail harmlessly: a kernel without ambient capabilities
    had none to pass on, and with the ambient set clear a non-root exec gains none."""

    _PR_SET_NO_NEW_PRIVS = 38
    _PR_CAP_AMBIENT = 47
    _PR_CAP_AMBIENT_CLEAR_ALL = 4

    def __init__(self) -> None:
        import ctypes

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        libc = ctypes.CDLL(None, use_errno=True)
        self._prctl = libc.prctl
        self._prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                                ctypes.c_ulong]
        self._capset = libc.capset
        self._header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
        self._data = (Data * 2)()  # all zero
        self._ref = ctypes.byref

    def __call__(self) -> None:
        self._prctl(self._PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        self._prctl(self._PR_CAP_AMBIENT, self._PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
        # Empties inheritable too; a process that root's rules apply to regains the rest at
        # exec anyway (documented: a pairlb run by hand as root runs its scripts as root).
        self._capset(self._ref(self._header), self._data)


@dataclass(frozen=True)
class HookResult:
    script: str
    role_from: str
    role_to: str
    returncode: int | None
    """None when the script could not start or was killed on timeout."""
    duration_s: float
    timed_out: bool = False
    error: str = ""
    output_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass(frozen=True)
class HookCounters:
    """What the notify scripts did so far (pairlb_failover_notify_*_total, /status "notify")."""

    runs: int = 0
    """Scripts run, whatever the outcome."""
    failures: int = 0
    """Runs that failed: non-zero exit, could not start, killed on timeout, an error."""
    timeouts: int = 0
    """Failures that were killed at notify_timeout_s."""
    dropped: int = 0
    """Transitions whose scripts never ran: queued behind more than `max_queued` others."""


@dataclass(frozen=True)
class _Transition:
    role_from: str
    role_to: str
    reason: str


class HookRunner:
    """Queue of transitions and the worker that runs the scripts for each (see module doc)."""

    def __init__(
        self,
        scripts: Sequence[str],
        *,
        node: str,
        timeout_s: float = 5.0,
        max_queued: int = 64,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"failover.notify_timeout_s: must be > 0 (got {timeout_s})")
        self.scripts = tuple(scripts)
        self.node = node
        self.timeout_s = timeout_s
        self._env = hook_environment(os.environ) if env is None else dict(env)
        self._setpriv = shutil.which("setpriv", path=HOOK_PATH)
        self._preexec = None if self._setpriv else _ChildPrivileges()
        self._queue: deque[_Transition] = deque()
        self._max_queued = max_queued
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.runs = 0
        self.failures = 0
        self.timeouts = 0
        self.dropped = 0
        self.recent: deque[HookResult] = deque(maxlen=32)

    def notify(self, role_from: str, role_to: str, reason: str = "") -> None:
        """Queue the scripts for one transition; returns at once."""
        if not self.scripts:
            return
        if len(self._queue) >= self._max_queued:
            # Flapping faster than scripts run: keep the newest transitions, they say where
            # the node is now.
            dropped = self._queue.popleft()
            self.dropped += 1
            log.warning("notify_dropped from=%s to=%s reason=queue_full",
                        dropped.role_from, dropped.role_to)
        self._queue.append(_Transition(role_from, role_to, reason))
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        """The worker; runs until cancelled. Each script run is an error boundary."""
        while True:
            while not self._queue:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
            item = self._queue.popleft()
            for script in self.scripts:
                try:
                    result = await self._run_one(script, item)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.runs += 1
                    self.failures += 1
                    log.exception("notify_failed script=%s", script)
                    continue
                self._record(result)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every queued transition has run; False if the time ran out."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def counters(self) -> HookCounters:
        return HookCounters(self.runs, self.failures, self.timeouts, self.dropped)

    def _record(self, r: HookResult) -> None:
        self.runs += 1
        self.recent.append(r)
        if r.ok:
            log.info("notify_done script=%s from=%s to=%s status=0 duration_s=%.3f",
                     r.script, r.role_from, r.role_to, r.duration_s)
            return
        self.failures += 1
        if r.timed_out:
            self.timeouts += 1
        log.warning("notify_failed script=%s from=%s to=%s status=%s timed_out=%s "
                    "duration_s=%.3f error=%s output=%r", r.script, r.role_from, r.role_to,
                    r.returncode, r.timed_out, r.duration_s, r.error, r.output_tail)

    async def _run_one(self, script: str, t: _Transition) -> HookResult:
        env = dict(self._env, PAIRLB_ROLE_FROM=t.role_from, PAIRLB_ROLE_TO=t.role_to,
                   PAIRLB_NODE=self.node, PAIRLB_REASON=t.reason)
        start = time.monotonic()
        argv = [script, t.role_from, t.role_to, self.node]
        try:
            if self._setpriv is not None:
                # setpriv would report a missing script as its own exit 127: say it here.
                if not os.access(script, os.X_OK):
                    os.stat(script)  # the reason (missing, no access) if there is one
                    raise PermissionError(13, "Permission denied")
                argv = [self._setpriv, "--no-new-privs", "--inh-caps=-all",
                        "--ambient-caps=-all", "--", *argv]
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=self._preexec,
            )
        except OSError as exc:
            return HookResult(script, t.role_from, t.role_to, None,
                              time.monotonic() - start, error=exc.strerror or str(exc))
        tail = bytearray()
        reader = asyncio.create_task(_read_tail(proc.stdout, tail))
        timed_out = False
        try:
            async with asyncio.timeout(self.timeout_s):
                await proc.wait()
        except TimeoutError:
            timed_out = True
        finally:
            if proc.returncode is None:
                # The script and anything it started: the group we created for it.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            try:
                async with asyncio.timeout(1.0):  # a grandchild may still hold the pipe
                    await reader
            except TimeoutError:
                reader.cancel()
        return HookResult(
            script, t.role_from, t.role_to, None if timed_out else proc.returncode,
            time.monotonic() - start, timed_out=timed_out,
            error=f"killed after {self.timeout_s}s" if timed_out else "",
            output_tail=bytes(tail).decode("utf-8", "replace").strip(),
        )


async def _read_tail(stream: asyncio.StreamReader | None, tail: bytearray) -> None:
    if stream is None:
        return
    while chunk := await stream.read(4096):
        tail.extend(chunk)
        del tail[:-_TAIL_BYTES]
