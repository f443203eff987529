"""The record keeper: the generation counter and the bounded history of live versions."""

from __future__ import annotations

import threading
from collections import deque

from hotweights.core.version import ModelVersion, VersionState

DEFAULT_MAX_HISTORY = 32


class VersionHistory:
    """Counts versions that became reachable and remembers the most recent of them.

    Thread-safe. `generation` is a plain attribute read (atomic in CPython), cheap enough
    for the request path. Only `number` advances it: failed attempts never do.
    """

    def __init__(self, max_history: int = DEFAULT_MAX_HISTORY) -> None:
        if max_history < 1:
            raise ValueError(f"max_history must be at least 1, got {max_history}")
        self._lock = threading.Lock()
        self._history: deque[ModelVersion] = deque(maxlen=max_history)
        self._generation = 0
        self._total_live = 0

    @property
    def generation(self) -> int:
        """The generation of the version that went live last; 0 before the first."""
        return self._generation

    @property
    def max_history(self) -> int:
        maxlen = self._history.maxlen
        return maxlen if maxlen is not None else 0

    def continue_after(self, generation: int) -> None:
        """Number the next version after `generation` at least: a model served again under
        a name it had before (an adapter unloaded and loaded again) never reuses one."""
        with self._lock:
            self._generation = max(self._generation, generation)

    def number(self, version: ModelVersion, generation: int | None = None) -> int:
        """Give `version` the next generation (or `generation`, which must be greater than
        every generation so far: a fleet numbers its cutovers), mark it PREPARED and
        record it; return the generation. `version` must be VALIDATING. A version is
        numbered once it can serve (a pin reaches it), before it is committed. Raises
        `ValueError` for a generation not ahead."""
        with self._lock:
            if generation is None:
                generation = self._generation + 1
            elif generation <= self._generation:
                raise ValueError(
                    f"generation {generation} is not after generation {self._generation}"
                )
            version.generation = generation
            version.transition(VersionState.PREPARED)
            self._history.appendleft(version)
            self._generation = generation
            self._total_live += 1
            return generation

    def withdraw(self, version: ModelVersion) -> None:
        """Forget `version` (discarded, or a canary rolled back): it stays counted in the
        generations, but is no longer current nor a rollback target."""
        with self._lock:
            if version in self._history:
                self._history.remove(version)

    def current_version(self) -> ModelVersion | None:
        """The version that went live last, or None before the first."""
        with self._lock:
            return self._history[0] if self._history else None

    def history(self) -> list[ModelVersion]:
        """Versions that went live, most recent first, at most `max_history` of them."""
        with self._lock:
            return list(self._history)

    def find(self, generation: int) -> ModelVersion | None:
        """The retained version with `generation`, if still in the history."""
        with self._lock:
            for version in self._history:
                if version.generation == generation:
                    return version
            return None

    def rollback_target(self) -> ModelVersion | None:
        """The most recent earlier version whose source differs from the current one's."""
        with self._lock:
            if not self._history:
                return None
            current = self._history[0]
            for version in list(self._history)[1:]:
                if version.source != current.source or version.fingerprint != current.fingerprint:
                    return version
            return None

    @property
    def retained(self) -> int:
        """How many version records the history holds now."""
        return len(self._history)

    @property
    def total_live(self) -> int:
        """How many versions ever went live (the current generation, unless generations
        were given)."""
        return self._total_live
