"""Backend discovery for elastic pools: DNS (A, AAAA, SRV) and a watched JSON file.

A :class:`Discovery` runs in the control process's loop, one per pool. It finds the pool's
backends, re-reads them at runtime, and hands the set to ``on_change(pool, backends, source)``
only when the set actually changed (``backends``: ``(name, address, weight)`` tuples sorted by
name; ``source``: ``"dns"`` or ``"file"``). Health state is kept by backend name, so a name is
a pure function of the address (:func:`backend_name`): the same address keeps its name across
refreshes and restarts.

**A failure never shrinks the pool.** Every failure is counted by reason and the last good set
stays; a source that has never succeeded hands over nothing. ``status()`` says what happened
(JSON-serialisable, for /status and /metrics; the alert: ``time() - last_ok_at`` large, or
``consecutive_failures`` growing).

DNS (:class:`DnsSpec`), with dnspython's ``dns.asyncresolver``:

- The servers are the spec's ``resolvers`` (``ip``, ``ip:port``, ``[v6]:port``), or
  /etc/resolv.conf's when there are none (read again when the file changes; its search list
  and ndots never apply: names are absolute).
  No cache: every refresh asks the server, so our TTL bounds decide when a change is seen.
  A truncated answer is retried over TCP (dnspython). A source whose last answer held more
  than :data:`EDNS_AFTER_RECORDS` records asks with EDNS (1232-byte UDP payload) from then on,
  saving that TCP round; the others ask without, since EDNS costs dnspython ~100 us of CPU
  per query (measured: 0.38 vs 0.29 ms), a third more for the common small answer.
- Re-resolved when the answer's TTL runs out, clamped to ``[min_ttl_s, max_ttl_s]`` (TTL 0,
  dnsmasq's default, would otherwise mean a query per loop pass), with ``jitter`` (10 %) so
  pools started together spread out: early by up to 10 %, or late by up to 10 % when the TTL
  is already at ``min_ttl_s`` (:func:`jittered`). The TTL is the smallest of every RRset used
  (an SRV set and its targets' addresses). Wake-ups then snap to a 0.1 s tick (earlier when
  that stays within the bounds: :func:`on_tick`) so that runners due together resolve in one
  loop pass, which halves the CPU per query at 100 queries/s (:data:`TICK_S`).
- A failure retries after ``min_ttl_s``, doubling per consecutive failure up to
  ``min(max_ttl_s, retry_max_s)`` (:func:`retry_delay`).
- Failure reasons: ``nxdomain``; ``nodata`` (NOERROR without records of the type asked, an
  SRV set whose targets are all ``.`` or have no address); ``servfail``; ``refused`` (the
  REFUSED rcode); ``timeout`` (no answer within ``timeout_s``: a dead server looks like this,
  because dnspython's asyncio backend uses unconnected UDP sockets and so never sees the ICMP
  port-unreachable); ``unreachable`` (no route: the send itself failed); ``too_many`` (more
  than ``max_backends``); ``error`` (any other rcode, no usable resolv.conf, or an
  exception). With several servers failing differently, the reason is the most telling one
  (SERVFAIL > REFUSED > unreachable > timeout); the message lists what each said.
- **An empty answer is a failure** (``on_empty = "fail"``, the default): NXDOMAIN or NODATA
  during a DNS server's restart or a botched zone push must not empty a pool that was
  serving. ``on_empty = "accept"`` makes NXDOMAIN and NODATA an empty set instead (Envoy's
  STRICT_DNS behaviour), for pools that are meant to scale to zero.
- ``A+AAAA`` asks both at once; one of them without records is fine, both is NODATA.
- SRV (RFC 2782): only the records of the **lowest priority** value are used. Higher values
  are fallbacks a client tries when every lower one is unreachable; pairlb's pools have no
  fallback tier (every backend in rotation gets traffic, health checks take dead ones out), so
  adding them would send them traffic all the time, and the lowest set's health never promotes
  them. The record's port is the backend's port. The SRV **weight becomes the backend weight**
  (backends allow 0-1000): weights up to 1000 are kept as they are, larger ones scaled so the
  largest is 1000 (ratios kept, rounded); 0 (RFC: "a very small chance") becomes 1, the
  smallest weight that still gets traffic; when every weight is 0 all get 1 (RFC: equal
  chance). Records (or targets) that end at the same ``ip:port`` are one backend, with the
  sum of their SRV weights. Each address of a target gets the record's weight.
- SRV targets are looked up as ``target_record`` (default ``A``: a dual-stack target would
  otherwise count twice): from the answer's additional section when the server put them there,
  else by an A/AAAA query (16 at a time). A target that does not exist or has no address
  (NXDOMAIN/NODATA) is left out; any other failure of a target fails the whole refresh
  (a timeout says nothing about the target, so it must not take its backends away).
- Unspecified (0.0.0.0, ::), multicast and broadcast addresses in an answer are left out.

File (:class:`FileSpec`): a JSON array ``[{"name": "web4", "address": "10.0.0.4:8080",
"weight": 1}, ...]`` (the admin API's backend body; ``name`` optional, derived from the
address; ``weight`` optional, default 1, 0-1000; no other keys).

- Polled every ``interval_s`` with stat(2): the file is read again when its identity (device,
  inode, size, mtime_ns) changed. Write it elsewhere in the same directory and rename it over
  the old one (atomic); a file modified less than :data:`RACY_S` before it was read is read
  again on the next poll (timestamps are coarse: a second write within the same tick keeps
  mtime and perhaps size).
- A file that is missing, unreadable, larger than ``max_bytes``, not JSON (a partial write),
  or invalid (wrong types, bad or duplicate names/addresses, over ``max_backends`` entries;
  the message names the path, the entry and the problem) is a failure; the last good set stays.
  The same failure of the same file version is counted once, not at every poll.
  An empty array is a failure unless ``on_empty = "accept"``.
- Files over 64 KiB are read and parsed in a thread, off the loop.

Addresses are checked with ``lb.config.parse_hostport``; IP addresses are written in their
canonical form (``[fd00::1]:80``) so two spellings are one backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import math
import os
import random
import re
import stat
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple, NoReturn

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver

from lb.config import format_hostport, parse_hostport, parse_resolver

logger = logging.getLogger("lb.control.discovery")

MAX_BACKENDS = 10_000
"""Most backends one source may give a pool (more is a ``too_many`` failure)."""
FILE_MAX_BYTES = 16 << 20
"""Largest discovery file read (10,000 entries of ~100 bytes is 1 MB)."""
FILE_THREAD_BYTES = 64 << 10
"""Files larger than this are read and parsed in a thread, off the loop."""
RESOLV_CONF = "/etc/resolv.conf"
"""The system's resolver configuration, used when a DnsSpec names no resolvers."""
RACY_S = 1.0
"""A file modified less than this before it was read is read again on the next poll."""
TICK_S = 0.1
"""Refreshes are moved to a multiple of this on the monotonic clock (:func:`on_tick`), so the
runners due within one tick wake up together and resolve in one loop pass: measured with
3,000 names at TTL 30 s (100 queries/s), that halves the CPU per query (0.94 -> 0.43 ms on
asyncio, 0.72 -> 0.40 ms on uvloop; alone, each query also pays for a cold loop pass)."""
SRV_LOOKUPS_IN_FLIGHT = 16
"""SRV target lookups at once, per refresh."""
EDNS_PAYLOAD = 1232
"""UDP payload size offered (the DNS flag day 2020 value: no IP fragmentation)."""
EDNS_AFTER_RECORDS = 12
"""An answer with more records than this (plain DNS over UDP carries 512 bytes: ~30 A or ~16
AAAA records) turns EDNS on for that source; one with fewer than half turns it
off again."""
WEIGHT_MAX = 1000
"""Largest backend weight (lb.config.BackendConfig)."""
NAME_MAX = 64
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?$")
_ERRORS_SHOWN = 5

