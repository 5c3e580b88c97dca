"""lb.tls without sockets: name lookup, the file checks, ticket keys, and a listener's server
side driven by in-memory handshakes (MemoryBIO) against real certificates."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import ssl
import time
from pathlib import Path

import pytest
from tls_helpers import Pki

from lb import config as config_mod
from lb.config import CertificateConfig, ListenerTlsConfig
from lb.control.tls import TlsKeeper, tls_changes
from lb.stats import Stats
from lb.tls import files, ticketkeys
from lb.tls.names import NameTable
from lb.tls.server import ListenerTls, failure_reason

# -- names ----------------------------------------------------------------------------------


def test_name_table_exact_then_wildcard_then_default() -> None:
    t = NameTable("default", [(["a.test", "*.wild.test"], "A"), (["b.test", "a.test"], "B")])
    assert t.lookup("a.test") == "A"  # the first certificate with a name wins
    assert t.lookup("A.TEST.") == "A"  # case and a trailing dot do not matter
    assert t.lookup("b.test") == "B"
    assert t.lookup("x.wild.test") == "A"
    assert t.lookup("wild.test") == "default"  # a wildcard needs one label
    assert t.lookup("a.b.wild.test") == "default"  # and only one
    assert t.lookup(None) == "default"
    assert t.lookup("") == "default"
    assert t.match("nothing.test") is None
    assert t.match("x.wild.test") == "A"


def test_exact_beats_wildcard() -> None:
    t = NameTable("d", [(["*.example.test"], "W"), (["www.example.test"], "E")])
    assert t.lookup("www.example.test") == "E"
    assert t.lookup("api.example.test") == "W"


# -- files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def _cc(cert: Path, key: Path) -> CertificateConfig:
    return CertificateConfig(cert_file=str(cert), key_file=str(key))


def test_a_good_certificate_is_described(pki: Pki) -> None:
    leaf = pki.leaf("good", ["good.test", "*.good.test"], ["127.0.0.1"])
    b = files.load_certificate(_cc(leaf.cert, leaf.key))
    assert b.names == ("good.test", "*.good.test")
    assert b.ips == ("127.0.0.1",)
    assert b.not_before < b.not_after
    assert 19 < (b.not_after - b.not_before) / 86400 <= 20.01
    assert b"PRIVATE KEY" in b.pem and b"CERTIFICATE" in b.pem
    assert files.CertBundle.from_wire(b.to_wire()) == b


def test_an_expired_certificate_loads(pki: Pki) -> None:
    leaf = pki.leaf("expired", ["old.test"], days=-3)
    b = files.load_certificate(_cc(leaf.cert, leaf.key))
    import time

    assert b.not_after < time.time()


@pytest.mark.parametrize("case", ["mismatch", "mode", "missing_key", "missing_cert", "garbage",
                                  "no_key_block", "encrypted", "symlink_other", "dir"])
def test_bad_files_are_refused_naming_the_file(pki: Pki, tmp_path: Path, case: str) -> None:
    a = pki.leaf("fa", ["fa.test"])
    other = pki.leaf("fb", ["fb.test"])
    cert, key = a.cert, tmp_path / "k.pem"
    key.write_bytes(a.key.read_bytes())
    key.chmod(0o600)
    expect = str(key)
    if case == "mismatch":
        key.write_bytes(other.key.read_bytes())
        expect = "does not match"
    elif case == "mode":
        key.chmod(0o640)
        expect = "chmod 600"
    elif case == "missing_key":
        key.unlink()
        expect = "no such file"
    elif case == "missing_cert":
        cert = tmp_path / "none.pem"
        expect = f"cert_file {cert}: no such file"
    elif case == "garbage":
        cert = tmp_path / "garbage.pem"
        cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
        expect = f"cert_file {cert}"
    elif case == "no_key_block":
        key.write_bytes(b"hello\n")
        expect = "no PEM private key"
    elif case == "encrypted":
        import subprocess

        subprocess.run(["openssl", "ec", "-in", str(a.key), "-aes256", "-passout", "pass:x",
                        "-out", str(key)], check=True, capture_output=True)
        key.chmod(0o600)
        expect = "encrypted"
    elif case == "symlink_other":
        if os.geteuid() != 0:
            pytest.skip("needs root to own a link as another user")
        link = tmp_path / "link.key"
        link.symlink_to(key)
        os.lchown(link, 65534, 65534)
        key = link
        expect = "symbolic link owned by uid 65534"
    elif case == "dir":
        key = tmp_path
        expect = "not a regular file"
    with pytest.raises(files.TlsFileError) as err:
        files.load_certificate(_cc(cert, key))
    assert expect in str(err.value)


def test_a_root_owned_symlink_is_followed(pki: Pki, tmp_path: Path) -> None:
    """certbot's live/ directory is links into archive/: they must work."""
    a = pki.leaf("ln", ["ln.test"])
    (tmp_path / "archive").mkdir()
    real = tmp_path / "archive" / "privkey1.pem"
    real.write_bytes(a.key.read_bytes())
    real.chmod(0o600)
    (tmp_path / "live").mkdir()
    link = tmp_path / "live" / "privkey.pem"
    link.symlink_to("../archive/privkey1.pem")
    assert files.load_certificate(_cc(a.cert, link)).names == ("ln.test",)


