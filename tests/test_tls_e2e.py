"""TLS termination end to end (issue 15): a real ``pairlb run`` on 127.0.0.1 with two workers
and a real backend, driven by real clients (the openssl CLI, curl, Python's ssl module).

- SNI: ``openssl s_client -servername`` gets the exact name's certificate, the wildcard's, and
  the first (default) one for an unknown name and for no SNI at all; ALPN offers http/1.1.
- curl ``--cacert --resolve`` gets 200 from the backend, which saw ``X-Forwarded-Proto:
  https`` (lab.pair's backend echoes it).
- Resumption across workers, TLS 1.2 and 1.3, ``s_client -sess_out/-sess_in``: the ticket is
  issued by one worker while the other is SIGSTOPped, then resumed on the other one (the
  first SIGSTOPped): certain, not left to the kernel's accept spread; /status counts them.
- ``min_version = "1.3"``: ``s_client -tls1_2`` is refused and counted (protocol_version),
  plain HTTP to the TLS port is counted (http_request).
- Reload: a renewed certificate file is served to new connections after POST /reload while
  an open keep-alive connection goes on with the old one; a mismatched, an encrypted, a
  world-readable key and a symlink owned by another user each fail the reload (the file
  named in the answer and in /status) and the old certificate goes on serving;
  ``pairlb check-config`` names the same key of the config and the file.
- /status validates against docs/status.schema.json; ``promtool check metrics`` passes on
  /metrics, with the TLS series in it.

Certificates: tests/tls_helpers.Pki (the openssl CLI). Needs openssl and curl (skipped
otherwise); the symlink case needs root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from http.client import HTTPResponse
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from admin_helpers import (
    LOOPBACK,
    PYTHON,
    ROOT,
    SCHEMA,
    Daemon,
    _stop,
    free_port,
    http,
    parse_metrics,
    total,
    wait_until,
)
from tls_helpers import Leaf, Pki

from lab import backend_app

pytestmark = [
    pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI is not installed"),
    pytest.mark.timeout(120),
]

STATUS_SCHEMA = json.loads(SCHEMA.read_text())
LISTENER = "tls"
# The certificates, in config order: the first is the default (no SNI, unknown names).
CERTS = {
    "default": ["default.test"],
    "wild": ["*.w.test", "w.test"],
    "exact": ["api.w.test"],
}


# -- processes ------------------------------------------------------------------------------


class PairBackend:
    """``python -m lab.pair backend NAME 127.0.0.1:PORT JOURNAL``: lab.backend_app plus
    X-Seen-Proto (the X-Forwarded-Proto it got) and GET /whoami."""

    def __init__(self, tmp: Path, name: str = "web1") -> None:
        self.name = name
        self.port = free_port()
        self.journal = tmp / f"{name}.journal"
        self.log = tmp / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PairBackend:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "lab.pair", "backend", self.name, f"{LOOPBACK}:{self.port}",
                 str(self.journal)], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT)
        try:
            backend_app.wait_answering(LOOPBACK, self.port, self.name)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            _stop(self.proc, 5.0)


def install_certs(pki: Pki, dest: Path) -> dict[str, Leaf]:
    """Each certificate of CERTS as dest/NAME.pem and dest/NAME.key (copies: tests that
    renew or break one change only their own)."""
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, dns in CERTS.items():
        leaf = pki.leaf(name, dns)
        cert, key = dest / f"{name}.pem", dest / f"{name}.key"
        shutil.copyfile(leaf.cert, cert)
        shutil.copyfile(leaf.key, key)
        key.chmod(0o600)
        out[name] = Leaf(cert, key)
    return out


def tls_config(*, port: int, admin_port: int, backend_port: int, token_file: Path,
               certs: dict[str, Leaf], min_version: str = "1.2", workers: int = 2) -> str:
    lines = ",\n".join(f'  {{ cert_file = "{c.cert}", key_file = "{c.key}" }}'
                       for c in certs.values())
    return f"""\
[node]
name = "t1"
workers = {workers}
shutdown_timeout_s = 2.0

[[listener]]
name = "{LISTENER}"
bind = "{LOOPBACK}:{port}"
pool = "web"

[listener.tls]
min_version = "{min_version}"
certificates = [
{lines},
]

[[pool]]
name = "web"
backends = [ {{ name = "web1", address = "{LOOPBACK}:{backend_port}" }} ]

[pool.health]
interval_s = 0.2
timeout_s = 0.2
rise = 1
fall = 2

