"""TCP mode with SNI routes: the ClientHello's server name chooses the pool, TLS passes through.

Real sockets on 127.0.0.1: a TcpProxyServer in this process; backends in threads that
terminate TLS with their own certificate (from tests/tls_helpers.Pki) when the first byte is
a TLS record and speak plain otherwise, say their name, then echo. Clients: openssl s_client,
Python's ssl module (a ClientHello split over two writes too) and raw bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import Daemon, wait_until
from proxy_helpers import free_port, run, wait_for
from tls_helpers import EchoBackend, Pki

from lb.config import ListenerConfig, PoolConfig, SniRoute
from lb.data.pool import Pool, build_pool
from lb.data.tcpproxy import (
    SNI_DECISIONS,
    SNI_PEEK_MAX,
    TcpProxyServer,
    _ClientSide,
    _PeekingClientSide,
)
from lb.listen import make_listen_socket
from lb.stats import Stats
from lb.tls.sni_peek import NEED_MORE, Hello, peek_sni

pytestmark = pytest.mark.timeout(120)


@dataclass
class Setup:
    pki: Pki
    backends: dict[str, EchoBackend] = field(default_factory=dict)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    s = Setup(pki)
    for name, dns in [("a1", ["a1.backend.test", "a.example.test"]),
                      ("a2", ["a2.backend.test", "a.example.test"]),
                      ("w1", ["w1.backend.test", "*.wild.example.test"]),
                      ("d1", ["d1.backend.test", "default.example.test"])]:
        s.backends[name] = EchoBackend(name, pki.leaf(name, dns), sniff=True)
    yield s
    for b in s.backends.values():
        b.stop()


def make_pool(cfg: PoolConfig) -> Pool:
    return build_pool(
        cfg.name, cfg.balance, [(b.name, *b.host_port, float(b.weight)) for b in cfg.backends],
        consecutive_failures=cfg.passive.consecutive_failures,
        local_eject_s=cfg.passive.eject_s, max_eject_percent=cfg.passive.max_eject_percent,
        seed=1)


@dataclass
class Px:
    server: TcpProxyServer
    port: int
    pools: dict[str, Pool]
    stats: Stats
    ejections: list[Any]

    @property
    def decisions(self) -> dict[str, int]:
        return {k: v for k, v in self.server.sni_decisions.items() if v}


@contextlib.asynccontextmanager
async def sni_proxy(s: Setup, *, timeout_s: float = 0.3,
                    pools: dict[str, list[tuple[str, str]]] | None = None,
                    routes: list[tuple[str, str]] | None = None,
                    pool_extra: dict[str, Any] | None = None) -> AsyncIterator[Px]:
    b = s.backends
    pools = pools or {"dflt": [("d1", b["d1"].address)],
                      "pa": [("a1", b["a1"].address), ("a2", b["a2"].address)],
                      "pw": [("w1", b["w1"].address)]}
    routes = routes or [("a.example.test", "pa"), ("*.wild.example.test", "pw"),
                        ("Other.Example.TEST.", "pa")]
    cfgs = {n: PoolConfig.model_validate(
        {"name": n, "backends": [{"name": bn, "address": ad} for bn, ad in bes],
         **(pool_extra or {})}) for n, bes in pools.items()}
    lcfg = ListenerConfig.model_validate({
        "name": "l", "bind": f"127.0.0.1:{free_port()}", "mode": "tcp", "pool": "dflt",
        "sni_routes": [{"server_name": n, "pool": p} for n, p in routes],
        "sni_inspect_timeout_s": timeout_s})
    wpools = {n: make_pool(c) for n, c in cfgs.items()}
    stats = Stats()
    ejections: list[Any] = []
    server = TcpProxyServer(lcfg, wpools["dflt"], cfgs["dflt"], stats,
                            on_ejection=ejections.append)
    server.routes_changed(wpools, cfgs, {})
    sock = make_listen_socket(lcfg)
    await server.start(sock)
    try:
        yield Px(server, sock.getsockname()[1], wpools, stats, ejections)
    finally:
        server.close()
        sock.close()
        await asyncio.sleep(0)


def client_ctx(s: Setup, check_hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(s.pki.ca))
    ctx.check_hostname = check_hostname
    return ctx


async def tls_greeting(port: int, ctx: ssl.SSLContext, host: str | None) -> tuple[str, str]:
    """(backend name, certificate subject CN) of a TLS connection through the proxy."""
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=host)
    try:
        greeting = (await asyncio.wait_for(r.readline(), 5)).decode().strip()
        w.write(b"ping\n")
        assert await asyncio.wait_for(r.readline(), 5) == b"ping\n"
        cert = w.get_extra_info("peercert")
        cn = dict(x[0] for x in cert["subject"])["commonName"]
        return greeting, cn
    finally:
        w.close()


# -- routing -------------------------------------------------------------------------------------


def test_openssl_s_client_reaches_the_routed_pool(setup: Setup) -> None:
    async def scenario() -> None:
        async with sni_proxy(setup) as px:
            seen = []
            for _ in range(2):
                proc = await asyncio.create_subprocess_exec(
                    "openssl", "s_client", "-connect", f"127.0.0.1:{px.port}",
                    "-servername", "a.example.test", "-CAfile", str(setup.pki.ca),
                    "-verify_return_error", "-ign_eof",
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                out, _ = await asyncio.wait_for(proc.communicate(b"hello bye\n"), 15)
                text = out.decode(errors="replace")
                assert "Verify return code: 0 (ok)" in text, text
                assert "hello bye" in text
                who = "a1" if "CN = a1.backend.test" in text else (
                    "a2" if "CN = a2.backend.test" in text else "?")
                assert f"\n{who}\n" in text, text  # the greeting: the same backend
                seen.append(who)
            assert sorted(seen) == ["a1", "a2"]  # round robin within the routed pool
            assert px.decisions == {"route": 2}
            snap = px.stats.snapshot()["tcp"]
            assert snap["pa"]["a1"]["connections"] == 1 and snap["pa"]["a2"]["connections"] == 1

    run(scenario())


def test_exact_wildcard_and_unmatched_names(setup: Setup) -> None:
    async def scenario() -> None:
        async with sni_proxy(setup) as px:
            ctx = client_ctx(setup)
            assert (await tls_greeting(px.port, ctx, "x.wild.example.test")) == \
                ("w1", "w1.backend.test")
            assert (await tls_greeting(px.port, ctx, "Y.Wild.Example.Test")) == \
                ("w1", "w1.backend.test")
            a = await tls_greeting(px.port, ctx, "a.example.test")
            assert a[0] in ("a1", "a2") and a[1] == f"{a[0]}.backend.test"
            # A route name given with capitals and a trailing dot matches too.
            lax = client_ctx(setup, check_hostname=False)
            assert (await tls_greeting(px.port, lax, "other.example.test"))[0] in ("a1", "a2")
            # A wildcard is one label: deeper names, and the bare parent, go to the default.
            assert await tls_greeting(px.port, lax, "a.b.wild.example.test") == \
                ("d1", "d1.backend.test")
            assert await tls_greeting(px.port, lax, "wild.example.test") == \
                ("d1", "d1.backend.test")
            assert await tls_greeting(px.port, ctx, "default.example.test") == \
                ("d1", "d1.backend.test")
            assert px.decisions == {"route": 4, "no_match": 3}

    run(scenario())


def test_no_sni_goes_to_the_default_pool(setup: Setup) -> None:
    async def scenario() -> None:
        async with sni_proxy(setup) as px:
            lax = client_ctx(setup, check_hostname=False)
            assert await tls_greeting(px.port, lax, None) == ("d1", "d1.backend.test")
            assert px.decisions == {"no_sni": 1}
            # The default pool got the ClientHello as the client sent it.
            assert peek_sni(setup.backends["d1"].first[-1]) == Hello(None)

    run(scenario())


def test_held_bytes_reach_the_backend_unchanged(setup: Setup) -> None:
    """A captured curl hello plus bytes behind it in the same write: forwarded as they are."""
    corpus = Path(__file__).parent / "corpus" / "client_hello" / "curl.hex"
    hello = bytes.fromhex("".join(x for x in corpus.read_text().splitlines()
                                  if not x.startswith("#")))
    tail = b"\x17\x03\x03\x00\x04abcd"

    async def scenario() -> None:
        pa = [setup.backends["a1"], setup.backends["a2"]]
        async with sni_proxy(setup, routes=[("curl.example.test", "pa")]) as px:
            before = [b.connections for b in pa]
            _r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.write(hello + tail)
            await wait_for(lambda: [b.connections for b in pa] != before)
            (got,) = [b for b, n in zip(pa, before, strict=True) if b.connections > n]
            assert got.first[-1] == hello + tail
            w.close()
            assert px.decisions == {"route": 1}

    run(scenario())


# -- the default pool: not TLS, timeouts, limits ------------------------------------------------


def test_plain_bytes_go_to_the_default_pool_at_once(setup: Setup) -> None:
    async def scenario() -> None:
        async with sni_proxy(setup, timeout_s=5.0) as px:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.write(b"hello bye\n")
            assert await asyncio.wait_for(r.readline(), 3) == b"d1\n"
            assert await asyncio.wait_for(r.readline(), 3) == b"hello bye\n"
            assert loop.time() - t0 < 1.0  # not after the 5 s inspect timeout
            w.close()
            assert px.decisions == {"not_tls": 1}
            assert setup.backends["d1"].first[-1] == b"hello bye\n"

    run(scenario())


def test_silent_client_goes_to_the_default_pool_after_the_timeout(setup: Setup) -> None:
    """A server-speaks-first protocol: the client waits for a greeting."""

    async def scenario() -> None:
        async with sni_proxy(setup, timeout_s=0.4) as px:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            r, w = await asyncio.open_connection("127.0.0.1", px.port)
            await asyncio.sleep(0.2)
            assert px.decisions == {}  # still waiting; no backend picked
            (pipe,) = px.server.clients
            assert pipe.backend is None
            assert await asyncio.wait_for(r.readline(), 5) == b"d1\n"
            assert 0.4 <= loop.time() - t0 < 2.5
            w.write(b"late bye\n")
            assert await asyncio.wait_for(r.readline(), 3) == b"late bye\n"
            w.close()
            assert px.decisions == {"timeout": 1}

    run(scenario())


def test_partial_hello_then_silence_times_out(setup: Setup) -> None:
    async def scenario() -> None:
        async with sni_proxy(setup, timeout_s=0.3) as px:
            _r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.write(b"\x16\x03\x01\x02\x00\x01")
            await wait_for(lambda: px.decisions == {"timeout": 1})
            await wait_for(lambda: setup.backends["d1"].first[-1:] == [b"\x16\x03\x01\x02\x00\x01"])
            w.close()

    run(scenario())


def _split_handshake(port: int, ctx: ssl.SSLContext, host: str, split: int,
                     pause: float) -> tuple[str, str]:
    """A TLS client whose ClientHello goes out in two writes ``pause`` apart (blocking)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(inc, out, server_hostname=host)
        with pytest.raises(ssl.SSLWantReadError):
            obj.do_handshake()
        hello = out.read()
        assert split < len(hello)
        s.sendall(hello[:split])
        time.sleep(pause)
        s.sendall(hello[split:])

        def pump() -> None:
            pending = out.read()
            if pending:
                s.sendall(pending)
            data = s.recv(65536)
            if not data:
                raise ConnectionError("closed")
            inc.write(data)

        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pump()
        line = b""
        while not line.endswith(b"\n"):
            try:
                line += obj.read(1)
            except ssl.SSLWantReadError:
                pump()
        cert = obj.getpeercert()
        assert cert is not None
        cn = dict(x[0] for x in cert["subject"])["commonName"]
        return line.decode().strip(), str(cn)