def test_a_key_owned_by_someone_else_is_refused(pki: Pki, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    a = pki.leaf("own", ["own.test"])
    key = tmp_path / "k.pem"
    key.write_bytes(a.key.read_bytes())
    key.chmod(0o600)
    os.chown(key, 65534, 65534)
    with pytest.raises(files.TlsFileError, match="owned by uid 65534"):
        files.load_certificate(_cc(a.cert, key))


def test_ticket_key_file(tmp_path: Path) -> None:
    p = tmp_path / "t.key"
    key = os.urandom(80)
    p.write_text(key.hex()[:80] + "\n" + key.hex()[80:] + "\n")
    p.chmod(0o600)
    assert files.read_ticket_key(str(p)) == key
    p.write_text("ab" * 48)
    with pytest.raises(files.TlsFileError, match="48 bytes, a ticket key is 80"):
        files.read_ticket_key(str(p))
    p.write_text("zz" * 80)
    with pytest.raises(files.TlsFileError, match="not hex"):
        files.read_ticket_key(str(p))
    p.write_text(key.hex())
    p.chmod(0o644)
    with pytest.raises(files.TlsFileError, match="chmod 600"):
        files.read_ticket_key(str(p))


def test_derived_keys_are_per_listener_and_deterministic() -> None:
    k1 = ticketkeys.derive(b"s" * 32, "https")
    assert len(k1) == 80 and k1 == ticketkeys.derive(b"s" * 32, "https")
    assert k1 != ticketkeys.derive(b"s" * 32, "other")
    assert k1 != ticketkeys.derive(b"t" * 32, "https")


# -- the server side, in memory ---------------------------------------------------------------


def _settings(**kw: object) -> ListenerTlsConfig:
    return ListenerTlsConfig(certificates=(CertificateConfig(cert_file="/x", key_file="/y"),),
                             **kw)  # type: ignore[arg-type]


def _client(pki: Pki, **kw: object) -> ssl.SSLContext:
    c = ssl.create_default_context(cafile=str(pki.ca))
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def handshake(lt: ListenerTls, client: ssl.SSLContext, name: str | None,
              session: ssl.SSLSession | None = None) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    return ticketkeys.memory_handshake(lt.front, client, name, session)


@pytest.fixture
def listener(pki: Pki) -> tuple[ListenerTls, Stats]:
    a = pki.leaf("sa", ["a.test"], ["127.0.0.1"])
    w = pki.leaf("sw", ["*.w.test"])
    stats = Stats()
    lt = ListenerTls("https", _settings(), stats)
    lt.load([files.load_certificate(_cc(a.cert, a.key)),
             files.load_certificate(_cc(w.cert, w.key))])
    return lt, stats


def test_sni_chooses_the_certificate_and_counts_it(listener: tuple[ListenerTls, Stats],
                                                    pki: Pki) -> None:
    lt, stats = listener
    c = _client(pki)
    cli, srv = handshake(lt, c, "x.w.test")
    assert cli.getpeercert()["subject"][0][0][1] == "*.w.test"  # type: ignore[index]
    assert srv.selected_alpn_protocol() is None  # the client offered none
    c.set_alpn_protocols(["http/1.1"])
    cli, srv = handshake(lt, c, "a.test")
    assert cli.selected_alpn_protocol() == "http/1.1"  # ALPN from the switched context
    nc = _client(pki, check_hostname=False)
    cli, _ = handshake(lt, nc, None)  # no SNI: the first certificate
    assert cli.getpeercert()["subject"][0][0][1] == "a.test"  # type: ignore[index]
    d = stats.take_delta()["tls"]["https"]
    assert d["full"] == {str(pki.root / "sw.pem"): 1, str(pki.root / "sa.pem"): 2}


def test_failures_are_counted_by_reason(listener: tuple[ListenerTls, Stats], pki: Pki) -> None:
    lt, stats = listener
    bios = tuple(ssl.MemoryBIO() for _ in range(4))
    srv = lt.front.wrap_bio(bios[2], bios[3], server_side=True)
    bios[2].write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(ssl.SSLError):
        srv.do_handshake()
    lt.apply(_settings(min_version="1.3"))
    with pytest.raises(ssl.SSLError):
        handshake(lt, _client(pki, maximum_version=ssl.TLSVersion.TLSv1_2), "a.test")
    # Abandoned before the ClientHello: counted when collected.
    s2 = lt.front.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_side=True)
    with pytest.raises(ssl.SSLWantReadError):
        s2.do_handshake()
    del s2
    gc.collect()
    d = stats.take_delta()["tls"]["https"]["failed"]
    assert d["http_request"] == 1
    assert d["protocol_version"] == 1
    assert d["aborted_before_hello"] == 1


