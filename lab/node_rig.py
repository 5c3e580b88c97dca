"""End-to-end helpers: real backends and a real ``pairlb run`` as subprocesses, a bounded
load generator, and polling of pairlb's ``GET /status``. For tests and bench scripts that
prove behaviour a user would notice (errors, latency, who answered) with real processes.

- :func:`free_port`, :func:`wait_port`, :func:`wait_until` / :func:`wait_until_async`:
  loopback ports and waits that always have a deadline.
- :class:`Backend`: one backend web server process (``lab.backend_app`` plus two options
  this module adds: a *journal* file that records every request's ``X-Client-Id`` with
  ``os.write`` before it is answered, so the record survives ``kill -9``; and
  ``traffic_status``, a status every non-health request gets, for a backend that passes its
  checks but fails real traffic). Signals go to its PID only: ``kill``, ``stop`` (SIGSTOP),
  ``cont`` (SIGCONT), ``restart`` (same port).
- :class:`Pairlb`: ``python -m lb run -c FILE`` with a config written by
  :func:`config_text` (free ports, admin endpoint, token file); ``status()``, admin
  actions, ``reload()`` (SIGHUP), the log file.
- :class:`Load`: N concurrent keep-alive clients (raw HTTP/1.1 on asyncio streams, so no
  client library retries anything behind our back) sending GETs and/or POSTs with a unique
  ``X-Client-Id`` each, bounded in requests and time; every response or error is kept as a
  :class:`Sample` with monotonic timestamps and the ``X-Backend`` that answered.
- :class:`StatusWatch`: polls ``/status`` in the background and finds the first moment a
  backend's state matched a predicate (time to leave rotation, to go DOWN, to come back).

Everything binds or connects to 127.0.0.1 only. Processes are stopped by PID, never by name;
every process a helper started is stopped by its ``close()`` / context manager, even when a
test fails. Timestamps are ``time.monotonic()`` seconds throughout.

Run as a module (``python -m lab.node_rig backend NAME HOST:PORT [--journal FILE]
[--traffic-status N]``) it is the backend server itself. Imports from lb only
``lab.backend_app`` (and only in that server mode).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from lab.ports import free_port
from lb.admin import client

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
PYTHON = str(ROOT / ".venv" / "bin" / "python")
if not Path(PYTHON).exists():
    PYTHON = sys.executable
LOOPBACK = "127.0.0.1"
TOKEN = "e2e-token-0123456789abcdef"
"""Bearer token written to every Pairlb's token file."""


# -- ports and waits --------------------------------------------------------------------------


def port_open(port: int, timeout_s: float = 0.2) -> bool:
    with socket.socket() as s:
        s.settimeout(timeout_s)
        return s.connect_ex((LOOPBACK, port)) == 0


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    wait_until(lambda: port_open(port), timeout_s, f"{LOOPBACK}:{port} to accept", 0.02)


