"""Test certificates (lab.pki, shared with bench/ and the demo) and a TLS test backend."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from typing import Any

from lab.pki import Leaf, Pki


class EchoBackend:
    """Says its name, then echoes until EOF or a line ending in ``bye``, then closes. TLS with
    its certificate (``leaf``; None: always plain). ``sniff``: TLS only when the connection's
    first byte is 0x16, plain when it is not or nothing comes within 0.3 s. Records the first
    bytes (up to 64 KiB, peeked; with ``sniff``) and the SNI of every handshake."""

    def __init__(self, name: str, leaf: Leaf | None, *, sniff: bool = False) -> None:
        self.name = name
        self.sniff = sniff
        self.ctx: ssl.SSLContext | None = None
        self.sni: list[str | None] = []
        if leaf is not None:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(leaf.cert, leaf.key)
            self.ctx.sni_callback = self._on_sni  # type: ignore[assignment]
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.first: list[bytes] = []
        self.handshakes = 0
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _on_sni(self, _obj: Any, name: str | None, _ctx: Any) -> None:
        self.sni.append(name)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return len(self.first)

    @property
    def tls_ok(self) -> int:
        return self.handshakes

    def _accept(self) -> None:
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        c: Any = conn
        try:
            conn.settimeout(10)
            tls = self.ctx is not None
            if self.sniff:
                ready, _, _ = select.select([conn], [], [], 0.3)
                head = conn.recv(65536, socket.MSG_PEEK) if ready else b""
                self.first.append(head)
                tls = tls and head[:1] == b"\x16"
            if tls:
                assert self.ctx is not None
                c = self.ctx.wrap_socket(conn, server_side=True)
                self.handshakes += 1
            c.sendall(self.name.encode() + b"\n")
            while True:
                data = c.recv(65536)
                if not data:
                    break
                c.sendall(data)
                if data.endswith(b"bye\n"):
                    break
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                c.close()

    def stop(self) -> None:
        self.stopped = True
        self.sock.close()


__all__ = ["EchoBackend", "Leaf", "Pki"]