DnsRecord = Literal["A", "AAAA", "A+AAAA", "SRV"]
TargetRecord = Literal["A", "AAAA", "A+AAAA"]
OnEmpty = Literal["fail", "accept"]
OnChange = Callable[[str, list[tuple[str, str, int]], str], None]

DNS_REASONS = ("nxdomain", "nodata", "servfail", "refused", "timeout", "unreachable",
               "too_many", "error")
FILE_REASONS = ("missing", "unreadable", "too_large", "invalid_json", "invalid", "too_many",
                "empty", "error")


class Backend(NamedTuple):
    """One discovered backend; a plain ``(name, address, weight)`` tuple."""

    name: str
    address: str
    weight: int


class DiscoveryError(Exception):
    """A refresh that failed: ``reason`` (one of DNS_REASONS / FILE_REASONS) and what."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# -- specs ------------------------------------------------------------------------------


def _check_common(min_ttl_s: float, max_ttl_s: float, jitter: float, max_backends: int) -> None:
    if not 0.01 <= min_ttl_s <= 86400:
        raise ValueError(f"min_ttl_s: must be 0.01-86400 (got {min_ttl_s})")
    if not min_ttl_s <= max_ttl_s <= 86400:
        raise ValueError(f"max_ttl_s: must be min_ttl_s-86400 (got {max_ttl_s})")
    if not 0 <= jitter <= 0.5:
        raise ValueError(f"jitter: must be 0-0.5 (got {jitter})")
    if not 1 <= max_backends <= MAX_BACKENDS:
        raise ValueError(f"max_backends: must be 1-{MAX_BACKENDS} (got {max_backends})")


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class DnsSpec:
    """Where a pool's backends come from in DNS (defaults: the proposed config defaults)."""

    kind: ClassVar[str] = "dns"
    name: str
    """The name to resolve; for SRV e.g. ``_http._tcp.web.example``. Always absolute."""
    record: DnsRecord = "A"
    port: int | None = None
    """The backends' port (A/AAAA, required); SRV records carry their own (must be None)."""
    resolvers: tuple[str, ...] = ()
    """``ip``, ``ip:port`` or ``[v6]:port``; empty: /etc/resolv.conf's nameservers."""
    min_ttl_s: float = 1.0
    max_ttl_s: float = 300.0
    timeout_s: float = 2.0
    """Each question (A, AAAA, SRV, a target's A) gets an answer within this, every server
    tried (two tries each); questions of one refresh run at once, an SRV's targets after it."""
    weight: int = 1
    """A/AAAA: every backend's weight (0-1000). SRV: from the records."""
    target_record: TargetRecord = "A"
    """SRV: which addresses of the targets to use."""
    on_empty: OnEmpty = "fail"
    retry_max_s: float = 30.0
    """Longest wait between two attempts while failing (also capped by max_ttl_s)."""
    jitter: float = 0.1
    max_backends: int = MAX_BACKENDS

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _HOST_RE.fullmatch(self.name):
            raise ValueError(f"name: not a DNS name: {_short(self.name)}")
        try:
            dns.name.from_text(self.name)
        except dns.exception.DNSException as e:
            raise ValueError(f"name: {_short(self.name)}: {e}") from None
        if self.record not in ("A", "AAAA", "A+AAAA", "SRV"):
            raise ValueError(f"record: must be A, AAAA, A+AAAA or SRV (got {_short(self.record)})")
        if self.record == "SRV":
            if self.port is not None:
                raise ValueError("port: SRV records carry their own port")
        elif (not isinstance(self.port, int) or isinstance(self.port, bool)
              or not 1 <= self.port <= 65535):
            raise ValueError(f"port: 1-65535 required with record = {self.record!r}")
        if self.target_record not in ("A", "AAAA", "A+AAAA"):
            raise ValueError(f"target_record: must be A, AAAA or A+AAAA "
                             f"(got {_short(self.target_record)})")
        for r in self.resolvers:
            parse_resolver(r)
        _check_common(self.min_ttl_s, self.max_ttl_s, self.jitter, self.max_backends)
        if not 0.01 <= self.timeout_s <= 60:
            raise ValueError(f"timeout_s: must be 0.01-60 (got {self.timeout_s})")
        if not 0.01 <= self.retry_max_s <= 86400:
            raise ValueError(f"retry_max_s: must be 0.01-86400 (got {self.retry_max_s})")
        if isinstance(self.weight, bool) or not 0 <= self.weight <= WEIGHT_MAX:
            raise ValueError(f"weight: must be 0-{WEIGHT_MAX} (got {self.weight})")
        if self.on_empty not in ("fail", "accept"):
            raise ValueError(f"on_empty: must be fail or accept (got {_short(self.on_empty)})")

    @property
    def target(self) -> str:
        return f"{self.name} {self.record}"


