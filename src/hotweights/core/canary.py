"""The canary: a new version takes a share of new requests for a bake period, beside the
stable one, and is promoted or rolled back on how its requests fared.

`CanaryPolicy` says how; `CanaryMonitor` keeps both generations' request outcomes during
one bake (fed by the server, on the request path) and names the first threshold the canary
crosses. The bake itself (`core/bake.py`) is a prepared version with a share of requests,
committed or discarded by the clock, the monitor or an operator, whichever comes first.
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_SAMPLES = 4096
"""Request durations kept per generation during one bake."""
LATENCY_EVERY = 4
"""The canary's latency is compared at every this many of its requests (its error rate at
each one)."""


@dataclass(frozen=True)
class CanaryPolicy:
    """How a new version is baked under `availability`."""

    share: float
    """Share of new requests the canary takes, in (0, 1)."""
    bake_seconds: float = 60.0
    """How long the canary serves its share before it is promoted."""
    max_error_rate: float = 0.05
    """Roll back when the canary's error rate exceeds the stable one's by more than this."""
    max_latency_ratio: float = 2.0
    """Roll back when the canary's p99 or median time per token exceeds the stable one's
    by more than this ratio (and by more than `latency_slack_s`)."""
    min_requests: int = 20
    """Requests each generation must have finished before the canary is judged."""
    latency_slack_s: float = 0.05
    """Latency differences smaller than this never roll back (noise on a busy machine)."""

    def __post_init__(self) -> None:
        if not 0 < self.share < 1:
            raise ValueError(f"the canary share must be in (0, 1), got {self.share!r}")
        if self.bake_seconds <= 0:
            raise ValueError(f"the bake must last more than 0 s, got {self.bake_seconds!r}")
        if not 0 <= self.max_error_rate < 1:
            raise ValueError(f"max_error_rate must be in [0, 1), got {self.max_error_rate!r}")
        if self.max_latency_ratio < 1:
            raise ValueError(f"max_latency_ratio must be >= 1, got {self.max_latency_ratio!r}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be at least 1, got {self.min_requests!r}")


@dataclass
class _Tally:
    requests: int = 0
    errors: int = 0
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    per_token: deque[float] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))

    def add(self, ok: bool, seconds: float, tokens: int) -> None:
        self.requests += 1
        if not ok:
            self.errors += 1
            return
        self.durations.append(seconds)
        if tokens > 0:
            self.per_token.append(seconds / tokens)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def p99(self) -> float | None:
        if not self.durations:
            return None
        ordered = sorted(self.durations)
        return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]

    def time_per_token(self) -> float | None:
        return statistics.median(self.per_token) if self.per_token else None

    def to_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 4),
            "p99_s": _rounded(self.p99()),
            "time_per_token_s": _rounded(self.time_per_token()),
        }


class CanaryMonitor:
    """Request outcomes of the stable and the canary generation during one bake.

    Thread-safe; `record` is called on the request path (once per finished request) and
    is cheap. `on_breach(reason)` is called once, from `record`, when the canary first
    crosses a threshold."""

    def __init__(
        self,
        policy: CanaryPolicy,
        stable: int,
        canary: int,
        on_breach: Callable[[str], object],
    ) -> None:
        self.policy = policy
        self.stable = stable
        self.canary = canary
        self._on_breach = on_breach
        self._lock = threading.Lock()
        self._tallies = {stable: _Tally(), canary: _Tally()}
        self._breached = False

    def record(self, generation: int, ok: bool, seconds: float, tokens: int) -> None:
        """One finished request of `generation` (ignored unless it is one of the two):
        `ok` False for a server-side failure, including one retried on the stable version."""
        with self._lock:
            tally = self._tallies.get(generation)
            if tally is None:
                return
            tally.add(ok, seconds, tokens)
            reason = None
            if generation == self.canary and not self._breached:
                reason = self._breach()
                self._breached = reason is not None
        if reason is not None:
            self._on_breach(reason)

    def figures(self) -> dict[str, object]:
        """Both generations' counts, error rates and latencies so far (JSON-ready)."""
        with self._lock:
            return {
                "stable": {"generation": self.stable, **self._tallies[self.stable].to_dict()},
                "canary": {"generation": self.canary, **self._tallies[self.canary].to_dict()},
            }

    def _breach(self) -> str | None:
        # Called with the lock held.
        policy = self.policy
        stable, canary = self._tallies[self.stable], self._tallies[self.canary]
        if canary.requests < policy.min_requests:
            return None
        excess = canary.error_rate - stable.error_rate
        if excess > policy.max_error_rate:
            return (
                f"error rate {canary.error_rate:.3f} on g{self.canary} against "
                f"{stable.error_rate:.3f} on g{self.stable} (allowed: +{policy.max_error_rate:g})"
            )
        if stable.requests < policy.min_requests or canary.requests % LATENCY_EVERY:
            return None  # the latency figures sort their samples: not on every request
        for what, mine, theirs in (
            ("p99 latency", canary.p99(), stable.p99()),
            ("time per token", canary.time_per_token(), stable.time_per_token()),
        ):
            if mine is None or theirs is None or mine - theirs <= policy.latency_slack_s:
                continue
            if theirs > 0 and mine / theirs > policy.max_latency_ratio:
                return (
                    f"{what} {mine:.4g} s on g{self.canary} against {theirs:.4g} s on "
                    f"g{self.stable} (allowed: {policy.max_latency_ratio:g}x)"
                )
        return None


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
