"""``pairlb demo`` as a user runs it (issue 8): the namespace story with root, the loopback
version without, Ctrl-C, --keep and --cleanup; and the view and summary rendering. The
namespace story serves HTTPS too (issue 15): a client resumes its TLS session through the
failover with no error; its certificates are made with the openssl CLI at start.

The root tests run the real command (``python -m lb demo``) with stdout on a pipe, so the
view degrades to one plain line per second; the summary is parsed from that output. Each
checks that nothing is left behind: the run's namespaces (the prefix the demo prints) and
its processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lab import cluster as demo_net
from lab import demo, netns
from lab.load import Record

ROOT = Path(__file__).resolve().parents[1]
NS_EVENTS = [
    "backend web3 killed (kill -9)",
    "backend web3 restarted",
    "backend web2 drained",
    "backend web2 enabled again",
    "backends scaled up: web4 and web5 added on the standby lb2",
    "active load balancer lb1 killed (kill -9)",
    "lb1 brought back",
    "backends scaled down: web4 and web5 removed on",
    "planned switchover lb1 -> lb2",
]
LOOPBACK_EVENTS = NS_EVENTS[:4]
needs_netns = pytest.mark.skipif(netns.skip_reason() is not None,
                                 reason=netns.skip_reason() or "")


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "TERM": "dumb"}


def summary_rows(out: str) -> dict[str, str]:
    """event label (prefix) -> its summary line, from the table after 'summary:'."""
    part = out.split("\nsummary", 1)
    assert len(part) == 2, out[-3000:]
    rows = {}
    for line in part[1].splitlines()[3:]:
        if line.startswith("  ") and line.strip():
            rows[line.strip()] = line
    return rows


def row_for(rows: dict[str, str], event: str) -> str:
    found = [line for key, line in rows.items() if key.startswith(event)]
    assert found, f"no summary row for {event!r} in:\n" + "\n".join(rows)
    return found[0]


def prefix_of(out: str) -> str:
    m = re.search(r"namespaces (plb[0-9a-f]+)-\*", out)
    assert m, out[:2000]
    return m.group(1)


# -- pure rendering ------------------------------------------------------------------------------


def frame(**kw: object) -> demo.Frame:
    base: dict[str, object] = dict(
        elapsed_s=12.0, duration_s=60.0, ok_rps=97, failed_rps=3, total=1200, failed_total=5,
        target="192.0.2.100:8080", holder="lb2 (stale copy on lb1)",
        nodes=[("lb1", "down (killed)"), ("lb2", "MASTER")],
        backends=[demo.BackendView("web1", "up", 50), demo.BackendView("web2", "draining", 0)],
        step="killing the active load balancer")
    base.update(kw)
    return demo.Frame(**base)  # type: ignore[arg-type]


def test_live_view_lines_fit_the_terminal_and_plain_lines_carry_the_state() -> None:
    lines = demo.render(frame(), ansi=True, width=40)
    assert len(lines) == 4
    for line in lines:
        visible = re.sub(r"\x1b\[[0-9;]*m", "", line)
        assert len(visible) <= 40
    plain = demo.render(frame(), ansi=False, width=200)
    assert not any("\x1b" in line for line in plain)
    assert "held by lb2 (stale copy on lb1)" in plain[2] and "3 failed" in plain[1]
    line = demo.plain_line(frame())
    assert "vip=lb2 " in line and "lb1=down_(killed)" in line and "web2=draining" in line
    assert "https" not in line and "HTTPS" not in plain[1]
    # With the HTTPS client: its rate on the requests line, still four lines that fit.
    https = frame(https_ok=4, https_resumed=4, https_failed=1)
    lines = demo.render(https, ansi=True, width=60)
    assert len(lines) == 4
    assert all(len(re.sub(r"\x1b\[[0-9;]*m", "", line)) <= 60 for line in lines)
    wide = demo.render(https, ansi=False, width=300)
    assert wide[1].endswith("HTTPS 4 ok, 4 resumed, 1 failed"), wide[1]
    line = demo.plain_line(https)
    assert "https_ok/s=4 https_failed/s=1 vip=lb2 lb1=down_(killed)" in line, line


def test_summary_counts_each_events_failures_and_longest_gap() -> None:
    def r(t0: float, ok: bool = True) -> Record:
        return Record(t0, t0 + 0.002, "GET", f"r{t0}", 200 if ok else 0, "web1", "x", "new",
                      False, "-" if ok else "refused")

    records = [r(t / 100) for t in range(0, 500)]
    records = [x for x in records if not 2.0 <= x.t0 < 2.2] + [r(2.05, ok=False)]
    rows = demo.summarize([demo.Event("kill", 2.0), demo.Event("back", 3.0)], records, 0.0, 5.0)
    assert [row.event for row in rows] == ["steady load, no fault yet", "kill", "back"]
    assert rows[0].failed == 0 and rows[0].outage_text == "none"
    assert rows[1].failed == 1 and rows[1].errors == "refused 1"
    assert rows[1].outage_s == pytest.approx(0.21, abs=0.011)
    text = "\n".join(demo.render_summary(rows))
    assert "0.21" in text and "refused 1" in text


def test_demo_certificates_are_made_with_openssl_or_skipped_in_one_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    tls = demo_net.make_demo_tls(tmp_path / "tls", ["192.0.2.100"])
    assert tls.name == "demo.pairlb.test" and tls.port == 8443
    assert tls.key.stat().st_mode & 0o777 == 0o600
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tls.cert, tls.key)  # the chain and its key match
    client = ssl.create_default_context(cafile=str(tls.ca))
    # A handshake in memory: the client trusts the demo CA and the name and the VIP verify.
    for name in ("demo.pairlb.test", "192.0.2.100"):
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        cobj = client.wrap_bio(c_in, c_out, server_hostname=name)
        sobj = server.wrap_bio(s_in, s_out, server_side=True)
        for _ in range(10):
            for obj in (cobj, sobj):
                with contextlib.suppress(ssl.SSLWantReadError):
                    obj.do_handshake()
            s_in.write(c_out.read())
            c_in.write(s_out.read())
        assert cobj.version() and cobj.getpeercert()["subject"] == (
            (("commonName", "demo.pairlb.test"),),), name
    # Without the openssl command: one reason, for the demo's one line.
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(demo_net.DemoTlsUnavailable, match="openssl command is not installed"):
        demo_net.make_demo_tls(tmp_path / "none", ["192.0.2.100"])


# -- with namespaces ----------------------------------------------------------------------------


@needs_netns
@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(150)
def test_namespace_demo_plays_every_event_then_keep_and_cleanup() -> None:
    """The whole story, with --keep (one demo run for both: the suite's time): what a user
    sees in the summary; then it is still running with working admin and VIP URLs, and
    --cleanup removes it (normal teardown: test_ctrl_c_tears_everything_down and the
    loopback story)."""
    proc = subprocess.run([sys.executable, "-m", "lb", "demo", "--duration", "20", "--keep"],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=140)
    out = proc.stdout + proc.stderr
    prefix = prefix_of(out)
    try:
        assert "Traceback" not in out, out[-4000:]
        assert proc.returncode == 0, out[-4000:]
        assert out.startswith("pairlb demo: a 20 s story")
        rows = summary_rows(out)
        for event in NS_EVENTS:
            row_for(rows, event)
        # What a user should see: the backend faults and the drain cost nothing (but a POST
        # in flight on a killed backend, which is never resent); killing the active node
        # costs a short outage, the switchover nothing.
        for event in NS_EVENTS[:4]:
            row = row_for(rows, event)
            m = re.search(r"\snone\s+(\d+)\s", row)
            assert m, row
            assert m.group(1) == "0" or f"POST {m.group(1)} (never resent)" in row, row
        assert "got no new request after the drain" in row_for(rows, "backend web2 drained")
        kill = row_for(rows, "active load balancer lb1 killed")
        assert re.search(r"\s0\.\d{3} s\s+\d+\s", kill) and "lb2 answered" in kill, kill
        assert re.search(r"\snone\s+0\s", row_for(rows, "planned switchover")), out[-3000:]
        # Scaling up (on the standby) and down (drained) under load cost nothing either.
        up = row_for(rows, "backends scaled up")
        assert re.search(r"\snone\s+0\s", up) and "served" in up and "through lb1" in up, up
        down = row_for(rows, "backends scaled down")
        assert re.search(r"\snone\s+0\s", down) and "none failed" in down, down
        # The live view (plain lines on a pipe) showed the VIP move.
        assert re.search(r"vip=lb2 lb1=down_\(killed\) lb2=MASTER", out)
        # HTTPS through all of it: certificates made at start, not one failed request or
        # certificate error, every session after the first resumed, across the kill too.
        if shutil.which("openssl") is None:
            assert "HTTPS: skipped (the openssl command is not installed)" in out, out[:3000]
            return
        assert "HTTPS: a CA and a certificate for demo.pairlb.test made with openssl" in out
        m = re.search(r"^HTTPS: (\d+) requests to https://demo\.pairlb\.test:8443/, (\d+) "
                      r"failed, (\d+) certificate errors, (\d+) resumed", out, re.M)
        assert m, out[-3000:]
        requests, failed, cert_errors, resumed = map(int, m.groups())
        assert (failed, cert_errors) == (0, 0), m.group(0)
        assert requests >= 20 * 4 * 0.5 and resumed == requests - 1, m.group(0)
        assert re.search(r"^  lb1 killed: lb2 answered HTTPS \d+ ms later and resumed the TLS "
                         r"session lb1 had issued", out, re.M), out[-3000:]
        assert re.search(r"HTTPS through the failover: lb2 answered \d+ ms after the kill, "
                         r"resumed the client's TLS session", out), out[-5000:]
        assert re.search(r"\(HTTPS \d+ ms, session resumed\)", kill), kill
        assert re.search(r"https_ok/s=[1-9]", out)
        check_kept_then_cleanup(out, prefix)
    finally:
        for state in demo_net.kept_runs():
            if state.get("prefix") == prefix:
                demo_net.cleanup_run(state)
        netns.cleanup(prefix)


def check_kept_then_cleanup(out: str, prefix: str) -> None:
    """--keep left it running with admin and VIP URLs that answer; --cleanup removes it."""
    assert "pairlb demo --cleanup" in out and f"ip netns exec {prefix}-lb1" in out
    assert netns.list_namespaces(prefix + "-"), "nothing left running with --keep"
    url = re.search(r"admin lb1\s+(http://127\.0\.0\.1:\d+/)", out)
    vip = re.search(r"the VIP\s+(http://127\.0\.0\.1:\d+/)", out)
    assert url and vip, out[-2000:]

    def get(u: str) -> tuple[int, bytes]:
        deadline = time.monotonic() + 10
        while True:
            try:
                with urllib.request.urlopen(u, timeout=2) as resp:
                    return resp.status, resp.read()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    status, body = get(url.group(1) + "status")
    assert status == 200 and json.loads(body)["node"] == "lb1"
    status, body = get(vip.group(1))
    assert status == 200 and body.startswith(b"hello from web")
    clean = subprocess.run([sys.executable, "-m", "lb", "demo", "--cleanup"], cwd=ROOT,
                           env=env(), capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert f"removed namespace {prefix}-lb1" in clean.stdout
    assert "stopped forwarder" in clean.stdout
    assert netns.list_namespaces(prefix + "-") == []
    again = subprocess.run([sys.executable, "-m", "lb", "demo", "--cleanup"], cwd=ROOT,
                           env=env(), capture_output=True, text=True, timeout=60)
    assert prefix not in again.stdout


@needs_netns
@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_ctrl_c_tears_everything_down() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "lb", "demo", "--duration", "60"], cwd=ROOT,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    out = ""
    prefix = None
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            out += line
            if prefix is None and "namespaces plb" in line:
                prefix = prefix_of(line)
            if line.startswith("t="):  # the first live line: the story is under way
                break
        assert prefix is not None, out
        os.kill(proc.pid, signal.SIGINT)  # what Ctrl-C sends to the foreground process
        rest, _ = proc.communicate(timeout=30)
        out += rest
        assert proc.returncode == 130, out[-3000:]
        assert "interrupted: tearing everything down" in out
        assert "Traceback" not in out, out[-3000:]
        assert "summary so far" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if prefix:
            left = netns.list_namespaces(prefix + "-")
            netns.cleanup(prefix)
            assert left == [], f"Ctrl-C left {left}"


# -- without root ------------------------------------------------------------------------------


def unprivileged_python() -> tuple[list[str], dict[str, str]] | None:
    """A command prefix that runs Python as `nobody` with our packages importable, or None.

    The venv interpreter may live where nobody may not go (a pyenv under /root); then the
    system Python of the same minor version with the venv's site-packages on the path."""
    if os.geteuid() != 0:
        return None
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    if shutil.which("setpriv") is None:
        if shutil.which("runuser") is None:
            return None
        drop = ["runuser", "-u", "nobody", "--"]
    site = [p for p in sys.path if p.endswith("site-packages")]
    e = {**env(), "PYTHONPATH": os.pathsep.join([str(ROOT), *site])}
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for py in (sys.executable, f"/usr/bin/{minor}", f"/usr/local/bin/{minor}"):
        probe = [*drop, py, "-c",
                 "import subprocess, sys, aiohttp, lb; "
                 "sys.exit(subprocess.run([sys.executable, '-c', 'pass']).returncode)"]
        try:
            ok = subprocess.run(probe, env=e, capture_output=True, timeout=30, cwd="/")
        except (OSError, subprocess.TimeoutExpired):
            continue
        if ok.returncode == 0:
            return [*drop, py], e
    return None


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_without_root_one_line_then_the_loopback_story() -> None:
    if os.geteuid() != 0:
        cmd, e = [sys.executable], env()  # we are unprivileged already
    else:
        found = unprivileged_python()
        if found is None:
            pytest.skip("no way to run Python as an unprivileged user here "
                        "(setpriv/runuser, or an interpreter nobody may execute)")
        cmd, e = found
    proc = subprocess.run([*cmd, "-m", "lb", "demo", "--duration", "15"], cwd="/", env=e,
                          capture_output=True, text=True, timeout=110)
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out[-4000:]
    assert proc.returncode == 0, out[-4000:]
    first = out.splitlines()[0]
    assert "network namespaces need root (CAP_NET_ADMIN)" in first
    assert "running the loopback version" in first
    rows = summary_rows(out)
    for event in LOOPBACK_EVENTS:  # the same promise as the namespace story's
        row = row_for(rows, event)
        m = re.search(r"\snone\s+(\d+)\s", row)
        assert m, row
        assert m.group(1) == "0" or f"POST {m.group(1)} (never resent)" in row, row
    assert "got no new request after the drain" in row_for(rows, "backend web2 drained")
