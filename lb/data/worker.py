"""A proxy worker process: accepts on the listening sockets it inherited and proxies.

Started by the control process as ``python -m lb.data.worker CHANNEL_FD INDEX --uid U --gid G``.
Before anything else it gives up every privilege (lb.sysutil.drop_privileges: no
capabilities, no_new_privs, and the unprivileged user when started as root) and raises its
own OOM score; if the drop fails it exits with EXIT_PRIVILEGES and never serves. Everything it knows
arrives over the channel (lb.channel): the validated config with the listener fds, then
pool snapshots. It sends back counters and passive-health ejections. It never starts
accepting before it has a snapshot, so a fresh worker cannot send traffic to a backend
the control process has taken out of rotation.

A worker exits when the channel closes (its control process is gone) after draining, so
a killed control process never leaves orphans serving a stale config.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import socket
import ssl
import sys
import time
from array import array
from typing import Any

from lb import channel, log, sysutil
from lb import worker_link as wl
from lb.config import EFFECTIVE, BackendConfig, Config, ListenerConfig, LoggingConfig, PoolConfig
from lb.data.accesslog import AccessLog
from lb.data.pool import Backend, BackendEntry, Ejection, Pool, build_pool
from lb.data.proxy import ProxyServer
from lb.data.tcpproxy import TcpProxyServer
from lb.stats import Stats
from lb.tls import contexts as tls_contexts
from lb.tls.files import CertBundle
from lb.tls.server import ListenerTls

logger = logging.getLogger("lb.data.worker")

STATS_INTERVAL_S = 0.25


def make_pool(pcfg: PoolConfig) -> Pool:
    """A worker pool whose backends are out of rotation until the first snapshot."""
    return build_pool(
        pcfg.name,
        pcfg.balance,
        [(b.name, *b.host_port, float(b.weight)) for b in pcfg.backends],
        consecutive_failures=pcfg.passive.consecutive_failures if pcfg.passive.enabled else 1 << 30,
        local_eject_s=pcfg.passive.eject_s,
        max_eject_percent=pcfg.passive.max_eject_percent,
        eligible=False,
    )


class Worker:
    def __init__(self, channel_fd: int, index: int) -> None:
        self.channel_fd = channel_fd
        self.index = index
        self.stats = Stats()
        self.config: Config | None = None
        self.pools: dict[str, Pool] = {}
        self.servers: dict[str, ProxyServer | TcpProxyServer] = {}
        self.socks: dict[int, socket.socket] = {}
        """fd -> the inherited listening socket (every slot's: closed at shutdown, so the
        kernel refuses once the control process closed its copies)."""
        self.listener_cfgs: dict[str, ListenerConfig] = {}
        self.fds: dict[str, tuple[int, ...]] = {}
        """Listener -> every slot's socket fd (one: the socket all workers share)."""
        self.help: dict[str, tuple[int, ...]] = {}
        """Listener -> the other slots whose sockets we accept on too (wl.Help)."""
        self.chan: channel.ChannelProtocol | None = None
        self.done = asyncio.Event()
        self.started = False
        self.last_snap: wl.Snap | None = None
        self.stop_timeout_s: float | None = None
        self.tls: dict[str, ListenerTls] = {}
        """TLS listener -> its contexts (kept across reloads: the front context is the one
        the listening server was started with)."""
        self.backend_tls: dict[str, ssl.SSLContext] = {}
        self.gen = 0
        """The config generation applied (a PoolEdit names the one it builds on)."""
        self._starting = asyncio.Lock()
        self.hash_tables: dict[str, wl.HashTable] = {}
        """The last lookup table of each maglev pool."""
        self.alog: AccessLog | None = None
        self._alog_seen = (0, 0, 0)
        """The access log's written/dropped/errors counts already sent in Stats."""
        self._closing_logs: set[asyncio.Task[bool]] = set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(fileno=self.channel_fd)
        # Set before the socket is connected: a ping may arrive in the same loop iteration.
        self.chan = channel.ChannelProtocol(self._on_message, self._on_channel_closed)
        chan = self.chan
        await loop.connect_accepted_socket(lambda: chan, sock)
        for sig in (signal.SIGTERM, signal.SIGINT):
            # The control process owns shutdown; a stray signal to the group must not
            # make a worker vanish mid-request. SIGKILL still works.
            loop.add_signal_handler(sig, lambda: None)
        # logrotate may signal a worker itself (the control process relays SIGUSR2).
        loop.add_signal_handler(signal.SIGUSR1, self._reopen_logs)
        self.send(wl.Hello(os.getpid(), self.index))
        ticker = asyncio.create_task(self._stats_loop())
        try:
            await self.done.wait()
            await self._shutdown(self.stop_timeout_s or 0.0)
        finally:
            ticker.cancel()
            self._send_stats()
            if self.chan is not None:
                self.send(wl.Stopped(os.getpid()))
                if self.chan.transport is not None:
                    self.chan.transport.close()

    def _on_channel_closed(self, exc: Exception | None) -> None:
        if not self.done.is_set():
            logger.warning("event=worker_channel_closed action=drain exc=%r", exc)
            if self.stop_timeout_s is None and self.config is not None:
                self.stop_timeout_s = self.config.node.shutdown_timeout_s
            self.done.set()

    def send(self, msg: wl.Message) -> None:
        if self.chan is not None:
            self.chan.send(wl.encode(msg))

    def _on_message(self, frame: dict[str, Any]) -> None:
        try:
            msg = wl.decode(frame)
        except wl.WorkerLinkError as exc:
            logger.error("event=worker_message_invalid error=%s", exc)
            return
        try:
            if isinstance(msg, wl.Ping):
                self.send(wl.Pong())
            elif isinstance(msg, wl.Snap):
                self._apply_snapshot(msg)
            elif isinstance(msg, wl.Config):
                # Pools and settings now, before the next frame (a PoolEdit of this
                # generation may follow in the same read); starting servers awaits.
                if self._apply_config(msg):
                    asyncio.get_running_loop().create_task(self._config_done(msg.gen))
            elif isinstance(msg, wl.PoolEdit):
                self._apply_edit(msg)
            elif isinstance(msg, wl.HashTable):
                self._apply_hash_table(msg)
            elif isinstance(msg, wl.ReopenLogs):
                self._reopen_logs()
            elif isinstance(msg, wl.Help):
                self.help = msg.slots
                for name in self.servers:
                    self._apply_help(name)
            elif isinstance(msg, wl.CloseIdle):
                for server in self.servers.values():
                    server.close_idle(spare_fresh=True)
            elif isinstance(msg, wl.Stop):
                self.stop_timeout_s = msg.timeout_s
                self.done.set()
        except Exception:
            logger.exception("event=worker_message_failed type=%s", msg.TYPE)

    def _apply_config(self, msg: wl.Config) -> bool:
        """Everything of a config but starting servers; False (and ConfigFailed) on error."""
        try:
            cfg = Config.model_validate(msg.config, context=EFFECTIVE)
            fds = msg.fds
            old = self.config
            self.config = cfg
            self.gen = msg.gen
            if old is None and cfg.node.worker_nice:
                os.nice(cfg.node.worker_nice)
            log.setup(cfg.logging.level, cfg.logging.journald_prefix, f"worker{self.index}")
            self._access_log(cfg.logging)
            pool_cfgs = {p.name: p for p in cfg.pool}
            for name, pcfg in pool_cfgs.items():
                prev = _pool_cfg(old, name)
                pool = self.pools.get(name)
                if pool is not None and prev is not None and _only_backends_differ(prev, pcfg):
                    _edit_pool(pool, prev, pcfg)  # runtime adds and removes: loads kept
                elif pool is None or prev is None or prev != pcfg:
                    self.pools[name] = pool = make_pool(pcfg)
                    ht = self.hash_tables.get(name)
                    if ht is not None and pool.balance == "maglev":
                        pool.set_hash_table(ht.members, array(ht.typecode, ht.table))
            for name in list(self.pools):
                if name not in pool_cfgs:
                    del self.pools[name]
                    self.hash_tables.pop(name, None)
            if self.last_snap is not None:
                # New pool objects start out of rotation; the last snapshot puts back what it
                # knows until the control process sends the one for this generation.
                self._apply_pools(self.last_snap)
            self._apply_tls(cfg, msg.tls)
            for lcfg in cfg.listener:
                server = self.servers.get(lcfg.name)
                if server is not None:
                    server.listener_changed(lcfg)
                    server.update(self.pools[lcfg.pool], pool_cfgs[lcfg.pool])
                    server.routes_changed(self.pools, pool_cfgs, self.backend_tls)
                    self.listener_cfgs[lcfg.name] = lcfg
                elif lcfg.name in fds:
                    self.fds[lcfg.name] = fds[lcfg.name]
                    self.listener_cfgs[lcfg.name] = lcfg
        except Exception as exc:
            logger.exception("event=worker_config_failed")
            self.send(wl.ConfigFailed(msg.gen, str(exc)))
            return False
        return True

    async def _config_done(self, gen: int) -> None:
        try:
            if self.last_snap is not None:
                # Never accept before a snapshot said which backends are in rotation.
                self.started = True
                await self._start_servers()
            self.send(wl.ConfigApplied(gen))
        except Exception as exc:
            logger.exception("event=worker_config_failed")
            self.send(wl.ConfigFailed(gen, str(exc)))

    def _apply_edit(self, msg: wl.PoolEdit) -> None:
        """Backends added or removed at runtime, in place (lb.data.pool: O(1) per backend)."""
        cfg = self.config
        pool = self.pools.get(msg.pool)
        if cfg is None or msg.gen != self.gen or pool is None:
            err = (f"pool_edit for generation {msg.gen} pool {msg.pool} does not apply here "
                   f"(generation {self.gen}, pools {sorted(self.pools)})")
            logger.error("event=worker_pool_edit_refused error=%r", err)
            self.send(wl.ConfigFailed(msg.gen, err))
            return
        pcfg = cfg.pool_by_name(msg.pool)
        gone = set(msg.remove)
        for name in msg.remove:
            pool.remove_backend(name)
        added = [BackendConfig(name=n, address=a, weight=w) for n, a, w in msg.add]
        for b in added:
            pool.remove_backend(b.name)  # the same name at a new address: a new server
            host, port = b.host_port
            pool.add_backend(Backend(pool.name, b.name, host, port, float(b.weight)))
        gone |= {b.name for b in added}
        backends = tuple(b for b in pcfg.backends if b.name not in gone) + tuple(added)
        last = self.last_snap
        if msg.remove and last is not None and msg.pool in last.pools:
            # Forget their entries: with discovery churning names the snapshot would keep
            # every server that ever existed.
            ps = last.pools[msg.pool]
            left = {n: e for n, e in ps.entries.items() if n not in msg.remove}
            self.last_snap = wl.Snap(last.ver, {**last.pools,
                                                msg.pool: wl.PoolSnap(ps.panic, left)})
        new_pcfg = pcfg.model_copy(update={"backends": backends})
        self.config = cfg.model_copy(update={"pool": [
            new_pcfg if p.name == msg.pool else p for p in cfg.pool]})

    def _access_log(self, lc: LoggingConfig) -> None:
        """Open, keep, replace or close the access log as ``[logging]`` says (a reload
        that changes its path or format starts a new writer; the old one flushes)."""
        cur = self.alog
        want = lc.access_log
        if cur is not None and (want is None or cur.dest != want
                                or cur.fmt != lc.access_log_format
                                or cur.buffer_bytes != lc.access_log_buffer_bytes):
            self._count_alog()
            # Its last lines are written while the loop serves (a slow disk must not stall
            # a reload); records logged meanwhile go to the new writer. What it writes
            # after this is counted when it is done.
            old, seen = cur, self._alog_seen
            task = asyncio.get_running_loop().create_task(cur.aclose(1.0))
            self._closing_logs.add(task)

            def closed(t: asyncio.Task[bool]) -> None:
                self._closing_logs.discard(t)
                st = old.stats()
                self.stats.access_log(st["written"] - seen[0], st["dropped"] - seen[1],
                                      st["errors"] - seen[2])

            task.add_done_callback(closed)
            self.alog = cur = None
            self._alog_seen = (0, 0, 0)
        if want is not None and cur is None:
            self.alog = AccessLog(want, lc.access_log_format, lc.access_log_buffer_bytes)
        for server in self.servers.values():
            server.alog = self.alog

    def _reopen_logs(self) -> None:
        if self.alog is not None:
            self.alog.reopen()
            logger.info("event=access_log_reopen path=%s", self.alog.dest)

    def _count_alog(self) -> None:
        alog = self.alog
        if alog is None:
            return
        st = alog.stats()
        now = (st["written"], st["dropped"], st["errors"])
        w0, d0, e0 = self._alog_seen
        self.stats.access_log(now[0] - w0, now[1] - d0, now[2] - e0)
        self._alog_seen = now

    def _apply_hash_table(self, msg: wl.HashTable) -> None:
        """A maglev pool's lookup table (lb.control.hashing): kept, so a pool rebuilt by a
        reload starts with it until the control process sends the next."""
        self.hash_tables[msg.pool] = msg
        pool = self.pools.get(msg.pool)
        if pool is not None and pool.balance == "maglev":
            pool.set_hash_table(msg.members, array(msg.typecode, msg.table))

    def _apply_tls(self, cfg: Config, wire: dict[str, Any]) -> None:
        """Certificates (new connections get them; open ones keep theirs), settings and
        ticket keys of the TLS listeners; backend contexts of the TLS pools. Everything is
        built before anything is swapped in, so an error leaves the old contexts serving."""
        listeners = wire.get("listeners", {})
        shared = {bid: CertBundle.from_wire(b) for bid, b in wire.get("bundles", {}).items()}
        built: dict[str, tuple[ListenerTls, tuple[CertBundle, ...], bytes | None]] = {}
        for lcfg in cfg.listener:
            if lcfg.tls is None or lcfg.name not in listeners:
                continue
            entry = listeners[lcfg.name]
            bundles = tuple(shared[bid] for bid in entry["certs"])
            key = bytes.fromhex(entry["ticket_key"]) if entry.get("ticket_key") else None
            lt = self.tls.get(lcfg.name) or ListenerTls(lcfg.name, lcfg.tls, self.stats)
            built[lcfg.name] = (lt, bundles, key)
        backend: dict[str, ssl.SSLContext] = {}
        pools = wire.get("pools", {})
        for pcfg in cfg.pool:
            if pcfg.tls is None:
                continue
            ca = pools.get(pcfg.name, {}).get("ca_pem")
            backend[pcfg.name] = tls_contexts.client_context(
                verify=pcfg.tls.verify, ca_pem=ca.encode("ascii") if ca else None,
                min_version=pcfg.tls.min_version,
                alpn=("http/1.1",) if _http_pool(cfg, pcfg.name) else ())
        for name, (lt, bundles, key) in built.items():
            tls_cfg = next(lc.tls for lc in cfg.listener if lc.name == name)
            assert tls_cfg is not None
            if bundles != lt.bundles:
                lt.load(bundles)  # raises before swapping anything of its own
            lt.apply(tls_cfg)
            lt.set_ticket_key(key)
            self.tls[name] = lt
        for name in list(self.tls):
            if name not in built:
                del self.tls[name]
        self.backend_tls = backend

    def _apply_snapshot(self, msg: wl.Snap) -> None:
        delta = None
        if msg.base:
            last = self.last_snap
            if last is None or last.ver != msg.base:
                # A change on top of a snapshot this worker does not have (it raced a
                # reload): the control process answers with the whole config and snapshot.
                err = (f"pool_edit: snapshot {msg.ver} builds on {msg.base}, this worker has "
                       f"{last.ver if last else 'none'}")
                logger.error("event=worker_snapshot_gap error=%r", err)
                self.send(wl.ConfigFailed(self.gen, err))
                return
            delta, msg = msg, last.merged(msg)
        self.last_snap = msg
        if self.config is None:
            return  # applied with the config
        if delta is not None:
            self._apply_pools(delta, incremental=True)
        else:
            self._apply_pools(msg)
        self.send(wl.SnapApplied(msg.ver, time.monotonic()))
        if not self.started:
            self.started = True
            asyncio.get_running_loop().create_task(self._start_servers())

    def _apply_pools(self, msg: wl.Snap, incremental: bool = False) -> None:
        for name, p in msg.pools.items():
            pool = self.pools.get(name)
            if pool is None:
                continue
            entries = {bn: BackendEntry(e, w) for bn, (e, w) in p.entries.items()}
            if incremental:
                pool.apply_delta(msg.ver, entries, p.panic)  # O(changed), not O(pool)
            else:
                pool.apply(msg.ver, entries, p.panic)

    async def _start_servers(self) -> None:
        async with self._starting:  # a config and a snapshot of one read both get here
            await self._start_new_servers()

    async def _start_new_servers(self) -> None:
        assert self.config is not None
        pool_cfgs = {p.name: p for p in self.config.pool}
        started: list[str] = []
        for name, lcfg in self.listener_cfgs.items():
            if name in self.servers or name not in self.fds:
                continue
            fds = self.fds[name]
            sock = self._sock(fds[self.index % len(fds)])
            server: ProxyServer | TcpProxyServer
            if lcfg.mode == "tcp":
                server = TcpProxyServer(
                    lcfg, self.pools[lcfg.pool], pool_cfgs[lcfg.pool], self.stats,
                    on_ejection=self._on_ejection,
                )
            else:
                server = ProxyServer(
                    lcfg, self.pools[lcfg.pool], pool_cfgs[lcfg.pool], self.stats,
                    on_ejection=self._on_ejection,
                )
            server.tls = self.tls.get(name)
            server.alog = self.alog
            server.on_paused = functools.partial(self._paused, name)
            server.routes_changed(self.pools, pool_cfgs, self.backend_tls)
            # Registered before the await so a concurrent call cannot start it twice.
            self.servers[name] = server
            started.append(name)
            await server.start(sock)
            self._apply_help(name)
        if not started:
            return  # nothing new (a config and a snapshot of one read both got here)
        self.send(wl.Ready(os.getpid(), tuple(sorted(self.servers))))
        logger.info("event=worker_serving listeners=%s", ",".join(sorted(self.servers)))

    def _sock(self, fd: int) -> socket.socket:
        """The one socket object of an inherited fd (two would each close it)."""
        sock = self.socks.get(fd)
        if sock is None:
            sock = self.socks[fd] = socket.socket(fileno=fd)
            sock.setblocking(False)
        return sock

    def _paused(self, listener: str, paused: bool) -> None:
        self.send(wl.Paused(listener, paused))

    def _apply_help(self, name: str) -> None:
        server, fds = self.servers.get(name), self.fds.get(name, ())
        if server is None or len(fds) < 2:
            return
        mine = self.index % len(fds)
        server.set_help({k: self._sock(fds[k]) for k in self.help.get(name, ())
                         if k != mine and 0 <= k < len(fds)})

    def _on_ejection(self, ej: Ejection) -> None:
        self.send(wl.Eject(ej.pool, ej.backend, str(ej.outcome)))

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            self._send_stats()

    def _send_stats(self) -> None:
        self._count_alog()
        delta = self.stats.take_delta()
        # Only the backends with requests in flight (absent means 0 to the control process):
        # with thousands of backends the message stays as small as the load.
        inflight = {
            f"{p.name}/{b.name}": b.in_flight
            for p in self.pools.values() for b in p.backends if b.in_flight
        }
        if delta or inflight or self.started:
            self.send(wl.Stats(delta, inflight))

    async def _shutdown(self, timeout_s: float) -> None:
        t0 = time.monotonic()
        for server in self.servers.values():
            await server.stop_accepting()
        for fds in self.fds.values():
            for fd in fds:
                with contextlib.suppress(OSError):  # not inherited: not ours to close
                    self._sock(fd).close()
        cut = 0
        for server in self.servers.values():
            left = max(0.0, timeout_s - (time.monotonic() - t0))
            cut += await server.drain(left)
        for server in self.servers.values():
            server.close()
        if self.alog is not None:
            await self.alog.aclose(1.0)  # what was served is logged
            self._count_alog()
        logger.info(
            "event=worker_stopped cut_connections=%d took_s=%.3f", cut, time.monotonic() - t0
        )


