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


# -- strict types (issue 13) ----------------------------------------------------------------

NODE = '[node]\nname = "lb1"\n'


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (NODE, NODE + 'workers = "2"\n', "node.workers: Input should be a valid integer (got '2')"),
        (NODE, NODE + "workers = 2.0\n", "node.workers: Input should be a valid integer (got 2.0)"),
        (NODE, NODE + "shutdown_timeout_s = true\n",
         "node.shutdown_timeout_s: Input should be a valid number (got True)"),
        (NODE, NODE + 'shutdown_timeout_s = "30"\n',
         "node.shutdown_timeout_s: Input should be a valid number (got '30')"),
        (NODE, NODE + "worker_nice = true\n",
         "node.worker_nice: Input should be a valid integer (got True)"),
        ('mode = "http"', 'mode = "http"\nfreebind = "yes"',
         "listener[0].freebind: Input should be a valid boolean (got 'yes')"),
        ('mode = "http"', 'mode = "http"\nvia = 1',
         "listener[0].via: Input should be a valid boolean (got 1)"),
        ('mode = "http"', 'mode = "http"\ntrusted_proxies = [10]',
         "listener[0].trusted_proxies[0]: Input should be a valid string (got 10)"),
        ('weight = 2', 'weight = "2"',
         "pool[0].backends[1].weight: Input should be a valid integer (got '2')"),
        ('name = "lb1"', "name = 1", "node.name: Input should be a valid string (got 1)"),
    ],
)
def test_types_are_strict(old: str, new: str, expected: str) -> None:
    text = CONTRACT.replace(old, new, 1)
    assert text != CONTRACT
    with pytest.raises(c.ConfigError) as ei:
        c.loads(text)
    assert expected in ei.value.errors, ei.value.errors


@pytest.mark.parametrize(
    "extra",
    [
        "[pool.health]\ninterval_s = 2\ntimeout_s = 1\n",  # TOML ints for floats: kept
        "[admin]\nenabled = false\n",
        '[pool.health]\nexpect_status = ["200", "300-399"]\n',  # arrays for tuples
    ],
)
def test_ints_for_floats_and_arrays_for_tuples_are_fine(extra: str) -> None:
    cfg = c.loads(CONTRACT + extra)
    assert isinstance(cfg.pool[0].health.interval_s, float)
    assert isinstance(cfg.pool[0].health.expect_status, tuple)


def test_admin_and_admin_enabled_strings_are_refused_together() -> None:
    with pytest.raises(c.ConfigError) as ei:
        c.loads(CONTRACT + '[admin]\nenabled = "yes"\nallowed_hosts = ["a b"]\n')
    assert "admin.enabled: Input should be a valid boolean (got 'yes')" in ei.value.errors
    assert any(e.startswith("admin.allowed_hosts: not a host name") for e in ei.value.errors)


@pytest.mark.parametrize(
    "host", ["evil\r\nX-Injected: 1", "a\nb", "a b", "\x00", ""],
)
def test_a_health_host_header_with_cr_lf_or_controls_is_refused(host: str) -> None:
    text = CONTRACT + f"[pool.health]\nhost = {_toml_str(host)}\n"
    with pytest.raises(c.ConfigError) as ei:
        c.loads(text)
    assert any(e.startswith("pool[0].health.host: String should match pattern")
               for e in ei.value.errors), ei.value.errors
    override = CONTRACT.replace('weight = 2 }', f"weight = 2, health = {{ host = "
                                                f"{_toml_str(host)} }} }}")
    with pytest.raises(c.ConfigError) as ei:
        c.loads(override)
    assert any(e.startswith("pool[0].backends[1].health.host: String should match pattern")
               for e in ei.value.errors), ei.value.errors


def _toml_str(s: str) -> str:
    return '"' + "".join(ch if 0x20 <= ord(ch) < 0x7f and ch not in '"\\' else
                         f"\\u{ord(ch):04x}" for ch in s) + '"'


