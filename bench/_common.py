"""Helpers shared by the benchmark scripts in bench/.

Benchmarks start real servers (nginx, HAProxy, pairlb) on 127.0.0.1, drive them with wrk and
read CPU time and memory from /proc. Everything here exists so that a script can do that
without leaking a process or a port: processes are started by us, tracked by PID (and start
time, so a recycled PID is never signalled) and stopped by PID, never by name.

Linux only (/proc, taskset). Imports nothing from lb, healthcheck or failover: a benchmark
must measure the installed command, not import its internals.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# --------------------------------------------------------------------------- ports


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if nothing listens on host:port (we can bind it ourselves right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports free now, leased as the test suite leases its own (lab.ports): a
    benchmark beside a test run never takes a port a test was handed and has not bound yet."""
    repo = str(Path(__file__).resolve().parents[1])
    if repo not in sys.path:
        sys.path.append(repo)
    from lab.ports import free_ports as leased

    return leased(n, host)


def require_free(ports: Sequence[int], host: str = "127.0.0.1") -> None:
    """Raise if any port is taken, so a stray server is never measured by mistake."""
    taken = [p for p in ports if not port_is_free(p, host)]
    if taken:
        raise RuntimeError(f"ports already in use on {host}: {taken}")


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    comm: str
    cpu_s: float
    """utime + stime of the process itself (all its threads)."""
    child_cpu_s: float
    """cutime + cstime: time of children it has already reaped."""
    start_ticks: int


