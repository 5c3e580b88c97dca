"""redirect_to_https and acme_challenge_dir (issue 15): answers the proxy gives itself, on
real sockets, with a counting backend proving nothing reached it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from proxy_helpers import (
    CountingBackend,
    RawClient,
    Response,
    free_port,
    get,
    proxy_in_front_of,
    request,
    run,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)

TOKEN = "Xj4_bG-9kLmQ2rT5vW8yZ1aB3cD6eF7gH0iJ"
KEY_AUTH = TOKEN + ".nP0Cw3qz1lA8VmHk2yT5rX9sD4fG7jB6eW1uI0oLpQa"


def redirect_listener(**extra: Any) -> dict[str, Any]:
    return {"redirect_to_https": True, **extra}


async def one(port: int, data: bytes) -> Response:
    return await request(port, data)


async def head_answer(c: RawClient) -> tuple[int, dict[str, str]]:
    """The answer to a HEAD, read by hand (the client's parser cannot know it has no body)."""
    raw = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    lines = raw.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:] if line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()}


# -- redirects -------------------------------------------------------------------------------


def test_get_and_head_get_301_with_host_port_stripped_and_keep_alive() -> None:
    async def scenario() -> None:
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be], listener=redirect_listener()) as px:
            c = await RawClient.connect(px.port)
            await c.send(get("/a/b?x=1&y=%2F", host="site.example:8080"))
            r = await c.response()
            assert r.status == 301 and r.reason == "Moved Permanently"
            assert r.header("location") == "https://site.example/a/b?x=1&y=%2F"
            assert r.header("content-length") == "0"
            assert r.body == b""
            assert r.header("connection") is None and r.keep_alive
            # The same connection goes on: HEAD, then GET again.
            await c.send(b"HEAD /h HTTP/1.1\r\nHost: site.example\r\n\r\n")
            r = await c.response()
            assert r.status == 301 and r.header("location") == "https://site.example/h"
            await c.send(get("/again", host="SITE.example"))
            r = await c.response()
            assert r.header("location") == "https://SITE.example/again"
            await c.close()
            assert px.server.redirects == 3  # type: ignore[union-attr]
        assert be.requests == [] and be.connections == 0
        await be.stop()

    run(scenario())


