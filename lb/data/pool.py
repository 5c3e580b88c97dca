"""Backend selection inside a proxy worker: the balancer the hot path asks for a backend.

Pure: no asyncio, socket, time or logging. The caller passes ``now`` (monotonic seconds).

The control process decides which backends are in rotation and at what weight (health,
admin state, ejections, slow start, panic: see ``lb.control.rotation``) and pushes that as a
snapshot; a worker's ``Pool`` applies it and picks among the eligible ones. The worker also
ejects a backend locally the moment it sees ``consecutive_failures`` in a row, so a dead
backend leaves its rotation before the control process has even heard of it; the next
snapshot from the control process is authoritative again.

Cost: a pick, a release and a local ejection never look at every backend. The rotation (the
backends in it: eligible, weight > 0, not ejected locally) is kept in one structure per
balance mode, rebuilt in O(N) when a whole snapshot arrives, adjusted in O(log N) per
backend for a snapshot's changed entries (``apply_delta``, what a worker gets at every
change once it has a whole one):

- ``round_robin``: an earliest-deadline-first heap (Envoy's EDF scheduler). A backend of
  weight w is due every 1/w of virtual time; a pick takes the earliest deadline (ties: the
  backend listed first) and moves it 1/w later. O(log N). Picks are as smooth as nginx's
  smooth weighted round robin: a backend's picks are evenly spaced, never in bursts. While
  the rotation is unchanged a backend's share of any run of picks is its weight's share
  within ``1 + n * w / W`` picks (n backends, W the sum of weights); with integer weights,
  from a fresh pool, every cycle of W picks gives each backend exactly its weight. A snapshot
  keeps everyone's place: unchanged backends keep their deadline, a new weight (slow start)
  rescales the time left to the next pick, a backend joining starts 1/w after the last pick.
- ``least_connections``: a heap keyed by in-flight / weight with lazy updates (a pick or a
  release pushes a fresh entry, out-of-date ones are dropped when they surface, the heap is
  compacted when it grows past twice the rotation). The pick is exactly a backend with the
  least in-flight per weight; ties go to the one that waited longest. O(log N).
- ``random_two``: two distinct backends drawn from an array of the rotation (swap-removal on
  ejection), the less loaded per weight wins. O(1).
- ``maglev``: a pick with a key (``pick(now, exclude, key)``, a ``lb.maglev.key_hash``)
  goes where the pool's Maglev table sends it (``set_hash_table``: built by the control
  process from the members alone, the same on both nodes); a backend out of the rotation
  (down, draining, ejected, excluded by a retry) is skipped by ``lb.maglev.lookup``,
  which tries the key's next choices. O(1). A pick without a key, before the first table, or
  when the lookup finds nothing usable is round robin (its structure is kept as for
  ``round_robin``).

Sticky cookies (any balance mode): each backend has an opaque ``token``
(``lb.maglev.sticky_token``: the same on both nodes); ``take_token`` picks the backend
of a token if it is in the rotation. O(1).

A local ejection leaves the rotation at once (O(log N)) and comes back through a heap of
ejection deadlines checked at each pick. Retries exclude the backends already tried: the
pick skips them (O(k log N) for k excluded), never scans N.

The balance modes and the passive-ejection defaults are lb.config's (``Balance``,
``PASSIVE_DEFAULTS``): a pool built without a config behaves as one configured with nothing.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from heapq import heapify, heappop, heappush, heapreplace
from typing import Final

from lb.config import PASSIVE_DEFAULTS, Balance
from lb.maglev import lookup, sticky_token


class Outcome(StrEnum):
    """What one attempt at a backend taught us (passive health)."""

    OK = "ok"
    CONNECT_FAILED = "connect_failed"
    TIMEOUT = "timeout"
    HTTP_5XX = "http_5xx"
    RESET = "reset"
    """The backend closed the connection before answering."""


FAILURES: Final = frozenset(
    {Outcome.CONNECT_FAILED, Outcome.TIMEOUT, Outcome.HTTP_5XX, Outcome.RESET})

_OUT: Final = 0
_IN: Final = 1
_EJECTED: Final = 2
"""Where a backend is: out of rotation (snapshot), in it, or out until its local ejection ends."""
_RR: Final = 0
_LC: Final = 1
_R2: Final = 2
_MODES: Final[dict[str, int]] = {
    "round_robin": _RR, "least_connections": _LC, "random_two": _R2, "maglev": _RR,
}
"""Every lb.config.Balance, and the structure it is kept in."""
_RENORMALIZE_AT: Final = float(1 << 30)
"""Virtual time past which round robin's deadlines are shifted back (float precision)."""


