"""The runtime-backend overlay (issue 16): precedence over the config, LWW merge, wire checks.

Pure rules only (lb.control.overlay); the journal on disk is tests/test_overlay_store.py.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.config import BackendConfig, HealthOverride, PoolConfig
from lb.control.overlay import (
    INT_MAX,
    TOMBSTONE_GRACE_S,
    Effective,
    Intent,
    Merge,
    Overlay,
    OverlayError,
    Retired,
    compose,
    entries_from_wire,
    entries_to_wire,
    from_wire,
    retired_from_wire,
    retired_to_wire,
    same_definition,
    seen_from_wire,
    to_wire,
)

DAY = 24 * 3600.0
T0 = 1_800_000_000.0


def B(name: str, address: str, weight: int = 1, **kw: Any) -> BackendConfig:
    return BackendConfig(name=name, address=address, weight=weight, **kw)


def P(name: str, *backends: BackendConfig) -> PoolConfig:
    return PoolConfig(name=name, backends=backends)


WEB = P("web", B("web1", "10.0.0.1:80"), B("web2", "10.0.0.2:80", 2), B("web3", "10.0.0.3:80"))


def view(effs: list[Effective]) -> list[tuple[str, str, int, str, str | None, bool]]:
    return [(e.backend.name, e.backend.address, e.backend.weight, e.source, e.shadows,
             e.patched) for e in effs]


def ov_with(*ops: tuple[Any, ...], node: str = "lb-a", at: float = T0) -> Overlay:
    ov = Overlay(node)
    for op in ops:
        pool, backend, state, address, weight = op
        ov.local(pool, backend, state, address, weight, "api", at)
    return ov


# -- precedence table (module docstring), row by row ----------------------------------------


def test_row1_config_only() -> None:
    c = compose([WEB], Overlay("lb-a"), now=T0)
    assert view(c.pools["web"]) == [
        ("web1", "10.0.0.1:80", 1, "config", None, False),
        ("web2", "10.0.0.2:80", 2, "config", None, False),
        ("web3", "10.0.0.3:80", 1, "config", None, False),
    ]
    assert c.pools["web"][0].backend is WEB.backends[0]  # the config's object, untouched
    assert (c.notes, c.retire, c.tombstoned, c.orphans) == ([], [], [], [])


def test_row2_discovered_after_config() -> None:
    c = compose([WEB], Overlay("lb-a"), {"web": ("dns", [B("d1", "10.1.0.1:80")])}, now=T0)
    assert view(c.pools["web"])[3] == ("d1", "10.1.0.1:80", 1, "dns", None, False)
    assert c.notes == []


def test_row3_discovered_name_of_a_config_backend_config_wins() -> None:
    found = {"web": ("file", [B("web1", "10.9.9.9:80"), B("d1", "10.1.0.1:80"),
                              B("d1", "10.1.0.2:80")])}
    c = compose([WEB], Overlay("lb-a"), found, now=T0)
    assert [e.backend.address for e in c.pools["web"]] == [
        "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.1.0.1:80"]
    assert len(c.notes) == 2
    assert "file backend web1 ignored: the config has a backend of that name" in c.notes[0]
    assert "file backend d1 ignored: file already gave that name" in c.notes[1]


def test_row4_present_adds_after_the_base_in_stamp_order() -> None:
    ov = ov_with(("web", "new2", "present", "10.0.1.2:80", 5),
                 ("web", "new1", "present", "10.0.1.1:80", 1))
    c = compose([WEB], ov, {"web": ("dns", [B("d1", "10.1.0.1:80")])}, now=T0)
    assert view(c.pools["web"])[3:] == [
        ("d1", "10.1.0.1:80", 1, "dns", None, False),
        ("new2", "10.0.1.2:80", 5, "api", None, False),
        ("new1", "10.0.1.1:80", 1, "api", None, False),
    ]
    assert c.notes == [] and c.retire == []


def test_row4_api_backend_is_plain_with_the_pools_defaults() -> None:
    ov = ov_with(("web", "new", "present", "[2001:db8::1]:8080", 3))
    b = compose([WEB], ov, now=T0).pools["web"][-1].backend
    assert b == BackendConfig(name="new", address="[2001:db8::1]:8080", weight=3)
    assert b.health is None and b.host_port == ("2001:db8::1", 8080)


def test_row5_present_identical_to_config_is_retired() -> None:
    ov = ov_with(("web", "web2", "present", "10.0.0.2:80", 2))
    c = compose([WEB], ov, now=T0)
    assert view(c.pools["web"]) == view(compose([WEB], Overlay("x"), now=T0).pools["web"])
    assert c.retire == [("web", "web2")]
    assert c.notes == ["pool web: web2: now in the config, runtime entry retired"]


def test_row5_identity_is_by_parsed_address() -> None:
    pool = P("p", B("a", "[2001:db8::1]:80"))
    ov = ov_with(("p", "a", "present", "[2001:db8:0::1]:80", 1))
    assert compose([pool], ov, now=T0).retire == []  # host strings differ: not the same
    ov = ov_with(("p", "a", "present", "[2001:db8::1]:080", 1))
    assert compose([pool], ov, now=T0).retire == [("p", "a")]


def test_row6_present_identical_to_discovered_is_kept() -> None:
    ov = ov_with(("web", "d1", "present", "10.1.0.1:80", 1))
    c = compose([WEB], ov, {"web": ("dns", [B("d1", "10.1.0.1:80")])}, now=T0)
    assert view(c.pools["web"])[3] == ("d1", "10.1.0.1:80", 1, "api", None, False)
    assert c.retire == [] and c.notes == []
    # DNS drops the name: the runtime entry keeps the backend.
    c = compose([WEB], ov, {"web": ("dns", [])}, now=T0)
    assert view(c.pools["web"])[3] == ("d1", "10.1.0.1:80", 1, "api", None, False)


@pytest.mark.parametrize("source", ["config", "dns", "file"])
def test_row7_present_differing_shadows_the_base(source: str) -> None:
    pool = P("p", B("a", "10.0.0.1:80", 1, health=HealthOverride(path="/x")), B("z", "h:1"))
    found = {"p": ("dns" if source == "config" else source, [B("b", "10.0.0.2:80")])}
    name = "a" if source == "config" else "b"
    ov = ov_with(("p", name, "present", "10.0.0.9:81", 4))
    c = compose([pool], ov, found, now=T0)
    eff = {e.backend.name: e for e in c.pools["p"]}
    assert [e.backend.name for e in c.pools["p"]] == ["a", "z", "b"]  # stays in place
    assert (eff[name].source, eff[name].shadows, eff[name].patched) == ("api", source, False)
    assert eff[name].backend == B(name, "10.0.0.9:81", 4)  # plain: no health override
    assert c.retire == []
    assert len(c.notes) == 1 and f"runtime entry shadows the {source} backend" in c.notes[0]
    assert "weight 1 -> 10.0.0.9:81 weight 4" in c.notes[0]


@pytest.mark.parametrize("source", ["config", "dns"])
def test_row8_weight_patch(source: str) -> None:
    pool = P("p", B("a", "10.0.0.1:80", 1, health=HealthOverride(path="/x")))
    found = {"p": ("dns", [B("d", "10.0.0.2:80")])}
    name = "a" if source == "config" else "d"
    ov = ov_with(("p", name, "present", None, 0))
    c = compose([pool], ov, found, now=T0)
    eff = {e.backend.name: e for e in c.pools["p"]}
    assert (eff[name].source, eff[name].shadows, eff[name].patched) == (source, None, True)
    assert eff[name].backend.weight == 0
    if source == "config":
        assert eff[name].backend.health == HealthOverride(path="/x")  # the rest is config's
    assert c.retire == [] and c.notes == []


def test_row9_weight_patch_equal_to_config_is_retired() -> None:
    ov = ov_with(("web", "web2", "present", None, 2))
    c = compose([WEB], ov, now=T0)
    assert view(c.pools["web"])[1] == ("web2", "10.0.0.2:80", 2, "config", None, False)
    assert c.retire == [("web", "web2")]
    assert c.notes == ["pool web: web2: weight 2 now in the config, runtime patch retired"]


def test_row9_patch_equal_to_a_discovered_weight_is_kept() -> None:
    ov = ov_with(("web", "d1", "present", None, 1))
    c = compose([WEB], ov, {"web": ("dns", [B("d1", "10.1.0.1:80")])}, now=T0)
    assert c.retire == [] and c.pools["web"][3].patched


def test_row10_patch_of_a_gone_backend_in_a_config_only_pool_is_retired() -> None:
    ov = ov_with(("web", "gone", "present", None, 3))
    c = compose([WEB], ov, now=T0)
    assert [e.backend.name for e in c.pools["web"]] == ["web1", "web2", "web3"]
    assert c.retire == [("web", "gone")]
    assert c.notes == ["pool web: gone: weight patch retired (no such backend)"]


def test_row11_patch_of_an_absent_discovered_name_waits_for_the_grace() -> None:
    ov = ov_with(("web", "d9", "present", None, 3))
    found = {"web": ("dns", [B("d1", "10.1.0.1:80")])}
    c = compose([WEB], ov, found, now=T0 + DAY)
    assert c.retire == [] and len(c.pools["web"]) == 4
    assert c.notes == ["pool web: d9: weight patch kept for a backend dns does not list now"]
    c = compose([WEB], ov, found, now=T0 + TOMBSTONE_GRACE_S)
    assert c.retire == [("web", "d9")]


@pytest.mark.parametrize("source", ["config", "dns"])
def test_row12_tombstone_of_a_base_backend(source: str) -> None:
    name = "web2" if source == "config" else "d1"
    ov = ov_with(("web", name, "removed", None, None))
    c = compose([WEB], ov, {"web": ("dns", [B("d1", "10.1.0.1:80")])}, now=T0 + 30 * DAY)
    assert name not in [e.backend.name for e in c.pools["web"]]
    assert c.tombstoned == [("web", name)]
    assert c.retire == []  # kept as long as a base names the backend, whatever its age


def test_row13_tombstone_of_a_name_no_base_has_is_retired_after_the_grace() -> None:
    ov = ov_with(("web", "old", "removed", None, None))
    assert compose([WEB], ov, now=T0 + TOMBSTONE_GRACE_S - 1).retire == []
    c = compose([WEB], ov, now=T0 + TOMBSTONE_GRACE_S)
    assert c.retire == [("web", "old")] and c.tombstoned == []
    assert "removal retired" in c.notes[0]
    assert compose([WEB], ov, now=T0 + 2 * DAY, tombstone_grace_s=DAY).retire == [("web", "old")]


def test_row13_tombstone_waits_for_the_peer_cursor() -> None:
    ov = ov_with(("web", "old", "removed", None, None))
    late = T0 + TOMBSTONE_GRACE_S
    assert compose([WEB], ov, now=late, peer_seen={}).retire == []
    assert compose([WEB], ov, now=late, peer_seen={"lb-a": 0}).retire == []
    assert compose([WEB], ov, now=late, peer_seen={"lb-a": 1}).retire == [("web", "old")]


def test_row14_entries_of_a_missing_pool_are_orphans() -> None:
    ov = ov_with(("gone", "x", "present", "10.0.0.1:80", 1), ("gone", "y", "removed", None, None),
                 ("web", "new", "present", "10.0.1.1:80", 1))
    c = compose([WEB], ov, {"nopool": ("dns", [])}, now=T0 + 365 * DAY)
    assert c.orphans == [("gone", "x"), ("gone", "y")]
    assert c.retire == [] and set(c.pools) == {"web"}
    assert "pool gone: not in the config; 2 runtime entries kept, not applied" in c.notes
    assert "pool nopool: not in the config; its discovered backends ignored" in c.notes
    assert len(ov) == 3  # compose never changes the overlay


def test_every_backend_tombstoned_is_reported() -> None:
    ov = ov_with(*(("web", f"web{i}", "removed", None, None) for i in (1, 2, 3)))
    c = compose([WEB], ov, now=T0)
    assert c.pools["web"] == [] and c.notes == ["pool web: no backend left"]


def test_composition_of_several_pools_keeps_config_order() -> None:
    other = P("api", B("a1", "10.2.0.1:80"))
    ov = ov_with(("api", "a2", "present", "10.2.0.2:80", 1), ("web", "web1", "removed", None, None))
    c = compose([WEB, other], ov, now=T0)
    assert list(c.pools) == ["web", "api"]
    assert [e.backend.name for e in c.pools["api"]] == ["a1", "a2"]
    assert c.tombstoned == [("web", "web1")]


# -- local changes ------------------------------------------------------------------------------


def test_local_stamps_numbers_and_links_to_the_previous_value() -> None:
    ov = Overlay("lb-a")
    a = ov.local("web", "x", "present", "10.0.0.1:80", None, "api", T0)
    assert (a.stamp, a.seq, a.weight, a.prev, a.origin) == ((1, "lb-a"), 1, 1, None, "lb-a")
    b = ov.local("web", "x", "present", None, 5, "cli", T0)
    assert (b.stamp, b.seq, b.address, b.weight, b.prev) == ((2, "lb-a"), 2, "10.0.0.1:80", 5,
                                                             (1, "lb-a"))
    c = ov.local("web", "x", "removed", None, None, "api", T0)
    d = ov.local("web", "x", "present", None, 3, "api", T0)  # on a tombstone: a patch
    assert (c.prev, d.address, d.weight) == ((2, "lb-a"), None, 3)
    assert ov.lamport == 4 and ov.next_seq == 5 and ov.seen == {"lb-a": 4}
    assert ov.entries[("web", "x")] is d


@pytest.mark.parametrize(("args", "message"), [
    (("web", "x", "removed", "10.0.0.1:80", None), "removed: carries no address or weight"),
    (("web", "x", "removed", None, 1), "removed: carries no address or weight"),
    (("web", "x", "present", None, None), "present: needs an address or a weight"),
    (("web", "x", "present", "nope", 1), "address: 'nope': expected host:port"),
    (("web", "x", "present", "h:1", 1001), "weight: expected an integer 0..1000"),
    (("web", "x", "present", "h:1", -1), "weight: expected an integer 0..1000"),
    (("we/b", "x", "present", "h:1", 1), "pool: expected 1..64 ASCII letters"),
    (("web", "x" * 65, "present", "h:1", 1), "backend: expected 1..64"),
    (("web", "", "present", "h:1", 1), "backend: expected 1..64"),
    (("web", "x", "gone", None, None), "state: expected present or removed"),
    (("web", "x\n", "present", "h:1", 1), "backend: expected 1..64"),
])
def test_local_refuses_what_the_config_would(
    args: tuple[str, str, Any, str | None, int | None], message: str
) -> None:
    ov = Overlay("lb-a")
    with pytest.raises(OverlayError, match="^" + message.replace(".", r"\.")):
        ov.local(*args, "api", T0)
    assert (ov.entries, ov.lamport, ov.seen) == ({}, 0, {})  # nothing half-applied
    with pytest.raises(OverlayError, match="via"):
        ov.local("web", "x", "present", "h:1", 1, "web", T0)
    with pytest.raises(OverlayError, match="at"):
        ov.local("web", "x", "present", "h:1", 1, "api", math.nan)


def test_an_integer_time_digests_as_the_peer_decodes_it() -> None:
    a, b = Overlay("lb-a"), Overlay("lb-b")
    op = a.local("web", "x", "present", "10.0.0.1:80", 1, "api", 1_800_000_000)
    assert type(op.at) is float
    b.merge(from_wire(json.loads(json.dumps(to_wire(op)))))
    assert b.digest() == a.digest()


def test_overlay_refuses_a_bad_node_name() -> None:
    with pytest.raises(OverlayError, match="node"):
        Overlay("a b")
    with pytest.raises(OverlayError, match="node"):
        Overlay("x" * 33)


# -- merge --------------------------------------------------------------------------------------


def test_later_stamp_wins_ties_by_node_name() -> None:
    a, b = Overlay("lb-a"), Overlay("lb-b")
    ia = a.local("web", "x", "present", "10.0.0.1:80", 1, "api", T0)
    ib = b.local("web", "x", "removed", None, None, "api", T0)  # same lamport, 1
    ma, mb = a.merge(ib), b.merge(ia)
    assert ma.won and not mb.won  # "lb-b" > "lb-a"
    assert a.entries == b.entries and a.digest() == b.digest()
    assert ma.conflict == ia and mb.conflict == ib  # neither saw the other
    assert a.lamport == b.lamport == 1


def test_a_change_made_after_seeing_the_peers_wins_and_is_no_conflict() -> None:
    a, b = Overlay("lb-z"), Overlay("lb-a")  # b loses ties: only causality makes it win
    ia = a.local("web", "x", "present", "10.0.0.1:80", 1, "api", T0)
    assert b.merge(ia) == Merge(True, False, None)
    assert b.merge(ia) == Merge(False, True, None)
    ib = b.local("web", "x", "present", None, 3, "api", T0)  # after seeing ia
    assert ib.stamp == (2, "lb-a") and ib.prev == ia.stamp
    m = a.merge(ib)
    assert m == Merge(True, False, None)
    assert a.entries[("web", "x")].weight == 3 and a.lamport == 2


def test_causal_overwrite_is_not_a_conflict_but_a_concurrent_one_is() -> None:
    a, b = Overlay("lb-a"), Overlay("lb-b")
    add = a.local("web", "x", "present", "10.0.0.1:80", 1, "api", T0)
    assert b.merge(add) == Merge(True, False, None)
    patch = b.local("web", "x", "present", None, 2, "api", T0)
    assert a.merge(patch).conflict is None  # b had seen a's add
    # A partition: both change x without seeing the other.
    pa = a.local("web", "x", "present", None, 7, "api", T0)
    pb = b.local("web", "x", "removed", None, None, "api", T0)
    ma, mb = a.merge(pb), b.merge(pa)
    assert ma.won and ma.conflict == pa  # pa and pb: lamport 3; "lb-b" wins the tie
    assert not mb.won and mb.conflict == pb and not mb.duplicate
    assert a.entries == b.entries
    # Delivered again: a duplicate, no second conflict report.
    assert a.merge(pb) == Merge(False, True) and b.merge(pa) == Merge(False, True)


def test_an_old_op_of_a_known_origin_is_a_duplicate() -> None:
    a, b = Overlay("lb-a"), Overlay("lb-b")
    first = a.local("web", "x", "present", "10.0.0.1:80", 1, "api", T0)
    second = a.local("web", "x", "present", "10.0.0.1:80", 2, "api", T0)
    b.merge(first)
    b.merge(second)
    assert b.merge(first) == Merge(False, True)  # a journal replay over a snapshot
    assert b.entries[("web", "x")] == second


def test_own_ops_coming_back_advance_the_sequence() -> None:
    old = Overlay("lb-a")
    ops = [old.local("web", f"x{i}", "present", "10.0.0.1:80", 1, "api", T0) for i in range(3)]
    fresh = Overlay("lb-a")  # the same node on a new disk
    fresh.merge_state(old.entries, old.seen)
    assert fresh.next_seq == 4 and fresh.lamport == 3
    nxt = fresh.local("web", "y", "present", "10.0.0.2:80", 1, "api", T0)
    assert nxt.seq == 4 and nxt.stamp > ops[-1].stamp


def test_merge_state_reports_changed_keys_and_takes_the_cursors() -> None:
    a, b = Overlay("lb-a"), Overlay("lb-b")
    a.local("web", "x", "present", "10.0.0.1:80", 1, "api", T0)
    a.local("web", "y", "removed", None, None, "api", T0)
    b.local("web", "y", "present", None, 3, "api", T0)
    changed = b.merge_state(a.entries, a.seen)
    assert sorted(changed) == [("web", "x"), ("web", "y")]
    assert b.seen == {"lb-a": 2, "lb-b": 1}
    assert b.merge_state(list(a.entries.values())) == []


def test_merge_state_reports_the_concurrent_writes_it_resolves() -> None:
    """A name added on both nodes while apart meets by anti-entropy after a reconnect: the
    conflict is reported there as it would be op by op (else /status counted none)."""
    a, b = Overlay("lb-a"), Overlay("lb-b")
    mine = b.local("web", "dup", "present", "10.0.0.2:80", 1, "api", T0)
    theirs = a.local("web", "dup", "present", "10.0.0.1:80", 1, "api", T0)
    seen: list[tuple[Intent, Intent, bool]] = []
    b.merge_state(a.entries, a.seen, lambda it, other, won: seen.append((it, other, won)))
    assert len(seen) == 1 and seen[0][0] == theirs and seen[0][1] == mine
    assert b.entries[("web", "dup")] == (theirs if seen[0][2] else mine)
    seen.clear()
    b.merge_state(a.entries, a.seen, lambda it, other, won: seen.append((it, other, won)))
    assert seen == []  # the same state again: nothing concurrent left


def test_retire_drops_the_entry_and_updates_the_digest() -> None:
    ov = ov_with(("web", "x", "present", "10.0.0.1:80", 1))
    before = ov.digest()
    ov.local("web", "y", "present", "10.0.0.2:80", 1, "api", T0)
    r = ov.retire("web", "y")
    assert r == Retired("web", "y", (2, "lb-a"))
    assert ov.digest() == before and ("web", "y") not in ov.entries
    assert ov.retire("web", "y") is None
    assert ov.retire("web", "x", stamp=(0, "lb-a")) is None  # entry newer than the record
    assert ov.retire("web", "x", stamp=(1, "lb-a")) is not None
    assert ov.digest() == "0" * 64 and ov.lamport == 2 and ov.next_seq == 3


def test_copy_is_independent() -> None:
    ov = ov_with(("web", "x", "present", "10.0.0.1:80", 1))
    c = ov.copy()
    ov.local("web", "y", "present", "10.0.0.2:80", 1, "api", T0)
    ov.retire("web", "x")
    assert set(c.entries) == {("web", "x")} and c.lamport == 1 and c.next_seq == 2
    assert c.digest() == ov_with(("web", "x", "present", "10.0.0.1:80", 1)).digest()
    c.local("web", "z", "present", "10.0.0.3:80", 1, "api", T0)
    assert set(ov.entries) == {("web", "y")}


def test_digest_is_order_independent_and_sees_every_field() -> None:
    a, b = Overlay("lb-a"), Overlay("lb-b")
    ops = [Overlay("lb-c").local("web", f"x{i}", "present", "10.0.0.1:80", i, "api", T0)
           for i in range(3)]
    for op in ops:
        a.merge(op)
    for op in reversed(ops):
        b.merge(op)
    assert a.digest() == b.digest() != "0" * 64
    c = Overlay("lb-a")
    for op in ops[:2]:
        c.merge(op)
    c.merge(replace(ops[2], at=ops[2].at + 1))
    assert c.digest() != a.digest()


# -- LWW properties -----------------------------------------------------------------------------

NODES = ["lb-a", "lb-b", "lb-c"]
KEYS = [("web", "x"), ("web", "y"), ("api", "x")]
OP = st.tuples(
    st.integers(0, 2),  # replica
    st.sampled_from(KEYS),
    st.sampled_from(["add", "patch", "remove"]),
    st.integers(0, 3),  # weight
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2)), max_size=2),  # deliveries after
)


def _history(n: int, plan: list[Any]) -> list[Intent]:
    """Ops made at n replicas with some deliveries in between (so stamps and prev are
    realistic: some causal, some concurrent)."""
    reps = [Overlay(NODES[i]) for i in range(n)]
    made: list[Intent] = []
    for rep, (pool, backend), kind, weight, deliveries in plan:
        ov = reps[rep % n]
        held = max((e.stamp for e in ov.entries.values()), default=(0, ""))
        lamport = ov.lamport
        if kind == "add":
            made.append(ov.local(pool, backend, "present", f"10.0.0.{weight}:80", weight, "api",
                                 T0))
        elif kind == "patch":
            made.append(ov.local(pool, backend, "present", None, weight, "api", T0))
        else:
            made.append(ov.local(pool, backend, "removed", None, None, "api", T0))
        # Lamport causality: a change made here beats everything this replica has seen.
        assert made[-1].stamp == (lamport + 1, ov.node) and made[-1].stamp > held
        for src, dst in deliveries:
            reps[dst % n].merge_state(reps[src % n].entries)
    return made


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 3), plan=st.lists(OP, min_size=1, max_size=14), data=st.data())
def test_any_delivery_order_with_duplicates_converges(n: int, plan: list[Any],
                                                      data: st.DataObject) -> None:
    ops = _history(n, plan)
    replicas = []
    for i in range(n):
        dup = data.draw(st.lists(st.sampled_from(ops), max_size=len(ops)), label=f"dup{i}")
        order = data.draw(st.permutations(ops + dup), label=f"order{i}")
        ov = Overlay(NODES[i])
        for op in order:
            ov.merge(op)
        replicas.append(ov)
    first = replicas[0]
    for ov in replicas[1:]:
        assert ov.entries == first.entries
        assert ov.digest() == first.digest()
        assert ov.lamport == first.lamport == max(op.stamp[0] for op in ops)
    # The winner of each key is its highest stamp.
    best: dict[tuple[str, str], Intent] = {}
    for op in ops:
        if op.key not in best or op.stamp > best[op.key].stamp:
            best[op.key] = op
    assert first.entries == best


@settings(max_examples=150, deadline=None)
@given(n=st.integers(2, 3), plan=st.lists(OP, min_size=1, max_size=12), data=st.data())
def test_state_merge_is_commutative_associative_idempotent(n: int, plan: list[Any],
                                                           data: st.DataObject) -> None:
    ops = _history(n, plan)
    parts = [data.draw(st.lists(st.sampled_from(ops), max_size=len(ops)), label=f"part{i}")
             for i in range(3)]

    def state(intents: list[Intent]) -> Overlay:
        ov = Overlay("lb-x")
        for op in intents:
            ov.merge(op)
        return ov

    def join(x: Overlay, y: Overlay) -> Overlay:
        out = state(list(x.entries.values()))
        out.merge_state(y.entries)
        return out

    a, b, c = (state(p) for p in parts)
    assert join(a, b).entries == join(b, a).entries
    assert join(join(a, b), c).entries == join(a, join(b, c)).entries
    assert join(a, a).entries == a.entries and join(a, a).digest() == a.digest()
    assert join(join(a, b), c).digest() == join(c, join(b, a)).digest()


# -- wire -----------------------------------------------------------------------------------------


def _op() -> dict[str, Any]:
    ov = Overlay("lb-a")
    ov.local("web", "web4", "present", "10.0.0.4:8080", 1, "api", T0)
    return to_wire(ov.local("web", "web4", "present", "10.0.0.5:8080", 2, "api", T0 + 0.5))


def test_wire_round_trip() -> None:
    d = _op()
    assert d == {"t": "op", "v": 1, "origin": "lb-a", "seq": 2, "stamp": [2, "lb-a"],
                 "prev": [1, "lb-a"], "pool": "web", "backend": "web4",
                 "set": {"state": "present", "address": "10.0.0.5:8080", "weight": 2},
                 "via": "api", "at": T0 + 0.5}
    assert to_wire(from_wire(json.loads(json.dumps(d)))) == d
    ov = Overlay("lb-b")
    for intent in (ov.local("p", "a", "removed", None, None, "cli", 0.0),
                   ov.local("p", "b", "present", None, 0, "api", 1.0)):
        assert from_wire(json.loads(json.dumps(to_wire(intent)))) == intent
    r = Retired("p", "a", (3, "lb-b"))
    assert retired_from_wire(json.loads(json.dumps(retired_to_wire(r)))) == r


def _with(path: str, value: Any) -> dict[str, Any]:
    d = _op()
    *head, last = path.split(".")
    target = d
    for k in head:
        target = target[k]
    if value is _DELETE:
        del target[last]
    else:
        target[last] = value
    return d


_DELETE = object()


@pytest.mark.parametrize(("path", "value", "message"), [
    ("t", "state", "op.t: expected 'op'"),
    ("v", 2, "op.v: expected 1"),
    ("v", True, "op.v: expected 1"),
    ("extra", 1, "op: unknown key 'extra'"),
    ("seq", _DELETE, "op: missing seq"),
    ("seq", -1, r"op.seq: expected an integer 1..9007199254740991 \(got -1\)"),
    ("seq", 0, "op.seq: expected an integer"),
    ("seq", 1.0, "op.seq: expected an integer"),
    ("seq", True, "op.seq: expected an integer"),
    ("seq", 2**64, "op.seq: expected an integer"),
    pytest.param("seq", 10**5000, "op.seq: expected an integer 1..9007199254740991"
                 r" \(got a huge integer\)", id="seq-5000-digits"),
    ("seq", "1", "op.seq: expected an integer"),
    ("stamp", [2], r"op.stamp: expected \[lamport, node\]"),
    ("stamp", [2, "lb-a", 3], r"op.stamp: expected \[lamport, node\]"),
    ("stamp", {"0": 1}, r"op.stamp: expected \[lamport, node\] \(got dict\)"),
    ("stamp", [0, "lb-a"], r"op.stamp\[0\]: expected an integer 1.."),
    ("stamp", [2, "lb a"], r"op.stamp\[1\]: node name 'lb a'"),
    ("stamp", [2, "lb-b"], "origin 'lb-a' is not the stamp's node 'lb-b'"),
    pytest.param("origin", "x" * 10_000, "op.origin: expected a node name", id="origin-10k"),
    ("prev", [2, "lb-a"], "prev: must be older than the stamp"),
    ("prev", None, r"op.prev: expected \[lamport, node\] \(got None\)"),
    ("pool", "w/eb", "op.pool: expected 1..64"),
    pytest.param("pool", "w" * 10**6, "op.pool: expected 1..64 .* \\(got 'wwww", id="pool-1MB"),
    ("backend", 5, "op.backend: expected 1..64"),
    ("set", [], "op.set: expected an object"),
    ("set.state", "gone", "op.set.state: expected present or removed"),
    ("set.state", ["present"], "op.set.state: expected present or removed"),
    ("set.extra", 1, "op.set: unknown key 'extra'"),
    ("set.state", _DELETE, "op.set: missing state"),
    ("set.address", "10.0.0.1", "op.set.address: '10.0.0.1': expected host:port"),
    ("set.address", "10.0.0.1:0", "port must be 1-65535"),
    ("set.address", "1:2:3", "IPv6 addresses need brackets"),
    ("set.address", "a" * 300 + ":1", "op.set.address: expected host:port, 1..270"),
    ("set.address", None, "op.set.address: expected host:port"),
    ("set.weight", 1001, "op.set.weight: expected an integer 0..1000"),
    ("set.weight", _DELETE, "present with an address: weight required"),
    ("via", "peer2", "op.via: expected one of api, cli, peer"),
    ("via", ["api"], "op.via: expected one of"),
    ("at", -1, "op.at: expected finite seconds"),
    ("at", math.inf, "op.at: expected finite seconds"),
    pytest.param("at", 10**400, "op.at: expected finite seconds >= 0 \\(got a huge integer\\)",
                 id="at-400-digits"),
    ("at", "2026-05-10T10:01:02Z", "op.at: expected finite seconds"),
])
def test_from_wire_refuses_hostile_ops(path: str, value: Any, message: str) -> None:
    with pytest.raises(OverlayError, match=message):
        from_wire(_with(path, value))


def test_from_wire_refuses_state_combinations() -> None:
    d = _with("set", {"state": "removed", "weight": 1})
    with pytest.raises(OverlayError, match="removed: carries no address or weight"):
        from_wire(d)
    with pytest.raises(OverlayError, match="present: needs an address or a weight"):
        from_wire(_with("set", {"state": "present"}))
    bad: object
    for bad in (None, [], "op", 5, {1: 2}):
        with pytest.raises(OverlayError):
            from_wire(bad)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
FIELDS = ["t", "v", "origin", "seq", "stamp", "prev", "pool", "backend", "set", "via", "at",
          "set.state", "set.address", "set.weight"]


@settings(max_examples=400, deadline=None)
@given(JSON)
def test_from_wire_fuzz_random_json_only_overlay_error(value: Any) -> None:
    with pytest.raises(OverlayError):
        from_wire(value)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FIELDS), JSON | st.just(_DELETE)), min_size=1,
                max_size=3))
def test_from_wire_fuzz_mutated_ops_only_overlay_error(edits: list[tuple[str, Any]]) -> None:
    d = _op()
    for path, value in edits:
        *head, last = path.split(".")
        target: Any = d
        for k in head:
            target = target.get(k) if isinstance(target, dict) else None
        if not isinstance(target, dict):
            continue
        if value is _DELETE:
            target.pop(last, None)
        else:
            target[last] = value
    try:
        intent = from_wire(d)
    except OverlayError:
        return
    assert from_wire(to_wire(intent)) == intent  # whatever passed is a well-formed op


def _only_overlay_error(decode: Callable[[Any], object], value: Any) -> None:
    with contextlib.suppress(OverlayError):
        decode(value)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_entries_and_snapshot_decoders_fuzz_only_overlay_error(value: Any) -> None:
    for decode in (entries_from_wire, Overlay.from_json, retired_from_wire):
        _only_overlay_error(decode, value)
    _only_overlay_error(entries_from_wire, {"web/x": value})
    for key in ("format", "node", "lamport", "seen", "entries", "compacted_at"):
        doc = {"format": 1, "node": "lb-a", "lamport": 0, "seen": {}, "entries": {}}
        _only_overlay_error(Overlay.from_json, {**doc, key: value})


def test_entries_keys_are_checked() -> None:
    body = entries_to_wire([from_wire(_op())])["web/web4"]
    for key in ("web", "web/web4/x", "/web4", "web/", 5):
        with pytest.raises(OverlayError, match="entries"):
            entries_from_wire({key: body})
    with pytest.raises(OverlayError, match="t, v, pool and backend come from the key"):
        entries_from_wire({"web/web4": {**body, "pool": "web"}})


# -- snapshot -------------------------------------------------------------------------------------


def test_snapshot_round_trip() -> None:
    a = Overlay("lb-a")
    a.local("web", "web4", "present", "10.0.0.4:8080", 1, "api", T0)
    a.local("web", "web2", "removed", None, None, "api", T0)
    b = Overlay("lb-b")
    a.merge(b.local("web", "web1", "present", None, 3, "cli", T0))
    doc = json.loads(json.dumps(a.to_json()))
    assert doc["format"] == 1 and doc["node"] == "lb-a" and doc["lamport"] == 2
    assert doc["seen"] == {"lb-a": 2, "lb-b": 1}
    assert list(doc["entries"]) == ["web/web1", "web/web2", "web/web4"]
    assert doc["entries"]["web/web2"] == {"origin": "lb-a", "seq": 2, "stamp": [2, "lb-a"],
                                          "set": {"state": "removed"}, "via": "api", "at": T0}
    back = Overlay.from_json(doc)
    assert (back.node, back.lamport, back.seen, back.entries, back.digest()) == (
        a.node, a.lamport, a.seen, a.entries, a.digest())


def test_snapshot_cursors_never_end_below_the_entries() -> None:
    a = ov_with(("web", "x", "present", "10.0.0.1:80", 1), ("web", "y", "present", "h:1", 1))
    doc = a.to_json()
    doc["lamport"], doc["seen"] = 0, {}
    back = Overlay.from_json(doc)
    assert back.lamport == 2 and back.next_seq == 3


@pytest.mark.parametrize(("edit", "message"), [
    ({"format": 2}, "snapshot.format: expected 1"),
    ({"node": "a b"}, "snapshot.node"),
    ({"lamport": -1}, "snapshot.lamport"),
    ({"seen": {"lb-a": "1"}}, r"snapshot.seen\['lb-a'\]"),
    ({"seen": {"bad name": 1}}, "snapshot.seen key"),
    ({"compacted_at": []}, "snapshot.compacted_at"),
    ({"more": 1}, "snapshot: unknown key 'more'"),
    ({"entries": {"web/x": {}}}, r"snapshot.entries\['web/x'\]: op: missing"),
])
def test_snapshot_refuses_bad_documents(edit: dict[str, Any], message: str) -> None:
    doc = {"format": 1, "node": "lb-a", "lamport": 0, "seen": {}, "entries": {}, **edit}
    with pytest.raises(OverlayError, match=message):
        Overlay.from_json(doc)


def test_int_bounds_are_json_safe() -> None:
    assert INT_MAX == 2**53 - 1
    ov = Overlay("lb-a", lamport=INT_MAX)
    with pytest.raises(OverlayError, match="lamport"):
        ov.local("web", "x", "present", "h:1", 1, "api", T0)


def test_seen_from_wire_is_strict() -> None:
    assert seen_from_wire({"lb-a": 3, "lb-b": 0}) == {"lb-a": 3, "lb-b": 0}
    for bad in ([], {"lb-a": -1}, {"lb-a": 2**60}, {"a b": 1}, {"lb-a": "1"},
                {f"n{i}": 1 for i in range(65)}):
        with pytest.raises(OverlayError, match="seen"):
            seen_from_wire(bad)


def test_same_definition() -> None:
    ov = Overlay("lb-a")
    it = ov.local("web", "web2", "present", "10.0.0.2:080", 2, "api", T0)
    assert same_definition(WEB.backends[1], it)
    assert not same_definition(WEB.backends[0], it)
    patch = ov.local("web", "web9", "present", None, 2, "api", T0)
    assert not same_definition(WEB.backends[1], patch)
