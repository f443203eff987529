"""A model version and the state machine of its life.

```
LOADING ──► VALIDATING ──► PREPARED ──────────────► LIVE ──► DRAINING ──► RETIRED
   │             │            │  └──► CANARY ──────┘            ▲
   └──► FAILED ◄─┘            └──────────┴──────────────────────┘ (discarded)
```
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from enum import Enum

from hotweights.errors import IllegalTransition


class VersionState(Enum):
    """Where a version is in its life."""

    LOADING = "loading"
    VALIDATING = "validating"
    PREPARED = "prepared"
    """Loaded, validated, warmed up and gated beside the live version, numbered, and
    reachable only by a request pinned to its generation, until it is committed or
    discarded."""
    LIVE = "live"
    CANARY = "canary"
    """Serving a share of new requests during its bake, beside the live version."""
    DRAINING = "draining"
    RETIRED = "retired"
    FAILED = "failed"


LEGAL_TRANSITIONS: dict[VersionState, frozenset[VersionState]] = {
    VersionState.LOADING: frozenset({VersionState.VALIDATING, VersionState.FAILED}),
    VersionState.VALIDATING: frozenset({VersionState.PREPARED, VersionState.FAILED}),
    VersionState.PREPARED: frozenset(
        {VersionState.LIVE, VersionState.CANARY, VersionState.DRAINING}
    ),
    VersionState.CANARY: frozenset({VersionState.LIVE, VersionState.DRAINING}),
    VersionState.LIVE: frozenset({VersionState.DRAINING}),
    VersionState.DRAINING: frozenset({VersionState.RETIRED}),
    VersionState.RETIRED: frozenset(),
    VersionState.FAILED: frozenset(),
}

_attempt_ids = itertools.count(1)


@dataclass(eq=False)
class ModelVersion:
    """One attempt to bring a source into service, and, if it went live, its generation.

    `generation` is 0 until the version is prepared; generations count versions that
    became reachable by requests (live, canary, prepared), never failed loads.
    State changes go through `transition`, which is thread-safe and rejects illegal edges.
    """

    source: str
    """Where the weights came from: a path or any string the loader understands."""
    description: str = ""
    """Free text from whoever triggered the load."""
    fingerprint: str | None = None
    """A content digest of the source, when the loader can compute one."""
    size_bytes: int | None = None
    """The loader's estimate of its resident size, when it gives one."""
    generation: int = 0
    """Position in the sequence of versions that became reachable; 0 before that."""
    base_generation: int | None = None
    """For an adapter's version: the generation of its base model it is prepared on
    (None: the base's live one when it loads)."""
    attempt: int = field(default_factory=lambda: next(_attempt_ids))
    """Process-unique id of this load attempt."""
    created_at: float = field(default_factory=time.time)
    """Wall-clock time the load started."""
    loaded_at: float | None = None
    """Wall-clock time it became reachable (prepared)."""
    loaded_at_monotonic: float | None = None
    """Monotonic time it became reachable, for ages immune to clock changes."""
    retired_at: float | None = None
    """Wall-clock time it was unloaded after serving."""
    _state: VersionState = VersionState.LOADING
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def state(self) -> VersionState:
        return self._state

    def transition(self, new: VersionState) -> VersionState:
        """Move to `new` and return the previous state; raise `IllegalTransition` otherwise."""
        with self._lock:
            old = self._state
            if new not in LEGAL_TRANSITIONS[old]:
                raise IllegalTransition(
                    f"version {self.label}: cannot go from {old.value} to {new.value}"
                )
            self._state = new
            if new is VersionState.PREPARED and self.loaded_at is None:
                self.loaded_at = time.time()
                self.loaded_at_monotonic = time.monotonic()
            elif new is VersionState.RETIRED:
                self.retired_at = time.time()
            return old

    @property
    def age(self) -> float:
        """Seconds since it went live (0 if it never did)."""
        if self.loaded_at_monotonic is None:
            return 0.0
        return time.monotonic() - self.loaded_at_monotonic

    @property
    def label(self) -> str:
        """A short name for messages: `g3 (/models/x/3)` or `attempt 7 (/models/x/3)`."""
        who = f"g{self.generation}" if self.generation else f"attempt {self.attempt}"
        return f"{who} ({self.source})"

    @property
    def system_fingerprint(self) -> str:
        """The OpenAI `system_fingerprint` for responses: generation plus content digest."""
        digest = (self.fingerprint or "00000000")[:8]
        return f"hw-g{self.generation}-{digest}"

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready snapshot."""
        return {
            "generation": self.generation,
            "attempt": self.attempt,
            "source": self.source,
            "description": self.description,
            "fingerprint": self.fingerprint,
            "state": self._state.value,
            "created_at": self.created_at,
            "loaded_at": self.loaded_at,
            "retired_at": self.retired_at,
            "age_s": round(self.age, 3),
        }
