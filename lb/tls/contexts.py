"""SSLContexts built the one way pairlb builds them, in the control process (to validate) and
in the workers (to serve): certificates loaded from bytes, never from a path a worker would
need to read.

A worker runs as an unprivileged user and cannot open root's 0600 key files; the control
process reads them and sends the PEM over the worker channel. OpenSSL loads only from a path,
so the bytes go through an anonymous memory file (memfd) named by ``/proc/self/fd/N``: the
key never touches a disk and nothing else can open it.
"""

from __future__ import annotations

import _ssl
import contextlib
import os
import ssl
from collections.abc import Iterator
from typing import Any

VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class EncryptedKey(ValueError):
    """A private key with a pass phrase: OpenSSL would prompt on the terminal."""


def _no_password() -> bytes:
    raise EncryptedKey("the private key is encrypted (a pass phrase is not supported: "
                       "store it unencrypted, mode 0600)")


@contextlib.contextmanager
def memfile(data: bytes, name: str = "pairlb-tls") -> Iterator[str]:
    """A path that reads ``data`` while the block runs (a sealed-off memfd)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def load_pem(ctx: ssl.SSLContext, pem: bytes) -> None:
    """Load a certificate chain and its key (one PEM blob, key anywhere in it) into ``ctx``."""
    with memfile(pem) as path:
        ctx.load_cert_chain(path, password=_no_password)


def decode_cert(pem: bytes) -> dict[str, Any]:
    """The first certificate of ``pem`` as ``SSLSocket.getpeercert()`` shows one (subject,
    subjectAltName, notBefore, notAfter). CPython's own decoder: no extra dependency."""
    with memfile(pem) as path:
        return _ssl._test_decode_cert(path)  # type: ignore[attr-defined, no-any-return]


def cert_names(decoded: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(DNS names, IP addresses) a certificate is for: its subjectAltName, or its subject's
    common name when it has no DNS name (old certificates)."""
    dns = [v for k, v in decoded.get("subjectAltName", ()) if k == "DNS"]
    ips = [v.strip() for k, v in decoded.get("subjectAltName", ()) if k == "IP Address"]
    if not dns:
        for rdn in decoded.get("subject", ()):
            for k, v in rdn:
                if k == "commonName" and v not in dns:
                    dns.append(v)
    return tuple(dns), tuple(ips)


def cert_time(value: str) -> float:
    """``'Dec 14 11:34:18 2026 GMT'`` as a Unix time."""
    return float(ssl.cert_time_to_seconds(value))


def server_context(min_version: str, ciphers: str, tickets: bool) -> ssl.SSLContext:
    """The settings every connection of a listener starts from (a "front" context: OpenSSL
    copies protocol versions, options, ciphers and the ticket key from it when a
    connection begins, whichever certificate the SNI callback then switches to)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = VERSIONS[min_version]
    ctx.set_ciphers(ciphers)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    if not tickets:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    else:
        ctx.num_tickets = 1  # one per handshake: clients use one (OpenSSL's default is 2)
    return ctx


class CertContext(ssl.SSLContext):
    """A context holding one certificate; ``cert_id`` names it in metrics and /status."""

    cert_id: str = ""


def cert_context(pem: bytes, cert_id: str, alpn: tuple[str, ...]) -> CertContext:
    """A context with one certificate and key, for the SNI callback to switch to. ALPN is
    read from the context switched to, so it is set here."""
    ctx = CertContext(ssl.PROTOCOL_TLS_SERVER)
    load_pem(ctx, pem)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    ctx.cert_id = cert_id
    return ctx


def client_context(*, verify: bool, ca_pem: bytes | None, min_version: str,
                   alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """A context for connections to backends (``[pool.tls]``)."""
    # One context, its CA store read once: the pool's file, else the system's.
    cadata = ca_pem.decode("ascii", "replace") if ca_pem is not None else None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=cadata)
    ctx.minimum_version = VERSIONS[min_version]
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


__all__ = [
    "VERSIONS",
    "CertContext",
    "EncryptedKey",
    "cert_context",
    "cert_names",
    "cert_time",
    "client_context",
    "decode_cert",
    "load_pem",
    "memfile",
    "server_context",
]