def test_split_client_hello_still_routes(setup: Setup) -> None:
    async def scenario() -> None:
        async with sni_proxy(setup, timeout_s=3.0) as px:
            ctx = client_ctx(setup)
            for split in (1, 5, 11, 100):
                name, cn = await asyncio.to_thread(
                    _split_handshake, px.port, ctx, "z.wild.example.test", split, 0.15)
                assert (name, cn) == ("w1", "w1.backend.test")
            assert px.decisions == {"route": 4}

    run(scenario())


def test_large_prefix_is_not_buffered_past_the_limit(setup: Setup) -> None:
    """TLS-looking bytes that never complete a hello (1-byte records of a hello declaring
    16 KiB): the pool is chosen at SNI_PEEK_MAX bytes, not at the timeout, not later."""
    hs = b"\x01" + (16 * 1024).to_bytes(3, "big") + os.urandom(8000)
    recs = b"".join(b"\x16\x03\x01\x00\x01" + hs[i:i + 1] for i in range(len(hs)))
    assert len(recs) > SNI_PEEK_MAX + 20000 and peek_sni(recs[:SNI_PEEK_MAX]) is NEED_MORE

    async def scenario() -> None:
        d1 = setup.backends["d1"]
        async with sni_proxy(setup, timeout_s=10.0) as px:
            _r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.write(recs[:SNI_PEEK_MAX - 1])
            await asyncio.sleep(0.3)
            assert px.decisions == {}  # one byte short of the limit: still waiting
            (pipe,) = px.server.clients
            assert pipe.client is not None and pipe.client.buf_bytes == SNI_PEEK_MAX - 1
            n = d1.connections
            w.write(recs[SNI_PEEK_MAX - 1:SNI_PEEK_MAX])
            await wait_for(lambda: px.decisions == {"oversize": 1})
            await wait_for(lambda: d1.connections > n)
            assert d1.first[-1][:SNI_PEEK_MAX] == recs[:SNI_PEEK_MAX]
            w.close()
            # All at once, and way past the limit: decided as well, at once.
            _r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.write(recs)
            await wait_for(lambda: px.decisions == {"oversize": 2})
            w.close()
            # Plain garbage past the limit: not TLS, from its first byte.
            _r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.write(b"\x00" * (SNI_PEEK_MAX + 5000))
            await wait_for(lambda: px.decisions == {"oversize": 2, "not_tls": 1})
            w.close()

    run(scenario())