[admin]
bind = "{LOOPBACK}:{admin_port}"
token_file = "{token_file}"
"""


class TlsNode(Daemon):
    """A node with a TLS listener (tls_config())."""

    def __init__(self, tmp: Path, backend: PairBackend, certs: dict[str, Leaf], *,
                 min_version: str = "1.2", workers: int = 2) -> None:
        super().__init__(tmp)
        self.certs = certs
        self.port = free_port()
        self.config.write_text(tls_config(
            port=self.port, admin_port=self.admin_port, backend_port=backend.port,
            token_file=self.token_file, certs=certs, min_version=min_version, workers=workers))

    def tls_status(self) -> Any:
        return self.status()["listeners"][0]["tls"]

    def samples(self) -> Any:
        return parse_metrics(self.metrics())

    def reload(self) -> tuple[int, Any]:
        code, _, body = http("POST", self.admin + "/reload", token=self.token, timeout_s=15.0)
        return code, json.loads(body)

    def worker_pids(self) -> list[int]:
        workers = sorted(self.status()["workers"], key=lambda w: w["index"])
        return [int(w["pid"]) for w in workers]


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The worker ``pid`` (ours: a child of the node we started) SIGSTOPped meanwhile: it
    accepts nothing, so the other worker takes every new connection."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


# -- clients --------------------------------------------------------------------------------


def s_client(port: int, *args: str, hold_s: float = 0.0, timeout_s: float = 10.0
             ) -> tuple[int, str]:
    """``openssl s_client -connect 127.0.0.1:PORT ARGS`` with stdin open for ``hold_s`` (a
    TLS 1.3 ticket comes after the handshake), then closed: (exit status, output)."""
    proc = subprocess.Popen(["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        if hold_s:
            time.sleep(hold_s)
        out, _ = proc.communicate(b"", timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out.decode(errors="replace")


def subject(out: str) -> str:
    m = re.search(r"^subject=(.*)$", out, re.M)
    assert m, out[-2000:]
    return m.group(1).strip()


def session_line(out: str) -> str:
    """s_client's ``New, TLSv1.3, Cipher is ...`` or ``Reused, ...`` line."""
    m = re.search(r"^(New|Reused), (TLSv1\.[0-9])", out, re.M)
    assert m, out[-2000:]
    return f"{m.group(1)} {m.group(2)}"


