"""An outside review of TLS termination (issue 15): regression tests for what it found.

Each test below was a bug reproduced against a real ``pairlb run`` (or the real functions),
fixed since; the rest pin down what held up.

- Unit level (no daemon): ``ciphers`` nobody can use passes check-config; a failed settings
  change leaves the front context half changed and a later good reload does not repair it;
  an ``alpn`` change on reload is never applied; a cert_file that is a FIFO hangs
  check-config (and the control loop on reload); stage-tls follows a destination symlink
  and deletes the files of its target; the same cert_file twice in a listener; TLS material
  larger than the worker channel's frame limit passes check-config; the ticket keys derived
  from the failover key (the same on both nodes, one per listener).
- One daemon (one worker, two TLS listeners and a plain one): hostile ClientHellos counted
  by reason; a non-ASCII SNI writes a traceback to the log per connection;
  ``handshake_timeout_s`` changed by a reload is not applied; ``max_connections`` does not
  bound connections still in their handshake; a ticket of one listener does not resume on
  another; a plain listener turned TLS on the same port by a reload.

Certificates: lab.pki (the openssl CLI).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import LOOPBACK, PYTHON, ROOT, free_port, http, wait_port, wait_until
from tls_helpers import Leaf, Pki

from lb import config as config_mod
from lb.config import CertificateConfig, ListenerTlsConfig
from lb.control.tls import TlsKeeper
from lb.stats import Stats
from lb.tls import files, ticketkeys
from lb.tls.server import ListenerTls

pytestmark = [
    pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI is not installed"),
    pytest.mark.timeout(120),
]

TOKEN = "review-token"


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("review-pki"))


@pytest.fixture(scope="module")
def leaf(pki: Pki) -> Leaf:
    return pki.leaf("rev", ["rev.test", "*.rev.test"], ["127.0.0.1"])


def _cfg(tmp: Path, listeners: str, backend_port: int = 9, admin: str = "") -> str:
    return f"""\
[node]
name = "review"
workers = 1
shutdown_timeout_s = 1.0

{listeners}

[[pool]]
name = "web"
backends = [ {{ name = "web1", address = "{LOOPBACK}:{backend_port}" }} ]

[pool.health]
interval_s = 0.5
timeout_s = 0.2
rise = 1
fall = 2
{admin}"""


def _tls_listener(name: str, port: int, leaf: Leaf, extra: str = "", tls_extra: str = "") -> str:
    return f"""\
[[listener]]
name = "{name}"
bind = "{LOOPBACK}:{port}"
pool = "web"
{extra}
[listener.tls]
{tls_extra}
certificates = [ {{ cert_file = "{leaf.cert}", key_file = "{leaf.key}" }} ]
"""


def _check_config(path: Path, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "lb", "check-config", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s)


class Precondition(RuntimeError):
    """The test's own setup is wrong (not the bug it is about): never an expected failure."""


def _require(ok: object, what: str) -> None:
    if not ok:
        raise Precondition(what)


def _valid(path: Path, text: str) -> None:
    """Write ``text`` and require that check-config accepts it (the baseline of a test)."""
    path.write_text(text)
    out = _check_config(path)
    _require(out.returncode == 0, f"the baseline config is refused: {out.stdout}{out.stderr}")


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> ssl.SSLObject:
    """An in-memory handshake; the server side's SSLObject."""
    return ticketkeys.memory_handshake(server, client, "rev.test", exchange=False)[1]


def _client(alpn: tuple[str, ...] = (), max_version: ssl.TLSVersion | None = None
            ) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


# -- unit level -----------------------------------------------------------------------------


def test_check_config_refuses_ciphers_openssl_cannot_use(tmp_path: Path, leaf: Leaf) -> None:
    port = free_port()
    _valid(tmp_path / "base.toml", _cfg(tmp_path, _tls_listener("tls", port, leaf)))
    path = tmp_path / "pairlb.toml"
    path.write_text(_cfg(tmp_path, _tls_listener("tls", port, leaf,
                                                 tls_extra='ciphers = "NOPE"')))
    out = _check_config(path)
    assert out.returncode != 0, out.stdout + out.stderr
    assert "ciphers" in out.stdout + out.stderr


def test_a_failed_settings_change_does_not_stick(leaf: Leaf) -> None:
    cc = CertificateConfig(cert_file=str(leaf.cert), key_file=str(leaf.key))
    good = ListenerTlsConfig(certificates=(cc,))
    lt = ListenerTls("tls", good, Stats())
    lt.load([files.load_certificate(cc)])
    bad = good.model_copy(update={"min_version": "1.3", "ciphers": "NOPE"})
    with contextlib.suppress(Exception):
        lt.apply(bad)
    lt.apply(good)  # the operator puts the old config back and reloads
    assert lt.front.minimum_version == ssl.TLSVersion.TLSv1_2
    srv = _handshake(lt.front, _client(max_version=ssl.TLSVersion.TLSv1_2))
    assert srv.version() == "TLSv1.2"


