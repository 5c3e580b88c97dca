"""What the failover side counts reaches the operator: /metrics and GET /status.

Each counter here was kept by its owner and read by nobody (an outside survey, issue 14):
the controller's duplicate heartbeats and internal errors, the transport's send errors, the
VIP adapter's announcements, the notify scripts' runs, failures, timeouts and drops, how
long the control process had been silent as the failover process saw it, how many samples
the heartbeat gap maxima cover, and the log lines each process wrote or dropped. Every test
drives the real owner (a controller fed datagrams, a HookRunner running scripts, the link
message through JSON, a log queue whose sink stalls) and reads the exported value back the
way an operator does: the exposition text and the /status JSON (validated by its schema).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import os
import stat
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jsonschema
import pytest
from admin_helpers import (
    SCHEMA,
    MemoryVip,
    config_text,
    free_port,
    in_process_daemon,
    parse_metrics,
    total,
)

import failover
from failover import FailoverController, FailoverSpec, HookRunner, Role
from failover.core.codec import HEADER_LEN, Heartbeat, HeartbeatFlags, RejectReason, encode
from lb import log as lb_log
from lb.admin import metrics
from lb.control import status as status_mod
from lb.control.failover_process import FailoverProcess
from lb.failoverd import link
from lb.failoverd import main as fm

KEY = b"exports-test-key-0123456789abcdef"
WALL = 1.75e9
PEERS = ("10.0.0.2", "10.0.1.2")  # one peer, two paths
STATUS_SCHEMA = json.loads(SCHEMA.read_text())


class Vip:
    """The VIP port, with the announcement counters VipAdapter keeps."""

    holding = False
    announcements_sent = 0
    announcement_errors = 0

    async def acquire(self) -> None:
        self.holding = True

    async def release(self) -> None:
        self.holding = False

    async def announce(self) -> None:
        pass

    async def remove_stale(self) -> list[str]:
        return []

    async def held(self) -> bool:
        return self.holding


class Transport:
    send_errors = 0

    async def start(self, on_datagram: Callable[[bytes, Any], None]) -> None:
        pass

    def destinations(self) -> Sequence[failover.Address]:
        return [(p, 5405) for p in PEERS]

    def send(self, data: bytes, dest: failover.Address) -> None:
        pass

    def close(self) -> None:
        pass


def controller(hooks: HookRunner | None = None, **kw: Any
               ) -> tuple[FailoverController, Vip, Transport]:
    spec = FailoverSpec(node_name="lb1", interface="eth0", vips=("192.0.2.10/24",),
                        priority=150, peers=PEERS, key=KEY, **kw)
    vip, transport = Vip(), Transport()
    ctl = FailoverController(spec, vip, transport=transport, hooks=hooks,
                             wall_clock=lambda: WALL)
    return ctl, vip, transport


def heartbeat(seq: int, name: str = "lb2") -> bytes:
    return encode(Heartbeat(name=name, role=Role.BACKUP, priority=100, epoch=9, seq=seq,
                            timestamp_ms=int(WALL * 1000), flags=HeartbeatFlags.HEALTHY), KEY)


def exported(view: status_mod.FailoverView, role: Role = Role.BACKUP
             ) -> tuple[dict[Any, float], dict[str, Any]]:
    """The metrics samples and the /status JSON of a daemon whose failover shows `view`."""

    async def body() -> tuple[str, dict[str, Any]]:
        d = in_process_daemon(config_text(listen_port=free_port(), admin_port=free_port(),
                                          backends=[("b1", 1)]))
        d.failover = type("Shown", (), {"role": role})()
        d.failover_view = lambda: view
        text = metrics.Exposition(d).render(False).decode()
        st = status_mod.to_json(d.status())
        jsonschema.validate(st, STATUS_SCHEMA)
        return text, st

    text, st = asyncio.run(body())
    return parse_metrics(text), st


def view_of(st: failover.FailoverStatus, **kw: Any) -> status_mod.FailoverView:
    return status_mod.FailoverView(st, "eth0", ("192.0.2.10/24",), **kw)


# -- the controller's own counters -------------------------------------------------------------


def test_a_heartbeat_heard_again_on_the_second_path_is_a_duplicate_on_metrics() -> None:
    ctl, _, _ = controller()
    first = heartbeat(1)
    ctl._on_datagram(first, (PEERS[0], 5405))
    ctl._on_datagram(first, (PEERS[1], 5405))  # the same round via the other network
    ctl._on_datagram(heartbeat(2), (PEERS[1], 5405))
    ctl._on_datagram(heartbeat(2), (PEERS[0], 5405))
    st = ctl.status()
    assert (st.counters.heartbeats_received, st.counters.duplicates) == (2, 2)
    s, js = exported(view_of(st))
    assert total(s, "pairlb_heartbeats_duplicated_total") == 2
    assert total(s, "pairlb_heartbeats_received_total") == 2
    assert js["failover"]["counters"]["duplicates"] == 2


def test_an_exception_at_an_error_boundary_is_an_internal_error_on_metrics(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import failover.controller as controller_mod

    ctl, _, _ = controller()

    def broken(data: bytes, keys: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(controller_mod, "decode_any", broken)
    for seq in range(3):
        ctl._on_datagram(heartbeat(seq + 1), (PEERS[0], 5405))  # caught, counted, logged
    s, js = exported(view_of(ctl.status()))
    assert total(s, "pairlb_failover_internal_errors_total") == 3
    assert js["failover"]["counters"]["internal_errors"] == 3


def test_the_vip_adapters_announcements_and_the_transports_send_errors_on_metrics() -> None:
    ctl, vip, transport = controller()
    vip.announcements_sent, vip.announcement_errors = 12, 1
    transport.send_errors = 7
    st = ctl.status()
    assert (st.vip_announcements, st.vip_announcement_errors) == (12, 1)
    s, js = exported(view_of(st))
    assert total(s, "pairlb_vip_announcements_total") == 12
    assert total(s, "pairlb_vip_announcement_errors_total") == 1
    assert total(s, "pairlb_heartbeat_send_errors_total") == 7
    c = js["failover"]["counters"]
    assert (c["vip_announcements"], c["vip_announcement_errors"]) == (12, 1)
    assert c["heartbeat_send_errors"] == 7


def test_a_vip_port_without_announcement_counters_exports_zero() -> None:
    """VipPort does not promise them (tests' fakes, a future adapter): 0, not an error."""
    spec = FailoverSpec(node_name="lb1", interface="eth0", vips=("192.0.2.10/24",),
                        priority=150, peers=PEERS, key=KEY)
    ctl = FailoverController(spec, MemoryVip(), transport=Transport())
    st = ctl.status()
    assert (st.vip_announcements, st.vip_announcement_errors) == (0, 0)


# -- a name this build refuses -------------------------------------------------------------------


@pytest.mark.parametrize("raw_name", [b"n" * 40, "nœud".encode(), b"lb 2"])
def test_a_peer_with_a_name_this_build_refuses_is_counted_as_malformed(raw_name: bytes) -> None:
    """An older peer whose name the codec now refuses (FailoverSpec once let 64 printable
    UTF-8 bytes through): its authentic heartbeats are counted and dropped, nothing raises."""
    ctl, _, _ = controller()
    head = heartbeat(1)[: HEADER_LEN - 1]
    body = head + bytes([len(raw_name)]) + raw_name
    data = body + hmac.new(KEY, body, hashlib.sha256).digest()
    for _ in range(3):
        ctl._on_datagram(data, (PEERS[0], 5405))
    st = ctl.status()
    assert st.counters.rejected == {RejectReason.MALFORMED: 3}
    assert st.counters.internal_errors == 0 and st.peers == ()
    s, _ = exported(view_of(st))
    assert total(s, "pairlb_heartbeats_rejected_total", reason="malformed") == 3


# -- notify scripts ----------------------------------------------------------------------------


def _script(path: str, body: str) -> str:
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body + "\n")
    os.chmod(path, stat.S_IRWXU)
    return path


