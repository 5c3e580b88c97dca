"""Every backend's state in one table, and the rotation derived from it.

Each fact has exactly one owner, and nothing here copies one:

- the active checks' verdict (counter, last result, when it came up): ``healthcheck.HealthBook``;
- admin state and passive ejections: the ``lb.control.rotation.PoolRotation`` records of each pool.

:meth:`BackendTable.snapshots` computes who gets traffic from both at the moment it is
called, so a reload, a check result, an admin action or an ejection can never leave a stale
verdict behind: there is none to leave. A reload (:meth:`BackendTable.apply`) changes the
pools' settings and records; the caller then gives :meth:`targets` and :attr:`in_service`
to the health checker, which reconciles the book (``healthcheck.book`` says what is kept).

Passive ejection ends early on active-check evidence (``[pool.passive] end_on_check``).
Only checks that *started after* the ejection began count, and the checks must say UP:

- ``"corroborated"`` (default): a passing check ends it once a check has also *failed*
  since the ejection began: the checks saw the outage, so their passing now is news (a
  crashed backend restarted). A backend whose checks kept passing while its traffic failed
  (``/healthz`` fine, the application broken) stays out for the whole ejection; with plain
  ``"pass"`` it would be back within one interval and fail traffic again, every interval
  (measured: 10 requests reached such a backend within 0.7 s of its ejection).
- ``"pass"``: any passing check ends it (Envoy's ``successful_active_health_check_uneject_host``);
- ``"never"``: the ejection runs its course.

Health checks of a pool with ``[pool.tls]`` run over TLS (``healthcheck.ProbeTls``):
:func:`check_spec` gives every backend of the pool the same client context, built once per
(settings, CA file content) by :func:`probe_tls` and kept for later reloads, so 3000
backends share one context (and one CA store) and a reload that changes nothing TLS hands
the checker equal specs (its evidence is kept). ``ca_file`` is read here (the control
process runs as root); a file that cannot be read or holds no PEM certificate raises
:class:`PoolTlsError` naming ``pool[i].tls.ca_file``. The daemon has read every ca_file
already for the workers (lb.control.tls): passing those bytes (``targets(ca_pems)``) saves
reading them again, and a file changed in between cannot make the checks and the workers
disagree.

Pure: no asyncio, socket, time or logging; the caller passes ``now`` and logs what the
returned values say (reading a ca_file is the one exception: file I/O, no sockets).
"""

from __future__ import annotations

import dataclasses
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from healthcheck import CheckResult, CheckSpec, HealthBook, HealthConfigError, ProbeTls, Target
from lb.config import BackendConfig, PoolConfig
from lb.control import tls as control_tls
from lb.control.rotation import (
    UNCHECKED,
    AdminState,
    BackendRecord,
    Ejected,
    PoolRotation,
    Snapshot,
    Verdict,
)
from lb.tls.contexts import client_context

DOWN = Verdict(False, None)
PROBE_TLS_RESUME_S = 0.0
"""``ProbeTls.resume_s`` of the checks: 0, every check makes a full handshake (it verifies the
backend's certificate every time, as the workers' connections do). See healthcheck.probes
for what resumption saves and costs."""
_CACHE_MAX = 256

_ca_reads: dict[tuple[str, int, int, int, int], bytes] = {}
"""(path, device, inode, size, mtime) -> content: preflight builds every backend's spec."""
_probe_tls: dict[tuple[object, ...], ProbeTls] = {}
"""(verify, server_name, min_version, CA bytes) -> the ProbeTls checks of such pools share."""


class PoolTlsError(HealthConfigError):
    """A pool's ``[pool.tls]`` cannot be used for its checks; ``str()`` names the key,
    ``pool[i].tls.ca_file`` when the pool's index is known (else ``pool <name>: tls.ca_file``).
    A HealthConfigError, so whoever builds checks and reports their errors reports it too."""

    def __init__(self, where: str, field: str, value: object, rule: str) -> None:
        super().__init__(field, value, rule)
        self.where = where

    def __str__(self) -> str:
        return f"{self.where}.{self.field}: {self.rule}"