def client_context(pki: Pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def tls_connect(port: int, name: str, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection((LOOPBACK, port), timeout=5.0)
    try:
        return ctx.wrap_socket(sock, server_hostname=name)
    except BaseException:
        sock.close()
        raise


def get(sock: ssl.SSLSocket, host: str, path: str = "/whoami"
        ) -> tuple[int, dict[str, str], bytes]:
    """One keep-alive GET on an open connection."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    resp = HTTPResponse(sock)  # type: ignore[arg-type]
    resp.begin()
    body = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def leaf_der(chain: Path) -> bytes:
    """The DER of the first certificate of a PEM chain file (the leaf a server sends)."""
    text = chain.read_text()
    end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return ssl.PEM_cert_to_DER_cert(text[:end] + "\n")


def served_leaf(port: int, name: str, ctx: ssl.SSLContext) -> bytes:
    with tls_connect(port, name, ctx) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return der


def fingerprint(chain: Path) -> str:
    """What /status calls a certificate's fingerprint (SHA-256 of the chain file, 16 hex)."""
    return hashlib.sha256(chain.read_bytes()).hexdigest()[:16]


def tls_total(samples: Any, name: str, **labels: str) -> float:
    return float(total(samples, name, listener=LISTENER, **labels))


# -- the node most tests share -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def node(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    tmp = tmp_path_factory.mktemp("node")
    certs = install_certs(pki, tmp / "certs")
    with PairBackend(tmp) as be, TlsNode(tmp, be, certs) as n:
        yield n


def test_sni_picks_exact_wildcard_and_default_certificates_and_alpn(
        node: TlsNode, pki: Pki) -> None:
    ca = ["-CAfile", str(pki.ca), "-verify_return_error"]
    cases = [
        # (s_client's server name arguments, the certificate's subject, a name it verifies)
        (["-servername", "api.w.test"], "CN = api.w.test", "api.w.test"),  # exact beats *.w.test
        (["-servername", "x.w.test"], "CN = *.w.test", "x.w.test"),
        (["-servername", "W.TEST."], "CN = *.w.test", "w.test"),  # case and trailing dot
        (["-servername", "default.test"], "CN = default.test", "default.test"),
        (["-servername", "nobody.example"], "CN = default.test", None),  # unknown: default
        (["-noservername"], "CN = default.test", None),  # no SNI: default
    ]
    for sni, want, verify in cases:
        extra = ["-verify_hostname", verify] if verify else []
        rc, out = s_client(node.port, *sni, *ca, *extra, "-alpn", "http/1.1")
        assert rc == 0, out[-2000:]
        assert subject(out) == want, (sni, out[-2000:])
        assert "Verify return code: 0 (ok)" in out, out[-2000:]
        assert "ALPN protocol: http/1.1" in out, out[-2000:]
    # A client that offers h2 first still gets http/1.1 (all pairlb speaks); one offering
    # only h2 gets no ALPN and the handshake still succeeds.
    rc, out = s_client(node.port, "-servername", "api.w.test", "-alpn", "h2,http/1.1")
    assert rc == 0 and "ALPN protocol: http/1.1" in out, out[-2000:]
    rc, out = s_client(node.port, "-servername", "api.w.test", "-alpn", "h2")
    assert rc == 0 and "No ALPN negotiated" in out, out[-2000:]
    # Handshakes are counted per certificate chosen.
    certs = node.certs

    def counted() -> bool:
        s = node.samples()
        return all(tls_total(s, "pairlb_tls_handshakes_total", cert=str(certs[c].cert),
                             kind="full") >= n for c, n in (("exact", 3), ("wild", 2),
                                                            ("default", 3)))

    wait_until(counted, 5.0, "handshakes counted per certificate", 0.1)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_gets_the_backend_over_https_and_the_backend_knows_it(
        node: TlsNode, pki: Pki) -> None:
    name = "api.w.test"
    res = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--cacert", str(pki.ca), "--resolve",
         f"{name}:{node.port}:{LOOPBACK}", "-D", "-", "-w", "\n%{http_version} %{scheme}",
         f"https://{name}:{node.port}/whoami"], capture_output=True, text=True, timeout=20)
    assert res.returncode == 0, res.stderr + res.stdout
    head, _, rest = res.stdout.partition("\n\n")  # text=True: \r\n read as \n
    assert head.startswith("HTTP/1.1 200"), res.stdout
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in head.splitlines()[1:])}
    body, _, info = rest.rpartition("\n")
    body = body.rstrip("\n")
    assert headers["x-backend"] == "web1", res.stdout
    assert body.startswith("web1 saw proto="), res.stdout
    assert f"host={name}:{node.port}" in body, body
    assert info == "1.1 HTTPS", info
    # The backend learnt the client spoke HTTPS (X-Forwarded-Proto, set by pairlb).
    assert headers["x-seen-proto"] == "https" and "proto=https " in body, res.stdout


@pytest.mark.parametrize("version", ["1.2", "1.3"])
def test_session_resumes_on_the_other_worker(
        node: TlsNode, version: str, tmp_path: Path) -> None:
    """The ticket is issued by worker 0 (worker 1 stopped) and resumed by worker 1 (worker 0
    stopped): the key is shared by the workers. Then more resumptions with both running."""
    flag = "-tls1_2" if version == "1.2" else "-tls1_3"
    sess = tmp_path / "session.pem"
    args = ["-servername", "api.w.test", flag]
    pids = node.worker_pids()
    assert len(pids) == 2
    exact = str(node.certs["exact"].cert)

    def resumed_count() -> int:
        return sum(c["resumed"] for c in node.tls_status()["certificates"]
                   if c["cert_file"] == exact)

    before = resumed_count()
    with stopped(pids[1]):
        rc, out = s_client(node.port, *args, "-sess_out", str(sess), hold_s=0.5)
    assert rc == 0 and session_line(out) == f"New TLSv{version}", out[-2000:]
    lines = []
    with stopped(pids[0]):
        for _ in range(3):
            rc, out = s_client(node.port, *args, "-sess_in", str(sess), hold_s=0.1)
            assert rc == 0, out[-2000:]
            lines.append(session_line(out))
    for _ in range(4):
        rc, out = s_client(node.port, *args, "-sess_in", str(sess), hold_s=0.1)
        assert rc == 0, out[-2000:]
        lines.append(session_line(out))
    assert lines == [f"Reused TLSv{version}"] * 7, lines
    wait_until(lambda: resumed_count() >= before + 7, 5.0, "/status resumed +7", 0.1)
    s = node.samples()
    assert tls_total(s, "pairlb_tls_handshakes_total", cert=exact, kind="resumed") >= 7
    assert tls_total(s, "pairlb_tls_ticket_key_shared") == 1


