"""Out of memory, the kernel takes a worker, never the control process (issue 13).

A real node (control process + 2 workers) runs in a memory cgroup of its own (v2 or v1,
created under this test's cgroup and removed after), with a limit a little above what it
uses. Then the *control process* grows past the limit: a test-only sitecustomize module
(on PYTHONPATH, as in tests/test_systemd.py: no hook in pairlb itself) allocates a balloon
on SIGURG and frees it on the next one. Without the OOM ranking the kernel would kill the
biggest process, the control process with its balloon, which is the one that sends the
heartbeats; with it (each worker 1000 points above the control process: +500 over -500,
or +1000 over 0 where the control process may not lower its own) it kills a worker, which
the supervisor replaces, and the worker that is just starting is ranked so from its spawn.
After the balloon is freed the node serves again with two workers.

Needs root and a writable memory cgroup; skipped otherwise.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_process_model import Node, wait_http

from lab import backend_app

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20
HEADROOM = 48 * MIB
"""Limit = usage at rest + this; the balloon is HEADROOM + BALLOON_OVER."""
BALLOON_OVER = 8 * MIB
"""Well below what one worker is charged (~25 MiB anonymous): one worker killed makes room."""

BALLOON = """
import os, signal
_held = []

def _toggle(signum, frame):
    if _held:
        _held.clear()
    else:
        b = bytearray(int(os.environ["PLB_TEST_BALLOON"]))  # zero-filled: every page touched
        _held.append(b)

signal.signal(signal.SIGURG, _toggle)  # USR1 and USR2 are the daemon's own
"""


class MemCgroup:
    """A memory cgroup under this process's own; ``path`` None when not possible."""

    def __init__(self, name: str) -> None:
        self.path: Path | None = None
        self.v2 = False
        if os.geteuid() != 0:
            return
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        for line in lines:
            _, ctrls, rel = line.split(":", 2)
            if "memory" in ctrls.split(","):
                self._try(Path("/sys/fs/cgroup/memory") / rel.lstrip("/") / name, False)
        for line in lines:
            if line.startswith("0::") and self.path is None:
                rel = line.split(":", 2)[2]
                for base in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                    ctl = base / "cgroup.controllers"
                    if ctl.exists() and "memory" in ctl.read_text().split():
                        self._try(base / rel.lstrip("/") / name, True)

    def _try(self, path: Path, v2: bool) -> None:
        if self.path is not None:
            return
        with contextlib.suppress(OSError):
            path.mkdir()
            limit = "memory.max" if v2 else "memory.limit_in_bytes"
            if (path / limit).exists():
                self.path, self.v2 = path, v2
            else:
                path.rmdir()

    def usage(self) -> int:
        assert self.path is not None
        name = "memory.current" if self.v2 else "memory.usage_in_bytes"
        return int((self.path / name).read_text())

    def limit(self, value: int) -> None:
        assert self.path is not None
        (self.path / ("memory.max" if self.v2 else "memory.limit_in_bytes")).write_text(
            str(value))

    def remove(self) -> None:
        if self.path is None:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


@pytest.fixture
def cgroup() -> Iterator[MemCgroup]:
    cg = MemCgroup(f"plboom{os.getpid()}")
    if cg.path is None:
        pytest.skip("needs root and a writable memory cgroup (v1 or v2)")
    try:
        yield cg
    finally:
        cg.remove()


def _ok(port: int) -> bool:
    with contextlib.suppress(OSError, http.client.HTTPException):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        c.request("GET", "/", headers={"Connection": "close"})
        return c.getresponse().status == 200
    return False


@pytest.mark.timeout(120)
def test_out_of_memory_takes_a_worker_never_the_control_process(
    tmp_path: Path, cgroup: MemCgroup
) -> None:
    assert cgroup.path is not None
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(BALLOON)
    node = Node(tmp_path)
    for i, p in enumerate(node.bports):
        node.backends.append(subprocess.Popen(
            [sys.executable, "-m", "lab.backend_app", f"web{i + 1}", f"127.0.0.1:{p}"], cwd=ROOT))
    try:
        for i, p in enumerate(node.bports):
            backend_app.wait_answering("127.0.0.1", p, f"web{i + 1}", 15.0)
        node.cfg.write_text(node.config())
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{hook}",
               "PLB_TEST_BALLOON": str(HEADROOM + BALLOON_OVER)}
        procs = cgroup.path / "cgroup.procs"
        node.proc = subprocess.Popen(
            ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh",
             sys.executable, "-m", "lb", "run", "-c", str(node.cfg)],
            cwd=ROOT, env=env, stderr=node.log.open("wb"))
        wait_http(node.port)
        end = time.monotonic() + 20
        while node.log_text().count("event=worker_serving") < 2:
            assert time.monotonic() < end, node.log_text()[-3000:]
            time.sleep(0.05)
        time.sleep(1.0)
        control = node.proc.pid
        workers = node.worker_pids()
        assert len(workers) == 2
        adj = {pid: int(Path(f"/proc/{pid}/oom_score_adj").read_text())
               for pid in [control, *workers]}
        assert adj[control] <= 0, adj
        assert all(adj[w] == min(1000, adj[control] + 1000) for w in workers), adj
        cgroup.limit(cgroup.usage() + HEADROOM)

        os.kill(control, signal.SIGURG)  # the control process grows past the limit
        end = time.monotonic() + 20
        while "signal=SIGKILL" not in node.log_text():
            assert node.proc.poll() is None, node.log_text()[-3000:]
            assert time.monotonic() < end, node.log_text()[-3000:]
            time.sleep(0.05)
        time.sleep(1.0)
        assert node.proc.poll() is None, "the OOM killer took the control process"
        assert any(w not in node.worker_pids() for w in workers)
        log = node.log_text()
        assert "event=worker_died" in log and "signal=SIGKILL" in log
        print(f"\noom kills of workers: {log.count('signal=SIGKILL')}; control alive")

        os.kill(control, signal.SIGURG)  # balloon freed: the workers come back
        end = time.monotonic() + 30
        while not (len(node.worker_pids()) == 2 and _ok(node.port)):
            assert node.proc.poll() is None
            assert time.monotonic() < end, node.log_text()[-3000:]
            time.sleep(0.1)
        assert all(_ok(node.port) for _ in range(20))
        assert node.proc.poll() is None
    finally:
        node.stop()
