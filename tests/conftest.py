"""Suite-wide: which test modules must run alone (``serial``).

`./dev test` runs the suite in two passes: every module not listed here on three
pytest-xdist workers (two cores, but most of these tests wait on sockets and processes; a
module's tests stay together in one worker, so its module fixtures run once), then the
modules below one at a time with nothing else running. They measure wall time against a
target (takeover, outage, latency, timeouts within a margin) or run a pair of nodes through
faults, where a second test's load on the two cores would be measured too. (The bench
smoke runs assert that each run completes and reports, not its speed: they run in the
parallel pass.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

SERIAL = frozenset({
    # failover: takeover and outage targets, real pairs in namespaces
    "test_failover_e2e", "test_failover_pair", "test_failover_transport", "test_chaos",
    "test_partition_guard", "test_partition_guard_e2e", "test_vip",
    "test_netns_lib", "test_admin", "test_demo", "test_tls_pair", "test_affinity_pair",
    "test_elastic_pair", "test_elastic_review_pair", "test_sync_channel",
    # workers and health: recovery times, latency bounds, check timing
    "test_process_model", "test_accept_balance", "test_rotation_lag", "test_health_e2e",
    "test_health_timing",
    "test_health_probes", "test_health_tls", "test_discovery_dns", "test_discovery_e2e",
    "test_hostile_http_hardening", "test_issue17_review_e2e",
    "test_proxy_protocol_e2e", "test_proxy_stall", "test_log_queue",
    # the access log: a worker never waits 20 ms on a full pipe, a reader keeps up
    "test_accesslog",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if Path(str(item.fspath)).stem in SERIAL:
            item.add_marker(pytest.mark.serial)
