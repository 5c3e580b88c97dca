"""TLS in the HTTP engine (issue 15): a TLS listener (X-Forwarded-Proto, HSTS, ACME, curl as
the client) and TLS to backends ([pool.tls]: verification, retry, keep-alive reuse), on real
sockets, with asyncio and uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import ssl
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from proxy_helpers import (
    CountingBackend,
    Proxy,
    RawClient,
    Response,
    Seen,
    _BackendConn,
    free_port,
    get,
    ok_behaviour,
    start_proxy,
    stop_proxy,
)
from tls_helpers import Leaf, Pki

from lb.config import ListenerConfig, PoolConfig
from lb.data.pool import build_pool
from lb.data.proxy import ProxyServer
from lb.listen import make_listen_socket
from lb.stats import Stats
from lb.tls import contexts
from lb.tls.files import load_certificate
from lb.tls.server import ListenerTls

pytestmark = pytest.mark.timeout(90)

LOOPS = ["asyncio", "uvloop"]


def run_on(loop: str, coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    if loop == "uvloop":
        return uvloop.run(main())
    return asyncio.run(main())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def site(pki: Pki) -> Leaf:
    return pki.leaf("site", ["site.test", "*.site.test"], ["127.0.0.1"])


# -- helpers ------------------------------------------------------------------------------------


class _AnyLoopConn(_BackendConn):
    """The counting backend's connection on uvloop too (its transports are not
    asyncio.Transport instances)."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.be.connections += 1
        self.conn_id = self.be.connections
        self.be.open.add(self)


class Backend(CountingBackend):
    """CountingBackend on any loop; with ``leaf``, speaking TLS (1.3 by default: session
    tickets)."""

    def __init__(self, name: str, behaviour: Any = ok_behaviour, leaf: Leaf | None = None,
                 max_version: ssl.TLSVersion | None = None) -> None:
        super().__init__(name, behaviour)
        self.ctx: ssl.SSLContext | None = None
        if leaf is not None:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(leaf.cert, leaf.key)
            if max_version is not None:
                self.ctx.maximum_version = max_version

    async def start(self, port: int = 0) -> Backend:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _AnyLoopConn(self), "127.0.0.1", port, reuse_address=True, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


def tls_backend(name: str, leaf: Leaf, behaviour: Any = ok_behaviour,
                max_version: ssl.TLSVersion | None = None) -> Backend:
    return Backend(name, behaviour, leaf, max_version)


def backend_ctx(pki: Pki | None, *, verify: bool = True) -> ssl.SSLContext:
    """What the worker builds for a [pool.tls] (lb.tls.contexts.client_context)."""
    return contexts.client_context(
        verify=verify, ca_pem=pki.ca.read_bytes() if pki is not None else None,
        min_version="1.2", alpn=("http/1.1",))


async def start_tls_proxy(
    backends: list[tuple[str, str]], leaf: Leaf | None, *,
    listener: dict[str, Any] | None = None, pool: dict[str, Any] | None = None,
    backend_tls: ssl.SSLContext | None = None,
) -> Proxy:
    """start_proxy with a TLS listener (``leaf`` served; None: plain) and backend TLS."""
    pool_cfg = PoolConfig.model_validate({
        "name": "p", "backends": [{"name": n, "address": a} for n, a in backends],
        **(pool or {})})
    lraw: dict[str, Any] = {"name": "l", "bind": f"127.0.0.1:{free_port()}", "pool": "p",
                            **(listener or {})}
    if leaf is not None:
        lraw["tls"] = {"certificates": [{"cert_file": str(leaf.cert),
                                         "key_file": str(leaf.key)}],
                       **lraw.get("tls", {})}
    lcfg = ListenerConfig.model_validate(lraw)
    wpool = build_pool("p", "round_robin",
                       [(b.name, *b.host_port, 1.0) for b in pool_cfg.backends], seed=1)
    stats = Stats()
    sock = make_listen_socket(lcfg)
    proxy = Proxy(None, wpool, pool_cfg, lcfg, stats, sock,  # type: ignore[arg-type]
                  sock.getsockname()[1])
    server = ProxyServer(lcfg, wpool, pool_cfg, stats, on_ejection=proxy.ejections.append)
    if lcfg.tls is not None:
        lt = ListenerTls("l", lcfg.tls, stats)
        lt.load([load_certificate(c) for c in lcfg.tls.certificates])
        server.tls = lt
    server.routes_changed({"p": wpool}, {"p": pool_cfg},
                          {"p": backend_tls} if backend_tls is not None else {})
    proxy.server = server
    await server.start(sock)
    return proxy


