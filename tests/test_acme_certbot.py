"""A real ACME client gets a real certificate through pairlb, and pairlb then serves it
(issue 15, docs/tls.md "ACME (Let's Encrypt) behind the pair").

- pebble (Let's Encrypt's ACME test server, Debian's package) runs on 127.0.0.1 with its
  ACME API on a certificate of ours (lab.pki: Debian ships no "minica" certificate) and
  validates HTTP-01 on pairlb's plain listener port (``httpPort``).
- pairlb: a plain listener with ``acme_challenge_dir`` and ``redirect_to_https`` (the
  challenge is answered before the redirect), a TLS listener on a self-signed placeholder
  for the name, an admin API with a token.
- ``certbot certonly --webroot`` (everything under tmp_path) asks pebble for ``localhost``
  (a name that resolves to 127.0.0.1 everywhere; pebble and certbot both accept it); pebble
  fetches the challenge through pairlb, which counts it (``acme_served``).
- The TLS listener is pointed at certbot's ``live/NAME/fullchain.pem`` and ``privkey.pem``
  (symlinks into ``archive/``, key 0600) and POST /reload: Python's ssl and curl, trusting
  only pebble's issuing root (its management API, ``/roots/0``), verify the certificate.

certbot ``--webroot -w W`` writes ``W/.well-known/acme-challenge/TOKEN``, so the listener's
``acme_challenge_dir`` is ``W/.well-known/acme-challenge``. The webroot is outside tmp_path
(pytest's directories are 0700, and the workers run as ``nobody`` when pairlb is root).

Skipped without pebble, certbot or the openssl CLI (``./dev`` installs them as root).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from admin_helpers import (
    LOOPBACK,
    Backends,
    Daemon,
    _stop,
    free_port,
    http,
    parse_metrics,
    total,
    wait_until,
)
from tls_helpers import Pki

MISSING = [tool for tool in ("pebble", "certbot", "openssl") if shutil.which(tool) is None]

pytestmark = [
    pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)} "
                       "(apt-get install pebble certbot openssl; ./dev does as root)"),
    pytest.mark.timeout(120),
]

NAME = "localhost"
"""The name certified: resolves to 127.0.0.1 through /etc/hosts (pebble uses the system
resolver), and neither certbot nor pebble refuses it (Let's Encrypt would)."""


# -- pebble -----------------------------------------------------------------------------------


class Pebble:
    """``pebble -config FILE`` on 127.0.0.1 (ACME API and management API on free ports),
    validating HTTP-01 on ``http_port``; its API certificate is a lab.pki leaf."""

    def __init__(self, tmp: Path, pki: Pki, http_port: int) -> None:
        self.tmp = tmp
        self.pki = pki
        self.acme_port = free_port()
        self.mgmt_port = free_port()
        api = pki.leaf("pebble-api", ["localhost"], ips=[LOOPBACK])
        self.config = tmp / "pebble.json"
        self.config.write_text(f"""\
{{
  "pebble": {{
    "listenAddress": "{LOOPBACK}:{self.acme_port}",
    "managementListenAddress": "{LOOPBACK}:{self.mgmt_port}",
    "certificate": "{api.cert}",
    "privateKey": "{api.key}",
    "httpPort": {http_port},
    "tlsPort": {free_port()},
    "ocspResponderURL": "",
    "externalAccountBindingRequired": false
  }}
}}
""")
        self.log = tmp / "pebble.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def directory(self) -> str:
        return f"https://{LOOPBACK}:{self.acme_port}/dir"

    def __enter__(self) -> Pebble:
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",  # no random 0-15 s sleep before each validation
            "PEBBLE_VA_ALWAYS_VALID": "0",  # really fetch the challenge (the default)
            "PEBBLE_WFE_NONCEREJECT": "0",  # no random badNonce (5% by default)
            "PEBBLE_AUTHZREUSE": "0",
        }
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["pebble", "-config", str(self.config)], cwd=self.tmp, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._ready, 20.0, "pebble's directory and management API", 0.1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _get(self, url: str) -> bytes:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca))
        with urllib.request.urlopen(url, timeout=2.0, context=ctx) as resp:
            return bytes(resp.read())

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"pebble exited with {self.proc.returncode}:\n{self.logs()}")
        try:
            self._get(self.directory)
            self._get(f"https://{LOOPBACK}:{self.mgmt_port}/roots/0")
        except OSError:
            return False
        return True

    def root(self) -> str:
        """The PEM of the root pebble issues under (made anew at each start)."""
        return self._get(f"https://{LOOPBACK}:{self.mgmt_port}/roots/0").decode()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            _stop(self.proc, 5.0)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


