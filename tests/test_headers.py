"""Header rewriting (lb.data.headers): what the backend and the client get to see."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.data import headers as H


def lines(head: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for line in head.split(b"\r\n")[1:]:
        if line:
            n, _, v = line.partition(b": ")
            out.append((n, v))
    return out


def field(head: bytes, name: bytes) -> list[bytes]:
    return [v for n, v in lines(head) if n.lower() == name.lower()]


UNTRUSTED = H.ClientContext("203.0.113.7", trusted=False)
TRUSTED = H.ClientContext("10.0.0.2", trusted=True)


def build(hdrs: list[tuple[bytes, bytes]], ctx: H.ClientContext = UNTRUSTED, **kw: object) -> bytes:
    return H.build_request_head(b"GET", b"/p", hdrs, ctx, **kw).head  # type: ignore[arg-type]


def test_request_line_is_http11_and_host_kept() -> None:
    head = build([(b"Host", b"example.com")])
    assert head.startswith(b"GET /p HTTP/1.1\r\n")
    assert head.endswith(b"\r\n\r\n")
    assert field(head, b"host") == [b"example.com"]


def test_hop_by_hop_and_connection_named_fields_are_stripped() -> None:
    head = build([
        (b"Host", b"a"), (b"Connection", b"keep-alive, X-Secret, close"), (b"Keep-Alive", b"5"),
        (b"X-Secret", b"s"), (b"TE", b"trailers"), (b"Proxy-Connection", b"x"),
        (b"Trailer", b"X"), (b"Upgrade", b"h2c"), (b"X-Kept", b"k"),
    ])
    names = {n.lower() for n, _ in lines(head)}
    for gone in (b"connection", b"keep-alive", b"x-secret", b"te", b"proxy-connection",
                 b"trailer", b"upgrade"):
        assert gone not in names
    assert field(head, b"x-kept") == [b"k"]


def test_connection_cannot_remove_our_forwarding_fields() -> None:
    head = build([(b"Host", b"a"), (b"Connection", b"X-Forwarded-For, Via, Forwarded")])
    assert field(head, b"x-forwarded-for") == [b"203.0.113.7"]
    assert field(head, b"via") == [b"1.1 pairlb"]
    assert field(head, b"forwarded") == [b"for=203.0.113.7;proto=http"]


def test_untrusted_peer_forwarding_headers_replaced() -> None:
    head = build([
        (b"Host", b"a"), (b"X-Forwarded-For", b"1.2.3.4"), (b"Forwarded", b"for=1.2.3.4"),
        (b"X-Forwarded-Proto", b"https"), (b"X-Real-IP", b"1.2.3.4"),
        (b"X-Forwarded-Host", b"evil"),
    ])
    assert field(head, b"x-forwarded-for") == [b"203.0.113.7"]
    assert field(head, b"forwarded") == [b"for=203.0.113.7;proto=http"]
    assert field(head, b"x-forwarded-proto") == [b"http"]
    assert field(head, b"x-real-ip") == []
    assert field(head, b"x-forwarded-host") == []


def test_trusted_peer_forwarding_headers_appended() -> None:
    head = build(
        [(b"Host", b"a"), (b"X-Forwarded-For", b"1.2.3.4"), (b"X-Forwarded-For", b"5.6.7.8"),
         (b"Forwarded", b'for="[2001:db8::1]"'), (b"X-Forwarded-Proto", b"https")],
        TRUSTED,
    )
    assert field(head, b"x-forwarded-for") == [b"1.2.3.4, 5.6.7.8, 10.0.0.2"]
    assert field(head, b"forwarded") == [b'for="[2001:db8::1]", for=10.0.0.2;proto=http']
    assert field(head, b"x-forwarded-proto") == [b"https"]


def test_ipv6_client_quoted_in_forwarded() -> None:
    ctx = H.ClientContext("2001:db8::5", trusted=False)
    head = build([(b"Host", b"a")], ctx)
    assert field(head, b"forwarded") == [b'for="[2001:db8::5]";proto=http']
    assert field(head, b"x-forwarded-for") == [b"2001:db8::5"]


def test_trusted_proxies_cidrs() -> None:
    nets = H.parse_networks(("10.0.0.0/8", "2001:db8::/32"))
    assert H.is_trusted("10.1.2.3", nets)
    assert H.is_trusted("::ffff:10.1.2.3", nets)
    assert H.is_trusted("2001:db8::9", nets)
    assert not H.is_trusted("11.0.0.1", nets)
    assert not H.is_trusted("127.0.0.1", ())
    assert H.ClientContext.for_peer("10.9.9.9", ("10.0.0.0/8",)).trusted


def test_request_id_added_only_when_absent() -> None:
    head = build([(b"Host", b"a")], request_id=b"rid-1")
    assert field(head, b"x-request-id") == [b"rid-1"]
    head = build([(b"Host", b"a"), (b"X-Request-ID", b"mine")], request_id=b"rid-2")
    assert field(head, b"x-request-id") == [b"mine"]


def test_request_ids_unique() -> None:
    ids = H.RequestIds()
    got = {ids.next() for _ in range(1000)}
    assert len(got) == 1000
    assert H.RequestIds().next() != H.RequestIds().next()


def test_via_appended() -> None:
    head = build([(b"Host", b"a"), (b"Via", b"1.0 fred")])
    assert field(head, b"via") == [b"1.0 fred, 1.1 pairlb"]
    head = build([(b"Host", b"a")], via=False)
    assert field(head, b"via") == []
    head = build([], http10=True)
    assert field(head, b"via") == [b"1.0 pairlb"]


def test_host_rules() -> None:
    with pytest.raises(H.HeaderError) as e:
        build([])
    assert e.value.status == 400 and e.value.reason == "missing_host"
    with pytest.raises(H.HeaderError) as e:
        build([(b"Host", b"a"), (b"Host", b"b")])
    assert e.value.reason == "multiple_host"
    with pytest.raises(H.HeaderError) as e:
        build([(b"Host", b"a b")])
    assert e.value.reason == "bad_host"
    assert field(build([(b"Host", b"[::1]:8080")]), b"host") == [b"[::1]:8080"]
    # HTTP/1.0 without Host is fine.
    assert field(build([], http10=True), b"host") == []


@given(st.lists(st.binary(min_size=0, max_size=12), min_size=1, max_size=40))
def test_the_host_memo_answers_as_the_pattern_does(hosts: list[bytes]) -> None:
    for host in hosts + hosts:  # each twice: the second answer may come from the memo
        ok = H._HOST_RE.fullmatch(host) is not None
        try:
            got = field(build([(b"Host", host)]), b"host") == [host]
        except H.HeaderError as e:
            assert e.reason in ("bad_host", "bad_header_value"), e.reason
            got = False
        if e_free(host):
            assert got == ok, host
        assert host not in H._GOOD_HOSTS or ok  # a refused value is never remembered


def e_free(host: bytes) -> bool:
    """A Host value that no other check refuses first (build_request_head checks field
    values for CR, LF and NUL before the Host pattern)."""
    return not any(c in host for c in b"\r\n\0")


def test_the_host_memo_is_bounded_in_entries_and_bytes() -> None:
    for i in range(3 * H._GOOD_HOSTS_MAX):
        build([(b"Host", b"h%d.example" % i)])
        assert len(H._GOOD_HOSTS) <= H._GOOD_HOSTS_MAX
    # Long values (a client may send up to max_header_bytes) are checked every time and
    # never kept (the review: 1,023 Hosts of 30 KB kept 30 MB per worker).
    H._GOOD_HOSTS.clear()
    for i in range(50):
        host = b"%d." % i + b"a" * 30_000
        assert field(build([(b"Host", host)]), b"host") == [host]
    assert not H._GOOD_HOSTS
    ok = b"a" * H._GOOD_HOST_LEN
    build([(b"Host", ok)])
    assert ok in H._GOOD_HOSTS
    assert sum(map(len, H._GOOD_HOSTS)) <= H._GOOD_HOSTS_MAX * H._GOOD_HOST_LEN


def test_transfer_coding_rules() -> None:
    rh = H.build_request_head(b"POST", b"/", [(b"Host", b"a"), (b"Transfer-Encoding", b"Chunked ")],
                              UNTRUSTED)
    assert rh.chunked and field(rh.head, b"transfer-encoding") == [b"chunked"]
    with pytest.raises(H.HeaderError) as e:
        build([(b"Host", b"a"), (b"Transfer-Encoding", b"gzip, chunked")])
    assert e.value.status == 501


def test_expect() -> None:
    rh = H.build_request_head(b"PUT", b"/", [(b"Host", b"a"), (b"Expect", b"100-Continue")],
                              UNTRUSTED)
    assert rh.expect_continue
    with pytest.raises(H.HeaderError) as e:
        build([(b"Host", b"a"), (b"Expect", b"magic")])
    assert e.value.status == 417
    rh = H.build_request_head(b"PUT", b"/", [(b"Expect", b"100-continue")], UNTRUSTED, http10=True)
    assert not rh.expect_continue and field(rh.head, b"expect") == []


def test_upgrade_kept_for_upgrade_requests() -> None:
    head = build([(b"Host", b"a"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")],
                 upgrade=True)
    assert field(head, b"upgrade") == [b"websocket"]
    assert field(head, b"connection") == [b"upgrade"]


def test_absolute_form() -> None:
    assert H.split_absolute_form(b"http://x.test:81/a?b") == (b"x.test:81", b"/a?b")
    assert H.split_absolute_form(b"HTTPS://x.test") == (b"x.test", b"/")
    assert H.split_absolute_form(b"http://x.test?q") == (b"x.test", b"/?q")
    for bad in (b"ftp://x/", b"http://user@x/", b"http:///p", b"x.test/p"):
        with pytest.raises(H.HeaderError):
            H.split_absolute_form(bad)
    head = H.build_request_head(b"GET", b"/a", [(b"Host", b"other")], UNTRUSTED,
                                host_override=b"x.test").head
    assert field(head, b"host") == [b"x.test"]


def test_response_filter() -> None:
    rh = H.filter_response_headers([
        (b"Content-Length", b"5"), (b"Connection", b"close, X-Hop"), (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"), (b"Server", b"s"), (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
    ])
    assert rh.content_length == 5 and not rh.chunked and rh.te_value is None
    assert rh.fields == b"Content-Length: 5\r\nServer: s\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
    rh = H.filter_response_headers([(b"Transfer-Encoding", b"gzip, chunked")])
    assert rh.chunked and rh.te_value == b"gzip, chunked" and rh.fields == b""


def test_status_line() -> None:
    assert H.status_line(200, b"OK") == b"HTTP/1.1 200 OK\r\n"
    assert H.status_line(404, b"") == b"HTTP/1.1 404 Not Found\r\n"
    assert H.status_line(299, b"") == b"HTTP/1.1 299 \r\n"


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)


@given(st.lists(st.tuples(_token, _token), max_size=20), st.booleans())
def test_no_hop_by_hop_ever_forwarded(pairs: list[tuple[str, str]], trusted: bool) -> None:
    hdrs = [(n.encode(), v.encode()) for n, v in pairs] + [(b"Host", b"h")]
    ctx = TRUSTED if trusted else UNTRUSTED
    try:
        head = H.build_request_head(b"GET", b"/", hdrs, ctx).head
    except H.HeaderError:
        return
    names = [n.lower() for n, _ in lines(head)]
    assert not (set(names) & (H.HOP_BY_HOP - {b"transfer-encoding"}))
    assert names.count(b"x-forwarded-for") == 1
    assert names.count(b"host") == 1
    conn_named = {v.encode() for n, v in pairs if n == "connection"}
    protected = {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"forwarded", b"via",
                 b"x-request-id", b"content-length", b"transfer-encoding"}
    assert not (set(names) & (conn_named - protected))


class _Note:
    ua: bytes | None = None
    referer: bytes | None = None


@pytest.mark.parametrize("underscores", [False, True])
def test_user_agent_and_referer_noted_for_the_log_and_forwarded(underscores: bool) -> None:
    """The access log's User-Agent/Referer come from the one loop over the fields: the
    first of each (any case), forwarded unchanged; an underscore alias is neither noted nor
    treated as anything but an underscore name."""
    note = _Note()
    hdrs = [(b"Host", b"h"), (b"User_Agent", b"alias"), (b"uSeR-aGeNt", b"first"),
            (b"Referer", b"https://r/1"), (b"User-Agent", b"second"), (b"referer", b"r2")]
    head = H.build_request_head(b"GET", b"/p", hdrs, UNTRUSTED, note=note,
                                underscores=underscores).head
    assert (note.ua, note.referer) == (b"first", b"https://r/1")
    assert field(head, b"user-agent") == [b"first", b"second"]
    assert field(head, b"referer") == [b"https://r/1", b"r2"]
    assert field(head, b"user_agent") == ([b"alias"] if underscores else [])
    # Without a note (the log off) the same head.
    assert build(hdrs, underscores=underscores) == head