def test_failure_reason_table() -> None:
    e = ssl.SSLError(1, "x")
    e.reason = "NO_SHARED_CIPHER"  # type: ignore[misc]
    assert failure_reason(e) == "no_shared_cipher"
    e.reason = "TLSV1_ALERT_UNKNOWN_CA"  # type: ignore[misc]
    assert failure_reason(e) == "client_alert"
    e.reason = "SOMETHING_NEW"  # type: ignore[misc]
    assert failure_reason(e) == "other"
    assert failure_reason(ConnectionResetError()) == "aborted"


def test_reload_swaps_for_new_handshakes_only(listener: tuple[ListenerTls, Stats],
                                             pki: Pki) -> None:
    lt, _ = listener
    c = _client(pki)
    first, srv_old = handshake(lt, c, "a.test")
    renewed = pki.leaf("sa2", ["a.test", "new.a.test"])
    lt.load([files.load_certificate(_cc(renewed.cert, renewed.key))])
    second, _ = handshake(lt, c, "a.test")
    assert first.getpeercert() != second.getpeercert()
    assert "new.a.test" in str(second.getpeercert())
    # The old connection's context stays usable: it still reads and writes.
    srv_old.write(b"still")
    assert srv_old.context is not lt.table.default  # type: ignore[union-attr]


def test_tightening_applies_to_new_handshakes(listener: tuple[ListenerTls, Stats],
                                              pki: Pki) -> None:
    lt, _ = listener
    c12 = _client(pki, maximum_version=ssl.TLSVersion.TLSv1_2)
    handshake(lt, c12, "a.test")
    lt.apply(_settings(min_version="1.3"))
    with pytest.raises(ssl.SSLError):
        handshake(lt, c12, "a.test")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_a_shared_key_resumes_on_another_listener(pki: Pki, version: ssl.TLSVersion) -> None:
    """Two workers (or nodes): same key, a ticket from one resumes on the other."""
    a = pki.leaf("tk", ["tk.test"])
    bundle = files.load_certificate(_cc(a.cert, a.key))
    key = os.urandom(80)
    one, two, three = (ListenerTls("https", _settings(), Stats()) for _ in range(3))
    for lt in (one, two, three):
        lt.load([bundle])
    one.set_ticket_key(key)
    two.set_ticket_key(key)
    three.set_ticket_key(os.urandom(80))
    assert one.ticket_key_shared and two.ticket_key_shared
    c = _client(pki, maximum_version=version)
    cli, _ = handshake(one, c, "tk.test")
    sess = cli.session
    assert handshake(two, c, "tk.test", sess)[0].session_reused
    assert not handshake(three, c, "tk.test", sess)[0].session_reused  # other key: full


