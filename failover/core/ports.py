"""The contracts at the edge of the failover core: what the controller drives, and its errors.

The controller owns no netlink and no socket of its own; it reaches the VIP and the network
through the two Protocols below, so ring-3 tests plug in fakes (an in-memory network, a fake
VIP) and the daemon plugs in `failover.adapters.vip.VipAdapter` and
`failover.adapters.transport.UdpTransport`.
Imports nothing (stdlib typing only), and nothing from lb or healthcheck.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

Address = tuple[str, int]
"""(host, port) of a heartbeat path; host is a plain IP literal (IPv4 never v4-mapped)."""

DatagramCallback = Callable[[bytes, Address], None]


class FailoverError(Exception):
    """Root of every error the failover package raises on purpose."""


class VipPort(Protocol):
    """The virtual IPs of one node, as the controller needs them.

    Contract (the controller relies on each point):

    - acquire(): add every VIP, idempotently, and return only once the kernel shows them and
      the first GARP/NA round is out; further rounds may follow in the background. The
      controller sends its first MASTER heartbeat after acquire() returns, and the old
      holder releases on that heartbeat: returning early opens a gap with no holder.
    - release(): cancel every pending announcement *first* (a delayed GARP burst from the
      loser of a healed partition would pull clients back to it), then delete the VIPs and
      return once the kernel no longer shows them. Idempotent; never fails because the VIPs
      or the interface are already gone.
    - announce(): one more GARP/NA burst now, only for VIPs the kernel shows (announcing an
      address we do not hold steals it). Called when this MASTER hears a worse MASTER.
    - remove_stale(): at start-up, before joining as BACKUP, delete our VIPs left on the
      interface by a previous process (kill -9); return what was removed.
    - held(): does the kernel show every VIP? (slow path, for status and checks.)
    - holding: what the port last did (True after acquire, False after release); cheap.

    Each call may raise; the controller bounds every call with a deadline, logs and counts
    failures, and never lets one stop heartbeats. `announcements_sent` counts
    GARP/NA packets sent and `announcement_errors` the rounds that failed, for metrics.
    """

    announcements_sent: int
    announcement_errors: int

    @property
    def holding(self) -> bool: ...

    async def acquire(self) -> None: ...

    async def release(self) -> None: ...

    async def announce(self) -> None: ...

    async def remove_stale(self) -> Sequence[str]: ...

    async def held(self) -> bool: ...


class HeartbeatTransport(Protocol):
    """Datagrams to and from the peers; no framing, no crypto (the codec does that).

    start() binds and from then on calls `on_datagram(data, source)` for every datagram; the
    callback never raises into the transport (the controller catches everything), but a
    transport must survive it anyway. send() never blocks and never raises: a datagram that
    cannot be sent is counted in `send_errors` and dropped, like one lost on the wire.
    """

    send_errors: int

    async def start(self, on_datagram: DatagramCallback) -> None: ...

    def destinations(self) -> Sequence[Address]: ...

    def send(self, data: bytes, dest: Address) -> None: ...

    def close(self) -> None: ...


class HandoverPort(Protocol):
    """Connection handover around a VIP move (failover.adapters.handover.Handover).

    - start(): install what lets this node keep serving its connections after it released
      the VIP; False (logged) if it cannot, and then the other calls do nothing.
    - forward_to(peer, for_s): for `for_s` seconds, pass packets of connections this node
      does not have to `peer` (called before a takeover's gratuitous ARP).
    - stop_forwarding(): this node released the VIP; packets reaching it now are its own.
    - close(): remove everything (at exit, after the proxy drained).
    """

    enabled: bool
    """start() succeeded: receiving is installed and forwarding can be armed."""
    forwarding_to: str | None
    """The peer packets are being passed to now, if any."""
    forwards: int
    """How many times forwarding was armed."""

    async def start(self) -> bool: ...

    async def forward_to(self, peer: str, for_s: float) -> None: ...

    async def stop_forwarding(self) -> None: ...

    async def close(self) -> None: ...
