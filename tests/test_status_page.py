"""GET / : the status page for people, checked as HTML and rendered in headless Chromium.

The rendered test runs a real control process in this event loop (``Daemon.startup()``:
real workers, real health checks against real backends) with a failover controller stand-in
reporting MASTER with one peer, puts one backend in each interesting state (up, draining,
maintenance, down), and saves Chromium's screenshot to tests/artifacts/status-page.png.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import struct
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from admin_helpers import (
    ARTIFACTS,
    LOOPBACK,
    Backends,
    FakeFailover,
    attach_fake_failover,
    config_text,
    free_port,
    in_process_daemon,
    serve,
)

from lb.admin import server as admin
from lb.config import loads
from lb.control import daemon as daemon_mod
from lb.control.rotation import AdminState

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def get_page(url: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as s, s.get(url + "/") as r:
        return r.status, r.headers["Content-Type"], await r.text()


def test_page_shows_role_peers_backends_transitions_and_escapes(tmp_path: Path) -> None:
    text = config_text(listen_port=free_port(), admin_port=free_port(),
                       backends=[("b1", 1), ("b2", 2), ("b3", 3)])

    async def body() -> None:
        d = in_process_daemon(text)
        async with serve(admin.make_app(d)) as url:
            status, ctype, page = await get_page(url)
            assert status == 200 and ctype.startswith("text/html")
            assert "STANDALONE" in page and "No <code>[failover]</code> section" in page
            attach_fake_failover(d, FakeFailover(role="MASTER", match=False))
            d.set_admin_state("web", "b2", AdminState.DRAINING)
            d.events.append({"at": 1.0, "kind": "health", "text": "web/b1 <script>x</script>"})
            _, _, page = await get_page(url)
        assert re.search(r'<span class="role big"[^>]*>MASTER</span>', page)
        assert ">lb2<" in page and "10.0.0.2:5405" in page and "MISMATCH" in page
        for b in ("b1", "b2", "b3"):
            assert f"<b>{b}</b>" in page
        assert '<span class="pill amber">draining</span>' in page
        assert '<span class="pill red">down</span>' in page  # no check has passed yet
        assert "web/b2 -&gt; draining" in page
        assert "&lt;script&gt;" in page and "<script" not in page
        # Refreshes itself; no external assets, no scripts.
        assert f'http-equiv="refresh" content="{admin.REFRESH_S}"' in page
        assert not re.search(r"<(script|link|img|iframe)\b", page)
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)

    asyncio.run(body())


def png_info(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, decompressed scanlines) of a PNG, with the stdlib only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return width, height, zlib.decompress(idat)


async def wait_for(pred: Any, timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def chromium(*args: str, timeout_s: float = 45) -> tuple[int, bytes, bytes]:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--hide-scrollbars", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed")
@pytest.mark.timeout(90)
def test_status_page_in_headless_chromium(tmp_path: Path) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    admin_port = free_port()
    with Backends(["web1", "web2", "web3", "web4"]) as be:
        text = config_text(listen_port=free_port(), admin_port=admin_port,
                           backends=be.members, workers=2)

        async def body() -> tuple[str, str]:
            d = daemon_mod.Daemon(loads(text), None)
            try:
                await d.startup()
                pool = lambda: d.status_json()["pools"][0]  # noqa: E731
                await wait_for(lambda: pool()["usable"] == 4, 10, "4 healthy backends")
                fake = FakeFailover(role="MASTER")
                attach_fake_failover(d, fake)
                d.events.append({"at": fake.view().status.role_since, "kind": "role",
                                 "text": "BACKUP -> MASTER (peer lb2 stopped answering)"})
                listen = d.cfg.listener[0].bind
                async with aiohttp.ClientSession() as s:
                    for _ in range(40):
                        async with s.get(f"http://{listen}/") as r:
                            assert r.status == 200
                d.set_admin_state("web", "web2", AdminState.DRAINING)
                d.set_admin_state("web", "web3", AdminState.MAINTENANCE)
                be.procs["web4"].kill()  # a crash: checks take it DOWN
                await wait_for(lambda: pool()["backends"][3]["health"] == "down", 10, "web4 down")
                url = f"http://{LOOPBACK}:{admin_port}/"
                _, _, page = await get_page(url.rstrip("/"))
                profile = tmp_path / "profile"
                rc, _, err = await chromium(
                    f"--user-data-dir={profile}", f"--screenshot={shot}",
                    "--window-size=1200,900", url,
                )
                assert rc == 0, err.decode(errors="replace")[-2000:]
                rc, dom, err = await chromium(f"--user-data-dir={profile}2", "--dump-dom", url)
                assert rc == 0, err.decode(errors="replace")[-2000:]
                return page, dom.decode()
            finally:
                await d.shutdown(1.0)

        page, dom = asyncio.run(body())

    for html in (page, dom):  # what we served, and what Chromium built from it
        assert "MASTER" in html and "lb2" in html
        for name in ("web1", "web2", "web3", "web4"):
            assert f"<b>{name}</b>" in html
        for state in ("up", "draining", "maintenance", "down"):
            assert re.search(rf'<span class="pill \w+">{state}', html), state
        assert "BACKUP -&gt; MASTER" in html and "web/web3 -&gt; maintenance" in html
    data = shot.read_bytes()
    width, height, pixels = png_info(data)
    assert (width, height) == (1200, 900)
    # Not a blank or error page: a real page has many distinct byte values and a few KB.
    assert len(data) > 30_000, len(data)
    assert len(set(pixels[:: 97])) > 100
    print(f"screenshot {shot} ({len(data)} bytes)")


def test_workers_show_whether_they_route_by_the_last_rotation() -> None:
    base = {"restarts": 0, "crashes": 0, "hung_kills": 0, "uptime_s": 5.0, "ready": True,
            "alive": True, "crash_loop": False, "rotation_lag_s": 0.0}
    html_ = admin._workers_section(
        [{**base, "index": 0, "pid": 11},
         {**base, "index": 1, "pid": 12, "rotation_lag_s": 0.5},
         {**base, "index": 2, "pid": 13, "rotation_lag_s": 3.25},
         {**base, "index": 3, "pid": 14, "ready": False, "alive": False, "rotation_lag_s": 0}],
        [{"index": 1, "pid": 9, "rotation_version": 4, "rotation_lag_s": 0.0}])
    rows = re.findall(r"<tr>(.*?)</tr>", html_)
    assert "<th>rotation</th>" in html_
    assert "current" in rows[1] and "pill" not in rows[1].split("</td>")[-2]
    assert '<span class="pill amber">0.50 s behind</span>' in rows[2]
    assert '<span class="pill red">3.25 s behind</span>' in rows[3]
    assert '<span class="pill amber">restarting</span>' in rows[4]  # no process in the slot
    assert '<span class="pill grey">retiring</span>' in rows[5] and ">9<" in rows[5]
