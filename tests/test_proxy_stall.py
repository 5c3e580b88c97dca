"""A worker whose event loop stalls (CPU starvation, a long GC, SIGSTOP) must not close
keep-alive connections (or TCP pipes) whose next bytes arrived during the stall.

uvloop (libuv) runs due timers before it polls for I/O, so after a stall longer than
``client_idle_timeout_s`` the idle sweep sees the connection before the read callback does.
Closing it then is the keep-alive race at its worst: the client already sent its request and
gets EOF instead of an answer (a CI run lost a request this way under load).
"""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from proxy_helpers import CountingBackend, RawClient, get, run, spawn_proxy


@pytest.mark.parametrize("mode", ["http", "tcp"])
def test_a_request_sent_during_a_worker_stall_is_answered_not_closed_as_idle(mode: str) -> None:
    async def scenario() -> None:
        be = await CountingBackend("web1").start()
        proc, port = await spawn_proxy(
            [("web1", be.address)], mode=mode, listener={"client_idle_timeout_s": 0.3})
        try:
            c = await RawClient.connect(port)
            await c.send(get("/one"))
            assert (await c.response(3.0)).status == 200
            for round_ in range(3):
                os.kill(proc.pid, signal.SIGSTOP)
                try:
                    await asyncio.sleep(0.1)
                    await c.send(get(f"/during-stall/{round_}"))
                    await asyncio.sleep(0.6)  # twice the idle timeout
                finally:
                    os.kill(proc.pid, signal.SIGCONT)
                r = await c.response(3.0)
                assert r.status == 200, r
            # A connection really idle for longer than the timeout is still closed.
            assert await c.closed(2.0)
            await c.close()
        finally:
            proc.kill()
            await proc.wait()
            await be.stop()

    run(scenario())
