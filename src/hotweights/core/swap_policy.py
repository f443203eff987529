"""Swap policies and the retry policy for transient load failures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

SwapPolicy = Literal["availability", "resource"]
"""`availability`: load the new version beside the old, then swap (about 2x memory, no
wait). `resource`: drain and unload the old first, then load (about 1x memory; requests
arriving meanwhile wait in admission up to a timeout)."""

SWAP_POLICIES: tuple[SwapPolicy, ...] = get_args(SwapPolicy)


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff for loads that fail with `TransientLoadError`."""

    retries: int = 3
    """How many times a transient failure is retried before the reload fails."""
    base_delay: float = 0.2
    """Seconds before the first retry; each later retry waits twice as long."""
    max_delay: float = 2.0
    """Upper bound on a single wait."""

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0-based)."""
        return float(min(self.max_delay, self.base_delay * (2**retry)))
