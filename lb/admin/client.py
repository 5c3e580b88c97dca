"""``pairlb status|drain|enable|maintenance|switchover|reload``: the admin API from a shell.

``exchange`` is the one HTTP client of the admin API in the project: these commands, the
demo and the lab's rigs all go through it (urllib with no proxy from the environment and no
redirect followed, so a bearer token never leaves for another host). Stdlib only at import
(lb.config is loaded when a ``--config`` is read), so the commands stay fast to start. The
admin URL comes from ``--admin``, else from the ``[admin] bind`` of ``--config FILE``, else
http://127.0.0.1:9900; the token from ``--token-file``, else the config's ``[admin]
token_file``. Output is a readable table, or the API's JSON with ``--json``. Every failure
is one line on stderr and a non-zero exit code: 1 the API refused (4xx/5xx), 2 usage or
config problem, 3 pairlb unreachable.

Must not import aiohttp, prometheus_client or the daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lb import config as config_mod

DEFAULT_ADMIN = "http://127.0.0.1:9900"
EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


class ClientError(Exception):
    """One line for the operator, and the exit code."""

    def __init__(self, message: str, code: int = EXIT_API) -> None:
        super().__init__(message)
        self.code = code


# -- where and who --------------------------------------------------------------------------


def admin_url_from_bind(bind: str) -> str:
    """``[admin] bind`` to a URL a local client can use (wildcards mean loopback)."""
    from lb import config as config_mod

    host, port = config_mod.parse_hostport(bind)
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://{config_mod.format_hostport(host, port)}"


def resolve(args: argparse.Namespace) -> tuple[str, str | None]:
    """(admin base URL, token or None) from the flags and the config file."""
    cfg: config_mod.Config | None = None
    if args.config:
        from lb import config as config_mod

        try:
            cfg = config_mod.load(args.config)
        except config_mod.ConfigError as exc:
            raise ClientError(f"{exc}", EXIT_USAGE) from None
    url = args.admin or (admin_url_from_bind(cfg.admin.bind) if cfg else DEFAULT_ADMIN)
    url = url.rstrip("/")
    if "://" not in url:
        url = "http://" + url
    token_file = args.token_file or (cfg.admin.token_file if cfg else None)
    token = None
    if token_file:
        # As given, unlike the daemon's secrets at rest (failover.read_secret): the client's
        # copy may come from a pipe (`--token-file <(pass show pairlb)`), /dev/stdin or a
        # file an operators' group shares.
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read(4096).strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise ClientError(f"cannot read token file {token_file}: {why}",
                              EXIT_USAGE) from None
    return url, token


def _opener() -> Any:
    """urllib without the two ways a bearer token leaks: no proxy from the environment
    (HTTP_PROXY, http_proxy, ALL_PROXY ... would see the token in clear), and no redirect
    followed (a 3xx is an error; urllib would resend the Authorization header to wherever
    Location points)."""
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any,
                             newurl: str) -> None:
            return None  # urllib then raises HTTPError with the 3xx status

    return urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect())


def exchange(
    method: str,
    url: str,
    *,
    token: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request to ``url``; (status, headers, body). Every HTTP status is returned (a
    3xx too: never followed); OSError (``urllib.error.URLError``, ``TimeoutError``) when
    nothing answered. Never through a proxy from the environment (see ``_opener``)."""
    import urllib.error  # lazily: `pairlb run` should not pay for urllib and ssl
    import urllib.request

    if body is None and method == "POST":
        body = b""
    req = urllib.request.Request(url, method=method, data=body, headers=dict(headers or {}))
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with _opener().open(req, timeout=timeout_s) as resp:
            return int(resp.status), dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), dict(exc.headers or {}), exc.read()


