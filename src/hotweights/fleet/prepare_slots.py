"""How many replicas prepare a version at once (`--prepare-parallel`): on a machine where
the replicas share cores or disks, loading one or two at a time keeps the requests they
serve meanwhile faster, at the price of a longer prepare.

A replica asks for a place before it loads the generation being prepared and gives it
back once its prepare ended (ready or failed). Places belong to one generation: a new
cutover starts with all of them free, so a replica that died holding one costs nothing
beyond the cutover it was in (which that death aborts anyway). Thread-safe.
"""

from __future__ import annotations

import threading


class PrepareSlots:
    """At most `limit` replicas preparing one generation (0: no limit)."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"prepare_parallel must be 0 (all at once) or more, got {limit}")
        self.limit = limit
        self._generation = 0
        self._taken: set[str] = set()
        self._lock = threading.Lock()

    def take(self, generation: int, replica: str) -> bool:
        """Whether `replica` may prepare `generation` now. A replica that has a place
        keeps it (asking again answers True); an older generation gets none."""
        if self.limit == 0:
            return True
        with self._lock:
            if generation < self._generation:
                return False
            if generation > self._generation:
                self._generation, self._taken = generation, set()
            if replica in self._taken:
                return True
            if len(self._taken) >= self.limit:
                return False
            self._taken.add(replica)
            return True

    def give_back(self, generation: int, replica: str) -> None:
        """`replica` is done preparing `generation`."""
        with self._lock:
            if generation == self._generation:
                self._taken.discard(replica)

    def preparing(self) -> list[str]:
        """The replicas holding a place now."""
        with self._lock:
            return sorted(self._taken)
