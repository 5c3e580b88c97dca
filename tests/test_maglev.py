"""Maglev hashing (lb.maglev) and maglev pools (lb.data.pool): the paper's figures
(balance at M > 100 N, disruption when a member leaves or joins), Envoy's weighting, the
same table in every process, the lookup's fallback for down members, and the pool's picks.

The measured shares are printed (``pytest -s tests/test_maglev.py``)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from hashlib import blake2b
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb import maglev
from lb.config import HASH_TABLE_MAX, HASH_TABLE_MIN, Balance
from lb.data.pool import Backend, BackendEntry, Outcome, Pool, build_pool
from lb.maglev import LADDER, build, build_reference, key_hash, lookup, table_size

ROOT = Path(__file__).resolve().parents[1]
SMALL_PRIMES = (2, 3, 5, 7, 13, 31, 101, 251, 1009, 4099)


def owners(members: list[tuple[str, float]], size: int) -> list[str]:
    """slot -> member name."""
    names, table = build(members, size)
    return [names[i] for i in table]


def equal(n: int) -> list[tuple[str, float]]:
    return [(f"backend-{i}", 1) for i in range(n)]


# -- sizes ------------------------------------------------------------------------------------


def test_ladder_is_primes_near_powers_of_two_within_the_config_bounds() -> None:
    assert LADDER[0] == 65537 and LADDER[-1] == HASH_TABLE_MAX
    for k, m in enumerate(LADDER, start=16):
        assert maglev.is_prime(m), m
        assert abs(m - 2**k) < 64, (k, m)
        assert HASH_TABLE_MIN <= m <= HASH_TABLE_MAX
    assert list(LADDER) == sorted(LADDER)


@given(st.integers(min_value=0, max_value=200_000))
def test_table_size_is_the_smallest_rung_above_100_n(n: int) -> None:
    m = table_size(n)
    assert m in LADDER
    if 100 * n < LADDER[-1]:
        assert m > 100 * n
        assert all(r <= 100 * n for r in LADDER if r < m)
    else:
        assert m == LADDER[-1]


def test_table_size_changes_only_at_rungs() -> None:
    assert table_size(1) == table_size(655) == 65537
    assert table_size(656) == table_size(1310) == 131071
    assert table_size(1000) == 131071 and table_size(3000) == 524309


def test_build_refuses_a_size_that_is_not_prime_and_bad_weights() -> None:
    with pytest.raises(ValueError, match="prime"):
        build(equal(3), 65536)
    with pytest.raises(ValueError, match="duplicate"):
        build([("a", 1), ("a", 2)], 13)
    for w in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight"):
            build([("a", w)], 13)


# -- the population ---------------------------------------------------------------------------

members_st = st.lists(
    st.tuples(st.text(min_size=1, max_size=6),
              st.sampled_from([0, 1, 1, 1, 2, 3, 0.5, 7, 100])),
    min_size=0, max_size=12, unique_by=lambda m: m[0],
)


@settings(max_examples=150)
@given(members_st, st.sampled_from(SMALL_PRIMES))
def test_build_is_the_papers_population(members: list[tuple[str, float]], size: int) -> None:
    """The optimized build fills exactly the table of the paper's loop (Envoy's weights)."""
    assert build(members, size) == build_reference(members, size)


@pytest.mark.parametrize("n", [3, 40, 300])
def test_build_matches_the_reference_at_real_sizes(n: int) -> None:
    rng = random.Random(n)
    members = [(f"10.0.{i // 250}.{i % 250}:8080", rng.choice([1, 1, 2, 5])) for i in range(n)]
    assert build(members, 65537) == build_reference(members, 65537)


@given(members_st, st.sampled_from(SMALL_PRIMES), st.randoms())
def test_build_depends_on_the_set_of_members_not_their_order(
    members: list[tuple[str, float]], size: int, rnd: random.Random
) -> None:
    shuffled = list(members)
    rnd.shuffle(shuffled)
    names, table = build(members, size)
    assert build(shuffled, size) == (names, table)
    assert list(names) == sorted(n for n, _ in members)
    live = [i for i, (_, w) in enumerate(sorted(members)) if w > 0]
    if live:
        assert len(table) == size and set(table) <= set(live)
        assert table.typecode == "H"
    else:
        assert len(table) == 0


def test_typecode_widens_at_65535_members() -> None:
    names, table = build([(f"m{i}", 0) for i in range(65533)] + [("x", 1)], 13)
    assert table.typecode == "H" and set(table) == {names.index("x")}
    names, table = build([(f"m{i}", 0) for i in range(65534)] + [("x", 1)], 13)
    assert table.typecode == "I" and set(table) == {names.index("x")}


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_balance_every_member_owns_floor_or_ceil_of_m_over_n(n: int) -> None:
    """The paper: with M > 100 N, shares are within 1 % of each other."""
    m = table_size(n)
    counts = Counter(build(equal(n), m)[1])
    assert len(counts) == n
    lo, hi = min(counts.values()), max(counts.values())
    assert {lo, hi} <= {m // n, -(-m // n)}
    print(f"\nbalance N={n} M={m}: entries per member {lo}..{hi} (M/N = {m / n:.1f}), "
          f"spread {(hi - lo) / lo:.3%}")
    assert (hi - lo) / lo < 0.01


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=8))
def test_weighted_shares_are_proportional(weights: list[int]) -> None:
    """Envoy's weighting: a member's entries are its weight's share of M, within 1 + N w / W
    entries (whole rounds of turns); weight 0 owns nothing."""
    members = [(f"b{i}", float(w)) for i, w in enumerate(weights)]
    m = 65537
    names, table = build(members, m)
    counts = Counter(names[i] for i in table)
    total = sum(weights)
    for name, w in members:
        if total == 0 or w == 0:
            assert counts[name] == 0
        else:
            assert abs(counts[name] - m * w / total) <= 1 + len(weights) * w / total, name


# -- disruption -------------------------------------------------------------------------------


def moved_share(before: list[str], after: list[str]) -> float:
    return sum(a != b for a, b in zip(before, after, strict=True)) / len(before)


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_removing_one_of_n_moves_about_one_nth(n: int) -> None:
    """Every slot of the removed member moves, and a little more (Maglev trades some
    disruption for balance): measured ~0.2-0.6 % of keys beyond its own share."""
    m = table_size(n)
    members = equal(n)
    before = owners(members, m)
    gone = members[random.Random(n).randrange(n)][0]
    after = owners([mm for mm in members if mm[0] != gone], m)
    own = before.count(gone) / m
    moved = moved_share(before, after)
    print(f"\nremove 1 of N={n} (M={m}): {moved:.4%} of keys moved, 1/N = {1 / n:.4%}, "
          f"its own {own:.4%}, others' {moved - own:.4%}")
    assert gone not in after
    assert all(a != gone for a in after)
    assert moved >= own
    assert moved - own < 0.008
    if n <= 10:
        assert moved < 1.05 / n


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_adding_one_to_n_moves_about_one_over_n_plus_one(n: int) -> None:
    m = table_size(n)
    before = owners(equal(n), m)
    after = owners([*equal(n), ("newcomer", 1)], m)
    gained = after.count("newcomer") / m
    moved = moved_share(before, after)
    print(f"\nadd 1 to N={n} (M={m}): {moved:.4%} of keys moved, 1/(N+1) = {1 / (n + 1):.4%}, "
          f"to the newcomer {gained:.4%}")
    assert abs(gained - 1 / (n + 1)) < 0.001
    assert gained <= moved < gained + 0.008


# -- the same everywhere ----------------------------------------------------------------------

_PROBE = """
import json, sys
from hashlib import blake2b
from lb import maglev
members = [(f"web-{i}", 1 + i % 3) for i in range(50)]
names, table = maglev.build(members, 65537)
print(json.dumps({
    "table": blake2b(table.tobytes(), digest_size=16).hexdigest(),
    "names": list(names),
    "keys": [maglev.key_hash(k.encode()) for k in ("203.0.113.7", "/cart", "")],
    "token": maglev.sticky_token("web", "web-7"),
    "size": maglev.table_size(50),
}))
"""


def _probe_here() -> dict[str, object]:
    members = [(f"web-{i}", 1 + i % 3) for i in range(50)]
    names, table = build(members, 65537)
    return {
        "table": blake2b(table.tobytes(), digest_size=16).hexdigest(),
        "names": list(names),
        "keys": [key_hash(k.encode()) for k in ("203.0.113.7", "/cart", "")],
        "token": maglev.sticky_token("web", "web-7"),
        "size": table_size(50),
    }


def test_same_table_keys_and_tokens_in_processes_with_other_hash_seeds() -> None:
    """Workers and both nodes agree: nothing depends on Python's randomized hash()."""
    here = _probe_here()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=30, check=True)
        assert json.loads(out.stdout) == here, seed