def read_stat(pid: int) -> ProcStat | None:
    """Parse /proc/PID/stat; None if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm may contain spaces and parentheses: split at the last ')'.
    lpar, rpar = raw.index("("), raw.rindex(")")
    comm = raw[lpar + 1 : rpar]
    f = raw[rpar + 2 :].split()
    # f[0] is field 3 (state); utime is field 14 -> f[11].
    return ProcStat(
        pid=pid,
        ppid=int(f[1]),
        comm=comm,
        cpu_s=(int(f[11]) + int(f[12])) / CLK_TCK,
        child_cpu_s=(int(f[13]) + int(f[14])) / CLK_TCK,
        start_ticks=int(f[19]),
    )


def _all_stats() -> dict[int, ProcStat]:
    out: dict[int, ProcStat] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st is not None:
                out[st.pid] = st
    return out


def tree_pids(root: int) -> list[int]:
    """root and all its live descendants, root first."""
    stats = _all_stats()
    if root not in stats:
        return []
    children: dict[int, list[int]] = {}
    for st in stats.values():
        children.setdefault(st.ppid, []).append(st.pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return out


def tree_cpu_by_pid(root: int) -> dict[int, float]:
    """CPU seconds per process of a tree (own time + time of children it has reaped)."""
    out = {}
    for pid in tree_pids(root):
        st = read_stat(pid)
        if st is not None:
            out[pid] = st.cpu_s + st.child_cpu_s
    return out


def tree_cpu_s(root: int) -> float:
    """CPU seconds of a process tree, including children it has reaped.

    A child that exits and is reaped moves its time into the parent's cutime, so the delta of
    this sum over an interval counts every process that ran in the tree during it.
    """
    return sum(tree_cpu_by_pid(root).values())


def status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM ...); None if absent or gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@dataclass(frozen=True)
class ProcMem:
    pid: int
    comm: str
    rss_kb: int
    hwm_kb: int
    """Peak RSS since the process started."""


def tree_mem(root: int) -> list[ProcMem]:
    """RSS of every process in the tree, root first."""
    out = []
    for pid in tree_pids(root):
        st = read_stat(pid)
        rss = status_kb(pid, "VmRSS")
        if st is None or rss is None:
            continue
        out.append(ProcMem(pid, st.comm, rss, status_kb(pid, "VmHWM") or rss))
    return out


def cpu_times() -> dict[str, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies from /proc/stat, keyed 'cpu0', 'cpu1', ..."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
            idle = v[3] + v[4]
            total = sum(v)
            out[name] = (total - idle, total)
    return out


def steal_s() -> float:
    """Seconds of CPU time the hypervisor gave to someone else, all CPUs, since boot.

    Counted in busy_cpu_s (so in foreign_load) too; kept apart to tell a noisy host from
    noisy neighbours inside the guest.
    """
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu "):
            return int(line.split()[8]) / CLK_TCK
    return 0.0


def busy_cpu_s(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> float:
    """CPU seconds all CPUs spent busy between snapshots (every process, irq and softirq)."""
    return sum(after[k][0] - b for k, (b, _) in before.items() if k in after) / CLK_TCK


def cpu_busy(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> dict[str, float]:
    """Fraction of each CPU that was busy (user+system+irq+softirq+steal) between snapshots."""
    out = {}
    for cpu, (b0, t0) in before.items():
        b1, t1 = after.get(cpu, (b0, t0))
        out[cpu] = (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
    return out


def foreign_load(own_roots: Sequence[int], window_s: float = 0.5) -> float:
    """Cores kept busy over window_s by anything outside the given process trees.

    Kernel work done on behalf of a process (loopback TCP in softirq) is charged to that
    process's stime on this kernel, so what remains is other people's processes.
    """
    own0 = sum(tree_cpu_s(p) for p in own_roots) + sum(os.times()[:2])
    t0, m0 = cpu_times(), time.monotonic()
    time.sleep(window_s)
    t1, m1 = cpu_times(), time.monotonic()
    own1 = sum(tree_cpu_s(p) for p in own_roots) + sum(os.times()[:2])
    return max(0.0, busy_cpu_s(t0, t1) - (own1 - own0)) / (m1 - m0)


def wait_quiet(own_roots: Sequence[int], max_wait_s: float, threshold_cores: float = 0.1) -> float:
    """Wait up to max_wait_s for foreign load to fall below threshold_cores; return the last
    reading (the caller decides whether to go on anyway)."""
    deadline = time.monotonic() + max_wait_s
    load = foreign_load(own_roots)
    while load >= threshold_cores and time.monotonic() < deadline:
        load = foreign_load(own_roots)
    return load


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG(SIGKILL): a server we started dies if this script is SIGKILLed."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)


def taskset_prefix(cpus: str | None) -> list[str]:
    """``taskset -c CPUS`` so the command and every process it forks stay on those CPUs."""
    if not cpus:
        return []
    exe = shutil.which("taskset")
    if exe is None:
        raise RuntimeError("taskset not found (util-linux); use --no-pin")
    return [exe, "-c", cpus]


@dataclass
class Managed:
    """A process this script started, remembered by PID and start time."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    start_ticks: int
    known: dict[int, int] = field(default_factory=dict)
    """Every PID seen in its tree -> start ticks, so we can kill orphans by PID later."""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def remember_tree(self) -> list[int]:
        pids = tree_pids(self.pid)
        for pid in pids:
            st = read_stat(pid)
            if st is not None:
                self.known.setdefault(pid, st.start_ticks)
        return pids

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "\n".join(lines[-n:])


def start_process(
    name: str, argv: Sequence[str], log_path: Path, *, cpus: str | None = None
) -> Managed:
    """Start argv (optionally under taskset), stdout+stderr to log_path, in its own session.

    Its own session keeps a Ctrl-C at the terminal from reaching it before our cleanup runs.
    """
    full = [*taskset_prefix(cpus), *argv]
    with open(log_path, "ab") as log:
        p = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    st = read_stat(p.pid)
    m = Managed(name, p, log_path, st.start_ticks if st else 0)
    m.known[p.pid] = m.start_ticks
    return m


