"""Throw-away network-namespace topologies for tests, the demo and the chaos bench.

`build()` makes one namespace per node plus one that holds the bridge, wires each node to the
bridge with a veth, and sets every sysctl that matters explicitly (new namespaces inherit the
host's IPv4 defaults). All names carry a random `plbXXXX` prefix; `Topology.teardown()` (also
the context-manager exit) removes everything even after a failure, and `cleanup(prefix)` removes
the leftovers of a crashed run.

The root namespace is never touched: devices are created directly inside our namespaces
(`ip link add ... netns NS`), and code that must run "inside" a node runs in a thread that
called setns(2), which moves only that thread. Addresses come from TEST-NET (192.0.2.0/24,
198.51.100.0/24) and ULA (fd00::/8) and exist only inside our namespaces.

Must not import pyroute2 (lab.vipwatch is the lab's one netlink reader) nor healthcheck or
failover: this is infrastructure their tests stand on. Tests import it as ``netns``
(lab/netns.py aliases it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import errno
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Coroutine, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal, TypeVar

T = TypeVar("T")

PREFIX = "plb"
NODE_IFNAME = "eth0"
BRIDGE_IFNAME = "br0"
_CLONE_NEWNET = 0x40000000
_NETNS_DIR = "/run/netns"
_NODE_NAME = re.compile(r"^[a-z][a-z0-9]{0,6}$")  # prefix(7) + "-" + name(7) = 15 = IFNAMSIZ-1
_RUN_PREFIX = re.compile(r"^plb[0-9a-f]{4,}$")
_CMD_TIMEOUT_S = 10.0

#: Sysctls every node gets. Why each: rp_filter would drop replies from a VIP that moved;
#: arp_ignore=1/arp_announce=2 stop a node answering ARP for an address it does not hold on
#: that interface (the usual VIP setup); ip_nonlocal_bind lets a standby bind the VIP before it
#: owns it; promote_secondaries keeps the VIP when a primary address is removed.
BASE_SYSCTLS: Mapping[str, str] = {
    "net/ipv4/conf/all/rp_filter": "0",
    "net/ipv4/conf/default/rp_filter": "0",
    "net/ipv4/conf/all/arp_ignore": "1",
    "net/ipv4/conf/default/arp_ignore": "1",
    "net/ipv4/conf/all/arp_announce": "2",
    "net/ipv4/conf/default/arp_announce": "2",
    "net/ipv4/conf/all/promote_secondaries": "1",
    "net/ipv4/conf/default/promote_secondaries": "1",
    "net/ipv4/ip_nonlocal_bind": "1",
    "net/ipv4/ip_forward": "0",
}
#: IPv6 on, without duplicate address detection (no tentative addresses, no DAD noise).
IPV6_ON_SYSCTLS: Mapping[str, str] = {
    "net/ipv6/conf/all/disable_ipv6": "0",
    "net/ipv6/conf/default/disable_ipv6": "0",
    "net/ipv6/conf/all/accept_dad": "0",
    "net/ipv6/conf/default/accept_dad": "0",
    "net/ipv6/conf/default/dad_transmits": "0",
    "net/ipv6/ip_nonlocal_bind": "1",
}
IPV6_OFF_SYSCTLS: Mapping[str, str] = {
    "net/ipv6/conf/all/disable_ipv6": "1",
    "net/ipv6/conf/default/disable_ipv6": "1",
}


class NetnsError(RuntimeError):
    """A namespace operation failed; the message carries the command and its stderr."""


def skip_reason() -> str | None:
    """Why namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_NET_RAW) to create network namespaces"
    for tool in ("ip", "bridge"):
        if shutil.which(tool) is None:
            return f"iproute2 `{tool}` not found on PATH"
    if not os.path.exists("/proc/self/ns/net"):
        return "kernel without network namespaces"
    return None


# -- commands -------------------------------------------------------------------------------