def test_pinned_values_survive_upgrades() -> None:
    """Two nodes on different versions must still agree: a change here breaks affinity and
    every client's sticky cookie across an upgrade (make it on purpose, or not at all)."""
    assert key_hash(b"203.0.113.7") == 12676204356281172361
    assert maglev.sticky_token("web", "web-7") == "94c0ef2bacfecc9b"
    names, table = build([("a", 1), ("b", 2), ("c", 1)], 13)
    assert names == ("a", "b", "c")
    assert list(table) == [1, 0, 1, 1, 0, 1, 1, 1, 0, 2, 1, 2, 2]


def test_sticky_token_is_cookie_safe_and_distinct() -> None:
    tokens = {maglev.sticky_token(p, f"b{i}") for p in ("web", "api") for i in range(500)}
    assert len(tokens) == 1000
    assert all(len(t) == 16 and set(t) <= set("0123456789abcdef") for t in tokens)
    assert maglev.sticky_token("a", "bc") != maglev.sticky_token("ab", "c")


# -- lookup: health and drain win -------------------------------------------------------------

_RNG = random.Random(7)
KEYS = [_RNG.getrandbits(64) for _ in range(4000)]
N_LOOKUP = 20
NAMES, TABLE = build(equal(N_LOOKUP), 4099)