def call(
    method: str, url: str, path: str, token: str | None = None, timeout_s: float = 10.0,
    body: Any = None,
) -> tuple[int, Any]:
    """One API call, ``body`` sent as JSON if given; (status, parsed JSON). Raises
    ClientError when pairlb is unreachable or answers with a redirect (not followed: the
    token goes only to ``url``)."""
    import urllib.error

    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        status, headers, raw = exchange(
            method, url + path, token=token, headers=headers, body=data, timeout_s=timeout_s,
        )
        if 300 <= status < 400:
            where = headers.get("Location", "?")
            raise ClientError(
                f"admin at {url} answered {status} redirecting to {where[:200]}; not followed "
                f"(the token goes only to --admin): point --admin at pairlb itself"
            ) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            raise ClientError(f"is pairlb running? admin at {url} refused",
                              EXIT_UNREACHABLE) from None
        raise ClientError(f"is pairlb running? admin at {url}: {reason}",
                          EXIT_UNREACHABLE) from None
    except TimeoutError:
        raise ClientError(f"admin at {url} did not answer within {timeout_s:g}s",
                          EXIT_UNREACHABLE) from None
    except OSError as exc:
        raise ClientError(f"is pairlb running? admin at {url}: {exc}", EXIT_UNREACHABLE) from None
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        text = raw.decode(errors="replace").strip().splitlines()
        return status, {"error": text[0] if text else f"HTTP {status}"}


def _check(status: int, body: Any, what: str) -> Any:
    if 200 <= status < 300:
        return body
    msg = body.get("error") if isinstance(body, dict) else None
    raise ClientError(f"{what}: {status} {msg or 'error'}")


# -- rendering --------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    return "\n".join(lines)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 10:
        return f"{seconds:.2f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def backend_state(b: dict[str, Any]) -> str:
    if b["admin_state"] != "enabled":
        extra = f" ({b['in_flight']} in flight)" if b["in_flight"] else ""
        return str(b["admin_state"]) + extra
    if b["health"] != "up":
        return "DOWN"
    if b["ejected"]:
        return f"ejected {b['ejected_for_s']:.0f}s"
    if b["in_rotation"]:
        return "up"
    why = ", ".join(b.get("out_of_rotation") or ())
    return f"out ({why})" if why else "out"


def render_status(st: dict[str, Any]) -> str:
    cfg = st["config"]
    out = [
        f"node {st['node']}  role {st['role']}  {'ready' if st.get('ready') else 'NOT READY'}  "
        f"up {_age(st['uptime_s'])}  pairlb {st['version']}  pid {st['pid']}",
        f"config generation {cfg['generation']}  digest {cfg['digest']}"
        + (
            f"  last reload {'ok' if cfg['last_reload']['ok'] else 'FAILED'}"
            if cfg.get("last_reload")
            else ""
        ),
    ]
    fo = st.get("failover")
    if fo:
        out.append(
            f"failover: {fo['role']} since {time.strftime('%H:%M:%S', time.localtime(fo['since']))}"
            f"  priority {fo['priority']} (effective {fo['effective_priority']})"
            f"  VIPs {','.join(fo['vips'])} {'held' if fo['vip_held'] else 'not held'}"
        )
        peers = [
            [
                p["name"],
                ",".join(p["addresses"]),
                p["role"],
                p["priority"],
                _age(p["last_heard_s"]),
                "yes" if p["config_digest_match"] else "NO",
                f"{p['healthy_backends']}/{p['total_backends']}",
            ]
            for p in fo.get("peers") or []
        ]
        out += ["", "PEERS" if peers else "PEERS: none heard"]
        if peers:
            out.append(
                table(
                    ["peer", "addresses", "role", "prio", "heard", "config", "backends"], peers
                )
            )
    for pool in st["pools"]:
        panic = "  PANIC" if pool["panic"] else ""
        out += [
            "",
            f"POOL {pool['name']} ({pool['balance']}): "
            f"{pool['usable']}/{pool['enabled']} usable{panic}",
        ]
        rows = []
        for b in pool["backends"]:
            chk = b.get("last_check")
            check = "-"
            if chk:
                code = f" {chk['code']}" if chk.get("code") is not None else ""
                check = f"{chk['status']}{code} {chk['duration_ms']:.1f}ms"
            rows.append(
                [
                    b["name"],
                    b["address"],
                    backend_state(b),
                    f"{b['effective_weight']:g}/{b['weight']}",
                    check,
                    b["in_flight"],
                    b["requests"],
                    b["errors"],
                    b["ejections"],
                ]
            )
        out.append(
            table(
                ["backend", "address", "state", "weight", "last check", "inflight", "requests",
                 "errors", "ejections"],
                rows,
            )
        )
    workers = [
        [w["index"], w["pid"], "ready" if w["ready"] else "starting", _age(w["uptime_s"]),
         w["restarts"], "CRASH LOOP" if w["crash_loop"] else ""]
        for w in st["workers"]
    ]
    out += ["", "WORKERS", table(["slot", "pid", "state", "uptime", "restarts", ""], workers)]
    events = st.get("events") or []
    if events:
        out += ["", "RECENT"]
        for ev in events[-8:]:
            stamp = time.strftime("%H:%M:%S", time.localtime(ev["at"]))
            out.append(f"  {stamp}  {ev['kind']:<8} {ev['text']}")
    return "\n".join(out)