def test_notify_runs_failures_timeouts_and_drops_on_metrics(tmp_path: Any) -> None:
    ok = _script(os.path.join(tmp_path, "ok"), "exit 0")
    failing = _script(os.path.join(tmp_path, "failing"), "exit 3")
    slow = _script(os.path.join(tmp_path, "slow"), "sleep 30")

    async def run() -> HookRunner:
        runner = HookRunner([ok, failing, slow, os.path.join(tmp_path, "missing")],
                            node="lb1", timeout_s=0.3, max_queued=2)
        for old, new in (("init", "backup"), ("backup", "master"), ("master", "backup")):
            runner.notify(old, new)  # three into a queue of two: the oldest is dropped
        task = asyncio.create_task(runner.run())
        assert await runner.drain(10.0)
        task.cancel()
        return runner

    runner = asyncio.run(run())
    n = runner.counters()
    # 2 transitions x 4 scripts; ok passes, the others fail (exit 3, timeout, not found).
    assert (n.runs, n.failures, n.timeouts, n.dropped) == (8, 6, 2, 1)
    ctl, _, _ = controller(notify=(ok,), hooks=runner)
    s, js = exported(view_of(ctl.status()))
    assert total(s, "pairlb_failover_notify_runs_total", result="success") == 2
    assert total(s, "pairlb_failover_notify_runs_total", result="failure") == 6
    assert total(s, "pairlb_failover_notify_timeouts_total") == 2
    assert total(s, "pairlb_failover_notify_dropped_total") == 1
    assert js["failover"]["notify"] == {"runs": 8, "failures": 6, "timeouts": 2, "dropped": 1}