def _where(pcfg: PoolConfig, index: int | None) -> str:
    return f"pool[{index}]" if index is not None else f"pool {pcfg.name}"


def read_ca_file(path: str) -> bytes:
    """A CA bundle's bytes, read and checked as lb.control.tls reads it for the workers
    (same rules, same messages); TlsFileError says what is wrong. Cached by the file's
    identity and mtime: preflight builds every backend's spec, 3000 of them in one pool."""
    try:
        st = os.stat(path)
    except OSError:
        return control_tls.read_ca_file(path)  # raises, with the keeper's message
    key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    data = _ca_reads.get(key)
    if data is None:
        data = control_tls.read_ca_file(path)
        if len(_ca_reads) >= _CACHE_MAX:
            _ca_reads.clear()
        _ca_reads[key] = data
    return data


def probe_tls(
    pcfg: PoolConfig, ca_pem: bytes | None = None, index: int | None = None
) -> ProbeTls | None:
    """The TLS of the pool's checks (None without ``[pool.tls]``). ``ca_pem``: the
    ca_file's content if the caller has read it; else it is read here. The same settings and
    CA content give the same object (one context per pool, across reloads). Raises
    :class:`PoolTlsError` (``index``: the pool's place in the config, for the message)."""
    tls = pcfg.tls
    if tls is None:
        return None
    if tls.ca_file is not None and ca_pem is None:
        try:
            ca_pem = read_ca_file(tls.ca_file)
        except ValueError as exc:
            raise PoolTlsError(_where(pcfg, index), "tls.ca_file", tls.ca_file, str(exc)) from None
    if tls.ca_file is None:
        ca_pem = None
    key = (tls.verify, tls.server_name, tls.min_version, ca_pem)
    found = _probe_tls.get(key)
    if found is not None:
        return found
    try:
        ctx = client_context(verify=tls.verify, ca_pem=ca_pem, min_version=tls.min_version)
    except (ssl.SSLError, ValueError) as exc:
        raise PoolTlsError(
            _where(pcfg, index), "tls.ca_file", tls.ca_file,
            f"ca_file {tls.ca_file}: not usable as CA certificates: {exc}",
        ) from None
    made = ProbeTls(ctx, server_name=tls.server_name, resume_s=PROBE_TLS_RESUME_S)
    if len(_probe_tls) >= _CACHE_MAX:
        _probe_tls.clear()
    _probe_tls[key] = made
    return made


def check_spec(
    pcfg: PoolConfig,
    backend: BackendConfig,
    tls: ProbeTls | None = None,
    *,
    index: int | None = None,
) -> tuple[CheckSpec, int]:
    """The pool's health settings with the backend's overrides; and the port to check.

    ``tls``: the pool's :func:`probe_tls` if the caller made it (once for all its backends);
    else it is made here (``index`` names the pool in a :class:`PoolTlsError`)."""
    if tls is None and pcfg.tls is not None:
        tls = probe_tls(pcfg, index=index)
    h = pcfg.health
    o = backend.health

    def pick(name: str) -> Any:
        override = getattr(o, name) if o is not None else None
        return override if override is not None else getattr(h, name)

    spec = CheckSpec(
        probe=h.type,
        method=h.method,
        path=pick("path"),
        host=pick("host"),
        expect_status=h.status_ranges(),
        expect_body=h.expect_body,
        interval_s=pick("interval_s"),
        timeout_s=pick("timeout_s"),
        rise=pick("rise"),
        fall=pick("fall"),
        fast_interval_s=pick("fast_interval_s"),
        down_interval_s=pick("down_interval_s"),
        jitter=h.jitter,
        initial=h.initial,
        reuse_connection=h.reuse_connection,
        tls=tls,
    )
    port = o.port if o is not None and o.port is not None else backend.host_port[1]
    return spec, port