def test_other_methods_get_308_and_a_body_is_not_forwarded() -> None:
    async def scenario() -> None:
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be], listener=redirect_listener()) as px:
            for method in ("DELETE", "OPTIONS", "PUT"):
                r = await one(px.port, f"{method} /m HTTP/1.1\r\nHost: a.test\r\n\r\n".encode())
                assert r.status == 308 and r.reason == "Permanent Redirect", method
                assert r.header("location") == "https://a.test/m"
            # A body-bearing request is answered at once, then the connection closes (the
            # rest of the body is read and dropped, so the answer is not reset away).
            c = await RawClient.connect(px.port)
            await c.send(b"POST /form HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100000\r\n\r\n"
                         + b"x" * 30000)
            r = await c.response()
            assert r.status == 308 and r.header("location") == "https://a.test/form"
            assert r.header("connection") == "close"
            await c.send(b"x" * 70000)
            assert await c.closed()
            await c.close()
            # Chunked, whole in one write: same.
            c = await RawClient.connect(px.port)
            await c.send(b"POST /c HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n0\r\n\r\n")
            r = await c.response()
            assert r.status == 308 and r.header("connection") == "close"
            assert await c.closed()
            await c.close()
            # OPTIONS * names the root.
            r = await one(px.port, b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n")
            assert r.status == 308 and r.header("location") == "https://a.test/"
        assert be.requests == [] and be.connections == 0
        await be.stop()

    run(scenario())


def test_slow_body_gets_its_308_before_the_body_ends() -> None:
    async def scenario() -> None:
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be], listener=redirect_listener()) as px:
            c = await RawClient.connect(px.port)
            await c.send(b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 1000000\r\n\r\n")
            r = await c.response()
            assert r.status == 308 and r.header("connection") == "close"
            for _ in range(10):
                await c.send(b"y" * 10000)  # read and dropped while lingering, no reset
                await asyncio.sleep(0.01)
            assert await c.closed(timeout_s=5)
            await c.close()
        assert be.requests == []
        await be.stop()

    run(scenario())


@pytest.mark.parametrize(
    ("host", "https_port", "location"),
    [
        ("example.com", 443, "https://example.com/p?q=1"),
        ("example.com:80", 443, "https://example.com/p?q=1"),
        ("example.com:", 443, "https://example.com/p?q=1"),
        ("example.com.", 443, "https://example.com./p?q=1"),
        ("[2001:db8::1]:8080", 443, "https://[2001:db8::1]/p?q=1"),
        ("[::ffff:10.0.0.1]", 443, "https://[::ffff:10.0.0.1]/p?q=1"),
        ("10.1.2.3:80", 8443, "https://10.1.2.3:8443/p?q=1"),
        ("example.com:8080", 8443, "https://example.com:8443/p?q=1"),
        ("under_score.internal", 443, "https://under_score.internal/p?q=1"),
    ],
)
def test_location_from_host_variants(host: str, https_port: int, location: str) -> None:
    async def scenario() -> None:
        be = await CountingBackend("web").start()
        lst = redirect_listener(https_port=https_port)
        async with proxy_in_front_of([be], listener=lst) as px:
            r = await one(px.port, get("/p?q=1", host=host))
            assert r.status == 301
            assert r.header("location") == location
        assert be.requests == []
        await be.stop()

    run(scenario())


def test_hostless_and_absolute_form_requests() -> None:
    async def scenario() -> None:
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be], listener=redirect_listener(https_port=8443)) as px:
            # HTTP/1.0 without Host: the address the client connected to.
            c = await RawClient.connect(px.port)
            await c.send(b"GET /old HTTP/1.0\r\n\r\n")
            r = await c.response()
            assert r.status == 301 and r.header("location") == "https://127.0.0.1:8443/old"
            assert r.header("connection") == "close"
            assert await c.closed()
            await c.close()
            # HTTP/1.0 keep-alive is kept.
            c = await RawClient.connect(px.port)
            await c.send(b"GET /k HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n")
            r = await c.response()
            assert r.status == 301 and r.header("connection") == "keep-alive"
            await c.send(b"GET /k2 HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n")
            assert (await c.response()).header("location") == "https://a.test:8443/k2"
            await c.close()
            # An empty Host (a target without authority): the local address too.
            r = await one(px.port, b"GET /e HTTP/1.1\r\nHost:\r\n\r\n")
            assert r.status == 301 and r.header("location") == "https://127.0.0.1:8443/e"
            # Absolute form: its authority is the host.
            r = await one(px.port, b"GET http://abs.test:81/x?y HTTP/1.1\r\nHost: other\r\n\r\n")
            assert r.status == 301 and r.header("location") == "https://abs.test:8443/x?y"
        assert be.requests == []
        await be.stop()

    run(scenario())


def test_pipelined_requests_each_get_their_redirect_in_order() -> None:
    async def scenario() -> None:
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be], listener=redirect_listener()) as px:
            c = await RawClient.connect(px.port)
            await c.send(get("/1", host="a.test") + get("/2", host="b.test")
                         + b"POST /3 HTTP/1.1\r\nHost: c.test\r\nContent-Length: 2\r\n\r\nhi"
                         + get("/4", host="d.test"))
            rs = await c.responses(4)
            assert [(r.status, r.header("location")) for r in rs] == [
                (301, "https://a.test/1"), (301, "https://b.test/2"),
                (308, "https://c.test/3"),
            ]
            # The POST was answered before its body was read (the engine's rule for its own
            # answers): Connection: close, and what follows is not answered.
            assert rs[2].header("connection") == "close"
            assert await c.closed()
            await c.close()
            c = await RawClient.connect(px.port)
            await c.send(get("/1", host="a.test") + get("/2", host="b.test")
                         + b"DELETE /3 HTTP/1.1\r\nHost: c.test\r\n\r\n" + get("/4", host="d.test"))
            rs = await c.responses(4)
            assert [(r.status, r.header("location")) for r in rs] == [
                (301, "https://a.test/1"), (301, "https://b.test/2"),
                (308, "https://c.test/3"), (301, "https://d.test/4"),
            ]
            assert all(r.keep_alive for r in rs)
            await c.close()
        assert be.requests == []
        await be.stop()

    run(scenario())