@dataclass(slots=True, eq=False)
class Backend:
    """One backend as a worker sees it: where it is, whether to use it, how loaded it is."""

    pool: str
    name: str
    host: str
    port: int
    weight: float = 1.0
    eligible: bool = True
    in_flight: int = 0
    requests: int = 0
    failures_in_row: int = 0
    ejected_until: float = 0.0
    """Local ejection deadline (monotonic); 0 when not ejected locally."""
    # The pool's bookkeeping (see Pool): not for callers.
    _idx: int = field(default=0, repr=False)
    _where: int = field(default=_OUT, repr=False)
    _ver: int = field(default=0, repr=False)
    """Bumped whenever the backend's heap entry changes: older entries are stale."""
    _w: float = field(default=0.0, repr=False)
    """The weight its round-robin deadline was computed with."""
    _base: float = field(default=0.0, repr=False)
    _k: int = field(default=0, repr=False)
    _deadline: float = field(default=0.0, repr=False)
    """Round robin: next pick due at ``_base + _k / weight`` of virtual time."""
    _seq: int = field(default=0, repr=False)
    """Least connections: tie-breaker (when its entry was pushed)."""
    _pos: int = field(default=-1, repr=False)
    """random_two: index in the rotation array."""
    token: str = field(init=False, default="", repr=False)
    """The sticky cookie's value that names this backend (``lb.maglev.sticky_token``)."""

    def __post_init__(self) -> None:
        self.token = sticky_token(self.pool, self.name)

    @property
    def key(self) -> tuple[str, str]:
        return (self.pool, self.name)

    def usable(self, now: float) -> bool:
        return self.eligible and self.weight > 0 and self.ejected_until <= now


_Entry = tuple[float, int, int, Backend]
"""A heap entry: (key, tie-breaker, the backend's _ver when pushed, backend)."""


@dataclass(frozen=True, slots=True)
class BackendEntry:
    """One backend's line in a snapshot from the control process."""

    eligible: bool
    weight: float


@dataclass(frozen=True, slots=True)
class Ejection:
    """Returned by ``Pool.observe`` when a backend crossed the local failure threshold."""

    pool: str
    backend: str
    outcome: Outcome


