"""lb.sysutil: privilege drops and OOM ranking, each in a fresh process (a drop is for good).

Each case runs a small Python program in a subprocess that calls lb.sysutil and then execs
``sh`` to print what a program it runs would hold: the drop must survive an exec and give
nothing back through it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lb import sysutil

ROOT = Path(__file__).resolve().parents[1]
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="drops from root need root")

PROGRAM = """
import os, sys
from lb import sysutil
target = sysutil.worker_identity({user!r}, None) if {switch} else None
st = sysutil.drop_privileges(target, {keep}, keep_ambient={ambient})
print("SELF", st.summary(), flush=True)
os.execv("/bin/sh", ["sh", "-c", "grep -E '^(Uid|Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs):' "
                     "/proc/self/status"])
"""


def _may_drop_bounding() -> bool:
    """Only with CAP_SETPCAP (root outside a container that took it away)."""
    return bool(sysutil.read_proc_status().cap_eff & (1 << sysutil.CAP_SETPCAP))


def _run(user: str = "nobody", switch: bool = True, keep: str = "()", ambient: bool = False
         ) -> tuple[str, dict[str, str]]:
    code = PROGRAM.format(user=user, switch=switch, keep=keep, ambient=ambient)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    child = {k: v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return lines[0], child


@root_only
def test_a_worker_drop_leaves_nothing_even_across_exec() -> None:
    me, child = _run()
    assert "cap_eff=0 cap_prm=0 cap_inh=0 cap_amb=0" in me, me
    assert child["Uid"].split() == ["65534"] * 4
    for k in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(child[k], 16) == 0, (k, child[k])
    if _may_drop_bounding():
        assert "cap_bnd=0 " in me and int(child["CapBnd"], 16) == 0
    assert child["NoNewPrivs"] == "1"


@root_only
def test_a_process_can_keep_exactly_the_capabilities_it_needs_for_the_programs_it_runs(
) -> None:
    """What the failover process would do: CAP_NET_ADMIN and CAP_NET_RAW, also for nft/ip,
    nothing else (not even CAP_NET_BIND_SERVICE), as nobody."""
    keep = "{sysutil.CAP_NET_ADMIN, sysutil.CAP_NET_RAW}"
    me, child = _run(keep=keep, ambient=True)
    assert "cap_eff=3000 cap_prm=3000 cap_inh=3000 cap_amb=3000" in me, me
    assert child["Uid"].split() == ["65534"] * 4
    for k in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(child[k], 16) == (1 << 12) | (1 << 13), (k, child[k])
    if _may_drop_bounding():
        assert int(child["CapBnd"], 16) == (1 << 12) | (1 << 13), child["CapBnd"]


def test_without_a_switch_the_user_stays_and_the_capabilities_go() -> None:
    me, child = _run(switch=False)
    assert f"uid={os.geteuid()}" in me
    assert "cap_eff=0 cap_prm=0 cap_inh=0 cap_amb=0" in me
    assert child["NoNewPrivs"] == "1"
    assert int(child["CapEff"], 16) == 0  # not even root gets them back at exec


@root_only
@pytest.mark.parametrize(
    ("user", "group", "message"),
    [
        ("root", None, "node.worker_user: 'root' is root (uid 0)"),
        ("0", None, "node.worker_user: 'root' is root (uid 0)"),
        ("plb-no-such-user", None, "node.worker_user: no such user 'plb-no-such-user'"),
        ("nobody", "plb-no-such-group", "node.worker_group: no such group 'plb-no-such-group'"),
        ("nobody", "root", "node.worker_group: the workers must not run with group 0"),
    ],
)
def test_worker_identity_refuses_root_and_unknown_names(user: str, group: str | None,
                                                        message: str) -> None:
    with pytest.raises(sysutil.PrivilegeError) as ei:
        sysutil.worker_identity(user, group)
    assert str(ei.value).startswith(message)


@root_only
def test_worker_identity_defaults_to_nobody_and_its_group() -> None:
    import grp
    import pwd

    ident = sysutil.worker_identity(None, None)
    nobody = pwd.getpwnam("nobody")
    assert (ident.uid, ident.gid, ident.user, ident.switch) == (
        nobody.pw_uid, nobody.pw_gid, "nobody", True)
    assert ident.group == grp.getgrgid(nobody.pw_gid).gr_name


def test_worker_oom_score_adj_keeps_a_gap_of_1000() -> None:
    assert sysutil.worker_oom_score_adj(-500) == 500
    assert sysutil.worker_oom_score_adj(0) == 1000
    assert sysutil.worker_oom_score_adj(-1000) == 0
    assert sysutil.worker_oom_score_adj(300) == 1000