def wait_until(pred: Callable[[], T], timeout_s: float, what: str, step_s: float = 0.05) -> T:
    """Poll ``pred`` until truthy; AssertionError naming ``what`` and the last value if not."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s: {what} (last: {last!r})")
        time.sleep(step_s)


async def wait_until_async(
    pred: Callable[[], T | Awaitable[T]], timeout_s: float, what: str, step_s: float = 0.02
) -> T:
    """The same inside an event loop (a sync wait would stall a running :class:`Load`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        last = pred()
        if isinstance(last, Awaitable):
            last = await last
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s: {what} (last: {last!r})")
        await asyncio.sleep(step_s)


async def _cancel_all(tasks: Sequence[asyncio.Task[Any]], timeout_s: float = 5.0) -> None:
    """Cancel until done (a cancel can be lost in a race), within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    pending = {t for t in tasks if not t.done()}
    while pending and time.monotonic() < deadline:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
    if pending:
        raise AssertionError(f"{len(pending)} task(s) ignored cancellation: {pending}")
    for t in tasks:
        if not t.cancelled():
            t.exception()  # mark it retrieved; a client's own errors are in its samples


def _signal_pid(proc: subprocess.Popen[bytes], sig: int) -> None:
    """Signal our own child by PID, only while it has not been reaped (no PID reuse race)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGCONT (a stopped process cannot exit), SIGTERM, then SIGKILL after ``timeout_s``."""
    if proc.poll() is not None:
        return
    _signal_pid(proc, signal.SIGCONT)
    _signal_pid(proc, signal.SIGTERM)
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        _signal_pid(proc, signal.SIGKILL)
        proc.wait(5.0)


# -- blocking HTTP (outside a running load) ---------------------------------------------------


def http(
    method: str,
    url: str,
    *,
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = 5.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request through lb.admin.client.exchange; 4xx/5xx are returned, not raised."""
    return client.exchange(method, url, body=body, headers=dict(headers or {}),
                           timeout_s=timeout_s)


# -- raw async HTTP/1.1 client ----------------------------------------------------------------


class HttpError(Exception):
    """A response we could not read (the connection closed early, garbage, a timeout)."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]
    """Lower-case names; a repeated header keeps its last value."""
    body: bytes
    close: bool
    """The server said it will close the connection after this response."""


async def _read_response(reader: asyncio.StreamReader, method: str) -> Response:
    line = await reader.readline()
    if not line:
        raise HttpError("connection closed before a response")
    parts = line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"bad status line {line[:80]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    while True:
        h = await reader.readline()
        if not h:
            raise HttpError("connection closed inside the response head")
        if h in (b"\r\n", b"\n"):
            break
        name, _, value = h.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    close = headers.get("connection", "").lower() == "close" or parts[0] == "HTTP/1.0"
    if 100 <= status < 200:
        return await _read_response(reader, method)  # 100 Continue etc.: the real one follows
    body = b""
    if method == "HEAD" or status in (204, 304):
        pass
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        chunks = []
        while True:
            size_line = await reader.readline()
            size = int(size_line.split(b";")[0].strip() or b"x", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
        close = True
    return Response(status, headers, body, close)


class Connection:
    """One keep-alive client connection; reconnects when the server closed it."""

    def __init__(self, port: int, host: str = LOOPBACK) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        timeout_s: float = 5.0,
    ) -> Response:
        """Send one request and read its response within ``timeout_s``; never retried."""
        try:
            async with asyncio.timeout(timeout_s):
                if self._writer is None:
                    self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
                assert self._reader is not None
                head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
                head += [f"{k}: {v}" for k, v in (headers or {}).items()]
                if body or method in ("POST", "PUT"):
                    head.append(f"Content-Length: {len(body)}")
                self._writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
                resp = await _read_response(self._reader, method)
        except BaseException:
            await self.close()
            raise
        if resp.close:
            await self.close()
        return resp

    async def close(self) -> None:
        # No wait_closed(): on Python 3.11 wait_for() can swallow a cancellation that
        # arrives as the inner wait completes, and a lost cancel hangs whoever stops us.
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()


async def request(
    port: int,
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    timeout_s: float = 5.0,
) -> Response:
    """One request on a fresh connection (closed afterwards)."""
    conn = Connection(port)
    try:
        return await conn.request(method, path, headers=headers, body=body, timeout_s=timeout_s)
    finally:
        await conn.close()


# -- backends ---------------------------------------------------------------------------------


class Backend:
    """A backend web server in its own process on 127.0.0.1:``port`` (fixed across restarts).

    ``journal``: file that gets one ``METHOD CLIENT_ID`` line per request carrying
    ``X-Client-Id``, written before the answer, so it survives kill -9 (``journal_ids``).
    ``traffic_status``: answer every request except /healthz, /stats and /admin/* with this
    (changed at run time with ``set_traffic_status_async``). A ``delay=S`` query parameter
    makes any request wait S seconds after it was journaled (POSTs in flight at a kill).
    """

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        port: int | None = None,
        traffic_status: int | None = None,
    ) -> None:
        self.name = name
        self.port = port or free_port()
        self.journal = workdir / f"{name}.journal"
        self.log = workdir / f"{name}.log"
        self.traffic_status = traffic_status
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def spawn(self) -> None:
        """Start the process without waiting for it to listen."""
        argv = [PYTHON, "-m", "lab.node_rig", "backend", self.name, self.address,
                "--journal", str(self.journal)]
        if self.traffic_status is not None:
            argv += ["--traffic-status", str(self.traffic_status)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        self.starts += 1

    def start(self, timeout_s: float = 10.0) -> Backend:
        self.spawn()
        self.wait_listening(timeout_s)
        return self

    def wait_listening(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not port_open(self.port):
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"backend {self.name} exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"backend {self.name} not listening after {timeout_s}s")
            time.sleep(0.01)
        from lab.backend_app import wait_answering  # aiohttp: only where a test runs

        wait_answering(LOOPBACK, self.port, self.name, max(deadline - time.monotonic(), 1.0))

    async def wait_listening_async(self, timeout_s: float = 10.0) -> float:
        """Inside a running loop; returns when the port first accepted (monotonic)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                _, writer = await asyncio.open_connection(LOOPBACK, self.port)
            except OSError:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"backend {self.name} exited: {self.log.read_text()[-2000:]}"
                    ) from None
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"backend {self.name} not listening after {timeout_s}s"
                    ) from None
                await asyncio.sleep(0.005)
                continue
            t = time.monotonic()
            writer.close()
            return t

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        _signal_pid(self.proc, sig)

    def kill(self) -> None:
        """kill -9 and reap, so the port is free for ``restart``."""
        assert self.proc is not None
        self.signal(signal.SIGKILL)
        self.proc.wait(5.0)

    def stop(self) -> None:
        """SIGSTOP: the process hangs; its listening socket still accepts connections."""
        self.signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.signal(signal.SIGCONT)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self, timeout_s: float = 10.0) -> Backend:
        if self.alive:
            self.kill()
        return self.start(timeout_s)

    def set_health(self, code: int) -> None:
        """What /healthz answers from now on."""
        status, _, body = http("POST", f"{self.url}/admin/health/{code}", timeout_s=3.0)
        assert status == 200, (status, body)

    async def set_health_async(self, code: int) -> None:
        resp = await request(self.port, "POST", f"/admin/health/{code}", timeout_s=3.0)
        assert resp.status == 200, resp

    async def set_traffic_status_async(self, code: int) -> None:
        """Answer every non-health request with ``code`` from now on (0: normally again)."""
        resp = await request(self.port, "POST", f"/admin/traffic/{code}", timeout_s=3.0)
        assert resp.status == 200, resp

    def stats(self) -> dict[str, Any]:
        status, _, body = http("GET", f"{self.url}/stats", timeout_s=3.0)
        assert status == 200, (status, body)
        out: dict[str, Any] = json.loads(body)
        return out

    def journal_ids(self, method: str | None = None) -> list[str]:
        """Client ids that reached this backend (every process it ever ran), in order."""
        if not self.journal.exists():
            return []
        out = []
        for line in self.journal.read_text().splitlines():
            m, _, cid = line.partition(" ")
            if cid and (method is None or m == method):
                out.append(cid)
        return out

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 5.0)


class Backends:
    """Several :class:`Backend` processes that are all stopped on exit."""

    def __init__(self, workdir: Path, names: Iterable[str], **opts: Any) -> None:
        self.workdir = workdir
        self.by_name: dict[str, Backend] = {n: Backend(n, workdir, **opts) for n in names}

    def __getitem__(self, name: str) -> Backend:
        return self.by_name[name]

    def __iter__(self) -> Iterator[Backend]:
        return iter(self.by_name.values())

    def add(self, backend: Backend) -> Backend:
        self.by_name[backend.name] = backend
        return backend

    def __enter__(self) -> Backends:
        try:
            for b in self.by_name.values():
                b.spawn()
            for b in self.by_name.values():
                b.wait_listening()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for b in self.by_name.values():
            b.close()

    def members(self) -> list[tuple[str, str]]:
        return [(b.name, b.address) for b in self.by_name.values()]


# -- pairlb -----------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def _table(header: str, values: Mapping[str, Any]) -> str:
    """``header`` (``[name]`` or ``[[name]]``) and one ``key = value`` line per item."""
    return "\n".join([header] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]) + "\n"


def config_text(
    *,
    listen_port: int,
    admin_port: int,
    backends: Sequence[tuple[str, str]],
    token_file: Path | None = None,
    workers: int = 2,
    node: Mapping[str, Any] | None = None,
    pool: Mapping[str, Any] | None = None,
    health: Mapping[str, Any] | None = None,
    passive: Mapping[str, Any] | None = None,
    log_level: str = "info",
) -> str:
    """One HTTP listener ``web`` in front of pool ``web``; extra keys per section as dicts."""
    members = "".join(f'  {{ name = "{n}", address = "{a}" }},\n' for n, a in backends)
    admin: dict[str, Any] = {"bind": f"{LOOPBACK}:{admin_port}"}
    if token_file is not None:
        admin["token_file"] = str(token_file)
    node_keys = {"name": "e2e", "workers": workers, "shutdown_timeout_s": 2.0, **(node or {})}
    listener = {"name": "web", "bind": f"{LOOPBACK}:{listen_port}", "pool": "web"}
    return "\n".join(
        [
            _table("[node]", node_keys),
            _table("[[listener]]", listener),
            _table("[[pool]]", {"name": "web", **(pool or {})}) + f"backends = [\n{members}]\n",
            _table("[pool.health]", health or {}),
            _table("[pool.passive]", passive or {}),
            _table("[admin]", admin),
            _table("[logging]", {"level": log_level}),
        ]
    )


class Pairlb:
    """``python -m lb run -c FILE`` on free ports; its log is ``workdir/pairlb.log``.

    ``settings`` are the keyword arguments of :func:`config_text` other than ports,
    backends and token file (``workers``, ``pool``, ``health``, ``passive``, ...).
    """

    def __init__(
        self, workdir: Path, backends: Sequence[tuple[str, str]], **settings: Any
    ) -> None:
        self.workdir = workdir
        self.listen_port = free_port()
        self.admin_port = free_port()
        self.token_file = workdir / "admin.token"
        import failover

        failover.write_secret(str(self.token_file), TOKEN.encode() + b"\n", replace=True)
        self.config = workdir / "pairlb.toml"
        self.log = workdir / "pairlb.log"
        # Runtime pool changes are kept per test, never in the machine's /var/lib/pairlb.
        settings["node"] = {"state_dir": str(workdir / "state"), **(settings.get("node") or {})}
        self.settings = settings
        self.write_config(backends)
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, backends: Sequence[tuple[str, str]]) -> None:
        self.backends = list(backends)
        self.config.write_text(
            config_text(
                listen_port=self.listen_port,
                admin_port=self.admin_port,
                backends=self.backends,
                token_file=self.token_file,
                **self.settings,
            )
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.listen_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    def start(self, timeout_s: float = 20.0, *, all_up: bool = True) -> Pairlb:
        """Start and wait until it listens and (``all_up``) every backend is in rotation at
        full weight (health checks passed, slow start over)."""
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PYTHON, "-m", "lb", "run", "-c", str(self.config)],
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_until(self._admin_up, timeout_s, "pairlb admin /status", 0.05)
            wait_port(self.listen_port, timeout_s)
            if all_up:
                wait_until(self.all_in_rotation, timeout_s, "every backend in rotation", 0.05)
        except BaseException:
            self.close()
            raise
        return self

    def _admin_up(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"pairlb exited with {self.proc.returncode}:\n{self.logs()}")
        try:
            return http("GET", self.admin_url + "/status", timeout_s=1.0)[0] == 200
        except OSError:
            return False

    def all_in_rotation(self) -> bool:
        return all(
            b["in_rotation"] and b["effective_weight"] == b["weight"]
            for b in self.backend_states().values()
        )

    def status(self) -> dict[str, Any]:
        status, _, body = http("GET", self.admin_url + "/status", timeout_s=3.0)
        assert status == 200, (status, body)
        out: dict[str, Any] = json.loads(body)
        return out

    def backend_states(self, pool: str = "web") -> dict[str, dict[str, Any]]:
        """``{backend: its /status entry}`` for one pool."""
        return backend_states(self.status(), pool)

    async def action_async(
        self, backend: str, action: str, pool: str = "web"
    ) -> tuple[int, dict[str, Any]]:
        """The same inside a running loop."""
        resp = await request(
            self.admin_port,
            "POST",
            f"/backends/{pool}/{backend}/{action}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        return resp.status, json.loads(resp.body or b"{}")

    def action(self, backend: str, action: str, pool: str = "web") -> tuple[int, dict[str, Any]]:
        """Admin API: POST /backends/POOL/BACKEND/(drain|enable|maintenance)."""
        status, _, body = http(
            "POST",
            f"{self.admin_url}/backends/{pool}/{backend}/{action}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        return status, json.loads(body or b"{}")

    def reload(self) -> None:
        """SIGHUP: re-read the config file (write it first with ``write_config``)."""
        assert self.proc is not None
        _signal_pid(self.proc, signal.SIGHUP)

    def logs(self, tail: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-tail:] if self.log.exists() else ""

    def log_lines(self, *needles: str) -> list[str]:
        """Lines of the log that contain every one of ``needles``."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [ln for ln in text.splitlines() if all(n in ln for n in needles)]

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 10.0)

    def __enter__(self) -> Pairlb:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def backend_states(status: Mapping[str, Any], pool: str = "web") -> dict[str, dict[str, Any]]:
    for p in status["pools"]:
        if p["name"] == pool:
            return {b["name"]: b for b in p["backends"]}
    raise KeyError(pool)


# -- status over time -------------------------------------------------------------------------


@dataclass(slots=True)
class StatusWatch:
    """Polls pairlb's /status every ``interval_s`` in the running loop; keeps every answer.

    Use as ``async with StatusWatch(lb.admin_port) as watch:``; then :meth:`first` finds when
    a backend first matched a predicate, :meth:`wait` blocks (with a deadline) until it does.
    """

    admin_port: int
    interval_s: float = 0.02
    pool: str = "web"
    history: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    errors: int = 0
    _task: asyncio.Task[None] | None = None
    _closing: bool = False

    async def __aenter__(self) -> StatusWatch:
        await self.poll()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing = True
        if self._task is not None:
            await _cancel_all([self._task])

    async def _run(self) -> None:
        # The flag, not only cancel(), ends the loop: a cancel swallowed by a library race
        # (asyncio.timeout/wait_for on 3.11) must not leave the poller running forever.
        while not self._closing:
            await asyncio.sleep(self.interval_s)
            with contextlib.suppress(OSError, HttpError, TimeoutError, ValueError):
                await self.poll()

    async def poll(self) -> dict[str, Any]:
        """One /status now (also recorded)."""
        t = time.monotonic()
        try:
            resp = await request(self.admin_port, "GET", "/status", timeout_s=2.0)
        except (OSError, HttpError, TimeoutError):
            self.errors += 1
            raise
        st: dict[str, Any] = json.loads(resp.body)
        self.history.append((t, st))
        return st

    def latest(self) -> dict[str, Any]:
        return self.history[-1][1]

    async def wait_rotation_applied(self, timeout_s: float = 5.0) -> float:
        """Wait until every worker (retiring ones of a rolling reload too) routes by the
        rotation /status shows now (or a later one); returns when a poll's answer said so:
        a request that starts after that is routed by it (each worker reports the
        snapshot it applied, ``rotation_version``). While a change waits for its push
        (``pending``), the version to wait for is the one of the first answer without."""
        async with asyncio.timeout(timeout_s):
            st = await self.poll()
            while st["rotation"]["pending"]:
                await asyncio.sleep(0.005)
                st = await self.poll()
            target = st["rotation"]["version"]
            while not st["workers"] or any(
                w["rotation_version"] < target
                for w in [*st["workers"], *st.get("workers_retiring", [])]
                if w.get("alive", True)  # not a slot in its restart backoff
            ):
                await asyncio.sleep(self.interval_s / 2)
                st = await self.poll()
        return time.monotonic()

    def backends(self, st: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        return backend_states(st, self.pool)

    def first(
        self, backend: str, pred: Callable[[dict[str, Any]], bool], after: float = 0.0
    ) -> float | None:
        """Time (the poll's start) when ``backend`` first matched ``pred`` at or after ``after``."""
        for t, st in self.history:
            if t >= after:
                b = self.backends(st).get(backend)
                if b is not None and pred(b):
                    return t
        return None

    def values(self, backend: str, key: str, after: float = 0.0) -> list[Any]:
        """Every distinct consecutive value ``backend[key]`` took after ``after`` (flaps show)."""
        out: list[Any] = []
        for t, st in self.history:
            b = self.backends(st).get(backend)
            if t >= after and b is not None and (not out or out[-1] != b[key]):
                out.append(b[key])
        return out

    async def wait(
        self,
        backend: str,
        pred: Callable[[dict[str, Any]], bool],
        timeout_s: float,
        what: str,
        after: float = 0.0,
    ) -> float:
        """Wait until ``backend`` matches; return the time it first did."""
        found = await wait_until_async(
            lambda: self.first(backend, pred, after), timeout_s, f"{backend}: {what}", 0.01
        )
        assert found is not None
        return found


# -- load -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """One request as the client saw it."""

    t0: float
    t1: float
    method: str
    path: str
    client_id: str
    status: int
    """HTTP status, or 0 when no response arrived (see ``error``)."""
    backend: str
    """``X-Backend`` of the response ("" when pairlb answered itself or nothing came)."""
    error: str = ""
    body: bytes = b""
    """Up to 200 bytes of the body of a non-2xx response."""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 400

    @property
    def latency_s(self) -> float:
        return self.t1 - self.t0


RequestSpec = tuple[str, str]
"""(method, path); POSTs carry a small body."""


class Load:
    """``clients`` concurrent keep-alive clients through pairlb, bounded in time and requests.

    Each client loops over ``mix`` (a cycle of (method, path)), one request at a time, with
    ``think_s`` between requests, until stopped, ``max_requests`` in total, or
    ``max_duration_s``. Every request carries a unique ``X-Client-Id`` (``PREFIX-c-n``). Errors
    never stop a client; the next request opens a new connection.
    """

    def __init__(
        self,
        port: int,
        *,
        clients: int = 8,
        mix: Sequence[RequestSpec] = (("GET", "/"),),
        think_s: float = 0.005,
        timeout_s: float = 5.0,
        max_requests: int = 100_000,
        max_duration_s: float = 60.0,
        prefix: str = "r",
    ) -> None:
        self.port = port
        self.clients = clients
        self.mix = list(mix)
        self.think_s = think_s
        self.timeout_s = timeout_s
        self.max_requests = max_requests
        self.max_duration_s = max_duration_s
        self.prefix = prefix
        self.samples: list[Sample] = []
        self._sent = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.started_at = 0.0
        self.stopped_at = 0.0

    async def __aenter__(self) -> Load:
        self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]

    async def stop(self) -> list[Sample]:
        """Let every client finish its current request (bounded by ``timeout_s``)."""
        self._stop.set()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=self.timeout_s + 2.0)
            await _cancel_all(self._tasks)
            self._tasks = []
        if not self.stopped_at:
            self.stopped_at = time.monotonic()
        return self.samples

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks)

    async def _client(self, index: int) -> None:
        conn = Connection(self.port)
        deadline = self.started_at + self.max_duration_s
        try:
            for n in itertools.count():
                if self._stop.is_set() or self._sent >= self.max_requests:
                    break
                if time.monotonic() >= deadline:
                    break
                self._sent += 1
                method, path = self.mix[n % len(self.mix)]
                cid = f"{self.prefix}-{index}-{n}"
                await self._one(conn, method, path, cid)
                if self.think_s:
                    await asyncio.sleep(self.think_s)
        finally:
            await conn.close()

    async def _one(self, conn: Connection, method: str, path: str, cid: str) -> None:
        body = f"payload of {cid}\n".encode() if method in ("POST", "PUT") else b""
        t0 = time.monotonic()
        try:
            resp = await conn.request(
                method, path, headers={"X-Client-Id": cid}, body=body, timeout_s=self.timeout_s
            )
        except (OSError, HttpError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            self.samples.append(Sample(t0, time.monotonic(), method, path, cid, 0, "", error))
            return
        self.samples.append(
            Sample(
                t0,
                time.monotonic(),
                method,
                path,
                cid,
                resp.status,
                resp.headers.get("x-backend", ""),
                "",
                b"" if 200 <= resp.status < 300 else resp.body[:200],
            )
        )

    # -- questions about what happened ------------------------------------------------------

    def window(self, since: float = 0.0, until: float = float("inf"), method: str | None = None
               ) -> list[Sample]:
        """Samples that *started* in [since, until)."""
        return [
            s for s in self.samples
            if since <= s.t0 < until and (method is None or s.method == method)
        ]

    def failures(self, since: float = 0.0, until: float = float("inf"),
                 method: str | None = None) -> list[Sample]:
        return [s for s in self.window(since, until, method) if not s.ok]

    def by_backend(self, since: float = 0.0, until: float = float("inf")) -> Counter[str]:
        return Counter(s.backend for s in self.window(since, until) if s.ok)

    def last_answer_from(self, backend: str) -> float | None:
        """When the last response from ``backend`` arrived."""
        times = [s.t1 for s in self.samples if s.backend == backend]
        return max(times) if times else None

    def share(self, backend: str, since: float, until: float, step_s: float) -> list[float]:
        """Share of successful responses answered by ``backend`` in consecutive windows of
        about ``step_s`` (``until - since`` split evenly)."""
        n = max(1, round((until - since) / step_s))
        width = (until - since) / n
        out = []
        for i in range(n):
            c = self.by_backend(since + i * width, since + (i + 1) * width)
            total = sum(c.values())
            out.append(c[backend] / total if total else 0.0)
        return out


def summarize_failures(samples: Iterable[Sample], limit: int = 8) -> str:
    """A short text for assertion messages: counts by (status, error) and a few examples."""
    samples = list(samples)
    kinds = Counter((s.status, s.error.split(":")[0]) for s in samples)
    examples = "; ".join(
        f"{s.method} {s.path} -> {s.status} {s.error or s.body[:80]!r} after {s.latency_s:.3f}s"
        for s in samples[:limit]
    )
    return f"{len(samples)} failures {dict(kinds)}; e.g. {examples}"


# -- the backend server (script mode) -------------------------------------------------------


def serve_backend(argv: Sequence[str]) -> int:
    """``backend NAME HOST:PORT [--journal FILE] [--traffic-status N]``: lab.backend_app with a
    kill-proof journal of client ids and optional failing traffic."""
    from aiohttp import web
    from aiohttp.typedefs import Handler

    from lab.backend_app import make_app, parse_address

    ap = argparse.ArgumentParser(prog="e2e_helpers.py backend")
    ap.add_argument("name")
    ap.add_argument("address")
    ap.add_argument("--journal")
    ap.add_argument("--traffic-status", type=int)
    args = ap.parse_args(argv)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    fd = os.open(args.journal, flags, 0o644) if args.journal else -1
    control = ("/healthz", "/stats", "/admin")
    traffic = {"status": args.traffic_status or 0}

    @web.middleware
    async def extra(request: web.Request, handler: Handler) -> web.StreamResponse:
        cid = request.headers.get("X-Client-Id")
        if fd >= 0 and cid:
            # One write(2) per request straight to the kernel: on disk even after kill -9.
            os.write(fd, f"{request.method} {cid}\n".encode())
        if request.path.startswith(control):
            return await handler(request)
        delay = request.query.get("delay")
        if delay:
            await asyncio.sleep(float(delay))
        if traffic["status"]:
            return web.Response(status=traffic["status"], text=f"{args.name} fails traffic\n")
        return await handler(request)

    async def set_traffic(request: web.Request) -> web.Response:
        traffic["status"] = int(request.match_info["code"])
        return web.Response(text=f"traffic {traffic['status']}\n")

    app = make_app(args.name)
    app.middlewares.append(extra)  # inside backend_app's own middleware: counted, tagged
    app.router.add_post("/admin/traffic/{code:\\d+}", set_traffic)
    host, port = parse_address(args.address)
    web.run_app(app, host=host, port=port, print=None, access_log=None)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["backend"]:
        sys.exit(serve_backend(sys.argv[2:]))
    print(__doc__)
    sys.exit(2)
