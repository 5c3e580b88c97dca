"""PROXY protocol end to end (issue 17).

One real pairlb node (``python -m lb run``, uvloop workers) among real servers, all on
127.0.0.0/8 (clients bind 127.0.0.2 or 127.0.0.3 so addresses tell who is who):

- sending: TCP listeners whose pools have ``send_proxy_protocol`` v1 / v2 in front of nginx
  (``listen ... proxy_protocol``, answering ``$proxy_protocol_addr``; once over TLS, the
  header before the handshake) and HAProxy (``bind ... accept-proxy``, answering ``%[src]``);
- accepting: HAProxy in front of pairlb (``send-proxy``, ``send-proxy-v2``), curl
  ``--haproxy-protocol`` and raw headers into a TCP listener with ``accept_proxy_protocol``
  (trusted_proxies 127.0.0.1/32); refusals (untrusted header, missing, invalid, silent)
  closed without a byte and counted in /metrics;
- HTTP mode accepting (the HTTP engine's part, lb.data.proxy).

Then, in process (lb.data.tcpproxy's TcpProxyServer): the edges a real node shows badly: a
header trickled byte by byte, SNI routing after a header, an untrusted client's held prefix,
a server that speaks first, the header sent again on a retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import Daemon, parse_metrics, total, wait_port, wait_until
from proxy_helpers import free_port, run, start_proxy, stop_proxy, wait_for
from tls_helpers import Pki

from lb.config import ListenerConfig, PoolConfig
from lb.data import proxyproto as pp
from lb.data.pool import build_pool
from lb.data.tcpproxy import TcpProxyServer
from lb.listen import make_listen_socket
from lb.stats import Stats

pytestmark = pytest.mark.timeout(120)

NGINX = "/usr/sbin/nginx"
HAPROXY = "/usr/sbin/haproxy"
CLIENT = "127.0.0.2"
STRANGER = "127.0.0.3"
"""Not in trusted_proxies (127.0.0.1/32)."""

needs_servers = pytest.mark.skipif(
    not (os.access(NGINX, os.X_OK) and os.access(HAPROXY, os.X_OK)
         and shutil.which("curl")),
    reason="needs /usr/sbin/nginx, /usr/sbin/haproxy and curl",
)
"""The HTTP engine's part (lb.data.proxy) is the lead's; these pass once it is wired."""


# -- real servers -----------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


ECHO_PP = ('"pp=$proxy_protocol_addr:$proxy_protocol_port>'
           '$proxy_protocol_server_addr:$proxy_protocol_server_port peer=$remote_addr\\n"')


def nginx_conf(tmp: Path, pp_port: int, pp_tls_port: int, plain_port: int, cert: Path,
               key: Path) -> str:
    return f"""
