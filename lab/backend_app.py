"""A small backend web server for the demo, the tests and the benchmarks' sanity checks.

``python -m lab.backend_app NAME HOST:PORT`` serves:
  GET  /healthz           200 "ok" (or the status set with POST /admin/health/NNN)
  GET  /                  200 "hello from NAME"
  GET  /status/NNN        that status
  GET  /sleep/SECONDS     answers after a delay
  GET  /bytes/N           N bytes
  POST /echo              the request body back
  GET  /stats             JSON: requests seen, by method, and the ids seen (X-Request-Id)
Every response carries ``X-Backend: NAME`` so a client can tell who answered.

It imports aiohttp and nothing of pairlb: the suite starts hundreds of these, and lb.config
(pydantic models, the failover package) would triple each one's start (0.2 s -> 0.6 s).
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter

from aiohttp import web
from aiohttp.typedefs import Handler


def parse_address(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` as lb.config.parse_hostport reads them (without its
    import cost); ValueError otherwise."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"IPv6 addresses need brackets: {value!r}")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT or [V6]:PORT, got {value!r}")
    return host, int(port)


def make_app(name: str) -> web.Application:
    counts: Counter[str] = Counter()
    state = {"health": 200}
    ids: list[str] = []

    @web.middleware
    async def tag(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(("/healthz", "/stats", "/admin")):
            counts[request.method] += 1
            rid = request.headers.get("X-Client-Id")
            if rid:
                ids.append(rid)
        resp: web.StreamResponse = await handler(request)
        resp.headers["X-Backend"] = name
        return resp

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(status=state["health"], text="ok\n")

    async def set_health(request: web.Request) -> web.Response:
        state["health"] = int(request.match_info["code"])
        return web.Response(text=f"health {state['health']}\n")

    async def root(request: web.Request) -> web.Response:
        return web.Response(text=f"hello from {name}\n")

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text=f"{name}\n")

    async def sleep(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.match_info["s"]))
        return web.Response(text=f"{name} slept\n")

    async def nbytes(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * int(request.match_info["n"]))

    async def echo(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        async for chunk in request.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"name": name, "by_method": dict(counts), "ids": ids})

    app = web.Application(middlewares=[tag], client_max_size=1 << 40)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/admin/health/{code:\\d+}", set_health)
    app.router.add_get("/", root)
    app.router.add_get("/status/{code:\\d+}", status)
    app.router.add_get("/sleep/{s}", sleep)
    app.router.add_get("/bytes/{n:\\d+}", nbytes)
    app.router.add_post("/echo", echo)
    app.router.add_put("/echo", echo)
    app.router.add_post("/", root)
    app.router.add_get("/stats", stats)
    return app


def wait_answering(host: str, port: int, name: str, timeout_s: float = 10.0) -> None:
    """Returns once backend ``name`` answers ``GET /healthz`` on ``host:port``. Raises at
    once if a server of another name answers there (a port two tests were handed at once:
    this backend failed to bind it, and the other one would quietly stand in for it), or
    if nothing answers in ``timeout_s``."""
    import http.client
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        conn = http.client.HTTPConnection(host, port, timeout=1.0)
        try:
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            resp.read()
            who = resp.getheader("X-Backend")
            if who != name:
                raise RuntimeError(f"{host}:{port} is answered by {who!r}, not backend "
                                   f"{name!r}: the port is another server's")
            return
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise TimeoutError(f"backend {name!r} not answering on {host}:{port} "
                                   f"after {timeout_s} s") from None
            time.sleep(0.02)
        finally:
            conn.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    name, addr = args[0], args[1]
    host, port = parse_address(addr)
    web.run_app(make_app(name), host=host, port=port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