def test_status_schema_and_promtool_with_the_tls_series(node: TlsNode) -> None:
    st = node.status()
    jsonschema.validate(st, STATUS_SCHEMA)
    tls = st["listeners"][0]["tls"]
    assert tls["min_version"] == "1.2" and tls["ticket_key"] == "random"
    certs = tls["certificates"]
    assert [c["cert_file"] for c in certs] == [str(c.cert) for c in node.certs.values()]
    assert [c["default"] for c in certs] == [True, False, False]
    assert [c["names"] for c in certs] == list(CERTS.values())
    for c, leaf in zip(certs, node.certs.values(), strict=True):
        assert c["fingerprint"] == fingerprint(leaf.cert)
        assert 19 * 86400 < c["not_after"] - time.time() < 21 * 86400, c
    text = node.metrics()
    s = parse_metrics(text)
    for c in certs:
        assert tls_total(s, "pairlb_tls_certificate_expiry_timestamp_seconds",
                         cert=c["cert_file"]) == pytest.approx(c["not_after"])
        assert tls_total(s, "pairlb_tls_handshakes_total", cert=c["cert_file"],
                         kind="full") >= c["handshakes"] > 0
    for reason in ("protocol_version", "http_request", "client_alert", "aborted", "timeout"):
        assert ("pairlb_tls_handshake_failures_total",
                frozenset({("listener", LISTENER), ("reason", reason)})) in s, reason
    assert tls_total(s, "pairlb_tls_ticket_key_shared") == 1
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (the rest of this test passed)")
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_reload_serves_a_renewed_certificate_and_open_connections_go_on(
        node: TlsNode, pki: Pki) -> None:
    ctx = client_context(pki)
    cur = node.certs["default"]
    old_der, old_fp = leaf_der(cur.cert), fingerprint(cur.cert)
    keep = tls_connect(node.port, "default.test", ctx)
    try:
        assert keep.getpeercert(binary_form=True) == old_der
        assert get(keep, "default.test")[0] == 200
        # Renewal as certbot does it: new files renamed over the old ones.
        renewed = pki.leaf("default-renewed", ["default.test"])
        for src, dst in ((renewed.cert, cur.cert), (renewed.key, cur.key)):
            tmp = dst.with_suffix(".new")
            shutil.copyfile(src, tmp)
            tmp.chmod(0o600 if dst == cur.key else 0o644)
            tmp.replace(dst)
        new_der, new_fp = leaf_der(cur.cert), fingerprint(cur.cert)
        assert new_der != old_der
        code, res = node.reload()
        assert code == 200 and res["ok"] is True, res
        assert any(f"renewed {cur.cert}" in line for line in res["changes"]), res
        # New connections: the new certificate, and /status says so.
        assert served_leaf(node.port, "default.test", ctx) == new_der
        anyname = client_context(pki)
        anyname.check_hostname = False
        assert served_leaf(node.port, "unknown.example", anyname) == new_der  # the default
        st = node.tls_status()
        assert st["certificates"][0]["fingerprint"] == new_fp != old_fp
        # The connection opened before goes on, with the certificate it negotiated.
        for _ in range(3):
            code, _, body = get(keep, "default.test")
            assert code == 200 and body.startswith(b"web1 saw"), body
        assert keep.getpeercert(binary_form=True) == old_der
    finally:
        keep.close()


BAD_KEYS = {
    # case: (what to do to the key file, what the error says)
    "mismatched": "does not match cert_file",
    "encrypted": "the private key is encrypted",
    "mode_0644": "accessible by group or others (mode 0644)",
    "foreign_symlink": "a symbolic link owned by uid 65534",
}


def break_key(case: str, key: Path, other_key: Path) -> None:
    good = key.with_suffix(".good")
    if case == "mismatched":  # another certificate's key
        shutil.copyfile(other_key, key)
    elif case == "encrypted":
        subprocess.run(["openssl", "ec", "-aes256", "-passout", "pass:x", "-in", str(good),
                        "-out", str(key)], check=True, capture_output=True, timeout=30)
        key.chmod(0o600)
    elif case == "mode_0644":
        key.chmod(0o644)
    elif case == "foreign_symlink":  # a link someone else owns, to a perfectly good key
        real = key.with_suffix(".real")
        shutil.copyfile(good, real)
        real.chmod(0o600)
        key.unlink()
        key.symlink_to(real)
        os.lchown(key, 65534, 65534)
    else:
        raise AssertionError(case)


