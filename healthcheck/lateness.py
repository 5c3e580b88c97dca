"""Check lateness: how long after its scheduled time each check really started.

A check is due at its slot; it starts when the control loop gets to it. The difference is
the loop's backlog, the first thing to grow when one control process has too much to do (too
many backends, a slow /metrics render, a blocking call): late checks mean late verdicts, and
with short timeouts, verdicts judged late. The scheduler feeds every check start here; the
daemon exports the histogram (``pairlb_health_check_lateness_seconds``) and the status API
shows p50/p99 and the maxima of the last 10 and 60 seconds.

Pure: no asyncio, socket, time or logging; the caller passes ``now`` (monotonic seconds).
Imports nothing from lb or failover.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

__all__ = ["LATENESS_BUCKETS_S", "Lateness"]

LATENESS_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0,
)
"""Histogram bounds: 0.2 is 20 % of the default 1 s interval (issue 12's target)."""

_WINDOW_S = 60


class Lateness:
    """A histogram of lateness (seconds) plus the maximum of each of the last 60 seconds."""

    __slots__ = ("_maxima", "_second", "bounds", "count", "counts", "max_s", "sum_s")

    def __init__(self, bounds: Sequence[float] = LATENESS_BUCKETS_S) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        """Per bucket (not cumulative); the last one is +Inf."""
        self.count = 0
        self.sum_s = 0.0
        self.max_s = 0.0
        """Largest lateness ever seen."""
        self._maxima = [0.0] * _WINDOW_S
        self._second = -1

    def observe(self, late_s: float, now: float) -> None:
        late_s = max(0.0, late_s)
        self.counts[bisect.bisect_left(self.bounds, late_s)] += 1
        self.count += 1
        self.sum_s += late_s
        if late_s > self.max_s:
            self.max_s = late_s
        sec = int(now)
        if sec != self._second:
            self._advance(sec)
        slot = sec % _WINDOW_S
        if late_s > self._maxima[slot]:
            self._maxima[slot] = late_s

    def _advance(self, sec: int) -> None:
        if self._second < 0 or sec - self._second >= _WINDOW_S:
            self._maxima = [0.0] * _WINDOW_S
        else:
            for s in range(self._second + 1, sec + 1):
                self._maxima[s % _WINDOW_S] = 0.0
        self._second = sec

    def max_over(self, seconds: int, now: float) -> float:
        """Largest lateness seen in the last ``seconds`` (1..60) whole seconds up to ``now``."""
        seconds = max(1, min(_WINDOW_S, seconds))
        sec = int(now)
        if sec != self._second:
            self._advance(sec)
        return max(self._maxima[(sec - i) % _WINDOW_S] for i in range(seconds))

    def quantile(self, q: float) -> float:
        """Upper bound interpolated within the bucket (Prometheus's histogram_quantile),
        never above the largest value seen."""
        if not self.count:
            return 0.0
        rank = q * self.count
        acc = 0
        lo = 0.0
        for i, n in enumerate(self.counts):
            hi = self.bounds[i] if i < len(self.bounds) else math.inf
            if n and acc + n >= rank:
                if math.isinf(hi):
                    return self.max_s
                return min(self.max_s, lo + (hi - lo) * (rank - acc) / n)
            acc += n
            lo = hi
        return self.max_s
