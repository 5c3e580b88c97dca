"""A log sink that stops taking lines must not stop pairlb (issue 12, the stalled journal).

journald can stall (restarting, rate-limited, a disk under writeback throttling) and so can
any pipe stderr is connected to. Before, the control process and the workers wrote their
log lines to stderr from their event loops: a full pipe stopped the control process (no
/status, no health checks, no keepalive to the failover process) and the workers (no
request served) until it drained. lb.log now queues lines, bounded, for one writer thread
per process, and drops and counts what does not fit.

- the queue on its own: ``put`` never waits, overflow is dropped and counted, and the
  writer reports the drops after the lines it had, once the sink takes lines again;
- a process with a full, unread stderr: its loop keeps its 5 ms rhythm while logging, and it
  exits within the flush bound;
- a real ``pairlb run`` (control + 2 workers) with a full, unread stderr: /status answers, a
  reload applies, requests are served; every line arrives once the pipe is read again.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.node_rig import PYTHON, ROOT, Backends, Pairlb, http, wait_port, wait_until
from lb import log

F_SETPIPE_SZ = 1031


def fill(fd: int) -> int:
    """Fill the pipe behind `fd` to the last byte through a non-blocking description of our
    own (O_NONBLOCK on `fd` itself would change the writer's behaviour too)."""
    wfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK)
    n = 0
    try:
        for chunk in (b"#" * 4095 + b"\n", b"\n"):
            while True:
                try:
                    n += os.write(wfd, chunk)
                except BlockingIOError:
                    break
    finally:
        os.close(wfd)
    return n


class GatedReader:
    """Reads a pipe into memory in a thread; `pause()` stops reading (and returns only once
    the thread is parked), `resume()` reads again."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = bytearray()
        self._go = threading.Event()
        self._go.set()
        self._parked = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            if not self._go.is_set():
                self._parked.set()
                self._go.wait(0.05)
                continue
            self._parked.clear()
            ready, _, _ = select.select([self.fd], [], [], 0.05)
            if ready:
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    return
                self.data += chunk

    def pause(self) -> None:
        self._go.clear()
        assert self._parked.wait(5.0)

    def resume(self) -> None:
        self._go.set()

    def text(self) -> str:
        return bytes(self.data).decode(errors="replace")

    def close(self) -> None:
        self._stop = True
        self._go.set()
        self._thread.join(5.0)


# -- the queue on its own ----------------------------------------------------------------------


def test_a_full_queue_drops_and_counts_and_the_writer_reports_it_after_what_it_had() -> None:
    r, w = os.pipe()
    stream = open(w, "w", closefd=True)  # noqa: SIM115 - closed below
    fill(w)
    lines = log.LineQueue(stream, capacity=5)
    try:
        assert lines.put("first\n")
        # The writer takes it and blocks in write(2); then the queue fills and overflows.
        wait_until(lambda: not lines._lines, 5.0, "the writer to take the first line")
        t0 = time.monotonic()
        results = [lines.put(f"line{i}\n") for i in range(8)]
        assert time.monotonic() - t0 < 0.5  # never waits for the sink
        assert results == [True] * 5 + [False] * 3
        assert lines.dropped_total == 3
        assert not lines.flush(0.2)  # the sink takes nothing: a bounded wait, then False
        out = bytearray()

        def drain() -> bool:
            while select.select([r], [], [], 0)[0]:
                out.extend(os.read(r, 1 << 16))
            return b"count=3 total=3" in out

        wait_until(drain, 10.0, "the drop notice")
        assert lines.flush(2.0)
        text = bytes(out).decode().replace("#", "").split()
        assert text == ["first", "line0", "line1", "line2", "line3", "line4",
                        "event=log_lines_dropped", "count=3", "total=3",
                        "reason=log_sink_blocked"]
        assert lines.put("after\n")
        wait_until(lambda: drain() and b"after" in out, 5.0, "a line after the drops")
    finally:
        stream.close()
        os.close(r)


_CHILD = r"""
import asyncio, json, logging, sys, time
from lb import log
log.QUEUE_LINES = int(sys.argv[1])
log.setup("info", "never", "child")
lg = logging.getLogger("child")

async def main():
    loop = asyncio.get_running_loop()
    gaps, last = [], loop.time()
    for i in range(200):
        lg.info("event=tick n=%d %s", i, "x" * 100)
        await asyncio.sleep(0.005)
        now = loop.time()
        gaps.append(now - last)
        last = now
    return max(gaps)

worst = asyncio.run(main())
print(json.dumps({"max_gap_s": worst, "dropped": log.dropped(), "exiting_at": time.monotonic()}),
      flush=True)
