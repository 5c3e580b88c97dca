"""Notify scripts get only what docs/configuration.md promises (issue 13).

A real HookRunner runs a real script that copies its own /proc/PID/status and its initial
environment (/proc/PID/environ) to files. The runner's environment is full of things a
script must not see (NOTIFY_SOCKET, CREDENTIALS_DIRECTORY, a made-up secret); the script
sees only PATH, the PAIRLB_* variables and RUNTIME_DIRECTORY, and has no_new_privs.

The capability case is what the systemd unit does: the process that runs the scripts holds
CAP_NET_ADMIN, CAP_NET_RAW and CAP_NET_BIND_SERVICE as ambient capabilities. As root the
test builds that with setpriv (securebits noroot, so uid 0 gets no capability by being
root, only the ambient ones) and checks the script starts with all five sets empty.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from failover.adapters.hooks import HOOK_PATH, HookRunner

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """#!/bin/sh
cat /proc/$$/status > "{out}.status"
tr '\\000' '\\n' < /proc/$$/environ > "{out}.env"
"""

RUNNER = """
import asyncio, sys
from failover.adapters.hooks import HookRunner

async def main() -> None:
    runner = HookRunner([sys.argv[1]], node="lb1", timeout_s=5.0)
    task = asyncio.create_task(runner.run())
    runner.notify("backup", "master", "no master heard")
    assert await runner.drain(10.0)
    task.cancel()
    r = runner.recent[-1]
    assert r.ok, r

with open("/proc/self/status") as f:
    print([line.split()[1] for line in f if line.startswith(("CapEff", "CapAmb"))])
asyncio.run(main())
"""


def _script(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "seen"
    script = tmp_path / "hook.sh"
    script.write_text(SCRIPT.format(out=out))
    script.chmod(stat.S_IRWXU)
    return script, out


def _status(out: Path) -> dict[str, str]:
    lines = Path(f"{out}.status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _env(out: Path) -> dict[str, str]:
    lines = Path(f"{out}.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def test_scripts_get_a_clean_environment_and_no_new_privileges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script, out = _script(tmp_path)
    for k, v in {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "10000000",
                 "CREDENTIALS_DIRECTORY": "/run/credentials/pairlb.service",
                 "PAIRLB_SECRET": "do-not-leak", "RUNTIME_DIRECTORY": "/run/pairlb",
                 "PATH": "/opt/evil/bin:/usr/bin"}.items():
        monkeypatch.setenv(k, v)

    async def scenario() -> None:
        runner = HookRunner([str(script)], node="lb1", timeout_s=5.0)
        task = asyncio.create_task(runner.run())
        runner.notify("backup", "master", "no master heard")
        assert await runner.drain(10.0)
        task.cancel()
        assert runner.recent[-1].ok, runner.recent[-1]

    asyncio.run(scenario())
    assert _env(out) == {
        "PATH": HOOK_PATH,
        "RUNTIME_DIRECTORY": "/run/pairlb",
        "PAIRLB_ROLE_FROM": "backup",
        "PAIRLB_ROLE_TO": "master",
        "PAIRLB_NODE": "lb1",
        "PAIRLB_REASON": "no master heard",
    }
    st = _status(out)
    assert st["NoNewPrivs"] == "1"
    assert int(st["CapInh"], 16) == int(st["CapAmb"], 16) == 0
    if os.geteuid() != 0:
        assert int(st["CapEff"], 16) == int(st["CapPrm"], 16) == 0


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux's setpriv")
def test_scripts_start_through_setpriv_without_a_python_preexec_fn() -> None:
    """A preexec_fn forces a real fork of the failover process (7-8 ms of its loop per
    script, an outside review); setpriv drops the privileges instead, so the child is
    vforked. The two tests above check what the script gets either way."""
    runner = HookRunner(["/bin/true"], node="lb1")
    assert runner._setpriv is not None and runner._preexec is None


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to give a process ambient capabilities")
def test_scripts_do_not_inherit_the_ambient_capabilities_of_the_service(tmp_path: Path) -> None:
    script, out = _script(tmp_path)
    caps = "+net_admin,+net_raw,+net_bind_service"
    res = subprocess.run(
        ["setpriv", "--securebits", "+noroot,+noroot_locked,+no_setuid_fixup",
         "--inh-caps", f"-all,{caps}", "--ambient-caps", f"-all,{caps}", "--",
         sys.executable, "-c", RUNNER, str(script)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    # The runner holds exactly the unit's three (the setup works) ...
    assert res.stdout.strip() == "['0000000000003400', '0000000000003400']", res.stdout
    # ... and the script none.
    st = _status(out)
    for name in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert int(st[name], 16) == 0, (name, st[name])
    assert st["NoNewPrivs"] == "1"
