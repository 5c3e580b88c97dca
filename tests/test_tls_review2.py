"""A second outside review of issue 15 (TLS, SNI routing, redirects, ACME, backend TLS), after
the first review's fixes: regression tests for what it found.

Each was reproduced against a real ``pairlb run`` too, and is fixed:

- A ``mode = "tcp"`` listener's config does not survive the trip to the workers: the control
  process sent ``Config.model_dump()`` (every field, defaults included; now ``Config.wire()``,
  what was written) and the worker's
  ``Config.model_validate`` then sees ``redirect_to_https``/``acme_challenge_dir`` as set on a
  tcp listener and refuses the whole config. A daemon with a tcp listener never serves; a
  reload that adds one reports ok and then every listener of the node stops serving. The
  same mechanism refuses a ``[failover]`` with ``key_files`` (a key rotation) and no
  ``key_file``: the dump carries key_file's default, which is not one of key_files.
- TCP mode drops what a backend sends before ``_Pipe._connect`` has wired the two sides
  (``_BackendSide.data_received`` with ``peer`` still None): a server-speaks-first backend's
  greeting (SMTP, MySQL, SSH, and the SNI listener's documented "server speaks first" case)
  is lost under uvloop, which the workers run.
- A reload that lifts ``max_connections`` (N -> 0) while a worker is paused at its limit
  leaves that worker paused for good: ``_maybe_resume`` and ``handshake_ended`` only act when
  ``max_connections`` is set.
- ``pairlb stage-tls``: a directory planted at ``DST/.NAME.tmp`` by the service's user makes
  every stage fail (the code suppresses IsADirectoryError on the unlink, then O_EXCL fails);
  a ticket key file whose name does not end in ``.key`` is copied without the secret checks
  (a 0644 key at the source comes out 0600 and the daemon takes it).

Passing tests pin down what held up: a symlink planted at ``DST/.NAME.tmp``; ticket key
rotation (only at a period's start, both nodes alike, a ticket from before it makes one full
handshake and no error).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_helpers import start_proxy, stop_proxy
from tls_helpers import Leaf, Pki

from lab.ports import free_port
from lb import config as config_mod
from lb.config import CertificateConfig, Config, ListenerTlsConfig
from lb.control.tls import TICKET_KEY_ROTATE_S, ListenerMaterial, Material, TlsKeeper
from lb.stats import Stats
from lb.tls import files, ticketkeys
from lb.tls.server import ListenerTls

pytestmark = [
    pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI is not installed"),
    pytest.mark.timeout(60),
]

LOOPBACK = "127.0.0.1"


@pytest.fixture(scope="module")
def leaf(tmp_path_factory: pytest.TempPathFactory) -> Leaf:
    return Pki(tmp_path_factory.mktemp("review2-pki")).leaf("r2", ["r2.test"], ["127.0.0.1"])


# -- tcp listeners in the workers ----------------------------------------------------------


TCP_CONFIG = """\
[node]
name = "review2"

[[listener]]
name = "tcp"
bind = "127.0.0.1:{port}"
mode = "tcp"
pool = "p"
{extra}

[[pool]]
name = "p"
backends = [ {{ name = "b", address = "127.0.0.1:9" }} ]
"""


@pytest.mark.parametrize("extra", ["", 'sni_routes = [ { server_name = "a.test", pool = "p" } ]'])
def test_a_tcp_listener_config_survives_the_trip_to_the_workers(extra: str) -> None:
    cfg = config_mod.loads(TCP_CONFIG.format(port=free_port(), extra=extra))
    wire = cfg.wire()  # what Daemon._config_message sends
    again = Config.model_validate(wire)  # what Worker._apply_config does with it
    assert again.listener[0].mode == "tcp"


FAILOVER_KEY_FILES = """\
[node]
name = "review2"

[[listener]]
name = "h"
bind = "127.0.0.1:{port}"
pool = "p"

[[pool]]
name = "p"
backends = [ {{ name = "b", address = "127.0.0.1:9" }} ]