"""


def _child(stderr_fd: int, queue_lines: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PYTHON, "-c", _CHILD, str(queue_lines)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=stderr_fd)


@pytest.mark.timeout(60)
def test_a_loop_that_logs_into_a_full_unread_pipe_keeps_its_rhythm_and_exits_in_time() -> None:
    r, w = os.pipe()
    try:
        fill(w)
        proc = _child(w, 50)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()  # blocked on its stderr for good: the fault this test is about
            proc.wait(5)
            raise
        ended = time.monotonic()
        result = json.loads(out.decode().strip().splitlines()[-1])
        # 200 lines of which 50 fit the queue (one more in the writer's hands): the rest
        # dropped and counted, none waited for.
        assert 140 <= result["dropped"] <= 149, result
        assert result["max_gap_s"] < 0.5, result  # blocked: the whole run in one step
        assert ended - result["exiting_at"] < log.FLUSH_TIMEOUT_S + 3.0, result
        assert proc.returncode == 0
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.timeout(60)
def test_queued_lines_and_the_drop_count_arrive_once_the_sink_reads_again() -> None:
    r, w = os.pipe()
    reader = GatedReader(r)
    reader.pause()
    fill(w)
    try:
        proc = _child(w, 50)
        os.close(w)
        w = -1
        # The child has queued its lines and waits (FLUSH_TIMEOUT_S) at exit: read now.
        line = proc.stdout.readline() if proc.stdout else b""
        dropped = json.loads(line)["dropped"]
        assert dropped > 0
        reader.resume()
        assert proc.wait(30) == 0
        wait_until(lambda: "event=log_lines_dropped" in reader.text(), 10.0, "the notice")
        text = reader.text()
        ticks = [ln for ln in text.splitlines() if "event=tick" in ln]
        notice = next(ln for ln in text.splitlines() if "event=log_lines_dropped" in ln)
        assert " WARNING lb.log proc=child event=log_lines_dropped count=" in notice
        # 50 queued, plus what the writer held when the sink stopped it (one line or a few)
        assert 51 <= len(ticks) <= 60 and "n=0 " in ticks[0]
        assert len(ticks) + dropped == 200
        assert f"count={dropped} total={dropped}" in notice
        assert text.index(ticks[-1]) < text.index(notice)
    finally:
        reader.close()
        os.close(r)
        if w >= 0:
            os.close(w)


# -- a real pairlb -------------------------------------------------------------------------------


class PipedPairlb(Pairlb):
    """Pairlb with stdout and stderr a pipe the test reads, or stops reading."""

    reader: GatedReader | None = None

    def start(self, timeout_s: float = 20.0, *, all_up: bool = True) -> PipedPairlb:
        r, w = os.pipe()
        self.pipe_w = w
        self.reader = GatedReader(r)
        self.proc = subprocess.Popen([PYTHON, "-m", "lb", "run", "-c", str(self.config)],
                                     cwd=ROOT, stdin=subprocess.DEVNULL, stdout=w,
                                     stderr=subprocess.STDOUT)
        self._r = r
        try:
            wait_until(self._admin_up, timeout_s, "pairlb admin /status", 0.05)
            wait_port(self.listen_port, timeout_s)
            if all_up:
                wait_until(self.all_in_rotation, timeout_s, "every backend in rotation", 0.05)
        except BaseException:
            self.close()
            raise
        return self

    def logs(self, tail: int = 6000) -> str:
        return self.reader.text()[-tail:] if self.reader is not None else ""

    def close(self) -> None:
        if self.reader is not None:
            self.reader.resume()
        super().close()
        if self.reader is not None:
            self.reader.close()
            os.close(self._r)
            os.close(self.pipe_w)
            self.reader = None


@pytest.fixture
def piped(tmp_path: Path) -> Iterator[PipedPairlb]:
    with Backends(tmp_path, ["b1", "b2"]) as backends:
        lb = PipedPairlb(tmp_path, backends.members(), workers=2)
        try:
            yield lb.start()
        finally:
            lb.close()


@pytest.mark.timeout(90)
def test_pairlb_with_a_stalled_log_sink_answers_reloads_and_serves(piped: PipedPairlb) -> None:
    """Before: the reload's first log line blocked the control process and both workers
    until the pipe was read (no /status, every request waiting)."""
    assert piped.reader is not None and piped.proc is not None
    gen = piped.status()["config"]["generation"]
    piped.reader.pause()
    fill(piped.pipe_w)
    os.kill(piped.proc.pid, signal.SIGHUP)  # the control process and each worker log
    t0 = time.monotonic()
    answered, served, reloaded = 0, 0, False
    asked = 0
    while time.monotonic() - t0 < 3.0:
        asked += 1
        with contextlib.suppress(OSError):
            code, _, body = http("GET", piped.admin_url + "/status", timeout_s=1.0)
            if code == 200:
                answered += 1
                reloaded = reloaded or json.loads(body)["config"]["generation"] == gen + 1
        with contextlib.suppress(OSError):
            served += http("GET", piped.url + "/", timeout_s=1.0)[0] == 200
        time.sleep(0.1)
    stalled = piped.reader.text()
    piped.reader.resume()
    assert (answered, served) == (asked, asked), piped.logs()
    assert reloaded
    assert "event=reloaded" not in stalled  # the sink really took nothing meanwhile
    wait_until(lambda: "event=reloaded generation=" in piped.logs(100_000), 10.0,
               "the reload's line once the sink reads again")
    assert "log_lines_dropped" not in piped.logs(100_000)  # a few lines: queued, not lost


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