def _http_pool(cfg: Config, pool: str) -> bool:
    """Whether an HTTP listener sends to ``pool`` (its backend TLS then offers ALPN
    http/1.1; a pool behind TCP listeners offers none)."""
    return any(lc.mode == "http" and pool in lc.pools for lc in cfg.listener)


def _pool_cfg(cfg: Config | None, name: str) -> PoolConfig | None:
    if cfg is None:
        return None
    try:
        return cfg.pool_by_name(name)
    except KeyError:
        return None


def _only_backends_differ(old: PoolConfig, new: PoolConfig) -> bool:
    """The pool's settings are the same; its backends may not be (a runtime change, or a
    reload that added or removed backends): the pool is edited, not rebuilt."""
    if old.backends == new.backends:
        return False  # nothing differs, or something else does: the caller compares
    return old.model_copy(update={"backends": ()}) == new.model_copy(update={"backends": ()})


def _edit_pool(pool: Pool, old: PoolConfig, new: PoolConfig) -> None:
    """Turn ``pool`` (built from ``old``) into ``new``'s backends: removed ones leave, new
    ones (or a name at a new address) join out of rotation; weights come by snapshot."""
    before = {b.name: b.address for b in old.backends}
    after = {b.name: b for b in new.backends}
    for name, addr in before.items():
        b = after.get(name)
        if b is None or b.address != addr:
            pool.remove_backend(name)
    for name, b in after.items():
        if before.get(name) != b.address:
            host, port = b.host_port
            pool.add_backend(Backend(pool.name, name, host, port, float(b.weight)))


