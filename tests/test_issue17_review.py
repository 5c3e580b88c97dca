"""Outside review of issue 17 (access logs, PROXY protocol, Maglev and sticky cookies), in
process: real ProxyServer / TcpProxyServer on 127.0.0.1 with a real AccessLog writing to
tmp_path, real backends, a real lb.control.hashing.HashTables, real in-process Daemons and
a real lb.data.worker.Worker (no processes: tests/test_issue17_review_e2e.py has those).

Each finding is a strict xfail whose reason states the bug (the suite stays green until it
is fixed, then the xfail turns into an XPASS failure and the marker goes). The other tests
document what held under attack.

Besides these tests, the review ran tests/test_proxy_http.py, test_proxy_bad_requests.py,
test_proxy_stream.py, test_hostile_http.py, test_hostile_http_hardening.py,
test_proxy_stall.py, test_proxy_tls.py, test_proxy_tcp.py, test_tcp_sni.py,
test_tcp_tls_backend.py, test_proxy_protocol_e2e.py, test_redirect_acme.py,
test_review_findings.py and test_fuzz_proxy_requests.py (291 tests) with every listener's
access log forced on (a pytest plugin giving each server a real AccessLog and checking every
record, every request logged exactly once): every test passed as with the log off; the
record checks found only the first two findings below.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from proxy_helpers import (
    CountingBackend,
    RawClient,
    aiohttp_backend,
    free_port,
    get,
    request,
    run,
    start_proxy,
    stop_proxy,
    wait_for,
)

from lb import maglev
from lb import worker_link as wl
from lb.config import ListenerConfig, LoggingConfig, PoolConfig
from lb.control import hashing as hashing_mod
from lb.data import proxyproto as pp
from lb.data import worker as worker_mod
from lb.data.accesslog import AccessLog
from lb.data.pool import BackendEntry, build_pool

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
ACCEPT = {"accept_proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"],
          "client_header_timeout_s": 0.5}
STRANGER = "127.0.0.3"
WS_UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


# -- helpers ------------------------------------------------------------------------------------


def attach_log(px: Any, path: Path) -> AccessLog:
    """A real access log on a running proxy (what the worker does with ``server.alog``)."""
    alog = AccessLog(str(path), flush_interval=0.01)
    px.server.alog = alog
    return alog


async def lines(alog: AccessLog, path: Path) -> list[dict[str, Any]]:
    """Every line so far (the log is closed: its writer thread ends)."""
    assert await alog.aclose(5.0)
    return read_json_lines(path)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def count_lines(paths: Any) -> int:
    return sum(len(f.read_bytes().splitlines()) for f in paths)


def reset(w: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), as a client that crashes or a NAT timeout does."""
    w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                          struct.pack("ii", 1, 0))
    w.transport.abort()


async def ws_backend() -> tuple[web.AppRunner, int]:
    async def ws(request: web.Request) -> web.WebSocketResponse:
        w = web.WebSocketResponse()
        await w.prepare(request)
        async for msg in w:
            await w.send_str("echo " + msg.data)
        return w

    app = web.Application()
    app.router.add_get("/ws", ws)
    return await aiohttp_backend(app)


def hook_builds(monkeypatch: pytest.MonkeyPatch, h: hashing_mod.HashTables,
                before: Any) -> None:
    """Run ``before(members)`` (in a thread: it may sleep or raise) ahead of each table
    build of ``h``, whether builds run in a thread (build_message) or in the helper process
    of a ``Builder`` (then built here instead, the same lb.maglev.build)."""
    real = hashing_mod.build_message

    def in_thread(pool: str, members: Any, size: int) -> wl.HashTable:
        before(members)
        return real(pool, members, size)

    monkeypatch.setattr(hashing_mod, "build_message", in_thread)
    builder = getattr(h, "builder", None)
    if builder is not None:
        async def build(members: Any, size: int) -> Any:
            await asyncio.to_thread(before, members)
            return maglev.build(members, size)

        monkeypatch.setattr(builder, "build", build)


def pool_cfg(name: str, backends: list[str], **kw: Any) -> PoolConfig:
    return PoolConfig.model_validate({
        "name": name, "balance": "maglev",
        "backends": [{"name": b, "address": f"127.0.0.1:{9000 + i}"}
                     for i, b in enumerate(backends)], **kw})


