"""The overlay's snapshot and journal on disk (lb.control.overlay_store), with real files."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
import threading
import zlib
from pathlib import Path

import pytest

from lb.control.overlay import Intent, Overlay, Retired
from lb.control.overlay_store import LOG, SNAPSHOT, OverlayStore, OverlayStoreError, encode

T0 = 1_800_000_000.0
ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


def state(tmp_path: Path) -> str:
    return str(tmp_path / "lib" / "pairlb")


def fresh(tmp_path: Path, node: str = "lb-a") -> tuple[OverlayStore, Overlay]:
    store = OverlayStore(state(tmp_path), node)
    return store, store.load()


def reload(tmp_path: Path, node: str = "lb-a") -> tuple[OverlayStore, Overlay]:
    return fresh(tmp_path, node)


def same(a: Overlay, b: Overlay) -> None:
    assert (a.node, a.lamport, a.seen, a.entries, a.digest(), a.next_seq) == (
        b.node, b.lamport, b.seen, b.entries, b.digest(), b.next_seq)


def add(ov: Overlay, name: str, weight: int = 1) -> list[Intent | Retired]:
    return [ov.local("web", name, "present", f"10.0.0.{weight}:80", weight, "api", T0)]


def history(store: OverlayStore, ov: Overlay) -> None:
    """Adds, a patch, a tombstone, the peer's op, a retirement and a re-add."""
    store.append([ov.local("web", "x", "present", "10.0.0.1:80", 1, "api", T0),
                  ov.local("web", "y", "present", "10.0.0.2:80", 1, "api", T0)])
    store.append([ov.local("web", "x", "present", None, 4, "cli", T0)])
    store.append([ov.local("web", "web1", "removed", None, None, "api", T0)])
    peer = Overlay("lb-b")
    op = peer.local("web", "z", "present", "10.0.0.3:80", 2, "api", T0)
    assert ov.merge(op).won
    store.append([op])
    retired = ov.retire("web", "y")
    assert retired is not None
    store.append([retired])
    store.append([ov.local("web", "x2", "present", "10.0.0.5:80", 1, "api", T0)])


def log_path(tmp_path: Path) -> Path:
    return Path(state(tmp_path)) / LOG


def snap_path(tmp_path: Path) -> Path:
    return Path(state(tmp_path)) / SNAPSHOT


# -- round trips --------------------------------------------------------------------------------