@dataclass(frozen=True, slots=True)
class FileSpec:
    """A watched JSON file of backends."""

    kind: ClassVar[str] = "file"
    path: str
    interval_s: float = 1.0
    on_empty: OnEmpty = "fail"
    max_bytes: int = FILE_MAX_BYTES
    max_backends: int = MAX_BACKENDS

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not os.path.isabs(self.path) or "\0" in self.path:
            raise ValueError(f"path: must be an absolute path (got {_short(self.path)})")
        if not 0.01 <= self.interval_s <= 86400:
            raise ValueError(f"interval_s: must be 0.01-86400 (got {self.interval_s})")
        if not 2 <= self.max_bytes <= FILE_MAX_BYTES:
            raise ValueError(f"max_bytes: must be 2-{FILE_MAX_BYTES} (got {self.max_bytes})")
        if not 1 <= self.max_backends <= MAX_BACKENDS:
            raise ValueError(f"max_backends: must be 1-{MAX_BACKENDS} (got {self.max_backends})")
        if self.on_empty not in ("fail", "accept"):
            raise ValueError(f"on_empty: must be fail or accept (got {_short(self.on_empty)})")

    @property
    def target(self) -> str:
        return self.path


Spec = DnsSpec | FileSpec


# -- pure parts -------------------------------------------------------------------------


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def canonical_host(host: str) -> str:
    """An IP in its canonical text (``fd00::1``, ``10.0.0.4``); a host name lower-cased."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


def backend_name(host: str, port: int) -> str:
    """The backend name for an address: deterministic, ``[A-Za-z0-9_.-]``, at most 64 chars.

    ``10.0.0.4_8080``; IPv6 in canonical (compressed) form with ``:`` as ``-``
    (``fd00--1_8080``; no clash with IPv4, whose names have no ``-``); a host name
    lower-cased (``web.example_80``). Anything longer than 64 characters or with other
    characters (a scope ``%eth0``) keeps a readable start plus a hash of the whole address.
    """
    host = canonical_host(host)
    name = f"{host.replace(':', '-')}_{port}"
    if len(name) <= NAME_MAX and _NAME_RE.fullmatch(name):
        return name
    digest = hashlib.sha256(f"{host}_{port}".encode()).hexdigest()[:12]
    head = re.sub(r"[^A-Za-z0-9_.-]", "-", host)[:40]
    return f"{head}-{digest}_{port}"


def clamp_ttl(ttl: float, min_ttl_s: float, max_ttl_s: float) -> float:
    """The TTL of an answer, bounded: never below min_ttl_s (TTL 0), never above max_ttl_s."""
    return min(max(float(ttl), min_ttl_s), max_ttl_s)


def jittered(delay: float, lo: float, hi: float, jitter: float,
             rand: Callable[[], float] = random.random) -> float:
    """``delay`` clamped to [lo, hi] and spread by up to ``jitter`` (a fraction), never outside
    [lo, hi]: earlier by up to jitter x delay, or later when delay is at the floor ``lo``."""
    d = min(max(delay, lo), hi)
    if jitter <= 0:
        return d
    down = max(lo, d * (1.0 - jitter))
    if down < d:
        return down + (d - down) * rand()
    up = min(hi, d * (1.0 + jitter))
    return d + (up - d) * rand()


def on_tick(now: float, delay: float, lo: float = 0.0, hi: float = math.inf,
            tick: float = TICK_S) -> float:
    """``delay`` moved so that ``now + delay`` is a multiple of ``tick``: earlier if that stays
    at or above ``lo``, else later if that stays at or below ``hi``, else unchanged."""
    if delay <= 2 * tick:
        return delay
    early = math.floor((now + delay) / tick) * tick - now
    if early >= lo:
        return early
    late = math.ceil((now + delay) / tick) * tick - now
    return late if late <= hi else delay


def retry_delay(consecutive_failures: int, base_s: float, cap_s: float) -> float:
    """Wait before the next attempt after the n-th failure in a row: base, 2x, 4x, ... <= cap."""
    n = max(1, consecutive_failures)
    return min(cap_s, base_s * (2.0 ** min(n - 1, 30)))


class SrvRecord(NamedTuple):
    priority: int
    weight: int
    port: int
    target: str
    """Absolute name without the final dot; ``.`` (root) means "no service here"."""


def srv_select(records: Iterable[SrvRecord]) -> list[SrvRecord]:
    """The records of the lowest priority (module docstring), without ``.`` targets and
    port 0 (neither can be connected to)."""
    usable = [r for r in records if r.target not in (".", "") and r.port != 0]
    if not usable:
        return []
    low = min(r.priority for r in usable)
    return [r for r in usable if r.priority == low]


def srv_weights(raw: Mapping[str, int]) -> dict[str, int]:
    """Summed SRV weights per address -> backend weights 1-1000 (module docstring)."""
    if not raw:
        return {}
    top = max(raw.values())
    if top <= 0:
        return dict.fromkeys(raw, 1)
    scale = min(1.0, WEIGHT_MAX / top)
    return {k: max(1, min(WEIGHT_MAX, round(v * scale))) for k, v in raw.items()}


def usable_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """An address a backend can have: not unspecified, multicast or broadcast."""
    if ip.is_unspecified or ip.is_multicast:
        return False
    return not (isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address(
        "255.255.255.255"))


def address_backends(addresses: Iterable[str], port: int, weight: int) -> list[Backend]:
    """Backends for IP addresses (from A/AAAA records), deduplicated, unusable ones left out."""
    seen: dict[str, Backend] = {}
    for text in addresses:
        ip = ipaddress.ip_address(text)
        if not usable_ip(ip):
            continue
        host = str(ip)
        address = format_hostport(host, port)
        parse_hostport(address)
        seen.setdefault(address, Backend(backend_name(host, port), address, weight))
    return sorted(seen.values())


def parse_backend_file(data: bytes, *, source: str, max_backends: int = MAX_BACKENDS,
                       on_empty: OnEmpty = "fail") -> list[Backend]:
    """The backends of a discovery file's content (module docstring), sorted by name.

    Raises DiscoveryError whose message starts with ``source`` (the path) and names the
    entry and the problem.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DiscoveryError("invalid_json", f"{source}: not UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise DiscoveryError("invalid_json", f"{source}: empty file (a partial write?)")
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise DiscoveryError("invalid_json", f"{source}: not JSON (a partial write?): "
                             f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:
        raise DiscoveryError("invalid_json", f"{source}: not usable JSON: "
                             f"{_short(str(e), 100)}") from None
    if not isinstance(doc, list):
        raise DiscoveryError("invalid", f"{source}: expected a JSON array of backends "
                             f"[{{\"address\": \"host:port\"}}, ...], got {type(doc).__name__}")
    if len(doc) > max_backends:
        raise DiscoveryError("too_many", f"{source}: {len(doc)} backends, more than the "
                             f"{max_backends} a pool may get from discovery")
    if not doc and on_empty == "fail":
        raise DiscoveryError("empty", f"{source}: no backends (an empty pool is refused; "
                             "on_empty = \"accept\" allows it)")
    errors: list[str] = []
    out: list[Backend] = []
    names: dict[str, int] = {}
    addresses: dict[str, int] = {}
    for i, entry in enumerate(doc):
        try:
            b = _file_entry(entry)
        except ValueError as e:
            errors.append(f"[{i}]{e}")
        else:
            if b.address in addresses:
                errors.append(f"[{i}].address: duplicate {b.address!r} "
                              f"(also [{addresses[b.address]}])")
            elif b.name in names:
                errors.append(f"[{i}].name: duplicate {b.name!r} (also [{names[b.name]}])")
            else:
                names[b.name] = i
                addresses[b.address] = i
                out.append(b)
        if len(errors) >= _ERRORS_SHOWN:
            break
    if errors:
        more = " (first problems only)" if len(errors) >= _ERRORS_SHOWN else ""
        raise DiscoveryError("invalid", f"{source}: " + "; ".join(errors) + more)
    out.sort()
    return out


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {_short(k)} in an object")
            seen.add(k)
    return out


def _file_entry(entry: object) -> Backend:
    """One array element; ValueError('.key: problem')."""
    if not isinstance(entry, dict):
        raise ValueError(f": expected an object {{\"address\": ...}}, got {type(entry).__name__}")
    unknown = sorted(set(entry) - {"name", "address", "weight"})
    if unknown:
        raise ValueError(f": unknown key {_short(unknown[0])} (allowed: name, address, weight)")
    address = entry.get("address")
    if not isinstance(address, str):
        raise ValueError(f".address: required, a string \"host:port\" (got {_short(address)})")
    try:
        host, port = parse_hostport(address)
    except ValueError as e:
        raise ValueError(f".address: {e} (got {_short(address)})") from None
    if _is_ip(host):
        ip = ipaddress.ip_address(host)
        if not usable_ip(ip):
            raise ValueError(f".address: not a unicast address (got {_short(address)})")
    elif not _HOST_RE.fullmatch(host):
        raise ValueError(f".address: not an IP address or host name (got {_short(address)})")
    host = canonical_host(host)
    canonical = format_hostport(host, port)
    name = entry.get("name")
    if name is None:
        name = backend_name(host, port)
    elif not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f".name: must match [A-Za-z0-9_.-]{{1,64}} (got {_short(name)})")
    weight = entry.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= WEIGHT_MAX:
        raise ValueError(f".weight: must be an integer 0-{WEIGHT_MAX} (got {_short(weight)})")
    return Backend(name, canonical, weight)


# -- DNS --------------------------------------------------------------------------------


@dataclass
class _Rrs:
    """Records of one (name, type): their text and TTL (None when there were none)."""

    items: list[Any]
    ttl: float | None


class _DnsSource:
    """One refresh of a DnsSpec: the backends and the TTL to wait, or DiscoveryError."""

    def __init__(self, spec: DnsSpec) -> None:
        self.spec = spec
        self.edns = False
        self._largest = 0
        self.qname = dns.name.from_text(spec.name)
        self._resolver: dns.asyncresolver.Resolver | None = None
        self._conf_key: tuple[int, ...] | None = None
        if spec.resolvers:
            r = dns.asyncresolver.Resolver(configure=False)
            r.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_resolver(v)) for v in spec.resolvers
            ]
            self._resolver = self._tune(r)

    def _tune(self, r: dns.asyncresolver.Resolver) -> dns.asyncresolver.Resolver:
        r.cache = None
        r.search = []
        r.use_search_by_default = False
        # Two tries per server within the question's budget; a retry of ours follows anyway.
        r.timeout = self.spec.timeout_s / 2
        r.lifetime = self.spec.timeout_s
        if self.edns:
            r.use_edns(0, 0, EDNS_PAYLOAD)
        return r

    @property
    def resolver(self) -> dns.asyncresolver.Resolver:
        """The spec's servers, or resolv.conf's, read again whenever that file changed (a
        missing or serverless file is a failure of each refresh until it is fixed)."""
        if self.spec.resolvers:
            assert self._resolver is not None
            return self._resolver
        try:
            st = os.stat(RESOLV_CONF)
        except OSError as e:
            self._resolver = self._conf_key = None
            raise DiscoveryError("error", f"{self.spec.target}: no resolvers configured and "
                                 f"{RESOLV_CONF}: {e.strerror or e}") from None
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if self._resolver is None or key != self._conf_key:
            try:
                r = dns.asyncresolver.Resolver(filename=RESOLV_CONF, configure=True)
            except dns.exception.DNSException as e:
                self._resolver = self._conf_key = None
                raise DiscoveryError("error", f"{self.spec.target}: no resolvers configured "
                                     f"and {RESOLV_CONF}: {_short(str(e), 100)}") from None
            self._resolver, self._conf_key = self._tune(r), key
        return self._resolver

    async def fetch(self) -> tuple[list[Backend], float]:
        self._largest = 0
        try:
            return await self._fetch()
        finally:
            self._tune_edns()

    def _tune_edns(self) -> None:
        r = self._resolver
        if not self.edns and self._largest > EDNS_AFTER_RECORDS:
            self.edns = True
            if r is not None:
                r.use_edns(0, 0, EDNS_PAYLOAD)
        elif self.edns and self._largest < EDNS_AFTER_RECORDS // 2:
            self.edns = False
            if r is not None:
                r.use_edns(False)

    async def _fetch(self) -> tuple[list[Backend], float]:
        spec = self.spec
        if spec.record == "SRV":
            return await self._srv()
        try:
            rrs = await self._addresses(self.qname, spec.record)
        except DiscoveryError as e:
            if spec.on_empty == "accept" and e.reason in ("nxdomain", "nodata"):
                return [], spec.min_ttl_s
            raise
        assert spec.port is not None
        if len(rrs.items) > spec.max_backends:
            raise _too_many(spec.target, len(rrs.items), spec.max_backends)
        backends = address_backends(rrs.items, spec.port, spec.weight)
        if not backends:
            if spec.on_empty == "accept":
                return [], rrs.ttl if rrs.ttl is not None else spec.min_ttl_s
            raise DiscoveryError("nodata", f"{spec.target}: no usable address in the answer")
        return backends, rrs.ttl if rrs.ttl is not None else spec.min_ttl_s

    async def _query(self, qname: dns.name.Name, rdtype: str) -> tuple[_Rrs, Any]:
        """One question; NODATA -> no items (ttl None); every other failure DiscoveryError."""
        what = f"{qname.to_text(omit_final_dot=True)} {rdtype}"
        resolver = self.resolver
        try:
            answer = await resolver.resolve(
                qname, rdtype, search=False, raise_on_no_answer=False,
            )
        except dns.resolver.NXDOMAIN:
            raise DiscoveryError("nxdomain", f"{what}: NXDOMAIN (no such name)") from None
        except dns.resolver.NoAnswer:
            return _Rrs([], None), None
        except dns.exception.Timeout as e:
            raise _server_errors(what, e, "timeout", self.spec.timeout_s) from None
        except dns.resolver.NoNameservers as e:
            raise _server_errors(what, e, "error", self.spec.timeout_s) from None
        except dns.exception.DNSException as e:
            raise DiscoveryError("error", f"{what}: {_short(str(e), 200)}") from None
        except OSError as e:
            raise DiscoveryError("unreachable", f"{what}: {e.strerror or e}") from None
        rrset = answer.rrset
        if rrset is None:
            return _Rrs([], None), answer.response
        self._largest = max(self._largest, len(rrset))
        return _Rrs(list(rrset), float(rrset.ttl)), answer.response

    async def _addresses(self, qname: dns.name.Name, record: str,
                         known: Mapping[tuple[dns.name.Name, str], _Rrs] | None = None) -> _Rrs:
        """The A and/or AAAA addresses of qname (as text); NODATA for all types -> 'nodata'."""
        types = ["A", "AAAA"] if record == "A+AAAA" else [record]
        known = known or {}
        todo = [t for t in types if (qname, t) not in known]
        results: list[BaseException | tuple[_Rrs, Any]]
        if len(todo) == 1:  # the common case: no task for a single query
            results = [await self._query(qname, todo[0])]
        else:
            results = list(await asyncio.gather(
                *(self._query(qname, t) for t in todo), return_exceptions=True))
        got = [known[(qname, t)] for t in types if (qname, t) in known]
        for res in results:
            if isinstance(res, BaseException):
                raise res
            got.append(res[0])
        items = [str(getattr(r, "address", "")) for g in got for r in g.items]
        ttls = [g.ttl for g in got if g.ttl is not None]
        if not items:
            raise DiscoveryError(
                "nodata", f"{qname.to_text(omit_final_dot=True)} {record}: no records "
                "(NOERROR, empty answer)")
        return _Rrs(items, min(ttls) if ttls else None)

    async def _srv(self) -> tuple[list[Backend], float]:
        spec = self.spec
        empty_ok = spec.on_empty == "accept"
        try:
            rrs, response = await self._query(self.qname, "SRV")
        except DiscoveryError as e:
            if empty_ok and e.reason == "nxdomain":
                return [], spec.min_ttl_s
            raise
        if len(rrs.items) > spec.max_backends:
            raise _too_many(spec.target, len(rrs.items), spec.max_backends)
        records = [
            SrvRecord(int(r.priority), int(r.weight), int(r.port),
                      "." if r.target == dns.name.root else r.target.to_text(omit_final_dot=True))
            for r in rrs.items
        ]
        chosen = srv_select(records)
        if not chosen:
            if empty_ok:
                return [], rrs.ttl if rrs.ttl is not None else spec.min_ttl_s
            why = "no records" if not records else "no usable target (all '.' or port 0)"
            raise DiscoveryError("nodata", f"{spec.target}: {why}")
        ttls = [rrs.ttl] if rrs.ttl is not None else []
        known = _additional(response, spec.target_record)
        targets = sorted({r.target for r in chosen})
        sem = asyncio.Semaphore(SRV_LOOKUPS_IN_FLIGHT)

        async def lookup(target: str) -> _Rrs | None:
            async with sem:
                try:
                    return await self._addresses(
                        dns.name.from_text(target), spec.target_record, known)
                except DiscoveryError as e:
                    if e.reason in ("nxdomain", "nodata"):
                        return None  # the DNS says this target has no address: left out
                    raise DiscoveryError(e.reason, f"{spec.target}: target {e.message}") from None

        found = await asyncio.gather(*(lookup(t) for t in targets), return_exceptions=True)
        addrs: dict[str, list[str]] = {}
        missing: list[str] = []
        for target, res in zip(targets, found, strict=True):
            if isinstance(res, BaseException):
                raise res
            if res is None:
                missing.append(target)
                continue
            addrs[target] = res.items
            if res.ttl is not None:
                ttls.append(res.ttl)
        raw: dict[str, int] = {}
        for r in chosen:
            for text in addrs.get(r.target, ()):
                ip = ipaddress.ip_address(text)
                if usable_ip(ip):
                    address = format_hostport(str(ip), r.port)
                    raw[address] = raw.get(address, 0) + r.weight
        if len(raw) > spec.max_backends:
            raise _too_many(spec.target, len(raw), spec.max_backends)
        ttl = min(ttls) if ttls else spec.min_ttl_s
        if not raw:
            if empty_ok:
                return [], ttl
            raise DiscoveryError("nodata", f"{spec.target}: no target has an address "
                                 f"({', '.join(missing[:5]) or 'none usable'})")
        if missing:
            logger.info("event=discovery_srv_targets_without_address target=%r targets=%r",
                        spec.target, missing[:5])
        weights = srv_weights(raw)
        out = []
        for address, w in weights.items():
            host, port = parse_hostport(address)
            out.append(Backend(backend_name(host, port), address, w))
        out.sort()
        return out, ttl


