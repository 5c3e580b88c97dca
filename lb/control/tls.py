"""TLS in the control process: what it reads for the workers, and what it reports.

The workers run unprivileged and cannot read private keys; the control process (root) reads
every certificate, key, ticket key and backend CA file with the checks in lb.tls.files,
and sends the bytes over the worker channel (``wire()``). A reload reads them all again
before anything changes: one bad file fails the reload, names the file, and the old
certificates keep serving (lb.control.daemon keeps the old material with the old config).

Session ticket keys, per listener, the first that applies:

1. ``ticket_key_file`` (the same 80-byte file on both nodes);
2. derived from the failover key (HKDF, lb.tls.ticketkeys.derive): both nodes of a pair
   have that key, so a client resumes on the peer after a failover with no setup at all;
3. a random key per start of the node: resumption across this node's workers only.

Sharing needs ctypes access to OpenSSL; ``selftest()`` proves it works in a throwaway
subprocess first (a wrong struct layout would crash that one, not the daemon). When it does
not, tickets stay on, each worker with OpenSSL's own key, and /status says why.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lb.channel import MAX_MESSAGE
from lb.config import Config, ListenerConfig
from lb.tls import files, ticketkeys
from lb.tls.files import CertBundle, TlsFileError

logger = logging.getLogger(__name__)

SELFTEST_TIMEOUT_S = 10.0
TICKET_KEY_ROTATE_S = 12 * 3600
"""Ticket keys pairlb makes (derived or random) change every 12 hours, at the same moment
on both nodes: a stolen key opens at most that period's TLS 1.2 sessions. A client holding
an older ticket makes one full handshake."""
MAX_CA_BYTES = 4 << 20
MAX_WIRE_BYTES = MAX_MESSAGE * 3 // 4
"""The TLS material of one config must fit in a worker's Config message (lb.channel's
frame limit) beside the rest of the config: a reload that would not is refused."""


@dataclass(frozen=True)
class ListenerMaterial:
    bundles: tuple[CertBundle, ...]
    ticket_key: bytes | None
    ticket_key_source: str
    """file, failover_key, random, off (session_tickets = false) or unsupported."""


@dataclass(frozen=True)
class Material:
    """Everything TLS the workers need for one config generation."""

    listeners: dict[str, ListenerMaterial] = field(default_factory=dict)
    pool_ca: dict[str, bytes | None] = field(default_factory=dict)
    loaded_at: float = 0.0
    secret: bytes | None = field(default=None, repr=False)
    """The failover key the ticket keys are derived from (never sent to the workers)."""

    def wire(self) -> dict[str, Any]:
        """The ``tls`` field of the worker Config message. Each certificate travels once,
        however many listeners serve it (``bundles``, by id; listeners name the ids)."""
        bundles: dict[str, dict[str, object]] = {}
        listeners: dict[str, Any] = {}
        for name, m in self.listeners.items():
            ids = []
            for b in m.bundles:
                bid = bundle_id(b)
                if bid not in bundles:
                    bundles[bid] = b.to_wire()
                ids.append(bid)
            listeners[name] = {"certs": ids,
                               "ticket_key": m.ticket_key.hex() if m.ticket_key else None}
        return {
            "bundles": bundles,
            "listeners": listeners,
            "pools": {
                name: {"ca_pem": ca.decode("ascii", "replace") if ca else None}
                for name, ca in self.pool_ca.items()
            },
        }


def bundle_id(b: CertBundle) -> str:
    """A certificate's id on the worker channel: its files and their content."""
    h = hashlib.sha256(b.cert_file.encode() + b"\0" + b.key_file.encode() + b"\0" + b.pem)
    return h.hexdigest()[:24]


def wire_size(material: Material) -> int:
    """Bytes the material takes in a worker's Config message."""
    return len(json.dumps(material.wire(), separators=(",", ":")))


def read_ca_file(path: str) -> bytes:
    """A CA bundle (public, may be a symlink): PEM certificates, at most 4 MiB."""
    data = files.read_public_file(path, "ca_file", MAX_CA_BYTES)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TlsFileError(f"ca_file {path}: no PEM certificate in it")
    try:  # what the workers and the health checks will do with it
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=data.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise TlsFileError(f"ca_file {path}: not usable as CA certificates ({exc})") from None
    return data