def test_alpn_change_applies_on_reload(tmp_path: Path, leaf: Leaf) -> None:
    from lb.data.worker import Worker

    port = free_port()
    paths = []
    for n, extra in enumerate(("", "alpn = []")):
        p = tmp_path / f"cfg{n}.toml"
        p.write_text(_cfg(tmp_path, _tls_listener("tls", port, leaf, tls_extra=extra)))
        paths.append(p)
    w = Worker(-1, 0)
    for p in paths:
        cfg = config_mod.load(p)
        material, errors = TlsKeeper().load(cfg)
        _require(not errors, str(errors))
        w._apply_tls(cfg, material.wire())
    srv = _handshake(w.tls["tls"].front, _client(alpn=("http/1.1",)))
    assert srv.selected_alpn_protocol() is None


def test_cert_file_fifo_does_not_hang_check_config(tmp_path: Path, leaf: Leaf) -> None:
    port = free_port()
    _valid(tmp_path / "base.toml", _cfg(tmp_path, _tls_listener("tls", port, leaf)))
    fifo = tmp_path / "cert.pem"
    os.mkfifo(fifo)
    path = tmp_path / "pairlb.toml"
    path.write_text(_cfg(tmp_path, _tls_listener("tls", port, Leaf(fifo, leaf.key))))
    try:
        out = _check_config(path, timeout_s=10.0)
    except subprocess.TimeoutExpired:
        out = None
    assert out is not None, "pairlb check-config hung on a cert_file that is a FIFO"
    assert out.returncode != 0
    assert "cert_file" in out.stdout + out.stderr


def test_stage_does_not_follow_a_symlinked_destination(tmp_path: Path, leaf: Leaf) -> None:
    src, victim, run = tmp_path / "src", tmp_path / "victim", tmp_path / "run"
    for d in (src, victim, run):
        d.mkdir()
    shutil.copyfile(leaf.cert, src / "rev.pem")
    shutil.copyfile(leaf.key, src / "rev.key")
    (src / "rev.key").chmod(0o600)
    (victim / "authorized_keys").write_text("precious\n")
    (run / "tls").symlink_to(victim)
    with contextlib.suppress(files.TlsFileError, OSError):
        files.stage(str(src), str(run / "tls"))
    assert (victim / "authorized_keys").exists()
    assert not (victim / "rev.key").exists()


def test_the_same_cert_file_twice_in_a_listener_is_refused(tmp_path: Path, leaf: Leaf) -> None:
    port = free_port()
    _valid(tmp_path / "base.toml", _cfg(tmp_path, _tls_listener("tls", port, leaf)))
    text = _tls_listener("tls", port, leaf).replace(
        "certificates = [ ",
        f'certificates = [ {{ cert_file = "{leaf.cert}", key_file = "{leaf.key}" }}, ')
    path = tmp_path / "pairlb.toml"
    path.write_text(_cfg(tmp_path, text))
    out = _check_config(path)
    assert out.returncode != 0, out.stdout