# -- commands ---------------------------------------------------------------------------------


def _emit(args: argparse.Namespace, body: Any, text: str) -> None:
    print(json.dumps(body, indent=2, sort_keys=True) if args.json else text)


def cmd_status(args: argparse.Namespace) -> int:
    url, _ = resolve(args)
    status, body = call("GET", url, "/status", timeout_s=args.timeout)
    st = _check(status, body, "status")
    _emit(args, st, render_status(st) if not args.json else "")
    return 0


def cmd_backend(args: argparse.Namespace) -> int:
    url, token = resolve(args)
    pool = urllib.parse.quote(args.pool, safe="")
    backend = urllib.parse.quote(args.backend, safe="")
    what = f"{args.command} {args.pool}/{args.backend}"
    status, body = call(
        "POST", url, f"/backends/{pool}/{backend}/{args.command}", token, args.timeout
    )
    res = _check(status, body, what)
    if args.command == "drain" and args.wait is not None:
        res = _wait_drained(url, args.pool, args.backend, args.wait, res)
    verb = {"drain": "draining", "enable": "enabled", "maintenance": "in maintenance"}
    note = "" if res.get("changed", True) else " (already)"
    text = f"{args.pool}/{args.backend}: {verb[args.command]}{note}, {res['in_flight']} in flight"
    _emit(args, res, text)
    return 0


def _wait_drained(url: str, pool: str, backend: str, limit_s: float, res: Any) -> Any:
    """Poll /status until no request is in flight at the backend, or give up."""
    deadline = time.monotonic() + limit_s
    while True:
        _, st = call("GET", url, "/status")
        for p in st.get("pools", []) if isinstance(st, dict) else []:
            for b in p["backends"] if p["name"] == pool else []:
                if b["name"] == backend:
                    res = {**res, "in_flight": b["in_flight"]}
        if res["in_flight"] == 0:
            return res
        if time.monotonic() >= deadline:
            raise ClientError(
                f"drain {pool}/{backend}: still {res['in_flight']} in flight after {limit_s:g}s"
            )
        time.sleep(0.2)


def _peer_note(res: dict[str, Any]) -> str:
    peer = res.get("peer")
    if not isinstance(peer, dict) or not peer:
        return ""
    return "; peer " + ", ".join(f"{n}: {r}" for n, r in sorted(peer.items()))


def cmd_backend_add(args: argparse.Namespace) -> int:
    url, token = resolve(args)
    pool = urllib.parse.quote(args.pool, safe="")
    body = {"name": args.name, "address": args.address, "weight": args.weight}
    status, res = call("POST", url, f"/pools/{pool}/backends", token, args.timeout, body)
    res = _check(status, res, f"backend add {args.pool}/{args.name}")
    text = (f"{args.pool}/{args.name} added at {args.address} (weight {args.weight}); in "
            f"rotation after its first passing check{_peer_note(res)}")
    _emit(args, res, text)
    return 0


def cmd_backend_remove(args: argparse.Namespace) -> int:
    url, token = resolve(args)
    pool = urllib.parse.quote(args.pool, safe="")
    name = urllib.parse.quote(args.name, safe="")
    status, res = call("DELETE", url, f"/pools/{pool}/backends/{name}", token, args.timeout)
    res = _check(status, res, f"backend remove {args.pool}/{args.name}")
    if args.wait is not None:
        deadline = time.monotonic() + args.wait
        while _listed(url, args.pool, args.name):
            if time.monotonic() >= deadline:
                raise ClientError(f"backend remove {args.pool}/{args.name}: still draining "
                                  f"after {args.wait:g}s")
            time.sleep(0.2)
        res = {**res, "removed": True}
    state = "removed" if res.get("removed") else (
        f"draining ({res.get('in_flight', 0)} in flight), then removed")
    _emit(args, res, f"{args.pool}/{args.name}: {state}{_peer_note(res)}")
    return 0


