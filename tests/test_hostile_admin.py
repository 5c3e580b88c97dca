"""Hostile input to a real node's admin API, and secrets others can read (issue 8).

tests/test_admin.py covers the rules on the app in-process, through aiohttp's client (which
normalises paths: a literal ``..`` never leaves it) and the token file refusal. Left open,
and done here against a real ``pairlb run``:

- raw bytes on a socket: literal and encoded dot segments, double encoding, backslashes, NUL
  and non-UTF-8 bytes in names, the token in the query string or in a second header,
  oversized and lying bodies, giant headers: every answer is a 4xx, the node keeps serving,
  and nothing changed (admin states, config generation, recorded events);
- an admin address that is not loopback (inside a namespace of its own): the warning is
  logged and actions still need the token;
- a failover key file others can read: the node refuses to start and says how to fix it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import netns
from lab.ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]
ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hostile-admin-token-0123456789"


def raw(port: int, data: bytes, host: str = "127.0.0.1", timeout_s: float = 5.0
        ) -> tuple[int, bytes]:
    """Send exact bytes; (status, body) of the first response, 0 if the server just closed."""
    with socket.create_connection((host, port), timeout=timeout_s) as s:
        s.sendall(data)
        buf = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := s.recv(65536):
                buf += chunk
                head, sep, body = buf.partition(b"\r\n\r\n")
                if sep and b"content-length:" in head.lower():
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    if len(body) >= length:
                        break
    if not buf.startswith(b"HTTP/1."):
        return 0, buf
    return int(buf.split(b" ", 2)[1]), buf.partition(b"\r\n\r\n")[2]


def post(path: bytes, *, token: str | None = TOKEN, extra: bytes = b"", body: bytes = b"",
         host: bytes = b"127.0.0.1") -> bytes:
    auth = b"Authorization: Bearer " + token.encode() + b"\r\n" if token else b""
    return (b"POST " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n" + auth
            + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def config(listen: str, admin: str, backend_port: int, token_file: Path) -> str:
    return f"""\
[node]
name = "hostile"
workers = 1
shutdown_timeout_s = 1.0

[[listener]]
name = "web"
bind = "{listen}"
pool = "web"

[[pool]]
name = "web"
backends = [{{ name = "b1", address = "127.0.0.1:{backend_port}" }},
            {{ name = "b2", address = "127.0.0.1:{backend_port + 1}" }}]

[admin]
bind = "{admin}"
token_file = "{token_file}"
"""


def token_file(tmp: Path) -> Path:
    p = tmp / "admin.token"
    p.write_text(TOKEN + "\n")
    p.chmod(0o600)
    return p


@contextlib.contextmanager
def pairlb(argv_prefix: list[str], cfg: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([*argv_prefix, sys.executable, "-m", "lb", "run", "-c", str(cfg)],
                                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def status(port: int) -> dict[str, Any]:
    code, body = raw(port, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert code == 200, body[:300]
    out: dict[str, Any] = json.loads(body)
    return out


def wait_status(port: int, proc: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"pairlb exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError, AssertionError, ValueError):
            return status(port)
        if time.monotonic() > deadline:
            raise AssertionError(f"no admin API:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def fingerprint(st: dict[str, Any]) -> tuple[Any, ...]:
    """What a refused request must not change."""
    states = [(b["name"], b["admin_state"]) for p in st["pools"] for b in p["backends"]]
    admin_events = [e for e in st["events"] if e["kind"] in ("admin", "reload", "switchover")]
    return (states, st["config"]["generation"], admin_events, st["role"])


HOSTILE: list[tuple[str, bytes]] = [
    ("no token", post(b"/backends/web/b1/drain", token=None)),
    ("wrong token", post(b"/backends/web/b1/drain", token=TOKEN + "x")),
    ("token prefix", post(b"/backends/web/b1/drain", token=TOKEN[:-1])),
    ("token in the query", post(b"/backends/web/b1/drain?token=" + TOKEN.encode(), token=None)),
    ("basic auth", post(b"/backends/web/b1/drain", token=None,
                        extra=b"Authorization: Basic aG9zdGlsZTp4\r\n")),
    ("two auth headers", post(b"/backends/web/b1/drain", token="nope",
                              extra=b"Authorization: Bearer " + TOKEN.encode() + b"\r\n")),
    ("literal dot segments", post(b"/backends/web/../../backends/web/b1/drain")),
    ("dot segment as name", post(b"/backends/web/../drain")),
    ("encoded dots", post(b"/backends/%2e%2e/b1/drain")),
    ("encoded slash", post(b"/backends/web/..%2F..%2Fetc%2Fpasswd/drain")),
    ("double encoding", post(b"/backends/web/b1%252F..%252F/drain")),
    ("backslashes", post(b"/backends/web/..\\..\\b1/drain")),
    ("NUL in a name", post(b"/backends/web/b1%00/drain")),
    ("non-UTF-8 name", post(b"/backends/web/b\xff\xfe1/drain")),
    ("overlong name", post(b"/backends/web/" + b"b" * 5000 + b"/drain")),
    ("unknown action", post(b"/backends/web/b1/delete")),
    ("GET on an action", b"GET /backends/web/b1/drain HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Connection: close\r\n\r\n"),
    ("oversized body", post(b"/backends/web/b1/drain", body=b"x" * 100_000)),
    ("lying content-length", post(b"/reload", body=b"{}")[:-2].replace(
        b"Content-Length: 2", b"Content-Length: 999999999") + b"{}"),
    ("giant header", post(b"/backends/web/b1/drain", extra=b"X-Big: " + b"a" * 70_000 + b"\r\n")),
    ("switchover without token", post(b"/failover/switchover", token=None)),
    ("reload with a wrong token", post(b"/reload", token="x" * 40)),
]


BY_THE_PARSER = {"non-UTF-8 name", "giant header"}
"""Refused by aiohttp's HTTP parser before the app sees them (plain-text 400)."""


