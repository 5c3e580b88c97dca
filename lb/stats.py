"""Plain counters a proxy worker updates on its hot path and ships to the control process.

Pure: no asyncio, socket, time or logging. Updating a counter is a dict lookup and an
add; nothing here formats or exports (that is lb.admin.metrics' job in the control process).

``take_delta()`` returns what changed since the previous call as nested dicts/lists of
numbers with string keys (JSON-ready; summing deltas gives totals, also for the gauge,
which is sent as its change)::

    {
      "requests":     {pool: {backend: {"2xx": n, ...}}},
      "duration":     {pool: {"buckets": [n per bucket of DURATION_BUCKETS_S, +Inf],
                              "sum": seconds, "count": n}},
      "errors":       {pool: {backend: {reason: n}}},
      "bad_requests": {listener: {reason: {status: n}}},
      "retries":      {pool: {reason: n}},
      "connections":  {listener: {"accepted": n, "active": change}},
      "tcp":          {pool: {backend: {"connections": n, "bytes_in": n, "bytes_out": n}}},
      "sticky":       {pool: {"hit" | "set": n}},
      "access_log":   {"written": n, "dropped": n, "errors": n},
    }

Bucket counts are per bucket (not cumulative) so that deltas add up.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Final

DURATION_BUCKETS_S: Final[tuple[float, ...]] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
"""Upper bounds (le) of the request duration histogram; one more bucket holds +Inf."""

CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")


class _Hist:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(DURATION_BUCKETS_S) + 1)
        self.sum = 0.0
        self.count = 0


class Stats:
    """One per worker, shared by its listeners."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str], list[int]] = {}
        self._hist: dict[str, _Hist] = {}
        self._errors: dict[tuple[str, str, str], int] = {}
        self._bad: dict[tuple[str, str, int], int] = {}
        self._retries: dict[tuple[str, str], int] = {}
        self._accepted: dict[str, int] = {}
        self._active: dict[str, int] = {}
        self._active_sent: dict[str, int] = {}
        self._tcp: dict[tuple[str, str], list[int]] = {}
        self._tls: dict[tuple[str, str, str], int] = {}
        self._sni: dict[tuple[str, str], int] = {}
        self._sticky: dict[tuple[str, str], int] = {}
        self._alog = [0, 0, 0]
        self._local: dict[tuple[str, str], int] = {}
        self._tls_late: list[tuple[str, str]] = []
        """Failures counted from a finalizer (any allocation may run one): appended only,
        folded into ``_tls`` when read, so no dict changes size under an iteration."""
        self._dirty = False

    # -- hot path -------------------------------------------------------------------------

    def request(self, pool: str, backend: str, status: int, duration_s: float) -> None:
        """A response relayed (or an error answered) for ``pool``/``backend``."""
        key = (pool, backend)
        row = self._requests.get(key)
        if row is None:
            row = self._requests[key] = [0, 0, 0, 0, 0]
        cls = status // 100 - 1
        if 0 <= cls < 5:
            row[cls] += 1
        h = self._hist.get(pool)
        if h is None:
            h = self._hist[pool] = _Hist()
        h.buckets[bisect_left(DURATION_BUCKETS_S, duration_s)] += 1
        h.sum += duration_s
        h.count += 1
        self._dirty = True

    def error(self, pool: str, backend: str, reason: str) -> None:
        key = (pool, backend, reason)
        self._errors[key] = self._errors.get(key, 0) + 1
        self._dirty = True

    def bad_request(self, listener: str, reason: str, status: int) -> None:
        key = (listener, reason, status)
        self._bad[key] = self._bad.get(key, 0) + 1
        self._dirty = True

    def retry(self, pool: str, reason: str) -> None:
        key = (pool, reason)
        self._retries[key] = self._retries.get(key, 0) + 1
        self._dirty = True

    def connection_opened(self, listener: str) -> None:
        self._accepted[listener] = self._accepted.get(listener, 0) + 1
        self._active[listener] = self._active.get(listener, 0) + 1
        self._dirty = True

    def connection_closed(self, listener: str) -> None:
        self._active[listener] = self._active.get(listener, 0) - 1
        self._dirty = True

    def tcp_connection(self, pool: str, backend: str) -> None:
        self._tcp_row(pool, backend)[0] += 1

    def tcp_bytes(self, pool: str, backend: str, bytes_in: int, bytes_out: int) -> None:
        row = self._tcp_row(pool, backend)
        row[1] += bytes_in
        row[2] += bytes_out

    def tls_handshake(self, listener: str, cert: str, resumed: bool) -> None:
        """A TLS handshake finished with ``cert`` (the chosen certificate's id)."""
        key = (listener, "resumed" if resumed else "full", cert)
        self._tls[key] = self._tls.get(key, 0) + 1
        self._dirty = True

    def tls_failure(self, listener: str, reason: str) -> None:
        key = (listener, "failed", reason)
        self._tls[key] = self._tls.get(key, 0) + 1
        self._dirty = True

    def sni(self, listener: str, decision: str) -> None:
        """A TCP connection's pool chosen by SNI routing (lb.data.tcpproxy.SNI_DECISIONS)."""
        key = (listener, decision)
        self._sni[key] = self._sni.get(key, 0) + 1
        self._dirty = True

    def local_answer(self, listener: str, kind: str) -> None:
        """A request pairlb answered itself: https_redirect, acme_served, acme_missing."""
        key = (listener, kind)
        self._local[key] = self._local.get(key, 0) + 1
        self._dirty = True

    def sticky(self, pool: str, outcome: str) -> None:
        """A request with a sticky cookie pool: ``hit`` (went where its cookie said) or
        ``set`` (a cookie was set: none yet, or its backend out of rotation or gone)."""
        key = (pool, outcome)
        self._sticky[key] = self._sticky.get(key, 0) + 1
        self._dirty = True

    def access_log(self, written: int, dropped: int, errors: int) -> None:
        """The access log writer's lines since the last call (lb.data.accesslog)."""
        if written or dropped or errors:
            a = self._alog
            a[0] += written
            a[1] += dropped
            a[2] += errors
            self._dirty = True

    def tls_failure_late(self, listener: str, reason: str) -> None:
        """tls_failure from a finalizer (an abandoned handshake collected)."""
        self._tls_late.append((listener, reason))

    def _fold_late(self) -> None:
        late, self._tls_late = self._tls_late, []
        for listener, reason in late:
            self.tls_failure(listener, reason)

    def _tcp_row(self, pool: str, backend: str) -> list[int]:
        key = (pool, backend)
        row = self._tcp.get(key)
        if row is None:
            row = self._tcp[key] = [0, 0, 0]
        self._dirty = True
        return row

    # -- reading ---------------------------------------------------------------------------

    def active_connections(self, listener: str) -> int:
        return self._active.get(listener, 0)

    def snapshot(self) -> dict[str, Any]:
        """What ``take_delta`` would return now, without resetting (the gauge as its current
        value rather than its change)."""
        self._fold_late()
        return self._render(self._active)

    def take_delta(self) -> dict[str, Any]:
        """Changes since the previous call (empty dict when nothing changed), then reset."""
        if self._tls_late:
            self._fold_late()
        if not self._dirty:
            return {}
        change = {
            k: v - self._active_sent.get(k, 0)
            for k, v in self._active.items()
            if v != self._active_sent.get(k, 0)
        }
        out = self._render(change)
        self._active_sent = dict(self._active)
        self._requests.clear()
        self._hist.clear()
        self._errors.clear()
        self._bad.clear()
        self._retries.clear()
        self._accepted.clear()
        self._tcp.clear()
        self._tls.clear()
        self._sni.clear()
        self._local.clear()
        self._sticky.clear()
        self._alog = [0, 0, 0]
        self._dirty = False
        return out

    def _render(self, active: dict[str, int]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self._requests:
            req: dict[str, Any] = {}
            for (pool, backend), row in self._requests.items():
                req.setdefault(pool, {})[backend] = {
                    c: n for c, n in zip(CLASSES, row, strict=True) if n
                }
            out["requests"] = req
        if self._hist:
            out["duration"] = {
                pool: {"buckets": list(h.buckets), "sum": h.sum, "count": h.count}
                for pool, h in self._hist.items()
            }
        if self._errors:
            err: dict[str, Any] = {}
            for (pool, backend, reason), n in self._errors.items():
                err.setdefault(pool, {}).setdefault(backend, {})[reason] = n
            out["errors"] = err
        if self._bad:
            bad: dict[str, Any] = {}
            for (listener, reason, status), n in self._bad.items():
                bad.setdefault(listener, {}).setdefault(reason, {})[str(status)] = n
            out["bad_requests"] = bad
        if self._retries:
            ret: dict[str, Any] = {}
            for (pool, reason), n in self._retries.items():
                ret.setdefault(pool, {})[reason] = n
            out["retries"] = ret
        conns: dict[str, Any] = {}
        for listener, n in self._accepted.items():
            conns.setdefault(listener, {})["accepted"] = n
        for listener, n in active.items():
            conns.setdefault(listener, {})["active"] = n
        if conns:
            out["connections"] = conns
        if self._tcp:
            tcp: dict[str, Any] = {}
            for (pool, backend), row in self._tcp.items():
                tcp.setdefault(pool, {})[backend] = {
                    "connections": row[0], "bytes_in": row[1], "bytes_out": row[2]
                }
            out["tcp"] = tcp
        if self._tls:
            tls: dict[str, Any] = {}
            for (listener, kind, what), n in self._tls.items():
                tls.setdefault(listener, {}).setdefault(kind, {})[what] = n
            out["tls"] = tls
        if self._sni:
            sni: dict[str, Any] = {}
            for (listener, decision), n in self._sni.items():
                sni.setdefault(listener, {})[decision] = n
            out["sni"] = sni
        if self._local:
            local: dict[str, Any] = {}
            for (listener, kind), n in self._local.items():
                local.setdefault(listener, {})[kind] = n
            out["local"] = local
        if self._sticky:
            sticky: dict[str, Any] = {}
            for (pool, outcome), n in self._sticky.items():
                sticky.setdefault(pool, {})[outcome] = n
            out["sticky"] = sticky
        if any(self._alog):
            w, d, e = self._alog
            out["access_log"] = {"written": w, "dropped": d, "errors": e}
        return out
