"""Hostile HTTP against a real ``pairlb run`` (issue 8): fuzzed streams never crash a worker,
never reach a backend as anything but a valid request, and other clients keep being served
while it goes on.

tests/test_proxy_bad_requests.py drives the proxy engine in the test's own process with the
malformed-request corpus and a seeded mutation stream. What it cannot show is the process
model under the same abuse: here the proxy is two real worker processes behind the control
process, the fuzz (corpus items mutated, random bytes, garbage pipelined after valid
requests, all split at random across TCP writes) runs concurrently with well-behaved
keep-alive clients, and the supervisor's own account (worker pids, crashes, restarts) is
read from the admin API afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from proxy_helpers import CountingBackend, RawClient, free_port, get, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[1]
CORPUS = sorted((Path(__file__).parent / "corpus" / "bad_requests").glob("*.http"))
SEEDS = [
    get("/a"),
    b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    get("/d") + get("/e"),
]
FUZZ_STREAMS = 480
GOOD_CLIENTS = 4


def mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.random()
        i = rng.randrange(len(b)) if b else 0
        if op < 0.35 and b:
            b[i] = rng.randrange(256)
        elif op < 0.55:
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op < 0.75 and b:
            del b[i:i + rng.randint(1, 8)]
        else:
            b[i:i] = rng.choice([b"\r\n", b"\n", b":", b" ", b"\x00", b"\r\n\r\n", b"\r",
                                 b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n",
                                 b"Content-Length: -1\r\n", b"Host: a\r\n", b"\t", b"\x7f"])
    return bytes(b)


def stream(rng: random.Random, i: int) -> bytes:
    kind = i % 4
    if kind == 0:
        return rng.randbytes(rng.randint(1, 600))
    if kind == 1:
        return mutate(rng, rng.choice(SEEDS))
    if kind == 2:
        return mutate(rng, rng.choice(CORPUS).read_bytes())
    # a valid request, then garbage on the same connection
    return get(f"/ok{i}") + mutate(rng, rng.choice([*SEEDS, rng.randbytes(40)]))


async def send_split(c: RawClient, data: bytes, rng: random.Random) -> None:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6)))) \
        if len(data) > 1 else []
    pos = 0
    for cut in [*cuts, len(data)]:
        try:
            await c.send(data[pos:cut])
        except ConnectionError:
            return  # the proxy already answered and closed
        pos = cut
        await asyncio.sleep(rng.choice([0, 0, 0.001, 0.005]))


async def http_json(port: int, path: str) -> dict[str, Any]:
    c = await RawClient.connect(port)
    try:
        await c.send(get(path, host="127.0.0.1"))
        r = await c.response(3.0)
        out: dict[str, Any] = json.loads(r.body)
        return out
    finally:
        await c.close()


def config(listen: int, admin: int, backend: str) -> str:
    return f"""\
[node]
name = "fuzz"
workers = 2
shutdown_timeout_s = 2.0

[[listener]]
name = "web"
bind = "127.0.0.1:{listen}"
pool = "web"
max_body_bytes = 1000
client_header_timeout_s = 1.0
client_idle_timeout_s = 3.0  # the good clients must never race it, even on a loaded box

[[pool]]
name = "web"
response_timeout_s = 2.0
backends = [{{ name = "web1", address = "{backend}" }}]

[pool.health]
interval_s = 0.2
timeout_s = 0.2

[admin]
bind = "127.0.0.1:{admin}"

[logging]
level = "warning"
"""


def test_a_real_pairlb_survives_a_fuzzed_flood_and_keeps_serving_others(tmp_path: Path) -> None:
    async def scenario() -> None:
        be = await CountingBackend("web1").start()
        listen, admin = free_port(), free_port()
        cfg = tmp_path / "pairlb.toml"
        cfg.write_text(config(listen, admin, be.address))
        log = open(tmp_path / "pairlb.log", "wb")  # noqa: ASYNC230, SIM115 - tiny, once
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lb", "run", "-c", str(cfg), cwd=ROOT,
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            st: dict[str, Any] = {}
            async with asyncio.timeout(20):
                while True:
                    with contextlib.suppress(OSError, ConnectionError, ValueError):
                        st = await http_json(admin, "/status")
                        pool = st["pools"][0]
                        if pool["backends"][0]["in_rotation"] and all(
                                w["ready"] for w in st["workers"]):
                            break
                    await asyncio.sleep(0.1)
            workers = [(w["pid"], w["restarts"]) for w in st["workers"]]
            seen_before = len(be.requests)
            rng = random.Random(88)
            stop = asyncio.Event()
            good: list[int] = []

            async def good_client(n: int) -> None:
                c = await RawClient.connect(listen)
                try:
                    i = 0
                    while not stop.is_set():
                        await c.send(get(f"/good/{n}/{i}"))
                        r = await c.response(5.0)
                        good.append(r.status)
                        i += 1
                        await asyncio.sleep(0.005)
                finally:
                    await c.close()

            async def fuzz_one(i: int) -> None:
                data = stream(rng, i)
                c = await RawClient.connect(listen)
                try:
                    await send_split(c, data, rng)
                    await c.closed(1.5)
                finally:
                    await c.close()

            goods = [asyncio.create_task(good_client(n)) for n in range(GOOD_CLIENTS)]
            for batch in range(0, FUZZ_STREAMS, 40):
                await asyncio.gather(*(fuzz_one(i) for i in range(batch, batch + 40)))
            stop.set()
            await asyncio.gather(*goods)  # a good client that lost its connection raises

            # Well-behaved clients were served throughout, on the same connections.
            assert len(good) > 200 and set(good) == {200}, sorted(set(good))
            # Whatever reached the backend was a valid request to its strict parser, with
            # one Host and never both framings.
            assert be.parse_errors == []
            for s in be.requests[seen_before:]:
                assert len(s.all("host")) == 1, s
                assert not (s.header("content-length") and s.header("transfer-encoding")), s
                assert s.target.startswith("/"), s
            fuzz_seen = [s for s in be.requests[seen_before:]
                         if not s.target.startswith("/good/")]
            print(f"\n{FUZZ_STREAMS} fuzzed streams, {len(good)} good requests served; "
                  f"{len(fuzz_seen)} valid requests out of the fuzz reached the backend")
            # No worker crashed or was replaced, and the node still serves new clients.
            st = await http_json(admin, "/status")
            after = [(w["pid"], w["restarts"]) for w in st["workers"]]
            assert after == workers, (workers, after)
            assert all(w["crashes"] == 0 for w in st["workers"])
            c = await RawClient.connect(listen)
            await c.send(get("/after"))
            assert (await c.response(3.0)).status == 200
            await c.close()
            assert proc.returncode is None
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    async with asyncio.timeout(10):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            log.close()
            await be.stop()

    run(scenario())
