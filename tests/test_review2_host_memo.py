"""Review 2: the Host memo (_GOOD_HOSTS) must not keep what clients send at any length: its
first version kept up to 1,024 values of up to max_header_bytes each (30 MB per worker from
one client); only values up to _GOOD_HOST_LEN are remembered now."""

from __future__ import annotations

import asyncio
import socket

from proxy_helpers import start_proxy, stop_proxy

import lb
from lb.data import headers as H

UNTRUSTED = H.ClientContext("203.0.113.9", trusted=False)


def _held() -> int:
    return sum(len(h) for h in H._GOOD_HOSTS)


def test_review2_memo_bytes_held_by_long_hosts_unit() -> None:
    H._GOOD_HOSTS.clear()
    n = 30_000  # under the default max_header_bytes (32 KiB)
    for i in range(H._GOOD_HOSTS_MAX - 1):
        host = (b"%06d" % i) + b"a" * (n - 6)
        rh = H.build_request_head(b"GET", b"/", [(b"Host", host)], UNTRUSTED)
        assert rh is not None
    held = _held()
    print(f"compiled={lb.compiled_in_use()} memo holds {len(H._GOOD_HOSTS)} values, "
          f"{held} bytes")
    assert held < 4 << 20, f"{held} bytes of Host values kept after the requests ended"


def test_review2_memo_bytes_held_by_long_hosts_real_sockets() -> None:
    """Real sockets: 1,023 requests with distinct 30 KB Host values (no backend answers:
    503), then nothing. What the worker keeps in the memo afterwards."""

    async def scenario() -> int:
        H._GOOD_HOSTS.clear()
        px = await start_proxy([("a", "127.0.0.1:9")])
        try:
            loop = asyncio.get_running_loop()

            def client() -> None:
                for i in range(H._GOOD_HOSTS_MAX - 1):
                    c = socket.create_connection(("127.0.0.1", px.port))
                    host = (b"%06d" % i) + b"b" * 29_994
                    c.sendall(b"GET / HTTP/1.1\r\nHost: " + host
                              + b"\r\nConnection: close\r\n\r\n")
                    c.settimeout(10)
                    while c.recv(65536):
                        pass
                    c.close()

            await loop.run_in_executor(None, client)
            return _held()
        finally:
            await stop_proxy(px)

    held = asyncio.run(scenario())
    print(f"compiled={lb.compiled_in_use()} memo holds {len(H._GOOD_HOSTS)} values, "
          f"{held} bytes after all connections closed")
    assert held < 4 << 20, f"{held} bytes of Host values kept after the connections closed"
