"""The admin HTTP app of the control process: status, probes, metrics, operator actions.

Read endpoints (``GET /status``, ``/healthz``, ``/readyz``, ``/metrics``, ``/``) are open on
the admin address; every mutating endpoint (``POST``) needs ``Authorization: Bearer <token>``
with the token from ``[admin] token_file``. Without a token file the actions are disabled
(403), never open: an operator who forgot the file must not get an unauthenticated drain
button. The token file must not be readable by group or others; ``make_app`` refuses to
build the app otherwise (``AdminError``, which the daemon reports as a startup error).

Every request must name a Host this endpoint serves (``HostPolicy``: its bind address,
localhost names on loopback, any IP on a wildcard bind, ``[admin] allowed_hosts``), else
421: a DNS-rebinding page cannot read ``/`` or ``/status`` through a browser.

Hostile input gets a clear 4xx and changes nothing: names in paths are checked against the
config's name pattern before any lookup, bodies are capped at ``MAX_BODY_BYTES`` (413),
unknown pools/backends are 404, and an action either applies completely or not at all.

Runs on the control loop, so handlers never block: ``/metrics`` reads state in memory (and
a few /proc files), ``/reload`` and ``/failover/switchover`` await the daemon.

prometheus_client is imported only here and in lb.admin.metrics. Must not import
lb.control.daemon at run time (the daemon imports this module); it talks to the daemon
through ``AdminDaemon``.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import html
import ipaddress
import json
import logging
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from lb import config as config_mod
from lb.admin import metrics
from lb.control import status as status_mod
from lb.control.elastic import ChangeRefused
from lb.control.overlay import ADDRESS_MAX
from lb.control.rotation import AdminState

logger = logging.getLogger("lb.admin.server")

MAX_BODY_BYTES = 4096
"""No admin request needs a body; a small cap keeps a hostile client from using memory."""
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
"""Pool and backend names, as lb.config allows them."""
ACTIONS: dict[str, AdminState] = {
    "drain": AdminState.DRAINING,
    "enable": AdminState.ENABLED,
    "maintenance": AdminState.MAINTENANCE,
}
REFRESH_S = 2
"""The status page reloads itself this often."""
PAGE_EVENTS = 25


class AdminError(Exception):
    """The admin app cannot be built as configured (message says how to fix it)."""


class ReloadOutcome(Protocol):
    @property
    def ok(self) -> bool: ...
    def as_dict(self) -> dict[str, Any]: ...


class AdminDaemon(metrics.MetricsSource, Protocol):
    """What the admin app needs from the control process (lb.control.daemon.Daemon satisfies it).

    ``switchover()`` is looked up with getattr: it exists only with failover support.
    """

    @property
    def failover(self) -> Any: ...

    def role(self) -> str: ...
    def set_admin_state(self, pool: str, backend: str, state: AdminState) -> bool: ...
    def backend_inflight(self, pool: str, backend: str) -> int: ...
    async def reload(self) -> ReloadOutcome: ...
    def reopen_logs(self) -> int: ...
    async def add_backend(
        self, pool: str, name: str, address: str, weight: int) -> dict[str, Any]: ...
    async def remove_backend(self, pool: str, name: str) -> dict[str, Any]: ...
    def has_backend(self, pool: str, name: str) -> bool | None: ...
    def is_removing(self, pool: str, name: str) -> bool: ...


class ApiError(Exception):
    """A request refused with ``status``; rendered as ``{"error": message, "status": n}``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


DAEMON: web.AppKey[AdminDaemon] = web.AppKey("daemon")
TOKEN: web.AppKey[str | None] = web.AppKey("token")
EXPOSITION: web.AppKey[metrics.Exposition] = web.AppKey("exposition")
LOCK: web.AppKey[asyncio.Lock] = web.AppKey("lock")


# -- secrets and bind address -------------------------------------------------------------


def load_token(path: str) -> str:
    """Read the bearer token; refuse a file others can read, a missing or an empty one
    (the rules are lb.control.preflight.read_token's, which check-config applies too)."""
    from lb.control import preflight

    try:
        return preflight.read_token(path)
    except preflight.PreflightError as exc:
        raise AdminError(str(exc)) from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


LOCALHOST_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


