"""Fuzz ring: hypothesis drives the proxy's request state machine, in memory.

The real engine (``lb.data.proxy``: ``_Client``, ``_Upstream``, ``ProxyServer``, llhttp via
httptools) runs on fake transports and a fake clock, so an example costs about a
millisecond and hypothesis can try thousands: random bytes, and streams of valid requests
(Content-Length and chunked bodies, chunk extensions, trailers, pipelining, HTTP/1.0,
Connection: close) mutated byte by byte, each split at random points into reads. Backends
are strict llhttp parsers that answer every request they receive in one of several shapes
(Content-Length, chunked, 204, Connection: close, close-delimited).

What must hold for every stream:

- no exception escapes the engine's callbacks;
- every request that reaches a backend parses there (strict), has one Host, never both
  Content-Length and Transfer-Encoding, no header name with ``_``, and is, in order, one of
  the requests the client sent (same method, path and body, as an independent strict parse
  of the client's bytes reads them): nothing invented, reordered or smuggled;
- the client gets, in order, one answer per forwarded request and at most one answer of the
  proxy's own after them; a stream the reference parser calls malformed gets a 4xx/5xx
  (400-505, never a 502-504) with ``Connection: close``, unless the connection had already
  ended by the rules (Connection: close, HTTP/1.0, a refused upgrade, a close-delimited
  response);
- what the engine holds per connection stays bounded (URL, header list, queue, buffered
  body, framing excess, unparsed backlog) whatever the stream.

CI runs a bounded number of examples (a few seconds). A longer run:

    PAIRLB_FUZZ=long .venv/bin/python -m pytest -q tests/test_fuzz_proxy_requests.py

(``PAIRLB_FUZZ_EXAMPLES=N`` sets the number of examples per test for either profile.)
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proxy_helpers import FakeLoop, FakeTransport

from lb.config import ListenerConfig, PoolConfig
from lb.data import headers as H
from lb.data import proxy as P
from lb.data.pool import build_pool
from lb.stats import Stats

LONG = os.environ.get("PAIRLB_FUZZ") == "long"
EXAMPLES = int(os.environ.get("PAIRLB_FUZZ_EXAMPLES", "20000" if LONG else "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None if LONG else 2000,
    database=None,
    derandomize=not LONG,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

LIMITS = {
    "max_request_line_bytes": 256,
    "max_header_bytes": 512,
    "max_headers": 12,
    "max_body_bytes": 2000,
}
PROXY_STATUSES = {400, 405, 408, 413, 414, 417, 431, 501, 505}


# -- the fake world ------------------------------------------------------------------------------


class Backend:
    """A strict HTTP/1.1 server on one upstream connection: records each request, answers."""

    def __init__(self, world: World, transport: FakeTransport) -> None:
        self.world = world
        self.t = transport
        self.parser = httptools.HttpRequestParser(self)
        self.fed = 0
        self.url = b""
        self.hdrs: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.answers: deque[bytes | None] = deque()  # None: close the connection
        self.dead = False

    def on_message_begin(self) -> None:
        self.url = b""
        self.hdrs = []
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.hdrs.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        w = self.world
        w.forwarded.append((method, self.url, list(self.hdrs), bytes(self.body)))
        n = len(w.forwarded)
        shape = w.shapes[(n - 1) % len(w.shapes)]
        tag = b"#%d" % n
        if method == b"HEAD" or shape == "204":
            self.answers.append(b"HTTP/1.1 204 No Content\r\nX-N: " + tag + b"\r\n\r\n")
        elif shape == "chunked":
            self.answers.append(b"HTTP/1.1 200 OK\r\nX-N: " + tag
                                + b"\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        elif shape == "close":
            self.answers.append(b"HTTP/1.1 200 OK\r\nX-N: " + tag
                                + b"\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
            self.answers.append(None)
        elif shape == "eof":
            self.answers.append(b"HTTP/1.1 200 OK\r\nX-N: " + tag + b"\r\n\r\nuntil eof")
            self.answers.append(None)
        else:
            self.answers.append(b"HTTP/1.1 200 OK\r\nX-N: " + tag
                                + b"\r\nContent-Length: 2\r\n\r\nok")

    def step(self) -> bool:
        """Read what the proxy wrote; deliver one queued answer. True when something moved."""
        moved = False
        if self.dead:
            return False
        if len(self.t.out) > self.fed:
            data = bytes(self.t.out[self.fed:])
            self.fed = len(self.t.out)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                self.world.backend_errors.append(f"{exc!r} after {data[:200]!r}")
                self.dead = True
                return True
            moved = True
        if self.answers and not self.t.closed:
            ans = self.answers.popleft()
            up = self.t.proto
            if ans is None:
                self.dead = True
                up.eof_received()
                self.t.closed = True
            else:
                up.data_received(ans)
            moved = True
        return moved


class World:
    def __init__(self, listener: dict[str, Any], shapes: list[str]) -> None:
        self.loop = FakeLoop()
        lcfg = ListenerConfig.model_validate(
            {"name": "l", "bind": "127.0.0.1:1", "pool": "p", **listener})
        pcfg = PoolConfig.model_validate(
            {"name": "p", "backends": [{"name": "b1", "address": "127.0.0.1:9"}],
             "passive": {"enabled": False}})
        pool = build_pool("p", "round_robin", [("b1", "127.0.0.1", 9, 1.0)], seed=1)
        self.srv = P.ProxyServer(lcfg, pool, pcfg, Stats(), loop=self.loop)
        self.srv.open_upstream = self._connect
        self.shapes = shapes
        self.forwarded: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = []
        self.backend_errors: list[str] = []
        self.backends: list[Backend] = []
        self.transports: list[FakeTransport] = []
        self.reads: list[bytes] = []
        self.client = P._Client(self.srv)
        self.ct = FakeTransport(self.client)
        self.transports.append(self.ct)
        self.client.connection_made(self.ct)
        self.max_seen = {"url": 0, "hdrs": 0, "queue": 0, "pending": 0, "framing": 0,
                         "backlog": 0}

    def _connect(self, req: Any, client: Any, backend: Any, gen: int) -> None:
        self.loop.call_soon(self._connected, req, client, backend, gen)

    def _connected(self, req: Any, client: Any, backend: Any, gen: int) -> None:
        up = P._Upstream(self.srv, (backend.host, backend.port))
        t = FakeTransport(up)
        self.transports.append(t)
        up.connection_made(t)
        self.backends.append(Backend(self, t))
        if req.conn_gen == gen and req.backend is backend and not req.finished:
            up.attach(req, client, self.srv.time())
        else:
            self.srv.put_idle(up)
        self.srv.flush()

    def pump(self) -> None:
        for _ in range(100000):
            moved = False
            while self.loop.ready:
                cb, args = self.loop.ready.popleft()
                cb(*args)
                moved = True
            for be in list(self.backends):
                moved = be.step() or moved
            for t in self.transports:
                if t.closed and not t.lost:
                    t.lost = True
                    t.proto.connection_lost(None)
                    moved = True
            if not moved:
                return
        raise AssertionError("the engine never settles")

    def observe(self) -> None:
        c = self.client
        m = self.max_seen
        m["url"] = max(m["url"], len(c.url))
        m["hdrs"] = max(m["hdrs"], sum(len(n) + len(v) for n, v in c.hdrs))
        m["queue"] = max(m["queue"], len(c.queue))
        m["pending"] = max(m["pending"], max((r.pending_bytes for r in c.queue), default=0))
        m["framing"] = max(m["framing"], c.framing)
        m["backlog"] = max(m["backlog"], len(c.backlog or b""))

    def run(self, reads: list[bytes]) -> None:
        pending = deque(reads)
        while pending:
            self.pump()
            if self.ct.lost:
                return
            if self.ct.paused:
                # Reading paused (a request waits its turn, a refusal is due): the peer's
                # bytes stay in the kernel until the engine resumes. Let time pass.
                self.tick()
                if self.ct.paused:
                    break
                continue
            self.client.data_received(pending.popleft())
            self.observe()
        for _ in range(6):  # let every timer fire: header, body, idle, linger
            self.pump()
            if self.ct.lost:
                return
            self.tick()

    def tick(self) -> None:
        self.loop.now += 400.0  # past every timeout of the listener and pool
        self.srv._tick()
        self.pump()


# -- the reference: an independent strict parse of what the client sent ---------------------------


class Reference:
    """What llhttp makes of the whole client stream: complete requests, then why it stopped."""

    def __init__(self, data: bytes) -> None:
        self.requests: list[tuple[bytes, bytes, bytes, bool]] = []
        self.url = b""
        self.body = bytearray()
        self.parser = httptools.HttpRequestParser(self)
        self.error = False
        self.ended = False  # stopped by the rules: upgrade, or the connection's last request
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.ended = True
        except httptools.HttpParserError:
            self.error = True
        if self.requests and not self.requests[-1][3]:
            self.ended = True

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.requests.append((self.parser.get_method(), self.url, bytes(self.body),
                              self.parser.should_keep_alive()))


def client_responses(raw: bytes) -> tuple[list[tuple[int, bool]], bool]:
    """(status, keep-alive) of each response head the client got (a close-delimited body has
    no end to parse: its head counts); and whether the bytes parsed."""
    out: list[tuple[int, bool]] = []

    class Col:
        def on_headers_complete(self) -> None:
            out.append((parser.get_status_code(), parser.should_keep_alive()))

    parser = httptools.HttpResponseParser(Col())
    try:
        parser.feed_data(raw)
    except httptools.HttpParserError:
        return out, False
    return out, True


# -- assertions ---------------------------------------------------------------------------------


def check(world: World, data: bytes) -> None:
    # Backends: strict, one Host, one framing, no underscores (unless the listener passes
    # them), and only what the client sent.
    assert world.backend_errors == []
    ref = Reference(data)
    assert len(world.forwarded) <= len(ref.requests), (world.forwarded, ref.requests)
    for (method, url, hdrs, body), (rmethod, rurl, rbody, _) in zip(
            world.forwarded, ref.requests, strict=False):
        names = [n.lower() for n, _ in hdrs]
        assert names.count(b"host") == 1, hdrs
        assert not (b"content-length" in names and b"transfer-encoding" in names), hdrs
        if not world.srv.pass_underscores:  # underscores_in_headers = "pass" passes them
            assert not [n for n in names if b"_" in n], hdrs
        assert method == rmethod
        assert body == rbody, (body, rbody)
        if rurl[:1] == b"/" or rurl == b"*":
            assert url == rurl
        else:
            assert url == H.split_absolute_form(rurl)[1]
    # The client: one answer per forwarded request, in order, then at most one of ours.
    raw = bytes(world.ct.out)
    got, parsed = client_responses(raw)
    assert parsed, raw[-300:]
    n = len(world.forwarded)
    assert len(got) >= n, (got, raw[-300:])
    answered, extra = got[:n], got[n:]
    for i, (status, _) in enumerate(answered):
        assert status in (200, 204), (i, status, raw[:500])
    assert len(extra) <= 1, (extra, raw[-500:])
    if extra:
        status, keep = extra[0]
        assert status in PROXY_STATUSES, status
        assert not keep  # Connection: close
    # A stream llhttp calls malformed, or a request llhttp accepts but pairlb did not forward,
    # gets a refusal, unless the connection had ended by the rules before (every such end
    # is an answer with Connection: close: the client's close or HTTP/1.0, a refused
    # upgrade, a close-delimited response).
    closed_early = any(not keep for _, keep in answered)
    if not closed_early and (n < len(ref.requests) or (ref.error and not ref.ended)):
        assert extra, ("not refused", data[:300], raw[-300:])
    # Bounded state.
    m = world.max_seen
    lst = world.srv.listener
    assert m["url"] <= lst.max_request_line_bytes + P.FEED_SLICE
    assert m["hdrs"] <= lst.max_header_bytes + lst.max_request_line_bytes + 2 * P.FEED_SLICE
    assert m["queue"] <= P.PIPELINE_MAX + 1
    assert m["pending"] <= P.BODY_BUFFER_LIMIT + 2 * P.FEED_SLICE
    assert m["framing"] <= lst.max_header_bytes
    assert m["backlog"] <= max((len(r) for r in world.reads), default=0)
    # The connection always ends (timers, linger), and nothing in flight is left behind.
    assert world.ct.lost
    assert world.srv.pool.backends[0].in_flight == 0
    assert not world.srv.clients


# -- strategies ---------------------------------------------------------------------------------

TOKENS = [b"\r\n", b"\n", b"\r", b":", b" ", b"\t", b"\x00", b"\x7f", b"\xff", b";", b",",
          b"\r\n\r\n", b"0\r\n\r\n", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n",
          b"Content-Length: -1\r\n", b"Transfer-Encoding: gzip, chunked\r\n", b"Host: a\r\n",
          b"Connection: close\r\n", b"Expect: 100-continue\r\n", b"X_Forwarded_For: 6\r\n",
          b"Upgrade: websocket\r\nConnection: upgrade\r\n", b"HTTP/1.1", b"HTTP/1.0", b"GET ",
          b"POST ", b"HEAD ", b"CONNECT ", b"http://h/", b"*", b"fffffffffffffffff\r\n",
          b" chunked", b"Content-Length: 0\r\n"]


@st.composite
def chunked_body(draw: st.DrawFn) -> bytes:
    out = []
    for _ in range(draw(st.integers(0, 4))):
        data = draw(st.binary(min_size=1, max_size=40))
        ext = draw(st.sampled_from([b"", b";a=b", b";n", b";q=\"x y\"", b";long="]))
        if ext == b";long=":
            ext += b"x" * draw(st.integers(1, 1500))
        size = b"%x" % len(data)
        if draw(st.booleans()):
            size = size.upper()
        out.append(size + ext + b"\r\n" + data + b"\r\n")
    out.append(b"0\r\n")
    for i in range(draw(st.integers(0, 2))):
        value = draw(st.sampled_from([b"v", b"", b"a b", b"long"]))
        if value == b"long":
            value = b"t" * draw(st.integers(1, 1500))
        out.append(b"X-Trailer-%d: %s\r\n" % (i, value))
    out.append(b"\r\n")
    return b"".join(out)


@st.composite
def request(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
                                   b"HEAD"]))
    target = draw(st.sampled_from([b"/", b"/a/b?c=d", b"/x%20y", b"http://h.test/abs?q",
                                   b"*" if method == b"OPTIONS" else b"/o"]))
    version = draw(st.sampled_from([b"HTTP/1.1"] * 5 + [b"HTTP/1.0"]))
    hdrs = [b"Host: " + draw(st.sampled_from([b"a.test", b"b.test:8080", b"[::1]:80"]))]
    for extra in draw(st.lists(st.sampled_from([
            b"User-Agent: fuzz/1", b"X-Custom: v", b"Accept: */*", b"Connection: keep-alive",
            b"Connection: close", b"X-Forwarded-For: 1.2.3.4", b"X_Real_IP: 6.6.6.6",
            b"Expect: 100-continue", b"Forwarded: for=1.2.3.4", b"Cookie: a=b; c=d",
            b"Via: 1.0 other", b"TE: trailers"]), max_size=4)):
        hdrs.append(extra)
    framing = draw(st.sampled_from(["none", "cl", "chunked"]))
    body = b""
    if framing == "cl":
        body = draw(st.binary(max_size=120))
        hdrs.append(b"Content-Length: %d" % len(body))
    elif framing == "chunked" and version == b"HTTP/1.1":
        hdrs.append(b"Transfer-Encoding: chunked")
        body = draw(chunked_body())
    order = draw(st.permutations(hdrs))
    return method + b" " + target + b" " + version + b"\r\n" + b"\r\n".join(order) \
        + b"\r\n\r\n" + body


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "token", "token", "repeat"]))
        i = draw(st.integers(0, len(b)))
        if op == "flip" and b:
            b[min(i, len(b) - 1)] = draw(st.integers(0, 255))
        elif op == "insert":
            b[i:i] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete":
            del b[i:i + draw(st.integers(1, 8))]
        elif op == "token":
            b[i:i] = draw(st.sampled_from(TOKENS))
        else:  # a long run: an endless line, a huge chunk extension or trailer value
            b[i:i] = draw(st.sampled_from([b"a", b"0", b";", b" "])) * draw(
                st.integers(200, 3000))
    return bytes(b)


@st.composite
def stream(draw: st.DrawFn, kind: str) -> tuple[bytes, list[bytes]]:
    if kind == "random":
        soup = st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=6)),
                        max_size=40).map(b"".join)
        data = draw(st.one_of(
            st.binary(max_size=600),
            soup,
            st.tuples(st.sampled_from([b"GET / HTTP/1.1\r\n", b"POST /p HTTP/1.1\r\nHost: a\r\n",
                                       b"PUT /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: "
                                       b"chunked\r\n\r\n"]), soup).map(b"".join)))
    else:
        valid = b"".join(draw(st.lists(request(), min_size=1, max_size=4)))
        data = draw(mutated(valid))
        if data and draw(st.integers(0, 3)) == 0:
            data = data[:draw(st.integers(1, len(data)))]  # the client stops half-way
    if not data:
        return data, []
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=8))))
    reads = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=False) if b > a]
    return data, reads


SHAPES = st.lists(st.sampled_from(["cl", "cl", "chunked", "204", "close", "eof"]),
                  min_size=1, max_size=4)
LISTENERS = st.sampled_from([LIMITS, {}, {**LIMITS, "underscores_in_headers": "pass"}])


def fuzz_once(data: bytes, reads: list[bytes], shapes: list[str],
              listener: dict[str, Any]) -> World:
    world = World(listener, shapes)
    world.reads = reads
    world.run(reads)
    check(world, data)
    return world


@FUZZ
@given(stream("random"), SHAPES, LISTENERS)
def test_random_byte_streams(s: tuple[bytes, list[bytes]], shapes: list[str],
                             listener: dict[str, Any]) -> None:
    fuzz_once(s[0], s[1], shapes, listener)


@FUZZ
@given(stream("mutated"), SHAPES, LISTENERS)
def test_mutated_valid_request_streams(s: tuple[bytes, list[bytes]], shapes: list[str],
                                       listener: dict[str, Any]) -> None:
    fuzz_once(s[0], s[1], shapes, listener)


@pytest.mark.parametrize("reads", [
    [b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"],
    [b"POST /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;e=1\r\nhel",
     b"lo\r\n0\r\nX-T: v\r\n\r\nGET /n HTTP/1.1\r\nHost: a\r\n\r\n"],
    [b"GET /c HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /x HTTP/1.1\r\n\r\n"],
])
def test_the_harness_sees_valid_streams_through(reads: list[bytes]) -> None:
    """The harness itself: valid streams are forwarded whole and answered."""
    data = b"".join(reads)
    world = fuzz_once(data, reads, ["cl"], {})
    ref = Reference(data)
    assert [f[0] for f in world.forwarded] == [r[0] for r in ref.requests]
    assert world.forwarded and all(f[3] == r[2] for f, r in zip(
        world.forwarded, ref.requests, strict=True))
