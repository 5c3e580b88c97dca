"""lb.control.discovery, the parts without a network: names from addresses, SRV rules, TTL
clamping and jitter, the file format (with hostile content), specs, and the runner's
keep-the-last-good-set rules driven by a scripted source."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import random
import re

import pytest

from lb.control import discovery as d

pytestmark = pytest.mark.timeout(30)

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


# -- names ------------------------------------------------------------------------------


@pytest.mark.parametrize("host,port,name", [
    ("10.0.0.4", 8080, "10.0.0.4_8080"),
    ("fd00::1", 80, "fd00--1_80"),
    ("FD00:0:0::1", 80, "fd00--1_80"),
    ("2001:db8::a:b", 443, "2001-db8--a-b_443"),
    ("::ffff:192.0.2.1", 80, "--ffff-c000-201_80"),
    ("Web.Example", 80, "web.example_80"),
])
def test_backend_name_from_address(host: str, port: int, name: str) -> None:
    assert d.backend_name(host, port) == name
    assert NAME_RE.fullmatch(name)


def test_backend_names_are_deterministic_valid_and_distinct() -> None:
    rng = random.Random(7)
    seen: dict[str, str] = {}
    for _ in range(3000):
        if rng.random() < 0.5:
            host = str(ipaddress.IPv4Address(rng.getrandbits(32)))
        else:
            host = str(ipaddress.IPv6Address(rng.getrandbits(128)))
        port = rng.randint(1, 65535)
        name = d.backend_name(host, port)
        assert NAME_RE.fullmatch(name), name
        assert d.backend_name(host, port) == name
        key = f"{host}/{port}"
        assert seen.setdefault(name, key) == key, f"{name} for {key} and {seen[name]}"
    # the longest IPv6 text still fits without hashing
    long6 = "1234:5678:9abc:def0:1234:5678:9abc:def0"
    assert d.backend_name(long6, 65535) == long6.replace(":", "-") + "_65535"


def test_long_or_odd_host_names_get_a_hashed_valid_name() -> None:
    long_host = "a" * 60 + ".example"
    name = d.backend_name(long_host, 80)
    assert NAME_RE.fullmatch(name) and len(name) <= 64
    assert name.startswith("a" * 40) and name.endswith("_80")
    assert d.backend_name(long_host, 80) == name != d.backend_name(long_host, 81)
    scoped = d.backend_name("fe80::1%eth0", 80)
    assert NAME_RE.fullmatch(scoped), scoped


# -- TTL and timing ------------------------------------------------------------------------


@pytest.mark.parametrize("ttl,expect", [(0, 1.0), (0.5, 1.0), (7, 7.0), (300, 300.0),
                                        (86400, 300.0)])
def test_clamp_ttl(ttl: float, expect: float) -> None:
    assert d.clamp_ttl(ttl, 1.0, 300.0) == expect


def test_jitter_stays_within_bounds_and_spreads() -> None:
    rng = random.Random(1)
    mid = [d.jittered(10.0, 1.0, 300.0, 0.1, rng.random) for _ in range(2000)]
    assert all(9.0 <= x <= 10.0 for x in mid)
    assert max(mid) - min(mid) > 0.9  # really spread
    # at the floor (TTL 0 clamped to min): spread upwards, never below min_ttl_s
    low = [d.jittered(0.0, 1.0, 300.0, 0.1, rng.random) for _ in range(2000)]
    assert all(1.0 <= x <= 1.1 for x in low) and max(low) - min(low) > 0.09
    # at the ceiling: never above max_ttl_s
    high = [d.jittered(1e6, 1.0, 300.0, 0.1, rng.random) for _ in range(2000)]
    assert all(270.0 <= x <= 300.0 for x in high)
    # min == max: exactly that
    assert d.jittered(5.0, 2.0, 2.0, 0.1, rng.random) == 2.0
    assert d.jittered(5.0, 1.0, 300.0, 0.0, rng.random) == 5.0


def test_on_tick_aligns_wakeups_within_bounds() -> None:
    assert d.on_tick(100.03, 5.0) == pytest.approx(4.97)  # earlier, to 105.0
    assert d.on_tick(100.03, 0.15) == 0.15  # short delays are left alone
    # earlier would fall below lo: later instead, if that stays within hi
    assert d.on_tick(100.03, 1.0, lo=1.0, hi=2.0) == pytest.approx(1.07)
    assert d.on_tick(100.03, 1.0, lo=1.0, hi=1.0) == 1.0  # neither: unchanged
    rng = random.Random(5)
    for _ in range(1000):
        now, delay = rng.uniform(0, 1e6), rng.uniform(0.3, 300)
        lo, hi = delay * rng.uniform(0.9, 1), delay * rng.uniform(1, 1.1)
        got = d.on_tick(now, delay, lo, hi)
        assert lo <= got <= hi
        ticks = (now + got) / d.TICK_S
        assert got == delay or abs(ticks - round(ticks)) < 1e-6


def test_retry_backoff_doubles_up_to_the_cap() -> None:
    got = [d.retry_delay(n, 1.0, 30.0) for n in range(1, 9)]
    assert got == [1, 2, 4, 8, 16, 30, 30, 30]
    assert d.retry_delay(10_000, 1.0, 30.0) == 30.0  # no overflow
    assert d.retry_delay(0, 0.5, 30.0) == 0.5


# -- SRV rules --------------------------------------------------------------------------


def srv(prio: int, weight: int, port: int, target: str) -> d.SrvRecord:
    return d.SrvRecord(prio, weight, port, target)


def test_srv_only_the_lowest_priority_is_used() -> None:
    recs = [srv(10, 5, 80, "a"), srv(0, 1, 80, "b"), srv(0, 2, 81, "c"), srv(5, 9, 80, "d")]
    assert d.srv_select(recs) == [srv(0, 1, 80, "b"), srv(0, 2, 81, "c")]


def test_srv_dot_targets_and_port_zero_are_not_backends() -> None:
    assert d.srv_select([srv(0, 0, 0, ".")]) == []
    # a '.' at priority 0 does not hide the real records at priority 1
    assert d.srv_select([srv(0, 0, 80, "."), srv(1, 1, 80, "a")]) == [srv(1, 1, 80, "a")]
    assert d.srv_select([srv(0, 1, 0, "a"), srv(1, 1, 80, "b")]) == [srv(1, 1, 80, "b")]
    assert d.srv_select([]) == []


def test_srv_weights_map_onto_backend_weights() -> None:
    assert d.srv_weights({"a": 10, "b": 20}) == {"a": 10, "b": 20}  # kept as they are
    assert d.srv_weights({"a": 0, "b": 0}) == {"a": 1, "b": 1}  # all zero: equal
    assert d.srv_weights({"a": 0, "b": 100}) == {"a": 1, "b": 100}  # 0: smallest non-zero
    assert d.srv_weights({"a": 65535, "b": 6553, "c": 1}) == {"a": 1000, "b": 100, "c": 1}
    assert d.srv_weights({"a": 1000, "b": 999}) == {"a": 1000, "b": 999}
    assert d.srv_weights({}) == {}


def test_address_backends_dedupe_and_skip_unusable() -> None:
    got = d.address_backends(["10.0.0.2", "10.0.0.1", "10.0.0.2", "0.0.0.0", "224.0.0.1",
                              "255.255.255.255", "fd00::0:1", "::"], 8080, 3)
    assert got == [
        d.Backend("10.0.0.1_8080", "10.0.0.1:8080", 3),
        d.Backend("10.0.0.2_8080", "10.0.0.2:8080", 3),
        d.Backend("fd00--1_8080", "[fd00::1]:8080", 3),
    ]


# -- specs ------------------------------------------------------------------------------


def test_dns_spec_defaults_and_rules() -> None:
    s = d.DnsSpec("web.svc.test", port=8080)
    assert (s.record, s.min_ttl_s, s.max_ttl_s, s.timeout_s, s.weight, s.on_empty) == (
        "A", 1.0, 300.0, 2.0, 1, "fail")
    assert s.target == "web.svc.test A"
    d.DnsSpec("_http._tcp.web.svc.test", record="SRV", resolvers=("10.53.0.1", "[fd53::1]:5353",
                                                                   "10.53.0.2:53", "fd53::2"))
    bad: list[dict[str, object]] = [
        {"name": "web.svc.test"},  # A without port
        {"name": "web.svc.test", "record": "SRV", "port": 80},
        {"name": "web.svc.test", "record": "MX", "port": 80},
        {"name": "web svc", "port": 80},
        {"name": "a" * 64 + ".test", "port": 80},  # label over 63
        {"name": "web.test", "port": 0},
        {"name": "web.test", "port": 80, "resolvers": ("dns.example",)},
        {"name": "web.test", "port": 80, "resolvers": ("10.0.0.1:99999",)},
        {"name": "web.test", "port": 80, "min_ttl_s": 5, "max_ttl_s": 1},
        {"name": "web.test", "port": 80, "min_ttl_s": 0},
        {"name": "web.test", "port": 80, "weight": 1001},
        {"name": "web.test", "port": 80, "timeout_s": 0},
        {"name": "web.test", "port": 80, "on_empty": "maybe"},
        {"name": "web.test", "port": 80, "max_backends": 10_001},
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            d.DnsSpec(**kw)  # type: ignore[arg-type]


def test_file_spec_rules() -> None:
    assert d.FileSpec("/etc/pairlb/web.json").interval_s == 1.0
    for kw in ({"path": "web.json"}, {"path": "/x", "interval_s": 0},
               {"path": "/x\0y"}, {"path": "/x", "max_bytes": 1 << 30}):
        with pytest.raises(ValueError):
            d.FileSpec(**kw)  # type: ignore[arg-type]


def test_parse_resolver() -> None:
    assert d.parse_resolver("10.53.0.1") == ("10.53.0.1", 53)
    assert d.parse_resolver("10.53.0.1:5353") == ("10.53.0.1", 5353)
    assert d.parse_resolver("fd53::1") == ("fd53::1", 53)
    assert d.parse_resolver("[fd53:0::1]:54") == ("fd53::1", 54)
    for bad in ("ns.example:53", "ns.example", "", "10.0.0.1:0"):
        with pytest.raises(ValueError):
            d.parse_resolver(bad)


# -- the file format -------------------------------------------------------------------------


def parse(obj: object, **kw: object) -> list[d.Backend]:
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return d.parse_backend_file(data, source="/etc/pairlb/web.json", **kw)  # type: ignore[arg-type]


def test_file_format_good() -> None:
    got = parse([
        {"name": "web4", "address": "10.0.0.4:8080", "weight": 2},
        {"address": "[FD00::0:1]:80"},
        {"address": "Backend.Example:443", "weight": 0},
    ])
    assert got == [
        d.Backend("backend.example_443", "backend.example:443", 0),
        d.Backend("fd00--1_80", "[fd00::1]:80", 1),
        d.Backend("web4", "10.0.0.4:8080", 2),
    ]


def fails(obj: object, reason: str, *needles: str, **kw: object) -> str:
    with pytest.raises(d.DiscoveryError) as ei:
        parse(obj, **kw)
    e = ei.value
    assert e.reason == reason, e.message
    assert e.message.startswith("/etc/pairlb/web.json: "), e.message
    for n in needles:
        assert n in e.message, e.message
    assert len(e.message) < 2000
    return e.message


def test_file_format_hostile() -> None:
    fails(b"", "invalid_json", "empty file")
    fails(b'[{"address": "10.0.0.1:80"}', "invalid_json", "not JSON", "line 1")
    fails(b'[{"address": "10.0.0.1:80"}, {"addr', "invalid_json")
    fails(b"\xff\xfe[]", "invalid_json", "not UTF-8")
    fails(b"[" * 100_000 + b"]" * 100_000, "invalid_json")
    fails(b'[{"address": "10.0.0.1:80", "weight": 1' + b"0" * 5000 + b"}]", "invalid_json")
    fails(b'[{"address": "10.0.0.1:80", "address": "10.0.0.2:80"}]', "invalid_json",
          "duplicate key")
    fails({"backends": []}, "invalid", "expected a JSON array", "dict")
    fails("10.0.0.1:80", "invalid", "JSON array")
    fails([], "empty", "no backends")
    assert parse([], on_empty="accept") == []
    fails(["10.0.0.1:80"], "invalid", "[0]", "expected an object")
    fails([{"address": 80}], "invalid", "[0].address", "string")
    fails([{"name": "x"}], "invalid", "[0].address: required")
    fails([{"address": "10.0.0.1"}], "invalid", "[0].address", "host:port")
    fails([{"address": "10.0.0.1:0"}], "invalid", "port must be 1-65535")
    fails([{"address": "fd00::1:80"}], "invalid", "brackets")
    fails([{"address": "0.0.0.0:80"}], "invalid", "unicast")
    fails([{"address": "bad host:80"}], "invalid", "not an IP address or host name")
    fails([{"address": "10.0.0.1:80", "weight": "2"}], "invalid", "[0].weight")
    fails([{"address": "10.0.0.1:80", "weight": True}], "invalid", "[0].weight")
    fails([{"address": "10.0.0.1:80", "weight": 1.5}], "invalid", "[0].weight")
    fails([{"address": "10.0.0.1:80", "weight": 1001}], "invalid", "0-1000")
    fails([{"address": "10.0.0.1:80", "weight": -1}], "invalid", "[0].weight")
    fails([{"address": "10.0.0.1:80", "name": "a/b"}], "invalid", "[0].name")
    fails([{"address": "10.0.0.1:80", "name": "x" * 65}], "invalid", "[0].name")
    fails([{"address": "10.0.0.1:80", "name": 7}], "invalid", "[0].name")
    fails([{"address": "10.0.0.1:80", "health": {}}], "invalid", "unknown key 'health'")
    fails([{"address": "10.0.0.1:80", "name": "a"}, {"address": "10.0.0.2:80", "name": "a"}],
          "invalid", "[1].name: duplicate 'a' (also [0])")
    fails([{"address": "10.0.0.1:80"}, {"address": "10.0.0.1:80", "name": "b"}],
          "invalid", "[1].address: duplicate")
    fails([{"address": "[fd00::1]:80"}, {"address": "[fd00:0::1]:80", "name": "b"}],
          "invalid", "[1].address: duplicate")
    # a name given to one entry that another's derived name also is
    fails([{"address": "10.0.0.1:80", "name": "10.0.0.2_80"}, {"address": "10.0.0.2:80"}],
          "invalid", "[1].name: duplicate")
    # hostile text is cut short in the message and never echoed whole
    msg = fails([{"address": "x" * 100_000}], "invalid", "[0].address")
    assert len(msg) < 300
    # many bad entries: the first few are named, not all of them
    msg = fails([{"address": f"10.0.0.{i}"} for i in range(200)], "invalid", "[0]", "[4]",
                "first problems only")
    assert "[5]" not in msg


def test_file_format_too_many() -> None:
    many = [{"address": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:80"} for i in range(10_001)]
    fails(many, "too_many", "10001 backends", "10000")
    assert len(parse(many[:10_000])) == 10_000
    fails(many[:6], "too_many", "more than the 5", max_backends=5)


# -- the runner, driven by a scripted DNS source ----------------------------------------------


class Scripted:
    """Stands in for _DnsSource.fetch: each call takes the next outcome."""

    def __init__(self, outcomes: list[object]) -> None:
        self.outcomes = outcomes
        self.calls = 0

    async def fetch(self) -> tuple[list[d.Backend], float]:
        self.calls += 1
        out = self.outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        assert isinstance(out, tuple)
        return out  # type: ignore[return-value]


B1 = d.Backend("10.0.0.1_80", "10.0.0.1:80", 1)
B2 = d.Backend("10.0.0.2_80", "10.0.0.2:80", 1)


def runner(outcomes: list[object], **spec_kw: object) -> tuple[d.Discovery, list[object]]:
    calls: list[object] = []
    spec = d.DnsSpec("web.svc.test", port=80, resolvers=("192.0.2.1",), **spec_kw)  # type: ignore[arg-type]
    disc = d.Discovery("web", spec, lambda p, b, s: calls.append((p, b, s)),
                       rng=random.Random(3))
    disc._dns = Scripted(outcomes)  # type: ignore[assignment]
    return disc, calls


def test_runner_calls_back_only_on_change_and_keeps_the_last_good_set() -> None:
    nx = d.DiscoveryError("nxdomain", "web.svc.test A: NXDOMAIN")
    to = d.DiscoveryError("timeout", "web.svc.test A: no answer")
    disc, calls = runner([([B1], 5.0), ([B1], 5.0), (nx), (to), ([B1, B2], 0.0), ([B1, B2], 7.0)],
                         min_ttl_s=1.0, max_ttl_s=300.0, jitter=0.0)

    async def go() -> list[float]:
        return [await disc.refresh_once() for _ in range(6)]

    delays = asyncio.run(go())
    assert calls == [
        ("web", [("10.0.0.1_80", "10.0.0.1:80", 1)], "dns"),
        ("web", [("10.0.0.1_80", "10.0.0.1:80", 1), ("10.0.0.2_80", "10.0.0.2:80", 1)], "dns"),
    ]
    # TTL 5; retry 1 then 2 (doubling); TTL 0 -> min_ttl_s; TTL 7
    assert delays == [5.0, 5.0, 1.0, 2.0, 1.0, 7.0]
    st = disc.status()
    json.dumps(st)
    assert st["failures"] == {"nxdomain": 1, "timeout": 1}
    assert st["failures_total"] == 2 and st["resolutions_total"] == 6
    assert st["consecutive_failures"] == 0 and st["changes_total"] == 2
    assert st["backends"] == 2 and st["last_error_reason"] == "timeout"
    assert st["kind"] == "dns" and st["target"] == "web.svc.test A" and st["record"] == "A"
    assert st["last_ttl_s"] == 7.0


def test_runner_failure_before_any_success_hands_over_nothing() -> None:
    disc, calls = runner([d.DiscoveryError("servfail", "x")] * 3 + [([B2], 3.0)], jitter=0.0,
                         min_ttl_s=1.0, retry_max_s=3.0)

    async def go() -> list[float]:
        return [await disc.refresh_once() for _ in range(4)]

    assert asyncio.run(go()) == [1.0, 2.0, 3.0, 3.0]  # backoff capped by retry_max_s
    assert disc.backends == [tuple(B2)]
    assert len(calls) == 1
    assert disc.status()["failures"] == {"servfail": 3}


def test_runner_initial_set_suppresses_an_identical_first_callback() -> None:
    calls: list[object] = []
    spec = d.DnsSpec("web.svc.test", port=80, resolvers=("192.0.2.1",))
    disc = d.Discovery("web", spec, lambda p, b, s: calls.append(b), initial=[tuple(B1)])
    disc._dns = Scripted([([B1], 5.0), ([B2], 5.0)])  # type: ignore[assignment]

    async def go() -> None:
        await disc.refresh_once()
        await disc.refresh_once()

    asyncio.run(go())
    assert calls == [[tuple(B2)]]


def test_runner_survives_a_failing_callback_and_offers_the_set_again() -> None:
    seen: list[object] = []

    def cb(pool: str, backends: list[tuple[str, str, int]], source: str) -> None:
        seen.append(backends)
        if len(seen) == 1:
            raise RuntimeError("lead's code broke")

    spec = d.DnsSpec("web.svc.test", port=80, resolvers=("192.0.2.1",))
    disc = d.Discovery("web", spec, cb)
    disc._dns = Scripted([([B1], 5.0), ([B1], 5.0), ([B1], 5.0)])  # type: ignore[assignment]

    async def go() -> None:
        for _ in range(3):
            await disc.refresh_once()

    asyncio.run(go())
    assert len(seen) == 2  # failed once, applied the second time, then no change
    assert disc.status()["callback_errors_total"] == 1


def test_runner_bug_in_the_source_is_counted_not_fatal() -> None:
    disc, calls = runner([KeyError("oops"), ([B1], 5.0)], jitter=0.0)

    async def go() -> None:
        await disc.refresh_once()
        await disc.refresh_once()

    asyncio.run(go())
    assert disc.status()["failures"] == {"error": 1}
    assert len(calls) == 1


def test_runner_start_stop_and_refresh_now() -> None:
    disc, calls = runner([([B1], 300.0), ([B2], 300.0)])

    async def go() -> dict[str, object]:
        disc.start()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if calls:
                break
        st = disc.status()
        disc.refresh()  # do not wait 300 s
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(calls) == 2:
                break
        await disc.stop()
        await disc.stop()  # idempotent
        return st

    st = asyncio.run(go())
    assert len(calls) == 2
    assert 269.8 <= st["next_refresh_s"] <= 300  # type: ignore[operator]
    assert disc.status()["next_refresh_s"] is None


def test_stop_ends_even_when_a_cancellation_is_swallowed() -> None:
    """Python 3.11's asyncio.wait_for (used by dnspython) may return a reply instead of
    raising the CancelledError that met it; stop() must end the runner anyway, and no
    callback comes after it."""
    calls: list[object] = []
    spec = d.DnsSpec("web.svc.test", port=80, resolvers=("192.0.2.1",), min_ttl_s=0.01,
                     max_ttl_s=0.01)
    disc = d.Discovery("web", spec, lambda p, b, s: calls.append(b))
    n = 0

    class Swallower:
        async def fetch(self) -> tuple[list[d.Backend], float]:
            nonlocal n
            n += 1
            with contextlib.suppress(asyncio.CancelledError):  # the bug: the reply wins
                await asyncio.sleep(0.05)
            return [d.Backend(f"b{n}", f"10.0.0.{n % 250 + 1}:80", 1)], 0.0

    disc._dns = Swallower()  # type: ignore[assignment]

    async def go() -> None:
        disc.start()
        await asyncio.sleep(0.12)
        before = len(calls)
        await asyncio.wait_for(disc.stop(), 5)
        assert len(calls) == before
        await asyncio.sleep(0.1)
        assert len(calls) == before
        with pytest.raises(RuntimeError):
            disc.start()

    asyncio.run(go())
    assert calls
