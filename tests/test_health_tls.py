"""Ring 4: health checks of ``[pool.tls]`` pools against real TLS servers on 127.0.0.1.

The probe does the TLS handshake inside its own state machine (``ssl.MemoryBIO``), so
every outcome here is one it reaches on its own: passes over TLS (``http`` and ``tcp``),
each way a handshake fails (name, IP, CA, protocol version, not TLS at all) as L6_ERROR
with OpenSSL's reason in words, a silent backend as L6_TIMEOUT, the body search and its
64 KiB bound across TLS records, a kept connection and a resumed session; and what the
daemon builds (``lb.control.backends``): one context per pool, comparable specs, a clear
error for a bad ca_file. Certificates come from ``tests/tls_helpers.Pki`` (the openssl CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from health_helpers import LOOPBACK, raw_server, run
from tls_helpers import Leaf, Pki

from healthcheck import (
    CheckResult,
    CheckSpec,
    CheckStatus,
    HealthBook,
    HealthConfigError,
    HttpProbe,
    ProbeTls,
    TcpProbe,
)
from lb.config import loads
from lb.control.backends import BackendTable, PoolTlsError, check_spec, probe_tls
from lb.tls.contexts import client_context

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def leaf(pki: Pki) -> Leaf:
    """For b.test and 127.0.0.1."""
    return pki.leaf("b", ["b.test"], ["127.0.0.1"])


def server_context(leaf: Leaf, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(leaf.cert, leaf.key)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def tls_for(
    pki: Pki, *, verify: bool = True, server_name: str | None = None, min_version: str = "1.2",
    resume_s: float = 0.0,
) -> ProbeTls:
    """What the daemon builds for a pool trusting ``pki``'s CA (lb.tls.contexts)."""
    ctx = client_context(verify=verify, ca_pem=pki.ca.read_bytes(), min_version=min_version)
    return ProbeTls(ctx, server_name=server_name, resume_s=resume_s)


def backend_app() -> tuple[web.Application, list[web.Request]]:
    seen: list[web.Request] = []
    app = web.Application()

    async def ok(request: web.Request) -> web.Response:
        seen.append(request)
        return web.Response(text="status: all good")

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=503, text="down for maintenance")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(text="late")

    def filler(at: int) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            # One write: the TLS layer cuts it into 16 KiB records, MARKER at byte ``at``.
            resp = web.StreamResponse()
            await resp.prepare(request)
            await resp.write(b"x" * at + b"MARKER" + b"y" * 40000)
            return resp

        return handler

    app.router.add_get("/healthz", ok)
    app.router.add_get("/fail", fail)
    app.router.add_get("/slow", slow)
    app.router.add_get("/across", filler(16384 - 3))  # straddles the first record boundary
    app.router.add_get("/edge", filler(65536 - 6))  # ends at the 64 KiB bound exactly
    app.router.add_get("/past", filler(65536 - 5))  # one byte past it
    return app, seen


