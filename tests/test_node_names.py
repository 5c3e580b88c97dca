"""Node names: failover owns the rule (failover.NODE_NAME_MAX, NODE_NAME_PATTERN,
node_name_error), and [node] name, FailoverSpec and the heartbeat codec apply that one rule.
They disagreed: the config allowed 32 ASCII characters, FailoverSpec and the codec 64
printable UTF-8 bytes. The config's rule is kept (every valid config stays valid); an older
peer's heartbeat with a name outside it is counted as malformed and dropped
(tests/test_failover_codec.py, tests/test_failover_exports.py).
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import failover
from lb import config

KEY = b"names-test-key-0123456789abcdef"


GOOD = ["lb1", "a", "node-2.dc_1", "X" * failover.NODE_NAME_MAX]
BAD = ["", "x" * (failover.NODE_NAME_MAX + 1), "x" * 64, "nœud", "lb 1", "lb1\n", "lb/1"]


def _node(name: str) -> config.NodeConfig:
    return config.NodeConfig.model_validate({"name": name})


def _spec(name: str) -> failover.FailoverSpec:
    return failover.FailoverSpec(node_name=name, interface="eth0", vips=("192.0.2.10/24",),
                                 priority=100, peers=("192.0.2.2",), key=KEY)


@pytest.mark.parametrize("name", GOOD)
def test_a_name_the_rule_allows_is_valid_everywhere(name: str) -> None:
    assert failover.node_name_error(name) is None
    assert _node(name).name == name
    assert _spec(name).node_name == name
    hb = failover.Heartbeat(name=name, role=failover.Role.BACKUP, priority=100, epoch=1, seq=1,
                            timestamp_ms=1)
    assert failover.decode(failover.encode(hb, KEY), KEY).name == name


@pytest.mark.parametrize("name", BAD)
def test_a_name_the_rule_refuses_is_refused_everywhere(name: str) -> None:
    assert failover.node_name_error(name) is not None
    with pytest.raises(ValidationError):
        _node(name)
    with pytest.raises(failover.FailoverConfigError, match=r"failover\.node_name"):
        _spec(name)
    hb = failover.Heartbeat(name=name, role=failover.Role.BACKUP, priority=100, epoch=1, seq=1,
                            timestamp_ms=1)
    with pytest.raises(ValueError, match="heartbeat name"):
        failover.encode(hb, KEY)


def test_the_configs_name_bounds_are_failovers() -> None:
    meta = config.NodeConfig.model_fields["name"].metadata
    assert any(getattr(m, "max_length", None) == failover.NODE_NAME_MAX for m in meta)
    assert any(getattr(m, "pattern", None) == failover.NODE_NAME_PATTERN for m in meta)
    assert "len<=32" in config.reference_markdown()