def _preload() -> Any:
    """Import now what the worker would otherwise import on first use: after the drop, the
    interpreter's own files may not be readable by the worker's user (a pyenv under /root)."""
    import encodings.idna  # noqa: F401  (getaddrinfo of a backend host name)

    import failover  # noqa: F401  (config validation imports it for failover.track_gateway)
    from lb.tls import ticketkeys

    # libssl found through /proc/self/maps and dlopen'd while its path is readable; a
    # failure is reported per listener when a key is set.
    with contextlib.suppress(ticketkeys.TicketKeyUnsupported, OSError):
        ticketkeys.libssl()

    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def _parse_args(args: list[str]) -> tuple[int, int, sysutil.Identity | None]:
    channel_fd, index = int(args[0]), int(args[1]) if len(args) > 1 else 0
    opts = dict(zip(args[2::2], args[3::2], strict=False))
    target = None
    if "--uid" in opts and "--gid" in opts:
        uid, gid = int(opts["--uid"]), int(opts["--gid"])
        target = sysutil.Identity(uid, gid, str(uid), str(gid), switch=uid != os.geteuid()
                                  or gid != os.getegid() or os.geteuid() == 0)
    return channel_fd, index, target


def drop(target: sysutil.Identity | None) -> bool:
    """Raise the OOM score, then drop every privilege; False (logged) when that failed."""
    try:  # the supervisor set it right after the spawn too; the parent is the control process
        sysutil.set_oom_score_adj(
            sysutil.worker_oom_score_adj(sysutil.get_oom_score_adj(os.getppid())))
    except OSError as exc:
        logger.warning("event=worker_oom_score_adj_failed error=%r", exc.strerror)
    try:
        st = sysutil.drop_privileges(target)
    except sysutil.PrivilegeError as exc:
        logger.critical("event=worker_privilege_drop_failed error=%r action=exit", str(exc))
        return False
    logger.info("event=worker_privileges_dropped %s", st.summary())
    stdlib = os.path.dirname(os.__file__)
    if not os.access(stdlib, os.R_OK | os.X_OK):
        # Everything the worker needs is imported already (_preload); anything imported
        # later (a traceback's source lines, a module no path here needed) is not.
        logger.warning(
            "event=worker_cannot_read_python path=%s uid=%d hint=%r", stdlib, os.getuid(),
            "the interpreter lives where the workers' user cannot read (a pyenv under "
            "/root?); install pairlb with a system Python such as /usr/bin/python3",
        )
    return True


