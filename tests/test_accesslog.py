"""lb.data.accesslog: lines valid for any value, batching, a slow sink never blocks the loop,
reopen (logrotate), open failures, close, and deploy/logrotate/pairlb with the real logrotate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.data import accesslog as A

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = ROOT / "deploy" / "logrotate" / "pairlb"
LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"
T = TypeVar("T")


def run(coro: Callable[[], Awaitable[T]]) -> T:
    """Run on uvloop, the workers' loop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(coro())  # type: ignore[arg-type]


def rec(i: int = 0, **kw: Any) -> tuple[Any, ...]:
    base = {
        "time": 1714564800.25 + i, "client_ip": "203.0.113.7", "client_port": 40000 + i % 1000,
        "listener": "web", "mode": "http", "method": b"GET", "target": b"/item?id=%d" % i,
        "protocol": "HTTP/1.1", "status": 200, "bytes_in": 120, "bytes_out": 2048,
        "pool": "app", "backend": "app-1", "retries": 0, "queue_ms": 0.012,
        "connect_ms": 0.0, "first_byte_ms": 1.25, "total_ms": 1.5, "termination": "--",
        "request_id": b"0a1b2c3d4e5f-%08x" % i, "user_agent": b"curl/8.5.0", "referer": b"",
    }
    base.update(kw)
    assert set(base) == set(A.FIELDS)
    return tuple(base[f] for f in A.FIELDS)


def seqs(path: Path) -> list[int]:
    """The ``i`` of every rec(i) line in a JSON log file (each line must parse)."""
    out = []
    for line in path.read_bytes().splitlines():
        out.append(int(json.loads(line)["request_id"].rsplit("-", 1)[1], 16))
    return out


# --------------------------------------------------------------------------- JSON

any_string = st.one_of(st.none(), st.text(), st.binary(),
                       st.text(alphabet=st.characters(codec=None, categories=None)),
                       st.sampled_from(["\u2028", "\u2029", "\x00", '"', "\\", "\x7f", "\ud800",
                                        "é", "💥", "</script>"]))
long_string = st.one_of(any_string, st.integers(1000, 20000).map(lambda n: b"\"\\\x01\xff" * n))
STRING_FIELDS = ("client_ip", "listener", "mode", "method", "target", "protocol", "pool",
                 "backend", "termination", "request_id", "user_agent", "referer")


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({f: any_string for f in STRING_FIELDS}), long_string,
       st.floats(0, 4e9), st.integers(0, 1 << 40), st.floats(-1, 1e7))
def test_json_line_is_valid_and_round_trips_any_value(
    strings: dict[str, Any], big: Any, t: float, n: int, ms: float
) -> None:
    r = rec(0, time=t, client_port=n, bytes_in=n, bytes_out=n, status=n % 600, retries=n % 7,
            queue_ms=ms, connect_ms=-1.0, first_byte_ms=ms, total_ms=ms, **strings)
    r = (*r[: A.TARGET], big, *r[A.TARGET + 1 :])
    lines, bad = A.json_lines([r])
    assert bad == 0 and len(lines) == 1
    line = lines[0]
    assert line.isascii() and line.endswith(b"\n") and line.count(b"\n") == 1
    got = json.loads(line)
    assert list(got) == list(A.FIELDS)
    strings["target"] = big
    for f in STRING_FIELDS:
        assert got[f] == A.json_text(strings[f]), f
    assert got["client_port"] == got["bytes_in"] == got["bytes_out"] == n
    assert got["connect_ms"] == -1
    assert abs(got["total_ms"] - ms) <= 0.0005 + 1e-9 * ms
    when = time.gmtime(int(t))
    assert got["time"].startswith(time.strftime("%Y-%m-%dT%H:%M:%S.", when))


@given(st.text())
def test_json_text_keeps_valid_text_and_utf8_bytes(s: str) -> None:
    assert A.json_text(s) == s
    assert A.json_text(s.encode()) == s
    assert A.json_text(None) == ""


