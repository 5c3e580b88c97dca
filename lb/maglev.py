"""Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted as in Envoy.

Pure: no asyncio, socket, time or logging; imports nothing of the control plane.

Why Maglev: a pool with ``balance = "maglev"`` sends a request to the backend its key (client
address, a header, a cookie, the path) hashes to, through a lookup table of M slots that
depends only on the pool's members (names and configured weights) and M. Both nodes of a
pair build the same table from the same members without talking to each other, so a key
goes to the same backend whichever node holds the VIP: affinity survives a failover. The
paper's guarantees, which tests/test_maglev.py measures:

- balance: with M prime and M > 100 N every member owns floor(M/N) or ceil(M/N) slots, so
  shares differ by at most 1 slot, under 1 % of a share;
- minimal disruption: removing one of N members moves its ~1/N of the slots and only a
  little more (the others' slots mostly stay); adding one takes ~1/(N+1).

The population (``build``): member i has an offset h1(name) % M and a skip h2(name) % (M-1)
+ 1, so its preference list ``offset + j * skip (mod M)`` is a permutation of the slots (M
prime). Members take turns, each filling its next preferred slot still empty, until all M
are filled. Weighted like Envoy: a member of weight w takes a turn in w / max-weight of the
rounds (weight 0: never), so its share of the table is proportional to its weight.

Why a fixed ladder of sizes (``table_size``): a different M remaps most keys, so M must be
the same on both nodes and change as rarely as possible: it is the smallest rung (primes
near powers of two) above 100 N, and changes only when N crosses a rung.

Health and drain are not in the table (a health change would otherwise cost a rebuild and
move keys of healthy backends): ``lookup`` takes the slot's member if it is usable, else
probes a sequence of other slots derived from the key, so a down member's keys spread over
the others in proportion to their shares, every other key stays where it is, and the down
member's keys come back exactly when it does. If no usable member is found within the
probes (most of the pool down), the caller falls back to its ordinary balancing.

Hashes are blake2b, never Python's ``hash()`` (randomized per process): workers, restarts
and both nodes must agree.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from hashlib import blake2b
from itertools import compress, cycle, islice
from math import isqrt, lcm

LADDER: tuple[int, ...] = (
    65537, 131071, 262147, 524309, 1048583, 2097169, 4194319,
)
"""Table sizes: primes near 2**16 .. 2**22 (65537 is Envoy's default; the last is the
largest the worker channel carries, lb.config.HASH_TABLE_MAX). Fixed, so both nodes
compute the same and a pool's size changes only when it crosses a rung."""
MAX_PROBES = 32
"""``lookup``'s probes past the key's own slot. With a share d of the table unusable a key
falls back to ordinary balancing with probability d**33 (d = 0.5: 1e-10; d = 0.9: 3 %)."""
_NAME_PERSON = b"pairlb-maglev"
_EMPTY = bytes([1]) + bytes(255)
"""bytes.translate table: the fill map's empty slots to 1, filled ones to 0."""
_TOKEN_KEY = b"pairlb-sticky-v1"


def key_hash(data: bytes) -> int:
    """A request key's 64-bit hash: the same in every process, on every node, after restarts.

    About 0.45 us (blake2b, 8-byte digest; bench/maglev.py); the request hot path calls it
    once per request (once per connection for the source address)."""
    return _from_bytes(blake2b(data, digest_size=8).digest(), "little")


_from_bytes = int.from_bytes


def is_prime(n: int) -> bool:
    if n < 2 or n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


def table_size(n_backends: int) -> int:
    """The smallest rung of ``LADDER`` above 100 x ``n_backends`` (the paper's M > 100 N);
    the last rung past 41,943 backends (balance then degrades gracefully)."""
    want = 100 * n_backends
    for m in LADDER:
        if m > want:
            return m
    return LADDER[-1]


