"""Configuration: TOML validated once into frozen pydantic models.

Every error names the dotted key path, the bad value and the rule, e.g.
``pool[0].backends[1].address: expected host:port (got '127.0.0.1')``. Unknown keys
are errors, so a typo never silently falls back to a default. A bad reload keeps the old
config: callers get a ``ConfigError`` and decide; nothing here has side effects.

Imports nothing from the rest of lb. The defaults and bounds of the settings the leaf
packages own are read from them, so each is written once: [pool.health] from
``healthcheck.CheckSpec``, [failover] from ``failover.FailoverSpec`` and the bounds in
failover.controller and failover.core.machine.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

import failover
from healthcheck import COUNT_MAX, JITTER_MAX, CheckSpec
from lb.failoverd import link as failover_link
from lb.maglev import is_prime


class ConfigError(Exception):
    """A config that cannot be used; ``errors`` lists one line per problem."""

    def __init__(self, errors: Sequence[str], source: str = "") -> None:
        self.errors = list(errors)
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(self.errors))


def parse_hostport(value: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6]:port``; raise ValueError with the rule broken."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected host:port")
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError("expected [v6]:port")
        host, rest = value[1:end], value[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError("not an IPv6 address inside [...]") from None
        if not rest:
            if default_port is None:
                raise ValueError("expected [v6]:port")
            return host, default_port
        if not rest.startswith(":"):
            raise ValueError("expected [v6]:port")
        port_s = rest[1:]
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep:
            if default_port is None:
                raise ValueError("expected host:port")
            return value, default_port
        if ":" in host:
            raise ValueError("IPv6 addresses need brackets: [v6]:port")
    if not host:
        raise ValueError("empty host")
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ValueError("port must be 1-65535")
    return host, int(port_s)


def format_hostport(host: str, port: int) -> str:
    """The inverse of parse_hostport (brackets IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Model(BaseModel):
    """Strict types: ``workers = "2"``, ``enabled = "yes"`` or ``timeout_s = true`` are errors,
    never converted. An int is a valid float (TOML writes ``1`` for 1.0), a TOML array a valid
    tuple; nothing else is coerced."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_default=True,
        use_attribute_docstrings=True,
        strict=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _arrays_are_tuples(cls, data: Any) -> Any:
        # TOML and JSON give lists; the frozen models hold tuples (strict mode takes only
        # tuples). The items are still validated strictly.
        if isinstance(data, dict):
            return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return data


Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegSeconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
"""Durations are finite: ``inf`` would silently turn a deadline off."""
AccountName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")]
"""A user or group name (or a numeric id) on this host."""


class NodeConfig(_Model):
    name: Annotated[str, Field(min_length=1, max_length=failover.NODE_NAME_MAX,
                               pattern=failover.NODE_NAME_PATTERN)]
    """This node's name in heartbeats, logs, metrics and the status API: ASCII letters,
    digits, ``_``, ``.`` and ``-`` (the heartbeat's rule, ``failover.NODE_NAME_*``)."""
    workers: Annotated[int, Field(ge=0, le=256)] = 0
    """Proxy worker processes; 0 means one per CPU."""
    shutdown_timeout_s: NonNegSeconds = 30.0
    """On SIGTERM, how long in-flight requests may take to finish."""
    worker_ping_interval_s: Seconds = 1.0
    """How often the control process pings each worker."""
    worker_ping_timeout_s: Seconds = 5.0
    """A worker silent this long is killed and replaced."""
    worker_nice: Annotated[int, Field(ge=0, le=19)] = 5
    """Workers run this much nicer than the control process, so a saturated proxy can never
    delay a heartbeat (a late heartbeat is a false failover on the peer)."""
    worker_user: AccountName | None = None
    """User the proxy workers run as (they parse untrusted bytes, with no capabilities).
    Default: ``nobody`` when pairlb runs as root; else pairlb's own user (under the systemd
    unit, the service's dynamic user). Only root can name another user; never root."""
    worker_group: AccountName | None = None
    """Group of the workers (no supplementary groups). Default: worker_user's primary group
    (``nogroup`` for ``nobody``); pairlb's own group when not root."""
    state_dir: Annotated[str, Field(min_length=2, pattern=r"^/")] = "/var/lib/pairlb"
    """Where runtime changes to pools (backends added or removed through the admin API or
    by the peer) are kept across restarts and reloads: the overlay on top of this file
    (docs/elastic-pools.md). The systemd unit's ``StateDirectory=``; created (0700) on the
    first change if missing."""

TlsVersion = Literal["1.2", "1.3"]
ServerName = Annotated[str, Field(min_length=1, max_length=253,
                                  pattern=r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")]
"""A DNS name, or ``*.`` and a name (one leftmost label, as certificates allow)."""
AbsPath = Annotated[str, Field(min_length=2, pattern=r"^/")]
"""An absolute path: a relative one would depend on where the daemon happens to start."""


class CertificateConfig(_Model):
    cert_file: AbsPath
    """PEM: the certificate, then its intermediates (the chain as served)."""
    key_file: AbsPath
    """PEM private key of the certificate, unencrypted. Read by the control process only
    (the workers get it over their channel): a regular file, no symlink, owned by root or
    pairlb's user, not accessible by group or others."""


class ListenerTlsConfig(_Model):
    certificates: Annotated[tuple[CertificateConfig, ...], Field(min_length=1, max_length=1000)]
    """Chosen by the client's SNI against each certificate's names (exact names first, then
    ``*.`` wildcards, in this order); the first one serves clients without SNI or with a
    name no certificate has."""
    min_version: TlsVersion = "1.2"
    """Oldest protocol accepted."""
    ciphers: Annotated[str, Field(min_length=1, pattern=r"^[\x21-\x7e]+$")] = (
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
        "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
        "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
    """OpenSSL cipher list for TLS 1.2 (1.3 suites are all AEAD and stay OpenSSL's). The
    default is forward secret AEAD only (Mozilla's "intermediate"); the server's order is
    preferred."""
    alpn: tuple[Literal["http/1.1"], ...] = ("http/1.1",)
    """ALPN protocols offered (``[]``: none). pairlb speaks HTTP/1.1 to clients."""
    session_tickets: bool = True
    """Resumption by session tickets. Their key is shared by every worker and, through
    ``ticket_key_file`` or the failover key, by both nodes: a client resumes on the peer
    after a failover."""
    ticket_key_file: AbsPath | None = None
    """80 bytes (160 hex digits; ``pairlb keygen --tls-ticket``) shared by the nodes, read
    like the other secrets; it changes when the file does. Default: derived from the
    failover key when there is one, else random (this node's workers only); those change
    every 12 hours, on both nodes at once."""
    handshake_timeout_s: Seconds = 10.0
    """A TLS handshake must finish within this (slow or stalled clients are cut)."""
    hsts_max_age_s: Annotated[int, Field(ge=0, le=2 * 365 * 86400)] = 0
    """Add ``Strict-Transport-Security: max-age=N`` to responses that have none (0: off).
    Browsers take it only over HTTPS, so it belongs here, not on the plain listener."""
    hsts_include_subdomains: bool = False
    """Add ``; includeSubDomains`` to it."""

    @field_validator("ciphers")
    @classmethod
    def _ciphers(cls, v: str) -> str:
        import ssl

        try:  # OpenSSL's own parser: a list it cannot use fails here, not in the workers
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(v)
        except ssl.SSLError:
            raise ValueError("OpenSSL selects no cipher from this list") from None
        return v

    @model_validator(mode="after")
    def _unique_files(self) -> ListenerTlsConfig:
        files = [c.cert_file for c in self.certificates]
        dup = sorted({f for f in files if files.count(f) > 1})
        if dup:
            raise ValueError(f"certificates: the same cert_file twice: {dup}")
        return self


class SniRoute(_Model):
    server_name: ServerName
    """Exact name, or ``*.example.com`` for one label under it."""
    pool: str
    """Where a TLS connection naming it goes (passed through, not terminated)."""


class ListenerConfig(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    """Unique listener name (logs, metrics)."""
    bind: str
    """Address to accept on: ``host:port`` or ``[v6]:port``; the host must be an IP."""
    mode: Literal["http", "tcp"] = "http"
    """``http``: HTTP/1.x reverse proxy; ``tcp``: bytes piped both ways."""
    pool: str
    """Name of the pool this listener sends to."""
    backlog: Annotated[int, Field(ge=1, le=65535)] = 1024
    """listen(2) backlog of each listening socket (one per worker with ``reuseport``)."""
    reuseport: bool = True
    """One socket per worker (SO_REUSEPORT): the kernel spreads new connections evenly by
    their addresses, at low load and high. The control process watches each socket's queue
    and has the other workers take a queue whose worker is gone, starting, paused or not
    taking it. ``false``: one socket shared by all (the first worker awake takes what is
    queued, so long-lived connections can pile onto one worker). A reload that changes it
    without changing ``bind`` keeps the old setting (the port's sockets stay); a restart
    applies it."""
    freebind: bool = True
    """IP_FREEBIND so a standby can bind the VIP before it holds it."""
    transparent: bool = True
    """IP_TRANSPARENT (needs CAP_NET_ADMIN; skipped without it) so connections accepted on
    the VIP can still send after the VIP moved to the peer: responses in flight at a
    switchover or graceful stop reach the client instead of timing out."""
    client_header_timeout_s: Seconds = 10.0
    """A request's headers must arrive within this (else 408; slowloris)."""
    client_idle_timeout_s: Seconds = 60.0
    """Keep-alive idle time between requests (http); idle time both ways (tcp). Also the
    longest gap between two reads of a request body (else 408)."""
    client_body_timeout_s: Seconds = 300.0
    """A request body (chunk framing and trailers included) must arrive in full within this
    of its head's end, however steadily it trickles (else 408, or a cut connection when the
    response has already begun). Time we are not reading it (a pipelined request waiting
    its turn, a backend not taking the body) does not count."""
    max_request_line_bytes: Annotated[int, Field(ge=64, le=1 << 20)] = 8192
    """Longer request line: 414."""
    max_header_bytes: Annotated[int, Field(ge=256, le=1 << 22)] = 32768
    """Larger header block: 431. Also bounds a chunked body's trailer section (431) and its
    chunk framing beyond 16 bytes per chunk plus twice the data (chunk-size lines,
    extensions: 400), counted as the bytes arrive."""
    max_headers: Annotated[int, Field(ge=1, le=10000)] = 100
    """More header fields: 431."""
    max_body_bytes: Annotated[int, Field(ge=0)] = 0
    """0 means no limit: bodies are streamed, never buffered."""
    trusted_proxies: tuple[str, ...] = ()
    """CIDRs whose forwarding headers (X-Forwarded-*, Forwarded, X-Real-IP,
    True-Client-IP, X-Client-IP, ...) are kept; everyone else's are dropped and
    X-Forwarded-For/-Proto and Forwarded are set from the connection."""
    underscores_in_headers: Literal["drop", "pass"] = "drop"
    """Request header fields whose name has an underscore (``X_Forwarded_For``): ``drop``
    them (nginx's default; many backends read ``_`` and ``-`` alike), or ``pass`` them on.
    With ``pass``, a name that reads as a field pairlb manages (framing, Host, Connection,
    forwarding) with ``_`` for ``-`` is dropped all the same."""
    add_request_id: bool = True
    """Add X-Request-ID when the request has none."""
    via: bool = True
    """Append ``Via: 1.1 pairlb`` (``1.0 pairlb`` for an HTTP/1.0 client) to requests sent to
    backends. Responses are passed with the backend's Via unchanged and none added: a
    reverse proxy is a gateway (RFC 9110 §7.6.3), and clients learn nothing of the path."""
    max_connections: Annotated[int, Field(ge=0)] = 0
    """Per worker; 0 means unlimited."""
    tls: ListenerTlsConfig | None = None
    """See ``[listener.tls]``: terminate TLS on this listener (http or tcp mode)."""
    redirect_to_https: bool = False
    """HTTP mode without tls: answer every request (but ACME challenges) with a redirect to
    ``https://`` the same host and target (301 for GET and HEAD, 308 for the rest, which
    keeps the method and body)."""
    https_port: Annotated[int, Field(ge=1, le=65535)] = 443
    """The port the redirect names (omitted when 443)."""
    acme_challenge_dir: AbsPath | None = None
    """HTTP mode: answer ``GET /.well-known/acme-challenge/TOKEN`` from the file TOKEN in
    this directory, whichever node holds the VIP; never sent to a backend. With certbot
    ``--webroot -w W`` it is ``W/.well-known/acme-challenge`` (certbot writes there)."""
    sni_routes: tuple[SniRoute, ...] = ()
    """TCP mode without tls: route TLS connections by their ClientHello's server name
    without terminating them (HAProxy's ``req.ssl_sni``); ``pool`` takes the rest."""
    sni_inspect_timeout_s: Seconds = 5.0
    """With sni_routes: how long to wait for the ClientHello; then ``pool`` takes it."""
    accept_proxy_protocol: bool = False
    """Read a PROXY protocol header (v1 or v2) at the start of each connection from a
    ``trusted_proxies`` address: required from them, and the client address it carries is
    the one logged, checked and forwarded. A connection from any other address that starts
    with one is refused (counted as ``proxy_protocol_untrusted``)."""

    @field_validator("bind")
    @classmethod
    def _bind(cls, v: str) -> str:
        host, _ = parse_hostport(v)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError("bind host must be an IP address") from None
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"not a CIDR: {cidr!r}") from None
        return v

    @model_validator(mode="after")
    def _modes(self) -> ListenerConfig:
        if self.mode == "tcp":
            # By value, not by what was written: the workers validate a full dump again.
            if self.redirect_to_https:
                raise ValueError("redirect_to_https needs mode = \"http\"")
            if self.acme_challenge_dir is not None:
                raise ValueError("acme_challenge_dir needs mode = \"http\"")
        if self.accept_proxy_protocol and self.tls is not None:
            raise ValueError("accept_proxy_protocol with [listener.tls] is not supported: "
                             "the header comes before the TLS handshake (use a mode = \"tcp\" "
                             "listener, or let the proxy in front send X-Forwarded-For)")
        if self.accept_proxy_protocol and not self.trusted_proxies:
            raise ValueError("accept_proxy_protocol needs trusted_proxies (the addresses of "
                             "the proxies allowed to send the header)")
        if self.tls is not None and self.redirect_to_https:
            raise ValueError("redirect_to_https is for a plain listener; this one has tls")
        if self.sni_routes:
            if self.mode != "tcp" or self.tls is not None:
                raise ValueError("sni_routes needs mode = \"tcp\" without tls (a terminating "
                                 "listener chooses its certificate by SNI itself)")
            names = [r.server_name.lower().rstrip(".") for r in self.sni_routes]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"sni_routes: the same server_name twice: {dup}")
        return self

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_hostport(self.bind)

    @property
    def pools(self) -> tuple[str, ...]:
        """Every pool this listener sends to: ``pool`` first, then its SNI routes'."""
        out = [self.pool]
        for r in self.sni_routes:
            if r.pool not in out:
                out.append(r.pool)
        return tuple(out)


StatusRange = Annotated[str, Field(pattern=r"^[1-5][0-9][0-9](-[1-5][0-9][0-9])?$")]
HostHeader = Annotated[str, Field(pattern=r"^[\x21-\x7e]+$")]
"""A Host header value: printable ASCII, no space, CR, LF or other control character."""


_CHECK = CheckSpec()
"""Defaults of every check setting live in ``healthcheck.CheckSpec``; read from there."""
CheckCount = Annotated[int, Field(ge=1, le=COUNT_MAX)]


class HealthConfig(_Model):
    type: Literal["http", "tcp"] = _CHECK.probe
    """``http``: a request must get an expected status; ``tcp``: a connect must succeed."""
    method: Literal["GET", "HEAD", "OPTIONS"] = _CHECK.method  # type: ignore[assignment]
    """HTTP method of the probe."""
    path: Annotated[str, Field(pattern=r"^/[\x21-\x7e]*$")] = _CHECK.path
    """Request target of the probe."""
    host: HostHeader | None = None
    """Host header of the probe; default: the backend address."""
    expect_status: tuple[StatusRange, ...] = tuple(f"{a}-{b}" for a, b in _CHECK.expect_status)
    """Passing statuses: codes or inclusive ranges like ``"200-399"``."""
    expect_body: str | None = None
    """If set, the body (first 64 KiB) must contain this text."""
    interval_s: Seconds = _CHECK.interval_s
    """Time between checks of a backend whose state is settled."""
    timeout_s: Seconds = _CHECK.timeout_s
    """Whole-probe deadline (connect + response)."""
    rise: CheckCount = _CHECK.rise
    """Passing checks in a row that bring a DOWN backend UP."""
    fall: CheckCount = _CHECK.fall
    """Failing checks in a row that take an UP backend DOWN."""
    fast_interval_s: Seconds | None = None
    """Interval while a backend is changing state; defaults to interval_s."""
    down_interval_s: Seconds | None = None
    """Interval while a backend is down; defaults to interval_s."""
    jitter: Annotated[float, Field(ge=0, le=JITTER_MAX)] = _CHECK.jitter
    """Fraction of the interval added or removed at random so checks don't fire in lock-step."""
    initial: Literal["down", "up"] = _CHECK.initial
    """'down': a new backend gets no traffic before its first passing check."""
    enabled: bool = True
    """False: no active checks; backends count as healthy."""
    reuse_connection: bool = _CHECK.reuse_connection
    """Keep a passing HTTP check's connection for the next check (Envoy's default): a
    request per check instead of a connect, request and close; for big pools. A backend
    that answers on an old connection but accepts no new ones then passes for up to 30 s
    (a kept connection's age limit). Not for backends given by host name."""

    @model_validator(mode="after")
    def _timeout_fits(self) -> HealthConfig:
        rule = CheckSpec.timeout_rule(self.timeout_s, self.interval_s)
        if rule is not None:
            raise ValueError(f"timeout_s {rule}")
        if self.reuse_connection and (self.type != "http" or self.method == "HEAD"):
            raise ValueError('reuse_connection needs type = "http" and a method other than HEAD')
        return self

    def status_ranges(self) -> tuple[tuple[int, int], ...]:
        out = []
        for r in self.expect_status:
            lo, _, hi = r.partition("-")
            out.append((int(lo), int(hi or lo)))
        return tuple(out)


class HealthOverride(_Model):
    """Per-backend overrides of the pool's health settings."""

    path: Annotated[str, Field(pattern=r"^/[\x21-\x7e]*$")] | None = None
    """Overrides ``[pool.health] path``."""
    host: HostHeader | None = None
    """Overrides ``[pool.health] host``."""
    interval_s: Seconds | None = None
    """Overrides ``[pool.health] interval_s``."""
    timeout_s: Seconds | None = None
    """Overrides ``[pool.health] timeout_s``."""
    rise: CheckCount | None = None
    """Overrides ``[pool.health] rise``."""
    fall: CheckCount | None = None
    """Overrides ``[pool.health] fall``."""
    fast_interval_s: Seconds | None = None
    """Overrides ``[pool.health] fast_interval_s``."""
    down_interval_s: Seconds | None = None
    """Overrides ``[pool.health] down_interval_s``."""
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """Check a different port than the traffic port."""


Balance = Literal["round_robin", "least_connections", "random_two", "maglev"]
"""How a pool picks a backend (lb.data.pool builds one structure per value)."""
PanicMode = Literal["spread", "fail"]
"""What a pool in panic does (lb.control.rotation)."""


class PassiveConfig(_Model):
    enabled: bool = True
    """False: errors seen by the proxy never eject a backend."""
    consecutive_failures: Annotated[int, Field(ge=1, le=1000)] = 3
    """Connect failures, timeouts or 5xx in a row that eject a backend."""
    count_5xx: bool = True
    """Count 5xx responses as failures (else only connect errors, resets, timeouts)."""
    eject_s: Seconds = 10.0
    """First ejection's length; the n-th in a row lasts n times this."""
    max_eject_s: Seconds = 300.0
    """Cap on one ejection's length."""
    max_eject_percent: Annotated[int, Field(ge=0, le=100)] = 50
    """Never eject more than this share of a pool at once."""
    end_on_check: Literal["corroborated", "pass", "never"] = "corroborated"
    """Active checks that end an ejection early: ``corroborated``, a passing check once a
    check begun since the ejection has failed too (a crashed backend restarted); ``pass``,
    any passing check begun since (Envoy's default; brings back a backend whose /healthz
    passes while its traffic fails); ``never``, it runs its course."""


_HOST_NAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?")
"""A DNS host name: labels of 1-63 letters, digits, ``-`` and ``_``."""


class BackendConfig(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    """Unique within its pool (logs, metrics, admin API)."""
    address: str
    """``host:port`` or ``[v6]:port``; a host name is resolved at connect time."""
    weight: Annotated[int, Field(ge=0, le=1000)] = 1
    """0 keeps the backend configured but sends it no new traffic."""
    health: HealthOverride | None = None
    """Per-backend health-check overrides."""

    @field_validator("address")
    @classmethod
    def _addr(cls, v: str) -> str:
        host, _ = parse_hostport(v)
        if not _is_ip(host) and not _HOST_NAME.fullmatch(host):
            # Names reach logs and the admin API: no spaces, controls or empty labels.
            raise ValueError(f"not an IP address or a host name: {host[:80]!r}")
        return v

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_hostport(self.address)


class PoolTlsConfig(_Model):
    verify: bool = True
    """Verify the backend's certificate (chain and name). Off only for a lab."""
    ca_file: AbsPath | None = None
    """PEM CA certificates to verify with; default: the system's store."""
    server_name: ServerName | None = None
    """SNI sent and name verified; default: the backend's host (an IP is verified against
    the certificate's IP addresses)."""
    min_version: TlsVersion = "1.2"
    """Oldest protocol offered to backends."""


DnsRecord = Literal["A", "AAAA", "A+AAAA", "SRV"]


class DiscoveryConfig(_Model):
    """Backends found at runtime, re-read as they change; a failure keeps the last good set
    (lb.control.discovery)."""

    type: Literal["dns", "file"]
    """``dns``: the addresses of a DNS name (A, AAAA or SRV records); ``file``: a JSON file
    ``[{"name": ..., "address": ..., "weight": ...}]`` replaced by rename."""
    name: Annotated[str, Field(min_length=1, max_length=253)] | None = None
    """dns: the name to resolve (for SRV, e.g. ``_http._tcp.web.example``)."""
    record: DnsRecord = "A"
    """dns: which records; SRV gives each backend's port and weight."""
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """dns: the backends' port for A/AAAA records."""
    resolvers: tuple[str, ...] = ()
    """dns: ``ip`` or ``ip:port`` of the servers to ask; default /etc/resolv.conf's."""
    min_ttl_s: Seconds = 1.0
    """dns: a record's TTL below this counts as this (TTL 0 would mean a query per loop)."""
    max_ttl_s: Seconds = 300.0
    """dns: re-resolved at least this often whatever the TTL says."""
    timeout_s: Seconds = 2.0
    """dns: how long one resolution may take, every server tried."""
    weight: Annotated[int, Field(ge=0, le=1000)] = 1
    """dns A/AAAA: the weight of each backend found."""
    path: Annotated[str, Field(min_length=2, pattern=r"^/")] | None = None
    """file: the JSON file."""
    interval_s: Seconds = 1.0
    """file: how often its identity (inode, size, mtime) is looked at."""

    @model_validator(mode="after")
    def _kind(self) -> DiscoveryConfig:
        if self.type == "dns":
            if self.name is None:
                raise ValueError("name: required with type = \"dns\"")
            if self.record != "SRV" and self.port is None:
                raise ValueError(f"port: required with record = \"{self.record}\" (SRV "
                                 f"records carry their own)")
            if self.min_ttl_s > self.max_ttl_s:
                raise ValueError("min_ttl_s: above max_ttl_s")
            for r in self.resolvers:
                parse_resolver(r)
        elif self.path is None:
            raise ValueError("path: required with type = \"file\"")
        return self


def parse_resolver(value: str) -> tuple[str, int]:
    """``ip``, ``ip:port`` or ``[v6]:port`` of a DNS server -> (ip, port): an address, not a
    name (the resolver cannot need itself). lb.control.discovery asks these."""
    if _is_ip(value):
        return str(ipaddress.ip_address(value)), 53
    host, port = parse_hostport(value) if ":" in value else (value, 53)
    if not _is_ip(host):
        raise ValueError(f"resolvers: {value!r} is not an IP address (or ip:port)")
    return str(ipaddress.ip_address(host)), port


def _is_ip(v: str) -> bool:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return False
    return True


HASH_TABLE_MIN = 251
HASH_TABLE_MAX = 4_194_319
"""The largest lookup table the worker channel carries (base64 of 2-byte slots, 16 MiB
frames): 100 x 41,943 backends."""
HashOn = Annotated[str, Field(pattern=r"^(source_ip|uri|header:[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}"
                                      r"|cookie:[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64})$")]
"""``source_ip``, ``uri``, ``header:NAME`` or ``cookie:NAME`` (NAME an HTTP token)."""
CookieName = Annotated[str, Field(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}$")]


class PoolConfig(_Model):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    """Unique pool name, referenced by listeners."""
    balance: Balance = "round_robin"
    """Smooth weighted round robin (earliest deadline first: weights exact, no bursts), least
    in-flight per weight (exact; ties to the backend idle longest), or power of two choices.
    A pick costs O(log N) or O(1) in the pool's size."""
    backends: tuple[BackendConfig, ...] = ()
    """The pool's members from this file (at least one, unless ``[pool.discovery]`` finds
    them). Backends added at runtime (admin API, the peer) come on top: docs/elastic-pools.md."""
    discovery: DiscoveryConfig | None = None
    """See ``[pool.discovery]``: backends from DNS or a watched file, besides ``backends``."""
    drain_timeout_s: NonNegSeconds = 30.0
    """A backend removed at runtime (``DELETE /pools/{pool}/backends/{name}``) gets no new
    requests at once, and leaves when its requests in flight are done or after this long."""
    connect_timeout_s: Seconds = 2.0
    """Backend TCP connect deadline."""
    response_timeout_s: Seconds = 30.0
    """Time for the backend to start answering after the request is sent, and max gap between
    reads of its response."""
    exchange_timeout_s: NonNegSeconds = 300.0
    """Total time of one exchange on a backend connection, from the request's last byte sent
    to the response's end (a backend that answers one byte per response_timeout_s would hold
    it for ever). Past it: 504, or a cut connection once the response has begun. Time we are
    not reading the backend because the client is not reading us does not count. Raise it
    (or 0: no limit) for long-polling and streamed responses; WebSocket tunnels are not
    affected."""
    idle_timeout_s: Seconds = 30.0
    """Keep-alive backend connections idle longer than this are closed."""
    max_idle_per_backend: Annotated[int, Field(ge=0, le=10000)] = 64
    """Idle keep-alive connections kept per backend per worker."""
    retries: Annotated[int, Field(ge=0, le=10)] = 2
    """Other backends tried when connecting fails (no byte of the request sent yet)."""
    retry_on_timeout: bool = False
    """Also retry idempotent requests that timed out before any response byte."""
    slow_start_s: NonNegSeconds = 0.0
    """A backend that comes back ramps its weight from 5% to 100% over this time."""
    panic_percent: Annotated[int, Field(ge=0, le=100)] = 50
    """Below this share of usable backends the pool is in panic."""
    panic_mode: PanicMode = "spread"
    """In panic: ``spread`` over all enabled backends, or ``fail`` with 503."""
    health: HealthConfig = HealthConfig()
    """See ``[pool.health]``."""
    passive: PassiveConfig = PassiveConfig()
    """See ``[pool.passive]``."""
    tls: PoolTlsConfig | None = None
    """See ``[pool.tls]``: speak TLS to this pool's backends (requests and health checks)."""
    hash_on: HashOn = "source_ip"
    """With ``balance = "maglev"``: the request's key. ``source_ip`` (the client's address,
    after trusted proxies), ``header:NAME``, ``cookie:NAME`` or ``uri`` (the path, without the
    query). A request without the key is balanced round robin. TCP pools: ``source_ip``."""
    hash_table_size: Annotated[int, Field(ge=HASH_TABLE_MIN, le=HASH_TABLE_MAX)] | None = None
    """Maglev lookup table size (``balance = "maglev"``), a prime. Default: the smallest
    prime of a fixed ladder (65537, 131071, ...) above 100 x the pool's backends, so both
    nodes pick the same; a pool that crosses a step remaps most keys, so pin it for pools
    that grow at runtime."""
    sticky_cookie: CookieName | None = None
    """HTTP listeners (a TCP listener of the same pool ignores it): send a client back to
    the backend that answered it before, by a cookie of this name that pairlb sets (an
    opaque token of the backend's name, the same on both nodes). A sticky backend that is
    down, draining or gone is replaced, and the cookie reset."""
    send_proxy_protocol: Literal["off", "v1", "v2"] = "off"
    """Pools of ``mode = "tcp"`` listeners: start each backend connection with a PROXY
    protocol header carrying the client's address (the backend must expect it)."""

    @field_validator("hash_table_size")
    @classmethod
    def _prime(cls, v: int | None) -> int | None:
        if v is not None and not is_prime(v):
            raise ValueError(f"{v} is not a prime (Maglev needs one; e.g. 65537, 131071)")
        return v

    @model_validator(mode="after")
    def _hashing(self) -> PoolConfig:
        # By value, not by what was written: a full dump of a config validates again.
        # (hash_table_size is only read by maglev pools: harmless elsewhere.)
        if self.balance != "maglev" and self.hash_on != "source_ip":
            raise ValueError("hash_on needs balance = \"maglev\"")
        return self

    @model_validator(mode="after")
    def _unique_backends(self, info: ValidationInfo) -> PoolConfig:
        effective = bool((info.context or {}).get("effective"))
        if not self.backends and self.discovery is None and not effective:
            # The effective config (what workers get) may hold an emptied pool.
            raise ValueError("backends: at least one backend, or [pool.discovery]")
        seen: set[str] = set()
        for b in self.backends:
            if b.name in seen:
                raise ValueError(f"duplicate backend name {b.name!r}")
            seen.add(b.name)
            o = b.health
            if o is not None and (o.timeout_s is not None or o.interval_s is not None):
                # The pool's rule, on what this backend is really checked with.
                timeout = o.timeout_s if o.timeout_s is not None else self.health.timeout_s
                interval = o.interval_s if o.interval_s is not None else self.health.interval_s
                rule = CheckSpec.timeout_rule(timeout, interval)
                if rule is not None:
                    raise ValueError(f"backend {b.name!r}: health.timeout_s {rule}")
        return self


PASSIVE_DEFAULTS = PassiveConfig()
"""[pool.passive] when a pool says nothing. Its rules are written once, here: lb.data.pool
(each worker's own ejection, at once) and lb.control.rotation (the control process's, for
the whole node) default to these values, and take the configured ones from the config."""
SLOW_START_S_DEFAULT: float = PoolConfig.model_fields["slow_start_s"].default
PANIC_PERCENT_DEFAULT: int = PoolConfig.model_fields["panic_percent"].default
PANIC_MODE_DEFAULT: PanicMode = PoolConfig.model_fields["panic_mode"].default
"""The [[pool]] rules lb.control.rotation defaults to (a PoolConfig needs backends, so
they are read from its fields)."""


_FO: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(failover.FailoverSpec)
    if f.default is not dataclasses.MISSING
}
"""Defaults of the [failover] settings live in ``failover.FailoverSpec``, their bounds in
failover (PRIORITY_*, DOWN_AFTER_*, INTERVAL_*, ...); read from there."""
_LINK: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(failover_link.Spec)
    if f.default is not dataclasses.MISSING
}
"""Defaults of the failover process's own settings (GARP, scheduling, the control
timeout) live in lb.failoverd.link.Spec, which the failover process reads without loading
this module."""
DEFAULT_HEARTBEAT_INTERVAL_S: float = _FO["interval_s"]
"""The default heartbeat interval; demo, chaos and tests run on it."""


class FailoverConfig(_Model):
    interface: str
    """Interface the VIPs are added to (and whose carrier loss means FAULT)."""
    vips: Annotated[tuple[str, ...], Field(min_length=1)]
    """Virtual IPs with prefix length, IPv4 and/or IPv6."""
    priority: Annotated[
        int, Field(ge=failover.PRIORITY_MIN, le=failover.PRIORITY_MAX)
    ] = 100
    """Higher wins the election; ties go to the higher address. 0 is reserved for leaving."""
    peers: Annotated[tuple[str, ...], Field(min_length=1)]
    """Peer addresses (``ip`` or ``ip:port``); several addresses of one node count as one peer.
    Heartbeats from any other source address are dropped before their HMAC is computed
    (``unknown_source``): list every address a peer sends from (its ``bind``, or its primary
    address on that network), also with ``multicast_group``."""
    port: Annotated[int, Field(ge=1, le=65535)] = _FO["port"]
    """UDP port of heartbeats."""
    bind: str | None = None
    """Local address for heartbeats; default all addresses."""
    multicast_group: str | None = None
    """Also send heartbeats to this multicast group."""
    key_file: str = "/etc/pairlb/failover.key"
    """Shared HMAC key; must not be readable by group or others (``pairlb keygen``)."""
    key_files: tuple[str, ...] = ()
    """Key rotation: several key files, used instead of key_file (which, if set too, must be
    one of them). Heartbeats are signed with the first and accepted with any; a reload reads
    them again (docs/operations.md, "Rotating the failover key")."""
    max_clock_skew_s: Annotated[
        float, Field(ge=failover.CLOCK_SKEW_MIN_S, le=failover.CLOCK_SKEW_MAX_S)
    ] = _FO["max_clock_skew_s"]
    """How far a peer's clock may be from ours for its heartbeats to be heard after either
    node restarts (the anti-replay window; keep clocks in sync with NTP). pairlb measures
    each peer's offset and warns past half of this. A reload applies a change."""
    interval_s: Annotated[
        float, Field(ge=failover.INTERVAL_MIN_S, le=failover.INTERVAL_MAX_S)
    ] = DEFAULT_HEARTBEAT_INTERVAL_S
    """Heartbeat interval. The peer is declared dead after down_after x interval + skew
    (skew = (256 - priority)/256 x interval): ~0.11 s with the defaults."""
    down_after: Annotated[
        int, Field(ge=failover.DOWN_AFTER_MIN, le=failover.DOWN_AFTER_MAX)
    ] = _FO["down_after"]
    """Missed intervals (plus skew) before the peer is declared dead."""
    preempt: bool = _FO["preempt"]
    """Take the VIP back from a lower-priority MASTER."""
    preempt_delay_s: NonNegSeconds = _FO["preempt_delay_s"]
    """Preempt only after being healthy and better than the MASTER for this long."""
    track_interfaces: tuple[str, ...] = ()
    """Interfaces whose carrier loss means FAULT; the VIP interface is always tracked."""
    notify: tuple[str, ...] = ()
    """Scripts run in order on each transition: SCRIPT ROLE_FROM ROLE_TO NODE."""
    notify_timeout_s: Seconds = _FO["notify_timeout_s"]
    """A notify script running longer is killed."""
    garp_count: Annotated[int, Field(ge=1, le=100)] = _LINK["garp_count"]
    """Gratuitous ARPs / unsolicited NAs per burst."""
    garp_interval_s: NonNegSeconds = _LINK["garp_interval_s"]
    """Spacing inside a burst."""
    garp_repeat_after_s: NonNegSeconds = _LINK["garp_repeat_after_s"]
    """A second burst this long after taking the VIP (0: none)."""
    handover_forward_s: NonNegSeconds = _FO["handover_forward_s"]
    """After taking the VIP from a live peer, pass packets of the connections it still
    serves to it for this long, so a planned move resets none (needs nftables; 0: off)."""
    track_gateway: tuple[str, ...] = ()
    """Partition guard: targets this node must reach to hold the VIP, an address or a list:
    ``host:port`` (TCP connect; a refused connection counts as an answer) or ``arp:IPV4``
    (ARP on the VIP interface). While none answers, the node is in FAULT: it does not claim
    the VIP, and releases it if it holds it."""
    track_gateway_interval_s: Annotated[
        float, Field(ge=failover.TRACK_INTERVAL_MIN_S, le=failover.TRACK_MAX_S)
    ] = _FO["track_gateway_interval_s"]
    """How often the track_gateway targets are probed (all at once)."""
    track_gateway_timeout_s: Annotated[
        float, Field(gt=0, le=failover.TRACK_MAX_S)
    ] = _FO["track_gateway_timeout_s"]
    """A probe without an answer within this failed."""
    track_gateway_fall: Annotated[
        int, Field(ge=1, le=failover.TRACK_COUNT_MAX)
    ] = _FO["track_gateway_fall"]
    """Rounds in a row without any answer before the gateway counts as unreachable."""
    track_gateway_rise: Annotated[
        int, Field(ge=1, le=failover.TRACK_COUNT_MAX)
    ] = _FO["track_gateway_rise"]
    """Rounds in a row with an answer before it counts as reachable again (the first answer
    after start-up is enough)."""

    control_timeout_s: Annotated[float, Field(ge=1, le=3600)] = _LINK["control_timeout_s"]
    """The failover process (heartbeats, VIP) runs apart from the control process (checks,
    admin, metrics) and never waits for it; a control process silent this long makes the
    node count as unhealthy (a healthy peer takes the VIP; with none, the best node keeps
    it) until it answers again."""
    sched_priority: Annotated[int, Field(ge=0, le=99)] = _LINK["sched_priority"]
    """1..99: run the failover process SCHED_RR at this real-time priority (needs
    CAP_SYS_NICE or LimitRTPRIO=, and RestrictRealtime=no in the unit); 0: normal
    scheduling at ``nice``. Refused: one warning, then ``nice``."""
    nice: Annotated[int, Field(ge=-20, le=19)] = _LINK["nice"]
    """Niceness of the failover process under normal scheduling (lower is first). Below 0
    needs CAP_SYS_NICE or LimitNICE= (the shipped unit sets LimitNICE=-10); refused: one
    warning, and it runs at the control process's."""

    @field_validator("vips")
    @classmethod
    def _vips(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for vip in v:
            try:
                ipaddress.ip_interface(vip)
            except ValueError:
                raise ValueError(f"not an address/prefix: {vip!r}") from None
            if "/" not in vip:
                raise ValueError(f"VIP needs a prefix length, e.g. {vip}/24")
        return v

    @field_validator("peers")
    @classmethod
    def _peers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            try:
                failover.parse_peer(p)  # what the failover process will parse them with
            except ValueError as exc:
                raise ValueError(f"peer {p!r}: {exc}") from None
        return v

    @field_validator("track_gateway", mode="before")
    @classmethod
    def _one_target(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("track_gateway")
    @classmethod
    def _targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if v:
            from failover import parse_target

            for target in v:
                parse_target(target)
        return v

    @model_validator(mode="after")
    def _keys(self) -> FailoverConfig:
        if (self.key_files and "key_file" in self.model_fields_set
                and self.key_file not in self.key_files):
            raise ValueError(f"key_file {self.key_file!r} is not one of key_files: with "
                             f"key_files set, remove key_file or name one of them")
        if len(set(self.key_files)) != len(self.key_files):
            raise ValueError("key_files: the same file twice")
        return self

    @property
    def key_paths(self) -> tuple[str, ...]:
        """The key files in use, the signing one first."""
        return self.key_files or (self.key_file,)


BackendSeries = Literal["all", "unhealthy", "none"]
"""Per-backend series on /metrics (lb.admin.metrics.BACKEND_SERIES)."""


class AdminConfig(_Model):
    bind: str = "127.0.0.1:9900"
    """Address of the admin HTTP endpoint (status, metrics, actions)."""
    token_file: str | None = None
    """Bearer token for mutating endpoints; without it they are disabled."""
    enabled: bool = True
    """False: no admin endpoint at all."""
    allowed_hosts: tuple[str, ...] = ()
    """More Host header names the endpoint answers to (e.g. this node's DNS name), besides
    its bind address, ``localhost`` when bound to loopback, and any IP address when bound to
    a wildcard. Any other Host gets 421: a DNS-rebinding page cannot read /status."""
    metrics_backend_series: BackendSeries = "all"
    """Per-backend series on /metrics: ``all``; ``unhealthy`` (state gauges of backends not
    fully in service only); ``none``. Unless ``all``, counters, histograms and in-flight
    requests are summed per pool as ``backend="*"``. ``?backend_series=`` overrides it."""
    status_page_backends: Annotated[int, Field(ge=1, le=100000)] = 200
    """The status page (``GET /``) lists this many backends per pool at most (problems
    first); ``?pool=NAME&page=N`` pages through the rest."""

    @field_validator("bind")
    @classmethod
    def _bind(cls, v: str) -> str:
        parse_hostport(v)
        return v

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for h in v:
            bare = h[1:-1] if h.startswith("[") and h.endswith("]") else h
            try:
                ipaddress.ip_address(bare)
                continue
            except ValueError:
                pass
            if not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?", h):
                raise ValueError(f"not a host name or IP address (no port): {h!r}")
        return v


class LoggingConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Least severe level logged."""
    journald_prefix: Literal["auto", "always", "never"] = "auto"
    """'<N>' priority prefixes for journald; auto = when stderr is the journal."""
    access_log: Annotated[str, Field(pattern=r"^(stdout|/.+)$")] | None = None
    """One line per HTTP request (per connection in TCP mode): ``stdout`` or an absolute
    path every worker appends to (reopened on SIGUSR2 or POST /logs/reopen, for logrotate;
    docs/access-logs.md). Default: off."""
    access_log_format: Literal["json", "combined"] = "json"
    """``json`` (one object per line, every field) or Apache's ``combined`` plus pairlb's
    fields at the end."""
    access_log_buffer_bytes: Annotated[int, Field(ge=4096, le=1 << 30)] = 4 << 20
    """Per worker: lines waiting for a slow disk beyond this are dropped and counted
    (``pairlb_access_log_lines_total{outcome="dropped"}``); a worker never waits for its log."""


class SyncConfig(_Model):
    """Runtime pool changes between the nodes of a pair (lb.control.sync): a TCP channel
    beside the heartbeats, authenticated with a key derived from the failover key."""

    enabled: bool = True
    """With ``[failover]``: send runtime changes to the peer and take the peer's."""
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    """TCP port; default the heartbeats' port number (one firewall rule, two protocols)."""
    bind: str | None = None
    """Local address; default ``[failover] bind``, else every address."""
    op_timeout_s: Seconds = 1.0
    """How long an API change waits for the peer's answer before it says ``pending``."""


EFFECTIVE: dict[str, bool] = {"effective": True}
"""Validation context of the effective config (file + runtime changes) the control process
sends its workers: there a pool may be empty (every backend removed at runtime)."""


class Config(_Model):
    node: NodeConfig
    listener: Annotated[tuple[ListenerConfig, ...], Field(min_length=1)]
    pool: Annotated[tuple[PoolConfig, ...], Field(min_length=1)]
    failover: FailoverConfig | None = None
    sync: SyncConfig = SyncConfig()
    admin: AdminConfig = AdminConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _references(self) -> Config:
        pools = [p.name for p in self.pool]
        dup = {n for n in pools if pools.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate pool name(s): {sorted(dup)}")
        names = [lst.name for lst in self.listener]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate listener name(s): {sorted(dup)}")
        binds = [lst.host_port for lst in self.listener]
        if len(set(binds)) != len(binds):
            raise ValueError("two listeners bind the same address")
        for i, lst in enumerate(self.listener):
            if lst.pool not in pools:
                raise ValueError(f"listener[{i}].pool: no pool named {lst.pool!r} (pools: {pools})")
            for name in lst.pools:
                if name not in pools:
                    continue
                p = self.pool[pools.index(name)]
                if lst.mode == "http" and p.send_proxy_protocol != "off":
                    raise ValueError(f"pool {name!r}: send_proxy_protocol is for pools of "
                                     f"mode = \"tcp\" listeners; listener {lst.name!r} is "
                                     f"http (its backends get X-Forwarded-For)")
                if lst.mode == "tcp" and p.hash_on != "source_ip":
                    raise ValueError(f"pool {name!r}: listener {lst.name!r} is mode = "
                                     f"\"tcp\": hash_on can only be source_ip there")
            for j, r in enumerate(lst.sni_routes):
                if r.pool not in pools:
                    raise ValueError(f"listener[{i}].sni_routes[{j}].pool: no pool named "
                                     f"{r.pool!r} (pools: {pools})")
        return self

    def wire(self) -> dict[str, Any]:
        """The config as the control process sends it to a worker, which validates it again
        into this same config: what was written, not the defaults (validators that read
        which keys were set, such as [failover]'s key_file/key_files rule, see the same)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def pool_by_name(self, name: str) -> PoolConfig:
        for p in self.pool:
            if p.name == name:
                return p
        raise KeyError(name)

    def digest_bytes(self, n: int = 32) -> bytes:
        """Digest of what must match between peers (listeners and pools, not node identity)."""
        listener, pool, digest = self._digest_memo
        if listener is not self.listener or pool is not self.pool:  # a model_copy(update=)
            digest = self._compute_digest()
        return digest[:n]

    @functools.cached_property
    def _digest_memo(self) -> tuple[Any, Any, bytes]:
        # Once per config: dumping 3000 backends costs ~35 ms, and /status shows the digest.
        return self.listener, self.pool, self._compute_digest()

    def _compute_digest(self) -> bytes:
        doc = {
            "listener": [lst.model_dump(mode="json") for lst in self.listener],
            "pool": [p.model_dump(mode="json") for p in self.pool],
        }
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).digest()

    def digest(self) -> str:
        """Short hex form of digest_bytes for logs and the status API."""
        return self.digest_bytes(8).hex()


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _format_errors(exc: ValidationError) -> list[str]:
    errors = exc.errors(include_url=False)
    deeper = {tuple(e["loc"][:n]) for e in errors for n in range(len(e["loc"]))}
    lines = []
    for err in errors:
        # A list whose items failed is also reported "too short"; the item errors say why.
        if err["type"] == "too_short" and tuple(err["loc"]) in deeper:
            continue
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        value = err.get("input")
        if not loc and err["type"] == "value_error":
            lines.append(msg)  # a cross-reference rule: its message names the keys itself
            continue
        shown = "" if err["type"] == "missing" else f" (got {_short(value)})"
        lines.append(f"{_loc(loc)}: {msg}{shown}")
    return lines


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, (list, tuple)) and len(value) > 3:
        return f"a list of {len(value)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_config(data: dict[str, Any], source: str = "") -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc), source) from None


def loads(text: str, source: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"TOML syntax: {exc}"], source) from None
    return parse_config(data, source)


def load(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read: {exc.strerror}"], str(p)) from None
    except UnicodeDecodeError:
        raise ConfigError(["not UTF-8 text"], str(p)) from None
    return loads(text, str(p))


DEFAULT_CONFIG_TOML = """\
# pairlb's embedded default: one HTTP listener in front of three local backends.
[node]
name = "lb1"

[[listener]]
name = "web"
bind = "127.0.0.1:8080"
mode = "http"
pool = "web"

[[pool]]
name = "web"
balance = "round_robin"
backends = [
  { name = "web1", address = "127.0.0.1:9001" },
  { name = "web2", address = "127.0.0.1:9002", weight = 2 },
  { name = "web3", address = "127.0.0.1:9003" },
]
"""


_SECTIONS: tuple[tuple[str, type[_Model], str], ...] = (
    ("[node]", NodeConfig, "This node's identity and process model."),
    ("[[listener]]", ListenerConfig, "One per address to accept on."),
    ("[listener.tls]", ListenerTlsConfig, "Terminate TLS on the listener (docs/tls.md)."),
    ("listener tls certificates = [{...}]", CertificateConfig,
     "Each certificate of a TLS listener (inline tables)."),
    ("listener sni_routes = [{...}]", SniRoute,
     "TCP mode: where a connection goes by its ClientHello's server name (inline tables)."),
    ("[[pool]]", PoolConfig, "A set of backends and how to balance over them."),
    ("pool backends = [{...}]", BackendConfig, "Each backend of a pool (inline tables)."),
    ("[pool.health]", HealthConfig, "Active health checks of the pool's backends."),
    ("backend health = {...}", HealthOverride, "Per-backend overrides of [pool.health]."),
    ("[pool.passive]", PassiveConfig, "Passive checks: ejection on errors seen by the proxy."),
    ("[pool.tls]", PoolTlsConfig, "TLS to the pool's backends: requests and health checks."),
    ("[pool.discovery]", DiscoveryConfig,
     "Backends from DNS or a watched file, re-read at runtime (docs/elastic-pools.md)."),
    ("[failover]", FailoverConfig, "Heartbeats and the virtual IP. Omit for a single node."),
    ("[sync]", SyncConfig,
     "Runtime pool changes between the nodes of a pair (docs/elastic-pools.md)."),
    ("[admin]", AdminConfig, "The admin HTTP endpoint (status, metrics, actions)."),
    ("[logging]", LoggingConfig, ""),
)


def _type_name(tp: Any) -> str:
    """A type as an operator reads it: ``str | None``, ``tuple[str, ...]``, ``Literal[...]``
    (the constraints of Annotated types are printed beside it, from the field's metadata)."""
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "Literal[" + ", ".join(repr(a) for a in args) + "]"
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if tp is type(None):
        return "None"
    return str(getattr(tp, "__name__", tp))


_BOUND_SIGNS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"),
                ("min_length", "len>="), ("max_length", "len<="))
"""A field's bounds as the reference prints them (lengths too: node names' is failover's)."""


def reference_markdown() -> str:
    """The configuration reference (docs/configuration.md is this, checked by a test)."""
    out = []
    for title, model, blurb in _SECTIONS:
        out.append(f"### `{title}`\n")
        if blurb:
            out.append(blurb + "\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        for name, f in model.model_fields.items():
            if f.is_required():
                default = "required"
            else:
                d = f.get_default(call_default_factory=True)
                default = "-" if isinstance(d, _Model) else f"`{json.dumps(d)}`"
            meta = " ".join(
                f"{sign}{getattr(m, k)}"
                for m in f.metadata
                for k, sign in _BOUND_SIGNS
                if getattr(m, k, None) is not None
            )
            typ = _type_name(f.annotation).replace("|", "\\|")  # a pipe ends a table cell
            typ = typ if not meta else f"{typ} ({meta})"
            desc = (f.description or "").replace("\n", " ")
            out.append(f"| `{name}` | {typ} | {default} | {desc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--reference"]:
        print(reference_markdown())
