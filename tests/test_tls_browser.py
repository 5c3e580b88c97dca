"""A real browser over pairlb's TLS (issue 15): headless Chromium fetches
``https://api.w.test:PORT/whoami`` from a real ``pairlb run`` (two workers, a real backend,
the certificates of tests/test_tls_e2e.py) with the name mapped to 127.0.0.1 and the test CA
trusted, and shows the backend's page: the body says the backend got the request, and
with which X-Forwarded-Proto.

Trust: Chromium takes no CA file on its command line. With ``certutil`` (libnss3-tools)
the test CA goes into an NSS database in a temporary HOME, which Chromium reads on Linux;
without it, ``--ignore-certificate-errors-spki-list`` trusts exactly the served leaf's key
(base64 SHA-256 of its SubjectPublicKeyInfo, computed with the openssl CLI). Either way a
control run without the trust must not show the page, and pairlb counts the refusal
(client_alert). Chromium's other network use is off (background networking, component
updates; every other host name resolves to nothing). Skipped only when chromium is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_helpers import wait_until
from test_tls_e2e import LISTENER, PairBackend, TlsNode, install_certs, tls_total
from tls_helpers import Pki

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NAME = "api.w.test"

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl CLI is not installed"),
    pytest.mark.timeout(120),
]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def node(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    tmp = tmp_path_factory.mktemp("browser")
    certs = install_certs(pki, tmp / "certs")
    with PairBackend(tmp) as be, TlsNode(tmp, be, certs) as n:
        yield n


def spki_hash(cert: Path) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of the first certificate in ``cert``."""
    pub = subprocess.run(["openssl", "x509", "-in", str(cert), "-pubkey", "-noout"],
                         check=True, capture_output=True, timeout=30).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pub,
                         check=True, capture_output=True, timeout=30).stdout
    digest = subprocess.run(["openssl", "dgst", "-sha256", "-binary"], input=der, check=True,
                            capture_output=True, timeout=30).stdout
    digest_b64 = subprocess.run(["openssl", "base64", "-A"], input=digest, check=True,
                                capture_output=True, timeout=30).stdout
    return digest_b64.decode().strip()


def nss_trust(home: Path, ca: Path) -> bool:
    """The test CA in an NSS database under ``home`` (what Chromium reads on Linux);
    False when certutil is not installed."""
    certutil = shutil.which("certutil")
    if certutil is None:
        return False
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True)
    subprocess.run([certutil, "-N", "-d", f"sql:{db}", "--empty-password"], check=True,
                   capture_output=True, timeout=30)
    subprocess.run([certutil, "-A", "-d", f"sql:{db}", "-n", "pairlb test CA", "-t", "C,,",
                    "-i", str(ca)], check=True, capture_output=True, timeout=30)
    return True


def chromium(url: str, home: Path, extra: list[str], timeout_s: float = 60.0) -> str:
    """``chromium --headless=new --dump-dom URL``: the DOM it rendered (stdout)."""
    assert CHROMIUM is not None
    argv = [
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--no-default-browser-check", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions",
        "--disable-dev-shm-usage", f"--user-data-dir={home / 'profile'}",
        f"--host-resolver-rules=MAP {NAME} 127.0.0.1, MAP * ~NOTFOUND",
        *extra, "--dump-dom", url,
    ]
    env = {**os.environ, "HOME": str(home)}
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
        proc.communicate()
        raise AssertionError(f"chromium did not finish {url} within {timeout_s}s") from None
    finally:
        with contextlib.suppress(ProcessLookupError):  # helpers it left behind, if any
            os.killpg(proc.pid, signal.SIGKILL)
    return out.decode(errors="replace") + ("" if out else err.decode(errors="replace")[-1500:])


def test_chromium_gets_the_page_over_tls_and_refuses_it_untrusted(
        node: TlsNode, pki: Pki, tmp_path: Path) -> None:
    url = f"https://{NAME}:{node.port}/whoami"
    exact = str(node.certs["exact"].cert)
    full_before = tls_total(node.samples(), "pairlb_tls_handshakes_total", cert=exact,
                            kind="full")

    # Control: nothing trusts the test CA, so no page; pairlb counts the refusal.
    untrusted = chromium(url, tmp_path / "untrusted", [])
    assert "web1 saw" not in untrusted, untrusted[-2000:]
    wait_until(lambda: tls_total(node.samples(), "pairlb_tls_handshake_failures_total",
                                 reason="client_alert") >= 1, 5.0,
               "the browser's refusal counted (client_alert)", 0.1)

    home = tmp_path / "trusted"
    home.mkdir()
    if nss_trust(home, pki.ca):
        how, extra = "the test CA in an NSS database", []
    else:
        how = "the leaf's key (--ignore-certificate-errors-spki-list)"
        extra = [f"--ignore-certificate-errors-spki-list={spki_hash(node.certs['exact'].cert)}"]
    dom = chromium(url, home, extra)
    assert "web1 saw proto=" in dom, f"trusting {how}:\n{dom[-2000:]}"
    assert f"host={NAME}:{node.port}" in dom, dom[-2000:]
    # The browser's handshake chose the exact certificate (SNI) and completed.
    wait_until(lambda: tls_total(node.samples(), "pairlb_tls_handshakes_total", cert=exact,
                                 kind="full") > full_before, 5.0,
               f"a full handshake on {exact} (listener {LISTENER})", 0.1)
    assert "proto=https " in dom, dom[-2000:]  # the backend's X-Forwarded-Proto
    print(f"chromium trusted {how}; page: {dom.split('<pre', 1)[-1][:120]!r}")