daemon off;
master_process off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx.error.log warn;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    default_type text/plain;
    log_format pp '$proxy_protocol_addr:$proxy_protocol_port $remote_addr "$request" $status';
    access_log {tmp}/nginx.access.log pp;
    server {{
        listen 127.0.0.1:{pp_port} proxy_protocol;
        location / {{ return 200 {ECHO_PP}; }}
    }}
    server {{
        listen 127.0.0.1:{pp_tls_port} ssl proxy_protocol;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ return 200 {ECHO_PP}; }}
    }}
    server {{
        listen 127.0.0.1:{plain_port};
        location / {{ return 200 "xff=$http_x_forwarded_for peer=$remote_addr\\n"; }}
    }}
}}
"""


def haproxy_conf(pp_port: int, fronts: dict[str, tuple[int, int, str]]) -> str:
    """A backend role on ``pp_port`` (accept-proxy, answers what it was told) and a TCP
    front per name: (its port, pairlb's port, send-proxy option)."""
    out = [f"""
global
    maxconn 200
defaults
    timeout connect 3s
    timeout client 10s
    timeout server 10s
frontend be_accept
    mode http
    bind 127.0.0.1:{pp_port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "src=%[src]:%[src_port]>%[dst]:%[dst_port]\\n"
"""]  # noqa: E501
    for name, (port, to, option) in fronts.items():
        out.append(f"""
frontend {name}
    mode tcp
    bind 127.0.0.1:{port}
    default_backend {name}_be
backend {name}_be
    mode tcp
    server s1 127.0.0.1:{to} {option}
""")
    return "".join(out)


@dataclass
class Lab:
    node: Daemon
    ports: dict[str, int]
    tmp: Path

    def metric(self, listener: str, reason: str) -> float:
        return total(parse_metrics(self.node.metrics()), "pairlb_bad_requests_total",
                     listener=listener, reason=reason)


class Node(Daemon):
    def __init__(self, tmp: Path, p: dict[str, int], pki: Pki) -> None:
        super().__init__(tmp)
        nginx_pp = f"127.0.0.1:{p['nginx_pp']}"

        def tcp(name: str, pool: str, extra: str = "") -> str:
            return (f'[[listener]]\nname = "{name}"\nbind = "127.0.0.1:{p[name]}"\n'
                    f'mode = "tcp"\npool = "{pool}"\n{extra}\n')

        def pool(name: str, address: str, send: str, extra: str = "") -> str:
            return (f'[[pool]]\nname = "{name}"\nsend_proxy_protocol = "{send}"\n'
                    f'backends = [{{ name = "b", address = "{address}" }}]\n'
                    f'[pool.health]\nenabled = false\n{extra}\n')

        tls = f'[pool.tls]\nca_file = "{pki.ca}"\nserver_name = "backend.test"'
        accept = ('accept_proxy_protocol = true\ntrusted_proxies = ["127.0.0.1/32"]\n'
                  "client_header_timeout_s = 1.0\n")
        self.config.write_text(f"""
[node]
name = "pp1"
workers = 1
shutdown_timeout_s = 1.0
state_dir = "{tmp / 'state'}"

{tcp("to_nginx_v1", "nginx_v1")}
{tcp("to_nginx_v2", "nginx_v2")}
{tcp("to_nginx_tls", "nginx_tls")}
{tcp("to_haproxy_v1", "haproxy_v1")}
{tcp("to_haproxy_v2", "haproxy_v2")}
{tcp("acc_tcp", "nginx_v2", accept)}
[[listener]]
name = "acc_http"
bind = "127.0.0.1:{p['acc_http']}"
pool = "plain"
{accept}

{pool("nginx_v1", nginx_pp, "v1")}
{pool("nginx_v2", nginx_pp, "v2")}
{pool("nginx_tls", f"127.0.0.1:{p['nginx_pp_tls']}", "v2", tls)}
{pool("haproxy_v1", f"127.0.0.1:{p['haproxy_pp']}", "v1")}
{pool("haproxy_v2", f"127.0.0.1:{p['haproxy_pp']}", "v2")}
{pool("plain", f"127.0.0.1:{p['nginx_plain']}", "off")}

[admin]
bind = "127.0.0.1:{self.admin_port}"
token_file = "{self.token_file}"
""")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if not (os.access(NGINX, os.X_OK) and os.access(HAPROXY, os.X_OK)):
        pytest.skip("needs nginx and haproxy")
    tmp = tmp_path_factory.mktemp("pp")
    pki = Pki(tmp / "pki")
    leaf = pki.leaf("backend", ["backend.test"])
    names = ["nginx_pp", "nginx_pp_tls", "nginx_plain", "haproxy_pp", "front_v1", "front_v2",
             "front_http", "to_nginx_v1", "to_nginx_v2", "to_nginx_tls", "to_haproxy_v1",
             "to_haproxy_v2", "acc_tcp", "acc_http"]
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(names):
        ports = {n: free_port() for n in names}
    (tmp / "nginx.conf").write_text(nginx_conf(tmp, ports["nginx_pp"], ports["nginx_pp_tls"],
                                               ports["nginx_plain"], leaf.cert, leaf.key))
    (tmp / "haproxy.cfg").write_text(haproxy_conf(ports["haproxy_pp"], {
        "front_v1": (ports["front_v1"], ports["acc_tcp"], "send-proxy"),
        "front_v2": (ports["front_v2"], ports["acc_tcp"], "send-proxy-v2"),
        "front_http": (ports["front_http"], ports["acc_http"], "send-proxy"),
    }))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(tmp / "servers.log", "ab") as log:
            procs.append(subprocess.Popen(
                [NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
            procs.append(subprocess.Popen(
                [HAPROXY, "-db", "-f", str(tmp / "haproxy.cfg")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        for name in ("nginx_pp", "nginx_pp_tls", "nginx_plain", "haproxy_pp", "front_v1"):
            wait_port(ports[name])
        with Node(tmp, ports, pki) as node:
            yield Lab(node, ports, tmp)
    finally:
        for proc in procs:
            _stop(proc)


# -- clients ----------------------------------------------------------------------------------


def request(port: int, *, src: str = CLIENT, prefix: bytes = b"",
            timeout_s: float = 5.0) -> tuple[str, int]:
    """One GET on a new connection from ``src`` (``prefix`` sent first, in the same write);
    returns (the answer's body, our port)."""
    with socket.socket() as s:
        s.settimeout(timeout_s)
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(prefix + b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), data
        return body.decode().strip(), s.getsockname()[1]


def refused(port: int, data: bytes, *, src: str = CLIENT, wait_s: float = 5.0) -> float:
    """Send ``data`` (maybe nothing); the connection must be closed without a byte. Returns
    how long that took."""
    with socket.socket() as s:
        s.settimeout(wait_s)
        s.bind((src, 0))
        s.connect(("127.0.0.1", port))
        t0 = time.monotonic()
        if data:
            s.sendall(data)
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                got += chunk
        assert got == b"", got
        return time.monotonic() - t0


# -- sending ----------------------------------------------------------------------------------


@needs_servers
@pytest.mark.parametrize("listener", ["to_nginx_v1", "to_nginx_v2", "to_nginx_tls"])
def test_nginx_backend_sees_the_client_address(lab: Lab, listener: str) -> None:
    port = lab.ports[listener]
    body, cport = request(port)
    # peer: the TCP peer nginx sees (pairlb); pp: what pairlb's header told it
    assert body == f"pp={CLIENT}:{cport}>127.0.0.1:{port} peer=127.0.0.1", body
    log = (lab.tmp / "nginx.access.log").read_text()
    assert f"{CLIENT}:{cport} 127.0.0.1 " in log


@needs_servers
@pytest.mark.parametrize("listener", ["to_haproxy_v1", "to_haproxy_v2"])
def test_haproxy_backend_sees_the_client_address(lab: Lab, listener: str) -> None:
    port = lab.ports[listener]
    body, cport = request(port)
    assert body == f"src={CLIENT}:{cport}>127.0.0.1:{port}", body


# -- accepting on a TCP listener --------------------------------------------------------------


@needs_servers
@pytest.mark.parametrize("front", ["front_v1", "front_v2"])
def test_haproxy_in_front_its_client_address_reaches_the_backend(lab: Lab, front: str) -> None:
    """client 127.0.0.2 -> HAProxy (send-proxy[-v2]) -> pairlb (accept, then v2) -> nginx."""
    port = lab.ports[front]
    body, cport = request(port)
    # The destination relayed is the one HAProxy's client connected to.
    assert body == f"pp={CLIENT}:{cport}>127.0.0.1:{port} peer=127.0.0.1", body


@needs_servers
def test_curl_haproxy_protocol_into_a_tcp_listener(lab: Lab) -> None:
    port = lab.ports["acc_tcp"]
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "5", "--haproxy-protocol",
         f"http://127.0.0.1:{port}/"], capture_output=True, check=True, timeout=10)
    # curl 7.x says its own address (the trusted one here); the header was read and dropped.
    assert out.stdout.decode().startswith("pp=127.0.0.1:"), out
    assert out.stdout.decode().endswith(f">127.0.0.1:{port} peer=127.0.0.1\n"), out


@needs_servers
def test_raw_headers_from_a_trusted_proxy(lab: Lab) -> None:
    port = lab.ports["acc_tcp"]
    v1 = b"PROXY TCP4 203.0.113.9 198.51.100.7 4242 8443\r\n"
    assert request(port, src="127.0.0.1", prefix=v1)[0] == (
        "pp=203.0.113.9:4242>198.51.100.7:8443 peer=127.0.0.1")
    v2 = pp.encode_v2(("2001:db8::9", 5353), ("2001:db8::1", 443))
    assert request(port, src="127.0.0.1", prefix=v2)[0] == (
        "pp=2001:db8::9:5353>2001:db8::1:443 peer=127.0.0.1")
    # LOCAL (an upstream's health check) and UNKNOWN: the real peer
    body, cport = request(port, src="127.0.0.1", prefix=pp.encode_v2(None, None))
    assert body == f"pp=127.0.0.1:{cport}>127.0.0.1:{port} peer=127.0.0.1"
    body, cport = request(port, src="127.0.0.1", prefix=b"PROXY UNKNOWN\r\n")
    assert body == f"pp=127.0.0.1:{cport}>127.0.0.1:{port} peer=127.0.0.1"


@needs_servers
def test_refusals_are_closed_without_a_byte_and_counted(lab: Lab) -> None:
    port = lab.ports["acc_tcp"]
    before = {r: lab.metric("acc_tcp", r) for r in pp.REASONS}
    header = b"PROXY TCP4 6.6.6.6 127.0.0.1 1 2\r\n"
    # someone else with a header, whole or just its signature
    refused(port, header + b"GET / HTTP/1.1\r\n\r\n", src=STRANGER)
    refused(port, pp.V2_SIGNATURE, src=STRANGER)
    # someone else without: an ordinary client, seen as itself
    body, cport = request(port, src=STRANGER)
    assert body == f"pp={STRANGER}:{cport}>127.0.0.1:{port} peer=127.0.0.1"
    # a trusted proxy without a header, with a bad one, with none in time
    refused(port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", src="127.0.0.1")
    refused(port, b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", src="127.0.0.1")
    took = refused(port, b"", src="127.0.0.1")  # client_header_timeout_s = 1
    assert 0.8 < took < 3.0, took
    took = refused(port, b"PROXY TCP4 1.2.3.4", src="127.0.0.1")
    assert 0.8 < took < 3.0, took
    want = {pp.UNTRUSTED: 2, pp.MISSING: 2, pp.INVALID: 2}

    def counted() -> dict[str, float]:
        return {r: lab.metric("acc_tcp", r) - before[r] for r in pp.REASONS}

    wait_until(lambda: counted() == want, 10.0, f"bad requests {want}")


# -- accepting on an HTTP listener (lb.data.proxy) --------------------------------------------


@needs_servers
def test_http_listener_curl_haproxy_protocol(lab: Lab) -> None:
    port = lab.ports["acc_http"]
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "5", "--haproxy-protocol",
         f"http://127.0.0.1:{port}/"], capture_output=True, check=True, timeout=10)
    assert out.stdout.decode() == "xff=127.0.0.1 peer=127.0.0.1\n", out


@needs_servers
def test_http_listener_takes_the_client_address_from_the_header(lab: Lab) -> None:
    port = lab.ports["acc_http"]
    v1 = b"PROXY TCP4 203.0.113.9 198.51.100.7 4242 80\r\n"
    assert request(port, src="127.0.0.1", prefix=v1)[0] == "xff=203.0.113.9 peer=127.0.0.1"
    v2 = pp.encode_v2(("198.51.100.20", 1), ("198.51.100.7", 80))
    assert request(port, src="127.0.0.1", prefix=v2)[0] == "xff=198.51.100.20 peer=127.0.0.1"
    # through HAProxy (send-proxy) from 127.0.0.2
    assert request(lab.ports["front_http"])[0] == f"xff={CLIENT} peer=127.0.0.1"


@needs_servers
def test_http_listener_refuses_an_untrusted_header(lab: Lab) -> None:
    port = lab.ports["acc_http"]
    before = lab.metric("acc_http", pp.UNTRUSTED), lab.metric("acc_http", pp.MISSING)
    refused(port, b"PROXY TCP4 6.6.6.6 127.0.0.1 1 2\r\nGET / HTTP/1.1\r\n\r\n", src=STRANGER)
    refused(port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", src="127.0.0.1")
    assert request(port, src=STRANGER)[0] == f"xff={STRANGER} peer=127.0.0.1"
    wait_until(lambda: (lab.metric("acc_http", pp.UNTRUSTED) - before[0],
                        lab.metric("acc_http", pp.MISSING) - before[1]) == (1, 1),
               10.0, "one untrusted and one missing")


# -- in process: the TCP engine's edges -------------------------------------------------------


class Recorder:
    """A TCP backend that records what each connection sent and answers each read with
    ``ack``; ``greet`` is sent first, ``greet_after_s`` after the connection is made."""

    def __init__(self, greet: bytes = b"", greet_after_s: float = 0.0) -> None:
        self.greet = greet
        self.greet_after_s = greet_after_s
        self.got: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> Recorder:
        async def greet(w: asyncio.StreamWriter) -> None:
            await asyncio.sleep(self.greet_after_s)
            w.write(self.greet)

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            i = len(self.got)
            self.got.append(b"")
            task = asyncio.ensure_future(greet(w)) if self.greet else None
            with contextlib.suppress(ConnectionError):
                while data := await r.read(65536):
                    self.got[i] += data
                    if data.endswith(b"\n"):
                        w.write(b"ack\n")
            if task is not None:
                task.cancel()
            w.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()


ACCEPT = {"accept_proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"],
          "client_header_timeout_s": 0.5}


async def _open(port: int, src: str = "127.0.0.1") -> tuple[asyncio.StreamReader,
                                                            asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))


def _pipe(px: Any) -> Any:
    server: TcpProxyServer = px.server
    (pipe,) = server.clients
    return pipe


def test_header_trickled_byte_by_byte_then_data_and_the_address_exposed() -> None:
    async def scenario() -> None:
        be = await Recorder().start()
        px = await start_proxy([("b", be.address)], mode="tcp", listener=ACCEPT,
                               pool={"send_proxy_protocol": "v1"})
        try:
            _, w = await _open(px.port)
            header = pp.encode_v2(("192.0.2.5", 1234), ("192.0.2.80", 443))
            for i in range(len(header) - 1):
                w.write(header[i:i + 1])
                await w.drain()
                await asyncio.sleep(0.002)
            await asyncio.sleep(0.05)
            assert be.got == []  # no backend before the whole header
            w.write(header[-1:] + b"hello")
            await wait_for(lambda: be.got == [
                b"PROXY TCP4 192.0.2.5 192.0.2.80 1234 443\r\nhello"])
            assert _pipe(px).client_addr == ("192.0.2.5", 1234)
            w.close()
        finally:
            await stop_proxy(px)

    run(scenario())


def test_untrusted_prefix_holds_both_ways_then_passes_or_is_refused_in_time() -> None:
    """A stranger's "PRO" might start a header: nothing passes either way (not the
    backend's greeting either) until "MPT" makes it a client's bytes; "PROX" and then
    nothing is refused when client_header_timeout_s is up, without a byte."""

    async def scenario() -> None:
        be = await Recorder(greet=b"hi\n", greet_after_s=0.1).start()
        px = await start_proxy([("b", be.address)], mode="tcp", listener=ACCEPT,
                               pool={"send_proxy_protocol": "v2"})
        try:
            r, w = await _open(px.port, STRANGER)
            w.write(b"PRO")
            head = pp.encode_v2((STRANGER, w.get_extra_info("sockname")[1]),
                                ("127.0.0.1", px.port))
            await wait_for(lambda: be.got == [head])  # connected at once, "PRO" held
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(r.readline(), 0.3)  # the greeting held too
            w.write(b"MPT\n")
            assert await asyncio.wait_for(r.readline(), 3.0) == b"hi\n"
            assert await asyncio.wait_for(r.readline(), 3.0) == b"ack\n"
            assert be.got == [head + b"PROMPT\n"]
            w.close()

            r, w = await _open(px.port, STRANGER)
            w.write(b"PROX")
            t0 = time.monotonic()
            assert await asyncio.wait_for(r.read(), 3.0) == b""
            assert 0.4 < time.monotonic() - t0 < 2.0
            assert px.stats.snapshot()["bad_requests"] == {"l": {pp.UNTRUSTED: {"0": 1}}}
            assert be.got[1] == pp.encode_v2((STRANGER, w.get_extra_info("sockname")[1]),
                                             ("127.0.0.1", px.port))
        finally:
            await stop_proxy(px)
            be.stop()

    run(scenario())


def test_a_server_that_speaks_first_greets_an_untrusted_client_that_sends_nothing() -> None:
    async def scenario() -> None:
        be = await Recorder(greet=b"220 ready\r\n").start()
        px = await start_proxy([("b", be.address)], mode="tcp", listener=ACCEPT)
        try:
            r, w = await _open(px.port, STRANGER)
            assert await asyncio.wait_for(r.readline(), 3.0) == b"220 ready\r\n"
            await asyncio.sleep(0.7)  # past the header time: nothing held, nothing to refuse
            w.write(b"HELO x\r\n")
            assert await asyncio.wait_for(r.readline(), 3.0) == b"ack\n"
            assert be.got == [b"HELO x\r\n"]
            w.close()
        finally:
            await stop_proxy(px)

    run(scenario())


def test_a_retry_sends_the_header_again_to_the_next_backend() -> None:
    async def scenario() -> None:
        be = await Recorder().start()
        dead = f"127.0.0.1:{free_port()}"
        px = await start_proxy([("dead", dead), ("b", be.address)], mode="tcp",
                               listener=ACCEPT, pool={"send_proxy_protocol": "v2",
                                                      "retries": 1})
        try:
            for _ in range(2):  # round robin: one of them tries the dead one first
                r, w = await _open(px.port)
                w.write(b"PROXY TCP6 2001:db8::5 2001:db8::1 7 8\r\nx\n")
                assert await asyncio.wait_for(r.readline(), 3.0) == b"ack\n"
                w.close()
            want = pp.encode_v2(("2001:db8::5", 7), ("2001:db8::1", 8)) + b"x\n"
            await wait_for(lambda: be.got == [want, want])
            assert px.stats.snapshot()["retries"]["p"]["connect_refused"] >= 1
        finally:
            await stop_proxy(px)

    run(scenario())


def _curl_hello() -> bytes:
    lines = (Path(__file__).parent / "corpus" / "client_hello" / "curl.hex").read_text()
    return bytes.fromhex("".join(x for x in lines.splitlines() if not x.startswith("#")))


def test_sni_routing_reads_the_hello_after_the_header() -> None:
    """Trusted proxy, header, then a ClientHello for curl.example.test: routed by its name
    to pool "pa", which gets the v1 header and the hello unchanged."""
    hello = _curl_hello()

    async def scenario() -> None:
        dflt, pa = await Recorder().start(), await Recorder().start()
        cfgs = {n: PoolConfig.model_validate(
            {"name": n, "send_proxy_protocol": "v1",
             "backends": [{"name": n + "1", "address": be.address}]})
            for n, be in (("dflt", dflt), ("pa", pa))}
        lcfg = ListenerConfig.model_validate({
            "name": "l", "bind": f"127.0.0.1:{free_port()}", "mode": "tcp", "pool": "dflt",
            "sni_routes": [{"server_name": "curl.example.test", "pool": "pa"}], **ACCEPT})
        pools = {n: build_pool(n, "round_robin", [(n + "1", "127.0.0.1", be.port, 1.0)])
                 for n, be in (("dflt", dflt), ("pa", pa))}
        server = TcpProxyServer(lcfg, pools["dflt"], cfgs["dflt"], Stats())
        server.routes_changed(pools, cfgs, {})
        sock = make_listen_socket(lcfg)
        await server.start(sock)
        port = sock.getsockname()[1]
        try:
            _, w = await _open(port)
            w.write(b"PROXY TCP4 192.0.2.5 192.0.2.80 1234 443\r\n" + hello[:100])
            await asyncio.sleep(0.05)
            assert dflt.got == pa.got == []  # the hello is not whole yet
            w.write(hello[100:])
            await wait_for(lambda: pa.got == [
                b"PROXY TCP4 192.0.2.5 192.0.2.80 1234 443\r\n" + hello])
            assert dflt.got == []
            assert server.sni_decisions["route"] == 1
            w.close()
        finally:
            server.close()
            sock.close()
            await asyncio.sleep(0)

    run(scenario())


def test_tls_pool_gets_the_header_before_the_handshake_in_process() -> None:
    """What nginx's ``ssl proxy_protocol`` checks above, with the bytes in view: the header,
    then a TLS ClientHello; uvloop as in the workers."""
    import uvloop

    from lb.tls import contexts

    async def scenario() -> None:
        first: list[bytes] = []
        got = asyncio.Event()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            data = b""
            while len(data) < 60:
                chunk = await r.read(65536)
                if not chunk:
                    break
                data += chunk
            first.append(data)
            got.set()
            w.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        px = await start_proxy([("b", f"127.0.0.1:{port}")], mode="tcp",
                               pool={"send_proxy_protocol": "v1",
                                     "tls": {"verify": False}})
        px.server.backend_tls = {"p": contexts.client_context(
            verify=False, ca_pem=None, min_version="1.2")}
        try:
            _, w = await _open(px.port, CLIENT)
            cport = w.get_extra_info("sockname")[1]
            await asyncio.wait_for(got.wait(), 3.0)
            line = f"PROXY TCP4 {CLIENT} 127.0.0.1 {cport} {px.port}\r\n".encode()
            assert first[0].startswith(line)
            assert first[0][len(line)] == 0x16  # then a TLS handshake record
            w.close()
        finally:
            await stop_proxy(px)
            srv.close()

    uvloop.run(scenario())
