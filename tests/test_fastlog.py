"""The access log's C formatter (lb/data/_fastlog.c) writes exactly what the Python
formatters write, for every kind of record, and takes the Python path for what it does
not handle itself; the Python path alone passes the access log's tests."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.data import accesslog as A

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not A.FAST, reason="lb.data._fastlog not built")

PY = {"json": A.py_json_formatter, "combined": A.py_combined_formatter}


def typical(i: int = 0) -> tuple[Any, ...]:
    return (1764889200.0 + i * 0.37, "203.0.113.7", 40000 + i, "web", "http", b"GET",
            b"/api/items?id=%d" % i, "HTTP/1.1", 200, 180, 2350, "app", f"app-{i % 3}", 0,
            0.011, 0.0, 1.204, 1.532, "--", b"5f2a9c1e07b3-%08x" % i, b"curl/8.5", None)


def both(fmt: str, rec: tuple[Any, ...], limit: int = A.FIELD_MAX) -> tuple[bytes, bytes]:
    fast = A.LINE_FORMATTERS[fmt](limit)
    py = PY[fmt](limit)
    try:
        want = py(rec)
    except Exception:
        want = py(A.sanitize(rec))  # what the log writes for it (AccessLog._sanitized)
        try:
            got = fast(rec)
        except Exception:
            got = fast(A.sanitize(rec))
        return got, want
    return fast(rec), want


@pytest.mark.parametrize("fmt", ["json", "combined"])
def test_typical_records_take_the_c_path_and_match(fmt: str) -> None:
    calls = []

    def fallback(rec: Any) -> bytes:
        calls.append(rec)
        return PY[fmt](A.FIELD_MAX)(rec)

    fn = A._fastlog.json_line if fmt == "json" else A._fastlog.combined_line
    for i in range(500):
        rec = typical(i)
        assert fn(fallback, A.FIELD_MAX, rec) == PY[fmt](A.FIELD_MAX)(rec)
    tcp = (*typical()[:4], "tcp", None, None, None, 0, 10, 20, "app", "app-1", 0, 0.1, 0.2,
           -1.0, 3.0, "SD", None, None, None)
    assert fn(fallback, A.FIELD_MAX, tcp) == PY[fmt](A.FIELD_MAX)(tcp)
    assert calls == []  # none went to Python


@pytest.mark.parametrize("fmt", ["json", "combined"])
def test_milliseconds_round_as_python_does_ties_included(fmt: str) -> None:
    values = [k / 1024 for k in range(0, 4096)] + [k / 2000 for k in range(0, 4000)]
    values += [0.0625, 0.1875, 999999.9995, 999999.9994999, 1e6, 1e6 + 0.0005, 123.4565,
               -0.0, -1.0, -0.0005, -2.5, 1e300, math.inf, -math.inf, math.nan, 5e-324]
    base = typical()
    for x in values:
        rec = (*base[:14], x, x, x, x, *base[18:])
        got, want = both(fmt, rec)
        assert got == want, x


_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.floats(min_value=0, max_value=1e7),
                    st.integers(0, 10**7).map(lambda k: k / 1000),
                    st.integers(0, 10**6).map(lambda k: k / 4096),
                    st.sampled_from([-1.0, -0.0, 0.0]))
_text = st.one_of(
    st.none(),
    st.binary(max_size=40),
    st.text(max_size=20),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30),
    st.sampled_from([b"GET", b"/", b"", "-", "a b", b'"', b"\\", b"\x7f", "\u00e9"]),
    st.integers(),
)
_ints = st.one_of(st.integers(-5, 70000), st.integers(), st.booleans(), _floats, st.none())
_name = st.one_of(st.sampled_from(["web", "app", "app-1", "--", "SD", "http", "tcp",
                                   "HTTP/1.1", "", "a b", 'q"'] ), _text)
_time = st.one_of(st.floats(min_value=0, max_value=4e9), st.integers(0, 2**34),
                  st.floats(), st.sampled_from([0.0, 253402300799.9, 253402300800.0, -1.0]))


@st.composite
def records(draw: Any) -> tuple[Any, ...]:
    base = list(typical(draw(st.integers(0, 10))))
    kinds = {0: _time, 1: _text, 2: _ints, 3: _name, 4: _name, 5: _text, 6: _text, 7: _name,
             8: _ints, 9: _ints, 10: _ints, 11: _name, 12: _name, 13: _ints, 14: _floats,
             15: _floats, 16: _floats, 17: _floats, 18: _name, 19: _text, 20: _text,
             21: _text}
    for i in draw(st.sets(st.integers(0, 21), max_size=4)):
        base[i] = draw(kinds[i])
    if draw(st.integers(0, 20)) == 0:
        return tuple(base[: draw(st.integers(0, 21))])  # too short
    return tuple(base)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rec=records(), fmt=st.sampled_from(["json", "combined"]),
       limit=st.sampled_from([A.FIELD_MAX, 8, 0]))
def test_any_record_gives_the_python_formatters_bytes(
    rec: tuple[Any, ...], fmt: str, limit: int
) -> None:
    got, want = both(fmt, rec, limit)
    assert got == want


def test_time_caches_follow_the_clock() -> None:
    # both formats cache the text of one second: each new second is written anew
    for fmt in ("json", "combined"):
        for t in (1764889200.5, 1764889201.25, 1764889200.75, 86400.0 * 365 * 30, 0.0):
            rec = (t, *typical()[1:])
            got, want = both(fmt, rec)
            assert got == want


def test_bad_arguments_raise() -> None:
    with pytest.raises(TypeError):
        A._fastlog.json_line(None, 10)
    with pytest.raises(TypeError):
        A._fastlog.combined_line(print, "x", typical())


def test_pure_python_path_passes_the_access_log_tests() -> None:
    env = {**os.environ, "PAIRLB_PURE_PYTHON": "1"}
    probe = subprocess.run([sys.executable, "-c", "import lb.data.accesslog as A; "
                            "print(A.FAST)"], env=env, capture_output=True, text=True,
                           timeout=60, cwd=ROOT)
    assert probe.stdout.strip() == "False", probe.stderr
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/test_accesslog.py", "tests/test_issue17_review.py"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:]
    assert " passed" in r.stdout


def test_speed_c_path_is_cheaper() -> None:
    """Not a benchmark (bench/accesslog.py is): a sanity check that the C path is in use
    and cheaper than Python on a typical record."""
    rec = typical()
    for fmt in ("json", "combined"):
        fast, py = A.LINE_FORMATTERS[fmt](A.FIELD_MAX), PY[fmt](A.FIELD_MAX)

        def per(f: Any) -> float:
            best = math.inf
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(2000):
                    f(rec)
                best = min(best, time.perf_counter() - t)
            return best

        assert per(fast) < per(py)



# -- review findings (each failed before its fix) ------------------------------------------


def test_a_new_formatter_follows_a_new_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = typical()
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert A.combined_formatter(0)(rec) == A.py_combined_formatter(0)(rec)
        monkeypatch.setenv("TZ", "Asia/Kathmandu")
        time.tzset()
        got = A.combined_formatter(0)(rec)
        assert got == A.py_combined_formatter(0)(rec) and b"+0545]" in got
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


@pytest.mark.parametrize("limit", [-1, -5, 1, 2**70])
def test_any_limit_cuts_as_python_does(limit: int) -> None:
    for fmt in ("json", "combined"):
        assert A.LINE_FORMATTERS[fmt](limit)(typical()) == PY[fmt](limit)(typical())


def test_equal_names_of_other_types_keep_their_own_text() -> None:
    base = list(typical())
    for fmt in ("json", "combined"):
        f = PY[fmt](A.FIELD_MAX)
        base[11] = 1
        assert b"1" in f(tuple(base))
        base[11] = True  # == 1, but its own text
        assert b"True" in f(tuple(base))


def test_fifo_lines_are_cut_before_the_reader_opens_and_a_stuck_writer_is_counted(
    tmp_path: Path,
) -> None:
    import asyncio

    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    n = 400

    async def main() -> dict[str, int]:
        log = A.AccessLog(str(fifo), "json", buffer_bytes=64 << 10, flush_interval=0.01)
        long_rec = (*typical()[:6], b"/" + b"x" * 3000, *typical()[7:])
        log.write(long_rec)
        assert 0 < log._sink.len <= A.PIPE_BUF  # cut for an atomic pipe write already
        for i in range(n - 1):
            log.write(typical(i))
            if i % 50 == 0:
                await asyncio.sleep(0.02)  # hand-overs to a writer stuck in open()
        assert not await log.aclose(0.2)  # nobody reads: the writer never finishes
        return log.stats()

    st = asyncio.run(main())
    assert st["written"] == 0 and st["written"] + st["dropped"] == n, st
    # unblock the writer thread stuck in open(): it finds the log closed
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    os.close(fd)


# -- Sink.http: the proxy's one call per request -------------------------------------------


def _sinks(fmt: str) -> tuple[Any, Any]:
    def make(cls: Any) -> Any:
        return cls(fmt, A.FIELD_MAX, PY[fmt](A.FIELD_MAX), PY[fmt](A.STREAM_FIELD_MAX),
                   A.http_record)
    return make(A._fastlog.Sink), make(A.PySink)


_t = st.floats(min_value=0, max_value=1e7)


@st.composite
def http_facts(draw: Any) -> tuple[Any, ...]:
    t0 = draw(_t)
    stage = st.one_of(st.just(-1.0), _t, st.just(0.0))
    return (
        draw(st.one_of(st.floats(min_value=1e9, max_value=2e9), st.integers(0, 2**31))),
        draw(st.sampled_from(["203.0.113.9", "::1", None])), draw(st.integers(0, 65535)),
        "web", draw(st.sampled_from([b"GET", b"POST"])), draw(_text),
        draw(st.booleans()), draw(st.sampled_from([200, 404, 0, 101])),
        draw(st.integers(0, 10**6)), draw(st.integers(0, 10**9)), "app",
        draw(st.sampled_from(["app-1", None])), draw(st.integers(0, 3)), t0,
        draw(stage), draw(stage), draw(stage), draw(stage),
        draw(st.one_of(st.just(t0), _t, st.integers(0, 10))),
        draw(st.sampled_from(["--", "CD", "sH"])), draw(_text), draw(_text), draw(_text),
    )


@settings(max_examples=400, deadline=None)
@given(facts=st.lists(http_facts(), min_size=1, max_size=8),
       fmt=st.sampled_from(["json", "combined"]))
def test_sink_http_writes_what_python_writes(facts: list[tuple[Any, ...]], fmt: str) -> None:
    c, p = _sinks(fmt)
    for f in facts:
        assert c.http(*f) == p.http(*f)
    assert c.take() == p.take()
    # and what the record's own line is
    assert p.take() == (b"", 0)
    for f in facts:
        c.http(*f)
    line_of = A.LINE_FORMATTERS[fmt](A.FIELD_MAX)
    lines = []
    for f in facts:
        rec = A.http_record(*f)
        try:
            lines.append(line_of(rec))
        except Exception:
            lines.append(line_of(A.sanitize(rec)))
    assert c.take()[0] == b"".join(lines)


def test_sink_http_with_no_room_returns_the_record() -> None:
    for fmt in ("json", "combined"):
        for s in _sinks(fmt):
            s.room = 10
            facts = (1764889200.25, "ip", 1, "l", b"GET", b"/", False, 200, 1, 1, "p", "b",
                     0, 1.0, -1.0, -1.0, -1.0, -1.0, 2.0, "--", None, None, None)
            rec = s.http(*facts)
            assert rec == A.http_record(*facts) and s.nlines == 0
            s.room = 1 << 20
            assert s.add(rec) == 1 and s.nlines == 1


# -- second review's findings (each failed before its fix) ---------------------------------


def test_a_closed_log_is_freed(tmp_path: Path) -> None:
    import asyncio
    import gc
    import weakref

    async def main() -> weakref.ref[Any]:
        log = A.AccessLog(str(tmp_path / "a.log"), "json")
        log.write(typical())
        assert await log.aclose()
        return weakref.ref(log)

    ref = asyncio.run(main())
    gc.collect()
    assert ref() is None  # no cycle through the (untracked) C Sink


def test_a_bad_record_that_waits_for_room_is_counted_once(tmp_path: Path) -> None:
    import asyncio

    async def main() -> dict[str, int]:
        log = A.AccessLog(str(tmp_path / "a.log"), "json")
        log._sink.room = 0  # as if the writer were behind: the line is retried
        log.write((*typical()[:8], "not a status", *typical()[9:]))
        assert await log.aclose()
        return log.stats()

    st = asyncio.run(main())
    assert st["bad_records"] == 1 and st["written"] == 1, st


def test_an_uninitialised_sink_raises() -> None:
    s = A._fastlog.Sink.__new__(A._fastlog.Sink)
    with pytest.raises(RuntimeError):
        s.add(typical())
    with pytest.raises(RuntimeError):
        s.http(*[1.0] * 23)


@pytest.mark.parametrize("fmt", ["json", "combined"])
def test_sink_http_reads_the_wall_clock_when_given_none(fmt: str) -> None:
    """The proxy passes None (no time.time() call per request): both sinks read the clock
    and write what they would for that instant (total 2 s: the request began 2 s ago)."""
    facts = ["203.0.113.9", 5, "web", b"GET", b"/x", False, 200, 10, 20, "app", "app-1", 0,
             1.0, 1.5, 0.25, 1.75, 2.5, 3.0, "--", b"rid-1", b"ua", None]
    for s in _sinks(fmt):
        before = time.time()
        assert s.http(None, *facts) == 1
        after = time.time()
        line = s.take()[0]
        # some instant between before and after gives exactly that line
        cands = {s2_line(fmt, w / 1000 + 0.0005, facts) for w in range(int(before * 1000) - 1,
                                                                 int(after * 1000) + 2)}
        assert line in cands


def s2_line(fmt: str, wall: float, facts: list[Any]) -> bytes:
    return A.LINE_FORMATTERS[fmt](A.FIELD_MAX)(A.http_record(wall, *facts))


@pytest.mark.parametrize("fmt", ["json", "combined"])
def test_a_fresh_python_formatter_writes_1969s_last_second(fmt: str) -> None:
    """Found by the parity property: the Python formatters' per-second cache started at -1,
    so a fresh one wrote an empty time for a record at -1 s (and a used one did not)."""
    rec = A.http_record(0.0, "ip", 1, "l", b"GET", b"/", False, 200, 1, 1, "p", "b", 0,
                        1.0, -1.0, -1.0, -1.0, -1.0, 2.0, "--", None, None, None)
    fresh = A.LINE_FORMATTERS[fmt](A.FIELD_MAX)
    used = A.LINE_FORMATTERS[fmt](A.FIELD_MAX)
    used(A.http_record(1e9, "ip", 1, "l", b"GET", b"/", False, 200, 1, 1, "p", "b", 0, 1.0,
                       -1.0, -1.0, -1.0, -1.0, 2.0, "--", None, None, None))
    assert fresh(rec) == used(rec)
    assert b"1969-12-31T23:59:59" in fresh(rec) or b"31/Dec/1969" in fresh(rec)