def _offset_skip(name: str, m: int) -> tuple[int, int]:
    """The paper's h1(name) % M and h2(name) % (M - 1) + 1: two halves of one blake2b."""
    d = blake2b(name.encode(), digest_size=16, person=_NAME_PERSON).digest()
    return (int.from_bytes(d[:8], "little") % m,
            int.from_bytes(d[8:], "little") % (m - 1) + 1)


def _prepare(members: Sequence[tuple[str, float]], size: int
             ) -> tuple[tuple[str, ...], list[int], str]:
    """Check the arguments; the members in name order, their weights as exact integers of
    one scale (so the turn schedule is exact arithmetic, the same on every machine)."""
    if not is_prime(size):
        raise ValueError(f"maglev table size {size} is not a prime")
    order = sorted(members, key=lambda m: m[0])
    names = tuple(n for n, _ in order)
    if len(set(names)) != len(names):
        raise ValueError("maglev members: duplicate names")
    fr = []
    for name, w in order:
        if not (w >= 0) or w == float("inf"):  # also NaN
            raise ValueError(f"maglev member {name!r}: weight {w!r}")
        fr.append(Fraction(w))
    scale = lcm(*(f.denominator for f in fr)) if fr else 1
    weights = [f.numerator * (scale // f.denominator) for f in fr]
    return names, weights, ("H" if len(names) < 65535 else "I")


def build(members: Sequence[tuple[str, float]], size: int
          ) -> tuple[tuple[str, ...], array[int]]:
    """The Maglev lookup table of ``members`` ((name, weight) pairs, any order) and ``size``
    (a prime): returns (names, table), names sorted, table[slot] an index into names.

    Deterministic from the names, weights and size only. The table is array('H') below
    65,535 members, else array('I'); empty if no member has a weight above 0.

    The turns and the slots they take are the paper's (``build_reference`` is its loop; the
    tests check both agree); the cost is not. Filling the table probes ~M ln M slots in all,
    most of them at the end when it is nearly full, so: a tight probe loop (locals, a
    bytearray fill map, compare-subtract instead of modulo) until only ``_tail(M, N)``
    slots are empty, then each member still taking turns sorts those empty slots once by
    their distance along its own preference list (``(slot - here) * skip**-1 mod M``) and
    takes them in that order, skipping the ones taken meanwhile.
    """
    names, weights, tc = _prepare(members, size)
    m = size
    live = [i for i, w in enumerate(weights) if w > 0]
    if not live:
        return names, array(tc)
    pos = [0] * len(names)
    skips = [0] * len(names)
    for i in live:
        pos[i], skips[i] = _offset_skip(names[i], m)
    filled = bytearray(m)
    table = array(tc, bytes(m * array(tc).itemsize))
    turns = _turns(live, weights)
    tail = _tail(m, len(live))
    # Phase 1: probe.
    for i in islice(turns, m - tail):
        p = pos[i]
        s = skips[i]
        while filled[p]:
            p += s
            if p >= m:
                p -= m
        filled[p] = 1
        table[p] = i
        p += s
        if p >= m:
            p -= m
        pos[i] = p
    # Phase 2: the last ``tail`` empty slots, in each member's order.
    empty = list(compress(range(m), filled.translate(_EMPTY)))
    order: dict[int, list[int]] = {}
    for i in islice(turns, tail):
        mine = order.get(i)
        if mine is None:
            here, inv = pos[i], pow(skips[i], -1, m)
            mine = sorted((p for p in empty if not filled[p]),
                          key=lambda p: (p - here) * inv % m, reverse=True)
            order[i] = mine
        p = mine.pop()
        while filled[p]:
            p = mine.pop()
        filled[p] = 1
        table[p] = i
    return names, table


def _tail(m: int, n: int) -> int:
    """How many empty slots ``build`` leaves to its second phase: about where a probe
    (~M / empty of them per turn) costs as much as sorting the empty slots for a member
    (one per member taking turns then, at most N): ~0.4 M / N, at least ~sqrt(M) / 2."""
    return min(m, max(isqrt(m) // 2, (2 * m) // (5 * n)))


def _turns(live: list[int], weights: list[int]) -> Iterator[int]:
    """The members' turns, forever: every member in every round, in name order; weighted,
    member i's k-th turn (k = 0, 1, ...) is in round ceil((k + 1) * wmax / w_i) (exact
    integers), name order within a round. The heaviest member has a turn in every round,
    so no round is empty."""
    wmax = max(weights[i] for i in live)
    if all(weights[i] == wmax for i in live):
        yield from cycle(live)
    due: dict[int, list[int]] = {}
    done = dict.fromkeys(live, 0)
    for i in live:
        due.setdefault(-(-wmax // weights[i]), []).append(i)
    rnd = 1
    while True:
        now = due.pop(rnd)
        now.sort()
        for i in now:
            yield i
            k = done[i] = done[i] + 1
            nxt = -(-(k + 1) * wmax // weights[i])
            lst = due.get(nxt)
            if lst is None:
                due[nxt] = [i]
            else:
                lst.append(i)
        rnd += 1


def build_reference(members: Sequence[tuple[str, float]], size: int
                    ) -> tuple[tuple[str, ...], array[int]]:
    """``build``, written as the paper's pseudocode (one Python step per probe) with Envoy's
    weighted turns: slow (about 10x), kept as the definition the tests check ``build``
    against and the benchmark's baseline."""
    names, weights, tc = _prepare(members, size)
    m = size
    live = [i for i, w in enumerate(weights) if w > 0]
    if not live:
        return names, array(tc)
    wmax = max(weights)
    perm = {i: _offset_skip(names[i], m) for i in live}
    nxt = dict.fromkeys(live, 0)
    turns = dict.fromkeys(live, 0)
    entry = [-1] * m
    n = 0
    rnd = 0
    while True:
        rnd += 1
        for i in live:
            if rnd * weights[i] < (turns[i] + 1) * wmax:
                continue  # not this member's round
            turns[i] += 1
            offset, skip = perm[i]
            c = (offset + nxt[i] * skip) % m
            while entry[c] >= 0:
                nxt[i] += 1
                c = (offset + nxt[i] * skip) % m
            entry[c] = i
            nxt[i] += 1
            n += 1
            if n == m:
                return names, array(tc, entry)


def lookup(table: Sequence[int], key: int, usable: Callable[[int], bool],
           max_probes: int = MAX_PROBES) -> int | None:
    """The member (an index into the table's names) for ``key`` (a ``key_hash``).

    Its own slot ``key % M`` if that member is ``usable``; else the first usable member of
    slots ``slot + j * step`` (mod M), j = 1 .. ``max_probes``, step derived from the key's
    high bits (1 .. M-1): a down or draining member's keys spread over the others, each key
    the same way on both nodes, and come back exactly when it is usable again; other keys
    never move. None if no probe found a usable member (or the table is empty): the caller
    balances the request some other way.
    """
    m = len(table)
    if m == 0:
        return None
    slot = key % m
    i = table[slot]
    if usable(i):
        return i
    if m == 1:
        return None
    step = (key >> 32) % (m - 1) + 1
    for _ in range(max_probes):
        slot += step
        if slot >= m:
            slot -= m
        i = table[slot]
        if usable(i):
            return i
    return None


def sticky_token(pool: str, backend: str) -> str:
    """The sticky cookie's value for ``backend`` of ``pool``: 16 hex characters (a keyed
    blake2b of both names), cookie-safe, the same on both nodes and after restarts, and
    says nothing readable about the backend. Not a secret: a client that sends another
    backend's token just picks that backend."""
    data = pool.encode() + b"\x00" + backend.encode()
    return blake2b(data, digest_size=8, key=_TOKEN_KEY).hexdigest()
