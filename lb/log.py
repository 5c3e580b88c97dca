"""Logging to stderr, one event per line with key=value fields, journald-aware.

Under systemd (stderr is the journal, per $JOURNAL_STREAM) each line starts with a ``<N>``
syslog priority so journald files it at the right level, and carries no timestamp (the
journal adds one). Elsewhere lines start with an ISO-8601 UTC timestamp and the level name.

Every character that is not printable (C0 controls with CR, LF, TAB and ESC, DEL, C1
controls, Unicode line/paragraph separators and format characters such as bidi overrides)
is written escaped (``\\r``, ``\\x1b``, ``\\u202e``): text that came from a request (an admin
path, a backend's words) can neither forge a log line nor drive a terminal.
"""

from __future__ import annotations

import logging
import os
import sys
import time

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(c: str) -> str:
    e = _ESCAPES.get(c)
    if e is not None:
        return e
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def escape(text: str) -> str:
    """``text`` with every non-printable character escaped (see the module docstring)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape_char(c) for c in text)


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


def setup(level: str = "info", journald: str = "auto", proc: str = "") -> None:
    """Configure the root logger once per process (control and each worker)."""
    use_journal = journald == "always" or (journald == "auto" and stderr_is_journal())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter(use_journal, proc))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log would log every admin request at INFO.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