[failover]
interface = "lo"
vips = ["192.0.2.10/24"]
peers = ["127.0.0.1:9"]
bind = "127.0.0.1"
key_files = ["/etc/pairlb/failover-new.key", "/etc/pairlb/failover-old.key"]
"""


def test_a_failover_key_rotation_config_survives_the_trip_to_the_workers() -> None:
    cfg = config_mod.loads(FAILOVER_KEY_FILES.format(port=free_port()))
    again = Config.model_validate(cfg.wire())
    assert again.failover is not None and again.failover.key_files == cfg.failover.key_files


class _GreetingBackend:
    """Says ``hello\\n`` as soon as it accepts (a server-speaks-first protocol), in a thread
    (another thread than the proxy's loop, as a real backend is another process)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((LOOPBACK, 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with contextlib.suppress(OSError):
                c.sendall(b"hello\n")
            threading.Thread(target=self._drain, args=(c,), daemon=True).start()

    @staticmethod
    def _drain(c: socket.socket) -> None:
        c.settimeout(5)
        with contextlib.suppress(OSError):
            while c.recv(65536):
                pass
        c.close()

    def close(self) -> None:
        self.sock.close()


def test_a_server_speaks_first_greeting_is_not_lost_under_uvloop() -> None:
    uvloop = pytest.importorskip("uvloop")
    be = _GreetingBackend()

    async def scenario() -> tuple[int, int]:
        px = await start_proxy([("g", f"{LOOPBACK}:{be.port}")], mode="tcp")
        tried = 0
        try:
            for tried in range(1, 201):  # the loss is a race: stop at the first one
                r, w = await asyncio.open_connection(LOOPBACK, px.port)
                try:
                    line = await asyncio.wait_for(r.readline(), 1.0)
                except TimeoutError:
                    line = b""
                finally:
                    w.close()
                if line != b"hello\n":
                    return tried, 1
        finally:
            await stop_proxy(px)
        return tried, 0

    try:
        tried, lost = uvloop.run(scenario())
    finally:
        be.close()
    assert lost == 0, f"the backend's greeting was lost on connection {tried}"


# -- max_connections and reloads -----------------------------------------------------------


def test_lifting_max_connections_by_reload_resumes_a_paused_worker() -> None:
    async def scenario() -> int:
        px = await start_proxy([("b", f"{LOOPBACK}:9")], listener={"max_connections": 1})
        server = px.server
        try:
            _, w1 = await asyncio.open_connection(LOOPBACK, px.port)
            for _ in range(100):
                if server.clients and server._server is None:
                    break
                await asyncio.sleep(0.01)
            assert server._server is None, "precondition: the listener paused at its limit"
            # The operator lifts the limit (what Worker._apply_config does on a reload).
            server.listener_changed(server.listener.model_copy(update={"max_connections": 0}))
            w1.close()
            await asyncio.sleep(0.3)
            _, w2 = await asyncio.open_connection(LOOPBACK, px.port)
            for _ in range(100):  # accepted: the engine has a client again
                if server.clients:
                    break
                await asyncio.sleep(0.01)
            w2.close()
            return len(server.clients)
        finally:
            await stop_proxy(px)

    assert asyncio.run(scenario()) == 1, "a new connection is never accepted"


# -- pairlb stage-tls ------------------------------------------------------------------------


@pytest.fixture
def staging(tmp_path: Path, leaf: Leaf) -> Iterator[tuple[Path, Path]]:
    if os.geteuid() != 0:
        pytest.skip("stage-tls runs as root")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    shutil.copyfile(leaf.cert, src / "r2.pem")
    shutil.copyfile(leaf.key, src / "r2.key")
    (src / "r2.key").chmod(0o600)
    nobody = pwd.getpwnam("nobody")
    os.chown(dst, nobody.pw_uid, nobody.pw_gid)  # the service's user owns the destination
    yield src, dst


def test_stage_unlinks_a_symlink_planted_as_its_temporary_file(
        tmp_path: Path, staging: tuple[Path, Path]) -> None:
    src, dst = staging
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (dst / ".r2.key.tmp").symlink_to(victim)
    assert sorted(files.stage(str(src), str(dst))) == ["r2.key", "r2.pem"]
    assert victim.read_text() == "precious\n"
    st = (dst / "r2.key").lstat()
    assert st.st_uid == pwd.getpwnam("nobody").pw_uid and st.st_mode & 0o777 == 0o600


def test_stage_survives_a_directory_planted_as_its_temporary_file(
        staging: tuple[Path, Path]) -> None:
    src, dst = staging
    (dst / ".r2.pem.tmp").mkdir()
    assert sorted(files.stage(str(src), str(dst))) == ["r2.key", "r2.pem"]


def test_stage_refuses_a_world_readable_ticket_key(staging: tuple[Path, Path]) -> None:
    src, dst = staging
    ticket = src / "ticket"
    ticket.write_text(os.urandom(ticketkeys.KEY_LEN).hex() + "\n")
    ticket.chmod(0o644)
    with pytest.raises(files.TlsFileError):  # as ticket_key_file = SRC/ticket would be
        files.read_ticket_key(str(ticket))
    with pytest.raises(files.TlsFileError):
        files.stage(str(src), str(dst))


# -- ticket key rotation ---------------------------------------------------------------------


def test_rotation_only_at_a_period_start_and_a_ticket_from_before_makes_a_full_handshake(
        leaf: Leaf) -> None:
    cc = CertificateConfig(cert_file=str(leaf.cert), key_file=str(leaf.key))
    bundle = files.load_certificate(cc)
    secret = os.urandom(32)
    boundary = (1_800_000_000 // TICKET_KEY_ROTATE_S) * TICKET_KEY_ROTATE_S
    keeper = TlsKeeper()
    old_key = ticketkeys.derive(secret, "https", keeper.epoch(boundary - 1))
    material = Material({"https": ListenerMaterial((bundle,), old_key, "failover_key"),
                         "file": ListenerMaterial((bundle,), b"f" * 80, "file")},
                        {}, 0.0, secret)
    assert keeper.rotate(material, boundary - 0.001) is None
    rotated = keeper.rotate(material, boundary)
    assert rotated is not None
    new_key = rotated.listeners["https"].ticket_key
    assert new_key != old_key and rotated.listeners["file"].ticket_key == b"f" * 80
    other = TlsKeeper().rotate(material, boundary + 1)  # the peer, a second later
    assert other is not None and other.listeners["https"].ticket_key == new_key
    assert keeper.rotate(rotated, boundary + 3600) is None

    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        lt = ListenerTls("https", ListenerTlsConfig(certificates=(cc,)), Stats())
        lt.load([bundle])
        lt.set_ticket_key(old_key)
        if not lt.ticket_key_shared:
            pytest.skip("ticket keys cannot be shared on this Python/OpenSSL")
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        client.maximum_version = version
        first, _ = ticketkeys.memory_handshake(lt.front, client, "r2.test")
        assert first.session is not None
        again, _ = ticketkeys.memory_handshake(lt.front, client, "r2.test",
                                               session=first.session)
        assert again.session_reused
        lt.set_ticket_key(new_key)  # the rotation reaches the worker
        after, _ = ticketkeys.memory_handshake(lt.front, client, "r2.test",
                                               session=first.session)
        assert not after.session_reused  # one full handshake, no error
        assert after.version() == ("TLSv1.3" if version is ssl.TLSVersion.TLSv1_3
                                   else "TLSv1.2")
