"""The rooms renovation (issue 14) kept behaviour: edges an outside review found, each of which
failed on the first version (role-change log spelling the rigs match, the demo's cleanup
of a kept loopback run, the demo's exec path, the admin CLI's --token-file from a pipe)."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lb import cli

# -- the failover process's role-change line is spelled as the pair rig looks for it ----------


def test_failover_role_change_log_still_matches_pair_rig_needle(
        caplog: pytest.LogCaptureFixture) -> None:
    from test_failover_pair import FakeNet, World, pair, run_virtual, stop_all

    async def scenario() -> None:
        world, net = World(), FakeNet()
        a, b = await pair(world, net)
        await asyncio.sleep(1.0)
        await stop_all(a, b)

    with caplog.at_level(logging.INFO, logger="failover.controller"):
        run_virtual(scenario)
    lines = [r.getMessage() for r in caplog.records if "failover_role_changed" in r.getMessage()]
    assert lines, "no role change logged"
    # lab/pair_rig.py (kill9_failover_process, failover_hung): rig.log_time(..., NEEDLE)
    assert any("from=INIT to=BACKUP" in line for line in lines), lines
    rig = (Path(__file__).parents[1] / "lab" / "pair_rig.py").read_text()
    assert '"from=INIT to=BACKUP"' in rig


# -- pairlb demo --cleanup stops a kept loopback demo's backends and load -------------------


@pytest.mark.parametrize(("name", "argv"), [("web1", ["-m", "lab.pair", "backend", "web1"]),
                                            ("load", ["-m", "lab.load", "127.0.0.1:1"])])
def test_demo_cleanup_stops_kept_loopback_processes(
        name: str, argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lab import demo

    # Same command line shape as LoopbackDemo.start_backend / the load it spawns.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv])
    try:
        time.sleep(0.2)
        state = {"mode": "loopback", "kept": True, "workdir": str(tmp_path / "x"),
                 "pids": {name: proc.pid}, "pid": os.getpid()}
        monkeypatch.setattr(demo.demo_net, "kept_runs", lambda tmp=None: [state])
        out = io.StringIO()
        demo.cleanup(out)
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pytest.fail(f"--cleanup left {argv} running: {out.getvalue()!r}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- pairlb demo execs `python -P -m lab.demo`: never code from the working directory --------


def test_demo_exec_does_not_import_from_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_execv(path: str, argv: list[str]) -> None:
        seen.append(argv)
        raise SystemExit(0)

    monkeypatch.setattr(os, "execv", fake_execv)
    with pytest.raises(SystemExit):
        cli.main(["demo", "--duration", "5"])
    argv = seen[0]
    flags = argv[1:argv.index("-m")]  # interpreter options cmd_demo passes
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "__init__.py").write_text("")
    probe = subprocess.run([argv[0], *flags, "-c", "import lab; print(lab.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert not probe.stdout.startswith(str(tmp_path)), (
        f"`pairlb demo` run from {tmp_path} would import {probe.stdout.strip()}")


# -- the admin CLI reads --token-file as given: a pipe (process substitution) works ----------


def test_cli_token_file_from_a_pipe_is_still_read() -> None:
    import argparse

    from lb.admin import client

    r, w = os.pipe()
    os.write(w, b"s3cret\n")
    os.close(w)
    try:
        args = argparse.Namespace(config=None, admin="http://127.0.0.1:1",
                                  token_file=f"/dev/fd/{r}")
        try:
            _, token = client.resolve(args)
        except client.ClientError as exc:
            pytest.fail(f"--token-file <(...) must work: {exc}")
        assert token == "s3cret"
    finally:
        os.close(r)