# == findings ===================================================================================


# Found by the review, fixed: proxy.py reject(): the _Request made for a refused request
# (400/408/413/414/431/501/505 by the parser, header_timeout, bad_redirect_host...) never gets
# t0, so _Client.log computes total = now - 0 = the loop's monotonic clock: its line says the
# request started near the machine's boot (time = wall clock - uptime) and total_ms is the
# uptime in ms; every 4xx refusal in the access log is misdated
def test_a_refused_request_is_logged_with_its_own_time_and_duration(tmp_path: Path) -> None:
    async def scenario() -> None:
        be = await CountingBackend("b1").start()
        px = await start_proxy([("b1", be.address)],
                               listener={"client_header_timeout_s": 0.3})
        path = tmp_path / "a.log"
        alog = attach_log(px, path)
        try:
            t0 = time.time()
            c = await RawClient.connect(px.port)
            await c.send(get("/ok") + b"GARBAGE\x01 / HTTP/1.1\r\n\r\n")  # 200, then a 400
            assert [r.status for r in await c.responses(2)] == [200, 400]
            await c.close()
            c = await RawClient.connect(px.port)
            await c.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n")  # head never ends: 408
            assert (await c.response()).status == 408
            await c.close()
            got = await lines(alog, path)
        finally:
            await stop_proxy(px)
            await be.stop()
        assert [g["status"] for g in got] == [200, 400, 408]
        for g in got:
            when = time.mktime(time.strptime(g["time"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
            assert abs(when - t0) < 60, g
            assert 0 <= g["total_ms"] < 60_000, g

    run(scenario())


# Found by the review, fixed: proxy.py: an upgraded (WebSocket) request is logged at
# start_tunnel (101, --) but stays in _Client.queue unfinished; when the client closes or
# resets the tunnel, _Client.connection_lost logs it again (status 0, CD, the tunnel's bytes):
# two lines per WebSocket (also on aiohttp's ordinary close,
# tests/test_proxy_http.py::test_websocket_through_proxy and test_proxy_tls.py's upgrade show
# it)
def test_a_websocket_is_logged_once_when_the_client_resets_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        runner, port = await ws_backend()
        px = await start_proxy([("b1", f"127.0.0.1:{port}")])
        path = tmp_path / "a.log"
        alog = attach_log(px, path)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.write(WS_UPGRADE + b"\r\n")
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101")
            await asyncio.sleep(0.05)
            reset(w)
            await wait_for(lambda: not px.server.clients, 5)
            got = await lines(alog, path)
        finally:
            await stop_proxy(px)
            await runner.cleanup()
        assert [(g["target"], g["status"], g["termination"]) for g in got] == [
            ("/ws", 101, "--")], got

    run(scenario())


_PIPE_WRITER = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {root!r})
    from lb.data import accesslog as A

    async def main():
        tag = sys.argv[1].encode()
        log = A.AccessLog("stdout", "json", flush_interval=0.01)
        for i in range(60):
            # a client's request line of 12 KB (max_request_line_bytes is 8 KiB by default,
            # up to 1 MiB; a User-Agent may be 32 KiB)
            log.write((1714564800.0, "192.0.2.1", 1, "web", "http", b"GET",
                       b"/" + tag * 12000, "HTTP/1.1", 200, 1, 1, "p", "b", 0, 0.0, 0.0,
                       0.0, 0.0, "--", b"%d" % i, b"ua", b""))
            if i % 10 == 0:
                await asyncio.sleep(0.01)
        assert await log.aclose(20)

    asyncio.run(main())
""")


# Found by the review, fixed: accesslog.py _write_chunks: a line longer than PIPE_BUF (4 KiB)
# is written alone in one os.write, which a pipe does not keep whole: with access_log =
# "stdout" on a pipe (pairlb run | ..., a container runtime) two workers' long lines
# interleave, so any client sending a long target, User-Agent or Referer corrupts both
# workers' lines (docs/access-logs.md promises no line is split by another worker's)
def test_two_workers_long_lines_on_a_shared_stdout_pipe_stay_whole(tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(_PIPE_WRITER.format(root=str(ROOT)))
    r, w = os.pipe()
    procs = [subprocess.Popen([sys.executable, str(script), t], stdout=w) for t in "ab"]
    os.close(w)
    data = bytearray()
    try:
        while True:
            time.sleep(0.001)  # a slow reader (the journal, a busy pipe): the pipe fills
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        for p in procs:
            p.wait(20)
    assert all(p.returncode == 0 for p in procs)
    got = bytes(data).splitlines()
    assert len(got) == 120
    bad = 0
    for line in got:
        try:
            json.loads(line)
        except ValueError:
            bad += 1
    assert bad == 0, f"{bad} of {len(got)} lines are not JSON (interleaved)"


# Found by the review, fixed: accesslog.py: no field of a line is bounded, and invalid UTF-8
# is written as \\xNN (5 bytes per byte in JSON): a client makes each of its lines ~5x its
# header bytes (a 30 KB User-Agent of 0xff bytes: a 150 KB line), so a modest request rate
# fills the disk and, once the writer is 4 MiB behind, gets every other client's lines dropped
# (log evasion); HAProxy truncates its log lines (1 KiB by default)
def test_a_clients_bytes_cannot_blow_up_its_log_line(tmp_path: Path) -> None:
    async def scenario() -> None:
        be = await CountingBackend("b1").start()
        px = await start_proxy([("b1", be.address)])
        path = tmp_path / "a.log"
        alog = attach_log(px, path)
        req = get("/", extra="User-Agent: " + "\xff" * 30_000 + "\r\n").replace(
            "\xff".encode(), b"\xff")
        try:
            assert (await request(px.port, req)).status == 200
            raw = await lines(alog, path)
        finally:
            await stop_proxy(px)
            await be.stop()
        (g,) = raw
        size = len(path.read_bytes())
        assert g["status"] == 200
        assert size < 2 * len(req), f"a {len(req)}-byte request made a {size}-byte line"

    run(scenario())


# Found by the review, fixed: hashing.py HashTables._run: the pools to build are listed once
# per round, then each is read with self._want[name]; a pool removed (or renamed) by a reload
# while another pool's table is building raises KeyError, which kills the builder task: the
# pools after it in the list (a pool the same reload added, say) get no table and the workers
# hash nothing for them until some later refresh; settled() raises KeyError
def test_a_pool_removed_during_a_build_does_not_stop_the_other_builds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        release = threading.Event()

        def slow_a(members: Any) -> None:
            if members[0][0] == "a1":
                release.wait(5)

        sent: list[wl.HashTable] = []
        h = hashing_mod.HashTables(sent.append)  # type: ignore[arg-type]
        hook_builds(monkeypatch, h, slow_a)
        h.refresh({"a": pool_cfg("a", ["a1"]), "b": pool_cfg("b", ["b1"]),
                   "c": pool_cfg("c", ["c1"])})
        await asyncio.sleep(hashing_mod.DEBOUNCE_S * 4)  # a is building
        h.refresh({"a": pool_cfg("a", ["a1"]), "c": pool_cfg("c", ["c1"])})  # b removed
        release.set()
        with contextlib.suppress(KeyError):
            await h.settled(5)
        assert sorted(m.pool for m in sent) == ["a", "c"]
        assert h.status("c") is not None and h.status("c")["current"]  # type: ignore[index]

    run(scenario())


# Found by the review, fixed: hashing.py HashTables._run returns at the first failed build:
# every pool after the failing one in the round is never built, on this refresh or any later
# one (each round fails at the same pool first), so one pool whose build fails (MemoryError on
# a huge table, a bad member) leaves every other maglev pool without its table
def test_one_failing_build_does_not_starve_the_other_pools(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        def fail_a(members: Any) -> None:
            if members[0][0] == "a1":
                raise MemoryError("table too big")

        sent: list[wl.HashTable] = []
        h = hashing_mod.HashTables(sent.append)  # type: ignore[arg-type]
        hook_builds(monkeypatch, h, fail_a)
        pools = {"a": pool_cfg("a", ["a1"]), "b": pool_cfg("b", ["b1"])}
        for _ in range(3):  # later refreshes (push_snapshots) retry
            h.refresh(pools)
            await h.settled(5)
        assert h.failures >= 1
        assert [m.pool for m in sent] == ["b"]

    run(scenario())


# Found by the review, fixed: proxy.py: t_first is set once (at the first response head,
# interim included) but t_sent at every attach: a backend that sends 100 Continue and then
# closes, the request retried on another backend, logs first_byte_ms = t_first(first backend)
# - t_sent(second) < 0
def test_first_byte_ms_is_never_negative_after_a_retry(tmp_path: Path) -> None:
    async def scenario() -> None:
        a = await CountingBackend("a", lambda s, b: b"HTTP/1.1 100 Continue\r\n\r\n").start()
        a.close_after_response = True
        b = await CountingBackend("b", lambda s, be: (
            "delay", 0.2, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).start()
        px = await start_proxy([("a", a.address, 10), ("b", b.address, 1)])
        path = tmp_path / "a.log"
        alog = attach_log(px, path)
        try:
            c = await RawClient.connect(px.port)
            await c.send(get("/x"))
            got_r = await c.responses(2)
            assert [r.status for r in got_r] == [100, 200]
            await c.close()
            got = await lines(alog, path)
        finally:
            await stop_proxy(px)
            await a.stop()
            await b.stop()
        (g,) = got
        assert (g["status"], g["backend"], g["retries"]) == (200, "b", 1)
        assert g["first_byte_ms"] >= 0, g

    run(scenario())


# Found by the review, fixed: proxy.py _abort cuts the client connection when a response is
# cut (SD); the pipelined requests behind it are then logged by _Client.connection_lost as C
# (the client closed or reset), phase Q/R: the log blames the client for pairlb's own close
def test_pipelined_requests_behind_a_cut_response_are_not_blamed_on_the_client(
        tmp_path: Path) -> None:
    def cut(seen: Any, be: Any) -> bytes:
        if seen.target == "/cut":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async def scenario() -> None:
        be = await CountingBackend("c", cut).start()
        px = await start_proxy([("c", be.address)])
        path = tmp_path / "a.log"
        alog = attach_log(px, path)
        try:
            c = await RawClient.connect(px.port)
            await c.send(get("/cut") + get("/next"))
            await wait_for(lambda: len(be.requests) == 1)
            await asyncio.sleep(0.05)
            be.kill_connections()
            assert await c.closed()
            got = await lines(alog, path)
        finally:
            await stop_proxy(px)
            await be.stop()
        assert len(got) == 2
        assert (got[0]["target"], got[0]["termination"][0]) == ("/cut", "S")
        assert got[1]["termination"][0] != "C", got[1]

    run(scenario())


# Found by the review, fixed: tcpproxy.py _Pipe._log: a TCP connection's termination is only
# pairlb's own reason (self.end); accesslog.SNI_TERMINATION is never used, so a client that
# resets before its ClientHello (SNI decision 'closed', table: CR) is logged '--', as a normal
# end
def test_tcp_sni_client_reset_before_the_hello_is_logged_cr(tmp_path: Path) -> None:
    async def scenario() -> None:
        be = await CountingBackend("b").start()
        px = await start_proxy([("b", be.address)], mode="tcp", listener={
            "sni_routes": [{"server_name": "a.test", "pool": "p"}],
            "sni_inspect_timeout_s": 3})
        path = tmp_path / "a.log"
        alog = attach_log(px, path)
        try:
            _, w = await asyncio.open_connection("127.0.0.1", px.port)
            await wait_for(lambda: len(px.server.clients) == 1)
            reset(w)
            await wait_for(lambda: not px.server.clients)
            assert px.server.sni_decisions["closed"] == 1
            got = await lines(alog, path)
        finally:
            await stop_proxy(px)
            await be.stop()
        (g,) = got
        assert g["termination"] == "CR", g

    run(scenario())


# Found by the review, fixed: tcpproxy.py: _BackendSide.connection_lost ignores its exception,
# so a backend that resets mid-stream is logged '--' (a normal end) instead of SD
# (docs/access-logs.md: S = the backend refused, closed, reset)
def test_tcp_backend_reset_mid_stream_is_logged_sd(tmp_path: Path) -> None:
    async def scenario() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readexactly(5)
            w.write(b"part")
            await w.drain()
            reset(w)

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        px = await start_proxy([("b", f"127.0.0.1:{port}")], mode="tcp")
        path = tmp_path / "a.log"
        alog = attach_log(px, path)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.write(b"hello")
            assert await asyncio.wait_for(r.read(), 5) == b"part"
            w.close()
            await wait_for(lambda: not px.server.clients)
            got = await lines(alog, path)
        finally:
            await stop_proxy(px)
            srv.close()
        (g,) = got
        assert (g["bytes_in"], g["bytes_out"]) == (5, 4)
        assert g["termination"] == "SD", g

    run(scenario())


# Found by the review, fixed: proxy.py _Upstream.on_headers_complete: the 101 branch sends the
# head without req.set_cookie, so a sticky pool never sets its cookie on a WebSocket handshake
# (a client that only opens WebSockets is never sticky), while _sticky_pick has already
# counted pairlb_sticky_requests_total{outcome="set"}
def test_sticky_cookie_is_set_on_a_websocket_handshake() -> None:
    async def scenario() -> None:
        runner, port = await ws_backend()
        px = await start_proxy([("b1", f"127.0.0.1:{port}")],
                               pool={"sticky_cookie": "PLB"})
        try:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.write(WS_UPGRADE + b"\r\n")
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            w.close()
            # the same pool answers a plain request with the cookie (what held)
            plain = await request(px.port, get("/"))
        finally:
            await stop_proxy(px)
            await runner.cleanup()
        assert (plain.header("set-cookie") or "").startswith("PLB=")
        assert head.startswith(b"HTTP/1.1 101")
        assert b"\r\nset-cookie: plb=" in head.lower(), head

    run(scenario())


# Found by the review, fixed: worker.py _access_log: a reload that turns the log off (or
# changes its path, format or buffer) calls _count_alog() before the old writer's aclose(),
# then forgets it: the lines that writer still writes (up to a batch, 150 ms of traffic) and
# its drops never reach pairlb_access_log_lines_total
def test_a_reload_that_closes_the_log_still_counts_its_last_lines(tmp_path: Path) -> None:
    async def scenario() -> None:
        w = worker_mod.Worker(-1, 0)
        w._access_log(LoggingConfig.model_validate({"access_log": str(tmp_path / "a.log")}))
        assert w.alog is not None
        for i in range(100):
            w.alog.write((time.time(), "192.0.2.1", 1, "web", "http", b"GET", b"/%d" % i,
                          "HTTP/1.1", 200, 1, 1, "p", "b", 0, 0.0, 0.0, 0.0, 0.0, "--",
                          None, None, None))
        w._access_log(LoggingConfig.model_validate({}))  # reload: access_log removed
        await asyncio.gather(*w._closing_logs)
        w._count_alog()
        assert len((tmp_path / "a.log").read_bytes().splitlines()) == 100
        assert w.stats.snapshot().get("access_log", {}).get("written") == 100

    run(scenario())


# == what held ==================================================================================


def test_held_byte_and_request_accounting_with_the_log_on(tmp_path: Path) -> None:
    """Pipelined GET/HEAD/304/chunked (re-chunked) answers and a refusal mid-pipeline: one
    line each, in order, bytes_out summing to exactly what the client read."""

    def behaviour(seen: Any, be: Any) -> bytes:
        if seen.target == "/304":
            return b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n"
        if seen.target == "/chunked":
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nT: 1\r\n\r\n")
        body = b"x" * 10
        return b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + (
            b"" if seen.method == "HEAD" else body)

    async def scenario() -> None:
        be = await CountingBackend("b1", behaviour).start()
        px = await start_proxy([("b1", be.address)])
        path = tmp_path / "a.log"
        alog = attach_log(px, path)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.write(get("/1") + b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n" + get("/304")
                    + get("/chunked") + b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3"
                    b"\r\n\r\nabc" + b"BAD\x01 / HTTP/1.1\r\n\r\n")
            raw = await asyncio.wait_for(r.read(), 5)  # until the close after the 400
            w.close()
            await wait_for(lambda: not px.server.clients)
            got = await lines(alog, path)
        finally:
            await stop_proxy(px)
            await be.stop()
        assert [(g["method"], g["target"], g["status"]) for g in got] == [
            ("GET", "/1", 200), ("HEAD", "/h", 200), ("GET", "/304", 304),
            ("GET", "/chunked", 200), ("POST", "/b", 200), ("", "", 400)]
        assert sum(g["bytes_out"] for g in got) == len(raw)
        assert got[4]["bytes_in"] > 3 and got[-1]["termination"] == "PR"
        assert all(g["termination"] == "--" for g in got[:-1])

    run(scenario())


def test_held_http_proxy_protocol_gate(tmp_path: Path) -> None:
    """HTTP listener with accept_proxy_protocol: the header's address is the client's for
    X-Forwarded-For, keep-alive and the log; a header alone then a request; garbage from a
    trusted proxy, a stranger's "PRO" + "XY" header and a partial header are closed without
    a byte and counted; a stranger's "P" + "OST" is served; v2 LOCAL keeps the peer; IPv6."""

    async def conn(port: int, src: str = "127.0.0.1") -> RawClient:
        r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
        return RawClient(r, w)

    async def scenario() -> None:
        be = await CountingBackend("b").start()
        px = await start_proxy([("b", be.address)], listener=ACCEPT)
        path = tmp_path / "a.log"
        alog = attach_log(px, path)
        hdr = pp.encode_v1(("192.0.2.5", 1234), ("192.0.2.80", 80))
        xff = lambda: be.requests[-1].header("x-forwarded-for")  # noqa: E731
        try:
            c = await conn(px.port)
            await c.send(hdr + get("/1") + get("/2"))
            assert [r.status for r in await c.responses(2)] == [200, 200]
            await c.send(get("/3"))
            assert (await c.response()).status == 200
            assert [s.header("x-forwarded-for") for s in be.requests] == ["192.0.2.5"] * 3
            await c.close()

            c = await conn(px.port)
            await c.send(hdr)
            await asyncio.sleep(0.05)
            await c.send(get("/4"))
            assert (await c.response()).status == 200 and xff() == "192.0.2.5"
            await c.close()

            for src, data in (("127.0.0.1", get("/x")), ("127.0.0.1", hdr[:10]),
                              (STRANGER, b"PRO")):
                c = await conn(px.port, src)
                await c.send(data)
                if src == STRANGER:
                    await asyncio.sleep(0.05)
                    await c.send(b"XY TCP4 1.1.1.1 2.2.2.2 1 2\r\n" + get("/forged"))
                assert await c.closed() and bytes(c.raw) == b""

            c = await conn(px.port, STRANGER)
            await c.send(b"P")
            await asyncio.sleep(0.05)
            await c.send(b"OST /6 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            assert (await c.response()).status == 200 and xff() == STRANGER
            await c.close()

            c = await conn(px.port)
            await c.send(pp.encode_v2(None, None) + get("/7"))
            assert (await c.response()).status == 200 and xff() == "127.0.0.1"
            await c.close()

            c = await conn(px.port)
            await c.send(pp.encode_v2(("2001:db8::1", 5), ("2001:db8::2", 80)) + get("/8"))
            assert (await c.response()).status == 200 and xff() == "2001:db8::1"
            assert be.requests[-1].header("forwarded") == 'for="[2001:db8::1]";proto=http'
            await c.close()
            got = await lines(alog, path)
        finally:
            await stop_proxy(px)
            await be.stop()
        assert "/forged" not in [s.target for s in be.requests]
        assert px.stats.snapshot()["bad_requests"] == {"l": {
            pp.MISSING: {"0": 1}, pp.INVALID: {"0": 1}, pp.UNTRUSTED: {"0": 1}}}
        assert [(g["client_ip"], g["target"]) for g in got] == [
            ("192.0.2.5", "/1"), ("192.0.2.5", "/2"), ("192.0.2.5", "/3"),
            ("192.0.2.5", "/4"), (STRANGER, "/6"), ("127.0.0.1", "/7"),
            ("2001:db8::1", "/8")]
        assert got[0]["client_port"] == 1234

    run(scenario())


def test_held_source_ip_maglev_key_is_the_proxy_headers_address() -> None:
    """hash_on = source_ip behind a trusted PROXY header: each connection goes where the
    table sends the header's address (what the other node computes), not the proxy's."""

    async def scenario() -> None:
        bes = [await CountingBackend(f"b{i}").start() for i in range(3)]
        px = await start_proxy([(b.name, b.address) for b in bes], balance="maglev",
                               listener=ACCEPT)
        names, table = maglev.build([(b.name, 1.0) for b in bes], 65537)
        px.pool.set_hash_table(names, table)
        try:
            seen = set()
            for i in range(12):
                ip = f"198.51.100.{i + 1}"
                want = names[table[maglev.key_hash(ip.encode()) % len(table)]]
                hdr = pp.encode_v2((ip, 1000 + i), ("192.0.2.80", 80))
                for _ in range(2):  # and on a second connection from the same client
                    r = await request(px.port, hdr + get("/"))
                    assert r.header("x-backend") == want, (ip, want)
                seen.add(want)
            assert len(seen) > 1  # the key is not the proxy's one address
        finally:
            await stop_proxy(px)
            for b in bes:
                await b.stop()

    run(scenario())


def test_held_a_stale_build_is_never_sent_after_a_newer_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Members change while their table builds: the stale table is dropped and the current
    one sent last; a change there and back sends the first build once."""

    async def scenario() -> None:
        sent: list[wl.HashTable] = []
        h = hashing_mod.HashTables(sent.append)  # type: ignore[arg-type]
        hook_builds(monkeypatch, h, lambda members: time.sleep(0.1))
        h.refresh({"a": pool_cfg("a", ["x", "y"])})
        await asyncio.sleep(hashing_mod.DEBOUNCE_S + 0.03)
        h.refresh({"a": pool_cfg("a", ["x", "y", "z"])})
        await h.settled(5)
        assert [m.members for m in sent] == [("x", "y", "z")]
        h.refresh({"a": pool_cfg("a", ["x"])})
        await asyncio.sleep(hashing_mod.DEBOUNCE_S + 0.03)
        h.refresh({"a": pool_cfg("a", ["x", "y", "z"])})
        await h.settled(5)
        assert [m.members for m in sent][-1] == ("x", "y", "z")
        assert h.status("a")["current"]  # type: ignore[index]

    run(scenario())


CFG_NODE = """\
[node]
name = "{node}"
state_dir = "{state}"
[[listener]]
name = "web"
bind = "127.0.0.1:{listen}"
pool = "web"
[[pool]]
name = "web"
balance = "maglev"
hash_on = "header:X-User"
backends = [ {{ name = "w1", address = "127.0.0.1:9001" }},
             {{ name = "w2", address = "127.0.0.1:9002", weight = 3 }} ]
[pool.health]
enabled = false
"""


def test_held_both_nodes_build_the_same_table_whatever_the_order_of_runtime_adds(
        tmp_path: Path) -> None:
    """Two real Daemons (in process) with the same config: the same digest; after the same
    three runtime adds in opposite orders, the same digest again; a new worker's welcome
    holds the table before the snapshot."""
    from admin_helpers import in_process_daemon

    async def node(name: str, adds: list[tuple[str, str, int]]) -> tuple[str, str, Any]:
        tmp = tmp_path / name
        tmp.mkdir()
        d = in_process_daemon(CFG_NODE.format(node=name, state=tmp / "state",
                                              listen=free_port()), tmp / "pairlb.toml")
        d.elastic.load()
        d.table.apply(d.elastic.compose(d.cfg)[0])
        d.hashing.refresh(d.table.pools)
        await d.hashing.settled()
        first = d.hashing.tables["web"].message.digest
        for n, addr, w in adds:
            await d.elastic.add("web", n, addr, w)
        d.push_snapshots()
        await d.hashing.settled()
        welcome = d._welcome(None)
        proc = getattr(getattr(d.hashing, "builder", None), "proc", None)
        await d.hashing.stop()
        if proc is not None:  # a helper process building the tables: reaped here
            await proc.wait()
        return first, d.hashing.tables["web"].message.digest, welcome

    async def scenario() -> None:
        adds = [("x1", "127.0.0.1:9101", 1), ("x2", "127.0.0.1:9102", 2),
                ("x3", "127.0.0.1:9103", 1)]
        a = await node("t1", adds)
        b = await node("t2", list(reversed(adds)))
        assert a[0] == b[0] and a[1] == b[1] and a[0] != a[1]
        kinds = [type(m).__name__ for m in a[2]]
        assert kinds == ["Config", "HashTable", "Snap"]
        assert a[2][1].digest == a[1] and len(a[2][1].members) == 5

    run(scenario())


def test_held_sticky_and_least_connections_accounting() -> None:
    """Random picks, sticky takes (take_token) and releases on a least_connections pool:
    every backend's in_flight returns to 0 and each pick is a least-loaded backend."""
    for seed in range(60):
        rng = random.Random(seed)
        p = build_pool("p", "least_connections",
                       [(f"b{i}", "127.0.0.1", 9000 + i, 1.0) for i in range(4)], seed=1)
        p.apply(1, {f"b{i}": BackendEntry(True, float(rng.choice([1, 2, 3])))
                    for i in range(4)}, False)
        held = []
        for _ in range(200):
            x = rng.random()
            if x < 0.3:
                low = min(b.in_flight / b.weight for b in p.backends)
                b = p.pick(0.0)
                assert b is not None and abs((b.in_flight - 1) / b.weight - low) < 1e-9
                held.append(b)
            elif x < 0.6:
                b = p.take_token(p.backends[rng.randrange(4)].token, 0.0)
                if b is not None:
                    held.append(b)
            elif held:
                p.release(held.pop(rng.randrange(len(held))))
        for b in held:
            p.release(b)
        assert [b.in_flight for b in p.backends] == [0, 0, 0, 0]


def test_held_rapid_log_reloads_lose_no_line_and_leave_no_thread(tmp_path: Path) -> None:
    """60 reloads cycling a worker's access log through two paths, two formats and off,
    with records between: every record is written once, every writer thread ends."""

    async def scenario() -> None:
        before = set(threading.enumerate())
        w = worker_mod.Worker(-1, 0)
        n = 0
        for i in range(60):
            k = i % 4
            lc = LoggingConfig.model_validate(
                {} if k == 3 else {"access_log": str(tmp_path / f"a{k}.log"),
                                   "access_log_format": "combined" if k == 1 else "json"})
            w._access_log(lc)
            if w.alog is not None:
                for _ in range(40):
                    w.alog.write((time.time(), "192.0.2.1", 1, "web", "http", b"GET",
                                  b"/%d" % n, "HTTP/1.1", 200, 1, 1, "p", "b", 0, 0.0, 0.0,
                                  0.0, 0.0, "--", None, None, None))
                    n += 1
            await asyncio.sleep(0)
        w._access_log(LoggingConfig.model_validate({}))
        await asyncio.gather(*w._closing_logs)
        await wait_for(lambda: not [t for t in threading.enumerate()
                                    if t.name == "pairlb-accesslog" and t not in before], 5)
        total = count_lines([tmp_path / f"a{k}.log" for k in range(3)])
        assert total == n == 45 * 40

    run(scenario())


def test_held_config_refusals() -> None:
    """The combinations docs/proxy-protocol.md and docs/affinity.md rule out are refused."""
    from pydantic import ValidationError

    from lb import config

    lst = {"name": "l", "bind": "127.0.0.1:1", "pool": "p"}
    with pytest.raises(ValidationError, match="trusted_proxies"):
        ListenerConfig.model_validate({**lst, "accept_proxy_protocol": True})
    with pytest.raises(ValidationError, match="accept_proxy_protocol with"):
        ListenerConfig.model_validate({**lst, "accept_proxy_protocol": True,
                                       "trusted_proxies": ["10.0.0.0/8"], "tls": {
                                           "certificates": [{"cert_file": "/c.pem",
                                                             "key_file": "/k.pem"}]}})
    with pytest.raises(ValidationError, match="maglev"):
        PoolConfig.model_validate({"name": "p", "hash_on": "uri",
                                   "backends": [{"name": "b", "address": "127.0.0.1:1"}]})
    with pytest.raises(ValidationError, match="prime"):
        PoolConfig.model_validate({"name": "p", "balance": "maglev", "hash_table_size": 65536,
                                   "backends": [{"name": "b", "address": "127.0.0.1:1"}]})
    base = ('[node]\nname = "n"\n[[listener]]\nname = "l"\nbind = "127.0.0.1:1"\n'
            'pool = "p"\n{mode}[[pool]]\nname = "p"\n{pool}\n'
            'backends = [{{ name = "b", address = "127.0.0.1:2" }}]\n')
    for mode, pool, match in (
            ("", 'send_proxy_protocol = "v2"', "send_proxy_protocol"),
            ('mode = "tcp"\n', 'balance = "maglev"\nhash_on = "uri"', "hash_on")):
        with pytest.raises(config.ConfigError, match=match):
            config.loads(base.format(mode=mode, pool=pool))
    with pytest.raises(ValidationError, match="access_log"):
        LoggingConfig.model_validate({"access_log": "relative/path.log"})