def test_a_script_that_cannot_even_be_run_is_a_run_and_a_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An error inside the runner itself still counts: success = runs - failures holds."""

    async def run() -> HookRunner:
        runner = HookRunner(["/bin/true"], node="lb1")

        async def boom(script: str, t: Any) -> Any:
            raise RuntimeError("a bug")

        monkeypatch.setattr(runner, "_run_one", boom)
        runner.notify("backup", "master")
        task = asyncio.create_task(runner.run())
        assert await runner.drain(5.0)
        task.cancel()
        return runner

    n = asyncio.run(run()).counters()
    assert (n.runs, n.failures, n.timeouts, n.dropped) == (1, 1, 0, 0)


# -- what the failover process adds: the link, its silence, its gaps, its log --------------------


def test_the_failover_process_status_message_reaches_metrics_and_status() -> None:
    ctl, _, _ = controller()
    msg = link.Status(ctl.status(), link.HeartbeatGaps(samples=1234, sent_max_s=0.031,
                                                        received_max_s=0.045),
                      control_silent_s=1.25, log=lb_log.LogCounts(written=50, dropped=2))
    frame = json.loads(json.dumps(link.encode(msg)))  # as the channel carries it
    fp = FailoverProcess()
    fp._handle(link.decode(frame))
    process = fp.process_status()
    assert process.control_silent_s == 1.25 and process.heartbeat_gap_samples == 1234
    assert (process.log_lines_written, process.log_lines_dropped) == (50, 2)
    gaps = fp.heartbeat_gaps
    view = view_of(fp.status(), sent_gap_max_s=gaps.sent_max_s,
                   received_gap_max_s=gaps.received_max_s, process=process)
    s, js = exported(view)
    assert total(s, "pairlb_failover_control_silent_seconds") == 1.25
    assert total(s, "pairlb_log_lines_total", process="failover", result="written") == 50
    assert total(s, "pairlb_log_lines_total", process="failover", result="dropped") == 2
    fo = js["failover"]
    assert fo["process"]["control_silent_s"] == 1.25
    assert fo["process"]["log_lines"] == {"written": 50, "dropped": 2}
    assert fo["heartbeat_gap_ms"]["samples"] == 1234
    assert fo["send_lag_ms"]["samples"] == 0  # no heartbeat sent yet


def test_the_failover_process_sends_its_silence_and_its_log_counts() -> None:
    """FailoverMain's status message: how long the control process has been silent and the
    process's own log lines (lb.log.counts of that process)."""
    ctl, _, _ = controller()
    sent: list[dict[str, Any]] = []

    class Chan:
        class transport:  # the attribute ChannelProtocol has
            @staticmethod
            def get_write_buffer_size() -> int:
                return 0

        @staticmethod
        def send(frame: dict[str, Any]) -> bool:
            sent.append(frame)
            return True

    class Clock:
        @staticmethod
        def time() -> float:
            return 100.0

    main = fm.FailoverMain(-1, os.getppid())
    main.chan = Chan()  # type: ignore[assignment]
    main.ctl = ctl
    main.meter = fm.HeartbeatMeter(Transport(), lambda: 0.0)
    main._loop = Clock()  # type: ignore[assignment]
    main.last_heard = 97.5
    main._send_status()
    msg = link.decode(json.loads(json.dumps(sent[-1])))
    assert isinstance(msg, link.Status)
    assert msg.control_silent_s == 2.5
    assert msg.log == lb_log.counts()


# -- the control process's own log lines ---------------------------------------------------------


class _StalledSink(io.StringIO):
    """A log sink that stops taking lines until released (journald restarting)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.release.wait(10)
        return super().write(text)


def test_the_control_processes_log_lines_written_and_dropped_on_metrics(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sink = _StalledSink()
    lines = lb_log.LineQueue(sink, capacity=2)
    monkeypatch.setattr(lb_log, "_lines", lines)
    lines.put("first\n")
    assert sink.entered.wait(5)  # the writer holds "first" and waits on the sink
    for i in range(5):
        lines.put(f"line {i}\n")  # two fit the queue, three are dropped
    sink.release.set()
    assert lines.flush(5)
    # "first", the two queued, and the writer's own "log_lines_dropped" notice.
    assert lb_log.counts() == lb_log.LogCounts(written=4, dropped=3)
    ctl, _, _ = controller()
    s, _ = exported(view_of(ctl.status()))
    assert total(s, "pairlb_log_lines_total", process="control", result="written") == 4
    assert total(s, "pairlb_log_lines_total", process="control", result="dropped") == 3
    # No failover process here (an in-process controller): no series for one.
    assert not any(n == "pairlb_log_lines_total" and ("process", "failover") in labels
                   for n, labels in s)
