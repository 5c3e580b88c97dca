"""The control <-> worker channel: length-prefixed JSON messages over a socketpair.

Wire format, one message::

    +----------------+------------------------------+
    | length (u32 BE)| JSON object, UTF-8 (length B) |
    +----------------+------------------------------+

Every message has ``"t"`` (its type). control -> worker: ``config`` (generation + the whole
validated config + listener fds), ``snap`` (versioned pool snapshot), ``ping``, ``stop``.
worker -> control: ``ready``, ``pong``, ``stats`` (counter deltas), ``eject`` (passive
ejection seen by this worker), ``stopped``. Small and explicit on purpose: JSON is cheap
at these rates (a few messages per second, a burst on change) and readable in a strace.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Callable
from typing import Any, cast

MAX_MESSAGE = 16 << 20
_HEADER = struct.Struct(">I")

Message = dict[str, Any]


def encode(msg: Message) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    return _HEADER.pack(len(body)) + body


class ChannelProtocol(asyncio.Protocol):
    """Frames messages; calls ``on_message`` per message and ``on_close`` once at EOF."""

    def __init__(
        self,
        on_message: Callable[[Message], None],
        on_close: Callable[[Exception | None], None],
    ) -> None:
        self._on_message = on_message
        self._on_close = on_close
        self._buf = bytearray()
        self._closed = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only look like one.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= 4:
            (n,) = _HEADER.unpack_from(self._buf)
            if n > MAX_MESSAGE:
                self._fail(ValueError(f"channel message too large: {n}"))
                return
            if len(self._buf) < 4 + n:
                return
            body = bytes(self._buf[4 : 4 + n])
            del self._buf[: 4 + n]
            try:
                msg = json.loads(body)
            except ValueError as exc:
                self._fail(exc)
                return
            if isinstance(msg, dict) and isinstance(msg.get("t"), str):
                self._on_message(msg)

    def _fail(self, exc: Exception) -> None:
        if self.transport is not None:
            self.transport.close()
        self.connection_lost(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self._closed = True
            self._on_close(exc)

    def send(self, msg: Message) -> bool:
        """Queue a message; False when the other side is gone."""
        if self.transport is None or self.transport.is_closing():
            return False
        self.transport.write(encode(msg))
        return True
