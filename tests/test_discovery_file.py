"""lb.control.discovery with a watched JSON file: atomic renames picked up within the
interval; partial writes, deleted files and hostile files are counted failures that keep the
last good set; the next good write is picked up."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from lb.control import discovery as d

pytestmark = pytest.mark.timeout(60)

INTERVAL = 0.05
Backends = list[tuple[str, str, int]]


def entries(*hosts: str, port: int = 8080) -> list[dict[str, Any]]:
    return [{"address": f"{h}:{port}"} for h in hosts]


def write_atomic(path: Path, doc: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


class Watch:
    def __init__(self, path: Path, **kw: Any) -> None:
        self.calls: list[tuple[float, Backends]] = []
        self.disc = d.Discovery("web", d.FileSpec(str(path), interval_s=INTERVAL, **kw),
                                self.on_change)

    def on_change(self, pool: str, backends: Backends, source: str) -> None:
        assert (pool, source) == ("web", "file")
        self.calls.append((time.monotonic(), backends))

    def addrs(self) -> set[str]:
        return {a for _, a, _ in self.calls[-1][1]} if self.calls else set()

    async def until(self, pred: Callable[[], bool], timeout_s: float = 5.0) -> float:
        deadline = time.monotonic() + timeout_s
        while not pred():
            assert time.monotonic() < deadline, f"timed out; status {self.disc.status()}"
            await asyncio.sleep(0.005)
        return time.monotonic()

    async def until_addrs(self, want: set[str], timeout_s: float = 5.0) -> float:
        await self.until(lambda: self.addrs() == want, timeout_s)
        return self.calls[-1][0]

    async def until_failures(self, reason: str, n: int = 1) -> dict[str, Any]:
        await self.until(lambda: self.disc.status()["failures"].get(reason, 0) >= n)
        return self.disc.status()


def run(path: Path, body: Callable[[Watch], Awaitable[None]], **kw: Any) -> Watch:
    w = Watch(path, **kw)

    async def main() -> None:
        w.disc.start()
        try:
            await body(w)
        finally:
            await w.disc.stop()

    asyncio.run(main())
    return w


def test_atomic_rename_is_picked_up_within_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "web.json"
    write_atomic(path, [{"name": "web4", "address": "10.0.0.4:8080", "weight": 2}])
    lags: list[float] = []

    async def body(w: Watch) -> None:
        await w.until_addrs({"10.0.0.4:8080"})
        assert w.calls[-1][1] == [("web4", "10.0.0.4:8080", 2)]
        for i in range(10):
            await asyncio.sleep(INTERVAL * (i % 4) / 3)  # any phase of the poll cycle
            t0 = time.monotonic()
            write_atomic(path, entries("10.0.0.4", f"10.0.1.{i + 1}"))
            lags.append(await w.until_addrs({"10.0.0.4:8080", f"10.0.1.{i + 1}:8080"}) - t0)

    w = run(path, body)
    print(f"file lag (interval {INTERVAL}s): max {max(lags) * 1000:.1f} ms, "
          f"all {sorted(round(x * 1000, 1) for x in lags)}")
    assert max(lags) < INTERVAL + 0.1
    st = w.disc.status()
    assert st["kind"] == "file" and st["target"] == str(path)
    assert st["failures_total"] == 0 and st["changes_total"] == 11
    assert st["backends"] == 2 and st["next_refresh_s"] is None  # stopped
    json.dumps(st)


def test_partial_write_in_place_is_a_failure_then_the_good_write_wins(tmp_path: Path) -> None:
    path = tmp_path / "web.json"
    write_atomic(path, entries("10.0.0.1", "10.0.0.2"))
    good = json.dumps(entries("10.0.0.1", "10.0.0.2", "10.0.0.3")).encode()

    async def body(w: Watch) -> None:
        await w.until_addrs({"10.0.0.1:8080", "10.0.0.2:8080"})
        # truncate and write half, in place (not atomic)
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, good[: len(good) // 2])
            st = await w.until_failures("invalid_json")
            assert str(path) in st["last_error"] and "partial write" in st["last_error"]
            assert st["backends"] == 2 and len(w.calls) == 1  # last good set kept
            await asyncio.sleep(INTERVAL * 4)  # the same bad version is counted once
            assert w.disc.status()["failures"] == {"invalid_json": 1}
            os.write(fd, good[len(good) // 2:])
        finally:
            os.close(fd)
        await w.until_addrs({"10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"})
        assert w.disc.status()["consecutive_failures"] == 0

    run(path, body)


def test_truncated_to_zero_is_a_failure(tmp_path: Path) -> None:
    path = tmp_path / "web.json"
    write_atomic(path, entries("10.0.0.1"))

    async def body(w: Watch) -> None:
        await w.until_addrs({"10.0.0.1:8080"})
        path.write_bytes(b"")
        st = await w.until_failures("invalid_json")
        assert "empty file" in st["last_error"] and st["backends"] == 1

    run(path, body)


def test_deleted_file_is_a_failure_and_the_set_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "web.json"
    write_atomic(path, entries("10.0.0.1", "10.0.0.2"))

    async def body(w: Watch) -> None:
        await w.until_addrs({"10.0.0.1:8080", "10.0.0.2:8080"})
        path.unlink()
        st = await w.until_failures("missing")
        assert st["last_error"] == f"{path}: no such file"
        await asyncio.sleep(INTERVAL * 4)
        st = w.disc.status()
        assert st["failures"] == {"missing": 1} and st["backends"] == 2 and len(w.calls) == 1
        write_atomic(path, entries("10.0.0.1", "10.0.0.2"))  # back, same set: no callback
        await w.until(lambda: w.disc.status()["consecutive_failures"] == 0)
        assert len(w.calls) == 1
        write_atomic(path, entries("10.0.0.2"))
        await w.until_addrs({"10.0.0.2:8080"})

    run(path, body)


def test_missing_at_start_hands_over_nothing_until_it_appears(tmp_path: Path) -> None:
    path = tmp_path / "web.json"

    async def body(w: Watch) -> None:
        st = await w.until_failures("missing")
        assert st["backends"] is None and not w.calls
        write_atomic(path, entries("10.0.0.9"))
        await w.until_addrs({"10.0.0.9:8080"})

    run(path, body)


def test_invalid_content_names_path_entry_and_problem(tmp_path: Path) -> None:
    path = tmp_path / "web.json"
    write_atomic(path, entries("10.0.0.1"))

    async def body(w: Watch) -> None:
        await w.until_addrs({"10.0.0.1:8080"})
        write_atomic(path, [*entries("10.0.0.1"), {"address": "10.0.0.2:99999"}])
        st = await w.until_failures("invalid")
        assert st["last_error"].startswith(f"{path}: [1].address: port must be 1-65535")
        write_atomic(path, entries("10.0.0.1", "10.0.0.1"))
        st = await w.until_failures("invalid", 2)
        assert "[1].address: duplicate" in st["last_error"]
        write_atomic(path, [])
        st = await w.until_failures("empty")
        assert st["backends"] == 1 and len(w.calls) == 1

    run(path, body)


def test_same_size_rewrite_within_a_timestamp_tick_is_seen(tmp_path: Path) -> None:
    """Two in-place writes of the same size right after each other may share mtime_ns
    (coarse timestamps): a file read while "racy" is read again on the next poll."""
    path = tmp_path / "web.json"
    path.write_text(json.dumps(entries("10.0.0.1")))

    async def body(w: Watch) -> None:
        await w.until_addrs({"10.0.0.1:8080"})
        for i in range(2, 8):
            fd = os.open(path, os.O_WRONLY)  # same length, in place, same inode
            os.write(fd, json.dumps(entries(f"10.0.0.{i}")).encode())
            os.close(fd)
            await w.until_addrs({f"10.0.0.{i}:8080"}, timeout_s=INTERVAL * 4 + 1)

    run(path, body)


def test_symlink_swap_is_seen(tmp_path: Path) -> None:
    """Kubernetes ConfigMap style: the path is a symlink re-pointed atomically."""
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    (tmp_path / "v1" / "web.json").write_text(json.dumps(entries("10.0.0.1")))
    (tmp_path / "v2" / "web.json").write_text(json.dumps(entries("10.0.0.2")))
    (tmp_path / "data").symlink_to("v1")
    path = tmp_path / "web.json"
    path.symlink_to("data/web.json")

    async def body(w: Watch) -> None:
        await w.until_addrs({"10.0.0.1:8080"})
        (tmp_path / "data.new").symlink_to("v2")
        os.replace(tmp_path / "data.new", tmp_path / "data")
        await w.until_addrs({"10.0.0.2:8080"})

    run(path, body)


def test_large_file_is_read_off_the_loop_and_oversized_refused(tmp_path: Path) -> None:
    path = tmp_path / "web.json"
    many = [{"name": f"b{i}", "address": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:80",
             "weight": 1 + i % 1000} for i in range(10_000)]
    write_atomic(path, many)
    assert path.stat().st_size > d.FILE_THREAD_BYTES

    async def body(w: Watch) -> None:
        async def ticker() -> float:
            worst = 0.0
            loop = asyncio.get_running_loop()
            while True:
                t = loop.time()
                await asyncio.sleep(0.005)
                worst = max(worst, loop.time() - t - 0.005)
                if w.calls:
                    return worst

        t0 = time.monotonic()
        worst = await asyncio.wait_for(ticker(), 10)
        print(f"10,000 backends: {time.monotonic() - t0:.3f} s to the callback, "
              f"worst loop stall {worst * 1000:.1f} ms")
        assert len(w.calls[-1][1]) == 10_000
        write_atomic(path, [*many, {"address": "10.200.0.1:80"}])
        st = await w.until_failures("too_many")
        assert "10001 backends" in st["last_error"]
        path.write_bytes(b" " * (2 << 20))
        st = await w.until_failures("too_large")
        assert "bytes" in st["last_error"] and st["backends"] == 10_000

    run(path, body, max_bytes=1 << 20)


def test_not_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "web.json"
    os.mkfifo(path)  # a FIFO must not hang the loop (opened non-blocking, refused)

    async def body(w: Watch) -> None:
        st = await w.until_failures("unreadable")
        assert "not a regular file" in st["last_error"]

    run(path, body)
    path.unlink()
    path.mkdir()

    async def body2(w: Watch) -> None:
        st = await w.until_failures("unreadable")
        assert str(path) in st["last_error"]

    run(path, body2)