def _additional(response: Any, record: str) -> dict[tuple[dns.name.Name, str], _Rrs]:
    """A/AAAA RRsets in an answer's additional section, by (owner, type)."""
    out: dict[tuple[dns.name.Name, str], _Rrs] = {}
    if response is None:
        return out
    want = {"A+AAAA": ("A", "AAAA")}.get(record, (record,))
    for rrset in response.additional:
        t = dns.rdatatype.to_text(rrset.rdtype)
        if t in want:
            out[(rrset.name, t)] = _Rrs(list(rrset), float(rrset.ttl))
    return out


def _too_many(target: str, n: int, cap: int) -> DiscoveryError:
    return DiscoveryError("too_many", f"{target}: {n} backends, more than the {cap} a pool "
                          "may get from discovery")


def _server_errors(what: str, e: dns.exception.DNSException, default: str,
                   timeout_s: float) -> DiscoveryError:
    """Every server failed or time ran out: the reason is the most telling of what each
    server said (SERVFAIL > REFUSED > unreachable > no answer > anything else); a server
    that answered says more than one that did not."""
    errors = (e.kwargs.get("errors") if isinstance(e.kwargs, dict) else None) or []
    rank = {"servfail": 4, "refused": 3, "unreachable": 2, "timeout": 1, "error": 0}
    reason, details = default, []
    best = -1
    for err in errors:
        server, exc, response = err[0], err[3], err[4]
        this = "error"
        if response is not None:
            text = dns.rcode.to_text(response.rcode())
            this = {"SERVFAIL": "servfail", "REFUSED": "refused"}.get(text, "error")
            detail = f"{server} answered {text}"
        elif isinstance(exc, dns.exception.Timeout):
            this, detail = "timeout", f"{server}: no answer"
        elif isinstance(exc, OSError):
            this, detail = "unreachable", f"{server}: {exc.strerror or exc}"
        else:
            detail = f"{server}: {_short(str(exc), 80)}"
        if detail not in details:
            details.append(detail)
        if rank[this] > best:
            reason, best = this, rank[this]
    head = f"no answer within {timeout_s:g}s: " if default == "timeout" else ""
    said = "; ".join(details[:3]) or "no server answered"
    return DiscoveryError(reason, f"{what}: {head}{said}")