def test_eof_and_close_before_the_hello(setup: Setup) -> None:
    async def scenario() -> None:
        d1 = setup.backends["d1"]
        async with sni_proxy(setup, timeout_s=10.0) as px:
            n = d1.connections
            _r, w = await asyncio.open_connection("127.0.0.1", px.port)
            w.write(b"\x16\x03")
            w.write_eof()
            await wait_for(lambda: px.decisions == {"eof": 1})
            await wait_for(lambda: d1.connections > n)
            assert d1.first[-1] == b"\x16\x03"
            w.close()
            # A client reset before sending anything: no pool.
            _r, w = await asyncio.open_connection("127.0.0.1", px.port)
            await wait_for(lambda: len(px.server.clients) == 1)
            w.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.close()
            await wait_for(lambda: px.decisions == {"eof": 1, "closed": 1})
            await wait_for(lambda: not px.server.clients)

    run(scenario())


# -- the chosen pool's failures ------------------------------------------------------------------


def test_dead_routed_pool_fails_over_and_ejects_in_that_pool(setup: Setup) -> None:
    async def scenario() -> None:
        b = setup.backends
        dead1, dead2 = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        pools = {"dflt": [("d1", b["d1"].address)],
                 "pdead": [("x1", dead1), ("x2", dead2), ("w1", b["w1"].address)]}
        async with sni_proxy(setup, pools=pools, routes=[("*.wild.example.test", "pdead")],
                             pool_extra={"passive": {"consecutive_failures": 1,
                                                     "max_eject_percent": 100}}) as px:
            ctx = client_ctx(setup)
            for _ in range(3):
                assert (await tls_greeting(px.port, ctx, "q.wild.example.test"))[0] == "w1"
            snap = px.stats.snapshot()
            assert snap["retries"]["pdead"]["connect_refused"] >= 2
            assert {(e.pool, e.backend) for e in px.ejections} == {("pdead", "x1"),
                                                                    ("pdead", "x2")}
            assert px.decisions == {"route": 3}
            await wait_for(lambda: not px.server.clients)

    run(scenario())