@dataclass(slots=True)
class Pool:
    """Selection among a pool's backends: round robin, least connections or two random.

    Change ``backends``' eligibility or weight only through ``apply`` (or call ``rebuild``
    after changing them by hand): the rotation structures are derived from them.
    """

    name: str
    balance: Balance
    backends: list[Backend]
    consecutive_failures: int = PASSIVE_DEFAULTS.consecutive_failures
    local_eject_s: float = PASSIVE_DEFAULTS.eject_s
    """How long a local ejection lasts at most (the worker passes [pool.passive] eject_s);
    the control process's next snapshot decides sooner."""
    max_eject_percent: int = PASSIVE_DEFAULTS.max_eject_percent
    rng: random.Random = field(default_factory=random.Random)
    version: int = 0
    panic: bool = False
    _by_name: dict[str, Backend] = field(default_factory=dict, repr=False)
    _mode: int = field(default=_RR, repr=False)
    _heap: list[_Entry] = field(default_factory=list, repr=False)
    """round_robin: (deadline, idx, ver, backend); least_connections: (load, seq, ver, b)."""
    _arr: list[Backend] = field(default_factory=list, repr=False)
    """random_two: the rotation."""
    _live: int = field(default=0, repr=False)
    """Backends in the rotation."""
    _cap: int = field(default=64, repr=False)
    """Heap size past which it is compacted (stale entries dropped)."""
    _vt: float = field(default=0.0, repr=False)
    """round_robin's virtual time: the deadline of the last pick."""
    _seq: int = field(default=0, repr=False)
    _ejq: list[_Entry] = field(default_factory=list, repr=False)
    """Local ejections: (ejected_until, idx, ver, backend)."""
    _ejected_n: int = field(default=0, repr=False)
    """Eligible backends ejected locally since the last snapshot (the ejection budget)."""
    _next_idx: int = field(default=0, repr=False)
    """The tie-breaker of the next backend added: never reused, so two heap entries never
    tie on (key, idx) and fall through to comparing backends."""
    _by_token: dict[str, Backend] = field(default_factory=dict, repr=False)
    _htable: array[int] | None = field(default=None, repr=False)
    """maglev: the lookup table (slot -> index into ``_hmembers``), once one is set."""
    _hmembers: list[Backend | None] = field(default_factory=list, repr=False)
    """The table's members, by index: the backend of that name, None if the pool has none."""
    _hindex: dict[str, int] = field(default_factory=dict, repr=False)
    """The table's member names -> index."""

    def __post_init__(self) -> None:
        self._by_name = {b.name: b for b in self.backends}
        self._by_token = {b.token: b for b in self.backends}
        mode = _MODES.get(self.balance)
        if mode is None:
            raise ValueError(f"pool {self.name}: unknown balance {self.balance!r}")
        self._mode = mode
        for i, b in enumerate(self.backends):
            b._idx = i
        self._next_idx = len(self.backends)
        self._ejected_n = sum(1 for b in self.backends if b.ejected_until > 0 and b.eligible)
        self.rebuild()

    def get(self, name: str) -> Backend | None:
        return self._by_name.get(name)

    def add_backend(self, backend: Backend) -> bool:
        """A backend added at runtime (admin API, discovery): out of rotation until a
        snapshot puts it in. O(1); every other backend keeps its load, place and ejection
        (rebuilding the pool would forget them). False if the name is taken."""
        if backend.name in self._by_name:
            return False
        backend.eligible = False
        backend._where = _OUT
        backend._idx = self._next_idx
        self._next_idx += 1
        self.backends.append(backend)
        self._by_name[backend.name] = backend
        self._by_token[backend.token] = backend
        i = self._hindex.get(backend.name)
        if i is not None:  # a name the table has (removed and added back): its slots
            self._hmembers[i] = backend
        return True

    def remove_backend(self, name: str) -> Backend | None:
        """Take a backend out of the pool for good; requests in flight keep the object and
        release into it. O(log N) to leave the rotation, O(N) list removal (a C loop)."""
        b = self._by_name.pop(name, None)
        if b is None:
            return None
        if b._where == _IN:
            self._leave(b)
        elif b._where == _EJECTED and b.eligible:
            self._ejected_n = max(0, self._ejected_n - 1)
        b._where = _OUT
        b._ver += 1  # any heap or ejection entry of it is stale now
        b.eligible = False
        self.backends.remove(b)
        if self._by_token.get(b.token) is b:
            del self._by_token[b.token]
        i = self._hindex.get(name)
        if i is not None:
            self._hmembers[i] = None
        return b

    def set_hash_table(self, members: Sequence[str], table: array[int]) -> None:
        """Install a maglev pool's lookup table (``lb.maglev.build``'s names and table).

        Names map to the pool's backends of those names now and as they come and go (a name
        not in the pool maps to nothing; a backend removed is never picked through it);
        a backend whose name is not in ``members`` gets no hashed traffic until a table
        names it. O(M) once (a check that every entry is a member).
        """
        if self._mode != _RR or self.balance != "maglev":
            raise ValueError(f"pool {self.name}: a hash table needs balance = \"maglev\"")
        if table and max(table) >= len(members):
            raise ValueError(f"pool {self.name}: hash table entry past its {len(members)} "
                             f"members")
        by_name = self._by_name
        self._hindex = {n: i for i, n in enumerate(members)}
        if len(self._hindex) != len(members):
            raise ValueError(f"pool {self.name}: hash table members not unique")
        self._hmembers = [by_name.get(n) for n in members]
        self._htable = table if table else None

    def by_token(self, token: str | bytes) -> Backend | None:
        """The backend a sticky cookie's value names, if it is in the rotation (eligible,
        weight above 0, not ejected locally; an ejection that just ended counts from the
        next pick). O(1)."""
        if isinstance(token, bytes):
            token = token.decode("latin-1")
        b = self._by_token.get(token)
        return b if b is not None and b._where == _IN else None

    def token_of(self, backend: Backend) -> str:
        """The sticky cookie's value for ``backend`` (``Backend.token``)."""
        return backend.token

    def take_token(self, token: str | bytes, now: float, exclude: Iterable[Backend] = ()
                   ) -> Backend | None:
        """A sticky pick: the backend of ``token`` (``by_token``) unless ``exclude`` has it,
        counted in flight like a pick; None (the caller picks as usual, and resets the
        cookie) if it is gone, out of rotation or excluded."""
        ejq = self._ejq
        if ejq and ejq[0][0] <= now:
            self._readmit(now)
        b = self.by_token(token)
        if b is None or (exclude and b in set(exclude)):
            return None
        if self._mode == _LC:
            self._charge_lc_any(b)
        else:
            b.in_flight += 1
            b.requests += 1
        return b

    def apply(self, version: int, entries: Mapping[str, BackendEntry], panic: bool) -> None:
        """Take a snapshot from the control process; it overrides local ejections."""
        if version < self.version:
            return
        self.version = version
        self.panic = panic
        for b in self.backends:
            entry = entries.get(b.name)
            if entry is None:
                b.eligible = False
                continue
            b.eligible = entry.eligible
            b.weight = entry.weight
            b.ejected_until = 0.0
            b.failures_in_row = 0
        self._ejected_n = 0
        self.rebuild()

    def apply_delta(
        self, version: int, changed: Mapping[str, BackendEntry], panic: bool
    ) -> None:
        """Take the changed entries of a snapshot (the others are as before): O(k log N)
        for k entries, where ``apply`` is O(N). The control process sends these at every
        change once a worker has a whole snapshot, so a pool of thousands changing one
        backend at a time costs the workers almost nothing. Like ``apply``, an entry
        overrides that backend's local ejection."""
        if version < self.version:
            return
        self.version = version
        self.panic = panic
        for name, entry in changed.items():
            b = self._by_name.get(name)
            if b is not None:
                self._set(b, entry.eligible, entry.weight)
        if len(self._heap) > self._cap:
            self._compact()

    def _set(self, b: Backend, eligible: bool, weight: float) -> None:
        """One backend's new eligibility and weight, its place in the rotation adjusted
        the way ``rebuild`` would (round robin: the time left to its next pick rescaled)."""
        if b.ejected_until > 0:
            if b.eligible:
                self._ejected_n = max(0, self._ejected_n - 1)
            b.ejected_until = 0.0
        b.failures_in_row = 0
        was_in = b._where == _IN
        old_w = b._w
        b.eligible, b.weight = eligible, weight
        usable = eligible and weight > 0
        if not usable:
            if was_in:
                self._leave(b)
            b._where = _OUT
            b._ver += 1  # an ejection-queue entry, if any, is stale now
            return
        if was_in and (self._mode != _RR or old_w == weight):
            if self._mode == _LC:  # its load per weight moved
                b._ver += 1
                heappush(self._heap, (b.in_flight / weight, b._seq, b._ver, b))
            return
        mode, vt = self._mode, self._vt
        if was_in:  # round robin, a new weight: rescale the time left, as rebuild does
            left = b._deadline - vt
            d = vt + (left * old_w / weight if left > 0 else 0.0)
            b._base, b._k, b._deadline = d, 0, d
            b._w = weight
            b._ver += 1
            heappush(self._heap, (b._deadline, b._idx, b._ver, b))
            return
        b._ver += 1
        b._where = _IN
        self._live += 1
        self._cap = max(self._cap, 2 * self._live + 64)
        if mode == _RR:
            b._w, b._base, b._k, b._deadline = weight, vt, 1, vt + 1 / weight
            heappush(self._heap, (b._deadline, b._idx, b._ver, b))
        elif mode == _LC:
            self._seq += 1
            b._seq = self._seq
            heappush(self._heap, (b.in_flight / weight, b._seq, b._ver, b))
        else:
            b._pos = len(self._arr)
            self._arr.append(b)

    def rebuild(self) -> None:
        """Derive the rotation from the backends' eligibility and weight: O(N).

        Round robin keeps each backend's place (see the module doc); a backend ejected
        locally comes back only through ``apply`` or when its ejection ends.
        """
        self._ejq = [e for e in self._ejq if e[2] == e[3]._ver and e[3]._where == _EJECTED]
        vt = self._vt
        heap: list[_Entry] = []
        arr: list[Backend] = []
        mode = self._mode
        for b in self.backends:
            if not (b.eligible and b.weight > 0):
                b._where = _OUT
                b._ver += 1
                continue
            if b._where == _EJECTED:
                if b.ejected_until > 0:
                    continue  # until its ejection ends (apply clears ejections first)
                b._where = _OUT
            if mode == _RR:
                w = b.weight
                if b._where != _IN:
                    b._base, b._k, b._deadline = vt, 1, vt + 1 / w
                elif b._w != w:
                    # A new weight (slow start): the time left to its next pick rescaled.
                    left = b._deadline - vt
                    d = vt + (left * b._w / w if left > 0 else 0.0)
                    b._base, b._k, b._deadline = d, 0, d
                b._w = w
                b._ver += 1
                heap.append((b._deadline, b._idx, b._ver, b))
            elif mode == _LC:
                if b._where != _IN:
                    self._seq += 1
                    b._seq = self._seq
                b._ver += 1
                heap.append((b.in_flight / b.weight, b._seq, b._ver, b))
            else:
                b._pos = len(arr)
                arr.append(b)
            b._where = _IN
        heapify(heap)
        self._heap = heap
        self._arr = arr
        self._live = len(heap) + len(arr)
        self._cap = 2 * self._live + 64

    def pick(self, now: float, exclude: Iterable[Backend] = (), key: int | None = None
             ) -> Backend | None:
        """Choose a backend for a new request or connection and count it in flight.

        ``key`` (maglev pools): the request's ``lb.maglev.key_hash``; the backend the
        table gives it, or the key's next choice in the rotation and not in ``exclude``.
        Without a key, a table or a usable choice: the pool's ordinary pick."""
        ejq = self._ejq
        if ejq and ejq[0][0] <= now:
            self._readmit(now)
        if key is not None:
            table = self._htable
            if table is not None:
                b = self._pick_key(table, key, exclude)
                if b is not None:
                    return b
        if exclude:
            return self._pick_excluding(set(exclude))
        mode = self._mode
        heap = self._heap
        if mode == _RR:
            while heap:
                d, i, v, b = heap[0]
                if v != b._ver:
                    heappop(heap)
                    continue
                b._k += 1
                b._deadline = nd = b._base + b._k / b.weight
                heapreplace(heap, (nd, i, v, b))
                b.in_flight += 1
                b.requests += 1
                if d > self._vt:
                    self._vt = d
                    if d > _RENORMALIZE_AT:
                        self._renormalize()
                return b
            return None
        if mode == _LC:
            while heap:
                b = heap[0][3]
                if heap[0][2] != b._ver:
                    heappop(heap)
                    continue
                self._charge_lc(b)
                return b
            return None
        arr = self._arr
        n = len(arr)
        if n == 0:
            return None
        if n == 1:
            chosen = arr[0]
        else:
            a, c = self.rng.sample(arr, 2)
            chosen = a if a.in_flight * c.weight <= c.in_flight * a.weight else c
        chosen.in_flight += 1
        chosen.requests += 1
        return chosen

    def release(self, backend: Backend) -> None:
        backend.in_flight -= 1
        if self._mode == _LC and backend._where == _IN:
            self._seq += 1
            backend._seq = self._seq
            backend._ver += 1
            heap = self._heap
            heappush(heap, (backend.in_flight / backend.weight, self._seq, backend._ver, backend))
            if len(heap) > self._cap:
                self._compact()

    def observe(self, backend: Backend, outcome: Outcome, now: float) -> Ejection | None:
        """Passive health: count failures in a row; eject locally at the threshold."""
        if outcome not in FAILURES:
            backend.failures_in_row = 0
            return None
        backend.failures_in_row += 1
        if backend.failures_in_row < self.consecutive_failures or backend.ejected_until > now:
            return None
        if not self._may_eject():
            return None
        until = now + self.local_eject_s
        if backend.eligible and backend.ejected_until <= 0 < until:
            self._ejected_n += 1
        backend.ejected_until = until
        backend.failures_in_row = 0
        if backend._where != _OUT:
            self._leave(backend)
            heappush(self._ejq, (until, backend._idx, backend._ver, backend))
        return Ejection(self.name, backend.name, outcome)

    def _may_eject(self) -> bool:
        # Out of rotation already (not eligible) does not count against the budget.
        return (self._ejected_n + 1) * 100 <= self.max_eject_percent * len(self.backends)

    # -- the rotation's structures ---------------------------------------------------------

    def _pick_key(self, table: array[int], key: int, exclude: Iterable[Backend]
                  ) -> Backend | None:
        """maglev: the key's backend (lb.maglev.lookup), counted in flight."""
        members = self._hmembers
        b = members[table[key % len(table)]]
        skip = set(exclude) if exclude else ()
        if b is None or b._where != _IN or b in skip:

            def usable(i: int) -> bool:
                c = members[i]
                return c is not None and c._where == _IN and c not in skip

            i = lookup(table, key, usable)
            if i is None:
                return None
            b = members[i]
            assert b is not None
        b.in_flight += 1
        b.requests += 1
        return b

    def _charge_lc_any(self, b: Backend) -> None:
        """Count a least-connections pick of ``b``, wherever its heap entry is."""
        b.in_flight += 1
        b.requests += 1
        self._seq += 1
        b._seq = self._seq
        b._ver += 1
        heap = self._heap
        heappush(heap, (b.in_flight / b.weight, self._seq, b._ver, b))
        if len(heap) > self._cap:
            self._compact()

    def _charge_lc(self, b: Backend) -> None:
        """Count a least-connections pick of ``b``, the valid top of the heap."""
        b.in_flight += 1
        b.requests += 1
        self._seq += 1
        b._seq = self._seq
        b._ver += 1
        heapreplace(self._heap, (b.in_flight / b.weight, self._seq, b._ver, b))

    def _pick_excluding(self, skip: set[Backend]) -> Backend | None:
        """A pick that skips ``skip`` (a retry): O(len(skip) log N), no scan of the pool."""
        mode = self._mode
        if mode == _R2:
            return self._two_excluding(skip)
        heap = self._heap
        held = []
        chosen = None
        while heap:
            top = heap[0]
            b = top[3]
            if top[2] != b._ver:
                heappop(heap)
            elif b in skip:
                held.append(heappop(heap))
            else:
                chosen = b
                break
        if chosen is not None:
            if mode == _RR:
                d, i, v, _ = heap[0]
                chosen._k += 1
                chosen._deadline = nd = chosen._base + chosen._k / chosen.weight
                heapreplace(heap, (nd, i, v, chosen))
                chosen.in_flight += 1
                chosen.requests += 1
                if d > self._vt:
                    self._vt = d
            else:
                self._charge_lc(chosen)
        for e in held:
            heappush(heap, e)
        return chosen

    def _two_excluding(self, skip: set[Backend]) -> Backend | None:
        arr = self._arr
        n = len(arr)
        skipped = sum(1 for b in skip if b._where == _IN)
        if n - skipped <= 0:
            return None
        if n <= 2 * skipped + 8:
            # Small: most of the rotation is excluded, filter it (n is bounded by the skips).
            cands = [b for b in arr if b not in skip]
        else:
            # Large: draw until two not excluded (each draw misses with p < 1/2; bounded).
            cands = []
            randbelow = self.rng.randrange
            for _ in range(64):
                b = arr[randbelow(n)]
                if b not in skip and (not cands or b is not cands[0]):
                    cands.append(b)
                    if len(cands) == 2:
                        break
            else:
                cands = [b for b in arr if b not in skip]
        if len(cands) == 1:
            chosen = cands[0]
        else:
            a, c = cands[0], cands[1]
            if len(cands) > 2:
                a, c = self.rng.sample(cands, 2)
            chosen = a if a.in_flight * c.weight <= c.in_flight * a.weight else c
        chosen.in_flight += 1
        chosen.requests += 1
        return chosen

    def _leave(self, b: Backend) -> None:
        """Take ``b`` out of the rotation until it is readmitted (local ejection)."""
        if b._where == _IN:
            self._live -= 1
            if self._mode == _R2:
                arr = self._arr
                last = arr.pop()
                if last is not b:
                    arr[b._pos] = last
                    last._pos = b._pos
                b._pos = -1
        b._where = _EJECTED
        b._ver += 1  # its heap entry (and any older ejection entry) is stale now

    def _readmit(self, now: float) -> None:
        """Bring back the backends whose local ejection has ended."""
        ejq = self._ejq
        while ejq and ejq[0][0] <= now:
            _, _, v, b = heappop(ejq)
            if v != b._ver or b._where != _EJECTED:
                continue
            if not (b.eligible and b.weight > 0):
                b._where = _OUT
                continue
            b._ver += 1
            b._where = _IN
            self._live += 1
            self._cap = max(self._cap, 2 * self._live + 64)
            mode = self._mode
            if mode == _RR:
                vt, w = self._vt, b.weight
                b._w, b._base, b._k, b._deadline = w, vt, 1, vt + 1 / w
                heappush(self._heap, (b._deadline, b._idx, b._ver, b))
            elif mode == _LC:
                self._seq += 1
                b._seq = self._seq
                heappush(self._heap, (b.in_flight / b.weight, b._seq, b._ver, b))
            else:
                b._pos = len(self._arr)
                self._arr.append(b)

    def _compact(self) -> None:
        """Drop stale heap entries: O(N), after at least N pushes (amortised O(1))."""
        heap = [e for e in self._heap if e[2] == e[3]._ver]
        heapify(heap)
        self._heap = heap
        self._cap = 2 * self._live + 64

    def _renormalize(self) -> None:
        """Shift round robin's virtual time back near 0, keeping every deadline's order: O(N),
        once per ~1e9 cycles of the rotation (float precision stays far below 1/weight)."""
        shift = float(int(self._vt))
        self._vt -= shift
        heap = []
        for b in self.backends:
            if b._where == _IN:
                b._deadline -= shift
                b._base, b._k = b._deadline, 0
                heap.append((b._deadline, b._idx, b._ver, b))
        heapify(heap)
        self._heap = heap
        self._cap = 2 * self._live + 64


def build_pool(
    name: str,
    balance: Balance,
    backends: Iterable[tuple[str, str, int, float]],
    *,
    consecutive_failures: int = PASSIVE_DEFAULTS.consecutive_failures,
    local_eject_s: float = PASSIVE_DEFAULTS.eject_s,
    max_eject_percent: int = PASSIVE_DEFAULTS.max_eject_percent,
    eligible: bool = True,
    seed: int | None = None,
) -> Pool:
    """Make a worker pool from (name, host, port, weight) tuples."""
    return Pool(
        name=name,
        balance=balance,
        backends=[Backend(name, bn, h, p, w, eligible) for bn, h, p, w in backends],
        consecutive_failures=consecutive_failures,
        local_eject_s=local_eject_s,
        max_eject_percent=max_eject_percent,
        rng=random.Random(seed),
    )