UNRAISABLE_LOG_INTERVAL_S = 60.0


class _Unraisable:
    """sys.unraisablehook: an exception nobody can catch (CPython's SNI callback cannot
    decode a client's non-ASCII server name, a finalizer fails) is one log line, at most
    one a minute with the count of the rest, never a traceback per connection that any
    client could make."""

    def __init__(self) -> None:
        self.last = -UNRAISABLE_LOG_INTERVAL_S
        self.suppressed = 0

    def __call__(self, u: Any) -> None:
        now = time.monotonic()
        if now - self.last < UNRAISABLE_LOG_INTERVAL_S:
            self.suppressed += 1
            return
        self.last, n, self.suppressed = now, self.suppressed, 0
        logger.warning("event=worker_unraisable error=%r object=%.80r suppressed_before=%d",
                       f"{u.exc_type.__name__}: {u.exc_value}", u.object, n)



def main(argv: list[str] | None = None) -> int:
    channel_fd, index, target = _parse_args(sys.argv[1:] if argv is None else argv)
    log.setup("info", "auto", f"worker{index}")
    sys.unraisablehook = _Unraisable()
    uvloop = _preload()
    if not sysutil.tune_malloc():
        logger.info("event=worker_malloc_untuned reason=%r", "no mallopt, or it refused")
    if not drop(target):
        return sysutil.EXIT_PRIVILEGES
    worker = Worker(channel_fd, index)
    if uvloop is None:
        asyncio.run(worker.run())
    else:
        uvloop.run(worker.run())
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