# -- file -------------------------------------------------------------------------------


_MISSING = ("missing",)


def _key(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_file(path: str, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """The file's content and the identity of what was read (open, fstat, read)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DiscoveryError("unreadable", f"{path}: not a regular file")
        if st.st_size > max_bytes:
            raise DiscoveryError("too_large", f"{path}: {st.st_size} bytes, more than "
                                 f"the {max_bytes} read")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise DiscoveryError("too_large", f"{path}: more than {max_bytes} bytes")
        return b"".join(chunks), st
    finally:
        os.close(fd)


def _load(spec: FileSpec) -> tuple[list[Backend], os.stat_result]:
    data, st = _read_file(spec.path, spec.max_bytes)
    return parse_backend_file(data, source=spec.path, max_backends=spec.max_backends,
                              on_empty=spec.on_empty), st


class _Unchanged(Exception):
    """The file is as it was: nothing new (good or bad)."""


class _FileSource:
    def __init__(self, spec: FileSpec) -> None:
        self.spec = spec
        self.key: tuple[Any, ...] | None = None
        self.racy = False
        self.last_failure: tuple[tuple[Any, ...], str] | None = None
        self.reads = 0

    async def fetch(self) -> list[Backend] | None:
        """New backends; None if the file is unchanged since a good read; raises
        DiscoveryError (a new failure) or _Unchanged (the same failure as before)."""
        path = self.spec.path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._failed(_MISSING, DiscoveryError("missing", f"{path}: no such file"))
        except OSError as e:
            self._failed(_MISSING, DiscoveryError(
                "unreadable", f"{path}: {e.strerror or e}"))
        key = _key(st)
        if key == self.key and not self.racy:
            if self.last_failure is not None:
                raise _Unchanged()
            return None
        self.reads += 1
        try:
            if st.st_size > FILE_THREAD_BYTES:
                backends, st_read = await asyncio.to_thread(_load, self.spec)
            else:
                backends, st_read = _load(self.spec)
        except DiscoveryError as e:
            self._failed(key, e)
        except FileNotFoundError:
            self._failed(_MISSING, DiscoveryError("missing", f"{path}: no such file"))
        except OSError as e:
            self._failed(key, DiscoveryError("unreadable", f"{path}: {e.strerror or e}"))
        self.key = _key(st_read)
        self.racy = time.time_ns() - st_read.st_mtime_ns < RACY_S * 1e9
        self.last_failure = None
        return backends

    def _failed(self, key: tuple[Any, ...], e: DiscoveryError) -> NoReturn:
        again = self.last_failure == (key, e.message)
        self.key = key
        self.racy = key is not _MISSING and self.racy_now(key)
        self.last_failure = (key, e.message)
        if again:
            raise _Unchanged()
        raise e

    @staticmethod
    def racy_now(key: tuple[Any, ...]) -> bool:
        return time.time_ns() - int(key[3]) < RACY_S * 1e9


# -- the runner -------------------------------------------------------------------------


def _plain(backends: Iterable[Backend]) -> list[tuple[str, str, int]]:
    return [(b.name, b.address, b.weight) for b in backends]


@dataclass
class _Stats:
    resolutions: int = 0
    changes: int = 0
    callback_errors: int = 0
    consecutive_failures: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    last_ok_at: float | None = None
    last_change_at: float | None = None
    last_error: str | None = None
    last_error_reason: str | None = None
    last_ttl_s: float | None = None


class Discovery:
    """Finds one pool's backends and keeps them current (module docstring).

    ``initial``: the set the pool has now (after a reload, the old runner's ``backends``), so
    a new runner calls back only when the source says something else.
    """

    def __init__(self, pool: str, spec: Spec, on_change: OnChange, *,
                 initial: Sequence[tuple[str, str, int]] | None = None,
                 rng: random.Random | None = None) -> None:
        self.pool = pool
        self.spec = spec
        self.source = spec.kind
        self._on_change = on_change
        self._rand = (rng or random.Random()).random
        self._current: tuple[Backend, ...] | None = (
            None if initial is None else tuple(sorted(Backend(*b) for b in initial)))
        self._stats = _Stats()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._wake = asyncio.Event()
        self._next_at: float | None = None
        self._bounds: tuple[float, float] = (0.0, math.inf)
        """What the next delay may be moved within (on_tick): the TTL bounds, the retry cap."""
        self._dns = _DnsSource(spec) if isinstance(spec, DnsSpec) else None
        self._file = _FileSource(spec) if isinstance(spec, FileSpec) else None
        if isinstance(spec, FileSpec):
            self._bounds = (spec.interval_s * 0.9, spec.interval_s * 1.1)

    # -- control

    def start(self, initial_delay_s: float = 0.0) -> None:
        """Begin (first refresh after initial_delay_s); needs a running loop."""
        if self._task is not None or self._stopped:
            raise RuntimeError("discovery already started (or stopped: make a new one)")
        self._task = asyncio.get_running_loop().create_task(
            self._run(initial_delay_s), name=f"discovery-{self.pool}")

    async def stop(self) -> None:
        """Stop refreshing; no callback comes after this returns."""
        self._stopped = True
        task, self._task = self._task, None
        if task is None:
            return
        # Python 3.11's asyncio.wait_for (inside dnspython) can swallow a cancellation that
        # meets a reply: cancel until the task is done (the flag ends the loop anyway).
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.5)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            task.result()
        self._next_at = None

    def refresh(self) -> None:
        """Refresh now instead of at the next scheduled time (e.g. an operator asked)."""
        self._wake.set()

    @property
    def backends(self) -> list[tuple[str, str, int]] | None:
        """The last good set (None before the first success)."""
        return None if self._current is None else _plain(self._current)

    def status(self) -> dict[str, Any]:
        s = self._stats
        spec = self.spec
        out: dict[str, Any] = {
            "kind": self.source,
            "target": spec.target,  # "name RECORD" or the path (docs/status.schema.json)
            "last_ok_at": s.last_ok_at,
            "last_change_at": s.last_change_at,
            "last_error": s.last_error,
            "last_error_reason": s.last_error_reason,
            "consecutive_failures": s.consecutive_failures,
            "backends": None if self._current is None else len(self._current),
            "next_refresh_s": (None if self._next_at is None
                               else round(max(0.0, self._next_at - time.monotonic()), 3)),
            "failures": dict(sorted(s.failures.items())),
            "failures_total": sum(s.failures.values()),
            "resolutions_total": s.resolutions,
            "changes_total": s.changes,
            "callback_errors_total": s.callback_errors,
        }
        if isinstance(spec, DnsSpec):
            out["record"] = spec.record
            out["last_ttl_s"] = s.last_ttl_s
        return out

    # -- the loop

    async def _run(self, initial_delay_s: float) -> None:
        if initial_delay_s > 0:
            await self._sleep(initial_delay_s)
        while not self._stopped:
            delay = await self.refresh_once()
            if self._stopped:
                break
            await self._sleep(delay, *self._bounds)

    async def _sleep(self, delay: float, lo: float = 0.0, hi: float = math.inf) -> None:
        now = time.monotonic()
        delay = on_tick(now, delay, lo, hi)
        self._next_at = now + delay
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()
        self._wake.clear()  # after: a refresh() asked during the last refresh still counts

    async def refresh_once(self) -> float:
        """One refresh (tests and the loop); returns the delay until the next one."""
        if self._dns is not None:
            return await self._refresh_dns(self._dns)
        assert self._file is not None
        return await self._refresh_file(self._file)

    async def _refresh_dns(self, src: _DnsSource) -> float:
        spec = self.spec
        assert isinstance(spec, DnsSpec)
        self._stats.resolutions += 1
        try:
            backends, ttl = await src.fetch()
        except Exception as e:
            if not isinstance(e, DiscoveryError):  # a bug must not end discovery
                logger.exception("event=discovery_error pool=%r", self.pool)
                e = DiscoveryError("error", f"{spec.target}: {_short(str(e), 200)}")
            self._failure(e)
            cap = max(spec.min_ttl_s, min(spec.max_ttl_s, spec.retry_max_s))
            wait = retry_delay(self._stats.consecutive_failures, spec.min_ttl_s, cap)
            self._bounds = (spec.min_ttl_s, cap)
            return jittered(wait, spec.min_ttl_s, cap, spec.jitter, self._rand)
        self._stats.last_ttl_s = ttl
        self._bounds = (spec.min_ttl_s, spec.max_ttl_s)
        self._success(backends)
        return jittered(clamp_ttl(ttl, spec.min_ttl_s, spec.max_ttl_s),
                        spec.min_ttl_s, spec.max_ttl_s, spec.jitter, self._rand)

    async def _refresh_file(self, src: _FileSource) -> float:
        interval = src.spec.interval_s
        reads = src.reads
        try:
            backends = await src.fetch()
        except _Unchanged:
            return interval
        except DiscoveryError as e:
            self._stats.resolutions += src.reads - reads
            self._failure(e)
            return interval
        except Exception as e:
            logger.exception("event=discovery_error pool=%r", self.pool)
            self._failure(DiscoveryError("error", f"{src.spec.path}: {_short(str(e), 200)}"))
            return interval
        self._stats.resolutions += src.reads - reads
        if backends is None:
            self._stats.last_ok_at = time.time()
        else:
            self._success(backends)
        return interval

    def _success(self, backends: list[Backend]) -> None:
        s = self._stats
        if s.consecutive_failures:
            logger.info("event=discovery_recovered pool=%r source=%s target=%r failures=%d",
                        self.pool, self.source, self.spec.target, s.consecutive_failures)
        s.consecutive_failures = 0
        s.last_ok_at = time.time()
        new = tuple(backends)
        if new == self._current or self._stopped:
            return
        old = set(self._current or ())
        try:
            self._on_change(self.pool, _plain(new), self.source)
        except Exception:
            s.callback_errors += 1
            logger.exception("event=discovery_callback_failed pool=%r", self.pool)
            return  # not applied: the next refresh offers it again
        s.changes += 1
        s.last_change_at = s.last_ok_at
        self._current = new
        logger.info("event=discovery_changed pool=%r source=%s target=%r backends=%d added=%d "
                    "removed=%d", self.pool, self.source, self.spec.target, len(new),
                    len(set(new) - old), len(old - set(new)))

    def _failure(self, e: DiscoveryError) -> None:
        s = self._stats
        s.consecutive_failures += 1
        s.failures[e.reason] = s.failures.get(e.reason, 0) + 1
        first = s.consecutive_failures == 1 or e.reason != s.last_error_reason
        s.last_error = e.message
        s.last_error_reason = e.reason
        if first:
            logger.warning("event=discovery_failed pool=%r source=%s reason=%s error=%r "
                           "kept=%s", self.pool, self.source, e.reason, e.message,
                           "none" if self._current is None else len(self._current))