def test_tickets_off(pki: Pki) -> None:
    a = pki.leaf("nt", ["nt.test"])
    lt = ListenerTls("https", _settings(session_tickets=False), Stats())
    lt.load([files.load_certificate(_cc(a.cert, a.key))])
    lt.set_ticket_key(os.urandom(80))
    assert not lt.ticket_key_shared
    cli, _ = handshake(lt, _client(pki), "nt.test")
    assert not cli.session.has_ticket  # type: ignore[union-attr]


# -- the control side -------------------------------------------------------------------------


def _config(pki: Pki, extra: str = "", names: tuple[str, ...] = ("ca1",)) -> config_mod.Config:
    certs = []
    for n in names:
        leaf = pki.leaf(n, [f"{n}.test"])
        certs.append(f'{{ cert_file = "{leaf.cert}", key_file = "{leaf.key}" }}')
    return config_mod.loads(f"""
[node]
name = "n"
[[listener]]
name = "https"
bind = "127.0.0.1:1"
pool = "web"
[listener.tls]
certificates = [{", ".join(certs)}]
{extra}
[[pool]]
name = "web"
backends = [{{ name = "b", address = "127.0.0.1:2" }}]
""")


def test_keeper_loads_selftests_and_describes_changes(pki: Pki) -> None:
    keeper = TlsKeeper()
    cfg = _config(pki)
    m, errors = keeper.load(cfg)
    assert errors == []
    lm = m.listeners["https"]
    assert lm.ticket_key_source == "random" and lm.ticket_key is not None
    asyncio.run(keeper.selftest(m))
    assert keeper.sharing is True, keeper.sharing_error
    again, _ = keeper.load(cfg)
    assert again.listeners["https"].ticket_key == lm.ticket_key  # kept across reloads
    wire = m.wire()
    assert wire["listeners"]["https"]["ticket_key"] == lm.ticket_key.hex()
    more, _ = keeper.load(_config(pki, names=("ca1", "ca2")))
    assert tls_changes(m, more) == [f"listener https certificates: added {pki.root / 'ca2.pem'}"]