@pytest.mark.parametrize("case", list(BAD_KEYS))
def test_reload_with_a_bad_key_fails_names_the_file_and_keeps_serving(
        node: TlsNode, pki: Pki, case: str) -> None:
    if case == "foreign_symlink" and os.geteuid() != 0:
        pytest.skip("chown of a symlink to another user needs root")
    ctx = client_context(pki)
    cur = node.certs["default"]
    before = served_leaf(node.port, "default.test", ctx)
    good = cur.key.with_suffix(".good")
    shutil.copyfile(cur.key, good)
    good.chmod(0o600)
    gen = node.status()["config"]["generation"]
    try:
        break_key(case, cur.key, node.certs["exact"].key)
        want = BAD_KEYS[case]
        code, res = node.reload()
        assert code == 422 and res["ok"] is False, res
        assert len(res["errors"]) == 1, res
        err = res["errors"][0]
        assert err.startswith("listener[0].tls.certificates[0]: "), err
        assert str(cur.key) in err and want in err, err
        cfg = node.status()["config"]
        assert cfg["last_reload"]["ok"] is False and cfg["last_reload"]["errors"] == [err]
        assert cfg["generation"] == gen
        # The old certificate goes on serving, to new connections too.
        assert served_leaf(node.port, "default.test", ctx) == before
        # check-config says the same about the same files, and fails.
        chk = subprocess.run([PYTHON, "-m", "lb", "check-config", str(node.config)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        out = chk.stdout + chk.stderr
        assert chk.returncode != 0, out
        assert "listener[0].tls.certificates[0]" in out and str(cur.key) in out, out
        assert want in out, out
    finally:
        if cur.key.is_symlink() or cur.key.exists():
            cur.key.unlink()
        good.replace(cur.key)
        with contextlib.suppress(FileNotFoundError):
            cur.key.with_suffix(".real").unlink()
    code, res = node.reload()  # the repaired files load again
    assert code == 200 and res["ok"] is True, res
    assert served_leaf(node.port, "default.test", ctx) == before


# -- min_version 1.3, and what is not TLS at all ------------------------------------------------


def test_min_version_13_refuses_tls12_and_counts_failures_by_reason(
        pki: Pki, tmp_path: Path) -> None:
    certs = install_certs(pki, tmp_path / "certs")
    with PairBackend(tmp_path) as be, TlsNode(tmp_path, be, certs, min_version="1.3",
                                              workers=1) as n:
        rc, out = s_client(n.port, "-servername", "api.w.test", "-tls1_2")
        # Refused. The client sees the connection closed rather than a protocol_version
        # alert: asyncio's (and uvloop's) SSL transport drops the alert OpenSSL wrote when
        # the handshake fails (the same with a bare asyncio server).
        assert rc != 0 and not re.search(r"^New, TLSv1\.2", out, re.M), out[-2000:]
        assert re.search(r"^New, \(NONE\), Cipher is \(NONE\)", out, re.M), out[-2000:]
        rc, out = s_client(n.port, "-servername", "api.w.test", "-tls1_3")
        assert rc == 0 and session_line(out) == "New TLSv1.3", out[-2000:]
        # Plain HTTP to the TLS port: no answer an HTTP client could take for one.
        with socket.create_connection((LOOPBACK, n.port), timeout=5.0) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: api.w.test\r\n\r\n")
            with contextlib.suppress(OSError):
                data = s.recv(4096)
                assert not data.startswith(b"HTTP/"), data

        def failures() -> Any:
            s = n.samples()
            got = {r: tls_total(s, "pairlb_tls_handshake_failures_total", reason=r)
                   for r in ("protocol_version", "http_request")}
            return got if all(v >= 1 for v in got.values()) else None

        got = wait_until(failures, 5.0, "protocol_version and http_request counted", 0.1)
        assert got == {"protocol_version": 1, "http_request": 1}, got
        st = n.tls_status()
        jsonschema.validate(n.status(), STATUS_SCHEMA)
        assert st["min_version"] == "1.3"
        assert st["failures"].get("protocol_version") == 1
        assert st["failures"].get("http_request") == 1