def test_json_line_example_and_invalid_utf8() -> None:
    r = rec(1, user_agent=b"Mozilla \xff\xfe \xc3\xa9", target=b'/a"b\\c\r\n\x00',
            referer="\u2028x", mode="tcp")
    line = A.format_line(r)
    assert line.startswith('{"time":"2024-05-01T12:00:01.250Z","client_ip":"203.0.113.7",')
    got = json.loads(line)
    assert got["user_agent"] == "Mozilla \\xff\\xfe é"
    assert got["target"] == '/a"b\\c\r\n\x00'
    assert got["referer"] == "\u2028x"
    assert "\u2028" not in line and "\r" not in line


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(),
                          st.binary(), st.lists(st.integers(), max_size=2),
                          st.just(float("inf")), st.just(1e300), st.just(b"x" * 10)),
                max_size=len(A.FIELDS) + 2))
def test_a_bad_record_still_gives_one_valid_line(values: list[Any]) -> None:
    for fmt in ("json", "combined"):
        lines, _bad = A.FORMATTERS[fmt]([tuple(values), rec(3)])
        assert len(lines) == 2, fmt
        for line in lines:
            assert line.isascii() and line.count(b"\n") == 1
        if fmt == "json":
            json.loads(lines[0])
            assert json.loads(lines[1])["request_id"] == "0a1b2c3d4e5f-00000003"
        else:
            assert CLF.match(lines[0].decode()), lines[0]


# --------------------------------------------------------------------------- combined

Q = r'"((?:[^"\\]|\\.)*)"'
MS = r"(-?\d+\.\d{3})"
WHEN = r"\d\d/[A-Z][a-z][a-z]/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}"
CLF = re.compile(
    rf"^(\S+) - - \[({WHEN})\] {Q} (-?\d+) (-?\d+|-)"
    rf" {Q} {Q} (\S+) (\S+) (\S+) (-?\d+) {MS} {MS} {MS} {MS} (\S+) (\S+) (-?\d+) (-?\d+)\n\Z"
)


def clf_unescape(s: str) -> bytes:
    def one(m: re.Match[bytes]) -> bytes:
        e = m.group(1)
        return bytes([int(e[1:], 16)]) if e[:1] == b"x" else e

    return re.sub(rb"\\(x[0-9a-f]{2}|\"|\\)", one, s.encode("ascii"))


def clf_expect(v: Any) -> bytes:
    b = A._as_bytes(v)
    return b or b"-"


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({f: any_string for f in STRING_FIELDS}), long_string)
def test_combined_line_parses_and_round_trips_any_value(
    strings: dict[str, Any], big: Any
) -> None:
    strings["target"] = big
    r = rec(2, **strings)
    line = A.format_line(r, "combined")
    assert re.search(r"[^\x20-\x7e\n]", line) is None  # printable ASCII only
    m = CLF.match(line)
    assert m, line
    g = m.groups()
    assert clf_unescape(g[0]) == clf_expect(strings["client_ip"])
    if A._as_bytes(strings["method"]):
        assert clf_unescape(g[2]) == b" ".join(clf_expect(strings[f])
                                               for f in ("method", "target", "protocol"))
    else:
        assert g[2] == "-"  # a TCP connection: no request line
    assert g[3] == "200" and g[4] == "2048"
    assert clf_unescape(g[5]) == clf_expect(strings["referer"])
    assert clf_unescape(g[6]) == clf_expect(strings["user_agent"])
    for i, f in ((7, "listener"), (8, "pool"), (9, "backend"), (15, "termination"),
                 (16, "request_id")):
        assert clf_unescape(g[i]) == clf_expect(strings[f]), f
    assert g[10:15] == ("0", "0.012", "0.000", "1.250", "1.500")
    assert g[17:] == ("120", "40002")