@pytest.mark.parametrize(
    "host",
    [
        b"evil.com%0d%0aSet-Cookie:%20x=1",  # percent-encoding: refused, never decoded
        b"evil.com/path",  # ends the authority
        b"user@evil.com",
        b"evil.com\\@good.com",
        b"evil.com?x",
        b"evil.com#x",
        b"a b",
        b"[zz::1]",
        b"[::1",
        b"::1",
        b"-leading.dash",
        b"evil.com:80:80",
        b"evil.com:port",
        b"x!$&'()*+;=.test",
    ],
)
def test_hostile_host_gets_400_and_no_redirect(host: bytes) -> None:
    async def scenario() -> None:
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be], listener=redirect_listener()) as px:
            r = await one(px.port, b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            assert r.status == 400, r
            assert r.header("location") is None
            assert r.header("connection") == "close"
            bad = px.stats.snapshot().get("bad_requests", {}).get("l", {})
            assert set(bad) <= {"bad_host", "bad_redirect_host", "bad_header_value"}, bad
            assert px.server.redirects == 0  # type: ignore[union-attr]
        assert be.requests == [] and be.connections == 0
        await be.stop()

    run(scenario())


def test_two_hosts_and_crlf_in_host_are_refused_before_any_redirect() -> None:
    async def scenario() -> None:
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be], listener=redirect_listener()) as px:
            r = await one(px.port, b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: evil\r\n\r\n")
            assert r.status == 400 and r.header("location") is None
            c = await RawClient.connect(px.port)
            await c.send(b"GET / HTTP/1.1\r\nHost: a.test\rLocation: x\r\n\r\n")
            r = await c.response()
            assert r.status == 400 and r.header("location") is None
            await c.close()
        assert be.requests == []
        await be.stop()

    run(scenario())


def test_without_redirect_requests_reach_the_backend() -> None:
    async def scenario() -> None:
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be]) as px:
            r = await one(px.port, get("/x"))
            assert r.status == 200 and r.header("location") is None
        assert len(be.requests) == 1
        await be.stop()

    run(scenario())


# -- ACME challenges ---------------------------------------------------------------------------


@pytest.fixture
def acme_dir(tmp_path: Path) -> Path:
    d = tmp_path / "webroot" / ".well-known" / "acme-challenge"
    d.mkdir(parents=True)
    (d / TOKEN).write_text(KEY_AUTH)
    os.chmod(d / TOKEN, 0o644)
    return d


