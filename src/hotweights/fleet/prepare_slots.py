"""How many replicas prepare a version at once (`--prepare-parallel`): on a machine where
the replicas share cores or disks, loading one or two at a time keeps the requests they
serve meanwhile faster, at the price of a longer prepare.

The places are shared by every model of the fleet: two models cutting over at once share
the N places, so at most N prepares (of any model) run at any moment. A cutover `open`s
its generation before it asks the replicas to prepare and `close`s it when its prepare
phase ended; a replica asks for a place before it loads the generation and gives it back
once its prepare ended (ready or failed). Closing a generation frees the places it still
held, so a replica that died holding one costs nothing beyond the cutover it was in
(which that death aborts anyway), and a replica asking for a generation that is not open
(its cutover ended, or a restarted coordinator never opened it) gets none. Thread-safe.

```
 open(g) ──► take(g, r) ... give_back(g, r) ──► close(g)
```
"""

from __future__ import annotations

import threading


class PrepareSlots:
    """At most `limit` replicas preparing at once, over every open generation (0: no
    limit)."""

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError(f"prepare_parallel must be 0 (all at once) or more, got {limit}")
        self.limit = limit
        self._taken: dict[int, set[str]] = {}
        self._lock = threading.Lock()

    def open(self, generation: int) -> None:
        """A cutover begins preparing `generation`."""
        with self._lock:
            self._taken.setdefault(generation, set())

    def close(self, generation: int) -> None:
        """The cutover of `generation` ended its prepare: its places are free."""
        with self._lock:
            self._taken.pop(generation, None)

    def take(self, generation: int, replica: str) -> bool:
        """Whether `replica` may prepare `generation` now. A replica that has a place
        keeps it (asking again answers True); a generation that is not open gets none."""
        if self.limit == 0:
            return True
        with self._lock:
            taken = self._taken.get(generation)
            if taken is None:
                return False
            if replica in taken:
                return True
            if sum(len(places) for places in self._taken.values()) >= self.limit:
                return False
            taken.add(replica)
            return True

    def give_back(self, generation: int, replica: str) -> None:
        """`replica` is done preparing `generation`."""
        with self._lock:
            self._taken.get(generation, set()).discard(replica)

    def preparing(self) -> list[str]:
        """The replicas holding a place now (a replica preparing two models, twice)."""
        with self._lock:
            return sorted(r for places in self._taken.values() for r in places)