def _signal_if_same(pid: int, start_ticks: int, sig: int) -> None:
    st = read_stat(pid)
    if st is None or st.start_ticks != start_ticks:
        return  # gone, or the PID now belongs to someone else
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def stop_process(m: Managed, timeout_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """sig to the root PID, wait up to timeout_s, then SIGKILL the root and every known PID."""
    if m.alive():
        m.remember_tree()
        with contextlib.suppress(ProcessLookupError):
            m.popen.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            m.popen.wait(timeout=timeout_s)
    if m.alive():
        with contextlib.suppress(ProcessLookupError):
            m.popen.kill()
        m.popen.wait(timeout=5)
    deadline = time.monotonic() + 2.0
    for pid, ticks in m.known.items():
        if pid == m.pid:
            continue
        while read_stat(pid) is not None and time.monotonic() < deadline:
            time.sleep(0.02)  # give orphans a moment to notice the parent is gone
        _signal_if_same(pid, ticks, signal.SIGKILL)


class ProcessSet:
    """Owns every process a benchmark starts; ``close()`` stops them all, newest first."""

    def __init__(self) -> None:
        self.procs: list[Managed] = []

    def start(
        self, name: str, argv: Sequence[str], log_path: Path, *, cpus: str | None = None
    ) -> Managed:
        m = start_process(name, argv, log_path, cpus=cpus)
        self.procs.append(m)
        return m

    def stop(self, m: Managed, timeout_s: float = 10.0) -> None:
        stop_process(m, timeout_s)
        if m in self.procs:
            self.procs.remove(m)

    def close(self) -> None:
        while self.procs:
            m = self.procs.pop()
            try:
                stop_process(m)
            except Exception as exc:  # keep stopping the others
                print(f"warning: stopping {m.name} pid={m.pid}: {exc}")

    def __enter__(self) -> ProcessSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so try/finally cleanup runs as it does for Ctrl-C."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def http_get_status(host: str, port: int, path: str, timeout_s: float = 1.0) -> int | None:
    """Status of one GET, or None if the connection failed."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def wait_http_ok(
    host: str,
    port: int,
    path: str,
    timeout_s: float,
    *,
    proc: Managed | None = None,
    successes: int = 1,
) -> None:
    """Wait until `successes` GETs in a row answer 2xx; raise if proc dies or time runs out."""
    deadline = time.monotonic() + timeout_s
    ok, last = 0, None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode} before answering; "
                f"log tail:\n{proc.log_tail()}"
            )
        last = http_get_status(host, port, path)
        if last is not None and 200 <= last < 300:
            ok += 1
            if ok >= successes:
                return
            continue
        ok = 0
        time.sleep(0.05)
    raise RuntimeError(
        f"http://{host}:{port}{path} did not answer 2xx within {timeout_s}s (last: {last})"
    )


# --------------------------------------------------------------------------- config writers

_NGINX_COMMON = """\
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 65536;
pid {dir}/{name}.pid;
error_log {dir}/{name}.error.log warn;
events {{ worker_connections {connections}; }}
"""

def nginx_head(workers: int, workdir: Path, name: str, connections: int = 8192) -> str:
    """The top of every nginx config here (main context and events)."""
    return _NGINX_COMMON.format(workers=workers, dir=workdir, name=name, connections=connections)


_NGINX_TEMP = """\
    client_body_temp_path {dir}/{name}-tmp/body;
    proxy_temp_path {dir}/{name}-tmp/proxy;
    fastcgi_temp_path {dir}/{name}-tmp/fastcgi;
    uwsgi_temp_path {dir}/{name}-tmp/uwsgi;
    scgi_temp_path {dir}/{name}-tmp/scgi;
"""


INLINE_MAX = 2048


def _body(size: int) -> bytes:
    return (b"0123456789abcdef" * (size // 16 + 1))[:size]


def body_path(size: int) -> str:
    """URL path the benchmark backends serve a body of `size` bytes on."""
    return f"/{size}"


def write_nginx_backends(
    workdir: Path, ports: Sequence[int], sizes: Sequence[int], *, workers: int = 1
) -> Path:
    """One nginx serving static bodies of each size on every port (one server block per port).

    Static files with sendfile and open_file_cache and no access log: the cheapest thing nginx
    can serve, so the backends are not the bottleneck. /healthz answers 200 for health checks.
    keepalive_requests is huge so proxies' pooled connections are never recycled mid-run.
    tcp_nopush stays off: with it (TCP_CORK + sendfile) every proxy in front showed a p99 of
    30-40 ms on 64 KiB bodies that direct wrk runs did not; without it, 3-9 ms.
    """
    www = workdir / "www"
    www.mkdir(exist_ok=True)
    for size in sizes:
        (www / str(size)).write_bytes(_body(size))
    # nginx workers may run as nobody: make the tree readable.
    for p in (workdir, www, *www.iterdir()):
        p.chmod(0o755 if p.is_dir() else 0o644)
    name = "backends"
    # Small bodies inline with `return` (no open/fstat/sendfile per request); nginx's config
    # tokens are limited to a few KiB, so larger bodies are static files.
    inline = "".join(
        f'        location = {body_path(size)} {{ return 200 "{_body(size).decode()}"; }}\n'
        for size in sizes
        if size <= INLINE_MAX
    )
    servers = "".join(
        f"""    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {www};
        location = /healthz {{ return 200 "ok\\n"; }}
{inline}        location / {{ }}
    }}
