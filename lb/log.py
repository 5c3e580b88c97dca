"""Logging to stderr, one event per line with key=value fields, journald-aware.

Under systemd (stderr is the journal, per $JOURNAL_STREAM) each line starts with a ``<N>``
syslog priority so journald files it at the right level, and carries no timestamp (the
journal adds one). Elsewhere lines start with an ISO-8601 UTC timestamp and the level name.

Every character that is not printable (C0 controls with CR, LF, TAB and ESC, DEL, C1
controls, Unicode line/paragraph separators and format characters such as bidi overrides)
is written escaped (``\\r``, ``\\x1b``, ``\\u202e``): text that came from a request (an admin
path, a backend's words) can neither forge a log line nor drive a terminal.

No event loop ever writes to stderr. A process's lines go on one bounded queue (``QueueHandler``
formats the line in the caller, ``LineQueue.put`` never waits) and one writer thread per
process writes them out. A sink that stops taking lines (journald stalled or restarting, a
pipe nobody reads, a disk under writeback throttling) blocks that thread only: the loops
that send heartbeats, check backends and proxy requests carry on. While the queue is full
(``QUEUE_LINES``) new lines are dropped and counted; when the sink takes lines again the
writer adds ``event=log_lines_dropped count=N total=M`` after what it had queued. ``counts()``
says how many lines a process wrote and dropped (``pairlb_log_lines_total``: the control
process reads its own, the failover process sends its own with its status).
At exit a process waits for its queue at most ``FLUSH_TIMEOUT_S``. Python warnings go
through the same queue (``logging.captureWarnings``).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TextIO

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(c: str) -> str:
    e = _ESCAPES.get(c)
    if e is not None:
        return e
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def escape(text: str) -> str:
    """``text`` with every non-printable character escaped (see the module docstring)."""
    if text.isprintable() and "\\" not in text:
        return text
    # A backslash is escaped too, so a client's literal "\x0a" cannot pass for an escape.
    return "".join(
        "\\\\" if c == "\\" else c if c.isprintable() else _escape_char(c) for c in text
    )


_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


def stderr_is_journal() -> bool:
    """True when systemd connected stderr to the journal (sd_journal_stream_fd semantics)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    if not dev or not ino:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == stream


class KeyValueFormatter(logging.Formatter):
    """``<ts> <LEVEL> <logger> <message>``, or ``<N><logger> <message>`` for journald."""

    def __init__(self, journald: bool, proc: str = "") -> None:
        super().__init__()
        self.journald = journald
        self.proc = f" proc={proc}" if proc else ""

    def format(self, record: logging.LogRecord) -> str:
        # One event per line: a newline would split it into two journal entries, and a
        # control character (CR, ESC, NUL, C1, ...) could hide or rewrite what precedes it.
        msg = escape(record.getMessage())
        if record.exc_info:
            msg += " exc=" + repr(self.formatException(record.exc_info))
        if self.journald:
            prio = _PRIORITY.get(record.levelno, 6)
            return f"<{prio}>{record.name}{self.proc} {msg}"
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ms = int(record.msecs)
        return f"{ts}.{ms:03d}Z {record.levelname} {record.name}{self.proc} {msg}"


QUEUE_LINES = 8192
"""Lines one process keeps for a sink that does not take them (a few MiB at most)."""
FLUSH_TIMEOUT_S = 1.0
"""How long a process exiting waits for its queued lines to be written."""
_BATCH = 512


