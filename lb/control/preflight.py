"""Checks of a valid config against this host: what ``pairlb run`` needs before it starts.

``pairlb check-config`` and the daemon's startup both call ``check()``, so a config that
check-config calls OK does start (bind errors aside: a port in use is only known by binding
it, which a running node does). Each problem is one line naming the dotted key:

- ``node.worker_user`` / ``worker_group`` exist and can be switched to (lb.sysutil);
- ``admin.token_file``: exists, a regular file, not readable by group or others, one word
  of printable ASCII (the rules ``read_token`` applies at startup);
- ``failover.key_file``: the same rules and length as the failover code loads it with;
  ``failover.interface`` exists on this host;
- every health check builds (``pool[i].health.*`` and per-backend overrides), exactly as the
  daemon builds them;
- every TLS file (``listener[i].tls.certificates[j]``, ``ticket_key_file``,
  ``pool[i].tls.ca_file``) reads and checks as the daemon reads it (lb.control.tls): a
  certificate with its matching key, keys kept secret.

Paths under ``/run/credentials/`` are systemd credentials (LoadCredential=): only the service
sees them, so outside it (``$CREDENTIALS_DIRECTORY`` unset, e.g. install.sh or an operator's
shell) they are reported as notes, not errors. The unit's ExecStartPre= check-config runs
inside the service and checks them for real; its ExecReload= one cannot read them (systemd
252 refuses that command the directory), so there the daemon checks them itself before it
applies a reload (``check(..., inside_service=True)``).

Imports neither aiohttp nor the failover package's network code: check-config stays fast.
"""

from __future__ import annotations

import os
import re
import socket

from lb import sysutil
from lb.config import Config

CREDENTIALS_ROOT = "/run/credentials/"


class PreflightError(Exception):
    """One problem; the message names the key and says how to fix it."""


def read_token(path: str) -> str:
    """Read the admin bearer token; refuse a file others can read, a symlink, a missing or
    an empty one (failover.read_secret: the same reader as the failover key)."""
    from failover import SecretFileError, read_secret

    try:
        raw = read_secret(path, 4096)
    except SecretFileError as exc:
        if exc.reason == "mode":
            raise PreflightError(f"[admin] token_file {path} is {exc.detail}") from None
        if exc.reason == "type":
            raise PreflightError(f"[admin] token_file {path}: {exc.detail}") from None
        raise PreflightError(f"[admin] token_file {path}: cannot read: {exc.detail}") from None
    try:
        token = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PreflightError(f"[admin] token_file {path}: cannot read: {exc}") from None
    if not token:
        raise PreflightError(
            f"[admin] token_file {path} is empty; create one with: "
            f"(umask 077; head -c 32 /dev/urandom | base64 > {path})"
        )
    if not re.fullmatch(r"[\x21-\x7e]+", token):
        raise PreflightError(
            f"[admin] token_file {path}: the token must be one word of printable ASCII"
        )
    return token


def unseen_credential(path: str) -> bool:
    """A systemd credential path we cannot see: not inside the service that has it, or in
    one of its commands that systemd gives no access (systemd 252 sets CREDENTIALS_DIRECTORY
    for ExecReload= but refuses it the directory; ExecStartPre= and the service itself
    have it)."""
    here = os.environ.get("CREDENTIALS_DIRECTORY")
    if not here or not path.startswith(here.rstrip("/") + "/"):
        return path.startswith(CREDENTIALS_ROOT)
    return not os.access(here, os.R_OK | os.X_OK)