def assign(down: set[int], keys: list[int] = KEYS) -> list[int | None]:
    return [lookup(TABLE, k, lambda i: i not in down) for k in keys]


BASE = assign(set())


def test_lookup_is_the_keys_slot_when_everyone_is_up() -> None:
    assert [TABLE[k % len(TABLE)] for k in KEYS] == BASE
    counts = Counter(BASE)
    assert len(counts) == N_LOOKUP


@settings(max_examples=60)
@given(st.sets(st.integers(min_value=0, max_value=N_LOOKUP - 1), max_size=N_LOOKUP - 2))
def test_a_down_members_keys_move_to_others_and_come_back(down: set[int]) -> None:
    now = assign(down)
    for base, cur in zip(BASE, now, strict=True):
        if base not in down:
            assert cur == base  # nobody else's keys move
        else:
            assert cur is None or cur not in down
    # The moved keys spread over the members that are up, not onto one of them.
    moved = Counter(c for b, c in zip(BASE, now, strict=True) if b in down)
    if down and len(down) <= N_LOOKUP // 2:
        n_moved = sum(moved.values())
        assert moved[None] == 0
        assert max(moved.values()) <= max(10, n_moved // 3), moved
    # Back up: exactly where they were.
    assert assign(set()) == BASE


def test_lookup_spreads_one_down_members_keys_and_gives_up_past_max_probes() -> None:
    now = assign({3})
    moved = [c for b, c in zip(BASE, now, strict=True) if b == 3]
    assert None not in moved and len(set(moved)) >= N_LOOKUP // 2
    everyone = set(range(N_LOOKUP))
    assert assign(everyone, KEYS[:50]) == [None] * 50
    probes: list[int] = []

    def nobody(i: int) -> bool:
        probes.append(i)
        return False

    assert lookup(TABLE, KEYS[0], nobody, max_probes=5) is None and len(probes) == 6
    assert lookup(build([], 13)[1], 5, lambda i: True) is None


# -- pools ------------------------------------------------------------------------------------


def maglev_pool(n: int = 10, size: int = 4099, order: list[int] | None = None,
                consecutive_failures: int = 3, max_eject_percent: int = 50) -> Pool:
    idx = order if order is not None else list(range(n))
    pool = build_pool("web", "maglev", [(f"b{i}", "127.0.0.1", 9000 + i, 1.0) for i in idx],
                      consecutive_failures=consecutive_failures,
                      max_eject_percent=max_eject_percent)
    names, table = build([(f"b{i}", 1) for i in range(n)], size)
    pool.set_hash_table(names, table)
    return pool


def picked(pool: Pool, key: int, now: float = 0.0, exclude: tuple[Backend, ...] = ()) -> str:
    b = pool.pick(now, exclude, key)
    assert b is not None
    pool.release(b)
    return b.name


def test_pool_picks_by_key_like_the_table_and_counts_in_flight() -> None:
    pool = maglev_pool()
    names, table = build([(f"b{i}", 1) for i in range(10)], 4099)
    for k in KEYS[:300]:
        assert picked(pool, k) == names[table[k % len(table)]]
    b = pool.pick(0.0, (), KEYS[0])
    assert b is not None and b.in_flight == 1 and b.requests > 0
    pool.release(b)
    assert b.in_flight == 0


def test_two_nodes_pick_the_same_backend_for_a_key() -> None:
    """The pair's nodes list (and added) their backends in different orders: same picks."""
    a = maglev_pool()
    b = maglev_pool(order=[7, 3, 9, 0, 1, 2, 8, 6, 5, 4])
    assert [picked(a, k) for k in KEYS[:500]] == [picked(b, k) for k in KEYS[:500]]


def test_pool_without_a_key_or_table_is_round_robin() -> None:
    pool = maglev_pool(n=3)
    seen = Counter(picked(pool, None) for _ in range(30))  # type: ignore[arg-type]
    assert seen == {"b0": 10, "b1": 10, "b2": 10}
    bare = build_pool("web", "maglev", [(f"b{i}", "h", 1, 1.0) for i in range(3)])
    assert Counter(picked(bare, k) for k in KEYS[:30]) == {"b0": 10, "b1": 10, "b2": 10}


def test_retry_excludes_and_goes_to_the_keys_next_choice() -> None:
    pool = maglev_pool()
    for k in KEYS[:100]:
        first = pool.get(picked(pool, k))
        assert first is not None
        second = picked(pool, k, exclude=(first,))
        assert second != first.name
        assert picked(pool, k, exclude=(first,)) == second  # deterministic
        everyone = tuple(pool.backends)
        assert pool.pick(0.0, everyone, k) is None


def test_drained_or_zero_weight_backend_is_skipped_and_returns() -> None:
    pool = maglev_pool()
    base = {k: picked(pool, k) for k in KEYS[:500]}
    entries = {f"b{i}": BackendEntry(True, 1.0) for i in range(10)}
    pool.apply(1, {**entries, "b4": BackendEntry(False, 1.0), "b5": BackendEntry(True, 0.0)},
               False)
    for k, name in base.items():
        now = picked(pool, k)
        assert now not in ("b4", "b5")
        if name not in ("b4", "b5"):
            assert now == name
    pool.apply_delta(2, {"b4": BackendEntry(True, 1.0), "b5": BackendEntry(True, 2.0)}, False)
    assert {k: picked(pool, k) for k in base} == base


def test_locally_ejected_backend_is_skipped_until_its_ejection_ends() -> None:
    pool = maglev_pool(consecutive_failures=1, max_eject_percent=50)
    base = {k: picked(pool, k) for k in KEYS[:300]}
    victim = pool.get("b2")
    assert victim is not None
    assert pool.observe(victim, Outcome.CONNECT_FAILED, 1.0) is not None
    during = {k: picked(pool, k, now=2.0) for k in base}
    assert "b2" not in during.values()
    assert all(during[k] == v for k, v in base.items() if v != "b2")
    after = {k: picked(pool, k, now=1.0 + pool.local_eject_s + 0.1) for k in base}
    assert after == base


def test_backend_removed_is_never_picked_and_added_ones_wait_for_a_table() -> None:
    pool = maglev_pool()
    base = {k: picked(pool, k) for k in KEYS[:500]}
    gone = pool.remove_backend("b6")
    assert gone is not None
    assert "b6" not in {picked(pool, k) for k in base}
    assert pool.by_token(gone.token) is None
    # A newcomer is in rotation (round robin) but owns no slots until the next table.
    pool.add_backend(Backend("web", "b10", "127.0.0.1", 9010))
    pool.apply_delta(2, {"b10": BackendEntry(True, 1.0)}, False)
    assert "b10" not in {picked(pool, k) for k in base}
    assert "b10" in {picked(pool, None) for _ in range(20)}  # type: ignore[arg-type]
    # b6 added back under the same name gets its slots again.
    pool.add_backend(Backend("web", "b6", "127.0.0.1", 9006))
    pool.apply_delta(3, {"b6": BackendEntry(True, 1.0)}, False)
    assert {k: picked(pool, k) for k in base} == base
    # The next table includes b10 and moves about 1/11 of the keys to it.
    names, table = build([(f"b{i}", 1) for i in range(11)], 4099)
    pool.set_hash_table(names, table)
    share = sum(picked(pool, k) == "b10" for k in KEYS) / len(KEYS)
    assert 0.06 < share < 0.12


def test_set_hash_table_checks_what_it_is_given() -> None:
    rr = build_pool("web", "round_robin", [("b0", "h", 1, 1.0)])
    with pytest.raises(ValueError, match="maglev"):
        rr.set_hash_table(*build([("b0", 1)], 13))
    pool = maglev_pool()
    names, table = build([("b0", 1), ("b1", 1)], 13)
    with pytest.raises(ValueError, match="past"):
        pool.set_hash_table(names[:1], table)
    with pytest.raises(ValueError, match="unique"):
        pool.set_hash_table(("b0", "b0"), table)
    # Names the pool does not have own slots that fall through to the next choice.
    names, table = build([("b0", 1), ("ghost", 1)], 13)
    pool.set_hash_table(names, table)
    assert {picked(pool, k) for k in KEYS[:200]} == {"b0"}
    pool.set_hash_table(*build([], 13))  # no member with weight: round robin
    assert len({picked(pool, k) for k in KEYS[:200]}) == 10


@pytest.mark.parametrize("balance", ["maglev", "round_robin", "least_connections", "random_two"])
def test_sticky_token_picks_its_backend_while_it_is_in_rotation(balance: Balance) -> None:
    pool = build_pool("web", balance, [(f"b{i}", "h", 9000 + i, 1.0) for i in range(4)], seed=1,
                      consecutive_failures=1)
    b2 = pool.get("b2")
    assert b2 is not None
    tok = pool.token_of(b2)
    assert tok == b2.token == maglev.sticky_token("web", "b2")
    assert pool.by_token(tok) is b2 and pool.by_token(tok.encode()) is b2
    assert pool.by_token("0123456789abcdef") is None
    got = pool.take_token(tok.encode(), 0.0)
    assert got is b2 and b2.in_flight == 1 and b2.requests == 1
    assert pool.take_token(tok, 0.0, (b2,)) is None
    # The rest of the pool's picks still balance (least connections sees b2's load).
    for _ in range(8):
        c = pool.pick(0.0)
        assert c is not None
    pool.release(b2)
    # Drained, ejected, removed: no sticky pick.
    pool.apply_delta(1, {"b2": BackendEntry(False, 1.0)}, False)
    assert pool.by_token(tok) is None and pool.take_token(tok, 0.0) is None
    pool.apply_delta(2, {"b2": BackendEntry(True, 1.0)}, False)
    assert pool.take_token(tok, 0.0) is b2
    pool.release(b2)
    assert pool.observe(b2, Outcome.TIMEOUT, 1.0) is not None
    assert pool.take_token(tok, 2.0) is None
    assert pool.take_token(tok, 1.0 + pool.local_eject_s) is b2  # its ejection ended
    pool.release(b2)
    pool.remove_backend("b2")
    assert pool.take_token(tok, 100.0) is None


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=9), st.booleans()), max_size=30))
def test_pool_picks_are_the_lookup_of_the_rotation(changes: list[tuple[int, bool]]) -> None:
    """Whatever comes and goes, a keyed pick is lookup() over the backends in rotation."""
    pool = maglev_pool()
    names, table = build([(f"b{i}", 1) for i in range(10)], 4099)
    up = set(range(10))
    for version, (i, on) in enumerate(changes, start=1):
        pool.apply_delta(version, {f"b{i}": BackendEntry(on, 1.0)}, False)
        (up.add if on else up.discard)(i)
    for k in KEYS[:200]:
        want = lookup(table, k, lambda j: int(names[j][1:]) in up)
        b = pool.pick(0.0, (), k)
        if want is not None:
            assert b is not None and b.name == names[want]
        elif not up:
            assert b is None
        if b is not None:
            pool.release(b)
