"""The admin API and the ``pairlb status|drain|enable|...`` commands, as an operator uses them.

Most tests serve the real admin app of a real ``Daemon`` object (pools built, no workers) on
127.0.0.1 and talk HTTP to it, with aiohttp or the real CLI in a subprocess. Real-process
tests: ``pairlb run`` with 2 workers and real backends (drain under load, wait for zero in
flight, maintenance, enable, readiness, auth), ``pairlb run`` refusing a readable token file,
and two real failover controllers heartbeating over UDP on 127.0.0.1 (VIPs in memory):
status schema, role metrics and a switchover through the API.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest
from admin_helpers import (
    LOOPBACK,
    PYTHON,
    ROOT,
    SCHEMA,
    Backends,
    FakeFailover,
    Pairlb,
    attach_fake_failover,
    attach_real_failover,
    config_text,
    failover_config,
    free_port,
    free_udp_port,
    http,
    in_process_daemon,
    parse_metrics,
    serve,
    wait_until,
    write_token,
)
from aiohttp import web

import failover
from lb import config as config_mod
from lb.admin import server as admin
from lb.admin.metrics import ROLES

TOKEN = "s3cret-token-for-tests"
STATUS_SCHEMA = json.loads(SCHEMA.read_text())


def cfg(tmp: Path, token: bool = True, bind_host: str = LOOPBACK) -> str:
    return config_text(
        listen_port=free_port(),
        admin_port=free_port(),
        backends=[("b1", 1), ("b2", 2), ("b3", 3)],
        token_file=write_token(tmp, TOKEN) if token else None,
        admin_bind_host=bind_host,
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _req(
    s: aiohttp.ClientSession, method: str, url: str, token: str | None = None, **kw: Any
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    headers = dict(kw.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with s.request(method, url, headers=headers, **kw) as r:
        text = await r.text()
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = text
        return r.status, body, r.headers


def admin_states(d: Any) -> dict[str, str]:
    return {b["name"]: b["admin_state"] for b in d.status_json()["pools"][0]["backends"]}


# -- secrets and bind address ---------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_token_file_others_can_read_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    text = cfg(tmp_path)
    token_file = tmp_path / "admin.token"
    token_file.chmod(mode)

    async def body() -> None:
        d = in_process_daemon(text)
        with pytest.raises(admin.AdminError) as err:
            admin.make_app(d)
        assert f"chmod 600 {token_file}" in str(err.value)
        assert f"{mode:04o}" in str(err.value)

    run(body())


def test_missing_or_empty_token_file_is_a_clear_startup_error(tmp_path: Path) -> None:
    text = cfg(tmp_path)
    token_file = tmp_path / "admin.token"

    async def body() -> None:
        token_file.write_text("  \n")
        with pytest.raises(admin.AdminError, match="is empty"):
            admin.make_app(in_process_daemon(text))
        token_file.unlink()
        with pytest.raises(admin.AdminError, match="cannot read: No such file"):
            admin.make_app(in_process_daemon(text))
        # A symlink is refused, not followed (the failover key's reader: O_NOFOLLOW, and
        # the mode is checked on the open file, so nothing can be swapped in between).
        real = tmp_path / "real.token"
        real.write_text("s3cret-token\n")
        real.chmod(0o600)
        token_file.symlink_to(real)
        with pytest.raises(admin.AdminError, match=r"is a symbolic link \(refused, not followed\)"):
            admin.make_app(in_process_daemon(text))

    run(body())


def test_non_loopback_admin_address_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        caplog.set_level(logging.WARNING, "lb.admin.server")
        admin.make_app(in_process_daemon(cfg(tmp_path)))
        assert "admin_non_loopback" not in caplog.text
        admin.make_app(in_process_daemon(cfg(tmp_path, bind_host="0.0.0.0")))
        assert "event=admin_non_loopback bind=0.0.0.0:" in caplog.text
        assert "clear text" in caplog.text

    run(body())


# -- reads ------------------------------------------------------------------------------------


def test_status_healthz_readyz_and_schema(tmp_path: Path) -> None:
    async def body() -> None:
        d = in_process_daemon(cfg(tmp_path))
        async with serve(admin.make_app(d)) as url, aiohttp.ClientSession() as s:
            status, st, _ = await _req(s, "GET", url + "/status")
            assert status == 200
            jsonschema.validate(st, STATUS_SCHEMA)
            assert st["node"] == "t1" and st["role"] == "STANDALONE" and st["failover"] is None
            assert [b["name"] for b in st["pools"][0]["backends"]] == ["b1", "b2", "b3"]
            assert (await _req(s, "GET", url + "/healthz"))[0] == 200
            # No workers and no healthy backend: not able to serve.
            status, ready, _ = await _req(s, "GET", url + "/readyz")
            assert status == 503 and ready["ready"] is False and st["ready"] is False
            # A MASTER with a peer, as the failover controller reports it.
            attach_fake_failover(d, FakeFailover())
            status, st, _ = await _req(s, "GET", url + "/status")
            jsonschema.validate(st, STATUS_SCHEMA)
            assert st["role"] == "MASTER"
            assert st["failover"]["peers"][0]["name"] == "lb2"
            # The schema is not a formality: a missing key fails it.
            del st["pools"][0]["backends"][0]["in_flight"]
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(st, STATUS_SCHEMA)

    run(body())


# -- auth -------------------------------------------------------------------------------------


def test_actions_need_the_token_and_refusals_change_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        d = in_process_daemon(cfg(tmp_path))
        before = admin_states(d)
        async with serve(admin.make_app(d)) as url, aiohttp.ClientSession() as s:
            drain = url + "/backends/web/b1/drain"
            status, err, headers = await _req(s, "POST", drain)
            assert status == 401 and "Bearer" in err["error"]
            assert headers["WWW-Authenticate"].startswith("Bearer")
            basic = {"Authorization": "Basic dXNlcjpwdw=="}
            assert (await _req(s, "POST", drain, headers=basic))[0] == 401
            assert (await _req(s, "POST", drain, headers={"Authorization": "Bearer "}))[0] == 401
            status, err, _ = await _req(s, "POST", drain, token=TOKEN + "x")
            assert (status, err["error"]) == (403, "wrong token")
            assert (await _req(s, "POST", drain, token=TOKEN[:-1]))[0] == 403
            for path in ("/reload", "/failover/switchover"):
                assert (await _req(s, "POST", url + path))[0] == 401
                assert (await _req(s, "POST", url + path, token="nope"))[0] == 403
            assert admin_states(d) == before
            assert not d.events and d.reloads == {"success": 0, "failure": 0}
            status, res, _ = await _req(s, "POST", drain, token=TOKEN)
            assert status == 200 and res["admin_state"] == "draining"

    run(body())


def test_without_token_file_actions_are_disabled_not_open(tmp_path: Path) -> None:
    async def body() -> None:
        d = in_process_daemon(cfg(tmp_path, token=False))
        async with serve(admin.make_app(d)) as url, aiohttp.ClientSession() as s:
            for path in ("/backends/web/b1/drain", "/reload", "/failover/switchover"):
                status, err, _ = await _req(s, "POST", url + path, token="anything")
                assert status == 403
                assert err["error"] == "admin actions disabled: set [admin] token_file"
            assert (await _req(s, "GET", url + "/status"))[0] == 200
            assert set(admin_states(d).values()) == {"enabled"}

    run(body())


# -- hostile input ------------------------------------------------------------------------------


HOSTILE = [
    ("/backends/web/nope/drain", 404, "no backend named 'nope' in pool 'web'"),
    ("/backends/nope/b1/drain", 404, "no pool named 'nope'"),
    ("/backends/web/b1/destroy", 404, "unknown action"),
    ("/backends/web/b1/DRAIN", 404, "unknown action"),
    ("/backends/web/..%2F..%2Fetc%2Fpasswd/drain", 400, "invalid backend name"),
    ("/backends/..%2Fweb/b1/drain", 400, "invalid pool name"),
    ("/backends/web/b1%00/drain", 400, "invalid backend name"),
    ("/backends/web/b1%20/drain", 400, "invalid backend name"),
    ("/backends/web/%3Cscript%3E/drain", 400, "invalid backend name"),
    ("/backends/web/" + "b" * 65 + "/drain", 400, "invalid backend name"),
    ("/backends/web/../b1/drain", 404, None),
    ("/backends/web/b1", 404, None),
    ("/backends/web/b1/drain/again", 404, None),
]


def test_hostile_paths_and_bodies_get_clear_4xx_and_change_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        d = in_process_daemon(cfg(tmp_path))
        before = admin_states(d)
        async with serve(admin.make_app(d)) as url, aiohttp.ClientSession() as s:
            for path, want, message in HOSTILE:
                status, err, _ = await _req(
                    s, "POST", url + path, token=TOKEN, allow_redirects=False
                )
                assert status == want, (path, status, err)
                assert isinstance(err, dict) and err["status"] == want
                if message:
                    assert message in err["error"], (path, err)
            # A GET on an action is not an action.
            assert (await _req(s, "GET", url + "/backends/web/b1/drain"))[0] == 405
            drain = url + "/backends/web/b1/drain"
            # Oversized body, announced (Content-Length) and not (chunked): 413 either way,
            # and the first one is refused before the token is even looked at.
            status, err, _ = await _req(s, "POST", drain, data=b"x" * 100_000)
            assert status == 413 and "too large" in err["error"]

            async def chunks() -> Any:
                for _ in range(64):
                    yield b"y" * 1024

            status, err, _ = await _req(s, "POST", drain, token=TOKEN, data=chunks())
            assert status == 413, err
            assert admin_states(d) == before and not d.events
            # A small body is fine.
            status, res, _ = await _req(s, "POST", drain, token=TOKEN, data=b"{}")
            assert status == 200 and res["changed"] is True

    run(body())


# -- actions ----------------------------------------------------------------------------------


def test_drain_enable_maintenance_report_state_and_in_flight(tmp_path: Path) -> None:
    async def body() -> None:
        d = in_process_daemon(cfg(tmp_path))
        # What the workers report (pool/backend -> requests in flight), as two workers would.
        d.inflight = {0: {"web/b2": 2}, 1: {"web/b2": 1}}
        async with serve(admin.make_app(d)) as url, aiohttp.ClientSession() as s:

            async def act(action: str, backend: str = "b2") -> Any:
                path = f"/backends/web/{backend}/{action}"
                status, res, _ = await _req(s, "POST", url + path, token=TOKEN)
                assert status == 200, res
                return res

            res = await act("drain")
            assert res == {
                "pool": "web",
                "backend": "b2",
                "admin_state": "draining",
                "changed": True,
                "in_flight": 3,
            }
            assert (await act("drain"))["changed"] is False
            assert admin_states(d)["b2"] == "draining"
            d.inflight = {0: {"web/b2": 0}, 1: {}}
            res = await act("maintenance")
            assert (res["admin_state"], res["in_flight"]) == ("maintenance", 0)
            assert admin_states(d) == {"b1": "enabled", "b2": "maintenance", "b3": "enabled"}
            assert (await act("enable"))["admin_state"] == "enabled"
            texts = [e["text"] for e in d.events]
            assert texts == ["web/b2 -> draining", "web/b2 -> maintenance", "web/b2 -> enabled"]

    run(body())


def test_switchover_and_reload(tmp_path: Path) -> None:
    path = tmp_path / "pairlb.toml"
    text = cfg(tmp_path)

    async def body() -> None:
        d = in_process_daemon(text, path)
        async with serve(admin.make_app(d)) as url, aiohttp.ClientSession() as s:
            status, err, _ = await _req(s, "POST", url + "/failover/switchover", token=TOKEN)
            assert (status, err["error"]) == (409, "no failover configured")
            fake = FakeFailover(role="MASTER")
            attach_fake_failover(d, fake)
            status, res, _ = await _req(s, "POST", url + "/failover/switchover", token=TOKEN)
            assert (status, res["ok"], res["role"]) == (200, True, "BACKUP")
            status, err, _ = await _req(s, "POST", url + "/failover/switchover", token=TOKEN)
            assert status == 409 and "not MASTER" in err["error"]
            assert fake.switchovers == 2

            # A valid change is applied...
            path.write_text(text.replace('{ name = "b3"', '{ name = "b4", address = '
                                         '"127.0.0.1:4" }, { name = "b3"'))
            status, res, _ = await _req(s, "POST", url + "/reload", token=TOKEN)
            assert (status, res["ok"], res["generation"]) == (200, True, 2)
            assert "pool web changed" in res["changes"]
            digest = d.status_json()["config"]["digest"]
            # ...a broken one is refused and the running config kept.
            path.write_text(text.replace("interval_s = 0.2", "interval_s = -1"))
            status, res, _ = await _req(s, "POST", url + "/reload", token=TOKEN)
            assert status == 422 and res["ok"] is False and res["generation"] == 2
            assert any("interval_s" in e for e in res["errors"])
            st = d.status_json()
            assert st["config"]["digest"] == digest and st["config"]["generation"] == 2
            assert len(st["pools"][0]["backends"]) == 4
            assert d.reloads == {"success": 1, "failure": 1}

    run(body())


# -- the CLI ----------------------------------------------------------------------------------


async def pairlb_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "lb", *args, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.timeout(60)
def test_cli_status_drain_enable_errors(tmp_path: Path) -> None:
    path = tmp_path / "pairlb.toml"
    text = cfg(tmp_path)
    token_file = str(tmp_path / "admin.token")
    bad_token = tmp_path / "bad.token"
    bad_token.write_text("wrong\n")
    bad_token.chmod(0o600)
    loose_token = tmp_path / "loose.token"
    loose_token.write_text("wrong\n")
    loose_token.chmod(0o644)

    async def body() -> None:
        d = in_process_daemon(text, path)
        attach_fake_failover(d, FakeFailover())
        async with serve(admin.make_app(d)) as url:
            table, raw = await asyncio.gather(
                pairlb_cli("status", "--admin", url), pairlb_cli("status", "--admin", url, "--json")
            )
            rc, out, err = table
            assert rc == 0, err
            assert "node t1  role MASTER" in out
            for name in ("b1", "b2", "b3", "lb2", "WORKERS"):
                assert name in out
            rc, out, _ = raw
            assert rc == 0
            jsonschema.validate(json.loads(out), STATUS_SCHEMA)

            rc, out, err = await pairlb_cli("drain", "web", "b2", "--admin", url,
                                            "--token-file", token_file)
            assert (rc, out.strip()) == (0, "web/b2: draining, 0 in flight"), err
            assert admin_states(d)["b2"] == "draining"
            rc, out, _ = await pairlb_cli("status", "--admin", url)
            assert "draining" in out
            rc, out, err = await pairlb_cli("enable", "web", "b2", "--admin", url,
                                            "--token-file", token_file, "--json")
            assert rc == 0 and json.loads(out)["admin_state"] == "enabled"

            # Errors: one line each, with the reason, and an exit code a script can test.
            no_token, bad, unknown = await asyncio.gather(
                pairlb_cli("drain", "web", "b2", "--admin", url),
                pairlb_cli("drain", "web", "b2", "--admin", url, "--token-file", str(bad_token)),
                pairlb_cli("maintenance", "web", "nope", "--admin", url,
                           "--token-file", token_file),
            )
            rc, out, err = no_token
            assert rc == 1 and err.count("\n") == 1 and "401 missing token" in err
            rc, _, err = bad
            assert (rc, err.strip()) == (1, "pairlb drain: drain web/b2: 403 wrong token")
            rc, _, err = unknown
            assert rc == 1 and "404 no backend named 'nope'" in err
            # The client reads its copy of the token as given (a pipe, a shared file): the
            # daemon's rules for secrets at rest are not the client's.
            rc, _, err = await pairlb_cli("drain", "web", "b2", "--admin", url,
                                          "--token-file", str(loose_token))
            assert (rc, err.strip()) == (1, "pairlb drain: drain web/b2: 403 wrong token")
            assert set(admin_states(d).values()) == {"enabled"}
            rc, out, err = await pairlb_cli("switchover", "--admin", url,
                                            "--token-file", token_file)
            assert (rc, out.strip()) == (0, "switchover done: this node is now BACKUP"), err

        # The same server gone: the operator learns pairlb is not there, not a traceback.
        rc, _, err = await pairlb_cli("status", "--admin", url)
        assert rc == 3
        assert err.strip() == f"pairlb status: is pairlb running? admin at {url} refused"

    run(body())


def test_cli_takes_address_and_token_from_the_config(tmp_path: Path) -> None:
    path = tmp_path / "pairlb.toml"
    text = cfg(tmp_path)

    async def body() -> None:
        d = in_process_daemon(text, path)
        app = admin.make_app(d)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        host, aport = config_mod.parse_hostport(d.cfg.admin.bind)
        await web.TCPSite(runner, host, aport).start()
        try:
            rc, out, err = await pairlb_cli("maintenance", "web", "b3", "-c", str(path))
            assert (rc, out.strip()) == (0, "web/b3: in maintenance, 0 in flight"), err
            rc, out, err = await pairlb_cli("reload", "-c", str(path))
            assert (rc, out.strip()) == (0, "reloaded: generation 2 (no changes)"), err
            rc, out, err = await pairlb_cli("reload", "-c", str(tmp_path / "missing.toml"))
            assert rc == 2 and "cannot read" in err
        finally:
            await runner.cleanup()
        assert admin_states(d)["b3"] == "maintenance"

    run(body())


# -- a real pairlb ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_real_pairlb_drain_wait_maintenance_enable(tmp_path: Path) -> None:
    """Drain under load, wait for zero in flight, maintenance, enable; through the CLI."""
    with Backends(["b1", "b2"]) as be, Pairlb(tmp_path, be, workers=2) as lb:
        assert http("GET", lb.admin + "/readyz")[0] == 200
        assert http("GET", lb.admin + "/healthz")[0] == 200
        auth = ["--admin", lb.admin, "--token-file", str(lb.token_file)]

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([PYTHON, "-m", "lb", *args], cwd=ROOT, capture_output=True,
                                  text=True, timeout=30)

        # Slow requests in flight at both backends.
        results: list[int] = []

        def slow() -> None:
            results.append(http("GET", lb.url + "/sleep/1.5", timeout_s=10)[0])

        threads = [threading.Thread(target=slow) for _ in range(4)]
        for t in threads:
            t.start()
        wait_until(
            lambda: all(b["in_flight"] for b in lb.status()["pools"][0]["backends"]),
            5, "requests in flight at both backends",
        )
        t0 = time.monotonic()
        status, _, raw = http("POST", lb.admin + "/backends/web/b1/drain", token=lb.token)
        assert status == 200 and json.loads(raw)["in_flight"] >= 1
        res = cli("drain", "web", "b1", "--wait", "10", *auth)
        waited = time.monotonic() - t0
        assert res.returncode == 0, res.stderr
        assert res.stdout.strip() == "web/b1: draining (already), 0 in flight"
        assert 0.5 < waited < 8, waited
        for t in threads:
            t.join(10)
        assert results == [200] * 4  # draining let them finish

        # Drained: new requests go to b2 only.
        before = be.stats("b1")["by_method"].get("GET", 0)
        for _ in range(20):
            assert http("GET", lb.url + "/")[0] == 200
        assert be.stats("b1")["by_method"].get("GET", 0) == before
        assert cli("maintenance", "web", "b1", *auth).returncode == 0

        # Refusals change nothing on the real thing either.
        assert http("POST", lb.admin + "/backends/web/b2/drain")[0] == 401
        assert http("POST", lb.admin + "/backends/web/b2/drain", token="x")[0] == 403
        states = {b["name"]: b["admin_state"] for b in lb.status()["pools"][0]["backends"]}
        assert states == {"b1": "maintenance", "b2": "enabled"}

        assert http("POST", lb.admin + "/backends/web/b1/enable", token=lb.token)[0] == 200
        wait_until(lambda: _spread(lb, be), 10, "b1 back in rotation")
        st = lb.status()
        jsonschema.validate(st, STATUS_SCHEMA)
        assert [e["text"] for e in st["events"] if e["kind"] == "admin"] == [
            "web/b1 -> draining", "web/b1 -> maintenance", "web/b1 -> enabled"
        ]


@pytest.mark.timeout(60)
def test_real_pairlb_refuses_a_token_file_others_can_read(tmp_path: Path) -> None:
    token_file = write_token(tmp_path, mode=0o644)
    config = tmp_path / "pairlb.toml"
    config.write_text(config_text(listen_port=free_port(), admin_port=free_port(),
                                  backends=[("b1", free_port())], token_file=token_file,
                                  workers=1))
    proc = subprocess.run([PYTHON, "-m", "lb", "run", "-c", str(config)], cwd=ROOT,
                          capture_output=True, text=True, timeout=45)
    assert proc.returncode != 0
    assert f"chmod 600 {token_file}" in proc.stderr
    assert "event=startup_failed" in proc.stderr


def _spread(lb: Pairlb, be: Backends) -> bool:
    before = be.stats("b1")["by_method"].get("GET", 0)
    for _ in range(6):
        http("GET", lb.url + "/")
    return bool(be.stats("b1")["by_method"].get("GET", 0) > before)


# -- a real failover pair (controllers, heartbeats over UDP on 127.0.0.1, VIPs in memory) ----


@pytest.mark.timeout(60)
def test_real_failover_pair_status_metrics_and_switchover(tmp_path: Path) -> None:
    """Two real FailoverControllers hear each other; the admin API of each daemon shows the
    truth (schema-valid), and POST /failover/switchover hands the VIP over."""


    port_a, port_b = free_udp_port(), free_udp_port()
    key = failover.generate_key()

    async def body() -> None:
        a = in_process_daemon(failover_config("lb1", 150, port_a, port_b, tmp_path))
        b = in_process_daemon(failover_config("lb2", 100, port_b, port_a, tmp_path))
        ctl_a, ctl_b = attach_real_failover(a, key), attach_real_failover(b, key)
        async with serve(admin.make_app(a)) as url_a, serve(admin.make_app(b)) as url_b:
            await ctl_a.start()
            await ctl_b.start()
            try:
                async with aiohttp.ClientSession() as s:

                    async def roles() -> tuple[str, str]:
                        sa = (await _req(s, "GET", url_a + "/status"))[1]
                        sb = (await _req(s, "GET", url_b + "/status"))[1]
                        return sa["role"], sb["role"]

                    deadline = time.monotonic() + 10
                    while await roles() != ("MASTER", "BACKUP"):
                        assert time.monotonic() < deadline, await roles()
                        await asyncio.sleep(0.05)
                    status, st, _ = await _req(s, "GET", url_a + "/status")
                    jsonschema.validate(st, STATUS_SCHEMA)
                    fo = st["failover"]
                    assert fo["vip_held"] is True and fo["priority"] == 150
                    peer = fo["peers"][0]
                    assert (peer["name"], peer["role"], peer["priority"]) == ("lb2", "BACKUP", 100)
                    assert peer["config_digest_match"] is True
                    assert peer["last_heard_s"] < 1.0

                    metrics_a = (await _req(s, "GET", url_a + "/metrics"))[1]
                    m = parse_metrics(metrics_a)
                    role = {r: m[("pairlb_role", frozenset({("role", r)}))] for r in ROLES}
                    assert role == {"MASTER": 1, "BACKUP": 0, "FAULT": 0, "INIT": 0,
                                    "STANDALONE": 0}
                    assert m[("pairlb_vip_held", frozenset())] == 1
                    assert m[("pairlb_heartbeats_received_total", frozenset())] > 0
                    assert m[("pairlb_peer_role", frozenset({("peer", "lb2"),
                                                             ("role", "BACKUP")}))] == 1
                    assert any(n == "pairlb_role_transitions_total" and ("to", "MASTER") in lbl
                               for (n, lbl) in m)

                    # Planned handover through the API: lb2 takes the VIP, lb1 lets go.
                    status, res, _ = await _req(s, "POST", url_a + "/failover/switchover",
                                                token=TOKEN)
                    assert status == 200 and res["ok"] is True, res
                    deadline = time.monotonic() + 10
                    while await roles() != ("BACKUP", "MASTER"):
                        assert time.monotonic() < deadline, await roles()
                        await asyncio.sleep(0.05)
                    status, st, _ = await _req(s, "GET", url_b + "/status")
                    jsonschema.validate(st, STATUS_SCHEMA)
                    assert st["failover"]["vip_held"] is True
                    # lb1 is BACKUP now: a second switchover from it is refused, clearly.
                    status, err, _ = await _req(s, "POST", url_a + "/failover/switchover",
                                                token=TOKEN)
                    assert status == 409 and "not MASTER" in err["error"], err
            finally:
                await ctl_a.stop(graceful=False)
                await ctl_b.stop(graceful=False)

    run(body())