def check(cfg: Config, *, inside_service: bool = False, tls: bool = True
          ) -> tuple[list[str], list[str]]:
    """(errors, notes) for ``cfg`` on this host. ``inside_service``: never skip a credential
    path (the daemon itself: if it cannot see the file, that is an error). ``tls=False``:
    the caller reads the TLS files itself (the daemon does, with the same errors)."""
    errors: list[str] = []
    notes: list[str] = []

    def skip(key: str, path: str) -> bool:
        if inside_service or not unseen_credential(path):
            return False
        notes.append(
            f"{key}: {path} is a systemd credential, visible only inside the service; "
            f"not checked here (the unit's check-config checks it)"
        )
        return True

    try:
        sysutil.worker_identity(cfg.node.worker_user, cfg.node.worker_group)
    except sysutil.PrivilegeError as exc:
        errors.append(str(exc))
    acfg = cfg.admin
    if acfg.enabled and acfg.token_file and not skip("admin.token_file", acfg.token_file):
        try:
            read_token(acfg.token_file)
        except PreflightError as exc:
            errors.append(f"admin.token_file: {exc}")
    fcfg = cfg.failover
    if fcfg is not None:
        what = "failover.key_files" if fcfg.key_files else "failover.key_file"
        for path in fcfg.key_paths:  # each key of a rotation, the signing one first
            if not skip(what, path):
                from failover import KeyFileError, load_key

                try:
                    load_key(path)
                except KeyFileError as exc:
                    errors.append(f"{what}: {exc}")
        try:
            socket.if_nametoindex(fcfg.interface)
        except OSError:
            errors.append(f"failover.interface: no interface named {fcfg.interface!r} on this "
                          f"host (ip link)")
    errors += _health_errors(cfg)
    errors += _discovery_errors(cfg)
    notes += _tls_check_load(cfg)
    if tls and (any(lc.tls is not None for lc in cfg.listener)
                or any(p.tls is not None for p in cfg.pool)):
        from lb.control.tls import TlsKeeper, shadowed

        material, tls_errors = TlsKeeper().load(cfg, skip)
        errors += tls_errors
        notes += shadowed(cfg, material)
    return errors, notes


TLS_HANDSHAKES_PER_CORE_S = 800
"""Full TLS handshakes a second one core of the control process does for health checks
(bench/health_tls.py: about 1 ms of CPU each on OpenSSL 3.0)."""


def _tls_check_load(cfg: Config) -> list[str]:
    """A note when a pool's TLS checks would need a full handshake per check at a rate
    that takes a large share of the control process's core (checks then start late)."""
    out = []
    for i, pcfg in enumerate(cfg.pool):
        h = pcfg.health
        if pcfg.tls is None or not h.enabled or h.reuse_connection:
            continue
        rate = len(pcfg.backends) / h.interval_s
        if rate > TLS_HANDSHAKES_PER_CORE_S / 4:
            out.append(
                f"pool[{i}].health: {rate:.0f} TLS handshakes a second for checks (about "
                f"{rate / TLS_HANDSHAKES_PER_CORE_S:.1f} of a core); set reuse_connection = "
                f"true (one handshake per kept connection) or a longer interval_s")
    return out


def _discovery_errors(cfg: Config) -> list[str]:
    """Build every ``[pool.discovery]`` runner's spec as the daemon does (lb.control.elastic):
    what the config schema lets through but the resolver refuses (a name that is not a DNS
    name, a TTL bound below 10 ms), named by key."""
    from lb.control.elastic import discovery_spec

    out = []
    for i, pcfg in enumerate(cfg.pool):
        if pcfg.discovery is None:
            continue
        try:
            discovery_spec(pcfg.discovery)
        except ValueError as exc:
            out.append(f"pool[{i}].discovery.{exc}")
    return out


def _health_errors(cfg: Config) -> list[str]:
    """Build every health check the way the daemon does; name the key of each refusal."""
    from healthcheck import HealthConfigError, Target
    from lb.control.backends import PoolTlsError, check_spec

    out: list[str] = []
    for i, pcfg in enumerate(cfg.pool):
        if not pcfg.health.enabled:
            continue
        for j, b in enumerate(pcfg.backends):
            try:
                spec, port = check_spec(pcfg, b)
                Target((pcfg.name, b.name), b.host_port[0], port, spec)
            except PoolTlsError:
                break  # [pool.tls] is reported once, by the TLS checks below
            except HealthConfigError as exc:
                override = b.health is not None and getattr(b.health, exc.field, None) is not None
                key = f"pool[{i}].backends[{j}].health" if override else f"pool[{i}].health"
                line = f"{key}.{exc.field}: {exc.rule} (got {exc.value!r})"
                if line not in out:  # a pool setting fails once per backend: say it once
                    out.append(line)
    return out
