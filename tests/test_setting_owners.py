"""Each setting's default and bounds are written once; everyone else reads them from there.

- Passive ejection and the pool's rotation rules: lb.config (PassiveConfig, PoolConfig) owns
  them; the worker's Pool (lb.data.pool) and the control process's PoolRotation
  (lb.control.rotation) default to the same values (they used to declare their own: the
  worker's local ejection defaulted to 1 s where the config says 10 s).
- Balance modes, panic modes and /metrics' backend series: lb.config's Literal types.
- Node names: tests/test_node_names.py.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest

from lb import config
from lb.admin import metrics
from lb.control.rotation import PoolRotation
from lb.data import pool as pool_mod


def _defaults(cls: type) -> dict[str, object]:
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING}


# -- passive ejection and the rotation rules -----------------------------------------------------


def test_the_worker_pool_defaults_to_the_configs_passive_rules() -> None:
    p = config.PASSIVE_DEFAULTS
    d = _defaults(pool_mod.Pool)
    assert d["consecutive_failures"] == p.consecutive_failures == 3
    assert d["local_eject_s"] == p.eject_s == 10.0
    assert d["max_eject_percent"] == p.max_eject_percent == 50
    built = pool_mod.build_pool("web", "round_robin", [("b1", "127.0.0.1", 1, 1.0)])
    assert (built.consecutive_failures, built.local_eject_s, built.max_eject_percent) == (
        p.consecutive_failures, p.eject_s, p.max_eject_percent)


def test_the_control_rotation_defaults_to_the_configs_rules() -> None:
    p = config.PASSIVE_DEFAULTS
    r = PoolRotation("web", {})
    assert (r.eject_s, r.max_eject_s, r.max_eject_percent) == (
        p.eject_s, p.max_eject_s, p.max_eject_percent)
    fields = config.PoolConfig.model_fields
    assert r.slow_start_s == fields["slow_start_s"].default
    assert r.panic_percent == fields["panic_percent"].default
    assert r.panic_mode == fields["panic_mode"].default


def test_a_pool_config_without_passive_keys_is_the_passive_defaults() -> None:
    pcfg = config.loads(config.DEFAULT_CONFIG_TOML).pool[0]
    assert pcfg.passive == config.PASSIVE_DEFAULTS


def test_every_balance_mode_builds_a_pool_and_nothing_else_does() -> None:
    modes = typing.get_args(config.Balance)
    assert set(modes) == set(pool_mod._MODES)
    for mode in modes:
        p = pool_mod.build_pool("web", mode, [("b1", "127.0.0.1", 1, 1.0)])
        assert p.pick(0.0) is not None
    with pytest.raises(ValueError, match="unknown balance"):
        pool_mod.build_pool("web", "roundrobin", [("b1", "127.0.0.1", 1, 1.0)])  # type: ignore[arg-type]


def test_backend_series_values_are_the_configs() -> None:
    assert typing.get_args(config.BackendSeries) == metrics.BACKEND_SERIES
    assert config.AdminConfig().metrics_backend_series == "all"