def client_ctx(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    return ctx


async def tls_client(port: int, pki: Pki, name: str = "site.test") -> RawClient:
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(pki),
                                         server_hostname=name)
    return RawClient(r, w)


async def tls_request(port: int, pki: Pki, data: bytes) -> Response:
    c = await tls_client(port, pki)
    try:
        await c.send(data)
        return await c.response()
    finally:
        await c.close()


@contextlib.asynccontextmanager
async def running(*backends: CountingBackend) -> AsyncIterator[None]:
    for b in backends:
        await b.start()
    try:
        yield
    finally:
        for b in backends:
            await b.stop()


def errors(px: Proxy) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = px.stats.snapshot().get("errors", {}).get("p", {})
    return out


# -- TLS listener ---------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_https_listener_forwards_proto_https(loop: str, pki: Pki, site: Leaf) -> None:
    async def scenario() -> None:
        be = Backend("web")
        async with running(be):
            px = await start_tls_proxy([("web", be.address)], site)
            c = await tls_client(px.port, pki)
            for i in range(3):
                await c.send(get(f"/{i}", host="site.test"))
                r = await c.response()
                assert r.status == 200 and r.body == f"web GET /{i}\n".encode()
            await c.close()
            seen = be.requests[0]
            assert seen.header("x-forwarded-proto") == "https"
            assert seen.header("forwarded") == "for=127.0.0.1;proto=https"
            assert seen.header("x-forwarded-for") == "127.0.0.1"
            assert be.connections == 1
            await stop_proxy(px)
            # A trusted proxy in front says what it was spoken to with; we keep that.
            px = await start_tls_proxy([("web", be.address)], site,
                                       listener={"trusted_proxies": ["127.0.0.0/8"]})
            await tls_request(px.port, pki, get("/t", host="site.test",
                                                extra="X-Forwarded-Proto: http\r\n"))
            await tls_request(px.port, pki, get("/u", host="site.test"))
            assert be.requests[-2].header("x-forwarded-proto") == "http"
            assert be.requests[-1].header("x-forwarded-proto") == "https"
            assert be.requests[-1].header("forwarded") == "for=127.0.0.1;proto=https"
            await stop_proxy(px)

    run_on(loop, scenario())


def test_plain_listener_still_says_http_and_adds_no_hsts() -> None:
    async def scenario() -> None:
        be = Backend("web")
        async with running(be):
            px = await start_proxy([("web", be.address)])
            c = await RawClient.connect(px.port)
            await c.send(get("/"))
            r = await c.response()
            assert r.header("strict-transport-security") is None
            assert be.requests[0].header("x-forwarded-proto") == "http"
            assert px.server.hsts == b""  # type: ignore[union-attr]
            await c.close()
            await stop_proxy(px)

    asyncio.run(scenario())


def hsts_behaviour(seen: Seen, be: CountingBackend) -> Any:
    if seen.target == "/own":
        return (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                b"strict-transport-security: max-age=5\r\n\r\nok")
    if seen.target == "/chunked":
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    if seen.target == "/500":
        return b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"
    if seen.target == "/close":
        return None
    return ok_behaviour(seen, be)


