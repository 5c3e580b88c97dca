"""The framing of pairlb's process channels: length-prefixed JSON messages over a socketpair,
and the typed, versioned messages on top (``Codec``).

Wire format, one message::

    +----------------+------------------------------+
    | length (u32 BE)| JSON object, UTF-8 (length B) |
    +----------------+------------------------------+

Every message has ``"t"`` (its type) and ``"v"`` (the version of its set). The sets are
lb.worker_link (control <-> proxy workers) and lb.failoverd.link (control <-> the failover
process), each a union of dataclasses encoded by a ``Codec``. JSON on purpose: cheap at
these rates (a few messages per second, a burst on change; a 3000-backend snapshot is
encoded in ~0.5 ms) and readable in a strace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import json
import struct
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union, cast

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


# -- typed messages -----------------------------------------------------------------------------


class ChannelError(ValueError):
    """A frame that is not a valid message of the expected version."""


class Codec:
    """Typed, versioned messages over the framing above: each message is a dataclass with a
    ``TYPE`` class variable, sent as ``{"t": TYPE, "v": VERSION, <fields>}``. The fields are
    written once, as dataclass fields; the JSON is derived from their type hints (a
    dataclass may give ``to_wire()`` / ``from_wire(data)`` for a bulk fast path). A frame
    of another version is refused: both ends run the code on disk, and a process restarted
    after an upgrade must not guess at an older peer."""

    def __init__(self, version: int, union: Any, error: type[ChannelError] = ChannelError
                 ) -> None:
        self.version = version
        self.error = error
        self.types: dict[str, type[Any]] = {cls.TYPE: cls for cls in typing.get_args(union)}

    def encode(self, msg: Any) -> dict[str, Any]:
        """The JSON object of a message (for ``ChannelProtocol.send``)."""
        body = _to_wire(msg)
        assert isinstance(body, dict)
        return {"t": msg.TYPE, "v": self.version, **body}

    def decode(self, frame: dict[str, Any]) -> Any:
        """The message of a frame; ``error`` when it is not one of this version."""
        kind, version = frame.get("t"), frame.get("v")
        if version != self.version:
            raise self.error(
                f"channel version {version!r}, expected {self.version} (message {kind!r})")
        cls = self.types.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise self.error(f"unknown message type {kind!r}")
        body = {k: v for k, v in frame.items() if k not in ("t", "v")}
        try:
            return _from_wire(cls, body)
        except (TypeError, ValueError, KeyError) as exc:
            raise self.error(f"bad {kind!r} message: {exc}") from None


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        custom = getattr(value, "to_wire", None)
        if custom is not None:
            return custom()
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return _to_wire(value.value)
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (tuple, list)):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {str(k): _to_wire(v) for k, v in value.items()}
        return [[_to_wire(k), _to_wire(v)] for k, v in value.items()]
    return value


@functools.cache
def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_wire(tp: Any, data: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return data
    if origin in (Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _from_wire(arg, data)
            except (TypeError, ValueError, KeyError) as exc:
                errors.append(str(exc))
        raise ValueError(f"{data!r} fits none of {tp}: {'; '.join(errors)}")
    if origin is Literal:
        if data not in args:
            raise ValueError(f"{data!r} is not one of {args}")
        return data
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        custom = getattr(tp, "from_wire", None)
        if custom is not None:
            return custom(data)
        if not isinstance(data, dict):
            raise TypeError(f"{tp.__name__}: expected an object, got {type(data).__name__}")
        hints = _hints(tp)
        kwargs = {f.name: _from_wire(hints[f.name], data[f.name])
                  for f in dataclasses.fields(tp) if f.init and f.name in data}
        return tp(**kwargs)  # a missing field without a default raises TypeError
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if tp is bytes:
        if not isinstance(data, str):
            raise TypeError("bytes travel as hex strings")
        return bytes.fromhex(data)
    if tp is bool:
        if not isinstance(data, bool):
            raise TypeError(f"expected a bool, got {data!r}")
        return data
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise TypeError(f"expected an int, got {data!r}")
        return data
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise TypeError(f"expected a number, got {data!r}")
        return float(data)
    if tp is str:
        if not isinstance(data, str):
            raise TypeError(f"expected a string, got {data!r}")
        return data
    if origin is tuple:
        if not isinstance(data, list):
            raise TypeError(f"expected a list, got {type(data).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_wire(args[0], x) for x in data)
        if len(args) != len(data):
            raise ValueError(f"expected {len(args)} items, got {len(data)}")
        return tuple(_from_wire(a, x) for a, x in zip(args, data, strict=True))
    if origin is list:
        if not isinstance(data, list):
            raise TypeError(f"expected a list, got {type(data).__name__}")
        return [_from_wire(args[0], x) for x in data]
    if origin is dict:
        key_t, val_t = args
        items = data.items() if isinstance(data, dict) else data
        return {_from_wire(key_t, k): _from_wire(val_t, v) for k, v in items}
    raise TypeError(f"no wire form for {tp!r}")