def test_raw_hostile_requests_get_a_4xx_and_change_nothing(tmp_path: Path) -> None:
    admin, listen, be = free_port(), free_port(), free_port()
    cfg = tmp_path / "pairlb.toml"
    cfg.write_text(config(f"127.0.0.1:{listen}", f"127.0.0.1:{admin}", be, token_file(tmp_path)))
    log = tmp_path / "pairlb.log"
    with pairlb([], cfg, log) as proc:
        before = fingerprint(wait_status(admin, proc, log))
        answers = {}
        for what, data in HOSTILE:
            code, body = raw(admin, data)
            answers[what] = code
            assert 400 <= code < 500, (what, code, body[:200])
            if what not in BY_THE_PARSER:  # refused by the app: a JSON error a person can read
                assert json.loads(body)["status"] == code, (what, body[:200])
        print("\n" + ", ".join(f"{k}: {v}" for k, v in answers.items()))
        assert fingerprint(status(admin)) == before
        assert proc.poll() is None
        # The same node does act on a proper request: the checks above could fail.
        code, body = raw(admin, post(b"/backends/web/b1/drain"))
        assert code == 200 and json.loads(body)["admin_state"] == "draining"
        assert fingerprint(status(admin)) != before


@pytest.mark.netns
@pytest.mark.skipif(netns.skip_reason() is not None, reason=netns.skip_reason() or "")
def test_non_loopback_admin_address_warns_and_still_needs_the_token(tmp_path: Path) -> None:
    cfg = tmp_path / "pairlb.toml"
    with netns.topology(["lb"]) as topo:
        addr = topo["lb"].ipv4
        cfg.write_text(config("127.0.0.1:8080", f"{addr}:9900", 9001, token_file(tmp_path)))
        log = tmp_path / "pairlb.log"
        with pairlb(["ip", "netns", "exec", topo["lb"].netns], cfg, log) as proc:
            def ask(data: bytes) -> tuple[int, bytes]:
                return topo.call("lb", raw, 9900, data, addr)

            deadline = time.monotonic() + 20
            while True:
                with contextlib.suppress(OSError):
                    if ask(f"GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
                           .encode())[0] == 200:
                        break
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            text = log.read_text()
            assert f"event=admin_non_loopback bind={addr}:9900" in text
            assert "clear text" in text
            host = f"{addr}:9900".encode()
            assert ask(post(b"/backends/web/b1/drain", token=None, host=host))[0] == 401
            assert ask(post(b"/backends/web/b1/drain", token="guess", host=host))[0] == 403
            # Its own address is the only Host it answers (no allowed_hosts): not localhost.
            assert ask(post(b"/backends/web/b1/drain", host=b"localhost"))[0] == 421
            code, body = ask(b"GET /status HTTP/1.1\r\nHost: " + host
                             + b"\r\nConnection: close\r\n\r\n")
            assert code == 200
            assert {b["admin_state"] for b in json.loads(body)["pools"][0]["backends"]} \
                == {"enabled"}


def test_a_failover_key_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    key = tmp_path / "failover.key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o644)
    cfg = tmp_path / "pairlb.toml"
    cfg.write_text(config("127.0.0.1:8080", "127.0.0.1:9900", 9001, token_file(tmp_path))
                   + f'\n[failover]\ninterface = "eth0"\nvips = ["192.0.2.100/24"]\n'
                     f'peers = ["192.0.2.13"]\nkey_file = "{key}"\n')
    log = tmp_path / "pairlb.log"
    # In a namespace of its own when we are root: a node that wrongly started would touch
    # only that namespace's interfaces (and without root it cannot touch any).
    reason = netns.skip_reason()
    with contextlib.ExitStack() as stack:
        prefix: list[str] = []
        if os.geteuid() == 0:
            if reason is not None:
                pytest.skip(reason)
            topo = stack.enter_context(netns.topology(["lb"]))
            prefix = ["ip", "netns", "exec", topo["lb"].netns]
        with pairlb(prefix, cfg, log) as proc:
            rc = proc.wait(30)
        text = log.read_text()
    assert rc != 0, text[-2000:]
    assert "event=startup_failed" in text, text[-2000:]
    assert "accessible by group/others (mode 0644)" in text
    assert f"chmod 600 {key}" in text