def make_rotation(pcfg: PoolConfig) -> PoolRotation:
    return PoolRotation.create(
        pcfg.name,
        [(b.name, b.weight) for b in pcfg.backends],
        eject_s=pcfg.passive.eject_s,
        max_eject_s=pcfg.passive.max_eject_s,
        max_eject_percent=pcfg.passive.max_eject_percent,
        slow_start_s=pcfg.slow_start_s,
        panic_percent=pcfg.panic_percent,
        panic_mode=pcfg.panic_mode,
    )


@dataclass(frozen=True, slots=True)
class EjectionEnded:
    """An ejection ended early because the active checks vouched for the backend."""

    pool: str
    backend: str
    reason: str  # "active_check_passed" (the one reason today; logs and events carry it)


class BackendTable:
    """The pools' backends: config, the rotation records and the shared health book."""

    def __init__(self, book: HealthBook, pools: Sequence[PoolConfig]) -> None:
        self.book = book
        self.pools: dict[str, PoolConfig] = {}
        self.rotations: dict[str, PoolRotation] = {}
        self.in_service: frozenset[tuple[str, str]] = frozenset()
        """Backends newly checked that were serving without checks (for the checker)."""
        self.apply(pools)

    # -- config --------------------------------------------------------------------------

    def apply(self, pools: Sequence[PoolConfig]) -> list[str]:
        """Take a (new) config's pools; the changes, in words. Admin state and ejections of
        backends that stay at the same address are kept."""
        changes: list[str] = []
        in_service: set[tuple[str, str]] = set()
        old = self.pools
        rotations: dict[str, PoolRotation] = {}
        for pcfg in pools:
            prev = old.get(pcfg.name)
            if prev is None:
                rotations[pcfg.name] = make_rotation(pcfg)
                if old:
                    changes.append(f"pool {pcfg.name} added")
                continue
            rot = make_rotation(pcfg)
            prev_rot = self.rotations[pcfg.name]
            rot.records = prev_rot.records
            prev_addr = {b.name: b.address for b in prev.backends}
            fresh = {b.name for b in pcfg.backends if prev_addr.get(b.name, b.address) != b.address}
            rot.reconcile([(b.name, b.weight) for b in pcfg.backends], fresh)
            rotations[pcfg.name] = rot
            if pcfg.health.enabled and not prev.health.enabled:
                in_service |= {
                    (pcfg.name, b.name)
                    for b in pcfg.backends
                    if b.name in prev_addr and b.name not in fresh
                }
            if prev != pcfg:
                changes.append(f"pool {pcfg.name} changed")
        for name in old:
            if name not in rotations:
                changes.append(f"pool {name} removed")
        self.pools = {p.name: p for p in pools}
        self.rotations = rotations
        self.in_service = frozenset(in_service)
        return changes

    def targets(self, ca_pems: Mapping[str, bytes | None] | None = None) -> list[Target]:
        """What the health checker should check: every backend of pools with checks on.
        ``ca_pems``: pool name -> its ca_file's content, as the caller read it (module
        docstring); a pool missing from it has its file read here. Raises PoolTlsError."""
        out = []
        for i, pcfg in enumerate(self.pools.values()):
            if not pcfg.health.enabled:
                continue
            ca_pem = None if ca_pems is None else ca_pems.get(pcfg.name)
            tls = probe_tls(pcfg, ca_pem, i)
            for b in pcfg.backends:
                spec, port = check_spec(pcfg, b, tls)
                out.append(Target((pcfg.name, b.name), b.host_port[0], port, spec, b.address))
        return out

    def target(self, pool: str, backend: BackendConfig) -> Target | None:
        """The check target of one backend added at runtime (None: checks off). It starts
        DOWN whatever ``initial`` says: no request before its first passing check."""
        pcfg = self.pools[pool]
        if not pcfg.health.enabled:
            return None
        spec, port = check_spec(pcfg, backend)
        if spec.initial != "down":
            spec = dataclasses.replace(spec, initial="down")
        return Target((pool, backend.name), backend.host_port[0], port, spec, backend.address)

    def add_backend(self, pool: str, backend: BackendConfig) -> None:
        """One backend more in ``pool`` (runtime: admin API, discovery, the peer), without
        rebuilding the pool: O(1) records plus one tuple copy of the pool's list. Raises
        KeyError for an unknown pool, ValueError for a name the pool has."""
        pcfg = self.pools[pool]
        rot = self.rotations[pool]
        if backend.name in rot.records:
            raise ValueError(f"pool {pool} has a backend named {backend.name}")
        rot.records[backend.name] = BackendRecord(backend.name, backend.weight)
        self.pools[pool] = pcfg.model_copy(update={"backends": (*pcfg.backends, backend)})

    def remove_backend(self, pool: str, name: str) -> bool:
        """Forget a backend of ``pool`` (its admin state and ejections go with it)."""
        rot = self.rotations.get(pool)
        if rot is None or rot.records.pop(name, None) is None:
            return False
        pcfg = self.pools[pool]
        self.pools[pool] = pcfg.model_copy(
            update={"backends": tuple(b for b in pcfg.backends if b.name != name)})
        return True

    def backend(self, pool: str, name: str) -> BackendConfig | None:
        """A backend of the effective pool (config and runtime), or None."""
        pcfg = self.pools.get(pool)
        if pcfg is None or name not in self.rotations[pool].records:
            return None
        return next((b for b in pcfg.backends if b.name == name), None)

    # -- derived state -------------------------------------------------------------------

    def verdict(self, pool: str, backend: str) -> Verdict:
        """The active checks' verdict, read from the book now (UNCHECKED if checks are off)."""
        if not self.pools[pool].health.enabled:
            return UNCHECKED
        up = self.book.up((pool, backend))
        if up is None or not up[0]:  # None: not yet handed to the checker, nothing vouches
            return DOWN
        return UNCHECKED if up[1] is None else Verdict(True, up[1])

    def verdicts(self, pool: str) -> dict[str, Verdict]:
        return {name: self.verdict(pool, name) for name in self.rotations[pool].records}

    def derive(self, now: float) -> tuple[dict[str, Snapshot], float | None]:
        """Every pool's snapshot and when one will change by itself, from one read of the
        book per backend (this runs at every push: O(backends), nothing more)."""
        snaps: dict[str, Snapshot] = {}
        times: list[float] = []
        for name, rot in self.rotations.items():
            verdicts = self.verdicts(name)
            snaps[name] = rot.snapshot(now, verdicts)
            if (t := rot.next_change(now, verdicts)) is not None:
                times.append(t)
        return snaps, (min(times) if times else None)

    def snapshots(self, now: float) -> dict[str, Snapshot]:
        """Every pool's snapshot alone (what /status shows)."""
        return {n: rot.snapshot(now, self.verdicts(n)) for n, rot in self.rotations.items()}

    # -- events --------------------------------------------------------------------------

    def set_admin(self, pool: str, backend: str, state: AdminState) -> bool:
        """Raises KeyError for an unknown pool or backend."""
        rot = self.rotations[pool]
        if backend not in rot.records:
            raise KeyError(backend)
        return rot.set_admin(backend, state)

    def eject(self, pool: str, backend: str, reason: str, now: float) -> Ejected | None:
        rot = self.rotations.get(pool)
        if rot is None or not self.pools[pool].passive.enabled:
            return None
        return rot.eject(backend, reason, now)

    def on_check(
        self, pool: str, backend: str, result: CheckResult, now: float
    ) -> EjectionEnded | None:
        """A check result was written to the book: end an ejection it vouches for."""
        pcfg = self.pools.get(pool)
        rot = self.rotations.get(pool)
        if pcfg is None or rot is None or backend not in rot.records:
            return None
        rec = rot.records[backend]
        mode = pcfg.passive.end_on_check
        if mode == "never" or not rec.ejected(now):
            return None
        if now - result.duration_s < rec.last_ejection_at:
            return None  # this probe was on its way before the failures were seen
        if not result.ok:
            rec.check_failed_while_ejected = True
            return None
        if not self.verdict(pool, backend).up:
            return None
        if mode == "corroborated" and not rec.check_failed_while_ejected:
            return None
        if not rot.end_ejection(backend, now):
            return None
        return EjectionEnded(pool, backend, "active_check_passed")