class HostPolicy:
    """Which Host header values the admin endpoint answers (DNS rebinding defence).

    A page on evil.example whose name is re-pointed at 127.0.0.1 makes the browser send
    ``Host: evil.example``: such a request is refused. Allowed: the bind host; localhost
    names and loopback IPs when bound to loopback; any IP address when bound to a wildcard
    (an IP literal can never be an attacker's name); and ``admin.allowed_hosts``. The port
    is not compared (an SSH tunnel or a NAT may change it); a request without Host (HTTP/1.0,
    which no browser sends) is allowed.
    """

    def __init__(self, bind: str, extra: tuple[str, ...] = ()) -> None:
        host, _ = config_mod.parse_hostport(bind)
        self.names = {self.normalise(host)} | {self.normalise(h) for h in extra}
        self.any_ip = False
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None and ip.is_unspecified:
            self.any_ip = True
            self.names |= LOCALHOST_NAMES
        elif is_loopback(host):
            self.names |= LOCALHOST_NAMES
            if host in LOCALHOST_NAMES:
                self.names |= {"127.0.0.1", "::1"}

    @staticmethod
    def normalise(host: str) -> str:
        h = host.strip().lower().rstrip(".")
        if h.startswith("[") and h.endswith("]"):
            h = h[1:-1]
        return h

    @classmethod
    def host_of(cls, header: str) -> str:
        """The host part of a Host header value, without port or IPv6 brackets."""
        h = header.strip()
        if h.startswith("["):
            return cls.normalise(h[: h.find("]") + 1] if "]" in h else h)
        name, sep, port = h.rpartition(":")
        if sep and port.isdigit() and ":" not in name:
            h = name
        return cls.normalise(h)

    def allows(self, header: str | None) -> bool:
        if header is None:
            return True
        host = self.host_of(header)
        if not host:
            return False
        if host in self.names:
            return True
        if self.any_ip:
            try:
                ipaddress.ip_address(host)
            except ValueError:
                return False
            return True
        return False


HOSTS: web.AppKey[HostPolicy] = web.AppKey("hosts")


# -- middlewares ----------------------------------------------------------------------------


