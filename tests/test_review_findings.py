"""Regressions for what an outside review of the hardening found (ring 1, pure)."""

from __future__ import annotations

import pytest

from lb.config import ConfigError, loads
from lb.data import headers
from lb.log import escape

VENDOR_FIELDS = [
    b"WL-Proxy-Client-IP", b"Proxy-Client-IP", b"X-ProxyUser-Ip", b"X-Envoy-External-Address",
    b"Remote-Addr", b"CloudFront-Viewer-Address", b"X-Appengine-User-Ip", b"X-Azure-ClientIP",
    b"X-Azure-SocketIP", b"X-Vercel-Forwarded-For", b"Z-Forwarded-For", b"X.Forwarded.For",
    b"X-Host", b"X-Original-URL", b"X-Rewrite-URL",
]


@pytest.mark.parametrize("name", VENDOR_FIELDS)
def test_vendor_client_address_and_routing_fields_are_not_plain(name: bytes) -> None:
    # Not plain: kept only from trusted proxies, like X-Real-IP (lb.data.headers).
    assert headers.field_kind(name) != headers.field_kind(b"X-Plain-Header")
    assert headers.field_kind(name) == headers.field_kind(b"X-Real-IP")


def test_a_literal_backslash_escape_cannot_pass_for_an_escaped_control() -> None:
    assert escape("a\nb") == "a\\nb"
    assert escape("a\\nb") == "a\\\\nb"  # a client's literal backslash-n
    assert escape("a\\nb") != escape("a\nb")
    assert escape("a\\x0ab") == "a\\\\x0ab"
    assert escape("plain") == "plain"


@pytest.mark.parametrize("value", ["inf", "1e400"])
def test_an_infinite_deadline_is_refused(value: str) -> None:
    text = (
        '[node]\nname = "a"\n[[listener]]\nname = "w"\nbind = "127.0.0.1:8080"\npool = "p"\n'
        f'[[pool]]\nname = "p"\nresponse_timeout_s = {value}\n'
        'backends = [{ name = "b", address = "127.0.0.1:9001" }]\n'
    )
    with pytest.raises(ConfigError) as exc:
        loads(text)
    assert any(e.startswith("pool[0].response_timeout_s:") for e in exc.value.errors)