@pytest.mark.parametrize("loop", LOOPS)
def test_hsts_added_once_kept_when_the_backend_has_its_own(
    loop: str, pki: Pki, site: Leaf
) -> None:
    async def scenario() -> None:
        be = Backend("web", hsts_behaviour)
        async with running(be):
            px = await start_tls_proxy(
                [("web", be.address)], site,
                listener={"tls": {"hsts_max_age_s": 31536000, "hsts_include_subdomains": True}})
            want = "max-age=31536000; includeSubDomains"
            c = await tls_client(px.port, pki)
            for path in ("/a", "/a", "/chunked", "/500", "/own", "/own", "/b"):
                await c.send(get(path, host="site.test"))
                r = await c.response()
                hs = [v for n, v in r.headers if n.lower() == "strict-transport-security"]
                assert hs == (["max-age=5"] if path == "/own" else [want]), (path, r.headers)
            # Answers pairlb makes itself get it too: a 502 (backend closed), a 400.
            await c.send(get("/close", host="site.test"))
            r = await c.response()
            assert r.status == 502 and r.header("strict-transport-security") == want
            await c.close()
            c = await tls_client(px.port, pki)
            await c.send(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
            r = await c.response()
            assert r.status == 400 and r.header("strict-transport-security") == want
            await c.close()
            await stop_proxy(px)
            # Without includeSubDomains; and off at 0.
            px = await start_tls_proxy([("web", be.address)], site,
                                       listener={"tls": {"hsts_max_age_s": 600}})
            r = await tls_request(px.port, pki, get("/x", host="site.test"))
            assert r.header("strict-transport-security") == "max-age=600"
            await stop_proxy(px)
            px = await start_tls_proxy([("web", be.address)], site)
            r = await tls_request(px.port, pki, get("/x", host="site.test"))
            assert r.header("strict-transport-security") is None
            assert px.server.hsts == b""  # type: ignore[union-attr]
            await stop_proxy(px)

    run_on(loop, scenario())


def test_503_without_backend_gets_hsts_and_head_gets_no_error_body(
    pki: Pki, site: Leaf
) -> None:
    async def scenario() -> None:
        port = free_port()  # nothing listens: refused, then no backend left
        px = await start_tls_proxy([("gone", f"127.0.0.1:{port}")], site,
                                   listener={"tls": {"hsts_max_age_s": 60}})
        c = await tls_client(px.port, pki)
        await c.send(get("/", host="site.test"))
        r = await c.response()
        assert r.status == 502 and r.header("strict-transport-security") == "max-age=60"
        # HEAD: the same answer without its body, so the connection stays in step.
        await c.send(b"HEAD / HTTP/1.1\r\nHost: site.test\r\n\r\n")
        raw = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
        assert raw.startswith(b"HTTP/1.1 50")
        await c.send(get("/again", host="site.test"))
        r = await c.response()
        assert r.status in (502, 503)
        await c.close()
        await stop_proxy(px)

    asyncio.run(scenario())


def test_acme_challenge_on_a_tls_listener(pki: Pki, site: Leaf, tmp_path: Path) -> None:
    async def scenario() -> None:
        (tmp_path / "tok_en-1").write_text("tok_en-1.thumb")
        be = Backend("web")
        async with running(be):
            px = await start_tls_proxy(
                [("web", be.address)], site,
                listener={"acme_challenge_dir": str(tmp_path), "tls": {"hsts_max_age_s": 60}})
            c = await tls_client(px.port, pki)
            await c.send(get("/.well-known/acme-challenge/tok_en-1", host="site.test"))
            r = await c.response()
            assert r.status == 200 and r.body == b"tok_en-1.thumb"
            assert r.header("strict-transport-security") == "max-age=60"
            await c.send(get("/.well-known/acme-challenge/../tok_en-1", host="site.test"))
            r = await c.response()
            assert r.status == 404 and r.header("strict-transport-security") == "max-age=60"
            await c.send(get("/app", host="site.test"))
            r = await c.response()
            assert r.status == 200 and r.body == b"web GET /app\n"
            await c.close()
            assert [s.target for s in be.requests] == ["/app"]
            srv = px.server
            assert (srv.acme_served, srv.acme_missing) == (1, 1)  # type: ignore[union-attr]
            await stop_proxy(px)

    asyncio.run(scenario())


@pytest.mark.parametrize("loop", LOOPS)
def test_client_closing_tls_logs_no_eof_warning(
    loop: str, pki: Pki, site: Leaf, caplog: pytest.LogCaptureFixture
) -> None:
    def beh(seen: Seen, be: CountingBackend) -> Any:
        out = ok_behaviour(seen, be)
        return ("delay", 0.2, out) if seen.target == "/slow" else out

    async def scenario() -> None:
        be = Backend("web", beh)
        async with running(be):
            px = await start_tls_proxy([("web", be.address)], site)
            for _ in range(3):
                c = await tls_client(px.port, pki)
                await c.send(get("/", host="site.test"))
                assert (await c.response()).status == 200
                await c.close()  # close_notify
            # EOF while an answer is due: no half-close over TLS, the exchange is cut.
            for _ in range(3):
                c = await tls_client(px.port, pki)
                await c.send(get("/slow", host="site.test"))
                await asyncio.sleep(0.05)
                await c.close()
            await asyncio.sleep(0.3)
            c = await tls_client(px.port, pki)
            c.writer.transport.abort()  # a bare reset
            await asyncio.sleep(0.2)
            assert not px.server.clients
            await stop_proxy(px)

    with caplog.at_level(logging.WARNING):
        run_on(loop, scenario())
    assert "eof_received" not in caplog.text


def test_curl_gets_the_backend_answer_over_tls(pki: Pki, site: Leaf) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("no curl")

    async def scenario() -> None:
        be = Backend("web")
        async with running(be):
            px = await start_tls_proxy([("web", be.address)], site,
                                       listener={"tls": {"hsts_max_age_s": 86400}})
            port = px.port
            proc = await asyncio.create_subprocess_exec(
                curl, "-sS", "-i", "--http1.1", "--cacert", str(pki.ca),
                "--resolve", f"site.test:{port}:127.0.0.1",
                f"https://site.test:{port}/hello?x=1", f"https://www.site.test:{port}/two",
                "--resolve", f"www.site.test:{port}:127.0.0.1",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err
            text = out.decode()
            assert text.count("HTTP/1.1 200 OK") == 2, text
            assert "web GET /hello?x=1" in text and "web GET /two" in text
            assert "Strict-Transport-Security: max-age=86400" in text
            assert [s.header("host") for s in be.requests] == [
                f"site.test:{port}", f"www.site.test:{port}"]
            assert all(s.header("x-forwarded-proto") == "https" for s in be.requests)
            # A client that does not trust the CA gets nothing through.
            proc = await asyncio.create_subprocess_exec(
                curl, "-sS", "--resolve", f"site.test:{port}:127.0.0.1",
                f"https://site.test:{port}/", stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode != 0
            assert len(be.requests) == 2
            await stop_proxy(px)

    uvloop.run(scenario())


# -- TLS to backends ------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("tls13", [True, False], ids=["tls13", "tls12"])
def test_backend_tls_verified_and_idle_connections_reused(
    loop: str, tls13: bool, pki: Pki
) -> None:
    leaf = pki.leaf("backend", ["backend.internal"], ["127.0.0.1"])

    async def scenario() -> None:
        be = tls_backend("tlsweb", leaf,
                        max_version=None if tls13 else ssl.TLSVersion.TLSv1_2)
        async with running(be):
            px = await start_tls_proxy(
                [("tlsweb", be.address)], None,
                pool={"tls": {"server_name": "backend.internal"}},
                backend_tls=backend_ctx(pki))
            c = await RawClient.connect(px.port)
            n = 200
            for i in range(n):
                await c.send(get(f"/{i}"))
                r = await c.response()
                assert r.status == 200 and r.body == f"tlsweb GET /{i}\n".encode()
                if i % 20 == 0:
                    await asyncio.sleep(0.01)  # idle a little: tickets, if any, arrive now
            await c.close()
            # One TLS connection served all of them: nothing was ever taken for stray.
            assert be.connections == 1, (be.connections, errors(px))
            assert errors(px) == {}
            assert len(be.requests) == n
            # Several clients at once: a few connections, each reused.
            clients = [await RawClient.connect(px.port) for _ in range(8)]

            async def many(cl: RawClient) -> None:
                for i in range(25):
                    await cl.send(get(f"/c{i}"))
                    assert (await cl.response()).status == 200

            await asyncio.gather(*(many(cl) for cl in clients))
            for cl in clients:
                await cl.close()
            assert be.connections <= 9 and errors(px) == {}
            await stop_proxy(px)

    run_on(loop, scenario())


@pytest.mark.parametrize("loop", LOOPS)
def test_backend_tls_ip_host_verified_against_ip_san(loop: str, pki: Pki) -> None:
    leaf = pki.leaf("backend-ip", ["other.internal"], ["127.0.0.1"])

    async def scenario() -> None:
        be = tls_backend("ipweb", leaf)
        async with running(be):
            # No server_name: the backend's host (an IP) is what is checked.
            px = await start_tls_proxy([("ipweb", be.address)], None, pool={"tls": {}},
                                       backend_tls=backend_ctx(pki))
            c = await RawClient.connect(px.port)
            await c.send(get("/ip"))
            assert (await c.response()).status == 200
            await c.close()
            await stop_proxy(px)

    run_on(loop, scenario())


@pytest.mark.parametrize("loop", LOOPS)
def test_backend_tls_wrong_name_fails_over_to_a_good_backend(loop: str, pki: Pki) -> None:
    good = pki.leaf("good", ["app.internal"])
    wrong = pki.leaf("wrong", ["someone-else.internal"])
    other_ca = Pki(pki.root / "other-ca")
    untrusted = other_ca.leaf("untrusted", ["app.internal"])

    async def scenario() -> None:
        bad1 = tls_backend("bad-name", wrong)
        bad2 = tls_backend("bad-ca", untrusted)
        ok = tls_backend("ok", good)
        async with running(bad1, bad2, ok):
            px = await start_tls_proxy(
                [("bad-name", bad1.address), ("bad-ca", bad2.address), ("ok", ok.address)],
                None, pool={"retries": 2, "tls": {"server_name": "app.internal"}},
                backend_tls=backend_ctx(pki))
            c = await RawClient.connect(px.port)
            for i in range(6):
                await c.send(get(f"/{i}"))
                r = await c.response()
                assert r.status == 200 and r.body.startswith(b"ok GET"), r
            await c.close()
            assert bad1.requests == [] and bad2.requests == [] and len(ok.requests) == 6
            errs = errors(px)
            assert errs["bad-name"].get("tls_verify", 0) >= 1, errs
            assert errs["bad-ca"].get("tls_verify", 0) >= 1, errs
            retries = px.stats.snapshot().get("retries", {}).get("p", {})
            assert retries.get("tls_verify", 0) >= 2, retries
            await stop_proxy(px)
            # Only the wrong one: 502, counted, nothing sent.
            px = await start_tls_proxy([("bad-name", bad1.address)], None,
                                       pool={"retries": 0,
                                             "tls": {"server_name": "app.internal"}},
                                       backend_tls=backend_ctx(pki))
            c = await RawClient.connect(px.port)
            await c.send(get("/x"))
            r = await c.response()
            assert r.status == 502
            await c.close()
            assert bad1.requests == []
            await stop_proxy(px)

    run_on(loop, scenario())


@pytest.mark.parametrize("loop", LOOPS)
def test_backend_that_does_not_speak_tls_is_a_handshake_failure(loop: str, pki: Pki) -> None:
    async def scenario() -> None:
        plain = Backend("plain")
        async with running(plain):
            px = await start_tls_proxy([("plain", plain.address)], None,
                                       pool={"retries": 0, "tls": {"server_name": "x.internal"}},
                                       backend_tls=backend_ctx(pki))
            c = await RawClient.connect(px.port)
            await c.send(get("/"))
            r = await c.response()
            assert r.status == 502
            await c.close()
            errs = errors(px)["plain"]
            assert set(errs) <= {"tls_handshake", "connect_failed"}, errs
            assert plain.requests == []
            await stop_proxy(px)

    run_on(loop, scenario())


def test_backend_tls_without_verify_accepts_any_certificate(pki: Pki) -> None:
    other = Pki(pki.root / "selfsigned-ca").leaf("lab", ["lab.internal"])

    async def scenario() -> None:
        be = tls_backend("lab", other)
        async with running(be):
            px = await start_tls_proxy([("lab", be.address)], None,
                                       pool={"tls": {"verify": False}},
                                       backend_tls=backend_ctx(None, verify=False))
            c = await RawClient.connect(px.port)
            await c.send(get("/"))
            assert (await c.response()).status == 200
            await c.close()
            await stop_proxy(px)

    asyncio.run(scenario())


def test_backend_tls_body_streams_and_stray_bytes_are_discarded(pki: Pki) -> None:
    leaf = pki.leaf("backend2", ["b.internal"])
    sent: list[Any] = []

    def beh(seen: Seen, be: CountingBackend) -> Any:
        if seen.target == "/stray":
            # A response, then a second one nobody asked for: the connection is not reused.
            return (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")
        if seen.target == "/late":
            conn = next(c for c in be.open if c.conn_id == seen.conn_id)
            sent.append(conn)
            return b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate"
        return (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(seen.body)) + seen.body

    async def scenario() -> None:
        be = tls_backend("b", leaf, beh)
        async with running(be):
            px = await start_tls_proxy([("b", be.address)], None,
                                       pool={"tls": {"server_name": "b.internal"}},
                                       backend_tls=backend_ctx(pki))
            c = await RawClient.connect(px.port)
            body = os.urandom(300_000)
            await c.send(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n"
                         % len(body) + body)
            r = await c.response(timeout_s=10)
            assert r.status == 200 and r.body == body
            await c.send(get("/stray"))
            r = await c.response()
            assert r.body == b"ok"
            await c.send(get("/next"))
            assert (await c.response()).status == 200
            assert be.connections == 2  # the one that sent two answers was dropped
            # Bytes arriving on an idle TLS connection (sent after it went idle).
            await c.send(get("/late"))
            assert (await c.response()).body == b"late"
            conn = sent[0]
            assert conn.transport is not None
            conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad")
            await asyncio.sleep(0.1)
            await c.send(get("/after"))
            r = await c.response()
            assert r.status == 200 and r.body == b""
            assert be.connections == 3
            assert errors(px)["b"].get("stray_bytes", 0) >= 1
            await c.close()
            await stop_proxy(px)

    asyncio.run(scenario())


def test_backend_closing_idle_tls_connection_is_not_reused(pki: Pki) -> None:
    leaf = pki.leaf("backend3", ["c.internal"])

    async def scenario() -> None:
        be = tls_backend("c", leaf)
        async with running(be):
            px = await start_tls_proxy([("c", be.address)], None,
                                       pool={"tls": {"server_name": "c.internal"}},
                                       backend_tls=backend_ctx(pki))
            c = await RawClient.connect(px.port)
            for i in range(3):
                await c.send(get(f"/{i}"))
                assert (await c.response()).status == 200
                # The backend closes its idle connections (close_notify, FIN).
                for conn in list(be.open):
                    assert conn.transport is not None
                    conn.transport.close()
                await asyncio.sleep(0.05)
            await c.close()
            assert be.connections == 3 and len(be.requests) == 3
            await stop_proxy(px)

    asyncio.run(scenario())


def test_reload_with_new_backend_context_drops_idle_tls_connections(pki: Pki) -> None:
    leaf = pki.leaf("backend4", ["d.internal"])

    def beh(seen: Seen, be: CountingBackend) -> Any:
        out = ok_behaviour(seen, be)
        return ("delay", 0.3, out) if seen.target == "/slow" else out

    async def scenario() -> None:
        be = tls_backend("d", leaf, beh)
        async with running(be):
            px = await start_tls_proxy([("d", be.address)], None,
                                       pool={"tls": {"server_name": "d.internal"}},
                                       backend_tls=backend_ctx(pki))
            srv = px.server
            assert isinstance(srv, ProxyServer)
            c = await RawClient.connect(px.port)
            await c.send(get("/1"))
            assert (await c.response()).status == 200
            assert sum(len(v) for v in srv.idle.values()) == 1
            # The same context again: kept; a new one (a reload): dropped.
            srv.routes_changed(srv.pools, srv.pool_cfgs, srv.backend_tls)
            assert sum(len(v) for v in srv.idle.values()) == 1
            srv.routes_changed(srv.pools, srv.pool_cfgs, {"p": backend_ctx(pki)})
            assert sum(len(v) for v in srv.idle.values()) == 0
            await c.send(get("/2"))
            assert (await c.response()).status == 200
            assert be.connections == 2
            # A reload while a request is in flight: that connection is not pooled after.
            await c.send(get("/slow"))
            await asyncio.sleep(0.05)
            srv.routes_changed(srv.pools, srv.pool_cfgs, {"p": backend_ctx(pki)})
            r = await c.response()
            assert r.status == 200 and r.body == b"d GET /slow\n"
            await c.send(get("/3"))
            assert (await c.response()).status == 200
            assert be.connections == 3
            # The pool turned plain: idle TLS connections are never reused for it.
            plain_cfg = px.pool_cfg.model_copy(update={"tls": None})
            srv.update(px.pool, plain_cfg)
            assert sum(len(v) for v in srv.idle.values()) == 0
            await c.close()
            await stop_proxy(px)

    asyncio.run(scenario())


def test_tls_both_sides_with_websocket_style_upgrade(pki: Pki, site: Leaf) -> None:
    leaf = pki.leaf("backend5", ["ws.internal"])

    class Echo(asyncio.Protocol):
        def __init__(self) -> None:
            self.t: Any = None
            self.upgraded = False
            self.buf = b""

        def connection_made(self, transport: Any) -> None:
            self.t = transport

        def data_received(self, data: bytes) -> None:
            if self.upgraded:
                self.t.write(data.upper())
                return
            self.buf += data
            if b"\r\n\r\n" in self.buf:
                self.upgraded = True
                self.t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n"
                             b"Connection: upgrade\r\n\r\n")
                rest = self.buf.split(b"\r\n\r\n", 1)[1]
                if rest:
                    self.t.write(rest.upper())

    async def scenario() -> None:
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(leaf.cert, leaf.key)
        server = await asyncio.get_running_loop().create_server(
            Echo, "127.0.0.1", 0, ssl=sctx)
        port = server.sockets[0].getsockname()[1]
        px = await start_tls_proxy([("ws", f"127.0.0.1:{port}")], site,
                                   pool={"tls": {"server_name": "ws.internal"}},
                                   backend_tls=backend_ctx(pki))
        c = await tls_client(px.port, pki)
        await c.send(b"GET /ws HTTP/1.1\r\nHost: site.test\r\nConnection: upgrade\r\n"
                     b"Upgrade: echo\r\n\r\n")
        head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        await c.send(b"hello")
        assert await asyncio.wait_for(c.reader.readexactly(5), 5) == b"HELLO"
        await c.close()
        await stop_proxy(px)
        server.close()

    asyncio.run(scenario())
