"""Config: the contract file is accepted verbatim; every error names key, value and rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from lb import config as c

CONTRACT = """\
[node]
name = "lb1"

[[listener]]
name = "web"
bind = "127.0.0.1:8080"        # host:port; [v6]:port also valid
mode = "http"                  # "http" or "tcp"
pool = "web"

[[pool]]
name = "web"
balance = "round_robin"        # round_robin | least_connections | random_two
backends = [
  { name = "web1", address = "127.0.0.1:9001" },
  { name = "web2", address = "127.0.0.1:9002", weight = 2 },
  { name = "web3", address = "127.0.0.1:9003" },
]
"""

HEALTH = """
[pool.health]
path = "/healthz"
interval_s = 1.0
timeout_s = 0.5
rise = 2
fall = 3
"""

FAILOVER = """
[failover]
interface = "eth0"
vips = ["192.0.2.100/24"]
priority = 150
peers = ["192.0.2.12"]
port = 5405
key_file = "/etc/pairlb/failover.key"
interval_s = 0.05
down_after = 3
preempt = true
"""


def test_contract_file_is_accepted_verbatim() -> None:
    cfg = c.loads(CONTRACT + HEALTH + FAILOVER)
    assert cfg.node.name == "lb1"
    assert cfg.listener[0].host_port == ("127.0.0.1", 8080)
    pool = cfg.pool[0]
    assert [b.weight for b in pool.backends] == [1, 2, 1]
    assert pool.health.rise == 2 and pool.health.fall == 3
    assert cfg.failover is not None and cfg.failover.priority == 150


def test_embedded_default_is_valid() -> None:
    assert c.loads(c.DEFAULT_CONFIG_TOML).pool[0].name == "web"


def test_config_is_frozen() -> None:
    cfg = c.loads(CONTRACT)
    with pytest.raises(ValidationError):
        cfg.node.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("snippet", "expected"),
    [
        ('[node]\nname="a"\nbogus=1\n', "node.bogus: unknown key (got 1)"),
        ("", "node: Field required"),
    ],
)
def test_node_errors(snippet: str, expected: str) -> None:
    body = CONTRACT.split("[[listener]]", 1)[1]
    with pytest.raises(c.ConfigError) as ei:
        c.loads(snippet + "[[listener]]" + body)
    assert expected in ei.value.errors


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            'bind = "127.0.0.1:8080"',
            'bind = "127.0.0.1"',
            "listener[0].bind: expected host:port (got '127.0.0.1')",
        ),
        (
            'bind = "127.0.0.1:8080"',
            'bind = "::1:8080"',
            "listener[0].bind: IPv6 addresses need brackets",
        ),
        (
            'bind = "127.0.0.1:8080"',
            'bind = "example.com:80"',
            "listener[0].bind: bind host must be an IP address",
        ),
        (
            'mode = "http"',
            'mode = "udp"',
            "listener[0].mode: Input should be 'http' or 'tcp' (got 'udp')",
        ),
        ('pool = "web"\n', 'pool = "nope"\n', "listener[0].pool: no pool named 'nope'"),
        ('balance = "round_robin"', 'balance = "fastest"', "pool[0].balance: Input should be"),
        (
            '"127.0.0.1:9002", weight = 2',
            '"127.0.0.1:9002", weight = -2',
            "pool[0].backends[1].weight: Input should be greater than or equal to 0 (got -2)",
        ),
        (
            '"127.0.0.1:9003"',
            '"127.0.0.1:70000"',
            "pool[0].backends[2].address: port must be 1-65535 (got '127.0.0.1:70000')",
        ),
        ('name = "web3"', 'name = "web1"', "pool[0]: duplicate backend name 'web1'"),
    ],
)
def test_errors_name_key_value_and_rule(old: str, new: str, expected: str) -> None:
    text = CONTRACT.replace(old, new, 1)
    assert text != CONTRACT
    with pytest.raises(c.ConfigError) as ei:
        c.loads(text)
    assert any(e.startswith(expected) for e in ei.value.errors), ei.value.errors


def test_every_error_is_reported_at_once() -> None:
    text = CONTRACT.replace('mode = "http"', 'mode = "udp"').replace("weight = 2", "weight = -1")
    text += HEALTH.replace("interval_s = 1.0", "interval_s = -1")
    with pytest.raises(c.ConfigError) as ei:
        c.loads(text)
    assert len(ei.value.errors) == 3
    assert any(
        e.startswith("pool[0].health.interval_s: Input should be greater than 0 (got -1)")
        for e in ei.value.errors
    )


def test_health_timeout_must_fit_interval() -> None:
    with pytest.raises(c.ConfigError) as ei:
        c.loads(CONTRACT + HEALTH.replace("timeout_s = 0.5", "timeout_s = 2.0"))
    assert any("timeout_s must be <= interval_s" in e for e in ei.value.errors)


def test_toml_syntax_error_is_reported() -> None:
    with pytest.raises(c.ConfigError) as ei:
        c.loads("[node\nname=1")
    assert ei.value.errors[0].startswith("TOML syntax:")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:8080", ("::1", 8080)),
        ("localhost:9000", ("localhost", 9000)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert c.parse_hostport(text) == expected
    assert c.parse_hostport(c.format_hostport(*expected)) == expected


@pytest.mark.parametrize(
    "text", ["", "80", ":80", "[::1]", "[::1]x80", "host:0", "host:abc", "[nope]:80"]
)
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        c.parse_hostport(text)


def test_digest_ignores_node_identity_but_not_pools() -> None:
    a = c.loads(CONTRACT)
    b = c.loads(CONTRACT.replace('name = "lb1"', 'name = "lb2"'))
    d = c.loads(CONTRACT.replace("weight = 2", "weight = 3"))
    assert a.digest() == b.digest() != d.digest()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lb", *args], capture_output=True, text=True, timeout=60
    )


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(CONTRACT + HEALTH)
    r = _cli("check-config", str(good))
    assert r.returncode == 0 and "OK" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(
        CONTRACT.replace('mode = "http"', 'mode = "udp"').replace("weight = 2", "weight = -1")
    )
    r = _cli("check-config", str(bad))
    assert r.returncode == 2
    assert "2 error(s)" in r.stderr
    assert "listener[0].mode" in r.stderr and "pool[0].backends[1].weight" in r.stderr
    r = _cli("check-config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_version_cli() -> None:
    r = _cli("version")
    assert r.returncode == 0 and r.stdout.startswith("pairlb ")
