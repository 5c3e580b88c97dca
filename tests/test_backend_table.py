"""One owner per fact: the health book, the rotation records and the rotation derived from them.

Ring 1 (pure, fake clock): the reload table for every kind of ``[pool.health]`` change,
ejections ended by active checks, and a property test over random sequences of check
results, proxy errors (ejections), admin actions and reloads: after every step the
snapshot equals an independent oracle computed from the one owned state, and a reload's
verdict follows the new checks within ``fall`` results.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from healthcheck import CheckResult, CheckStatus, Health, HealthBook
from lb.config import Config, loads
from lb.control.backends import BackendTable
from lb.control.rotation import AdminState

OK = CheckResult(CheckStatus.L7_OK, 0.001, 200)
BAD = CheckResult(CheckStatus.L7_STATUS, 0.001, 500)
NAMES = ("b0", "b1", "b2", "b3")


def config(
    health: dict[str, Any] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    addresses: dict[str, str] | None = None,
    passive: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
) -> Config:
    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    def table(d: dict[str, Any]) -> str:
        return "".join(f"{k} = {val(v)}\n" for k, v in d.items())

    members = []
    for i, n in enumerate(NAMES):
        addr = (addresses or {}).get(n, f"127.0.0.1:{9001 + i}")
        o = (overrides or {}).get(n)
        extra = ""
        if o:
            extra = ", health = { " + ", ".join(f"{k} = {val(v)}" for k, v in o.items()) + " }"
        members.append(f'  {{ name = "{n}", address = "{addr}"{extra} }},')
    pool_keys = {"panic_percent": 0, **(pool or {})}
    text = (
        '[node]\nname = "t"\n[[listener]]\nname = "web"\nbind = "127.0.0.1:8080"\npool = "web"\n'
        f'[[pool]]\nname = "web"\n{table(pool_keys)}backends = [\n' + "\n".join(members) + "\n]\n"
        f"[pool.health]\n{table({'interval_s': 1.0, **(health or {})})}"
        f"[pool.passive]\n{table(passive or {})}"
    )
    return loads(text)


class World:
    """A BackendTable plus the book, driven by hand: what the daemon wires, minus I/O."""

    def __init__(self, cfg: Config) -> None:
        self.book = HealthBook()
        self.table = BackendTable(self.book, cfg.pool)
        self.now = 0.0
        self.book.reconcile(self.table.targets(), self.now)

    def reload(self, cfg: Config) -> None:
        self.table.apply(cfg.pool)
        self.book.reconcile(self.table.targets(), self.now, self.table.in_service)

    def check(self, name: str, result: CheckResult) -> None:
        key = ("web", name)
        if key not in self.book:
            return
        self.book.record(key, result, self.now)
        self.table.on_check("web", name, result, self.now)

    def eligible(self) -> set[str]:
        snap = self.table.snapshots(self.now)["web"]
        return {n for n, e in snap.entries.items() if e.eligible}

    def health(self, name: str) -> Health | None:
        s = self.book.state(("web", name))
        return None if s is None else s.health

    def bring_up(self) -> None:
        for _ in range(5):
            for n in NAMES:
                self.check(n, OK)


# -- the reload table -------------------------------------------------------------------------

CHECK_CHANGES: dict[str, dict[str, Any]] = {
    "path": {"health": {"path": "/other"}},
    "expect_body": {"health": {"expect_body": "NOPE"}},
    "expect_status": {"health": {"expect_status": ["204"]}},
    "timeout": {"health": {"timeout_s": 0.2}},
    "method": {"health": {"method": "OPTIONS"}},
    "host": {"health": {"host": "example.test"}},
    "type": {"health": {"type": "tcp"}},
    "override": {"overrides": {n: {"path": "/b"} for n in NAMES}},
    "override_port": {"overrides": {n: {"port": 7000 + i} for i, n in enumerate(NAMES)}},
}
"""Changes of what decides a pass: the old counter is evidence about another check."""

SCHEDULE_CHANGES: dict[str, dict[str, Any]] = {
    "interval": {"health": {"interval_s": 2.0}},
    "jitter": {"health": {"jitter": 0.3}},
    "initial": {"health": {"initial": "up"}},
    "fast_down_intervals": {"health": {"fast_interval_s": 0.2, "down_interval_s": 0.7}},
    "override_interval": {"overrides": {n: {"interval_s": 0.5} for n in NAMES}},
}
"""Changes of when a backend is checked: nothing about its health is lost."""


def _world_with_b3_down() -> World:
    w = World(config())
    w.bring_up()
    for _ in range(3):
        w.check("b3", BAD)
    assert w.health("b3") is Health.DOWN
    return w


@pytest.mark.parametrize("change", sorted(CHECK_CHANGES))
def test_changed_check_keeps_state_and_the_first_new_result_decides(change: str) -> None:
    w = _world_with_b3_down()
    before = w.book.state(("web", "b0"))
    assert before is not None
    w.reload(config(**CHECK_CHANGES[change]))
    # Nobody moves at the reload itself.
    assert w.eligible() == {"b0", "b1", "b2"}
    st0 = w.book.state(("web", "b0"))
    assert st0 is not None and st0.checks == before.checks and st0.since == before.since
    assert st0.last_result is None  # the old check's result says nothing of the new one
    # One failing result of the new check drains an UP backend; one pass keeps it.
    w.check("b0", BAD)
    w.check("b1", OK)
    assert w.health("b0") is Health.DOWN and w.health("b1") is Health.UP
    # One pass of the new check brings a DOWN backend back.
    w.check("b3", OK)
    assert w.health("b3") is Health.UP
    assert w.eligible() == {"b1", "b2", "b3"}


@pytest.mark.parametrize("change", sorted(SCHEDULE_CHANGES))
def test_changed_schedule_keeps_state_and_counters(change: str) -> None:
    w = _world_with_b3_down()
    w.check("b1", BAD)  # b1 UP, one failure in: "UP, going down"
    before = w.book.states()
    w.reload(config(**SCHEDULE_CHANGES[change]))
    after = w.book.states()
    assert {k: (s.health, s.counter.health, s.checks, s.last_result) for k, s in after.items()} == {
        k: (s.health, s.counter.health, s.checks, s.last_result) for k, s in before.items()
    }
    # One failure does not take a fully UP backend out (it did when a jitter change reset
    # every counter to "UP, going down").
    w.check("b0", BAD)
    assert w.health("b0") is Health.UP


def test_changed_rise_fall_keeps_settled_counters_settled() -> None:
    w = _world_with_b3_down()
    w.reload(config(health={"rise": 4, "fall": 5}))
    st0, st3 = w.book.state(("web", "b0")), w.book.state(("web", "b3"))
    assert st0 is not None and st3 is not None
    assert (st0.health, st0.counter.health) == (Health.UP, 4 + 5 - 1)
    assert (st3.health, st3.counter.health) == (Health.DOWN, 0)
    for _ in range(4):
        w.check("b0", BAD)
    assert w.health("b0") is Health.UP
    w.check("b0", BAD)
    assert w.health("b0") is Health.DOWN


def test_unchanged_pool_keeps_state_and_counters() -> None:
    w = World(config())
    w.bring_up()
    w.check("b2", BAD)
    before = w.book.states()
    w.reload(config(pool={"retries": 1}))  # a pool change that is not about checks
    assert w.book.states() == before


def test_checks_turned_off_count_as_healthy_and_on_again_start_up_going_down() -> None:
    w = World(config())
    w.bring_up()
    for _ in range(3):
        w.check("b1", BAD)
    assert w.eligible() == {"b0", "b2", "b3"}
    w.reload(config(health={"enabled": False}))
    assert len(w.book) == 0 and w.eligible() == set(NAMES)
    w.reload(config())
    # Serving without checks, now checked: UP, and the first failure drains.
    assert w.eligible() == set(NAMES)
    w.check("b1", BAD)
    assert w.eligible() == {"b0", "b2", "b3"}


def test_new_address_is_another_server() -> None:
    w = World(config(passive={"eject_s": 10}))
    w.bring_up()
    w.table.eject("web", "b0", "x", w.now)
    w.reload(config(addresses={"b0": "127.0.0.1:9100"}, passive={"eject_s": 10}))
    # Fresh: the spec's initial ("down"): no traffic before its first pass; not ejected.
    assert "b0" not in w.eligible()
    w.check("b0", OK)
    assert "b0" in w.eligible()


def test_new_backend_waits_for_its_first_pass() -> None:
    w = World(config())
    w.bring_up()
    assert w.eligible() == set(NAMES)
    cfg = config()
    pool = cfg.pool[0]
    newb = pool.backends[0].model_copy(update={"name": "b9", "address": "127.0.0.1:9999"})
    new_pool = pool.model_copy(update={"backends": (*pool.backends, newb)})
    w.reload(cfg.model_copy(update={"pool": (new_pool,)}))
    assert "b9" not in w.eligible()
    w.check("b9", OK)
    assert "b9" in w.eligible()


# -- ejections ended by checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,checks,back",
    [
        ("corroborated", [BAD, OK], True),  # the checks saw it die and come back
        ("corroborated", [OK, OK], False),  # checks kept passing while traffic failed
        ("pass", [OK], True),  # Envoy: any pass
        ("never", [BAD, OK, OK, OK], False),
    ],
)
def test_passing_check_ends_ejection(mode: str, checks: list[CheckResult], back: bool) -> None:
    w = World(config(passive={"eject_s": 10, "end_on_check": mode}))
    w.bring_up()
    w.now = 1.0
    assert w.table.eject("web", "b0", "connect_failed", w.now) is not None
    assert "b0" not in w.eligible()
    for r in checks:
        w.now += 0.5
        w.check("b0", r)
    assert ("b0" in w.eligible()) is back
    ended = w.table.rotations["web"].records["b0"].ejections_ended_early
    assert ended == (1 if back else 0)


def test_a_probe_started_before_the_ejection_does_not_end_it() -> None:
    w = World(config(passive={"eject_s": 10, "end_on_check": "pass"}))
    w.bring_up()
    w.now = 5.0
    w.table.eject("web", "b0", "x", w.now)
    w.now = 5.1
    slow = CheckResult(CheckStatus.L7_OK, 0.5, 200)  # started at 4.6
    w.check("b0", slow)
    assert "b0" not in w.eligible()


# -- property: the rotation is a function of the one owned state ------------------------------

HEALTH_VARIANTS: list[dict[str, Any]] = [
    {},
    {"health": {"expect_body": "x"}},
    {"health": {"rise": 1, "fall": 1}},
    {"health": {"enabled": False}},
    {"health": {"type": "tcp", "rise": 3}},
    {"overrides": {"b1": {"path": "/b1"}}},
    {"addresses": {"b2": "127.0.0.1:9200"}},
]


def oracle(w: World, cfg: Config) -> set[str]:
    """Who should get traffic, recomputed from first principles (no panic: panic_percent 0)."""
    pcfg = cfg.pool[0]
    out = set()
    for b in pcfg.backends:
        rec = w.table.rotations["web"].records[b.name]
        if pcfg.health.enabled:
            s = w.book.state(("web", b.name))
            up = s is not None and s.health is Health.UP
        else:
            up = True
        if rec.admin is AdminState.ENABLED and b.weight > 0 and up and not rec.ejected(w.now):
            out.add(b.name)
    return out


op = st.one_of(
    st.tuples(st.just("check"), st.sampled_from(NAMES), st.booleans()),
    st.tuples(st.just("eject"), st.sampled_from(NAMES), st.just(True)),
    st.tuples(st.just("admin"), st.sampled_from(NAMES), st.booleans()),
    st.tuples(st.just("reload"), st.integers(0, len(HEALTH_VARIANTS) - 1), st.just(True)),
    st.tuples(st.just("wait"), st.floats(0.1, 20), st.just(True)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=80))
def test_rotation_is_always_the_function_of_the_owned_state(
    ops: list[tuple[str, Any, bool]],
) -> None:
    cfg = config(passive={"eject_s": 5})
    w = World(cfg)
    for kind, arg, flag in ops:
        if kind == "check":
            w.check(arg, OK if flag else BAD)
        elif kind == "eject":
            w.table.eject("web", arg, "x", w.now)
        elif kind == "admin":
            w.table.set_admin("web", arg, AdminState.ENABLED if flag else AdminState.DRAINING)
        elif kind == "reload":
            cfg = config(passive={"eject_s": 5}, **HEALTH_VARIANTS[arg])
            w.reload(cfg)
            # Within ``fall`` results the verdict is what the new checks say: failing
            # results take every checked backend DOWN, passing ones keep an UP one UP.
            if cfg.pool[0].health.enabled:
                fall = cfg.pool[0].health.fall
                for name in NAMES:
                    state = w.book.state(("web", name))
                    assert state is not None
                    down, up = state.counter, state.counter
                    for _ in range(fall):
                        down, _t = down.step(False)
                        up, _t = up.step(True)
                    assert down.state is Health.DOWN
                    if state.health is Health.UP:
                        assert up.state is Health.UP
        else:
            w.now += arg
        assert w.eligible() == oracle(w, cfg), (kind, arg, flag)