def test_keeper_names_the_key_of_each_error(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "none.key"
    cfg = _config(pki, extra=f'ticket_key_file = "{missing}"')
    _, errors = TlsKeeper().load(cfg)
    assert errors == [f"listener[0].tls.ticket_key_file: ticket_key_file {missing}: no such file"]


def test_without_sharing_the_keys_are_dropped(pki: Pki) -> None:
    keeper = TlsKeeper()
    keeper.sharing = False
    m, _ = keeper.load(_config(pki))
    assert m.listeners["https"].ticket_key is None
    assert m.listeners["https"].ticket_key_source == "unsupported"


def test_stage_copies_for_the_service_user(pki: Pki, tmp_path: Path) -> None:
    """What the unit's ExecStartPre=+/ExecReload=+ run: keys readable by the dynamic user."""
    if os.geteuid() != 0:
        pytest.skip("staging chowns: needs root")
    a = pki.leaf("st", ["st.test"])
    src, dst = tmp_path / "etc", tmp_path / "run"
    src.mkdir()
    dst.mkdir()
    os.chown(dst, 65534, 65534)
    (src / "st.pem").write_bytes(a.cert.read_bytes())
    (src / "st.key").write_bytes(a.key.read_bytes())
    (src / "st.key").chmod(0o600)
    (src / "archive").mkdir()  # certbot-style subdirectories are skipped
    (dst / "stale.key").write_text("old")
    assert files.stage(str(src), str(dst)) == ["st.key", "st.pem"]
    assert sorted(os.listdir(dst)) == ["st.key", "st.pem"]
    for name in ("st.key", "st.pem"):
        st = os.stat(dst / name)
        assert (st.st_uid, st.st_mode & 0o777) == (65534, 0o600)
    assert (dst / "st.key").read_bytes() == a.key.read_bytes()
    (src / "st.key").chmod(0o644)  # a key readable by others is refused at the source
    with pytest.raises(files.TlsFileError, match="chmod 600"):
        files.stage(str(src), str(dst))
    assert files.stage(str(tmp_path / "missing"), str(dst)) == []


def test_check_config_notes_tls_checks_that_would_take_a_core() -> None:
    from lb.control.preflight import _tls_check_load

    backends = ", ".join(f'{{ name = "b{i}", address = "127.0.0.1:{2000 + i}" }}'
                         for i in range(300))
    base = f"""
[node]
name = "n"
[[listener]]
name = "l"
bind = "127.0.0.1:1"
pool = "p"
[[pool]]
name = "p"
backends = [{backends}]
[pool.tls]
verify = false
"""
    notes = _tls_check_load(config_mod.loads(base))
    assert len(notes) == 1 and "300 TLS handshakes a second" in notes[0]
    assert "reuse_connection = true" in notes[0]
    kept = config_mod.loads(base + "[pool.health]\nreuse_connection = true\n")
    assert _tls_check_load(kept) == []
    slow = config_mod.loads(base + "[pool.health]\ninterval_s = 5.0\ntimeout_s = 1.0\n")
    assert _tls_check_load(slow) == []


def test_ticket_keys_rotate_together_on_both_nodes(pki: Pki, tmp_path: Path) -> None:
    """Derived keys change at each period's start, the same on two nodes with the same
    failover key; a ticket_key_file's key is left alone."""
    from lb.control.tls import TICKET_KEY_ROTATE_S

    secret = os.urandom(32)
    one, two = TlsKeeper(), TlsKeeper()
    m = dataclasses.replace(one.load(_config(pki))[0], secret=secret)
    m = dataclasses.replace(m, listeners={n: dataclasses.replace(
        lm, ticket_key_source="failover_key") for n, lm in m.listeners.items()})
    t = 1_000_000 * TICKET_KEY_ROTATE_S + 5.0
    a, b = one.rotate(m, t), two.rotate(m, t)
    assert a is not None and b is not None
    ka, kb = a.listeners["https"].ticket_key, b.listeners["https"].ticket_key
    assert ka == kb == ticketkeys.derive(secret, "https", 1_000_000)
    assert one.rotate(a, t + 60) is None  # same period: nothing to send
    later = one.rotate(a, t + TICKET_KEY_ROTATE_S)
    assert later is not None and later.listeners["https"].ticket_key != ka
    r = one.load(_config(pki))[0]  # random keys rotate too, the old one forgotten
    assert r.listeners["https"].ticket_key_source == "random"
    r2 = one.rotate(r, time.time() + TICKET_KEY_ROTATE_S)
    assert r2 is not None and r2.listeners["https"].ticket_key != r.listeners["https"].ticket_key
    assert len([k for k in one.random_keys if k[0] == "https"]) == 1
    f = tmp_path / "t.key"
    f.write_text(os.urandom(80).hex())
    f.chmod(0o600)
    fm = one.load(_config(pki, extra=f'ticket_key_file = "{f}"'))[0]
    assert one.rotate(fm, t + TICKET_KEY_ROTATE_S) is None


def test_a_certificate_whose_names_an_earlier_one_has_is_reported(pki: Pki) -> None:
    from lb.control.tls import shadowed

    cfg = _config(pki, names=("sh1", "sh2"))
    m, _ = TlsKeeper().load(cfg)
    assert shadowed(cfg, m) == []
    twin = pki.leaf("sh1rsa", ["sh1.test"], key_type="rsa")
    text = _config(pki, names=("sh1",)).model_dump(mode="json")
    text["listener"][0]["tls"]["certificates"].append(
        {"cert_file": str(twin.cert), "key_file": str(twin.key)})
    cfg2 = config_mod.parse_config(text)
    m2, errors = TlsKeeper().load(cfg2)
    assert errors == []
    (line,) = shadowed(cfg2, m2)
    assert line.startswith("listener[0].tls.certificates[1]: every name of")