def test_listener_without_routes_keeps_the_plain_path(setup: Setup) -> None:
    async def scenario() -> None:
        cfg = PoolConfig.model_validate(
            {"name": "p", "backends": [{"name": "d1", "address": setup.backends["d1"].address}]})
        lcfg = ListenerConfig.model_validate(
            {"name": "l", "bind": f"127.0.0.1:{free_port()}", "mode": "tcp", "pool": "p"})
        server = TcpProxyServer(lcfg, make_pool(cfg), cfg, Stats())
        assert server.sni_table is None
        proto = server.protocol()  # a plain client (spliced later or not), not a peeking one
        assert isinstance(proto, _ClientSide) and not isinstance(proto, _PeekingClientSide)
        assert set(server.sni_decisions) == set(SNI_DECISIONS)
        assert not any(server.sni_decisions.values())

    run(scenario())


def test_a_reload_changes_the_routes_of_new_connections(setup: Setup) -> None:
    """The worker hands a reloaded listener to its server (listener_changed): the next
    connection routes by the new table, without a new socket or worker."""
    async def scenario() -> None:
        async with sni_proxy(setup) as px:
            lax = client_ctx(setup, check_hostname=False)
            assert (await tls_greeting(px.port, lax, "a.example.test"))[0] in ("a1", "a2")
            moved = px.server.listener.model_copy(update={"sni_routes": (
                SniRoute(server_name="a.example.test", pool="pw"),)})
            px.server.listener_changed(moved)
            assert await tls_greeting(px.port, lax, "a.example.test") == \
                ("w1", "w1.backend.test")
            assert await tls_greeting(px.port, lax, "x.wild.example.test") == \
                ("d1", "d1.backend.test")  # its route is gone: the default pool

    run(scenario())


