"""Logging lands in journald at the right priority: ``<N>`` prefixes exactly when stderr is
the journal stream that systemd announced in $JOURNAL_STREAM (``st_dev:st_ino`` of the
stream), and ordinary timestamped lines otherwise.

Real processes with a real stderr: a file stands in for journald's stream socket, and
JOURNAL_STREAM is set to that file's device and inode, which is all sd_journal_stream_fd's
consumers compare.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

_EMIT = """
import logging, sys
from lb import log
log.setup("debug", sys.argv[1], "control")
lg = logging.getLogger("plbtest")
lg.debug("event=d n=%d", 7)
lg.info("event=i")
lg.warning("event=w")
lg.error("event=e")
lg.critical("event=c")
try:
    raise ValueError("boom\\nsecond line")
except ValueError:
    lg.exception("event=x")
"""

_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def _env(journal_stream: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    env["PYTHONPATH"] = str(REPO)
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    return env


def _stream_id(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def _run_emitter(tmp_path: Path, mode: str, journal_stream: str | Path | None) -> list[str]:
    """Run the emitter with stderr = a fresh file; JOURNAL_STREAM may name that very file."""
    err = tmp_path / "stderr.log"
    err.write_bytes(b"")
    stream = _stream_id(err) if journal_stream == "self" else journal_stream
    if isinstance(stream, Path):
        stream = _stream_id(stream)
    with err.open("ab") as f:
        subprocess.run(
            [sys.executable, "-c", _EMIT, mode],
            stderr=f,
            env=_env(stream),
            cwd=REPO,
            timeout=30,
            check=True,
        )
    return err.read_text().splitlines()


@pytest.mark.timeout(60)
def test_priority_prefixes_when_stderr_is_the_announced_journal_stream(tmp_path: Path) -> None:
    lines = _run_emitter(tmp_path, "auto", "self")
    assert [ln[:3] for ln in lines] == ["<7>", "<6>", "<4>", "<3>", "<2>", "<3>"]
    assert lines[0] == "<7>plbtest proc=control event=d n=7"
    # journald adds its own timestamp: none in the line.
    assert not any(_TS.match(ln[3:]) for ln in lines)
    # A traceback stays on its <3> line: journald would file continuation lines at INFO.
    assert lines[-1].startswith("<3>plbtest proc=control event=x exc=")
    assert "ValueError" in lines[-1]


@pytest.mark.timeout(60)
def test_plain_timestamped_lines_without_journal_stream(tmp_path: Path) -> None:
    lines = _run_emitter(tmp_path, "auto", None)
    assert len(lines) == 6
    assert all(_TS.match(ln) for ln in lines), lines
    assert not any(ln.startswith("<") for ln in lines)


@pytest.mark.timeout(60)
def test_no_prefixes_when_journal_stream_names_another_stream(tmp_path: Path) -> None:
    """A child of a systemd service whose stderr was redirected to a file inherits
    JOURNAL_STREAM, but its stderr is no longer the journal: "<3>" would be litter there."""
    other = tmp_path / "other"
    other.write_text("")
    lines = _run_emitter(tmp_path, "auto", other)
    assert all(_TS.match(ln) for ln in lines), lines


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", ["garbage", "1:", ":2", "0:0"])
def test_malformed_journal_stream_means_no_prefixes(tmp_path: Path, bad: str) -> None:
    lines = _run_emitter(tmp_path, "auto", bad)
    assert all(_TS.match(ln) for ln in lines), lines


@pytest.mark.timeout(60)
def test_config_can_force_prefixes_on_or_off(tmp_path: Path) -> None:
    """logging.journald_prefix: 'always' (e.g. stderr piped through systemd-cat) / 'never'."""
    assert all(ln.startswith("<") for ln in _run_emitter(tmp_path, "always", None))
    assert all(_TS.match(ln) for ln in _run_emitter(tmp_path, "never", "self"))


def _free_port() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


@pytest.mark.timeout(60)
def test_the_daemon_reports_a_startup_failure_at_error_priority(tmp_path: Path) -> None:
    """End to end through `pairlb run`: a port already taken is an ERROR (<3>) in the journal,
    which is what `journalctl -p err -u pairlb` shows the operator."""
    taken = _free_port()
    try:
        port = taken.getsockname()[1]
        cfg = tmp_path / "lb.toml"
        cfg.write_text(
            f"""
[node]
name = "jt"
workers = 1
[[listener]]
name = "web"
bind = "127.0.0.1:{port}"
pool = "web"
[[pool]]
name = "web"
backends = [{{ name = "b1", address = "127.0.0.1:9" }}]
[admin]
enabled = false
"""
        )
        err = tmp_path / "daemon.stderr"
        err.write_bytes(b"")
        with err.open("ab") as f:
            proc = subprocess.run(
                [sys.executable, "-m", "lb", "run", "-c", str(cfg)],
                stderr=f,
                env=_env(_stream_id(err)),
                cwd=REPO,
                timeout=30,
            )
    finally:
        taken.close()
    assert proc.returncode == 1
    lines = err.read_text().splitlines()
    failed = [ln for ln in lines if "event=startup_failed" in ln]
    assert failed, lines
    assert failed[0].startswith("<3>lb.control.daemon proc=control event=startup_failed")
    assert "Address already in use" in failed[0]
    assert all(re.match(r"^<[0-7]>", ln) for ln in lines), lines