@web.middleware
async def check_host(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """421 for a Host this endpoint does not serve (see HostPolicy), before anything else."""
    header = request.headers.get("Host")
    if not request.app[HOSTS].allows(header):
        raise ApiError(
            421,
            f"this endpoint does not serve Host {(header or '')[:100]!r}: use its address, or add "
            f"the name to [admin] allowed_hosts",
        )
    return await handler(request)


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error as JSON with a one-line message (the CLI prints it as is)."""
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(
            {"error": exc.message, "status": exc.status}, status=exc.status, headers=exc.headers
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        text = exc.text or ""
        message = exc.reason if not text or text.startswith(f"{exc.status}:") else text
        headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")}
        return web.json_response(
            {"error": message, "status": exc.status}, status=exc.status, headers=headers
        )


@web.middleware
async def guard_actions(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Mutating requests: size cap, then the token, then the (bounded) body; else nothing."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return await handler(request)
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, f"request body too large (limit {MAX_BODY_BYTES} bytes)")
    authorize(request)
    await request.read()  # chunked bodies: aiohttp raises 413 past client_max_size
    return await handler(request)


def authorize(request: web.Request) -> None:
    token = request.app[TOKEN]
    if token is None:
        raise ApiError(403, "admin actions disabled: set [admin] token_file")
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise ApiError(
            401,
            "missing token: send Authorization: Bearer <token from [admin] token_file>",
            {"WWW-Authenticate": 'Bearer realm="pairlb"'},
        )
    if not hmac.compare_digest(given.encode(), token.encode()):
        logger.warning(
            "event=admin_auth_failed method=%s path=%s remote=%s",
            request.method,
            request.path,
            request.remote,
        )
        raise ApiError(403, "wrong token")


# -- handlers -----------------------------------------------------------------------------


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)


def full_status(daemon: AdminDaemon) -> dict[str, Any]:
    """What GET /status returns: the daemon's typed status, serialised here, once."""
    return status_mod.to_json(daemon.status())


async def get_status(request: web.Request) -> web.Response:
    st = full_status(request.app[DAEMON])  # on the loop: a consistent, fresh structure
    # Encoding 3000 backends takes tens of ms: off the control loop (st is ours alone).
    text = await asyncio.to_thread(_dumps, st)
    return web.Response(text=text, content_type="application/json")


async def get_healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def get_readyz(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    st = daemon.status()
    ready = st.ready
    body = {
        "ready": ready,
        "workers_ready": sum(1 for w in st.workers if w.ready),
        "workers": len(st.workers),
        "usable_backends": sum(p.usable for p in st.pools),
    }
    return web.json_response(body, status=200 if ready else 503)


async def get_metrics(request: web.Request) -> web.Response:
    """Prometheus exposition: ``?scope=`` and ``?backend_series=`` select (lb.admin.metrics);
    OpenMetrics or text by Accept (as prometheus_client decides); gzip when accepted."""
    daemon = request.app[DAEMON]
    _, content_type = choose_encoder(request.headers.get("Accept", ""))
    openmetrics = content_type.startswith("application/openmetrics-text")
    try:
        sel = metrics.parse_selection(
            request.query.getall("scope", []),
            request.query.get("backend_series"),
            daemon.cfg.admin.metrics_backend_series,
        )
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    gzipped = accepts_gzip(request.headers.get("Accept-Encoding", ""))
    body, gzipped = await request.app[EXPOSITION].render_async(
        openmetrics, sel, gzip_min=GZIP_MIN_BYTES if gzipped else None
    )
    headers = {"Content-Type": content_type, "Vary": "Accept, Accept-Encoding"}
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


async def get_index(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    pool = request.query.get("pool")
    if pool is not None:
        _name("pool", pool)
    try:
        number = int(request.query.get("page", "1"))
    except ValueError:
        raise ApiError(400, "page must be a whole number >= 1") from None
    if number < 1:
        raise ApiError(400, "page must be a whole number >= 1")
    page = await asyncio.to_thread(
        functools.partial(
            render_page,
            full_status(daemon),
            time.time(),
            limit=daemon.cfg.admin.status_page_backends,
            pool_page=(pool, number) if pool is not None else None,
        )
    )
    return web.Response(text=page, content_type="text/html", charset="utf-8")


GZIP_MIN_BYTES = 4096
"""/metrics bodies at least this big are gzipped for a client that accepts it."""


def accepts_gzip(header: str) -> bool:
    """``Accept-Encoding`` names gzip (or ``*``) without ``q=0``."""
    for item in header.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() not in ("gzip", "*"):
            continue
        q = params.strip().lower()
        if q.startswith("q="):
            try:
                if float(q[2:]) <= 0:
                    continue
            except ValueError:
                continue
        return True
    return False


def _name(kind: str, value: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise ApiError(400, f"invalid {kind} name: must match [A-Za-z0-9_.-]{{1,64}}")
    return value


async def post_backend_action(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    action = request.match_info["action"]
    state = ACTIONS.get(action)
    if state is None:
        raise ApiError(404, f"unknown action {action[:32]!r}: use drain, enable or maintenance")
    pool = _name("pool", request.match_info["pool"])
    backend = _name("backend", request.match_info["backend"])
    known = daemon.has_backend(pool, backend)
    if known is None:
        raise ApiError(404, f"no pool named {pool!r}")
    if not known:
        raise ApiError(404, f"no backend named {backend!r} in pool {pool!r}")
    if daemon.is_removing(pool, backend):
        raise ApiError(409, f"{pool}/{backend} is being removed (draining before it leaves): "
                            f"add it again once it is gone")
    try:
        changed = daemon.set_admin_state(pool, backend, state)
    except KeyError:
        raise ApiError(404, f"no backend {pool}/{backend}") from None
    in_flight = daemon.backend_inflight(pool, backend)
    logger.info(
        "event=admin_action action=%s pool=%s backend=%s changed=%s in_flight=%d remote=%s",
        action,
        pool,
        backend,
        changed,
        in_flight,
        request.remote,
    )
    return web.json_response(
        {
            "pool": pool,
            "backend": backend,
            "admin_state": str(state),
            "changed": changed,
            "in_flight": in_flight,
        }
    )


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read() or b"null")
    except (ValueError, RecursionError):  # RecursionError: nested deeper than JSON allows
        raise ApiError(400, "body: not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, 'body: expected a JSON object {"name": ..., "address": ...}')
    return body


async def post_pool_backend(request: web.Request) -> web.Response:
    """Add a backend at runtime: 201 once it is kept on disk and applied here (it serves
    after its first passing check); ``peer`` says what the other node did with it."""
    daemon = request.app[DAEMON]
    pool = _name("pool", request.match_info["pool"])
    body = await _json_body(request)
    unknown = sorted(set(body) - {"name", "address", "weight"})
    if unknown:
        raise ApiError(400, f"body: unknown key(s) {unknown[:5]}: only name, address, weight")
    name, address, weight = body.get("name"), body.get("address"), body.get("weight", 1)
    if not isinstance(name, str):
        raise ApiError(400, "body.name: required, a string")
    _name("backend", name)
    if not isinstance(address, str) or len(address) > ADDRESS_MAX:
        raise ApiError(400, "body.address: required, host:port or [v6]:port")
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise ApiError(400, "body.weight: an integer 0..1000")
    try:
        res = await daemon.add_backend(pool, name, address, weight)
    except ChangeRefused as exc:
        raise ApiError(exc.status, exc.message) from None
    logger.info("event=admin_action action=backend_add pool=%s backend=%s address=%s "
                "remote=%s", pool, name, address, request.remote)
    return web.json_response(res, status=201, dumps=_dumps)


async def delete_pool_backend(request: web.Request) -> web.Response:
    """Remove a backend at runtime: 202, it drains, then it is gone from /status."""
    daemon = request.app[DAEMON]
    pool = _name("pool", request.match_info["pool"])
    name = _name("backend", request.match_info["backend"])
    try:
        res = await daemon.remove_backend(pool, name)
    except ChangeRefused as exc:
        raise ApiError(exc.status, exc.message) from None
    logger.info("event=admin_action action=backend_remove pool=%s backend=%s remote=%s",
                pool, name, request.remote)
    return web.json_response(res, status=202, dumps=_dumps)


async def post_switchover(request: web.Request) -> web.Response:
    """Planned handover: 200 once the peer holds the VIP, 409 when refused or not done."""
    daemon = request.app[DAEMON]
    switchover = getattr(daemon, "switchover", None)
    if daemon.failover is None or switchover is None:
        raise ApiError(409, "no failover configured")
    async with request.app[LOCK]:
        result: dict[str, Any] = await switchover()
    ok = bool(result.get("ok"))
    logger.info("event=admin_action action=switchover ok=%s remote=%s", ok, request.remote)
    if not ok:
        body = {**result, "error": f"switchover refused: {result.get('error', 'unknown')}"}
        return web.json_response({**body, "status": 409}, status=409, dumps=_dumps)
    return web.json_response(result, dumps=_dumps)


async def post_reload(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    async with request.app[LOCK]:
        result = await daemon.reload()
    logger.info("event=admin_action action=reload ok=%s remote=%s", result.ok, request.remote)
    return web.json_response(result.as_dict(), status=200 if result.ok else 422, dumps=_dumps)


async def post_logs_reopen(request: web.Request) -> web.Response:
    """Every worker reopens the access log (after logrotate; the same as SIGUSR2)."""
    n = request.app[DAEMON].reopen_logs()
    logger.info("event=admin_action action=logs_reopen workers=%d remote=%s", n, request.remote)
    return web.json_response({"ok": True, "workers": n}, dumps=_dumps)


def make_app(daemon: AdminDaemon) -> web.Application:
    """The admin app for ``daemon``; raises AdminError when the config is unsafe to serve."""
    acfg = daemon.cfg.admin
    token = load_token(acfg.token_file) if acfg.token_file else None
    host, _ = config_mod.parse_hostport(acfg.bind)
    if not is_loopback(host):
        logger.warning(
            "event=admin_non_loopback bind=%s actions=%s hint=%r",
            acfg.bind,
            "enabled" if token else "disabled",
            "status and metrics are open to that network and the bearer token travels in "
            "clear text; bind 127.0.0.1 or put a TLS proxy in front",
        )
    app = web.Application(
        middlewares=[json_errors, check_host, guard_actions], client_max_size=MAX_BODY_BYTES
    )
    app[HOSTS] = HostPolicy(acfg.bind, acfg.allowed_hosts)
    app[DAEMON] = daemon
    app[TOKEN] = token
    app[EXPOSITION] = metrics.Exposition(daemon)
    app[LOCK] = asyncio.Lock()
    app.router.add_get("/", get_index)
    app.router.add_get("/status", get_status)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/readyz", get_readyz)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_post("/backends/{pool}/{backend}/{action}", post_backend_action)
    app.router.add_post("/pools/{pool}/backends", post_pool_backend)
    app.router.add_delete("/pools/{pool}/backends/{backend}", delete_pool_backend)
    app.router.add_post("/failover/switchover", post_switchover)
    app.router.add_post("/reload", post_reload)
    app.router.add_post("/logs/reopen", post_logs_reopen)
    return app


# -- the status page ------------------------------------------------------------------------

ROLE_COLOURS = {
    "MASTER": "#1a7f37",
    "BACKUP": "#0969da",
    "FAULT": "#cf222e",
    "INIT": "#6e7781",
    "STANDALONE": "#8250df",
}


def backend_state(b: Mapping[str, Any]) -> tuple[str, str]:
    """(label, css class) a person should see for a backend; the most important reason wins."""
    if b.get("removing"):
        return "removing", "amber"
    if b["admin_state"] == AdminState.MAINTENANCE:
        return "maintenance", "grey"
    if b["admin_state"] == AdminState.DRAINING:
        return "draining", "amber"
    if b["health"] != "up":
        return "down", "red"
    if b["ejected"]:
        return "ejected", "orange"
    if b["in_rotation"]:
        if b["effective_weight"] < b["weight"]:
            return "slow start", "green"
        return "up", "green"
    why = ", ".join(b.get("out_of_rotation") or ())
    return (f"out ({why})" if why else "out"), "grey"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    s = max(0, int(seconds))
    if seconds < 10:
        return f"{max(0.0, seconds):.1f}s"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def _thead(*cols: str) -> str:
    """Table head; a column named with a trailing '#' holds numbers (right-aligned)."""
    cells = "".join(
        f"<th class='num'>{html.escape(c[:-1])}</th>" if c.endswith("#") else
        f"<th>{html.escape(c)}</th>"
        for c in cols
    )
    return f"<table><thead><tr>{cells}</tr></thead><tbody>"


def _pill(text: str, cls: str) -> str:
    return f'<span class="pill {cls}">{html.escape(text)}</span>'


def _role_badge(role: str, big: bool = False) -> str:
    colour = ROLE_COLOURS.get(role, "#6e7781")
    size = " big" if big else ""
    return f'<span class="role{size}" style="background:{colour}">{html.escape(role)}</span>'


def render_page(
    st: Mapping[str, Any],
    now: float,
    *,
    limit: int | None = None,
    pool_page: tuple[str, int] | None = None,
) -> str:
    """The status page for people: server-rendered, no scripts or external assets.

    A pool with more than ``limit`` backends shows ``limit`` of them, the ones with a
    problem first, with counts per state and links to the next pages (``pool_page``: which
    page of which pool this request asked for)."""
    e = html.escape
    role = str(st["role"])
    cfg = st["config"]
    last = cfg.get("last_reload")
    reload_txt = "none"
    if last:
        reload_txt = ("ok" if last["ok"] else "FAILED") + f" at {_clock(last['at'])}"
    ready = bool(st.get("ready"))
    parts: list[str] = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>pairlb {e(str(st['node']))} · {e(role)}</title>",
        f"<style>{_CSS}</style></head><body>",
        '<header><div class="title">',
        f'<span class="logo">pairlb</span> <span class="node">{e(str(st["node"]))}</span>',
        _role_badge(role, big=True),
        _pill("ready" if ready else "not ready", "green" if ready else "red"),
        "</div>",
        '<div class="meta">',
        f"<span>version <b>{e(str(st['version']))}</b></span>",
        f"<span>up <b>{fmt_duration(float(st['uptime_s']))}</b></span>",
        f"<span>pid <b>{e(str(st['pid']))}</b></span>",
        f"<span>config gen <b>{e(str(cfg['generation']))}</b> · digest "
        f"<code>{e(str(cfg['digest']))}</code></span>",
        f"<span>last reload <b>{e(reload_txt)}</b></span>",
        "</div></header><main>",
    ]
    parts.append(_failover_section(st.get("failover"), role, now))
    for pool in st["pools"]:
        number = pool_page[1] if pool_page is not None and pool_page[0] == pool["name"] else 1
        parts.append(_pool_section(pool, limit, number))
    tls = _tls_section(st.get("listeners") or [], now)
    if tls:
        parts.append(tls)
    parts.append(_workers_section(st["workers"], st.get("workers_retiring")))
    parts.append(_events_section(st.get("events") or [], now))
    parts.append(
        f'<footer>refreshes every {REFRESH_S} s · {_clock(now)} · '
        '<a href="/status">/status</a> (JSON) · <a href="/metrics">/metrics</a>'
        "</footer></main></body></html>"
    )
    return "\n".join(parts)


def _failover_section(fo: Mapping[str, Any] | None, role: str, now: float) -> str:
    e = html.escape
    if not fo:
        return (
            '<section><h2>Failover</h2><p class="muted">No <code>[failover]</code> section: '
            "this node runs alone (STANDALONE), no virtual IP, no peers.</p></section>"
        )
    vips = ", ".join(e(v) for v in fo.get("vips") or []) or "-"
    held = fo.get("vip_held")
    since = fo.get("since")
    since_txt = f"{_clock(since)} ({fmt_duration(now - since)} ago)" if since else "-"
    rows = []
    for p in fo.get("peers") or []:
        age = p.get("last_heard_s")
        alive = p.get("alive", age is not None and age <= 1.0)
        age_cls = "green" if alive else "red"
        match = p.get("config_digest_match")
        rows.append(
            "<tr>"
            f"<td><b>{e(str(p.get('name') or '?'))}</b></td>"
            f"<td>{e(', '.join(p.get('addresses') or []))}</td>"
            f"<td>{_role_badge(str(p.get('role') or '?'))}</td>"
            f"<td class='num'>{e(str(p.get('priority', '')))}</td>"
            f"<td>{_pill(fmt_duration(age) + (' ago' if age is not None else ''), age_cls)}</td>"
            f"<td>{_pill('match' if match else 'MISMATCH', 'green' if match else 'red')}</td>"
            f"<td class='num'>{e(str(p.get('healthy_backends', '')))}/"
            f"{e(str(p.get('total_backends', '')))}</td>"
            "</tr>"
        )
    peers = (
        _thead("peer", "addresses", "role", "priority#", "last heard", "config", "backends up#")
        + ("".join(rows) or '<tr><td colspan="7" class="muted">no peers</td></tr>')
        + "</tbody></table>"
    )
    return (
        "<section><h2>Failover</h2><div class='facts'>"
        f"<span>role {_role_badge(role)} since {e(since_txt)}</span>"
        f"<span>priority <b>{e(str(fo.get('priority')))}</b> "
        f"(effective <b>{e(str(fo.get('effective_priority')))}</b>)</span>"
        f"<span>interface <code>{e(str(fo.get('interface', '')))}</code></span>"
        f"<span>VIPs <code>{vips}</code> "
        f"{_pill('held' if held else 'not held', 'green' if held else 'grey')}</span>"
        f"</div>{peers}</section>"
    )


def _pool_section(pool: Mapping[str, Any], limit: int | None = None, number: int = 1) -> str:
    e = html.escape
    rows = []
    backends = list(pool["backends"])
    pager = ""
    if limit is not None and len(backends) > limit:
        states = [backend_state(b)[0] for b in backends]
        counts: dict[str, int] = {}
        for label in states:
            counts[label] = counts.get(label, 0) + 1
        # Problems first (in config order), then the backends that are fine.
        order = sorted(range(len(backends)), key=lambda i: (states[i] in ("up", "slow start"), i))
        pages = (len(backends) + limit - 1) // limit
        number = min(number, pages)
        shown = order[(number - 1) * limit : number * limit]
        backends = [backends[i] for i in shown]
        name = urllib.parse.quote(str(pool["name"]))
        links = " ".join(
            f"<b>{n}</b>" if n == number else f"<a href='/?pool={name}&amp;page={n}'>{n}</a>"
            for n in range(1, pages + 1)
            if n <= 3 or abs(n - number) <= 2 or n == pages
        )
        summary = " · ".join(f"{e(k)} {v}" for k, v in sorted(counts.items()))
        pager = (
            f"<div class='facts'><span>{len(pool['backends'])} backends: {summary}</span>"
            f"<span>showing {(number - 1) * limit + 1}-{(number - 1) * limit + len(shown)}, "
            f"problems first · page {links}</span></div>"
        )
    for b in backends:
        label, cls = backend_state(b)
        if label in ("draining", "removing") and b["in_flight"]:
            label = f"{label} ({b['in_flight']} in flight)"
        source = str(b.get("source") or "config")
        if b.get("shadows"):
            source += f" (replaces {b['shadows']})"
        check = b.get("last_check")
        if check is None:
            check_txt = "checks off" if not b.get("checks_enabled") else "no check yet"
        else:
            code = f" {check['code']}" if check.get("code") is not None else ""
            check_txt = f"{check['status']}{code} · {check['duration_ms']:.1f} ms"
        ej = b["ejections"]
        ej_txt = str(ej)
        if b.get("ejected"):
            ej_txt += f" (out {fmt_duration(b.get('ejected_for_s'))})"
        rows.append(
            f"<tr class='row-{cls}'>"
            f"<td><b>{e(str(b['name']))}</b></td>"
            f"<td><code>{e(str(b['address']))}</code></td>"
            f"<td>{e(source)}</td>"
            f"<td>{_pill(label, cls)}</td>"
            f"<td>{e(str(b['health']))}</td>"
            f"<td>{e(str(b['admin_state']))}</td>"
            f"<td class='num'>{b['effective_weight']:g}/{e(str(b['weight']))}</td>"
            f"<td>{e(check_txt)}</td>"
            f"<td class='num'>{e(str(b['in_flight']))}</td>"
            f"<td class='num'>{e(str(b['requests']))}</td>"
            f"<td class='num'>{e(str(b['errors']))}</td>"
            f"<td class='num'>{e(ej_txt)}</td>"
            "</tr>"
        )
    panic = _pill("PANIC", "red") if pool["panic"] else ""
    hashing = pool.get("hashing")
    hash_txt = ""
    if hashing:
        # The digest is what to compare with the peer's page: the same table, the same picks.
        state = "" if hashing["current"] else " " + _pill("BUILDING", "amber")
        hash_txt = (f"<span>key <b>{e(str(hashing['hash_on']))}</b></span>"
                    f"<span>table <b>{hashing['size']}</b> slots, digest "
                    f"<b>{e(str(hashing['digest'] or '-'))}</b>{state}</span>")
    return (
        f"<section><h2>Pool {e(str(pool['name']))} {panic}</h2>"
        f"<div class='facts'><span>balance <b>{e(str(pool['balance']))}</b></span>"
        + hash_txt +
        f"<span>usable <b>{pool['usable']}</b> of <b>{pool['enabled']}</b> enabled</span></div>"
        + pager
        + _thead("backend", "address", "source", "state", "health", "admin", "weight#",
                 "last check",
                 "in flight#", "requests#", "errors#", "ejections#")
        + "".join(rows)
        + "</tbody></table></section>"
    )


def _tls_section(listeners: list[Mapping[str, Any]], now: float) -> str:
    """Certificates of the TLS listeners: names, expiry (amber under 14 days, red past it),
    handshakes; the failures by reason and where the ticket key comes from."""
    e = html.escape
    rows, notes = [], []
    for lst in listeners:
        tls = lst.get("tls")
        if not tls:
            continue
        for c in tls["certificates"]:
            left = float(c["not_after"]) - now
            colour = "red" if left <= 0 else "amber" if left < 14 * 86400 else "green"
            expiry = _pill("expired" if left <= 0 else f"{left / 86400:.0f} days", colour)
            names = ", ".join(list(c["names"]) + list(c["ips"]))
            rows.append(
                f"<tr><td>{e(str(lst['name']))}</td><td>{e(names)}"
                f"{' ' + _pill('default', 'grey') if c['default'] else ''}</td>"
                f"<td><code>{e(str(c['cert_file']))}</code></td>"
                f"<td>{time.strftime('%Y-%m-%d', time.gmtime(float(c['not_after'])))} {expiry}"
                f"</td><td class='num'>{e(str(c['handshakes']))}</td>"
                f"<td class='num'>{e(str(c['resumed']))}</td></tr>")
        failures = ", ".join(f"{e(k)} {n}" for k, n in tls["failures"].items() if n) or "none"
        kid = tls.get("ticket_key_id")
        notes.append(f"<li>{e(str(lst['name']))}: TLS {e(str(tls['min_version']))}+, ticket "
                     f"key <b>{e(str(tls['ticket_key']))}</b>"
                     f"{f' (id <code>{e(str(kid))}</code>)' if kid else ''}, failed "
                     f"handshakes: {failures}</li>")
    if not rows:
        return ""
    return (
        "<section><h2>TLS certificates</h2>"
        + _thead("listener", "names", "file", "expires", "handshakes#", "resumed#")
        + "".join(rows) + "</tbody></table>"
        + f"<ul class='events'>{''.join(notes)}</ul></section>"
    )


def _rotation_cell(w: Mapping[str, Any]) -> str:
    """Whether the worker routes by the last rotation pushed: a worker behind still sends
    to backends the control process took out."""
    lag = float(w.get("rotation_lag_s") or 0)
    if lag <= 0:
        return "<span class='muted'>current</span>"
    return _pill(f"{lag:.2f} s behind", "amber" if lag < 2 else "red")


def _workers_section(workers: list[Mapping[str, Any]],
                     retiring: list[Mapping[str, Any]] | None = None) -> str:
    e = html.escape
    rows = []
    for w in workers:
        state = (
            _pill("crash loop", "red")
            if w.get("crash_loop")
            else _pill("restarting", "amber")
            if not w.get("alive", True)
            else _pill("ready", "green")
            if w.get("ready")
            else _pill("starting", "amber")
        )
        rows.append(
            f"<tr><td class='num'>{e(str(w['index']))}</td><td class='num'>{e(str(w['pid']))}</td>"
            f"<td>{state}</td><td>{fmt_duration(float(w.get('uptime_s') or 0))}</td>"
            f"<td class='num'>{e(str(w['restarts']))}</td>"
            f"<td class='num'>{e(str(w['crashes']))}</td>"
            f"<td class='num'>{e(str(w.get('hung_kills', 0)))}</td>"
            f"<td>{_rotation_cell(w)}</td></tr>"
        )
    for w in retiring or []:  # a rolling reload's old workers, finishing their requests
        rows.append(
            f"<tr><td class='num'>{e(str(w['index']))}</td><td class='num'>{e(str(w['pid']))}</td>"
            f"<td>{_pill('retiring', 'grey')}</td><td></td><td></td><td></td><td></td>"
            f"<td>{_rotation_cell(w)}</td></tr>"
        )
    return (
        "<section><h2>Workers</h2>"
        + _thead("slot#", "pid#", "state", "uptime", "restarts#", "crashes#", "hung kills#",
                 "rotation")
        + ("".join(rows) or '<tr><td colspan="8" class="muted">no workers</td></tr>')
        + "</tbody></table></section>"
    )


_EVENT_COLOURS = {
    "health": "blue",
    "admin": "amber",
    "eject": "orange",
    "panic": "red",
    "reload": "grey",
    "role": "purple",
    "failover": "purple",
}


def _events_section(events: list[Mapping[str, Any]], now: float) -> str:
    e = html.escape
    items = []
    newest_first = sorted(events, key=lambda ev: float(ev.get("at") or 0), reverse=True)
    for ev in newest_first[:PAGE_EVENTS]:
        at = float(ev.get("at") or 0)
        kind = str(ev.get("kind", ""))
        items.append(
            f"<li><span class='when'>{_clock(at)}</span>"
            f"<span class='ago'>{fmt_duration(now - at)} ago</span>"
            f"{_pill(kind, _EVENT_COLOURS.get(kind, 'grey'))}"
            f"<span>{e(str(ev.get('text', '')))}</span></li>"
        )
    body = "".join(items) or '<li class="muted">nothing happened yet</li>'
    return f"<section><h2>Recent transitions</h2><ul class='events'>{body}</ul></section>"


_CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
 background:#f6f8fa;color:#1f2328}
header{background:#24292f;color:#fff;padding:14px 24px}
header .title{display:flex;align-items:center;gap:12px;flex-wrap:wrap}
.logo{font-weight:700;letter-spacing:.5px;color:#8c959f}
.node{font-size:22px;font-weight:600}
header .meta{display:flex;gap:22px;flex-wrap:wrap;margin-top:8px;color:#d0d7de;font-size:13px}
header .meta b{color:#fff}
header code{color:#fff}
main{padding:16px 24px;max-width:1400px}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 16px;
 margin-bottom:14px}
h2{font-size:16px;margin:0 0 8px;display:flex;align-items:center;gap:8px}
.facts{display:flex;gap:20px;flex-wrap:wrap;margin-bottom:8px;color:#57606a}
.facts b{color:#1f2328}
table{border-collapse:collapse;width:100%}
th{text-align:left;font-weight:600;color:#57606a;font-size:12px;text-transform:uppercase;
 letter-spacing:.3px;border-bottom:1px solid #d0d7de;padding:6px 8px}
td{padding:6px 8px;border-bottom:1px solid #eaeef2;white-space:nowrap}
tr:last-child td{border-bottom:none}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.row-red td{background:#fff5f5}
tr.row-amber td{background:#fffbea}
tr.row-grey td{background:#f6f8fa;color:#57606a}
tr.row-orange td{background:#fff4eb}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
.role{display:inline-block;color:#fff;font-weight:700;border-radius:4px;padding:1px 8px;
 font-size:12px;letter-spacing:.5px}
.role.big{font-size:15px;padding:3px 12px}
.pill{display:inline-block;border-radius:999px;padding:1px 9px;font-size:12px;font-weight:600;
 border:1px solid transparent}
.pill.green{background:#dafbe1;color:#116329;border-color:#aceebb}
.pill.red{background:#ffebe9;color:#a40e26;border-color:#ffcecb}
.pill.amber{background:#fff8c5;color:#7d4e00;border-color:#eac54f}
.pill.orange{background:#fff1e5;color:#953800;border-color:#ffc680}
.pill.grey{background:#eaeef2;color:#424a53;border-color:#d0d7de}
.pill.blue{background:#ddf4ff;color:#0550ae;border-color:#b6e3ff}
.pill.purple{background:#fbefff;color:#6e40c9;border-color:#e6ccff}
.muted{color:#6e7781}
ul.events{list-style:none;margin:0;padding:0}
ul.events li{display:flex;gap:10px;align-items:center;padding:4px 0;
 border-bottom:1px solid #eaeef2}
ul.events li:last-child{border-bottom:none}
.when{font:12px ui-monospace,monospace;color:#57606a}
.ago{color:#8c959f;font-size:12px;min-width:70px}
footer{color:#6e7781;font-size:12px;padding:4px 0 20px}
footer a{color:#0969da}
"""