def test_missing_files_are_an_empty_overlay_and_the_dir_is_made_0700(tmp_path: Path) -> None:
    store, ov = fresh(tmp_path)
    assert (ov.node, ov.entries, ov.lamport, ov.next_seq) == ("lb-a", {}, 0, 1)
    assert store.warnings == [] and not store.needs_compaction()
    assert stat.S_IMODE(os.stat(state(tmp_path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(log_path(tmp_path)).st_mode) == 0o600
    assert not snap_path(tmp_path).exists()


def test_journal_round_trip(tmp_path: Path) -> None:
    store, ov = fresh(tmp_path)
    history(store, ov)
    lines = log_path(tmp_path).read_bytes().splitlines()
    assert len(lines) == 7 == store.log_lines
    crc, body = lines[0].split(b" ", 1)
    assert int(crc, 16) == zlib.crc32(body) and json.loads(body)["t"] == "op"
    assert json.loads(lines[5].split(b" ", 1)[1]) == {
        "t": "retire", "v": 1, "pool": "web", "backend": "y", "stamp": [2, "lb-a"]}
    store.close()
    store2, back = reload(tmp_path)
    same(back, ov)
    assert ("web", "y") not in back.entries and back.seen == {"lb-a": 5, "lb-b": 1}
    assert store2.warnings == [] and store2.log_bytes == log_path(tmp_path).stat().st_size
    # The reloaded store keeps journaling where the old one stopped.
    store2.append(add(back, "after"))
    _, again = reload(tmp_path)
    same(again, back)
    assert again.entries[("web", "after")].seq == 6


def test_compaction_round_trip(tmp_path: Path) -> None:
    store, ov = fresh(tmp_path)
    history(store, ov)
    fsyncs = store.fsyncs
    store.compact(ov)
    assert store.fsyncs - fsyncs == 3  # snapshot, directory, journal truncation
    assert log_path(tmp_path).stat().st_size == 0 and store.log_lines == 0
    doc = json.loads(snap_path(tmp_path).read_text())
    assert doc["format"] == 1 and doc["node"] == "lb-a"
    assert doc["compacted_at"] == doc["seen"] == {"lb-a": 5, "lb-b": 1}
    assert stat.S_IMODE(snap_path(tmp_path).stat().st_mode) == 0o600
    assert [p.name for p in Path(state(tmp_path)).iterdir()] in (
        [SNAPSHOT, LOG], [LOG, SNAPSHOT])  # no temporary file left
    store.append(add(ov, "later"))
    store2, back = reload(tmp_path)
    same(back, ov)
    assert store2.compacted_at == {"lb-a": 5, "lb-b": 1} and store2.log_lines == 1


def test_crash_between_rename_and_truncate_replays_idempotently(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, ov = fresh(tmp_path)
    history(store, ov)
    # x2 overwritten after being journaled, y re-added after its retirement: the old
    # journal lines must not win over the snapshot.
    store.append([ov.local("web", "x2", "removed", None, None, "api", T0)])
    store.append(add(ov, "y", 9))

    def crash() -> None:
        raise OSError(errno.EIO, "simulated crash")

    monkeypatch.setattr(store, "_truncate_log", crash)
    with pytest.raises(OverlayStoreError, match="cannot truncate"):
        store.compact(ov)
    monkeypatch.undo()
    assert snap_path(tmp_path).exists() and store.log_lines == 9  # both hold everything
    _, back = reload(tmp_path)
    same(back, ov)
    assert back.entries[("web", "y")].weight == 9 and back.entries[("web", "x2")].state == "removed"
    # Twice over, and after more changes: still the same.
    store3, back = reload(tmp_path)
    store3.append(add(back, "new"))
    _, again = reload(tmp_path)
    assert again.entries[("web", "new")].seq == ov.next_seq


def test_a_retire_record_never_drops_a_newer_value(tmp_path: Path) -> None:
    store, ov = fresh(tmp_path)
    store.append(add(ov, "x", 1))
    retired = ov.retire("web", "x")
    assert retired is not None
    store.append([retired])
    store.compact(ov)  # snapshot without x
    store.append(add(ov, "x", 2))
    # Journal order as if lines got reordered: the stale retirement after the re-add.
    store.append([retired])
    _, back = reload(tmp_path)
    assert back.entries[("web", "x")].weight == 2


# -- damage ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["no_newline", "zeros", "only_newline"])
def test_a_torn_last_line_is_dropped_and_cut_off(tmp_path: Path, damage: str) -> None:
    store, ov = fresh(tmp_path)
    history(store, ov)
    store.close()
    path = log_path(tmp_path)
    good = path.read_bytes()
    extra = encode(add(Overlay("lb-a", lamport=50), "torn"))
    torn = {"no_newline": extra[:-1][: len(extra) // 2],
            "zeros": b"\0" * 300,
            "only_newline": b"\n"}[damage]
    path.write_bytes(good + torn)
    store2, back = reload(tmp_path)
    same(back, ov)
    assert len(store2.warnings) == 1
    assert f"{path}:8: torn last line ({len(torn)} bytes) dropped" in store2.warnings[0]
    assert path.read_bytes() == good  # cut off: the next append starts on a clean line
    store2.append(add(back, "next"))
    store3, again = reload(tmp_path)
    assert store3.warnings == [] and ("web", "next") in again.entries


def test_a_complete_last_line_with_a_bad_crc_is_corruption_not_a_torn_append(
        tmp_path: Path) -> None:
    """An append is one write ending in a newline: a complete line whose CRC is wrong was
    acknowledged once (a bit flip, not a crash), so start is refused, naming the line."""
    store, ov = fresh(tmp_path)
    history(store, ov)
    store.close()
    path = log_path(tmp_path)
    extra = encode(add(Overlay("lb-a", lamport=50), "flipped"))
    path.write_bytes(path.read_bytes() + b"00000000" + extra[8:])
    with pytest.raises(OverlayStoreError, match=r"overlay\.log:8: unreadable line"):
        reload(tmp_path)


def test_a_complete_last_line_without_newline_is_dropped_too(tmp_path: Path) -> None:
    store, ov = fresh(tmp_path)
    store.append(add(ov, "x"))
    store.close()
    path = log_path(tmp_path)
    path.write_bytes(path.read_bytes() + encode(add(Overlay("lb-a", 7), "y"))[:-1])
    store2, back = reload(tmp_path)
    assert set(back.entries) == {("web", "x")} and len(store2.warnings) == 1


@pytest.mark.parametrize("damage", ["crc", "framing", "empty"])
def test_a_corrupt_middle_line_refuses_with_path_and_line(tmp_path: Path, damage: str) -> None:
    store, ov = fresh(tmp_path)
    history(store, ov)
    store.close()
    path = log_path(tmp_path)
    lines = path.read_bytes().split(b"\n")
    lines[2] = {"crc": lines[2][:20] + b"X" + lines[2][21:], "framing": b"garbage",
                "empty": b""}[damage]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(OverlayStoreError) as err:
        reload(tmp_path)
    assert err.value.path == str(path) and err.value.line == 3
    assert str(err.value).startswith(f"{path}:3: unreadable line")


def test_a_corrupt_middle_line_before_a_torn_tail_still_refuses(tmp_path: Path) -> None:
    store, ov = fresh(tmp_path)
    history(store, ov)
    store.close()
    path = log_path(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-3] + b"Z\n" + b"partial")
    with pytest.raises(OverlayStoreError, match=r":7: unreadable line"):
        reload(tmp_path)


@pytest.mark.parametrize(("body", "message"), [
    (b'{"t":"op"', "Expecting"),  # a good CRC over bad JSON: written so, not torn
    (b'{"t":"op","v":1}', "op: missing"),
    (b'{"t":"retire","v":1,"pool":"web","backend":"x","stamp":[0,"a"]}', r"retire.stamp\[0\]"),
    (b"[" * 100_000, "recursion|Expecting|JSON"),
])
def test_a_well_framed_but_invalid_line_refuses_even_last(
        tmp_path: Path, body: bytes, message: str) -> None:
    store, ov = fresh(tmp_path)
    store.append(add(ov, "x"))
    store.close()
    path = log_path(tmp_path)
    with path.open("ab") as f:
        f.write(b"%08x %s\n" % (zlib.crc32(body), body))
    with pytest.raises(OverlayStoreError, match=message) as err:
        reload(tmp_path)
    assert err.value.line == 2


@pytest.mark.parametrize(("content", "message"), [
    (b"{not json", "not JSON"),
    (b'{"format": 2}', "snapshot: missing"),
    (b'{"format": 2, "node": "lb-a", "lamport": 0, "seen": {}, "entries": {}}',
     "snapshot.format: expected 1"),
    (b'{"format": 1, "node": "lb-b", "lamport": 0, "seen": {}, "entries": {}}',
     "written by node 'lb-b', this is 'lb-a'"),
])
def test_a_bad_snapshot_refuses(tmp_path: Path, content: bytes, message: str) -> None:
    fresh(tmp_path)[0].close()
    snap_path(tmp_path).write_bytes(content)
    os.chmod(snap_path(tmp_path), 0o600)
    with pytest.raises(OverlayStoreError, match=message) as err:
        reload(tmp_path)
    assert err.value.path == str(snap_path(tmp_path))


def test_stale_temporary_snapshots_are_removed(tmp_path: Path) -> None:
    fresh(tmp_path)[0].close()
    stale = Path(state(tmp_path)) / ".overlay.json.0123456789abcdef.tmp"
    stale.write_text("{")
    other = Path(state(tmp_path)) / ".overlay.json.mine.tmp"
    other.write_text("x")
    store, _ = reload(tmp_path)
    assert not stale.exists() and other.exists()  # only names the store makes
    assert store.warnings == [f"{stale}: removed (a compaction interrupted before its rename)"]


def test_a_failed_append_is_cut_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, ov = fresh(tmp_path)
    store.append(add(ov, "x"))
    size = log_path(tmp_path).stat().st_size
    real_write = os.write

    def half_then_enospc(fd: int, data: bytes | memoryview) -> int:
        if len(data) > 20:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(OverlayStoreError, match="cannot append: No space left"):
        store.append(add(ov, "y"))
    monkeypatch.undo()
    assert log_path(tmp_path).stat().st_size == size == store.log_bytes
    store.append(add(ov, "z"))
    store2, back = reload(tmp_path)
    assert store2.warnings == [] and set(back.entries) == {("web", "x"), ("web", "z")}


def test_append_before_load_refuses(tmp_path: Path) -> None:
    store = OverlayStore(state(tmp_path), "lb-a")
    with pytest.raises(OverlayStoreError, match="not loaded: call load"):
        store.append(add(Overlay("lb-a"), "x"))
    with pytest.raises(OverlayStoreError, match="not loaded"):
        store.compact(Overlay("lb-a"))


def test_needs_compaction_after_1000_lines_or_1_mib(tmp_path: Path) -> None:
    store, ov = fresh(tmp_path)
    store.append([ov.local("web", f"b{i}", "present", "10.0.0.1:80", 1, "api", T0)
                  for i in range(1000)])
    assert not store.needs_compaction()
    store.append(add(ov, "one-more"))
    assert store.needs_compaction()
    store2, ov2 = reload(tmp_path)
    assert store2.needs_compaction()  # counted at load too
    store2.compact(ov2)
    assert not store2.needs_compaction()
    store2.log_bytes = (1 << 20) + 1
    assert store2.needs_compaction()


# -- permissions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o770, 0o702, 0o777])
def test_a_group_or_world_writable_dir_is_refused(tmp_path: Path, mode: int) -> None:
    os.makedirs(state(tmp_path))
    os.chmod(state(tmp_path), mode)
    with pytest.raises(OverlayStoreError, match=f"group or world writable \\(mode {mode:04o}\\)"):
        OverlayStore(state(tmp_path), "lb-a").load()


def test_a_readable_dir_is_fine(tmp_path: Path) -> None:
    os.makedirs(state(tmp_path))
    os.chmod(state(tmp_path), 0o755)
    OverlayStore(state(tmp_path), "lb-a").load()
    assert stat.S_IMODE(os.stat(state(tmp_path)).st_mode) == 0o755  # not ours to change


def test_a_symlink_of_ours_to_a_good_dir_is_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.makedirs(os.path.dirname(state(tmp_path)))
    os.symlink(real, state(tmp_path))
    store, ov = fresh(tmp_path)
    store.append(add(ov, "x"))
    assert (real / LOG).exists()


def test_a_symlink_to_a_writable_dir_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.chmod(real, 0o777)
    os.makedirs(os.path.dirname(state(tmp_path)))
    os.symlink(real, state(tmp_path))
    with pytest.raises(OverlayStoreError, match="group or world writable"):
        fresh(tmp_path)


@ROOT
def test_a_symlink_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.makedirs(os.path.dirname(state(tmp_path)))
    os.symlink(real, state(tmp_path))
    os.lchown(state(tmp_path), 4242, 4242)
    with pytest.raises(OverlayStoreError, match="a symbolic link owned by uid 4242"):
        fresh(tmp_path)


@ROOT
def test_a_dir_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    os.makedirs(state(tmp_path), mode=0o700)
    os.chown(state(tmp_path), 4242, 4242)
    with pytest.raises(OverlayStoreError, match="owned by uid 4242"):
        fresh(tmp_path)


def test_a_file_that_is_not_a_dir_is_refused(tmp_path: Path) -> None:
    os.makedirs(os.path.dirname(state(tmp_path)))
    Path(state(tmp_path)).write_text("")
    with pytest.raises(OverlayStoreError, match="not a usable directory"):
        fresh(tmp_path)


@pytest.mark.parametrize("name", [LOG, SNAPSHOT])
def test_symlinked_files_are_refused(tmp_path: Path, name: str) -> None:
    fresh(tmp_path)[0].close()
    target = tmp_path / "elsewhere"
    target.write_text("")
    path = Path(state(tmp_path)) / name
    path.unlink(missing_ok=True)
    os.symlink(target, path)
    with pytest.raises(OverlayStoreError, match="a symbolic link is refused"):
        reload(tmp_path)


@pytest.mark.parametrize("name", [LOG, SNAPSHOT])
def test_writable_files_are_refused_and_readable_ones_tightened(tmp_path: Path,
                                                                name: str) -> None:
    store, ov = fresh(tmp_path)
    store.compact(ov)
    store.close()
    path = Path(state(tmp_path)) / name
    os.chmod(path, 0o664)
    with pytest.raises(OverlayStoreError, match="group or world writable"):
        reload(tmp_path)
    os.chmod(path, 0o644)
    reload(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_directory_in_place_of_the_journal_is_refused(tmp_path: Path) -> None:
    os.makedirs(Path(state(tmp_path)) / LOG)
    os.chmod(state(tmp_path), 0o700)
    with pytest.raises(OverlayStoreError, match=LOG):
        fresh(tmp_path)


# -- group commit -----------------------------------------------------------------------------


def test_concurrent_appends_share_fsyncs(tmp_path: Path) -> None:
    store, ov = fresh(tmp_path)

    async def main() -> int:
        before = store.fsyncs
        done: list[str] = []

        async def one(i: int) -> None:
            await store.append_async(add(ov, f"b{i}"))
            done.append(f"b{i}")

        await asyncio.gather(*(one(i) for i in range(200)))
        assert len(done) == 200
        return store.fsyncs - before

    fsyncs = asyncio.run(main())
    assert 1 <= fsyncs <= 5
    _, back = reload(tmp_path)
    same(back, ov)


def test_groups_form_while_the_disk_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Callers arriving while an fsync runs go together in the next one."""
    store, ov = fresh(tmp_path)
    real_fsync = os.fsync
    gate = threading.Event()

    def slow_fsync(fd: int) -> None:
        gate.wait(5)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)

    async def main() -> None:
        first = asyncio.ensure_future(store.append_async(add(ov, "first")))
        await asyncio.sleep(0.05)  # the first group is in its fsync
        later = [asyncio.ensure_future(store.append_async(add(ov, f"b{i}"))) for i in range(50)]
        await asyncio.sleep(0.05)
        assert not first.done() and not any(f.done() for f in later)
        gate.set()
        await asyncio.gather(first, *later)

    before = store.fsyncs
    asyncio.run(main())
    assert store.fsyncs - before == 2
    assert store.log_lines == 51


def test_compact_async_keeps_order_with_queued_appends(tmp_path: Path) -> None:
    store, ov = fresh(tmp_path)

    async def main() -> None:
        tasks = [asyncio.ensure_future(store.append_async(add(ov, f"a{i}"))) for i in range(20)]
        tasks.append(asyncio.ensure_future(store.compact_async(ov)))
        await asyncio.sleep(0)  # every task above has queued its job; the overlay is copied
        tasks += [asyncio.ensure_future(store.append_async(add(ov, f"c{i}"))) for i in range(20)]
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert store.log_lines == 20  # the appends queued after the compaction
    doc = json.loads(snap_path(tmp_path).read_text())
    assert len(doc["entries"]) == 20
    _, back = reload(tmp_path)
    same(back, ov)


def test_append_async_errors_reach_every_caller(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store, ov = fresh(tmp_path)

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)

    async def main() -> list[BaseException | None]:
        return await asyncio.gather(*(store.append_async(add(ov, f"b{i}")) for i in range(5)),
                                    return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, OverlayStoreError) and "Input/output" in str(r) for r in results)
    monkeypatch.undo()
    assert log_path(tmp_path).stat().st_size == 0  # cut off again
    store.append(add(ov, "ok"))


def test_a_cancelled_caller_does_not_cancel_the_write(tmp_path: Path) -> None:
    store, ov = fresh(tmp_path)

    async def main() -> None:
        t = asyncio.ensure_future(store.append_async(add(ov, "x")))
        await asyncio.sleep(0)
        t.cancel()
        await store.append_async(add(ov, "y"))

    asyncio.run(main())
    _, back = reload(tmp_path)
    assert {("web", "x"), ("web", "y")} <= set(back.entries)


def test_retired_records_are_encoded_as_retire_lines() -> None:
    line = encode([Retired("web", "x", (3, "lb-a"))])
    crc, body = line.rstrip(b"\n").split(b" ", 1)
    assert int(crc, 16) == zlib.crc32(body)
    assert json.loads(body) == {"t": "retire", "v": 1, "pool": "web", "backend": "x",
                                "stamp": [3, "lb-a"]}


def test_loading_again_starts_the_counts_over(tmp_path: Path) -> None:
    store, ov = fresh(tmp_path)
    history(store, ov)
    again = store.load()
    same(again, ov)
    assert store.log_lines == 7 and store.log_bytes == log_path(tmp_path).stat().st_size
    store.append(add(again, "more"))
    assert store.log_lines == 8