@contextlib.asynccontextmanager
async def tls_app(leaf: Leaf, **kw: Any) -> AsyncIterator[tuple[int, list[web.Request]]]:
    """An aiohttp app over TLS on 127.0.0.1:<free port>."""
    app, seen = backend_app()
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0, ssl_context=server_context(leaf, **kw))
    await site.start()
    try:
        yield int(runner.addresses[0][1]), seen
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def tls_raw(leaf: Leaf, handler: Handler) -> AsyncIterator[int]:
    """A raw asyncio TLS server (its handler sees the ``ssl_object`` of each connection)."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, LOOPBACK, 0, ssl=server_context(leaf))
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()


def check(leaf: Leaf, probe: HttpProbe | TcpProbe, **kw: Any) -> CheckResult:
    async def go() -> CheckResult:
        async with tls_app(leaf, **kw) as (port, _):
            return await probe.run(LOOPBACK, port)

    return run(go())


# -- passes -------------------------------------------------------------------------------


def test_http_check_passes_over_tls_and_the_request_is_well_formed(pki: Pki, leaf: Leaf) -> None:
    async def go() -> tuple[CheckResult, list[web.Request]]:
        async with tls_app(leaf) as (port, seen):
            return await HttpProbe(timeout_s=1, tls=tls_for(pki)).run(LOOPBACK, port), seen

    result, seen = run(go())
    assert (result.status, result.code, result.ok) == (CheckStatus.L7_OK, 200, True)
    (req,) = seen
    assert req.secure and req.path == "/healthz" and req.headers["Connection"] == "close"
    assert req.host.startswith(f"{LOOPBACK}:")


def test_server_name_is_sent_and_verified(pki: Pki, leaf: Leaf) -> None:
    names: list[str | None] = []
    ctx = server_context(leaf)
    ctx.sni_callback = lambda obj, name, _ctx: names.append(name)  # type: ignore[assignment]

    async def go() -> CheckResult:
        server = await asyncio.start_server(answer_ok, LOOPBACK, 0, ssl=ctx)
        try:
            port = server.sockets[0].getsockname()[1]
            return await HttpProbe(timeout_s=1, tls=tls_for(pki, server_name="b.test")).run(
                LOOPBACK, port
            )
        finally:
            server.close()
            await server.wait_closed()

    assert run(go()).status is CheckStatus.L7_OK
    assert names == ["b.test"]


def test_status_through_tls_is_judged_like_plain(pki: Pki, leaf: Leaf) -> None:
    result = check(leaf, HttpProbe(path="/fail", timeout_s=1, tls=tls_for(pki)))
    assert (result.status, result.code) == (CheckStatus.L7_STATUS, 503)


def test_tcp_check_passes_when_the_handshake_completes(pki: Pki, leaf: Leaf) -> None:
    result = check(leaf, TcpProbe(timeout_s=1, tls=tls_for(pki)))
    assert (result.status, result.ok) == (CheckStatus.L4_OK, True)
    assert result.detail == "TLS handshake done (TLSv1.3)"


def test_verify_off_passes_against_an_untrusted_certificate(tmp_path: Path) -> None:
    other = Pki(tmp_path / "other")
    stranger = other.leaf("s", ["elsewhere.test"])
    untrusting = Pki(tmp_path / "mine")
    for probe in (
        HttpProbe(timeout_s=1, tls=tls_for(untrusting, verify=False)),
        TcpProbe(timeout_s=1, tls=tls_for(untrusting, verify=False)),
    ):
        assert check(stranger, probe).ok


# -- the handshake fails ------------------------------------------------------------------


def test_wrong_server_name_is_l6_error_saying_so(pki: Pki, leaf: Leaf) -> None:
    result = check(leaf, HttpProbe(timeout_s=1, tls=tls_for(pki, server_name="a.test")))
    assert (result.status, result.code, result.ok) == (CheckStatus.L6_ERROR, None, False)
    assert result.detail == (
        "certificate verify failed: Hostname mismatch, certificate is not valid for 'a.test'."
    )


def test_ip_not_in_the_certificate_is_l6_error(pki: Pki) -> None:
    named_only = pki.leaf("named", ["b.test"])
    for probe in (
        HttpProbe(timeout_s=1, tls=tls_for(pki)),
        TcpProbe(timeout_s=1, tls=tls_for(pki)),
    ):
        result = check(named_only, probe)
        assert result.status is CheckStatus.L6_ERROR
        assert result.detail.startswith("certificate verify failed: IP address mismatch")


def test_untrusted_ca_is_l6_error(tmp_path: Path, leaf: Leaf) -> None:
    stranger = Pki(tmp_path / "other")
    for probe in (
        HttpProbe(timeout_s=1, tls=tls_for(stranger)),
        TcpProbe(timeout_s=1, tls=tls_for(stranger)),
    ):
        result = check(leaf, probe)
        assert result.status is CheckStatus.L6_ERROR
        assert result.detail == (
            "certificate verify failed: self-signed certificate in certificate chain"
        )


@contextlib.contextmanager
def blocking_tls_server(ctx: ssl.SSLContext) -> Iterator[int]:
    """One handshake by a thread with a blocking SSLSocket: unlike asyncio's servers (which
    just close), it sends the alert OpenSSL writes when the handshake fails."""
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(5)

    def serve() -> None:
        with (
            contextlib.suppress(OSError),
            listener.accept()[0] as conn,
            ctx.wrap_socket(conn, server_side=True),
        ):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        thread.join(5)
        listener.close()


def test_no_common_protocol_version_is_l6_error(pki: Pki, leaf: Leaf) -> None:
    with blocking_tls_server(server_context(leaf, ssl.TLSVersion.TLSv1_2)) as port:
        probe = HttpProbe(timeout_s=1, tls=tls_for(pki, min_version="1.3"))
        result = run(probe.run(LOOPBACK, port))
    assert result.status is CheckStatus.L6_ERROR
    assert result.detail == "tlsv1 alert protocol version"


def test_plain_http_backend_behind_a_tls_pool_is_l6_error(pki: Pki) -> None:
    async def go() -> CheckResult:
        app, _ = backend_app()
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        await web.TCPSite(runner, LOOPBACK, 0).start()
        try:
            port = int(runner.addresses[0][1])
            return await HttpProbe(timeout_s=1, tls=tls_for(pki)).run(LOOPBACK, port)
        finally:
            await runner.cleanup()

    result = run(go())
    assert result.status is CheckStatus.L6_ERROR
    # aiohttp answers the ClientHello with "HTTP/1.1 400 ..."; OpenSSL reads a bad record
    assert result.detail == "wrong version number (is the backend speaking TLS?)"


def test_backend_closing_during_the_handshake_is_l6_error(pki: Pki) -> None:
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)

    async def go() -> list[CheckResult]:
        async with raw_server(close_at_once) as port:
            return [
                await HttpProbe(timeout_s=1, tls=tls_for(pki)).run(LOOPBACK, port),
                await TcpProbe(timeout_s=1, tls=tls_for(pki)).run(LOOPBACK, port),
            ]

    for result in run(go()):
        assert (result.status, result.detail) == (
            CheckStatus.L6_ERROR, "connection closed during TLS handshake"
        )


def test_silent_backend_is_l6_timeout_within_the_budget(pki: Pki) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3)

    async def go() -> list[CheckResult]:
        async with raw_server(silent) as port:
            return list(await asyncio.gather(
                HttpProbe(timeout_s=0.2, tls=tls_for(pki)).run(LOOPBACK, port),
                TcpProbe(timeout_s=0.2, tls=tls_for(pki)).run(LOOPBACK, port),
            ))

    for result in run(go()):
        assert (result.status, result.detail) == (CheckStatus.L6_TIMEOUT, "TLS handshake timeout")
        assert 0.2 <= result.duration_s < 0.5


def test_slow_response_after_the_handshake_is_l7_timeout(pki: Pki, leaf: Leaf) -> None:
    result = check(leaf, HttpProbe(path="/slow", timeout_s=0.3, tls=tls_for(pki)))
    assert result.status is CheckStatus.L7_TIMEOUT
    assert 0.3 <= result.duration_s < 0.6


def test_garbage_after_the_handshake_is_l7_bad_response(pki: Pki, leaf: Leaf) -> None:
    async def ssh(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def go() -> CheckResult:
        async with tls_raw(leaf, ssh) as port:
            return await HttpProbe(timeout_s=1, tls=tls_for(pki)).run(LOOPBACK, port)

    result = run(go())
    assert result.status is CheckStatus.L7_BAD_RESPONSE
    assert result.detail.startswith("invalid HTTP response")


# -- the body through TLS -----------------------------------------------------------------


def test_expect_body_through_tls(pki: Pki, leaf: Leaf) -> None:
    found = check(leaf, HttpProbe(expect_body="all good", timeout_s=1, tls=tls_for(pki)))
    missing = check(leaf, HttpProbe(expect_body="database: ok", timeout_s=1, tls=tls_for(pki)))
    assert found.status is CheckStatus.L7_OK
    assert (missing.status, missing.code) == (CheckStatus.L7_BODY_MISMATCH, 200)


def test_body_split_across_tls_records_and_the_64k_bound(pki: Pki, leaf: Leaf) -> None:
    def body(path: str) -> CheckResult:
        return check(leaf, HttpProbe(path=path, expect_body="MARKER", timeout_s=1,
                                     tls=tls_for(pki)))

    assert body("/across").status is CheckStatus.L7_OK
    assert body("/edge").status is CheckStatus.L7_OK
    past = body("/past")
    assert past.status is CheckStatus.L7_BODY_MISMATCH
    assert "65536" in past.detail


# -- kept connections and resumed sessions ------------------------------------------------


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()


class Tracking:
    """A keep-alive TLS server that records, per connection, whether its session was
    resumed, and counts requests."""

    def __init__(self, close_after: int = 0) -> None:
        self.resumed: list[bool] = []
        self.requests = 0
        self.close_after = close_after

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.resumed.append(writer.get_extra_info("ssl_object").session_reused)
        served = 0
        while True:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            served += 1
            writer.write(OK)
            await writer.drain()
            if served == self.close_after:
                return  # (the handler's writer.close() sends close_notify)


def series(leaf: Leaf, probe: HttpProbe | TcpProbe, srv: Tracking, count: int,
           gap_s: float = 0.01) -> list[CheckResult]:
    async def go() -> list[CheckResult]:
        out = []
        async with tls_raw(leaf, srv.handler) as port:
            for _ in range(count):
                out.append(await probe.run(LOOPBACK, port))
                await asyncio.sleep(gap_s)
            probe.close()
        return out

    return run(go())


def test_reuse_connection_keeps_the_tls_session_open(pki: Pki, leaf: Leaf) -> None:
    srv = Tracking()
    probe = HttpProbe(timeout_s=1, reuse_connection=True, tls=tls_for(pki))
    results = series(leaf, probe, srv, 4)
    assert [r.status for r in results] == [CheckStatus.L7_OK] * 4
    assert (len(srv.resumed), srv.requests) == (1, 4)  # one handshake for four checks


def test_kept_tls_connection_closed_by_the_backend_costs_no_failed_check(
    pki: Pki, leaf: Leaf
) -> None:
    srv = Tracking(close_after=1)  # close_notify + FIN after each response
    probe = HttpProbe(timeout_s=1, reuse_connection=True, tls=tls_for(pki))
    results = series(leaf, probe, srv, 3, gap_s=0.05)
    assert [r.status for r in results] == [CheckStatus.L7_OK] * 3
    assert (len(srv.resumed), srv.requests) == (3, 3)


def test_sessions_are_resumed_only_when_asked(pki: Pki, leaf: Leaf) -> None:
    full = Tracking(close_after=1)
    series(leaf, HttpProbe(timeout_s=1, tls=tls_for(pki)), full, 3)
    assert full.resumed == [False, False, False]
    resumed = Tracking(close_after=1)
    results = series(leaf, HttpProbe(timeout_s=1, tls=tls_for(pki, resume_s=30)), resumed, 3)
    assert [r.status for r in results] == [CheckStatus.L7_OK] * 3
    assert resumed.resumed == [False, True, True]


def test_a_session_older_than_resume_s_is_not_offered(pki: Pki, leaf: Leaf) -> None:
    srv = Tracking(close_after=1)
    probe = HttpProbe(timeout_s=1, tls=tls_for(pki, resume_s=0.5))

    async def go() -> None:
        async with tls_raw(leaf, srv.handler) as port:
            for pause in (0.0, 0.05, 0.6, 0.05):
                await asyncio.sleep(pause)
                assert (await probe.run(LOOPBACK, port)).ok

    run(go())
    # full; resumed; 0.65 s after the full one: full again; resumed
    assert srv.resumed == [False, True, False, True]


# -- settings: ProbeTls, CheckSpec, what the daemon builds --------------------------------


def test_probe_tls_validates_and_describes_its_context(pki: Pki) -> None:
    with pytest.raises(HealthConfigError, match=r"tls\.context"):
        ProbeTls(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    with pytest.raises(HealthConfigError, match=r"tls\.server_name"):
        ProbeTls(client_context(verify=True, ca_pem=None, min_version="1.2"), server_name="a b")
    tls = tls_for(pki, min_version="1.3")
    assert (tls.verify, tls.check_hostname, tls.min_version) == (True, True, "TLSv1_3")
    assert len(tls.ca) == 16
    off = tls_for(pki, verify=False)
    assert (off.verify, off.check_hostname) == (False, False)


def test_spec_equality_ignores_the_context_object_but_not_its_settings(
    pki: Pki, tmp_path: Path
) -> None:
    a = CheckSpec(tls=tls_for(pki))
    b = CheckSpec(tls=tls_for(pki))  # another context, the same settings
    assert a.tls is not None and b.tls is not None and a.tls.context is not b.tls.context
    assert a == b and hash(a) == hash(b) and a.tested() == b.tested()
    other_ca = CheckSpec(tls=tls_for(Pki(tmp_path / "other")))
    renamed = CheckSpec(tls=tls_for(pki, server_name="b.test"))
    unverified = CheckSpec(tls=tls_for(pki, verify=False))
    plain = CheckSpec()
    for changed in (other_ca, renamed, unverified, plain):
        assert changed.tested() != a.tested()
    resuming = CheckSpec(tls=tls_for(pki, resume_s=30))
    assert resuming.tested() == a.tested()  # only how often the handshake is full
    assert isinstance(a.make_probe(), HttpProbe) and a.make_probe().tls is a.tls  # type: ignore[attr-defined]


def pool_toml(ca_file: Path | str, extra: str = "", backends: int = 3) -> str:
    members = ",".join(
        f'{{ name = "b{i}", address = "127.0.0.{i + 1}:8443" }}' for i in range(backends)
    )
    return f"""