# -- check-config checks what run checks (issue 13) -----------------------------------------


def _run_and_check(tmp_path: Path, text: str, env: dict[str, str] | None = None
                   ) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """check-config and run on the same file (run stops at its checks: no port, no VIP)."""
    import os

    path = tmp_path / "lb.toml"
    path.write_text(text)
    full = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    full.update(env or {})
    # Both at once (each is a Python start-up; neither writes what the other reads).
    procs = [subprocess.Popen([sys.executable, "-m", "lb", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=full)
             for args in (["check-config", str(path)], ["run", "-c", str(path)])]
    try:
        done = [subprocess.CompletedProcess(p.args, 0, *p.communicate(timeout=60))
                for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for d, p in zip(done, procs, strict=True):
        d.returncode = p.returncode
    return done[0], done[1]


def _secret(tmp_path: Path, name: str, content: str, mode: int) -> Path:
    p = tmp_path / name
    p.write_text(content)
    p.chmod(mode)
    return p


TOKEN_OK = "t0ken-for-the-config-tests"
KEY_OK = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"


def _failover(key: Path, interface: str = "lo") -> str:
    return (f'[failover]\ninterface = "{interface}"\nvips = ["192.0.2.100/24"]\n'
            f'peers = ["192.0.2.12"]\nkey_file = "{key}"\n')


CASES = {
    "token file missing": (
        lambda t: f'[admin]\ntoken_file = "{t / "nope.token"}"\n',
        "admin.token_file: [admin] token_file {t}/nope.token: cannot read: No such file",
    ),
    "token file readable by others": (
        lambda t: f'[admin]\ntoken_file = "{_secret(t, "a.token", TOKEN_OK, 0o644)}"\n',
        "accessible by group or others (mode 0644); fix it with: chmod 600",
    ),
    "token file empty": (
        lambda t: f'[admin]\ntoken_file = "{_secret(t, "e.token", "", 0o600)}"\n',
        "is empty; create one with",
    ),
    "key file missing": (
        lambda t: _failover(t / "nope.key") + '[admin]\nenabled = false\n',
        "failover.key_file: {t}/nope.key: no such key file",
    ),
    "key file readable by others": (
        lambda t: _failover(_secret(t, "k.key", KEY_OK, 0o640)),
        "key file is accessible by group/others (mode 0640)",
    ),
    "key too short": (
        lambda t: _failover(_secret(t, "s.key", "abcd", 0o600)),
        "key too short",
    ),
    "no such VIP interface": (
        lambda t: _failover(_secret(t, "i.key", KEY_OK, 0o600), "plbnone0"),
        "failover.interface: no interface named 'plbnone0' on this host",
    ),
    "unknown worker user": (
        lambda t: '[admin]\nenabled = false\n',
        "node.worker_user: no such user 'plb-no-such-user'",
    ),
    "probe HEAD with a body to expect": (
        lambda t: '[pool.health]\nmethod = "HEAD"\nexpect_body = "ok"\n',
        "pool[0].health.expect_body: needs a method other than HEAD (got 'ok')",
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(CASES))
def test_check_config_refuses_what_run_refuses(tmp_path: Path, case: str) -> None:
    make, message = CASES[case]
    text = CONTRACT + make(tmp_path)
    if case == "unknown worker user":
        text = text.replace('name = "lb1"\n', 'name = "lb1"\nworker_user = "plb-no-such-user"\n',
                            1)
    check, run = _run_and_check(tmp_path, text)
    want = message.format(t=tmp_path)
    assert check.returncode == 2, check.stdout + check.stderr
    assert want in check.stderr, check.stderr
    assert run.returncode == 1, run.stderr[-2000:]
    assert "event=startup_failed" in run.stderr and want in run.stderr, run.stderr[-2000:]


@pytest.mark.timeout(120)
def test_credentials_are_checked_inside_the_service_and_noted_outside(tmp_path: Path) -> None:
    """/run/credentials/pairlb.service/ exists only inside the service: check-config from a
    shell (install.sh) notes the path; with $CREDENTIALS_DIRECTORY set (ExecStartPre) the
    file is checked for real."""
    text = CONTRACT + '[admin]\ntoken_file = "/run/credentials/pairlb.service/admin.token"\n'
    path = tmp_path / "lb.toml"
    path.write_text(text)
    r = _cli("check-config", str(path))
    assert r.returncode == 0, r.stderr
    assert "note: admin.token_file: /run/credentials/pairlb.service/admin.token is a systemd " \
           "credential" in r.stdout
    import os

    # Inside the service ($CREDENTIALS_DIRECTORY set and readable): checked for real.
    creds = tmp_path / "creds"
    creds.mkdir()
    token = _secret(creds, "admin.token", TOKEN_OK, 0o644)
    path.write_text(CONTRACT + f'[admin]\ntoken_file = "{token}"\n')
    env = {**os.environ, "CREDENTIALS_DIRECTORY": str(creds)}
    r = subprocess.run([sys.executable, "-m", "lb", "check-config", str(path)],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 2
    assert f"admin.token_file: [admin] token_file {token} is accessible by group or others" \
        in r.stderr


def test_a_credential_directory_systemd_sets_but_refuses_is_noted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """systemd 252 sets $CREDENTIALS_DIRECTORY for ExecReload= but denies it the directory
    (measured under bench/nspawn_systemd.sh): note it there; the daemon checks on reload."""
    from lb.control import preflight

    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert not preflight.unseen_credential(f"{creds}/admin.token")
    monkeypatch.setattr(preflight.os, "access", lambda p, mode: False)
    assert preflight.unseen_credential(f"{creds}/admin.token")
    cfg = c.loads(CONTRACT + f'[admin]\ntoken_file = "{creds}/admin.token"\n')
    errors, notes = preflight.check(cfg)
    assert errors == [] and len(notes) == 1 and notes[0].startswith("admin.token_file:")
    errors, _ = preflight.check(cfg, inside_service=True)  # the daemon: a real check
    assert errors and "cannot read" in errors[0]


def test_check_config_ok_with_good_secrets(tmp_path: Path) -> None:
    token = _secret(tmp_path, "ok.token", TOKEN_OK, 0o600)
    path = tmp_path / "lb.toml"
    path.write_text(CONTRACT + f'[admin]\ntoken_file = "{token}"\n')
    r = _cli("check-config", str(path))
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


def test_a_backends_own_check_timeout_follows_the_pools_rule() -> None:
    """timeout_s <= interval_s holds for what a backend is really checked with: its own
    override against the pool's interval, or the pool's timeout against its own."""
    text = CONTRACT.replace(
        '{ name = "web1", address = "127.0.0.1:9001" },',
        '{ name = "web1", address = "127.0.0.1:9001", health = { timeout_s = 2.0 } },',
    )
    with pytest.raises(c.ConfigError) as ei:
        c.loads(text)
    assert any("backend 'web1': health.timeout_s must be <= interval_s" in e
               for e in ei.value.errors), ei.value.errors
    ok = CONTRACT.replace(
        '{ name = "web1", address = "127.0.0.1:9001" },',
        '{ name = "web1", address = "127.0.0.1:9001", '
        'health = { timeout_s = 2.0, interval_s = 3.0 } },',
    )
    c.loads(ok)


@pytest.mark.parametrize("peer", ["fd00::2", "[fd00::2]:5405", "192.0.2.3", "192.0.2.3:5405"])
def test_peers_are_parsed_as_the_failover_process_parses_them(peer: str) -> None:
    """A bare IPv6 peer is valid to failover, so it is valid here (it was refused)."""
    cfg = c.loads(CONTRACT + FAILOVER.replace('peers = ["192.0.2.12"]', f'peers = ["{peer}"]'))
    assert cfg.failover is not None and cfg.failover.peers == (peer,)
