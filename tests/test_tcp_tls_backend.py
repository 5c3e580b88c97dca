"""TCP mode to a ``[pool.tls]`` pool: the proxy speaks TLS to the backends, verifying them.

Real sockets on 127.0.0.1, on asyncio and on uvloop (what the workers run): TLS backends in
threads with certificates from tests/tls_helpers.Pki; the pool's context made as the worker
makes it (lb.tls.contexts.client_context). A verification failure is a connect failure:
counted, retried on another backend, fed to the passive check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop
from proxy_helpers import free_port, wait_for
from tls_helpers import EchoBackend, Leaf, Pki

from lb.config import ListenerConfig, ListenerTlsConfig, PoolConfig
from lb.data.pool import Pool, build_pool
from lb.data.tcpproxy import TcpProxyServer
from lb.listen import make_listen_socket
from lb.stats import Stats
from lb.tls import contexts
from lb.tls.files import CertBundle
from lb.tls.server import ListenerTls

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def backends(pki: Pki) -> Iterator[dict[str, EchoBackend]]:
    bes = {
        "ip1": EchoBackend("ip1", pki.leaf("ip1", ["ip1.backend.test"], ips=["127.0.0.1"])),
        "ip2": EchoBackend("ip2", pki.leaf("ip2", ["ip2.backend.test"], ips=["127.0.0.1"])),
        "named": EchoBackend("named", pki.leaf("named", ["backend.internal.test"])),
        "named2": EchoBackend("named2", pki.leaf("named", ["backend.internal.test"])),
        "plain": EchoBackend("plain", None),
    }
    yield bes
    for b in bes.values():
        b.stop()


@dataclass
class Px:
    server: TcpProxyServer
    port: int
    pool: Pool
    stats: Stats
    ejections: list[Any]


@contextlib.asynccontextmanager
async def tls_pool_proxy(pki: Pki, bes: list[EchoBackend], tls: dict[str, Any] | None,
                         *, listener: dict[str, Any] | None = None,
                         pool: dict[str, Any] | None = None,
                         listener_tls: Leaf | None = None) -> AsyncIterator[Px]:
    cfg = PoolConfig.model_validate({
        "name": "p", "backends": [{"name": b.name, "address": b.address} for b in bes],
        "tls": {"ca_file": str(pki.ca), **tls} if tls is not None else None,
        "passive": {"consecutive_failures": 1, "max_eject_percent": 100}, **(pool or {})})
    lcfg = ListenerConfig.model_validate({
        "name": "l", "bind": f"127.0.0.1:{free_port()}", "mode": "tcp", "pool": "p",
        **(listener or {})})
    wpool = build_pool("p", cfg.balance,
                       [(b.name, *b.host_port, float(b.weight)) for b in cfg.backends],
                       consecutive_failures=1, local_eject_s=10, max_eject_percent=100, seed=1)
    backend_tls = {}
    if cfg.tls is not None:
        backend_tls["p"] = contexts.client_context(
            verify=cfg.tls.verify, ca_pem=pki.ca.read_bytes(), min_version=cfg.tls.min_version)
    stats = Stats()
    ejections: list[Any] = []
    server = TcpProxyServer(lcfg, wpool, cfg, stats, on_ejection=ejections.append)
    server.routes_changed({"p": wpool}, {"p": cfg}, backend_tls)
    if listener_tls is not None:
        settings = ListenerTlsConfig.model_validate({"certificates": [
            {"cert_file": str(listener_tls.cert), "key_file": str(listener_tls.key)}]})
        lt = ListenerTls("l", settings, stats)
        pem = listener_tls.cert.read_bytes() + listener_tls.key.read_bytes()
        lt.load([CertBundle(str(listener_tls.cert), str(listener_tls.key), ("front.test",), (),
                            0.0, 0.0, "x", pem)])
        server.tls = lt
    sock = make_listen_socket(lcfg)
    await server.start(sock)
    try:
        yield Px(server, sock.getsockname()[1], wpool, stats, ejections)
    finally:
        server.close()
        sock.close()
        await asyncio.sleep(0)


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run_on(loop: str, coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(main())


async def exchange(port: int, payload: bytes, *, eof: bool = True,
                   ssl_ctx: ssl.SSLContext | None = None) -> tuple[bytes, bytes]:
    """Send ``payload`` (then EOF), read to the end: (greeting line, the rest)."""
    r, w = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ssl_ctx, server_hostname="front.test" if ssl_ctx else None)
    try:
        async def writer() -> None:
            for i in range(0, len(payload), 65536):
                w.write(payload[i:i + 65536])
                await w.drain()
            if eof and w.can_write_eof():
                w.write_eof()

        task = asyncio.create_task(writer())
        greeting = await asyncio.wait_for(r.readline(), 10)
        rest = await asyncio.wait_for(r.read(), 20)
        await task
        return greeting, rest
    finally:
        w.close()


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_pipes_to_a_tls_backend_verified_by_ip(loop: str, pki: Pki,
                                               backends: dict[str, EchoBackend]) -> None:
    """No server_name: the backend's IP is verified against the certificate's IP SANs."""

    async def scenario() -> None:
        async with tls_pool_proxy(pki, [backends["ip1"]], {}) as px:
            payload = os.urandom(2 * 1024 * 1024) + b"bye\n"
            greeting, rest = await exchange(px.port, payload, eof=False)
            assert greeting == b"ip1\n"
            assert hashlib.sha256(rest).digest() == hashlib.sha256(payload).digest()
            assert backends["ip1"].sni[-1] is None  # no SNI is sent for an IP address
            await wait_for(lambda: not px.server.clients)
            snap = px.stats.snapshot()
            assert snap["tcp"]["p"]["ip1"]["connections"] == 1
            assert snap["tcp"]["p"]["ip1"]["bytes_in"] == len(payload)
            assert not snap.get("errors")

    run_on(loop, scenario())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_server_name_is_sent_and_verified(loop: str, pki: Pki,
                                          backends: dict[str, EchoBackend]) -> None:
    async def scenario() -> None:
        async with tls_pool_proxy(pki, [backends["named"]],
                                  {"server_name": "backend.internal.test"}) as px:
            greeting, rest = await exchange(px.port, b"hello bye\n", eof=False)
            assert (greeting, rest) == (b"named\n", b"hello bye\n")
            assert backends["named"].sni[-1] == "backend.internal.test"
            assert not px.ejections

    run_on(loop, scenario())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_client_eof_before_and_after_the_tls_backend_connects(
        loop: str, pki: Pki, backends: dict[str, EchoBackend]) -> None:
    """A TLS connection cannot be half-closed: the client's EOF is not passed on, the
    backend stays open for its answer, and its close ends the pipe."""

    async def scenario() -> None:
        async with tls_pool_proxy(pki, [backends["ip1"]], {}) as px:
            # EOF at once: still held while the backend connection is being made.
            greeting, rest = await exchange(px.port, b"early bye\n", eof=True)
            assert (greeting, rest) == (b"ip1\n", b"early bye\n")
            # EOF once connected: the answer after it still arrives.
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            assert await asyncio.wait_for(r.readline(), 5) == b"ip1\n"
            w.write(b"late bye\n")
            w.write_eof()
            assert await asyncio.wait_for(r.read(), 5) == b"late bye\n"
            w.close()
            await wait_for(lambda: not px.server.clients)
            # No EOF from the backend either (it waits for more): the idle timeout ends it.
        async with tls_pool_proxy(pki, [backends["ip1"]], {},
                                  listener={"client_idle_timeout_s": 0.4}) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            assert await asyncio.wait_for(r.readline(), 5) == b"ip1\n"
            w.write(b"ping\n")
            w.write_eof()
            assert await asyncio.wait_for(r.readline(), 5) == b"ping\n"
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            await wait_for(lambda: not px.server.clients)

    run_on(loop, scenario())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_wrong_name_fails_the_connection_as_a_connect_failure(
        loop: str, pki: Pki, backends: dict[str, EchoBackend], caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        caplog.set_level(logging.WARNING)
        bes = [backends["named"], backends["named2"]]
        async with tls_pool_proxy(pki, bes, {"server_name": "wrong.example.test"},
                                  pool={"retries": 1}) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            assert await asyncio.wait_for(r.read(), 10) == b""  # closed, nothing sent
            w.close()
            await wait_for(lambda: not px.server.clients)
            snap = px.stats.snapshot()
            assert snap["errors"]["p"] == {"named": {"tls_verify": 1},
                                           "named2": {"tls_verify": 1}}
            assert snap["retries"]["p"] == {"tls_verify": 1}
            assert "tcp" not in snap or not snap["tcp"].get("p")
            assert sorted((e.backend, str(e.outcome)) for e in px.ejections) == \
                [("named", "connect_failed"), ("named2", "connect_failed")]
        assert "reason=tls_verify" in caplog.text
        # By IP, a certificate without the IP in its SANs fails the same way.
        async with tls_pool_proxy(pki, [backends["named"]], {}, pool={"retries": 0}) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()
            assert px.stats.snapshot()["errors"]["p"] == {"named": {"tls_verify": 1}}

    run_on(loop, scenario())


def test_failure_on_one_backend_is_retried_on_another(pki: Pki,
                                                      backends: dict[str, EchoBackend]) -> None:
    async def scenario() -> None:
        bes = [backends["named"], backends["ip2"]]  # by IP: only ip2's certificate fits
        async with tls_pool_proxy(pki, bes, {}) as px:
            for _ in range(3):
                greeting, rest = await exchange(px.port, b"x bye\n", eof=False)
                assert (greeting, rest) == (b"ip2\n", b"x bye\n")
            snap = px.stats.snapshot()
            assert snap["errors"]["p"] == {"named": {"tls_verify": 1}}  # then ejected
            assert [e.backend for e in px.ejections] == ["named"]

    run_on("asyncio", scenario())


def test_untrusted_certificate_and_verify_off(pki: Pki, tmp_path_factory: pytest.TempPathFactory,
                                              backends: dict[str, EchoBackend]) -> None:
    other = Pki(tmp_path_factory.mktemp("other-ca"))

    async def scenario() -> None:
        async with tls_pool_proxy(other, [backends["ip1"]], {}, pool={"retries": 0}) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()
            assert px.stats.snapshot()["errors"]["p"] == {"ip1": {"tls_verify": 1}}
        # verify = false: a lab backend with the wrong name and an unknown CA is accepted.
        async with tls_pool_proxy(other, [backends["named"]],
                                  {"verify": False, "server_name": "wrong.example.test"}) as px:
            assert await exchange(px.port, b"lab bye\n", eof=False) == (b"named\n",
                                                                         b"lab bye\n")

    run_on("asyncio", scenario())


def test_plain_backend_in_a_tls_pool_is_a_tls_failure(pki: Pki,
                                                      backends: dict[str, EchoBackend]) -> None:
    async def scenario() -> None:
        async with tls_pool_proxy(pki, [backends["plain"]], {}, pool={"retries": 0}) as px:
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            assert await asyncio.wait_for(r.read(), 10) == b""
            w.close()
            assert px.stats.snapshot()["errors"]["p"] == {"plain": {"tls_handshake": 1}}

    run_on("asyncio", scenario())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_tls_listener_to_tls_backend(loop: str, pki: Pki, backends: dict[str, EchoBackend],
                                     caplog: pytest.LogCaptureFixture) -> None:
    """TLS on both sides (terminated, then re-encrypted): neither side can be half-closed;
    nothing raises."""
    front = pki.leaf("front", ["front.test"])

    async def scenario() -> None:
        caplog.set_level(logging.DEBUG)
        client = ssl.create_default_context(cafile=str(pki.ca))
        async with tls_pool_proxy(pki, [backends["ip1"]], {}, listener_tls=front) as px:
            greeting, rest = await exchange(px.port, b"both bye\n", eof=False, ssl_ctx=client)
            assert (greeting, rest) == (b"ip1\n", b"both bye\n")
            # The client closes first (close_notify): the pipe ends, the backend is closed.
            r, w = await asyncio.open_connection("127.0.0.1", px.port, ssl=client,
                                                 server_hostname="front.test")
            assert await asyncio.wait_for(r.readline(), 5) == b"ip1\n"
            w.close()
            await wait_for(lambda: not px.server.clients, 5)
            assert not px.ejections
        assert "Traceback" not in caplog.text and "NotImplementedError" not in caplog.text

    run_on(loop, scenario())