def _run(
    argv: list[str], *, input_text: str | None = None, check: bool = True,
    timeout_s: float = _CMD_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run a command with a deadline; a failure raises NetnsError naming command and stderr."""
    try:
        proc = subprocess.run(
            argv, input=input_text, capture_output=True, text=True, timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"{' '.join(argv)}: timed out after {timeout_s}s") from e
    if check and proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        raise NetnsError(f"{' '.join(argv)}: exit {proc.returncode}: {detail}")
    return proc


def _ip_batch(lines: Iterable[str], *, netns: str | None = None, force: bool = False) -> None:
    """Run many `ip` commands in one process (one fork instead of dozens)."""
    argv = ["ip"]
    if netns is not None:
        argv += ["-n", netns]
    if force:
        argv.append("-force")
    argv += ["-batch", "-"]
    _run(argv, input_text="".join(line + "\n" for line in lines), check=not force)


def list_namespaces(prefix: str = PREFIX) -> list[str]:
    """Names of existing namespaces starting with `prefix` (all plb* runs by default)."""
    try:
        names = os.listdir(_NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def namespace_pids(netns: str) -> list[int]:
    """PIDs of processes whose network namespace is `netns` (never this process)."""
    proc = _run(["ip", "netns", "pids", netns], check=False)
    me = os.getpid()
    return [int(p) for p in proc.stdout.split() if p.strip().isdigit() and int(p) != me]


def kill_pids(pids: Collection[int], *, grace_s: float = 1.0) -> None:
    """SIGCONT (a stopped process cannot die of SIGTERM), SIGTERM, wait, then SIGKILL."""
    me = os.getpid()
    pids = [p for p in pids if p != me]
    for sig in (signal.SIGCONT, signal.SIGTERM):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = [p for p in alive if _alive(p)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 2.0
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = [p for p in alive if _alive(p)]


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def cleanup(prefix: str) -> list[str]:
    """Remove every namespace of one run (`plbXXXX`), killing its processes first.

    Refuses a bare `plb`: other people's runs on this machine share that prefix.
    """
    if not _RUN_PREFIX.match(prefix):
        raise ValueError(f"cleanup: prefix must look like plb<hex> (got {prefix!r})")
    names = list_namespaces(prefix + "-")
    for name in names:
        kill_pids(namespace_pids(name))
    if names:
        _ip_batch((f"netns del {n}" for n in names), force=True)
    return names


# -- running code inside a namespace ----------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _enter(netns: str) -> None:
    """Move the calling thread (only it) into `netns`."""
    fd = os.open(os.path.join(_NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({netns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in_netns(netns: str, fn: Callable[..., T], *args: Any, timeout_s: float = 30.0) -> T:
    """Run fn(*args) in a fresh thread inside `netns` and return its result (or raise)."""
    fut: Future[T] = Future()

    def target() -> None:
        try:
            _enter(netns)
            fut.set_result(fn(*args))
        except BaseException as e:
            fut.set_exception(e)

    threading.Thread(target=target, name=f"netns-{netns}", daemon=True).start()
    return fut.result(timeout=timeout_s)


class NetnsLoop:
    """An asyncio event loop on a thread that lives in one namespace.

    Everything created on it (netlink and raw sockets, servers) belongs to that namespace, so
    a test can drive an adapter "on lb1" and another "on lb2" from one process.
    """

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self._loop = asyncio.new_event_loop()
        started: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._main, args=(started,), name=f"netns-loop-{netns}", daemon=True,
        )
        self._thread.start()
        started.result(timeout=5.0)

    def _main(self, started: Future[None]) -> None:
        try:
            _enter(self.netns)
        except BaseException as e:
            started.set_exception(e)
            return
        asyncio.set_event_loop(self._loop)
        started.set_result(None)
        self._loop.run_forever()
        self._loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
        """Run a coroutine on the namespace's loop and wait for its result."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout=timeout_s)
        except TimeoutError:
            fut.cancel()
            raise

    def close(self) -> None:
        """Cancel what still runs on the loop, stop it and join the thread (idempotent)."""
        if self._loop.is_closed() or not self._thread.is_alive():
            return

        async def _cancel_all() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(_cancel_all(), timeout_s=5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5.0)

    def __enter__(self) -> NetnsLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_sysctls(netns: str, values: Mapping[str, str]) -> None:
    """Write /proc/sys entries for `netns` (the calling thread must already be inside it)."""
    for key, value in values.items():
        path = "/proc/sys/" + key.replace(".", "/")
        try:
            with open(path, "w", encoding="ascii") as f:
                f.write(value)
        except OSError as e:
            raise NetnsError(f"{netns}: sysctl {key}={value}: {e.strerror}") from e


# -- probes ------------------------------------------------------------------------------


class Probe(enum.StrEnum):
    """Outcome of a TCP connect; OPEN and REFUSED both prove the host answered."""

    OPEN = "open"
    REFUSED = "refused"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"

    @property
    def reachable(self) -> bool:
        return self in (Probe.OPEN, Probe.REFUSED)


def tcp_connect(host: str, port: int, timeout_s: float = 0.5) -> Probe:
    """Try one TCP connect from the current namespace (ping is not installed here)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            return Probe.REFUSED
        except TimeoutError:
            return Probe.TIMEOUT
        except OSError as e:
            if e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN):
                return Probe.UNREACHABLE
            raise
    return Probe.OPEN


# -- topology ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One host: its namespace, its single interface (`eth0`) and the bridge port facing it."""

    name: str
    netns: str
    port: str
    mac: str
    ipv4: str
    prefixlen4: int
    ipv6: str | None = None
    prefixlen6: int = 64
    ifname: str = NODE_IFNAME

    @property
    def cidr4(self) -> str:
        return f"{self.ipv4}/{self.prefixlen4}"

    @property
    def cidr6(self) -> str | None:
        return None if self.ipv6 is None else f"{self.ipv6}/{self.prefixlen6}"


@dataclass
class Topology:
    """Namespaces on one bridge. Use as a context manager; teardown() is idempotent."""

    prefix: str
    bridge_netns: str
    nodes: dict[str, Node]
    subnet4: ipaddress.IPv4Network
    subnet6: ipaddress.IPv6Network | None
    bridge: str = BRIDGE_IFNAME
    build_s: float = 0.0
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _loops: list[NetnsLoop] = field(default_factory=list)
    _closed: bool = False

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    def __enter__(self) -> Topology:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    @property
    def namespaces(self) -> list[str]:
        return [n.netns for n in self.nodes.values()] + [self.bridge_netns]

    def host4(self, index: int) -> str:
        """An address of the IPv4 subnet by host number (e.g. 100 for a VIP)."""
        return str(self.subnet4.network_address + index)

    def host6(self, index: int) -> str:
        if self.subnet6 is None:
            raise NetnsError("topology built without IPv6")
        return str(self.subnet6.network_address + index)

    # running things

    def popen(self, node: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start argv inside the node's namespace; teardown kills and reaps it."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            ["ip", "netns", "exec", self.nodes[node].netns, *argv], **kwargs,
        )
        self._procs.append(proc)
        return proc

    def run(
        self, node: str, argv: list[str], *, check: bool = True, timeout_s: float = _CMD_TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv to completion inside the node's namespace (use node='bridge' for the switch)."""
        return _run(["ip", "netns", "exec", self._ns(node), *argv], check=check,
                    timeout_s=timeout_s)

    def call(self, node: str, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in a thread inside the node's namespace (no fork, ~0.1 ms)."""
        return call_in_netns(self._ns(node), fn, *args)

    def loop(self, node: str) -> NetnsLoop:
        """An event loop living in the node's namespace; closed by teardown."""
        lp = NetnsLoop(self._ns(node))
        self._loops.append(lp)
        return lp

    def tcp_probe(self, node: str, host: str, port: int, timeout_s: float = 0.5) -> Probe:
        """TCP connect from inside `node`; REFUSED still means the host is there."""
        return self.call(node, tcp_connect, host, port, timeout_s)

    def sysctl(self, node: str, values: Mapping[str, str]) -> None:
        """Set sysctls (`net/ipv4/...` or `net.ipv4....`) in one node's namespace."""
        ns = self._ns(node)
        self.call(node, _write_sysctls, ns, values)

    # looking

    def ip_json(self, node: str, *args: str) -> list[dict[str, Any]]:
        """`ip -j ARGS` inside the node (e.g. "addr", "show", "dev", "eth0")."""
        out = _run(["ip", "-n", self._ns(node), "-j", *args]).stdout
        result: list[dict[str, Any]] = json.loads(out) if out.strip() else []
        return result

    def addresses(self, node: str, ifname: str = NODE_IFNAME) -> set[str]:
        """CIDRs on the node's interface, as the kernel shows them (`ip -j addr`)."""
        out: set[str] = set()
        for link in self.ip_json(node, "addr", "show", "dev", ifname):
            for a in link.get("addr_info", []):
                out.add(f"{a['local']}/{a['prefixlen']}")
        return out

    def neighbour(self, node: str, address: str, ifname: str = NODE_IFNAME) -> str | None:
        """MAC the node currently maps `address` to, or None (no entry / FAILED / INCOMPLETE)."""
        for entry in self.ip_json(node, "neigh", "show", "to", address, "dev", ifname):
            lladdr = entry.get("lladdr")
            if isinstance(lladdr, str):
                return lladdr
        return None

    def pids(self, node: str) -> list[int]:
        return namespace_pids(self._ns(node))

    # faults

    def cut_link(self, node: str, *, side: Literal["bridge", "node"] = "bridge") -> None:
        """Take the node's link down: its bridge port (node sees NO-CARRIER) or its own eth0."""
        self._link(node, side, "down")

    def restore_link(self, node: str, *, side: Literal["bridge", "node"] = "bridge") -> None:
        self._link(node, side, "up")

    def _link(self, node: str, side: str, state: str) -> None:
        n = self.nodes[node]
        if side == "bridge":
            _run(["ip", "-n", self.bridge_netns, "link", "set", n.port, state])
        elif side == "node":
            _run(["ip", "-n", n.netns, "link", "set", n.ifname, state])
        else:
            raise ValueError(f"side must be 'bridge' or 'node' (got {side!r})")

    def isolate(self, node: str, on: bool = True) -> None:
        """Isolated bridge ports cannot talk to each other but still reach the others.

        Isolating lb1 and lb2 partitions the pair while both still reach the client.
        """
        _run(["bridge", "-n", self.bridge_netns, "link", "set", "dev", self.nodes[node].port,
              "isolated", "on" if on else "off"])

    def kill_all(self, node: str, *, grace_s: float = 1.0) -> list[int]:
        """Kill every process in the node's namespace (SIGCONT, SIGTERM, then SIGKILL)."""
        pids = self.pids(node)
        kill_pids(pids, grace_s=grace_s)
        self._reap()
        return pids

    def _reap(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.1)

    def _ns(self, node: str) -> str:
        return self.bridge_netns if node == "bridge" else self.nodes[node].netns

    # teardown

    def teardown(self) -> None:
        """Stop loops, kill processes, delete namespaces. Safe to call twice or after errors."""
        if self._closed:
            return
        self._closed = True
        for lp in self._loops:
            lp.close()
        for ns in self.namespaces:
            with contextlib.suppress(NetnsError):
                kill_pids(namespace_pids(ns), grace_s=0.5)
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=2.0)
        # Deleting the namespaces destroys the veths and the bridge with them.
        _ip_batch((f"netns del {ns}" for ns in self.namespaces if _exists(ns)), force=True)
        left = list_namespaces(self.prefix + "-")
        if left:
            raise NetnsError(f"teardown left namespaces behind: {left}")


def _exists(netns: str) -> bool:
    return os.path.exists(os.path.join(_NETNS_DIR, netns))


def new_prefix() -> str:
    """A run prefix `plbXXXX` that no existing namespace uses."""
    for _ in range(100):
        prefix = PREFIX + secrets.token_hex(2)
        if not list_namespaces(prefix + "-"):
            return prefix
    raise NetnsError("no free plb prefix")


def build(
    names: Iterable[str],
    *,
    ipv6: Collection[str] | bool = False,
    subnet4: str = "192.0.2.0/24",
    first_host: int = 11,
    sysctls: Mapping[str, str] | None = None,
    prefix: str | None = None,
) -> Topology:
    """Build namespaces `names` on one bridge; node i gets host address first_host + i.

    ipv6: True for every node, or the names of the nodes that get IPv6 (ULA /64, no DAD); the
    others have IPv6 disabled. sysctls: extra values for every node (key `net/ipv4/...`).
    On any failure everything built so far is removed before the error propagates.
    """
    started = time.monotonic()
    names = list(names)
    if not names:
        raise ValueError("build: at least one node")
    if len(set(names)) != len(names):
        raise ValueError(f"build: duplicate node names in {names}")
    for name in names:
        if not _NODE_NAME.match(name) or name == "br":
            raise ValueError(
                f"build: node name {name!r} must be [a-z][a-z0-9]{{0,6}} and not 'br' "
                "(interface names are limited to 15 characters)"
            )
    v6_nodes = set(names) if ipv6 is True else set(ipv6 or ())
    unknown = v6_nodes - set(names)
    if unknown:
        raise ValueError(f"build: ipv6 names unknown nodes {sorted(unknown)}")
    net4 = ipaddress.IPv4Network(subnet4)
    if not (net4.subnet_of(ipaddress.IPv4Network("192.0.2.0/24"))
            or net4.subnet_of(ipaddress.IPv4Network("198.51.100.0/24"))):
        raise ValueError(f"build: subnet4 must lie in TEST-NET-1 or -2 (got {subnet4})")
    if first_host + len(names) >= net4.num_addresses - 1:
        raise ValueError(f"build: {len(names)} nodes do not fit {subnet4} from .{first_host}")
    net6 = None
    if v6_nodes:
        # fdXX:XXXX:XXXX::/64, a random ULA prefix per run (RFC 4193 style)
        h = secrets.token_hex(5)
        net6 = ipaddress.IPv6Network(f"fd{h[:2]}:{h[2:6]}:{h[6:10]}::/64")

    prefix = prefix or new_prefix()
    if not _RUN_PREFIX.match(prefix):
        raise ValueError(f"build: prefix must look like plb<hex> (got {prefix!r})")
    tag = prefix[len(PREFIX):].rjust(4, "0")[-4:]
    nodes: dict[str, Node] = {}
    for i, name in enumerate(names):
        nodes[name] = Node(
            name=name,
            netns=f"{prefix}-{name}",
            port=f"{prefix}-{name}"[:15],
            mac=f"02:{tag[:2]}:{tag[2:]}:00:00:{i + 1:02x}",
            ipv4=str(net4.network_address + first_host + i),
            prefixlen4=net4.prefixlen,
            ipv6=str(net6.network_address + first_host + i) if net6 and name in v6_nodes else None,
        )
    topo = Topology(prefix=prefix, bridge_netns=f"{prefix}-br", nodes=nodes,
                    subnet4=net4, subnet6=net6)
    try:
        _ip_batch(f"netns add {ns}" for ns in topo.namespaces)
        _configure_sysctls(topo, v6_nodes, sysctls or {})
        # Created from here but born inside the target namespaces: the root namespace never
        # holds these devices, not even for a moment.
        br, brns = topo.bridge, topo.bridge_netns
        links = [f"link add name {br} netns {brns} type bridge stp_state 0 forward_delay 0 "
                 "mcast_snooping 0"]
        links += [
            f"link add name {n.port} netns {brns} type veth peer name {n.ifname} "
            f"address {n.mac} netns {n.netns}"
            for n in nodes.values()
        ]
        _ip_batch(links)
        batches: list[tuple[str, list[str]]] = [
            (brns, ["link set lo up", f"link set {br} up"]
             + [f"link set {n.port} master {br} up" for n in nodes.values()])
        ]
        for n in nodes.values():
            lines = ["link set lo up", f"addr add {n.cidr4} dev {n.ifname}"]
            if n.cidr6 is not None:
                lines.append(f"addr add {n.cidr6} dev {n.ifname} nodad")
            lines.append(f"link set {n.ifname} up")
            batches.append((n.netns, lines))
        _parallel_batches(batches)
    except BaseException:
        topo.teardown()
        raise
    topo.build_s = time.monotonic() - started
    return topo


def _configure_sysctls(topo: Topology, v6_nodes: set[str], extra: Mapping[str, str]) -> None:
    """One thread visits every namespace in turn (setns is cheap; forking sysctl is not)."""
    plan: list[tuple[str, dict[str, str]]] = []
    for n in topo.nodes.values():
        values = dict(BASE_SYSCTLS)
        values.update(IPV6_ON_SYSCTLS if n.name in v6_nodes else IPV6_OFF_SYSCTLS)
        values.update(extra)
        plan.append((n.netns, values))
    plan.append((topo.bridge_netns, {**BASE_SYSCTLS, **IPV6_OFF_SYSCTLS}))

    def visit() -> None:
        for ns, values in plan:
            _enter(ns)
            _write_sysctls(ns, values)

    call_in_netns(topo.bridge_netns, visit)


def _parallel_batches(batches: list[tuple[str, list[str]]]) -> None:
    """Run one `ip -n NS -batch` per namespace, all at once."""
    procs = []
    for ns, lines in batches:
        p = subprocess.Popen(
            ["ip", "-n", ns, "-batch", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        procs.append((ns, p, "".join(line + "\n" for line in lines)))
    errors = []
    for ns, p, text in procs:
        try:
            _, err = p.communicate(text, timeout=_CMD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            errors.append(f"{ns}: ip -batch timed out")
            continue
        if p.returncode != 0:
            errors.append(f"{ns}: ip -batch: {err.strip()}")
    if errors:
        raise NetnsError("; ".join(errors))


@contextlib.contextmanager
def topology(names: Iterable[str], **kwargs: Any) -> Iterator[Topology]:
    """`with topology([...]) as t:` or `yield from`-style use in a pytest fixture."""
    topo = build(names, **kwargs)
    try:
        yield topo
    finally:
        topo.teardown()


def main(argv: list[str]) -> int:
    """`python -m lab.netns list` / `python -m lab.netns cleanup plbXXXX` after a crash."""
    if len(argv) == 1 and argv[0] == "list":
        print("\n".join(list_namespaces()))
        return 0
    if len(argv) == 2 and argv[0] == "cleanup":
        try:
            removed = cleanup(argv[1])
        except ValueError as e:
            print(e)
            return 2
        for name in removed:
            print(f"removed {name}")
        return 0
    print("usage: netns.py list | netns.py cleanup plb<hex>")
    return 2


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