class LineQueue:
    """One process's log lines on their way to stderr: a bounded queue and its writer thread.

    ``put`` never blocks (a full queue drops the line and counts it); the writer thread is
    the only one that writes, so a sink that blocks blocks only it.
    """

    def __init__(self, stream: TextIO, capacity: int = QUEUE_LINES) -> None:
        self.capacity = capacity
        self.pid = os.getpid()
        self.dropped_total = 0
        self.written_total = 0
        self._unreported = 0
        self._lines: deque[str] = deque()
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._drained = threading.Condition(self._lock)
        self._busy = False
        self._stream = stream
        try:
            self._fd: int | None = stream.fileno()
        except (OSError, ValueError, AttributeError):
            self._fd = None  # a stream without a file (a test's capture): written as text
        self.notice = _plain_notice
        """Formats the line reporting dropped lines: (count, total) -> line with newline."""
        self._thread = threading.Thread(target=self._run, name="pairlb-log-writer",
                                        daemon=True)
        self._thread.start()

    def put(self, line: str) -> bool:
        """Queue one line (newline included); False if the queue was full and it was dropped."""
        with self._lock:
            if len(self._lines) >= self.capacity:
                self.dropped_total += 1
                self._unreported += 1
                return False
            self._lines.append(line)
            if len(self._lines) == 1:
                self._has_work.notify()
        return True

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait until everything queued so far is written, at most `timeout_s`."""
        if not self._thread.is_alive():
            return not self._lines
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._lines or self._busy or self._unreported:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._drained.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._lines and not self._unreported:
                    self._drained.notify_all()
                    self._has_work.wait()
                n = min(len(self._lines), _BATCH)
                batch = [self._lines.popleft() for _ in range(n)]
                dropped = 0
                if not self._lines:  # every line older than the drops is in this batch
                    dropped, self._unreported = self._unreported, 0
                total = self.dropped_total
                self._busy = True
            try:
                if dropped:
                    batch.append(self.notice(dropped, total))
                self._write("".join(batch))
                with self._lock:
                    self.written_total += len(batch)
            except Exception:  # never let the writer die: a line lost is all a bad write costs
                pass
            finally:
                with self._lock:
                    self._busy = False

    def _write(self, text: str) -> None:
        if self._fd is None:
            self._stream.write(text)
            self._stream.flush()
            return
        data = text.encode("utf-8", "backslashreplace")
        while data:
            try:
                n = os.write(self._fd, data)
            except InterruptedError:
                continue
            except OSError:  # stderr closed or gone: nothing to write to
                return
            data = data[n:]


def _plain_notice(count: int, total: int) -> str:
    return f"event=log_lines_dropped count={count} total={total} reason=log_sink_blocked\n"


class QueueHandler(logging.Handler):
    """Formats each record in the thread that logs it and queues the line (never waits)."""

    def __init__(self, lines: LineQueue) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self.lines.put(line)

    def handleError(self, record: logging.LogRecord) -> None:
        # logging's default prints a traceback to sys.stderr: the very write we never make
        # on a loop. One escaped line instead, through the queue.
        exc = sys.exc_info()[1]
        self.lines.put(f"event=log_format_failed logger={record.name} "
                       f"msg={escape(repr(record.msg))} error={escape(repr(exc))}\n")

    def flush(self) -> None:
        self.lines.flush(FLUSH_TIMEOUT_S)


_lines: LineQueue | None = None


def _queue() -> LineQueue:
    global _lines
    if _lines is None or _lines.pid != os.getpid():  # a forked child: threads do not follow
        _lines = LineQueue(sys.stderr, QUEUE_LINES)
    return _lines


@dataclass(frozen=True)
class LogCounts:
    """One process's log lines so far: written to its sink, and dropped because the sink
    did not take them while the queue was full."""

    written: int = 0
    dropped: int = 0


def counts() -> LogCounts:
    """This process's log lines written and dropped (zero before its first line)."""
    lines = _lines
    if lines is None or lines.pid != os.getpid():
        return LogCounts()
    return LogCounts(lines.written_total, lines.dropped_total)


def dropped() -> int:
    """Log lines this process dropped because its sink did not take them."""
    return counts().dropped


def flush(timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
    """Wait (at most `timeout_s`) for this process's queued lines to be written."""
    if _lines is None or _lines.pid != os.getpid():
        return True
    return _lines.flush(timeout_s)


def setup(level: str = "info", journald: str = "auto", proc: str = "") -> None:
    """Configure the root logger (control, each worker, the failover process). Called again
    (a reload), it keeps the process's queue and writer: nothing queued is lost."""
    use_journal = journald == "always" or (journald == "auto" and stderr_is_journal())
    formatter = KeyValueFormatter(use_journal, proc)
    lines = _queue()
    handler = QueueHandler(lines)
    handler.setFormatter(formatter)

    def notice(count: int, total: int) -> str:
        rec = logging.makeLogRecord({
            "name": __name__, "levelno": logging.WARNING, "levelname": "WARNING",
            "msg": "event=log_lines_dropped count=%d total=%d reason=log_sink_blocked",
            "args": (count, total)})
        return formatter.format(rec) + "\n"

    lines.notice = notice
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.showwarning would write to stderr directly
    # aiohttp's access log would log every admin request at INFO.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


atexit.register(flush)