class TlsKeeper:
    """The control process's TLS state across reloads: the random keys it made, whether
    sharing ticket keys works here, the material of the config being served."""

    def __init__(self) -> None:
        self.random_keys: dict[tuple[str, int], bytes] = {}
        self.sharing: bool | None = None
        """None: not tested yet; then whether the self-test passed."""
        self.sharing_error = ""
        self.material = Material()

    def needed(self, cfg: Config) -> bool:
        return any(lc.tls is not None for lc in cfg.listener) or any(
            p.tls is not None for p in cfg.pool)

    def load(self, cfg: Config, skip: Callable[[str, str], bool] | None = None
             ) -> tuple[Material, list[str]]:
        """Read every TLS file of ``cfg``: (material, errors naming the keys). Nothing is
        kept: the caller decides (``self.material = ...`` once the config is taken).
        ``skip(key, path)``: check-config outside the service passes over the secrets it
        cannot see (systemd credentials); the material is then incomplete."""
        errors: list[str] = []
        listeners: dict[str, ListenerMaterial] = {}
        fo_key = self._failover_key(cfg)
        for i, lcfg in enumerate(cfg.listener):
            if lcfg.tls is None:
                continue
            bundles: list[CertBundle] = []
            for j, cc in enumerate(lcfg.tls.certificates):
                key_name = f"listener[{i}].tls.certificates[{j}].key_file"
                if skip is not None and skip(key_name, cc.key_file):
                    continue
                try:
                    bundles.append(files.load_certificate(cc))
                except TlsFileError as exc:
                    errors.append(f"listener[{i}].tls.certificates[{j}]: {exc}")
            tk = lcfg.tls.ticket_key_file
            if tk is not None and skip is not None and skip(
                    f"listener[{i}].tls.ticket_key_file", tk):
                continue
            try:
                key, source = self._ticket_key(lcfg, fo_key)
            except TlsFileError as exc:
                errors.append(f"listener[{i}].tls.ticket_key_file: {exc}")
                continue
            listeners[lcfg.name] = ListenerMaterial(tuple(bundles), key, source)
        pool_ca: dict[str, bytes | None] = {}
        for i, pcfg in enumerate(cfg.pool):
            if pcfg.tls is None:
                continue
            if pcfg.tls.ca_file is None:
                pool_ca[pcfg.name] = None
                continue
            try:
                pool_ca[pcfg.name] = read_ca_file(pcfg.tls.ca_file)
            except TlsFileError as exc:
                errors.append(f"pool[{i}].tls.ca_file: {exc}")
        material = Material(listeners, pool_ca, time.time(), fo_key)
        if not errors:
            size = wire_size(material)
            if size > MAX_WIRE_BYTES:
                errors.append(
                    f"listener.tls: the certificates and keys take {size / 2**20:.1f} MiB, "
                    f"more than the {MAX_WIRE_BYTES / 2**20:.0f} MiB the workers' channel "
                    f"carries per config (fewer or shorter chains; a certificate served by "
                    f"several listeners counts once)")
        return material, errors

    @staticmethod
    def epoch(now: float | None = None) -> int:
        """The ticket key period ``now`` is in (both nodes agree: their clocks are kept
        within failover.max_clock_skew_s)."""
        return int((time.time() if now is None else now) // TICKET_KEY_ROTATE_S)

    def rotate(self, material: Material, now: float | None = None) -> Material | None:
        """``material`` with the keys of the current period, or None when none changed.
        Only the keys pairlb makes rotate (derived from the failover key, or random); a
        ticket_key_file's key is the operator's to change."""
        epoch = self.epoch(now)
        listeners, changed = {}, False
        for name, m in material.listeners.items():
            key = m.ticket_key
            if m.ticket_key_source == "failover_key" and material.secret is not None:
                key = ticketkeys.derive(material.secret, name, epoch)
            elif m.ticket_key_source == "random":
                key = self._random(name, epoch)
            changed |= key != m.ticket_key
            listeners[name] = ListenerMaterial(m.bundles, key, m.ticket_key_source)
        if not changed:
            return None
        return Material(listeners, material.pool_ca, material.loaded_at, material.secret)

    def _random(self, listener: str, epoch: int) -> bytes:
        key = self.random_keys.get((listener, epoch))
        if key is None:
            for k in [k for k in self.random_keys if k[0] == listener]:
                del self.random_keys[k]  # the previous period's key is gone for good
            key = self.random_keys[(listener, epoch)] = os.urandom(ticketkeys.KEY_LEN)
        return key

    def _failover_key(self, cfg: Config) -> bytes | None:
        if cfg.failover is None:
            return None
        import failover

        try:
            return failover.load_key(cfg.failover.key_paths[0])
        except failover.FailoverError:
            return None  # reported by the failover checks themselves

    def _ticket_key(self, lcfg: ListenerConfig, fo_key: bytes | None) -> tuple[bytes | None, str]:
        tls = lcfg.tls
        assert tls is not None
        if not tls.session_tickets:
            return None, "off"
        key: bytes
        if tls.ticket_key_file is not None:
            key, source = files.read_ticket_key(tls.ticket_key_file), "file"
        elif fo_key is not None:
            key, source = ticketkeys.derive(fo_key, lcfg.name, self.epoch()), "failover_key"
        else:
            key, source = self._random(lcfg.name, self.epoch()), "random"
        if self.sharing is False:
            return None, "unsupported"
        return key, source

    async def selftest(self, material: Material) -> None:
        """Once per process: can a ticket key be shared here? (see the module docstring)"""
        if self.sharing is not None:
            return
        pem = next((m.bundles[0].pem for m in material.listeners.values()
                    if m.bundles and m.ticket_key is not None), None)
        if pem is None:
            return
        t0 = time.monotonic()
        rc, err = -1, b""
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-P", "-m", "lb.tls.ticketkeys", stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
            try:
                async with asyncio.timeout(SELFTEST_TIMEOUT_S):
                    _, err = await proc.communicate(pem)
                rc = proc.returncode if proc.returncode is not None else -1
            except TimeoutError:
                proc.kill()
                await proc.wait()
                err = b"the self-test timed out"
        except OSError as exc:
            err = str(exc).encode()
        self.sharing = rc == 0
        took_ms = (time.monotonic() - t0) * 1000
        if self.sharing:
            logger.info("event=tls_ticket_key_selftest result=ok took_ms=%.0f", took_ms)
            return
        self.sharing_error = (err.decode(errors="replace").strip().splitlines() or
                              [f"exit status {rc}"])[-1][:300]
        logger.warning(
            "event=tls_ticket_key_unsupported reason=%r effect=%r", self.sharing_error,
            "session tickets stay on, but a client resumes only on the worker that issued "
            "its ticket (not on other workers or the peer)")

    def apply_selftest(self, material: Material) -> Material:
        """``material`` with the keys dropped when sharing does not work here."""
        if self.sharing is not False:
            return material
        listeners = {
            n: ListenerMaterial(m.bundles, None, "unsupported" if m.ticket_key else
                                m.ticket_key_source)
            for n, m in material.listeners.items()
        }
        return Material(listeners, material.pool_ca, material.loaded_at, material.secret)


def shadowed(cfg: Config, material: Material) -> list[str]:
    """A certificate whose every name an earlier one of the listener has (an RSA one beside
    an ECDSA one for the same names, say) is never chosen: say so."""
    from lb.tls.names import normalize

    out = []
    for i, lcfg in enumerate(cfg.listener):
        m = material.listeners.get(lcfg.name)
        if m is None:
            continue
        seen: set[str] = set()
        for j, b in enumerate(m.bundles):
            names = {normalize(n) for n in b.names}
            if j and names and names <= seen:
                out.append(f"listener[{i}].tls.certificates[{j}]: every name of {b.cert_file} "
                           f"is on an earlier certificate, which SNI chooses first: this one "
                           f"is never served")
            seen |= names
    return out


def log_certificates(material: Material) -> None:
    """One line per certificate at startup (a WARNING within 14 days of expiry)."""
    now = time.time()
    for name, m in material.listeners.items():
        for b in m.bundles:
            days = (b.not_after - now) / 86400
            level = logging.WARNING if days < 14 else logging.INFO
            logger.log(level, "event=tls_certificate listener=%s cert_file=%s names=%s "
                       "not_after=%s days_left=%.1f", name, b.cert_file, ",".join(b.names),
                       time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(b.not_after)), days)
        logger.info("event=tls_ticket_key listener=%s source=%s", name, m.ticket_key_source)


def tls_changes(old: Material, new: Material) -> list[str]:
    """What a reload changes in the certificates served (one line per listener)."""
    out = []
    for name, m in new.listeners.items():
        prev = old.listeners.get(name)
        before = {b.cert_file: b.fingerprint for b in prev.bundles} if prev else {}
        after = {b.cert_file: b.fingerprint for b in m.bundles}
        if prev is not None and before != after:
            renewed = [f for f, fp in after.items() if f in before and before[f] != fp]
            added = [f for f in after if f not in before]
            removed = [f for f in before if f not in after]
            parts = ([f"renewed {', '.join(renewed)}"] if renewed else []) + (
                [f"added {', '.join(added)}"] if added else []) + (
                [f"removed {', '.join(removed)}"] if removed else [])
            out.append(f"listener {name} certificates: {'; '.join(parts)}")
        if prev is not None and prev.ticket_key != m.ticket_key:
            out.append(f"listener {name} session ticket key changed ({m.ticket_key_source})")
    return out


__all__ = [
    "ListenerMaterial",
    "Material",
    "TlsKeeper",
    "log_certificates",
    "read_ca_file",
    "shadowed",
    "tls_changes",
]
