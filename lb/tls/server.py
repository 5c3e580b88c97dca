"""The TLS side of one listener in a worker: the front context, the certificate table its SNI
callback switches to, handshake outcomes counted by reason, and a reload that swaps tables.

- The front context holds what every connection starts from (versions, ciphers, options,
  the ticket key) and no certificate; the SNI callback, which OpenSSL runs for every
  ClientHello (with or without SNI), switches the connection to the context of the chosen
  certificate. ALPN comes from that context.
- A reload builds new certificate contexts and swaps the table in one assignment: new
  connections get the new certificate, open ones keep theirs (their SSLObject holds its
  context).
- Handshake outcomes: neither asyncio nor uvloop tells the application a handshake failed,
  so the connection's SSLObject is a subclass whose ``do_handshake`` counts success per
  certificate and failure by reason; one abandoned before finishing (reset, EOF, timeout) is
  counted when it is collected. Reasons are a fixed set: metrics cardinality stays bounded.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Sequence
from typing import Any, Protocol

from lb.config import ListenerTlsConfig
from lb.stats import Stats
from lb.tls import contexts, ticketkeys
from lb.tls.files import CertBundle
from lb.tls.names import NameTable

logger = logging.getLogger(__name__)

FAILURE_REASONS = (
    "protocol_version", "no_shared_cipher", "http_request", "not_tls", "client_alert",
    "aborted_before_hello", "aborted", "timeout", "other",
)
"""Every ``reason`` of pairlb_tls_handshake_failures_total."""

_REASONS = {
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "VERSION_TOO_LOW": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "NO_SHARED_GROUPS": "no_shared_cipher",
    "HTTP_REQUEST": "http_request",
    "HTTPS_PROXY_REQUEST": "http_request",
    "WRONG_VERSION_NUMBER": "not_tls",
    "UNKNOWN_PROTOCOL": "not_tls",
    "RECORD_LAYER_FAILURE": "not_tls",
    "PACKET_LENGTH_TOO_LONG": "not_tls",
}


def failure_reason(exc: BaseException) -> str:
    """One of FAILURE_REASONS for an exception a server handshake raised."""
    if isinstance(exc, ssl.SSLError):
        r = exc.reason or ""
        if r in _REASONS:
            return _REASONS[r]
        if r.startswith(("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")):
            return "client_alert"
        return "other"
    return "aborted"


class HandshakeHooks(Protocol):
    """Told when a connection's handshake starts and ends (the listener counts connections
    still in their handshake against max_connections: the loop reports a TLS connection to
    its protocol only once the handshake is done)."""

    def handshake_started(self) -> None: ...
    def handshake_ended(self) -> None: ...


def counting_class(listener: str, stats: Stats, timeout_s: float,
                   owner: ListenerTls | None = None) -> type[ssl.SSLObject]:
    """An SSLObject subclass counting this listener's handshakes into ``stats`` (and telling
    ``owner.hooks``, when set, that one started and ended)."""
    late = timeout_s * 0.95

    class Counted(ssl.SSLObject):
        # Class attributes as defaults: nothing per connection until they change.
        _t0 = 0.0
        _done = False
        _hooks: HandshakeHooks | None = None
        hello = False
        """Set by the SNI callback: the ClientHello arrived."""

        def do_handshake(self) -> None:
            if not self._t0:
                self._t0 = time.monotonic()
                hooks = owner.hooks if owner is not None else None
                if hooks is not None:
                    self._hooks = hooks
                    hooks.handshake_started()
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except OSError as exc:  # SSLError is one
                self._finish()
                stats.tls_failure(listener, failure_reason(exc))
                raise
            self._finish()
            ctx = self.context
            stats.tls_handshake(listener, getattr(ctx, "cert_id", ""), self.session_reused)

        def _finish(self) -> None:
            self._done = True
            hooks = self._hooks
            if hooks is not None:
                self._hooks = None
                hooks.handshake_ended()

        def __del__(self) -> None:
            if self._t0 and not self._done:
                if time.monotonic() - self._t0 >= late:
                    reason = "timeout"
                else:
                    reason = "aborted" if self.hello else "aborted_before_hello"
                stats.tls_failure_late(listener, reason)
                self._finish()

    Counted.__name__ = Counted.__qualname__ = "CountedSSLObject"
    return Counted


class ListenerTls:
    """One TLS listener's contexts in one worker."""

    def __init__(self, listener: str, settings: ListenerTlsConfig, stats: Stats) -> None:
        self.listener = listener
        self.stats = stats
        self.settings = settings
        self.front = contexts.server_context(
            settings.min_version, settings.ciphers, settings.session_tickets)
        self.front.sni_callback = self._sni
        self.hooks: HandshakeHooks | None = None
        """The listener's server in this worker (set when it starts)."""
        self.front.sslobject_class = counting_class(
            listener, stats, settings.handshake_timeout_s, self)
        self.table: NameTable[contexts.CertContext] | None = None
        self.bundles: tuple[CertBundle, ...] = ()
        self._built: dict[tuple[CertBundle, tuple[str, ...]], contexts.CertContext] = {}
        self.ticket_key_shared = False

    def _sni(self, sslobj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        # Must never raise: an exception here fails the handshake with an internal error.
        try:
            sslobj.hello = True
            table = self.table
            if table is not None:
                sslobj.context = table.lookup(server_name)
        except Exception:
            logger.exception("event=tls_sni_callback_failed listener=%s", self.listener)
        return None

    def load(self, bundles: Sequence[CertBundle]) -> None:
        """Build the certificate contexts, then swap them in (all or nothing). A bundle
        unchanged since the last load keeps its context (a renewal of one certificate
        among a thousand builds one)."""
        if not bundles:
            raise ValueError("no certificate")
        alpn = tuple(self.settings.alpn)
        built = []
        for b in bundles:
            ctx = self._built.get((b, alpn))
            if ctx is None:
                ctx = contexts.cert_context(b.pem, b.cert_id, alpn)
            built.append((b, ctx))
        self.table = NameTable(built[0][1], ((b.names, c) for b, c in built))
        self.bundles = tuple(bundles)
        self._built = {(b, alpn): c for b, c in built}

    def apply(self, settings: ListenerTlsConfig) -> None:
        """New settings for new connections (open ones keep what they negotiated). Checked
        on a scratch context first: a setting OpenSSL refuses changes nothing."""
        if settings == self.settings:
            return
        contexts.server_context(settings.min_version, settings.ciphers,
                                settings.session_tickets)  # raises before any change
        front = self.front
        front.set_ciphers(settings.ciphers)
        front.minimum_version = contexts.VERSIONS[settings.min_version]
        if settings.session_tickets:
            front.options &= ~ssl.OP_NO_TICKET
            front.num_tickets = 1
        else:
            front.options |= ssl.OP_NO_TICKET
            front.num_tickets = 0
        front.sslobject_class = counting_class(
            self.listener, self.stats, settings.handshake_timeout_s, self)
        alpn_changed = settings.alpn != self.settings.alpn
        self.settings = settings
        if alpn_changed and self.bundles:
            self.load(self.bundles)  # ALPN is read from the certificate contexts

    def set_ticket_key(self, key: bytes | None) -> None:
        """Share the session ticket key (None: OpenSSL's own key, this worker only)."""
        self.ticket_key_shared = False
        if key is None or not self.settings.session_tickets:
            return
        try:
            ticketkeys.set_ticket_key(self.front, key)
        except (ticketkeys.TicketKeyUnsupported, OSError, ValueError, TypeError) as exc:
            logger.warning("event=tls_ticket_key_unsupported listener=%s reason=%r "
                           "effect=%r", self.listener, str(exc),
                           "clients resume only on the worker that issued their ticket")
            return
        self.ticket_key_shared = True


__all__ = ["FAILURE_REASONS", "ListenerTls", "counting_class", "failure_reason"]