def test_challenge_served_from_the_directory_and_missing_is_404(acme_dir: Path) -> None:
    async def scenario() -> None:
        be = await CountingBackend("web").start()
        lst = {"acme_challenge_dir": str(acme_dir)}
        async with proxy_in_front_of([be], listener=lst) as px:
            c = await RawClient.connect(px.port)
            await c.send(get(f"/.well-known/acme-challenge/{TOKEN}", host="site.example"))
            r = await c.response()
            assert r.status == 200 and r.body == KEY_AUTH.encode()
            assert r.header("content-type") == "application/octet-stream"
            assert r.header("content-length") == str(len(KEY_AUTH))
            assert r.keep_alive
            await c.send(f"HEAD /.well-known/acme-challenge/{TOKEN} HTTP/1.1\r\n"
                         "Host: site.example\r\n\r\n".encode())
            status, fields = await head_answer(c)
            assert status == 200 and fields["content-length"] == str(len(KEY_AUTH))
            await c.send(get("/.well-known/acme-challenge/nosuchtoken"))
            r = await c.response()
            assert r.status == 404 and r.keep_alive
            await c.send(b"HEAD /.well-known/acme-challenge/nosuchtoken HTTP/1.1\r\n"
                         b"Host: a\r\n\r\n")
            status, fields = await head_answer(c)
            assert status == 404 and "connection" not in fields
            # Other paths still go to the backend, on the same connection.
            await c.send(get("/.well-known/acme-challenge"))
            r = await c.response()
            assert r.status == 200 and r.body.startswith(b"web GET")
            await c.close()
            # A certificate renewal writes a new token: seen at once.
            (acme_dir / "second-token").write_bytes(b"abc.def")
            r = await one(px.port, get("/.well-known/acme-challenge/second-token"))
            assert r.status == 200 and r.body == b"abc.def"
            srv = px.server
            assert (srv.acme_served, srv.acme_missing) == (3, 2)  # type: ignore[union-attr]
        assert [s.target for s in be.requests] == ["/.well-known/acme-challenge"]
        await be.stop()

    run(scenario())


@pytest.mark.parametrize(
    "target",
    [
        "/.well-known/acme-challenge/",
        "/.well-known/acme-challenge/../../../etc/passwd",
        "/.well-known/acme-challenge/..",
        "/.well-known/acme-challenge/%2e%2e%2fsecret",
        "/.well-known/acme-challenge/..%2Fsecret",
        f"/.well-known/acme-challenge/{TOKEN}?x=1",
        f"/.well-known/acme-challenge/{TOKEN}/",
        f"/.well-known/acme-challenge/{TOKEN}/x",
        f"/.well-known/acme-challenge/{TOKEN}%00",
        "/.well-known/acme-challenge/a.b",
        "/.well-known/acme-challenge/" + "a" * 256,
    ],
)
def test_anything_else_under_the_prefix_is_404_here(acme_dir: Path, target: str) -> None:
    async def scenario() -> None:
        (acme_dir.parent.parent.parent / "secret").write_text("top secret")
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be], listener={"acme_challenge_dir": str(acme_dir)}) as px:
            r = await one(px.port, get(target))
            assert r.status == 404, (target, r)
            assert b"secret" not in r.body and b"root:" not in r.body
        assert be.requests == []
        await be.stop()

    run(scenario())


def test_other_methods_under_the_prefix_are_404(acme_dir: Path) -> None:
    async def scenario() -> None:
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be], listener={"acme_challenge_dir": str(acme_dir)}) as px:
            for method in ("POST", "PUT", "DELETE", "OPTIONS"):
                r = await one(px.port, f"{method} /.well-known/acme-challenge/{TOKEN} HTTP/1.1"
                                       "\r\nHost: a\r\nContent-Length: 0\r\n\r\n".encode())
                assert r.status == 404 and r.body == b"Not found.\n", method
            # With a body: answered, then closed.
            c = await RawClient.connect(px.port)
            await c.send(f"POST /.well-known/acme-challenge/{TOKEN} HTTP/1.1\r\nHost: a\r\n"
                         "Content-Length: 5\r\n\r\nhello".encode())
            r = await c.response()
            assert r.status == 404 and r.header("connection") == "close"
            assert await c.closed()
            await c.close()
        assert be.requests == []
        await be.stop()

    run(scenario())