def _listed(url: str, pool: str, name: str) -> bool:
    _, st = call("GET", url, "/status")
    for p in st.get("pools", []) if isinstance(st, dict) else []:
        if p["name"] == pool:
            return any(b["name"] == name for b in p["backends"])
    return False


def cmd_switchover(args: argparse.Namespace) -> int:
    url, token = resolve(args)
    status, body = call("POST", url, "/failover/switchover", token, args.timeout)
    res = _check(status, body, "switchover")
    _emit(args, res, f"switchover done: this node is now {res.get('role', '?')}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    url, token = resolve(args)
    status, body = call("POST", url, "/reload", token, args.timeout)
    if status == 422 and isinstance(body, dict):
        if args.json:
            _emit(args, body, "")
            return EXIT_API
        errors = "; ".join(body.get("errors") or []) or "unknown error"
        raise ClientError(
            f"reload rejected, generation {body.get('generation')} kept: {errors}"
        )
    res = _check(status, body, "reload")
    changes = "; ".join(res.get("changes") or []) or "no changes"
    _emit(args, res, f"reloaded: generation {res['generation']} ({changes})")
    return 0


def _common(p: argparse.ArgumentParser, token: bool) -> None:
    p.add_argument("--admin", metavar="URL", help=f"admin endpoint (default: {DEFAULT_ADMIN})")
    p.add_argument(
        "-c", "--config", metavar="FILE", help="take the admin address and token from this config"
    )
    if token:
        p.add_argument("--token-file", metavar="FILE", help="bearer token for actions")
    else:
        p.set_defaults(token_file=None)
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the admin-API subcommands on ``pairlb``'s subparsers."""
    p = sub.add_parser("status", help="show role, peers, backends and workers (admin API)")
    _common(p, token=False)
    p.set_defaults(func=_guarded(cmd_status))
    helps = {
        "drain": "stop sending new requests to a backend; in-flight ones finish",
        "enable": "put a drained or maintenance backend back in rotation",
        "maintenance": "take a backend out (health checks keep running)",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("pool")
        p.add_argument("backend")
        if name == "drain":
            p.add_argument(
                "--wait",
                type=float,
                metavar="S",
                help="then wait up to S seconds until nothing is in flight",
            )
        else:
            p.set_defaults(wait=None)
        _common(p, token=True)
        p.set_defaults(func=_guarded(cmd_backend))
    p = sub.add_parser("backend", help="add or remove a pool's backend at runtime (kept "
                       "across restarts and sent to the peer)")
    verbs = p.add_subparsers(dest="verb", required=True)
    q = verbs.add_parser("add", help="add a backend; it serves after its first passing check")
    q.add_argument("pool")
    q.add_argument("name")
    q.add_argument("address", help="host:port or [v6]:port")
    q.add_argument("--weight", type=int, default=1, help="default 1")
    _common(q, token=True)
    q.set_defaults(func=_guarded(cmd_backend_add))
    q = verbs.add_parser("remove", help="drain a backend, then remove it")
    q.add_argument("pool")
    q.add_argument("name")
    q.add_argument("--wait", type=float, metavar="S",
                   help="then wait up to S seconds until it is gone from /status")
    _common(q, token=True)
    q.set_defaults(func=_guarded(cmd_backend_remove))
    p = sub.add_parser("switchover", help="planned handover of the VIP to the peer")
    _common(p, token=True)
    p.set_defaults(func=_guarded(cmd_switchover))
    p = sub.add_parser("reload", help="reload the config file (like SIGHUP), show the result")
    _common(p, token=True)
    p.set_defaults(func=_guarded(cmd_reload))


Command = Callable[[argparse.Namespace], int]


def _guarded(fn: Command) -> Command:
    def run(args: argparse.Namespace) -> int:
        try:
            rc: int = fn(args)
        except ClientError as exc:
            print(f"pairlb {args.command}: {exc}", file=sys.stderr)
            return exc.code
        return rc

    return run
