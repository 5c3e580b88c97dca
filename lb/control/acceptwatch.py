"""Which worker slots' listening sockets the other workers should also accept from.

With ``[listener] reuseport`` every worker slot has its own socket and the kernel hashes each
new connection to one of them, whether or not that slot's worker is there to take it. A
shared socket never strands a connection (whoever is awake takes it); per-slot sockets
would, while a slot's worker is gone (crashed, in its restart backoff), starting, paused at
``max_connections``, or hung until its ping timeout kills it. So the control process looks
at each socket's accept queue every ``ACCEPT_WATCH_S`` and asks the other workers to *help*
a slot, that is to accept on its socket too, while

- the slot has no serving worker, or its worker paused accepting on this listener at
  ``max_connections`` (it says so: wl.Paused), or
- its queue held connections at ``STALL_SAMPLES`` looks in a row (a worker that keeps up
  empties its queue within a loop iteration, so connections still there a look later are
  not being taken).

Help ends once the slot serves again, its queue is empty, and its worker answered a ping
sent after the help began (alive, not merely lucky): a hung worker is helped until it is
replaced, a busy one for about a ping interval, so help does not flap.

This module is the decision only (a table of inputs to outputs, tested with a fake clock);
lb.control.daemon reads the queues (lb.listen.accept_queue) and tells the workers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["ACCEPT_WATCH_S", "STALL_SAMPLES", "AcceptWatch", "SlotState"]

ACCEPT_WATCH_S = 0.1
"""How often the queues are read: one getsockopt per socket, so 256 slots cost ~0.3 ms."""
STALL_SAMPLES = 2
"""Looks in a row with connections queued before the slot is helped (100-200 ms)."""


@dataclass(frozen=True)
class SlotState:
    """What the supervisor knows of one slot's current worker."""

    serving: bool
    """A live worker that said Ready (not starting, not in its restart backoff)."""
    last_pong: float
    """When the last ping it answered was sent (monotonic seconds): help ends only on an
    answer to a ping sent after the help began (an answer given before a worker hung
    must not end it)."""
    paused: frozenset[str] = frozenset()
    """Listeners it stopped accepting on at ``max_connections`` (not serving those)."""


@dataclass
class _Slot:
    queued_looks: int = 0
    helped_since: float | None = None
    episodes: int = 0


class AcceptWatch:
    """The help decision for every (listener, slot) of the listeners with per-slot sockets."""

    def __init__(self, stall_samples: int = STALL_SAMPLES) -> None:
        self.stall_samples = stall_samples
        self._slots: dict[tuple[str, int], _Slot] = {}
        self.queues: dict[str, list[int]] = {}
        """The last look: listener -> each slot's queue length."""
        self.help: dict[str, tuple[int, ...]] = {}
        """Listener -> the slots the other workers accept for now (none: not a key)."""

    def look(
        self, now: float, queues: Mapping[str, Sequence[int]], slots: Sequence[SlotState]
    ) -> bool:
        """Take one look; True when ``help`` changed (the workers must be told)."""
        helped: dict[str, tuple[int, ...]] = {}
        for name, qs in queues.items():
            if len(qs) < 2:
                continue  # one socket: shared by every worker, nothing to help
            on = []
            for k, q in enumerate(qs):
                st = self._slots.setdefault((name, k), _Slot())
                slot = slots[k] if k < len(slots) else SlotState(False, 0.0)
                serving = slot.serving and name not in slot.paused
                st.queued_looks = st.queued_looks + 1 if q > 0 else 0
                if st.helped_since is None:
                    if not serving or st.queued_looks >= self.stall_samples:
                        st.helped_since = now
                        st.episodes += 1
                elif serving and q == 0 and slot.last_pong > st.helped_since:
                    st.helped_since = None
                if st.helped_since is not None:
                    on.append(k)
            if on:
                helped[name] = tuple(on)
        for key in [k for k in self._slots if k[0] not in queues or k[1] >= len(queues[k[0]])]:
            del self._slots[key]  # a listener removed by a reload
        self.queues = {n: list(q) for n, q in queues.items()}
        changed = helped != self.help
        self.help = helped
        return changed

    def episodes(self, listener: str, slot: int) -> int:
        """How many times help for this slot began (a counter for the metrics)."""
        st = self._slots.get((listener, slot))
        return st.episodes if st is not None else 0

    def helped(self, listener: str, slot: int) -> bool:
        return slot in self.help.get(listener, ())