def test_symlinks_and_odd_files_are_not_served(acme_dir: Path, tmp_path: Path) -> None:
    async def scenario() -> None:
        outside = tmp_path / "outside-secret"
        outside.write_text("top secret")
        (acme_dir / "link").symlink_to(outside)
        (acme_dir / "rellink").symlink_to("../../../outside-secret")
        (acme_dir / "inlink").symlink_to(TOKEN)  # even one pointing inside
        (acme_dir / "subdir").mkdir()
        os.mkfifo(acme_dir / "fifo")
        (acme_dir / "big").write_bytes(b"x" * (64 * 1024 + 1))
        (acme_dir / "max").write_bytes(b"y" * (64 * 1024))
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be], listener={"acme_challenge_dir": str(acme_dir)}) as px:
            for name in ("link", "rellink", "inlink", "subdir", "fifo", "big"):
                r = await one(px.port, get(f"/.well-known/acme-challenge/{name}"))
                assert r.status == 404, name
                assert b"secret" not in r.body
            r = await one(px.port, get("/.well-known/acme-challenge/max"))
            assert r.status == 200 and r.body == b"y" * (64 * 1024)
        assert be.requests == []
        await be.stop()

    run(scenario())


def test_missing_directory_is_404_until_it_exists(tmp_path: Path) -> None:
    async def scenario() -> None:
        d = tmp_path / "later"
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be], listener={"acme_challenge_dir": str(d)}) as px:
            r = await one(px.port, get(f"/.well-known/acme-challenge/{TOKEN}"))
            assert r.status == 404
            d.mkdir()
            (d / TOKEN).write_text(KEY_AUTH)
            r = await one(px.port, get(f"/.well-known/acme-challenge/{TOKEN}"))
            assert r.status == 200 and r.body == KEY_AUTH.encode()
        await be.stop()

    run(scenario())


def test_challenge_on_a_redirect_listener_is_served_not_redirected(acme_dir: Path) -> None:
    async def scenario() -> None:
        be = await CountingBackend("web").start()
        lst = redirect_listener(acme_challenge_dir=str(acme_dir), https_port=8443)
        async with proxy_in_front_of([be], listener=lst) as px:
            c = await RawClient.connect(px.port)
            await c.send(get(f"/.well-known/acme-challenge/{TOKEN}", host="site.example"))
            r = await c.response()
            assert r.status == 200 and r.body == KEY_AUTH.encode()
            assert r.header("location") is None
            await c.send(get("/.well-known/acme-challenge/missing", host="site.example"))
            r = await c.response()
            assert r.status == 404 and r.header("location") is None
            await c.send(get("/index.html", host="site.example"))
            r = await c.response()
            assert r.status == 301
            assert r.header("location") == "https://site.example:8443/index.html"
            # HTTP/1.0 without Host, as some validators send.
            await c.send(f"GET /.well-known/acme-challenge/{TOKEN} HTTP/1.0\r\n\r\n".encode())
            r = await c.response()
            assert r.status == 200 and r.body == KEY_AUTH.encode()
            await c.close()
            srv = px.server
            assert (srv.redirects, srv.acme_served, srv.acme_missing) == (  # type: ignore[union-attr]
                1, 2, 1)
        assert be.requests == [] and be.connections == 0
        await be.stop()

    run(scenario())


def test_challenge_dir_that_cannot_be_opened_is_404_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        not_a_dir = tmp_path / "file"
        not_a_dir.write_text("x")
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be], listener={"acme_challenge_dir": str(not_a_dir)}) as px:
            for _ in range(3):
                r = await one(px.port, get(f"/.well-known/acme-challenge/{TOKEN}"))
                assert r.status == 404
            assert px.server.acme_missing == 3  # type: ignore[union-attr]
        await be.stop()

    run(scenario())
    # Logged once (at most one a minute: anyone may ask for any token).
    assert caplog.text.count("acme_challenge_refused") == 1


def test_challenge_unreadable_by_the_worker_user_is_404(acme_dir: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")

    async def scenario() -> None:
        os.chmod(acme_dir / TOKEN, 0o000)
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be], listener={"acme_challenge_dir": str(acme_dir)}) as px:
            r = await one(px.port, get(f"/.well-known/acme-challenge/{TOKEN}"))
            assert r.status == 404
        await be.stop()

    run(scenario())