"""
        for port in ports
    )
    text = (
        nginx_head(workers, workdir, name)
        + "http {\n"
        + _NGINX_TEMP.format(dir=workdir, name=name)
        + """    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush off;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    open_file_cache max=64 inactive=300s;
    open_file_cache_valid 300s;
"""
        + servers
        + "}\n"
    )
    conf = workdir / f"{name}.conf"
    conf.write_text(text)
    return conf


def write_nginx_proxy(
    workdir: Path, port: int, backend_ports: Sequence[int], *, workers: int = 1
) -> Path:
    """nginx as a reverse proxy: round robin, upstream keep-alive, X-Forwarded-For.

    Buffers hold a 64 KiB body in memory (the defaults would spill it to a temp file).
    """
    name = "nginx-proxy"
    upstream = "".join(f"        server 127.0.0.1:{p};\n" for p in backend_ports)
    text = (
        nginx_head(workers, workdir, name)
        + "http {\n"
        + _NGINX_TEMP.format(dir=workdir, name=name)
        + f"""    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
    upstream be {{
{upstream}        keepalive 64;
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffer_size 16k;
            proxy_buffers 8 16k;
        }}
    }}
}}
"""
    )
    conf = workdir / f"{name}.conf"
    conf.write_text(text)
    return conf


def write_haproxy(
    workdir: Path, port: int, backend_ports: Sequence[int], *, nbthread: int = 1,
    mode: str = "http", extra: str = "",
) -> Path:
    """HAProxy in HTTP mode: round robin, keep-alive both sides, http-reuse always,
    X-Forwarded-For, an HTTP health check per server (like pairlb's), no logging.

    ``mode="tcp"``: HAProxy ``mode tcp`` instead (bytes piped, one backend connection per
    client connection, round robin over connections), the same HTTP health checks, its
    default buffers (16 KiB, no splicing); ``extra``: lines added to ``defaults`` (e.g.
    ``option splice-auto``)."""
    servers = "".join(
        f"    server s{i} 127.0.0.1:{p} check inter 1s\n" for i, p in enumerate(backend_ports, 1)
    )
    if mode == "tcp":
        proxy_opts = """    mode tcp
    timeout connect 5s
    timeout client 300s
    timeout server 300s
"""
    elif mode == "http":
        proxy_opts = """    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    option http-keep-alive
    option forwardfor
    http-reuse always
"""
    else:
        raise ValueError(f"HAProxy mode {mode!r}: http or tcp")
    proxy_opts += "".join(f"    {ln.strip()}\n" for ln in extra.splitlines() if ln.strip())
    text = f"""global
    nbthread {nbthread}
    maxconn 4096
    pidfile {workdir}/haproxy.pid

defaults
{proxy_opts}
frontend fe
    bind 127.0.0.1:{port}
    default_backend be

backend be
    balance roundrobin
    option httpchk GET /healthz
{servers}"""
    conf = workdir / "haproxy.cfg"
    conf.write_text(text)
    return conf


def write_nginx_many(workdir: Path, host: str, ports: list[int], name: str = "backends") -> Path:
    """One nginx (one worker) answering every request on every host:port with ``200 ok``:
    the cheapest many-port backend farm, so the box's CPU goes to what is measured.
    Keep-alive as in nginx's shipped config (65 s, 1000 requests per connection), for
    checks with ``reuse_connection``; checks that send ``Connection: close`` are closed."""
    prepare_nginx_dirs(workdir, name)
    listens = "".join(f"        listen {host}:{p} backlog=512;\n" for p in ports)
    # Every listening socket takes a connection slot; kept check connections from two
    # nodes need two more per port (past the limit nginx closes idle ones early).
    text = (
        nginx_head(1, workdir, name, connections=4 * len(ports) + 1024)
        + "http {\n"
        + _NGINX_TEMP.format(dir=workdir, name=name)
        + "    access_log off;\n    keepalive_timeout 65s;\n    server {\n"
        + listens
        + '        location / { return 200 "ok\\n"; }\n    }\n}\n'
    )
    conf = workdir / f"{name}.conf"
    conf.write_text(text)
    return conf


def nginx_argv(conf: Path, workdir: Path) -> list[str]:
    """nginx on our own config and prefix; -e so it never opens the system error log."""
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    return [exe, "-p", f"{workdir}/", "-e", f"{workdir}/nginx-startup.log", "-c", str(conf)]


def prepare_nginx_dirs(workdir: Path, name: str) -> None:
    (workdir / f"{name}-tmp").mkdir(exist_ok=True)


def haproxy_argv(conf: Path) -> list[str]:
    exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
    return [exe, "-db", "-f", str(conf)]


# --------------------------------------------------------------------------- wrk


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    latency_us: dict[str, float]
    """Percentile label ('50', '75', '90', '99') -> microseconds."""
    socket_errors: dict[str, int]
    """connect/read/write/timeout counts (all zero when wrk printed none)."""
    non_2xx_3xx: int
    wrk_cpu_s: float
    """CPU time wrk itself used (from wait4), to tell whether the load generator saturated."""
    raw: str

    @property
    def errors(self) -> int:
        return self.non_2xx_3xx + sum(self.socket_errors.values())


_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _to_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"bad wrk time {text!r}")
    return float(m.group(1)) * _UNITS_US[m.group(2)]


def parse_wrk(text: str, wrk_cpu_s: float = 0.0) -> WrkResult:
    """Parse wrk's --latency report; raise ValueError if it is not one."""
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),", text, re.M)
    if not m:
        raise ValueError(f"no request count in wrk output:\n{text}")
    requests = int(m.group(1))
    duration_s = float(m.group(2)) * _UNITS_S[m.group(3)]
    rps_m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    rps = float(rps_m.group(1)) if rps_m else requests / duration_s
    latency = {
        pm.group(1): _to_us(pm.group(2))
        for pm in re.finditer(r"^\s+(\d+)%\s+([\d.]+(?:us|ms|s|m|h))\s*$", text, re.M)
    }
    sock = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    sm = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sm:
        sock = dict(zip(sock, (int(g) for g in sm.groups()), strict=True))
    nm = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    return WrkResult(
        requests=requests,
        duration_s=duration_s,
        rps=rps,
        latency_us=latency,
        socket_errors=sock,
        non_2xx_3xx=int(nm.group(1)) if nm else 0,
        wrk_cpu_s=wrk_cpu_s,
        raw=text,
    )