# -- a real node -------------------------------------------------------------------------------


class TcpNode(Daemon):
    """``pairlb run`` with a TCP listener routing by SNI and a plain TCP listener: what the
    in-process tests above cannot show (the config's trip to the workers, uvloop)."""

    def __init__(self, tmp: Path, s: Setup) -> None:
        super().__init__(tmp)
        self.sni_port, self.tcp_port = free_port(), free_port()
        b = s.backends
        self.config.write_text(f"""
[node]
name = "tcp1"
workers = 2
shutdown_timeout_s = 2.0

[[listener]]
name = "sni"
bind = "127.0.0.1:{self.sni_port}"
mode = "tcp"
pool = "dflt"
sni_routes = [{{ server_name = "a.example.test", pool = "pa" }},
              {{ server_name = "*.wild.example.test", pool = "pw" }}]
sni_inspect_timeout_s = 0.5

[[listener]]
name = "tcp"
bind = "127.0.0.1:{self.tcp_port}"
mode = "tcp"
pool = "pa"

[[pool]]
name = "dflt"
backends = [{{ name = "d1", address = "{b['d1'].address}" }}]
[pool.health]
type = "tcp"

[[pool]]
name = "pa"
backends = [{{ name = "a1", address = "{b['a1'].address}" }},
            {{ name = "a2", address = "{b['a2'].address}" }}]
[pool.health]
type = "tcp"

[[pool]]
name = "pw"
backends = [{{ name = "w1", address = "{b['w1'].address}" }}]
[pool.health]
type = "tcp"

[admin]
bind = "127.0.0.1:{self.admin_port}"
token_file = "{self.token_file}"
""")


def test_a_node_routes_by_sni_and_pipes_a_server_that_speaks_first(
        setup: Setup, tmp_path: Path) -> None:
    with TcpNode(tmp_path, setup) as node:
        async def scenario() -> None:
            lax = client_ctx(setup, check_hostname=False)
            for _ in range(10):
                assert (await tls_greeting(node.sni_port, lax, "a.example.test"))[0] in (
                    "a1", "a2")
                assert (await tls_greeting(node.sni_port, lax, "x.wild.example.test"))[0] == "w1"
                assert (await tls_greeting(node.sni_port, lax, "other.test"))[0] == "d1"

            async def greeting() -> bytes:
                r, w = await asyncio.open_connection("127.0.0.1", node.tcp_port)
                try:
                    return await asyncio.wait_for(r.readline(), 5)
                finally:
                    w.close()

            # The backend speaks first (once its 0.3 s wait for a TLS record is over): its
            # greeting arrives on every one of 40 connections, open at once (one after the
            # other they were 12 s of that wait).
            greetings = await asyncio.gather(*(greeting() for _ in range(40)))
            assert len(greetings) == 40 and set(greetings) <= {b"a1\n", b"a2\n"}, greetings

        run(scenario())
        wait_until(lambda: node.status()["listeners"][0].get("sni_decisions", {}).get(
            "route", 0) >= 20, 5.0, "the workers' counts")
        st = node.status()["listeners"][0]
        assert st["sni_routes"] == {"a.example.test": "pa", "*.wild.example.test": "pw"}
        assert st["sni_decisions"]["route"] == 20 and st["sni_decisions"]["no_match"] == 10