def test_draining_listener_closes_after_a_redirect() -> None:
    async def scenario() -> None:
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be], listener=redirect_listener()) as px:
            c = await RawClient.connect(px.port)
            await c.send(get("/1"))
            assert (await c.response()).keep_alive
            px.server.draining = True  # type: ignore[union-attr]
            await c.send(get("/2"))
            r = await c.response()
            assert r.status == 301 and r.header("connection") == "close"
            await wait_for(lambda: not px.server.clients)
            await c.close()
        await be.stop()

    run(scenario())


def test_hostless_redirect_names_the_address_connected_to() -> None:
    async def scenario() -> None:
        be = await CountingBackend("web").start()
        port = free_port("127.0.0.5")
        lst = redirect_listener(bind=f"127.0.0.5:{port}")
        async with proxy_in_front_of([be], listener=lst) as px:
            c = await RawClient.connect(px.port, host="127.0.0.5")
            await c.send(b"GET /x HTTP/1.0\r\n\r\n")
            r = await c.response()
            assert r.header("location") == "https://127.0.0.5/x"
            await c.close()
        await be.stop()

    run(scenario())


def test_local_address_of_an_ipv6_connection_is_bracketed() -> None:
    from lb.config import ListenerConfig, PoolConfig
    from lb.data import proxy as P
    from lb.data.pool import build_pool
    from lb.stats import Stats

    class T:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return ("2001:db8::5", 80, 0, 0) if name == "sockname" else default

    # A real server and client (the compiled _Client cannot be made without __init__).
    srv = P.ProxyServer(
        ListenerConfig.model_validate({"name": "l", "bind": "127.0.0.1:1", "pool": "p"}),
        build_pool("p", "round_robin", [("b1", "127.0.0.1", 9, 1.0)], seed=1),
        PoolConfig.model_validate(
            {"name": "p", "backends": [{"name": "b1", "address": "127.0.0.1:9"}]}),
        Stats())
    c = P._Client(srv)
    c.transport = T()
    assert c._local_address() == b"[2001:db8::5]"


@pytest.mark.parametrize(
    ("host", "port", "want"),
    [
        (b"a.test", 443, b"https://a.test/t"),
        (b"a.test:8080", 443, b"https://a.test/t"),
        (b"[::1]:80", 8443, b"https://[::1]:8443/t"),
        (b"[::1]", 443, b"https://[::1]/t"),
        (b"[1:2:3:4:5:6:7:8:9]", 443, None),
        (b"[::1]x", 443, None),
        (b"a.test@b", 443, None),
        (b"", 443, None),
        (b"a" * 300, 443, None),
    ],
)
def test_https_location(host: bytes, port: int, want: bytes | None) -> None:
    from lb.data.headers import https_location

    assert https_location(host, b"/t", port) == want


def test_challenge_between_proxied_requests_pipelined(acme_dir: Path) -> None:
    async def scenario() -> None:
        be = await CountingBackend("web").start()
        async with proxy_in_front_of([be], listener={"acme_challenge_dir": str(acme_dir)}) as px:
            c = await RawClient.connect(px.port)
            await c.send(get("/app1") + get(f"/.well-known/acme-challenge/{TOKEN}")
                         + get("/.well-known/acme-challenge/nope") + get("/app2"))
            rs = await c.responses(4)
            assert [r.status for r in rs] == [200, 200, 404, 200]
            assert rs[0].body == b"web GET /app1\n" and rs[1].body == KEY_AUTH.encode()
            assert rs[3].body == b"web GET /app2\n"
            assert all(r.keep_alive for r in rs)
            await c.close()
        assert [s.target for s in be.requests] == ["/app1", "/app2"]
        await be.stop()

    run(scenario())