def test_combined_line_example() -> None:
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        line = A.format_line(rec(0, referer=b"https://ex.com/", bytes_out=0), "combined")
        assert line == (
            '203.0.113.7 - - [01/May/2024:12:00:00 +0000] "GET /item?id=0 HTTP/1.1" 200 - '
            '"https://ex.com/" "curl/8.5.0" web app app-1 0 0.012 0.000 1.250 1.500 -- '
            "0a1b2c3d4e5f-00000000 120 40000\n"
        )
        tcp = A.format_line(rec(0, mode="tcp", method=None, target=None, protocol=None,
                                status=0, user_agent=None, request_id=None, pool="db",
                                backend="db-2", termination="SD"), "combined")
        assert tcp == ('203.0.113.7 - - [01/May/2024:12:00:00 +0000] "-" 0 2048 "-" "-" '
                       "web db db-2 0 0.012 0.000 1.250 1.500 SD - 120 40000\n")
        hostile = A.format_line(rec(0, user_agent=b'a "b" \\ \x1b[31m \xc3\xa9',
                                    request_id="x y"), "combined")
        assert '"a \\"b\\" \\\\ \\x1b[31m \\xc3\\xa9"' in hostile
        assert " x\\x20y " in hostile
    finally:
        del os.environ["TZ"]
        time.tzset()


# --------------------------------------------------------------------------- termination


def test_termination_codes() -> None:
    for reason, code in A.REASON_TERMINATION.items():
        assert len(code) == 2 and code[0] in A.CAUSES and code[1] in A.PHASES, reason
    assert A.termination(None) == A.TERM_NORMAL == "--"
    assert A.termination("connect_refused") == "SC"
    assert A.termination("connect_timeout") == "sC"
    assert A.termination("client_closed", A.PHASE_HEADERS) == "CH"
    assert A.termination("response_timeout", A.PHASE_DATA) == "sD"
    assert A.termination("no_backend") == "PQ"
    assert A.termination("header_timeout") == "cR"
    assert A.termination("https_redirect") == "LR"
    assert A.termination("some_new_refusal") == "PR"


def test_every_parse_error_reason_and_sni_decision_has_a_code() -> None:
    from lb.data import proxy, tcpproxy

    for _needle, _status, reason in proxy._PARSE_ERRORS:
        assert reason in A.REASON_TERMINATION, reason
    assert set(A.SNI_TERMINATION) == set(tcpproxy.SNI_DECISIONS) - {"route"}
    for code in A.SNI_TERMINATION.values():
        assert code[0] in A.CAUSES and code[1] in A.PHASES


# --------------------------------------------------------------------------- the writer


@contextlib.contextmanager
def count_writes(fd_of: Callable[[], int | None]) -> Iterator[list[int]]:
    """Sizes of the os.write calls made on the log's descriptor."""
    sizes: list[int] = []
    real = os.write

    def write(fd: int, data: Any) -> int:
        if fd == fd_of():
            sizes.append(len(data))
        return real(fd, data)

    A.os.write = write  # type: ignore[attr-defined]
    try:
        yield sizes
    finally:
        A.os.write = real  # type: ignore[attr-defined]


def test_many_writes_become_few_os_writes_and_close_flushes(tmp_path: Path) -> None:
    path = tmp_path / "access.log"

    async def main() -> dict[str, int]:
        log = A.AccessLog(str(path), "json", flush_interval=0.05)
        assert log.flush_now()
        with count_writes(lambda: log._fd) as sizes:
            for i in range(3000):
                log.write(rec(i))
                if i % 1000 == 999:
                    await asyncio.sleep(0.08)  # a few flush intervals
            for i in range(3000, 3500):
                log.write(rec(i))  # pending at close: written by close
            assert log.close()
        log.write(rec(99999))  # after close: discarded, no error
        st = log.stats()
        # batched: a write per ~64 KiB of lines (A._HANDOVER_MAX) or per flush interval,
        # not per line
        total = sum(sizes)
        assert total > 1_000_000 and 2 <= len(sizes) <= total // A._HANDOVER_MAX + 6, sizes
        assert max(sizes) <= A._HANDOVER_MAX + 1024, sizes
        return st

    st = run(main)
    assert seqs(path) == list(range(3500))
    assert st["written"] == 3500 and st["dropped"] == 0 and st["errors"] == 0
    assert oct(path.stat().st_mode & 0o777) == oct(0o640 & ~_umask())


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_reopen_after_rename_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "access.log"

    async def main() -> dict[str, int]:
        log = A.AccessLog(str(path), "json", flush_interval=0.02)
        for i in range(200):
            log.write(rec(i))
        await asyncio.sleep(0.05)
        os.rename(path, tmp_path / "access.log.1")  # logrotate's rename...
        for i in range(200, 300):
            log.write(rec(i))  # ...lines still on their way to the old file
        log.reopen()  # ...and its postrotate's SIGUSR1
        for i in range(300, 500):
            log.write(rec(i))
        assert log.close()
        return log.stats()

    st = run(main)
    old, new = seqs(tmp_path / "access.log.1"), seqs(path)
    assert old[:200] == list(range(200)) and new and sorted(old + new) == list(range(500))
    assert new[-1] == 499 and st["reopens"] == 1 and st["dropped"] == 0


