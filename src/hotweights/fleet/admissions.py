"""The ingress's flip point: the generation stamped on each admitted request, and the
requests in flight on each generation.

Everything here runs on the ingress's one event loop (no locks): `admit` reads the
committed generation and counts the request in one step, `flip` replaces it in one
assignment, so every request admitted after `flip` returns carries the new generation and
every request admitted before it keeps the old one to its end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter


class Admissions:
    """Stamps and counts requests (one per ingress; the fleet runs one ingress)."""

    def __init__(self, generation: int) -> None:
        self.generation = generation
        """The committed generation: what `admit` stamps."""
        self.admitted: Counter[int] = Counter()
        """Requests admitted on each generation since start."""
        self._inflight: Counter[int] = Counter()
        self._idle: dict[int, asyncio.Event] = {}

    def admit(self) -> int:
        """Stamp one request with the committed generation and count it in flight."""
        generation = self.generation
        self._inflight[generation] += 1
        self.admitted[generation] += 1
        return generation

    def done(self, generation: int) -> None:
        """One request stamped `generation` ended (answered, failed or abandoned)."""
        self._inflight[generation] -= 1
        if self._inflight[generation] <= 0:
            del self._inflight[generation]
            idle = self._idle.pop(generation, None)
            if idle is not None:
                idle.set()

    def flip(self, generation: int) -> None:
        """Stamp `generation` from now on."""
        self.generation = generation

    async def drained(self, generation: int, timeout: float) -> int:
        """Wait until no request stamped `generation` is in flight, or `timeout` seconds;
        the number still in flight then."""
        if self._inflight[generation] > 0:
            idle = self._idle.setdefault(generation, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), timeout)
        return self._inflight[generation]

    def inflight(self) -> dict[int, int]:
        return {g: n for g, n in self._inflight.items() if n > 0}