def _run_load_tool(
    argv: list[str], limit: float, log_path: Path | None, name: str
) -> tuple[str, float]:
    """Run a load generator bounded by ``limit`` seconds; its output and its own CPU time
    (reaped with wait4: if it fills its core, the numbers measure it, not the proxy)."""
    out_path = log_path or Path(f"/tmp/{name}-{os.getpid()}.out")
    with open(out_path, "wb") as out:
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    deadline = time.monotonic() + limit
    status, cpu_s = None, 0.0
    try:
        while True:
            try:
                pid, st, ru = os.wait4(p.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == p.pid:
                status, cpu_s = st, ru.ru_utime + ru.ru_stime
                p.returncode = os.waitstatus_to_exitcode(st)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} ran over {limit}s: killed")
            time.sleep(0.02)
    finally:
        if status is None and p.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(p.pid, 0)
                p.returncode = -9
    text = out_path.read_text(errors="replace")
    if log_path is None:
        with contextlib.suppress(OSError):
            out_path.unlink()
    if p.returncode != 0:
        raise RuntimeError(f"{name} exited {p.returncode}:\n{text}")
    return text, cpu_s


def parse_h2load(text: str, tool_cpu_s: float = 0.0) -> WrkResult:
    """Parse h2load's report as a WrkResult: requests done, req/s, latency (h2load gives the
    mean and the max per request, as "mean" and "max"; no percentiles); ValueError if it is
    not one."""
    m = re.search(r"^finished in ([\d.]+)(us|ms|s|m|h), ([\d.]+) req/s", text, re.M)
    r = re.search(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", text, re.M)
    if not m or not r:
        raise ValueError(f"no h2load report:\n{text}")
    codes = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    lat = re.search(r"^time for request:\s+([\d.]+\w+)\s+([\d.]+\w+)\s+([\d.]+\w+)", text, re.M)
    latency = {"mean": _to_us(lat.group(3)), "max": _to_us(lat.group(2))} if lat else {}
    done = int(r.group(3))
    return WrkResult(
        requests=done,
        duration_s=float(m.group(1)) * _UNITS_S[m.group(2)],
        rps=float(m.group(3)),
        latency_us=latency,
        socket_errors={"connect": 0, "read": int(r.group(6)), "write": 0,
                       "timeout": int(r.group(7))},
        non_2xx_3xx=int(codes.group(3)) + int(codes.group(4)) if codes else 0,
        wrk_cpu_s=tool_cpu_s,
        raw=text,
    )


def run_h2load_rate(
    url: str,
    duration_s: int,
    rate: float,
    *,
    connections: int = 50,
    cpus: str | None = None,
    log_path: Path | None = None,
    headers: Sequence[str] = (),
) -> WrkResult:
    """A fixed request rate: ``h2load --h1`` with ``connections`` keep-alive clients each
    sending ``rate / connections`` requests per second for ``duration_s``, bounded in time.
    At a rate the proxy keeps up with, CPU per request is the proxy's cost without the
    batching a saturated event loop gets (wrk measures that)."""
    exe = shutil.which("h2load")
    if exe is None:
        raise RuntimeError("h2load not found (Debian: nghttp2-client)")
    argv = [
        *taskset_prefix(cpus),
        exe, "--h1", "-t1", f"-c{connections}", f"--rps={rate / connections:.3f}",
        f"-D{duration_s}", "--warm-up-time=0",
        *(x for h in headers for x in ("-H", h)),
        url,
    ]
    text, cpu_s = _run_load_tool(argv, duration_s + 30.0, log_path, "h2load")
    return parse_h2load(text, cpu_s)


def run_wrk(
    url: str,
    duration_s: int,
    *,
    connections: int = 50,
    threads: int = 1,
    cpus: str | None = None,
    timeout_s: float | None = None,
    log_path: Path | None = None,
    headers: Sequence[str] = (),
) -> WrkResult:
    """Run ``wrk -tT -cC -dDs --latency URL`` bounded in time and parse its report
    (``headers``: ``-H`` lines added to every request, e.g. ``Connection: close``).

    Reaped with wait4 so wrk's own CPU time is known: if wrk plus the backends fill their core,
    the numbers measure the load generator, not the proxy.
    """
    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk not found")
    argv = [
        *taskset_prefix(cpus),
        exe,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--timeout",
        "5s",
        "--latency",
        *(x for h in headers for x in ("-H", h)),
        url,
    ]
    limit = timeout_s if timeout_s is not None else duration_s + 20.0
    text, cpu_s = _run_load_tool(argv, limit, log_path, "wrk")
    return parse_wrk(text, cpu_s)


def tool_version(argv: Sequence[str]) -> str:
    """First line a tool prints about its version (stdout or stderr), or '?'."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"? ({exc.__class__.__name__})"
    text = (r.stdout + r.stderr).strip()
    return text.splitlines()[0] if text else "?"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "?"


__all__ = [
    "CLK_TCK",
    "Managed",
    "ProcMem",
    "ProcStat",
    "ProcessSet",
    "WrkResult",
    "body_path",
    "busy_cpu_s",
    "cpu_busy",
    "cpu_model",
    "cpu_times",
    "foreign_load",
    "free_ports",
    "haproxy_argv",
    "http_get_status",
    "nginx_argv",
    "parse_h2load",
    "parse_wrk",
    "port_is_free",
    "prepare_nginx_dirs",
    "read_stat",
    "require_free",
    "run_h2load_rate",
    "run_wrk",
    "sigterm_as_exit",
    "start_process",
    "status_kb",
    "steal_s",
    "stop_process",
    "taskset_prefix",
    "tool_version",
    "tree_cpu_by_pid",
    "tree_cpu_s",
    "tree_mem",
    "tree_pids",
    "wait_http_ok",
    "wait_quiet",
    "write_haproxy",
    "write_nginx_backends",
    "write_nginx_proxy",
]
