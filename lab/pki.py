"""Certificates for tests, benchmarks and the demo, made with the openssl CLI as an operator
would: a CA and ECDSA P-256 (or RSA) leaves with the names asked for. Never used by pairlb
itself."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Leaf:
    cert: Path
    """The leaf certificate, then the CA (a served chain)."""
    key: Path
    """Its private key, mode 0600."""


class Pki:
    """A CA in ``root`` and leaves signed by it, made on demand and cached by name."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ca = root / "ca.pem"
        self.ca_key = root / "ca.key"
        if not self.ca.exists():
            _run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                 "-out", str(self.ca_key))
            _run("openssl", "req", "-x509", "-new", "-key", str(self.ca_key), "-sha256",
                 "-days", "30", "-subj", "/CN=pairlb test CA", "-out", str(self.ca))

    def leaf(self, name: str, dns: Sequence[str], ips: Sequence[str] = (),
             days: int = 20, key_type: str = "ec") -> Leaf:
        """A certificate for ``dns`` (and ``ips``), valid ``days`` (negative: expired)."""
        cert, key = self.root / f"{name}.pem", self.root / f"{name}.key"
        if cert.exists():
            return Leaf(cert, key)
        if key_type == "rsa":
            _run("openssl", "genrsa", "-out", str(key), "2048")
        else:
            _run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                 "-out", str(key))
        os.chmod(key, 0o600)
        csr = self.root / f"{name}.csr"
        _run("openssl", "req", "-new", "-key", str(key), "-subj", f"/CN={dns[0] if dns else name}",
             "-out", str(csr))
        ext = self.root / f"{name}.ext"
        san = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
        ext.write_text(f"subjectAltName={','.join(san)}\nextendedKeyUsage=serverAuth\n")
        leaf = self.root / f"{name}.leaf.pem"
        if days >= 0:
            _run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(self.ca),
                 "-CAkey", str(self.ca_key), "-CAcreateserial", "-sha256",
                 "-extfile", str(ext), "-out", str(leaf), "-days", str(days))
        else:  # already expired: `openssl ca` is the 3.0 CLI that takes explicit dates
            db = self.root / "ca.db"
            db.touch()
            (self.root / "ca.cnf").write_text(
                "[ca]\ndefault_ca=d\n[d]\n"
                f"database={db}\nnew_certs_dir={self.root}\nserial={self.root}/ca.serial\n"
                "default_md=sha256\npolicy=p\nunique_subject=no\ncopy_extensions=none\n"
                "[p]\ncommonName=supplied\n")
            serial = self.root / "ca.serial"
            if not serial.exists():
                serial.write_text("1000\n")
            _run("openssl", "ca", "-batch", "-config", str(self.root / "ca.cnf"),
                 "-in", str(csr), "-cert", str(self.ca), "-keyfile", str(self.ca_key),
                 "-startdate", _ago(-days + 2), "-enddate", _ago(-days),
                 "-extfile", str(ext), "-notext", "-out", str(leaf))
        cert.write_bytes(leaf.read_bytes() + self.ca.read_bytes())
        return Leaf(cert, key)


def _ago(days: int) -> str:
    import datetime

    t = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days)
    return t.strftime("%Y%m%d%H%M%SZ")


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


__all__ = ["Leaf", "Pki"]
