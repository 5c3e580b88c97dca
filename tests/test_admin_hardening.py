"""The admin endpoint and its CLI against what an outside review found (issue 13).

- The CLI (``pairlb drain``, ``status`` ...) never hands the bearer token to an HTTP proxy
  from the environment and never follows a redirect with it: a real fake proxy and a real
  redirecting server on 127.0.0.1 record every connection they get, and the CLI runs as a
  subprocess with every proxy variable set.
- The admin endpoint of a real ``pairlb run`` answers only Host values it serves (its bind
  address, localhost names on loopback, ``admin.allowed_hosts``); any other Host, the
  signature of a DNS-rebinding page reading ``/`` or ``/status``, gets 421 and nothing else.
  Clients by IP (Prometheus, the CLI, curl) keep working.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from admin_helpers import Backends, Pairlb, http, write_token

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "cli-token-never-leaves-0123456789"


@dataclass
class Recorder:
    """A TCP server on 127.0.0.1 that records what each connection sent and answers with
    ``respond(request_bytes)``; one thread, bounded by the test's lifetime."""

    respond: Callable[[bytes], bytes]
    port: int = 0
    requests: list[bytes] = field(default_factory=list)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Recorder:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.1)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(2.0)
                data = b""
                with contextlib.suppress(OSError):
                    while b"\r\n\r\n" not in data and len(data) < 65536:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                self.requests.append(data)
                with contextlib.suppress(OSError):
                    conn.sendall(self.respond(data))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)


def _json_response(body: object, status: str = "200 OK") -> bytes:
    raw = json.dumps(body).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: "
            f"{len(raw)}\r\nConnection: close\r\n\r\n").encode() + raw


DRAINED = {"pool": "web", "backend": "b1", "admin_state": "draining", "changed": True,
           "in_flight": 0}


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lb", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def _proxy_env(proxy_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() != "no_proxy"}
    url = f"http://127.0.0.1:{proxy_port}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                 "all_proxy"):
        env[name] = url
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    return write_token(tmp_path, TOKEN)


def test_the_cli_never_sends_the_token_through_a_proxy_from_the_environment(
    token_file: Path,
) -> None:
    leak = _json_response(DRAINED)
    with Recorder(lambda _: leak) as proxy, Recorder(lambda _: _json_response(DRAINED)) as api:
        env = _proxy_env(proxy.port)
        # The setup can fail: plain urllib with this environment does go through the proxy.
        probe = subprocess.run(
            [sys.executable, "-c", "import urllib.request as u; "
             f"u.urlopen('http://127.0.0.1:{api.port}/status', timeout=5).read()"],
            env=env, capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, probe.stderr
        assert len(proxy.requests) == 1
        assert proxy.requests[0].startswith(f"GET http://127.0.0.1:{api.port}/status".encode())
        proxy.requests.clear()
        api.requests.clear()

        res = _cli("drain", "web", "b1", "--admin", f"http://127.0.0.1:{api.port}",
                   "--token-file", str(token_file), env=env)
        assert res.returncode == 0, res.stderr
        assert "web/b1: draining" in res.stdout
    assert proxy.requests == []
    assert len(api.requests) == 1
    head = api.requests[0].decode()
    assert head.startswith("POST /backends/web/b1/drain HTTP/1.1")
    assert f"Authorization: Bearer {TOKEN}" in head


@pytest.mark.parametrize(("command", "status"),
                         [(("drain", "web", "b1"), "307 Temporary Redirect"),
                          (("reload",), "308 Permanent Redirect"),
                          (("status",), "301 Moved Permanently"),
                          (("switchover",), "302 Found")])
def test_the_cli_never_follows_a_redirect(token_file: Path, command: tuple[str, ...],
                                          status: str) -> None:
    with Recorder(lambda _: _json_response(DRAINED)) as elsewhere:
        target = f"http://127.0.0.1:{elsewhere.port}/backends/web/b1/drain"
        redirect = (f"HTTP/1.1 {status}\r\nLocation: {target}\r\nContent-Length: 0\r\n"
                    f"Connection: close\r\n\r\n").encode()
        with Recorder(lambda _: redirect) as api:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            token = () if command == ("status",) else ("--token-file", str(token_file))
            res = _cli(*command, "--admin", f"http://127.0.0.1:{api.port}", *token, env=env)
        assert len(api.requests) == 1
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "not followed" in res.stderr and target in res.stderr
    assert elsewhere.requests == []  # nothing, token or not, reached the other server


# -- Host header of the admin endpoint ---------------------------------------------------------


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Pairlb]:
    with Backends(["b1"]) as be:
        lb = Pairlb(tmp_path, be, workers=1)
        lb.config.write_text(lb.config.read_text()
                             + 'allowed_hosts = ["lb-a.example.net", "Status.Internal"]\n')
        with lb:
            yield lb


def _raw_get(port: int, path: str, host: str | None) -> tuple[int, bytes]:
    head = f"GET {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall((head + "Connection: close\r\n\r\n").encode())
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    return int(buf.split(b" ", 2)[1]), buf.partition(b"\r\n\r\n")[2]


def test_admin_answers_only_the_host_names_it_serves(node: Pairlb) -> None:
    port = node.admin_port
    served = [f"127.0.0.1:{port}", "127.0.0.1", "localhost", f"localhost:{port}",
              "LOCALHOST.", "lb-a.example.net", f"lb-a.example.net:{port}",
              "status.internal:8443"]
    for host in served:
        for path in ("/", "/status", "/metrics", "/healthz"):
            code, body = _raw_get(port, path, host)
            assert code == 200, (host, path, code, body[:200])
    rebinding = ["evil.example.com", f"evil.example.com:{port}", "127.0.0.1.nip.io",
                 "localhost.evil.example", "lb-a.example.net.evil", "[::1]", "10.1.2.3",
                 "", "a b"]
    for host in rebinding:
        for path in ("/", "/status", "/metrics", "/readyz"):
            code, body = _raw_get(port, path, host)
            assert code in (400, 421), (host, path, code)
            assert b"pairlb" not in body.lower() or b"allowed_hosts" in body, body[:300]
            if code == 421:
                assert json.loads(body)["status"] == 421
    # An action with the right token but a foreign Host is refused too, and changes nothing.
    status, _, body = http("POST", f"http://127.0.0.1:{port}/backends/web/b1/drain",
                           token=node.token, headers={"Host": "evil.example.com"})
    assert status == 421, body
    st = json.loads(_raw_get(port, "/status", "127.0.0.1")[1])
    assert st["pools"][0]["backends"][0]["admin_state"] == "enabled"
    # The CLI (by IP) still works.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = _cli("status", "--admin", f"http://127.0.0.1:{port}", "--json", env=env)
    assert res.returncode == 0, res.stderr
