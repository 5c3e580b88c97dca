"""lb.control.elastic's pure parts: the one-register rule it applies per runtime change
agrees with lb.control.overlay.compose (the precedence table) for every register, whatever
the config, discovery and overlay hold; and the peer-list and discovery-spec helpers."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.config import BackendConfig, Config, DiscoveryConfig, PoolConfig
from lb.control import overlay as ov
from lb.control.elastic import Elastic, Origin, discovery_spec, peer_host

NAMES = ["a", "b", "c", "d", "e"]
ADDRS = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:8080"]


def make_config(config_backends: list[tuple[str, str, int]], discovered_pool: bool) -> Config:
    pool: dict[str, Any] = {"name": "web", "backends": [
        {"name": n, "address": a, "weight": w} for n, a, w in config_backends]}
    if discovered_pool:
        pool["discovery"] = {"type": "file", "path": "/tmp/x.json"}
    if not config_backends and not discovered_pool:
        pool["backends"] = [{"name": "z", "address": "10.9.9.9:80"}]
    return Config.model_validate({
        "node": {"name": "lb1"},
        "listener": [{"name": "web", "bind": "127.0.0.1:8080", "pool": "web"}],
        "pool": [pool],
    })


def elastic_for(cfg: Config) -> Elastic:
    daemon: Any = SimpleNamespace(cfg=cfg)
    e = Elastic(daemon)
    e.overlay = ov.Overlay("lb1")
    return e


backend = st.tuples(st.sampled_from(NAMES), st.sampled_from(ADDRS), st.integers(0, 3))
op = st.tuples(st.sampled_from(NAMES), st.sampled_from(["add", "remove", "patch"]),
               st.sampled_from(ADDRS), st.integers(0, 3), st.sampled_from(["lb1", "lb2"]))


@settings(max_examples=300, deadline=None)
@given(cfg_b=st.lists(backend, max_size=4, unique_by=lambda b: b[0]),
       disc_b=st.lists(backend, max_size=4, unique_by=lambda b: b[0]),
       discovered=st.booleans(), ops=st.lists(op, max_size=10))
def test_the_one_register_rule_agrees_with_compose(
        cfg_b: list[tuple[str, str, int]], disc_b: list[tuple[str, str, int]],
        discovered: bool, ops: list[tuple[str, str, str, int, str]]) -> None:
    cfg = make_config(cfg_b, discovered)
    e = elastic_for(cfg)
    peer = ov.Overlay("lb2")
    for name, kind, addr, weight, origin in ops:
        state = "removed" if kind == "remove" else "present"
        address = addr if kind == "add" else None
        w = weight if kind != "remove" else None
        src = e.overlay if origin == "lb1" else peer
        intent = src.local("web", name, state, address, w, "api", 1000.0)  # type: ignore[arg-type]
        if origin == "lb2":
            e.overlay.merge(intent)
    if discovered:
        e.discovered["web"] = ("file", tuple(
            BackendConfig(name=n, address=a, weight=w) for n, a, w in disc_b))
        e._discovered_index["web"] = {b.name: b for b in e.discovered["web"][1]}
    # compose() retires registers (the config carries them): apply that first, as the
    # daemon does at a reload, then compare every name both ways.
    e._background = lambda coro: coro.close()  # type: ignore[method-assign]
    pools, _ = e.compose(cfg)
    composed = {b.name: (b, e.origin("web", b.name)) for b in pools[0].backends}
    for name in {*NAMES, *(b[0] for b in cfg_b), "z"}:
        got = e.want("web", name)
        want = composed.get(name)
        if want is None:
            assert got is None, (name, got)
            continue
        assert got is not None, (name, want)
        assert (got[0].name, got[0].address, got[0].weight) == (
            want[0].name, want[0].address, want[0].weight), name
        assert got[1] == want[1], (name, got[1], want[1])


def test_origin_defaults_to_config() -> None:
    e = elastic_for(make_config([("a", ADDRS[0], 1)], False))
    assert e.origin("web", "a") == Origin("config")


@pytest.mark.parametrize(("peer", "host"), [
    ("192.0.2.7", "192.0.2.7"), ("192.0.2.7:5405", "192.0.2.7"), ("fd00::7", "fd00::7"),
    ("[fd00::7]", "fd00::7"), ("[fd00::7]:5405", "fd00::7"),
])
def test_peer_host(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_discovery_specs_from_config() -> None:
    dns = discovery_spec(DiscoveryConfig.model_validate(
        {"type": "dns", "name": "_http._tcp.web.test", "record": "SRV",
         "resolvers": ("10.53.0.1:53",), "min_ttl_s": 2.0}))
    assert (dns.kind, dns.record, dns.port, dns.min_ttl_s) == ("dns", "SRV", None, 2.0)
    f = discovery_spec(DiscoveryConfig.model_validate(
        {"type": "file", "path": "/etc/pairlb/web.json", "interval_s": 0.5}))
    assert (f.kind, f.path, f.interval_s) == ("file", "/etc/pairlb/web.json", 0.5)


@pytest.mark.parametrize(("section", "error"), [
    ({"type": "dns", "port": 80}, "name: required"),
    ({"type": "dns", "name": "web.test"}, "port: required"),
    ({"type": "dns", "name": "web.test", "port": 80, "resolvers": ("dns.example",)},
     "not an IP address"),
    ({"type": "dns", "name": "web.test", "port": 80, "min_ttl_s": 10.0, "max_ttl_s": 5.0},
     "min_ttl_s: above max_ttl_s"),
    ({"type": "file"}, "path: required"),
    ({"type": "file", "path": "relative.json"}, "path"),
])
def test_bad_discovery_sections_name_the_key(section: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("(", r"\(")):
        DiscoveryConfig.model_validate(section)


def test_a_pool_needs_backends_unless_discovered() -> None:
    with pytest.raises(ValueError, match="at least one backend, or"):
        PoolConfig.model_validate({"name": "web"})
    PoolConfig.model_validate({"name": "web", "discovery": {"type": "file", "path": "/x"}})
    # The effective config the workers get may hold an emptied pool.
    from lb.config import EFFECTIVE

    PoolConfig.model_validate({"name": "web"}, context=EFFECTIVE)


@pytest.mark.parametrize(("section", "error"), [
    ({"type": "dns", "name": "web..example", "port": 80}, "pool[0].discovery.name:"),
    ({"type": "dns", "name": "web.example", "port": 80, "min_ttl_s": 0.001},
     "pool[0].discovery.min_ttl_s"),
    ({"type": "dns", "name": "web.example", "port": 80, "timeout_s": 120.0},
     "pool[0].discovery.timeout_s"),
])
def test_preflight_names_what_the_resolver_refuses(section: dict[str, Any], error: str) -> None:
    from lb.control import preflight

    cfg = Config.model_validate({
        "node": {"name": "lb1"},
        "listener": [{"name": "web", "bind": "127.0.0.1:8080", "pool": "web"}],
        "pool": [{"name": "web", "discovery": section}],
    })
    errors, _ = preflight.check(cfg, inside_service=True, tls=False)
    assert any(e.startswith(error) for e in errors), errors