def test_open_failure_is_counted_logged_once_then_recovered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "missing" / "access.log"
    caplog.set_level(logging.WARNING, "lb.data.accesslog")

    async def main() -> tuple[dict[str, int], dict[str, int]]:
        log = A.AccessLog(str(path), "combined", flush_interval=0.01, retry_open_s=60)
        for i in range(10):
            log.write(rec(i))
            await asyncio.sleep(0.015)  # several batches, all dropped
        log.flush_now()
        before = log.stats()
        path.parent.mkdir()
        log.reopen()
        for i in range(10, 15):
            log.write(rec(i))
        assert log.close()
        return before, log.stats()

    before, after = run(main)
    assert before["errors"] == 1 and before["dropped"] == 10 and before["written"] == 0
    assert before["open"] == 0
    assert after["written"] == 5 and after["dropped"] == 10
    assert len(path.read_text().splitlines()) == 5
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("access_log_open_failed" in m for m in msgs) == 1, msgs
    assert any("access_log_opened" in m for m in msgs)


def test_a_blocked_fifo_never_blocks_the_loop(tmp_path: Path) -> None:
    """A FIFO nobody reads: first its open blocks (no reader), then its writes (a reader
    that never reads). The loop keeps its pace, memory stays within the buffer, lines are
    dropped and counted, and every line that does get through is whole."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    buf = 256 << 10
    total = 0

    async def produce(log: A.AccessLog, seconds: float) -> float:
        nonlocal total
        worst = 0.0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            await asyncio.sleep(0.002)
            worst = max(worst, time.monotonic() - t0 - 0.002)
            for _ in range(60):  # ~30k lines/s
                log.write(rec(total, user_agent=b"u" * 300))
                total += 1
            assert log.stats()["queue_bytes"] <= buf + 200 * 1000
        return worst

    async def main() -> tuple[float, float, dict[str, int], dict[str, int], int]:
        log = A.AccessLog(str(fifo), "json", buffer_bytes=buf, flush_interval=0.02)
        lag_open = await produce(log, 0.6)  # the writer is stuck in open()
        st_open = log.stats()
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # lets open() return
        try:
            lag_write = await produce(log, 0.8)  # stuck in write(): the pipe is full
            st_write = log.stats()
            data = bytearray()
            deadline = time.monotonic() + 5
            closed = False
            while time.monotonic() < deadline:  # drain; close() once the writer moves
                try:
                    chunk = os.read(reader, 1 << 16)
                except BlockingIOError:
                    chunk = b""
                data += chunk
                if not closed and not chunk:
                    closed = log.close(timeout=0.05)
                if closed and not log._thread.is_alive() and not chunk:
                    break
                await asyncio.sleep(0.001)
        finally:
            os.close(reader)
        for line in bytes(data).splitlines():
            json.loads(line)  # whole lines only (writes <= PIPE_BUF at line ends)
        return lag_open, lag_write, st_open, st_write, data.count(b"\n")

    lag_open, lag_write, st_open, st_write, got = run(main)
    assert lag_open < 0.02 and lag_write < 0.02, (lag_open, lag_write)
    assert st_open["written"] == 0 and st_open["dropped"] > 0
    assert st_write["dropped"] > st_open["dropped"]
    assert st_write["queue_bytes"] <= buf + 200 * 1000
    assert got > 0


STDOUT_WRITER = textwrap.dedent("""
    import asyncio, json, os, sys, time
    import uvloop
    from lb.data import accesslog as A

    ua = b"x" * int(sys.argv[1])
    seconds = float(sys.argv[2])

    async def main():
        log = A.AccessLog("stdout", "json", buffer_bytes=1 << 20, flush_interval=0.02)
        worst, n = 0.0, 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.monotonic()
            await asyncio.sleep(0.002)
            worst = max(worst, time.monotonic() - t0 - 0.002)
            for _ in range(40):
                log.write((time.time(), "198.51.100.1", 1, "l", "http", b"GET",
                           b"/%d" % n, "HTTP/1.1", 200, 1, 2, "p", "b", 0, 0.1, 0.1, 0.1,
                           0.1, "--", b"%d-%d" % (os.getpid(), n), ua, b""))
                n += 1
        flushed = log.close(timeout=1.0)
        sys.stderr.write(json.dumps({"worst": worst, "n": n, "flushed": flushed,
                                     **log.stats()}) + "\\n")
        sys.stderr.flush()
        os._exit(0)  # the writer thread may still be stuck on the full pipe

    uvloop.run(main())