[node]
name = "lb1"
[[listener]]
name = "web"
bind = "127.0.0.1:8080"
pool = "app"

[[pool]]
name = "app"
backends = [{members}]

[pool.health]
type = "http"

[pool.tls]
ca_file = "{ca_file}"
{extra}
"""


def test_check_spec_gives_every_backend_of_a_pool_one_context(pki: Pki) -> None:
    cfg = loads(pool_toml(pki.ca, 'server_name = "b.test"'))
    pcfg = cfg.pool[0]
    specs = [check_spec(pcfg, b)[0] for b in pcfg.backends]
    contexts = {id(s.tls.context) for s in specs if s.tls is not None}
    assert len(contexts) == 1 and all(s.tls is not None for s in specs)
    assert specs[0].tls is not None and specs[0].tls.server_name == "b.test"
    # a reload of the same settings and CA content: the same object, so equal targets
    again = loads(pool_toml(pki.ca, 'server_name = "b.test"')).pool[0]
    assert probe_tls(again) is specs[0].tls
    table = BackendTable(HealthBook(), cfg.pool)
    targets = table.targets()
    assert len({id(t.spec.tls) for t in targets}) == 1
    assert targets == table.targets({"app": pki.ca.read_bytes()})


def test_a_changed_ca_file_content_changes_the_tested_settings(
    pki: Pki, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki.ca.read_bytes())
    pcfg = loads(pool_toml(ca)).pool[0]
    before = check_spec(pcfg, pcfg.backends[0])[0]
    ca.write_bytes(Pki(tmp_path / "rotated").ca.read_bytes())
    after = check_spec(pcfg, pcfg.backends[0])[0]
    assert before.tested() != after.tested()


@pytest.mark.parametrize("content,rule", [
    (None, "no such file"),
    (b"not a certificate\n", "no PEM certificate in it"),
    (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
     "not usable as CA certificates"),
])
def test_unusable_ca_file_is_a_clear_error_naming_the_key(
    tmp_path: Path, content: bytes | None, rule: str
) -> None:
    ca = tmp_path / "ca.pem"
    if content is not None:
        ca.write_bytes(content)
    cfg = loads(pool_toml(ca))
    pcfg = cfg.pool[0]
    table = BackendTable(HealthBook(), cfg.pool)
    with pytest.raises(PoolTlsError) as err:
        table.targets()
    assert str(err.value).startswith(f"pool[0].tls.ca_file: ca_file {ca}: {rule}")
    with pytest.raises(HealthConfigError, match=rule):  # what preflight catches
        check_spec(pcfg, pcfg.backends[0])