def test_tls_material_too_large_for_the_worker_channel_is_refused(tmp_path: Path,
                                                                  leaf: Leaf) -> None:
    chain = leaf.cert.read_text()
    pad = ("# padding " + "x" * 60 + "\n") * ((1 << 20) // 71 - 40)
    entries = []
    for i in range(17):
        cert = tmp_path / f"c{i}.pem"
        cert.write_text(chain + pad)
        _require(cert.stat().st_size <= files.MAX_PEM_BYTES, "a chain over the file limit")
        entries.append(f'{{ cert_file = "{cert}", key_file = "{leaf.key}" }}')
    port = free_port()
    one = _tls_listener("tls", port, Leaf(tmp_path / "c0.pem", leaf.key))
    _valid(tmp_path / "base.toml", _cfg(tmp_path, one))  # one padded chain loads fine
    text = _tls_listener("tls", port, leaf).replace(
        f'certificates = [ {{ cert_file = "{leaf.cert}", key_file = "{leaf.key}" }} ]',
        "certificates = [ " + ", ".join(entries) + " ]")
    path = tmp_path / "pairlb.toml"
    path.write_text(_cfg(tmp_path, text))
    out = _check_config(path)
    assert out.returncode != 0, out.stdout


def test_ticket_keys_from_the_failover_key_match_across_nodes(tmp_path: Path,
                                                             leaf: Leaf) -> None:
    key = tmp_path / "failover.key"
    subprocess.run([PYTHON, "-m", "lb", "keygen", str(key)], cwd=ROOT, check=True,
                   capture_output=True)
    keys = []
    for node in ("lb1", "lb2"):
        listeners = (_tls_listener("https", free_port(), leaf)
                     + _tls_listener("other", free_port(), leaf))
        text = _cfg(tmp_path, listeners).replace('name = "review"', f'name = "{node}"') + f"""
[failover]
interface = "lo"
vips = ["192.0.2.10/24"]
peers = ["{LOOPBACK}:9"]
bind = "{LOOPBACK}"
key_file = "{key}"
"""
        path = tmp_path / f"{node}.toml"
        path.write_text(text)
        material, errors = TlsKeeper().load(config_mod.load(path))
        assert not errors
        assert {m.ticket_key_source for m in material.listeners.values()} == {"failover_key"}
        keys.append({n: m.ticket_key for n, m in material.listeners.items()})
    assert keys[0] == keys[1]  # a ticket from lb1 resumes on lb2
    assert keys[0]["https"] != keys[0]["other"]  # but not on another listener


# -- one daemon -----------------------------------------------------------------------------


class Node:
    def __init__(self, tmp: Path, leaf: Leaf) -> None:
        self.tmp = tmp
        self.leaf = leaf
        self.tls_port, self.tls2_port, self.plain_port = free_port(), free_port(), free_port()
        self.admin_port, self.backend_port = free_port(), free_port()
        self.token_file = tmp / "admin.token"
        self.token_file.write_text(TOKEN + "\n")
        self.token_file.chmod(0o600)
        self.config = tmp / "pairlb.toml"
        self.log = tmp / "pairlb.log"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.write()

    def text(self, *, handshake_timeout_s: float = 2.0, plain_tls: bool = False) -> str:
        plain = f"""\
[[listener]]
name = "plain"
bind = "{LOOPBACK}:{self.plain_port}"
pool = "web"
"""
        if plain_tls:
            plain += (f'\n[listener.tls]\ncertificates = [ {{ cert_file = "{self.leaf.cert}", '
                      f'key_file = "{self.leaf.key}" }} ]\n')
        listeners = (
            _tls_listener("tls", self.tls_port, self.leaf, extra="max_connections = 4",
                          tls_extra=f"handshake_timeout_s = {handshake_timeout_s}")
            + "\n" + _tls_listener("tls2", self.tls2_port, self.leaf) + "\n" + plain)
        admin = (f'\n[admin]\nbind = "{LOOPBACK}:{self.admin_port}"\n'
                 f'token_file = "{self.token_file}"\n')
        return _cfg(self.tmp, listeners, self.backend_port, admin)

    def write(self, **kw: Any) -> None:
        self.config.write_text(self.text(**kw))

    def start(self) -> None:
        with open(self.tmp / "backend.log", "ab") as log:
            self.procs.append(subprocess.Popen(
                [PYTHON, "-m", "lab.pair", "backend", "web1",
                 f"{LOOPBACK}:{self.backend_port}", str(self.tmp / "web1.journal")],
                cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        wait_port(self.backend_port)
        with open(self.log, "ab") as log:
            self.procs.append(subprocess.Popen(
                [PYTHON, "-m", "lb", "run", "-c", str(self.config)], cwd=ROOT,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))
        wait_until(self._ready, 30.0, "pairlb /readyz == 200", 0.1)

    def _ready(self) -> bool:
        if self.procs[-1].poll() is not None:
            raise AssertionError(f"pairlb exited:\n{self.logs()}")
        try:
            return http("GET", self.admin + "/readyz", timeout_s=1.0)[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10.0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5.0)

    @property
    def admin(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def reload(self) -> dict[str, Any]:
        _, _, body = http("POST", self.admin + "/reload", token=TOKEN, timeout_s=30.0)
        return json.loads(body)  # type: ignore[no-any-return]

    def failures(self, listener: str = "tls") -> dict[str, int]:
        _, _, body = http("GET", self.admin + "/status")
        for lst in json.loads(body)["listeners"]:
            if lst["name"] == listener:
                return dict(lst["tls"]["failures"])
        raise KeyError(listener)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, leaf: Leaf) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("review-node"), leaf)
    try:
        n.start()
        yield n
    finally:
        n.stop()


def _client_hello(sni: bytes | None) -> bytes:
    """A TLS 1.2 ClientHello (ECDHE-ECDSA/RSA AES-GCM) naming ``sni``, split into records."""
    suites = struct.pack(">HHH", 0xC02B, 0xC02F, 0x1301)
    exts = b""
    if sni is not None:
        entry = b"\x00" + struct.pack(">H", len(sni)) + sni
        names = struct.pack(">H", len(entry)) + entry
        exts += struct.pack(">HH", 0, len(names)) + names
    groups = struct.pack(">HHH", 4, 0x0017, 0x001D)
    sigalgs = struct.pack(">HHH", 4, 0x0403, 0x0804)
    exts += struct.pack(">HH", 10, len(groups)) + groups
    exts += struct.pack(">HH", 13, len(sigalgs)) + sigalgs
    exts += struct.pack(">HH", 11, 2) + b"\x01\x00"
    body = (b"\x03\x03" + os.urandom(32) + b"\x00" + struct.pack(">H", len(suites)) + suites
            + b"\x01\x00" + struct.pack(">H", len(exts)) + exts)
    msg = b"\x01" + struct.pack(">I", len(body))[1:] + body
    return b"".join(b"\x16\x03\x01" + struct.pack(">H", len(msg[i:i + 16384])) + msg[i:i + 16384]
                    for i in range(0, len(msg), 16384))


def _send_and_wait_close(port: int, data: bytes, timeout_s: float = 5.0) -> None:
    with socket.create_connection((LOOPBACK, port), timeout=timeout_s) as s:
        s.sendall(data)
        with contextlib.suppress(OSError):
            while s.recv(65536):
                pass


def _grew(node: Node, before: dict[str, int], reason: str, by: int = 1) -> bool:
    return node.failures().get(reason, 0) >= before.get(reason, 0) + by


def test_hostile_hellos_are_counted_by_reason(node: Node) -> None:
    cases = [
        (os.urandom(300), "not_tls"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http_request"),
        (_client_hello(b"a" * 65000), "other"),  # a 64 KiB server name
        (_client_hello(b"a\x00.rev.test"), "other"),  # NUL in the name
    ]
    for data, reason in cases:
        before = node.failures()
        _send_and_wait_close(node.tls_port, data)
        wait_until(lambda: _grew(node, before, reason), 5.0, f"{reason} counted")  # noqa: B023
    # SNI in upper case with a trailing dot: a normal handshake with the certificate
    ctx = _client()
    with socket.create_connection((LOOPBACK, node.tls_port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="X.REV.TEST.") as s:
        assert s.version() is not None
    assert "Traceback" not in node.logs()


def test_a_non_ascii_server_name_writes_no_traceback(node: Node) -> None:
    before = node.failures()
    for _ in range(3):
        _send_and_wait_close(node.tls_port, _client_hello("é.rev.test".encode()))
    wait_until(lambda: _grew(node, before, "other", 3), 5.0, "3 failures counted")
    logs = node.logs()
    assert "Exception ignored" not in logs and "Traceback" not in logs, logs[-2000:]


def test_max_connections_bounds_connections_in_their_handshake(node: Node) -> None:
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2)")
    socks = [socket.create_connection((LOOPBACK, node.tls_port)) for _ in range(30)]
    try:
        time.sleep(0.5)
        out = subprocess.run(["ss", "-Htln", f"sport = :{node.tls_port}"], capture_output=True,
                             text=True, check=True).stdout.split()
        backlog = int(out[1])  # Recv-Q of a listening socket: connections not yet accepted
        assert backlog >= 20, f"only {backlog} of 30 left in the backlog (max_connections = 4)"
    finally:
        for s in socks:
            s.close()


def test_a_ticket_of_one_listener_does_not_resume_on_another(node: Node) -> None:
    ctx = _client(max_version=ssl.TLSVersion.TLSv1_2)

    def connect(port: int, session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        raw = socket.create_connection((LOOPBACK, port), timeout=5)
        return ctx.wrap_socket(raw, server_hostname="rev.test", session=session)

    with connect(node.tls_port) as s:
        session = s.session
    assert session is not None and session.has_ticket
    with connect(node.tls2_port, session) as s:
        assert not s.session_reused
    with connect(node.tls_port, session) as s:
        assert s.session_reused


def test_handshake_timeout_change_applies_on_reload(node: Node) -> None:
    node.write(handshake_timeout_s=6.0)
    try:
        assert node.reload()["ok"]
        t0 = time.monotonic()
        with socket.create_connection((LOOPBACK, node.tls_port), timeout=10) as s, \
                contextlib.suppress(OSError):
            s.recv(1)
        assert time.monotonic() - t0 >= 4.0
    finally:
        node.write()
        node.reload()


def test_a_reload_turns_a_plain_listener_into_tls(node: Node) -> None:
    node.write(plain_tls=True)
    try:
        result = node.reload()
        assert result["ok"], result
    finally:
        node.write()
        node.reload()