""")


def _writer(ua_len: int, seconds: float, stdout: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", STDOUT_WRITER, str(ua_len), str(seconds)],
                            stdout=stdout, stderr=subprocess.PIPE, env=env)


def test_stdout_as_a_full_pipe_never_blocks_the_worker() -> None:
    r, w = os.pipe()
    try:
        p = _writer(200, 0.7, w)
        os.close(w)
        w = -1
        _, err = p.communicate(timeout=20)  # nobody reads r: the pipe fills
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    st = json.loads(err.decode().strip().splitlines()[-1])
    assert p.returncode == 0
    assert st["worst"] < 0.02, st
    assert st["dropped"] > 0 and st["written"] < st["n"], st
    assert st["queue_bytes"] <= (1 << 20) + 100 * 1000, st


def test_two_workers_sharing_stdout_never_interleave_a_line() -> None:
    r, w = os.pipe()
    procs = [_writer(1500, 0.6, w) for _ in range(2)]
    os.close(w)
    data = bytearray()
    with os.fdopen(r, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            data += chunk
    stats = []
    for p in procs:
        _, err = p.communicate(timeout=10)
        assert p.returncode == 0
        stats.append(json.loads(err.decode().strip().splitlines()[-1]))
    pids = set()
    lines = bytes(data).splitlines()
    for line in lines:
        pids.add(json.loads(line)["request_id"].split("-")[0])
    assert len(pids) == 2
    assert len(lines) == sum(s["written"] for s in stats)
    assert all(s["dropped"] == 0 and s["flushed"] for s in stats), stats


def test_a_burst_larger_than_the_buffer_is_cut_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "access.log"

    async def main() -> dict[str, int]:
        log = A.AccessLog(str(path), "json", buffer_bytes=64 << 10)
        for i in range(5000):  # one tick's worth: ~2.5 MB of lines for a 64 KiB buffer
            log.write(rec(i))
        assert await log.aflush()
        for i in range(5000, 5010):
            log.write(rec(i))
        assert await log.aclose()
        log.write(rec(1))
        return log.stats()

    st = run(main)
    got = seqs(path)
    assert st["written"] == len(got) and st["written"] + st["dropped"] == 5010
    assert 50 < len(got) < 2500 and st["dropped"] > 2500 and got[-10:] == list(range(5000, 5010))
    # whole lines, in order: what the writer had no room for is cut (it may free room
    # during the burst, when the loop yields the GIL)
    assert got[:-10] == sorted(set(got[:-10])) and got[0] == 0


def test_stats_and_arguments() -> None:
    async def main() -> None:
        with pytest.raises(ValueError):
            A.AccessLog("relative.log")
        with pytest.raises(ValueError):
            A.AccessLog("stdout", "xml")  # type: ignore[arg-type]
        log = A.AccessLog("/dev/null", "combined")
        log.write(rec(1))
        assert log.stats()["pending"] == 1
        assert log.close()
        assert set(log.stats()) >= {"written", "dropped", "errors", "queue_bytes"}
        assert log.stats()["written"] == 1

    run(main)


# --------------------------------------------------------------------------- logrotate


def _logrotate() -> str:
    if not os.path.exists(LOGROTATE):
        if os.environ.get("CI"):
            pytest.fail("logrotate is not installed (./dev installs the Debian package)")
        pytest.skip("logrotate is not installed")
    return LOGROTATE


def test_logrotate_snippet_parses(tmp_path: Path) -> None:
    lr = _logrotate()
    text = SNIPPET.read_text()
    for word in ("/var/log/pairlb/access.log", "daily", "rotate 14", "compress",
                 "delaycompress", "missingok", "notifempty", "create 0640", "sharedscripts",
                 "systemctl kill --kill-whom=main --signal=USR2 pairlb.service"):
        assert word in text, word
    p = subprocess.run([lr, "-d", "-s", str(tmp_path / "state"), str(SNIPPET)],
                       capture_output=True, text=True, timeout=30)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert "error" not in out.lower(), out
    assert "/var/log/pairlb/access.log" in out


ROTATED_WRITER = textwrap.dedent("""
    import asyncio, signal, sys
    import uvloop
    from lb.data import accesslog as A

    async def main():
        loop = asyncio.get_running_loop()
        log = A.AccessLog(sys.argv[1], "json", flush_interval=0.02)
        loop.add_signal_handler(signal.SIGUSR1, log.reopen)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        n = 0
        while not stop.is_set():
            log.write((1714564800.0 + n, "127.0.0.1", 1, "l", "http", b"GET", b"/", "HTTP/1.1",
                       200, 1, 1, "p", "b", 0, 0.0, 0.0, 0.0, 0.0, "--", b"w-%08x" % n, b"",
                       b""))
            n += 1
            await asyncio.sleep(0.001)
        ok = log.close(timeout=2)
        print(n, ok, log.stats()["reopens"], flush=True)

    uvloop.run(main())
