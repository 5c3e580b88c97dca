"""Active probes: one HTTP request or one TCP connect, labelled with an L4/L7 status.

Why not aiohttp here (DESIGN.md suggested it): its client hides the phase a failure happened
in. A total timeout raises the same ``TimeoutError`` whether the connect or the response
was slow, so L4_TIMEOUT and L7_TIMEOUT cannot be told apart without splitting the budget,
and a probe through ``ClientSession`` costs a session, a connector, a request and a response
object each time (or keep-alive reuse, which would hide a backend that no longer accepts new
connections). So each probe is a tiny ``asyncio.Protocol`` that sends one pre-formatted
``Connection: close`` request and feeds the answer to httptools (llhttp, already the data
plane's parser). It knows exactly when the connect finished, costs one transport and one
parser per probe, and returns as soon as the verdict is known: at the end of the headers
when no body check is asked for, or once the substring is seen in the first 64 KiB of body.

Rules every probe keeps:
- ``run()`` never raises except ``CancelledError``: every failure becomes a labelled
  :class:`CheckResult`. Network errors are expected and only labelled; any other exception
  is a bug, logged with its traceback and still returned as a failed result, so it shows up
  instead of killing the check loop.
- ``timeout_s`` is the whole budget, connect + request + response; the phase reached when it
  runs out picks L4_TIMEOUT or L7_TIMEOUT.
- Once connected, anything that is not a well-formed HTTP response (garbage, a close or reset
  before the response, oversized headers) is L7_BAD_RESPONSE.

Imports nothing from lb or failover.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httptools

from .state import CheckResult, CheckStatus, HealthConfigError

log = logging.getLogger(__name__)

__all__ = ["MAX_BODY_BYTES", "MAX_HEAD_BYTES", "HttpProbe", "Probe", "TcpProbe"]

MAX_BODY_BYTES = 64 * 1024  # body bytes searched for ``expect_body``
MAX_HEAD_BYTES = 64 * 1024  # bytes read before the headers must be complete

_ERRNO_RE = re.compile(r"\[Errno (\d+)\]")
_TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


class Probe(Protocol):
    """What the scheduler needs from a probe (tests may pass their own)."""

    async def run(self, host: str, port: int) -> CheckResult: ...


@dataclass(frozen=True, slots=True)
class TcpProbe:
    """Healthy when a TCP connection is accepted within ``timeout_s``."""

    timeout_s: float = 0.5

    def __post_init__(self) -> None:
        _check_timeout(self.timeout_s)

    async def run(self, host: str, port: int) -> CheckResult:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        transport: asyncio.BaseTransport | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                transport, _ = await loop.create_connection(asyncio.Protocol, host, port)
        except TimeoutError:
            return _result(loop, t0, CheckStatus.L4_TIMEOUT, None, "connect timeout")
        except (OSError, ValueError) as exc:
            return _result(loop, t0, *_connect_failure(exc))
        except Exception as exc:  # probe boundary: never raise (module docstring)
            log.exception("event=health_probe_bug probe=tcp host=%s port=%s", host, port)
            return _result(loop, t0, CheckStatus.L4_ERROR, None, _describe(exc))
        finally:
            if transport is not None:
                transport.close()
        return _result(loop, t0, CheckStatus.L4_OK, None, "")


@dataclass(frozen=True, slots=True)
class HttpProbe:
    """One HTTP/1.1 request; healthy on an expected status (and body substring).

    ``host`` is the Host header; None means the target's address (and port unless 80).
    ``expect_status`` is inclusive ranges, default 200-399 like HAProxy's ``httpchk``.
    """

    method: str = "GET"
    path: str = "/healthz"
    host: str | None = None
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)
    expect_body: str | None = None
    timeout_s: float = 0.5
    _needle: bytes | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_timeout(self.timeout_s)
        if not self.method or not set(self.method) <= _TOKEN_CHARS:
            raise HealthConfigError("method", self.method, "must be an HTTP token")
        if not self.path.startswith("/") or _has_ctl(self.path) or " " in self.path:
            raise HealthConfigError(
                "path", self.path, 'must start with "/" and hold no spaces or control characters'
            )
        if self.host is not None and (not self.host or _has_ctl(self.host)):
            raise HealthConfigError("host", self.host, "must be non-empty, no control characters")
        _check_status_ranges(self.expect_status)
        if self.expect_body is not None and not self.expect_body:
            raise HealthConfigError("expect_body", self.expect_body, "must be non-empty or unset")
        needle = None if self.expect_body is None else self.expect_body.encode()
        if needle is not None and len(needle) > MAX_BODY_BYTES:
            raise HealthConfigError(
                "expect_body", self.expect_body, f"must be at most {MAX_BODY_BYTES} bytes"
            )
        if needle is not None and self.method == "HEAD":
            raise HealthConfigError(
                "expect_body", self.expect_body, "needs a method other than HEAD"
            )
        object.__setattr__(self, "_needle", needle)

    def request_bytes(self, host: str, port: int) -> bytes:
        """The exact request sent to ``host:port`` (public so tests and docs can show it)."""
        if self.host is not None:
            authority = self.host
        else:
            authority = _bracket(host) if port == 80 else f"{_bracket(host)}:{port}"
        return (
            f"{self.method} {self.path} HTTP/1.1\r\n"
            f"Host: {authority}\r\n"
            "User-Agent: pairlb-healthcheck\r\n"
            "Accept: */*\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")

    async def run(self, host: str, port: int) -> CheckResult:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        transport: asyncio.Transport | None = None
        done: asyncio.Future[tuple[CheckStatus, int | None, str]] = loop.create_future()
        try:
            async with asyncio.timeout(self.timeout_s):
                transport, _ = await loop.create_connection(
                    lambda: _HttpProbeProtocol(done, self.expect_status, self._needle),
                    host,
                    port,
                )
                transport.write(self.request_bytes(host, port))
                status, code, detail = await done
        except TimeoutError:
            if transport is None:
                return _result(loop, t0, CheckStatus.L4_TIMEOUT, None, "connect timeout")
            return _result(loop, t0, CheckStatus.L7_TIMEOUT, None, "no response within timeout")
        except (OSError, ValueError) as exc:
            if transport is None:
                return _result(loop, t0, *_connect_failure(exc))
            return _result(loop, t0, CheckStatus.L7_BAD_RESPONSE, None, _describe(exc))
        except Exception as exc:  # probe boundary: never raise (module docstring)
            log.exception("event=health_probe_bug probe=http host=%s port=%s", host, port)
            status = CheckStatus.L4_ERROR if transport is None else CheckStatus.L7_BAD_RESPONSE
            return _result(loop, t0, status, None, _describe(exc))
        finally:
            if transport is not None:
                transport.close()
        return _result(loop, t0, status, code, detail)


class _HttpProbeProtocol(asyncio.Protocol):
    """Feeds the response to llhttp and resolves ``done`` with the verdict, once."""

    __slots__ = ("_body", "_code", "_done", "_expect", "_needle", "_parser", "_seen")

    def __init__(
        self,
        done: asyncio.Future[tuple[CheckStatus, int | None, str]],
        expect: tuple[tuple[int, int], ...],
        needle: bytes | None,
    ) -> None:
        self._done = done
        self._expect = expect
        self._needle = needle
        self._parser = httptools.HttpResponseParser(self)
        self._code: int | None = None  # set once a final (non-1xx) status line is parsed
        self._body = bytearray()
        self._seen = 0

    def _finish(self, status: CheckStatus, detail: str = "") -> None:
        if not self._done.done():
            self._done.set_result((status, self._code, detail))

    def data_received(self, data: bytes) -> None:
        if self._done.done():
            return
        self._seen += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._finish(CheckStatus.L7_BAD_RESPONSE, "unexpected protocol upgrade")
        except httptools.HttpParserError as exc:
            self._finish(CheckStatus.L7_BAD_RESPONSE, f"invalid HTTP response: {exc}")
        if self._code is None and self._seen > MAX_HEAD_BYTES:
            self._finish(CheckStatus.L7_BAD_RESPONSE, f"no complete headers in {self._seen} bytes")

    def eof_received(self) -> bool:
        self._closed("connection closed")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed("connection closed" if exc is None else f"connection lost: {exc}")

    def _closed(self, why: str) -> None:
        if self._code is None:
            self._finish(CheckStatus.L7_BAD_RESPONSE, f"{why} before response")
        else:  # a body delimited by the close ended: judge what arrived
            self._judge_body()

    # llhttp callbacks
    def on_headers_complete(self) -> None:
        if self._done.done():
            return
        code = self._parser.get_status_code()
        if 100 <= code < 200 and code != 101:
            return  # interim response (100 Continue, 103 Early Hints): the real one follows
        self._code = code
        if not any(lo <= code <= hi for lo, hi in self._expect):
            self._finish(CheckStatus.L7_STATUS, f"unexpected status {code}")
        elif self._needle is None:
            self._finish(CheckStatus.L7_OK)

    def on_body(self, body: bytes) -> None:
        if self._done.done() or self._code is None or self._needle is None:
            return
        start = max(0, len(self._body) - len(self._needle) + 1)
        self._body += body[: MAX_BODY_BYTES - len(self._body)]
        if self._body.find(self._needle, start) >= 0:
            self._finish(CheckStatus.L7_OK)
        elif len(self._body) >= MAX_BODY_BYTES:
            self._judge_body()

    def on_message_complete(self) -> None:
        if self._code is not None:
            self._judge_body()

    def _judge_body(self) -> None:
        if self._needle is None or self._needle in self._body:
            self._finish(CheckStatus.L7_OK)
        else:
            self._finish(
                CheckStatus.L7_BODY_MISMATCH,
                f"body substring not found in first {len(self._body)} bytes",
            )


def _result(
    loop: asyncio.AbstractEventLoop,
    t0: float,
    status: CheckStatus,
    code: int | None,
    detail: str,
) -> CheckResult:
    return CheckResult(status, loop.time() - t0, code, detail)


def _connect_failure(exc: BaseException) -> tuple[CheckStatus, None, str]:
    if isinstance(exc, ConnectionRefusedError) or _all_refused(exc):
        return CheckStatus.L4_REFUSED, None, "connection refused"
    return CheckStatus.L4_ERROR, None, _describe(exc)


def _all_refused(exc: BaseException) -> bool:
    """A name with several addresses fails with one OSError listing each attempt (3.11)."""
    msg = str(exc)
    if not msg.startswith("Multiple exceptions:"):
        return False
    errnos = _ERRNO_RE.findall(msg)
    return bool(errnos) and all(int(e) == errno.ECONNREFUSED for e in errnos)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _check_timeout(timeout_s: float) -> None:
    if not timeout_s > 0:
        raise HealthConfigError("timeout_s", timeout_s, "must be > 0")


def _check_status_ranges(ranges: Sequence[tuple[int, int]]) -> None:
    if not ranges:
        raise HealthConfigError("expect_status", ranges, "must list at least one range")
    for lo, hi in ranges:
        if not 100 <= lo <= hi <= 599:
            raise HealthConfigError(
                "expect_status", ranges, "each range must be [lo, hi] with 100 <= lo <= hi <= 599"
            )


def _has_ctl(s: str) -> bool:
    return any(ord(c) < 0x20 or ord(c) == 0x7F for c in s)


def _bracket(host: str) -> str:
    """IPv6 literals need brackets in Host; only they contain ':' (cheaper than parsing)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
