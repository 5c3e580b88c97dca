"""Which certificate (or route) a TLS server name selects: exact names first, then a ``*.``
wildcard for one leftmost label, else the default. Pure: shared by the worker's SNI
callback (a certificate) and the TCP engine's SNI routes (a pool).

Names compare case-insensitively with a trailing dot ignored, as DNS does. A wildcard covers
exactly one label (RFC 6125 §6.4.3): ``*.example.com`` matches ``a.example.com``, not
``example.com`` and not ``a.b.example.com``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


def normalize(name: str) -> str:
    """The comparable form of a server name: lower case, no trailing dot."""
    return name.strip().rstrip(".").lower()


class NameTable(Generic[T]):
    """A lookup from server name to T; built once per (re)load, read per handshake."""

    __slots__ = ("default", "exact", "wild")

    def __init__(self, default: T, entries: Iterable[tuple[Iterable[str], T]] = ()) -> None:
        self.default = default
        self.exact: dict[str, T] = {}
        self.wild: dict[str, T] = {}
        for names, value in entries:
            for raw in names:
                name = normalize(raw)
                if name.startswith("*."):
                    self.wild.setdefault(name[2:], value)  # the first entry wins
                elif name:
                    self.exact.setdefault(name, value)

    def lookup(self, server_name: str | None) -> T:
        """The entry for ``server_name`` (None: no SNI) or the default."""
        if not server_name:
            return self.default
        name = normalize(server_name)
        hit = self.exact.get(name)
        if hit is not None:
            return hit
        dot = name.find(".")
        if dot > 0:
            hit = self.wild.get(name[dot + 1:])
            if hit is not None:
                return hit
        return self.default

    def match(self, server_name: str | None) -> T | None:
        """Like lookup, but None instead of the default when nothing matches."""
        if not server_name:
            return None
        name = normalize(server_name)
        hit = self.exact.get(name)
        if hit is None:
            dot = name.find(".")
            if dot > 0:
                hit = self.wild.get(name[dot + 1:])
        return hit


__all__ = ["NameTable", "normalize"]