""")


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _wait(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_logrotate_rotation_then_reopen_loses_no_line(tmp_path: Path) -> None:
    """The snippet, pointed at a temporary directory, its postrotate signalling a writer
    that reopens on SIGUSR1 as a worker does: lines go on in the new file, none lost."""
    lr = _logrotate()
    log_path = tmp_path / "access.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    w = subprocess.Popen([sys.executable, "-c", ROTATED_WRITER, str(log_path)],
                         stdout=subprocess.PIPE, text=True, env=env)
    try:
        _wait(lambda: _lines(log_path) >= 30)
        conf = SNIPPET.read_text().replace("/var/log/pairlb/access.log", str(log_path))
        conf, n = re.subn(r"(?m)^(\s*)systemctl kill .*$", rf"\1kill -USR1 {w.pid}", conf)
        assert n == 1
        (tmp_path / "conf").write_text(conf)
        p = subprocess.run([lr, "-f", "-s", str(tmp_path / "state"), str(tmp_path / "conf")],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stdout + p.stderr
        rotated = tmp_path / "access.log.1"
        assert rotated.exists() and not (tmp_path / "access.log.1.gz").exists()  # delay
        _wait(lambda: _lines(log_path) >= 30)  # reopened: new lines in the new file
        oct_mode = log_path.stat().st_mode & 0o777
    finally:
        w.send_signal(signal.SIGTERM)
        out, _ = w.communicate(timeout=10)
    n_written, ok, reopens = out.split()
    assert w.returncode == 0 and ok == "True" and reopens == "1"
    assert oct_mode == 0o640  # logrotate's create 0640
    got = sorted(seqs(rotated) + seqs(log_path))
    assert got == list(range(int(n_written)))