# -- pairlb -----------------------------------------------------------------------------------


def node_config(*, http_port: int, tls_port: int, admin_port: int, backend_port: int,
                acme_dir: Path, cert: Path, key: Path, token_file: Path) -> str:
    return f"""\
[node]
name = "t1"
workers = 2
shutdown_timeout_s = 2.0

[[listener]]
name = "web"
bind = "{LOOPBACK}:{http_port}"
pool = "web"
redirect_to_https = true
https_port = {tls_port}
acme_challenge_dir = "{acme_dir}"

[[listener]]
name = "tls"
bind = "{LOOPBACK}:{tls_port}"
pool = "web"

[listener.tls]
certificates = [
  {{ cert_file = "{cert}", key_file = "{key}" }},
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


class Node(Daemon):
    """A node with a plain listener serving ACME challenges and a TLS listener.
    ``retarget()`` rewrites the TLS listener's certificate in the file (then POST /reload
    applies it)."""

    def __init__(self, tmp: Path, backend_port: int, acme_dir: Path, cert: Path,
                 key: Path) -> None:
        super().__init__(tmp)
        self.http_port, self.tls_port = free_port(), free_port()
        self.backend_port = backend_port
        self.acme_dir = acme_dir
        self.retarget(cert, key)

    def retarget(self, cert: Path, key: Path) -> None:
        self.config.write_text(node_config(
            http_port=self.http_port, tls_port=self.tls_port, admin_port=self.admin_port,
            backend_port=self.backend_port, acme_dir=self.acme_dir, cert=cert, key=key,
            token_file=self.token_file))

    def acme_served(self) -> float:
        return float(total(parse_metrics(self.metrics()), "pairlb_local_responses_total",
                           listener="web", kind="acme_served"))


# -- clients ----------------------------------------------------------------------------------


def served_leaf(port: int, ctx: ssl.SSLContext) -> bytes:
    """The DER of the certificate the TLS listener sends for SNI NAME (verified by ctx)."""
    with socket.create_connection((LOOPBACK, port), timeout=5.0) as sock, \
            ctx.wrap_socket(sock, server_hostname=NAME) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def leaf_der(chain: Path) -> bytes:
    text = chain.read_text()
    end = text.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")
    return ssl.PEM_cert_to_DER_cert(text[:end] + "\n")


@pytest.fixture
def webroot() -> Iterator[Path]:
    """certbot's ``--webroot``, readable by the workers' user: outside pytest's 0700 dirs."""
    root = Path(tempfile.mkdtemp(prefix="pairlb-acme-"))
    try:
        root.chmod(0o755)
        acme = root / ".well-known" / "acme-challenge"
        acme.mkdir(parents=True)
        for d in (root / ".well-known", acme):
            d.chmod(0o755)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_certbot_gets_a_certificate_through_pairlb_which_then_serves_it(
        tmp_path: Path, webroot: Path) -> None:
    t0 = time.monotonic()
    pki = Pki(tmp_path / "pki")
    placeholder = pki.leaf("placeholder", [NAME])  # signed by the lab CA, not pebble's
    acme_dir = webroot / ".well-known" / "acme-challenge"
    certbot_dirs = {d: tmp_path / "certbot" / d for d in ("config", "work", "logs")}
    with contextlib.ExitStack() as stack:
        be = stack.enter_context(Backends(["web1"]))
        node = stack.enter_context(Node(tmp_path, be.ports["web1"], acme_dir,
                                        placeholder.cert, placeholder.key))
        pebble = stack.enter_context(Pebble(tmp_path, pki, node.http_port))
        root = tmp_path / "pebble-root.pem"
        root.write_text(pebble.root())
        trust = ssl.create_default_context(cafile=str(root))

        # The placeholder does not verify against pebble's root (nor would it anywhere).
        with pytest.raises(ssl.SSLCertVerificationError):
            served_leaf(node.tls_port, trust)
        assert node.acme_served() == 0

        # certbot, through pairlb's plain listener.
        t_certbot = time.monotonic()
        res = subprocess.run(
            ["certbot", "certonly", "--webroot", "-w", str(webroot), "-d", NAME,
             "--server", pebble.directory, "--register-unsafely-without-email", "--agree-tos",
             "--non-interactive", "--no-eff-email",
             *(arg for d, path in certbot_dirs.items() for arg in (f"--{d}-dir", str(path)))],
            env={**os.environ, "REQUESTS_CA_BUNDLE": str(pki.ca)},
            capture_output=True, text=True, timeout=60)
        certbot_s = time.monotonic() - t_certbot
        log = certbot_dirs["logs"] / "letsencrypt.log"
        log_tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        assert res.returncode == 0, (
            f"certbot failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n"
            f"--- letsencrypt.log\n{log_tail}"
            f"\n--- pebble\n{pebble.logs()}\n--- pairlb\n{node.logs()}")
        wait_until(lambda: node.acme_served() >= 1, 5.0, "acme_served counted", 0.1)
        # ... while anything else on the plain listener is redirected to https.
        code, headers, _ = http("GET", f"http://{LOOPBACK}:{node.http_port}/x",
                                headers={"Host": NAME})
        assert code == 301, code
        assert headers["Location"] == f"https://{NAME}:{node.tls_port}/x", headers
        assert list(acme_dir.iterdir()) == []  # certbot cleaned its token up

        live = certbot_dirs["config"] / "live" / NAME
        fullchain, privkey = live / "fullchain.pem", live / "privkey.pem"
        assert fullchain.is_symlink() and privkey.is_symlink()
        assert privkey.stat().st_mode & 0o077 == 0

        # Point the TLS listener at certbot's files and reload.
        node.retarget(fullchain, privkey)
        code, _, body = http("POST", node.admin + "/reload", token=node.token, timeout_s=15.0)
        assert code == 200, (code, body, node.logs())
        assert json.loads(body)["ok"] is True, body
        code, _, body = http("GET", node.admin + "/status")
        tls = json.loads(body)["listeners"][1]["tls"]
        assert tls["certificates"][0]["cert_file"] == str(fullchain), tls
        assert tls["certificates"][0]["names"] == [NAME], tls

        # Python's ssl, trusting pebble's root only: verifies, and it is certbot's leaf.
        assert served_leaf(node.tls_port, trust) == leaf_der(fullchain)

        # curl too (and through to the backend).
        if shutil.which("curl") is not None:
            url = f"https://{NAME}:{node.tls_port}/"
            res = subprocess.run(
                ["curl", "-sS", "--max-time", "10", "--cacert", str(root), "--resolve",
                 f"{NAME}:{node.tls_port}:{LOOPBACK}", "-D", "-", "-o", "/dev/null", url],
                capture_output=True, text=True, timeout=20)
            assert res.returncode == 0, res.stderr + res.stdout
            assert res.stdout.startswith("HTTP/1.1 200"), res.stdout
            assert "x-backend: web1" in res.stdout.lower(), res.stdout
    print(f"certbot {certbot_s:.1f}s, whole test {time.monotonic() - t0:.1f}s")
