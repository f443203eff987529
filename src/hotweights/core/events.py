"""The reload log: a bounded, thread-safe record of every reload attempt and its outcome."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from hotweights.core.gate import GateCheck

DEFAULT_MAX_EVENTS = 256

Trigger = Literal["api", "watch", "signal", "rollback", "startup", "push", "follow"]
"""`follow`: an adapter prepared again on its base model's new version."""
TRIGGERS: tuple[Trigger, ...] = ("api", "watch", "signal", "rollback", "startup", "push", "follow")

Phase = Literal["load", "validate", "warmup", "gate", "bake", "drain"]
PHASES: tuple[Phase, ...] = ("load", "validate", "warmup", "gate", "bake", "drain")


class Outcome(Enum):
    """How a reload attempt ended."""

    LIVE = "live"
    """The target went live."""
    FAILED = "failed"
    """The target did not go live; what was serving still serves (or was restored)."""
    SUPERSEDED = "superseded"
    """A newer request replaced this one while it was still queued."""
    ROLLED_BACK = "rolled_back"
    """A rollback went live: an earlier version's source serves again."""
    GATED = "gated"
    """The target loaded and warmed up, but its quality gate refused it; what was serving
    still serves."""
    CANARY_FAILED = "canary_failed"
    """The target served a share of requests as a canary and was rolled back (by its
    error rate or latency, or by an operator); the stable version serves everything."""
    DISCARDED = "discarded"
    """The target was prepared beside the live version and discarded before anyone
    committed it (a fleet's abort, a hold that nobody committed in time, a shutdown)."""


@dataclass(frozen=True)
class ReloadEvent:
    """One reload attempt, finished. Immutable; the log replaces it to add the drain time."""

    id: int
    """Assigned when the request was accepted; joined requests share it."""
    trigger: Trigger
    target: str
    outcome: Outcome
    old_generation: int
    """The generation serving when the attempt started (0 if none)."""
    new_generation: int | None = None
    """The generation that went live; None unless the outcome is live or rolled_back
    (a canary rolled back and a discarded version name theirs in `fingerprint` and the
    error message)."""
    description: str = ""
    error_type: str | None = None
    error_message: str | None = None
    started_at: float = 0.0
    """Wall-clock time the request was accepted."""
    ended_at: float = 0.0
    """Wall-clock time the outcome was known."""
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds spent in each phase reached: load, validate, warmup, gate, bake, drain."""
    memory_estimate_bytes: int | None = None
    """The loader's estimate of the new version's size, when it gives one."""
    retries: int = 0
    """Transient load failures retried before the outcome."""
    fingerprint: str | None = None
    gate: tuple[GateCheck, ...] = ()
    """Each check the quality gate ran, with its figure and threshold (empty without one)."""
    canary: dict[str, object] | None = None
    """For a version that was baked as a canary: its share, the decision and why, and both
    generations' requests, errors and latencies during the bake."""

    @property
    def succeeded(self) -> bool:
        return self.outcome in (Outcome.LIVE, Outcome.ROLLED_BACK)

    @property
    def duration(self) -> float:
        return max(0.0, self.ended_at - self.started_at)

    def with_phase(self, phase: Phase, seconds: float) -> ReloadEvent:
        return dataclasses.replace(self, phases={**self.phases, phase: seconds})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReloadEvent:
        """The event `to_dict` wrote (a client reads a server's answer with it); extra
        keys are ignored. Raises `KeyError` or `ValueError` for a dict that is not one."""
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {key: value for key, value in data.items() if key in names}
        kept["outcome"] = Outcome(data["outcome"])
        kept["phases"] = dict(data.get("phases") or {})
        kept["gate"] = tuple(
            GateCheck(**{k: check.get(k) for k in ("name", "passed", "value", "threshold")},
                      detail=str(check.get("detail") or ""))
            for check in data.get("gate") or ()
        )  # fmt: skip
        return cls(**kept)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready snapshot."""
        data = dataclasses.asdict(self)
        data["outcome"] = self.outcome.value
        data["gate"] = [check.to_dict() for check in self.gate]
        data["duration_s"] = round(self.duration, 6)
        return data


class ReloadLog:
    """The most recent reload events, oldest dropped first. Thread-safe."""

    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        if max_events < 1:
            raise ValueError(f"max_events must be at least 1, got {max_events}")
        self._lock = threading.Lock()
        self._events: deque[ReloadEvent] = deque(maxlen=max_events)
        self._totals: Counter[Outcome] = Counter()

    def record(self, event: ReloadEvent) -> None:
        with self._lock:
            self._events.append(event)
            self._totals[event.outcome] += 1

    def replace(self, event: ReloadEvent) -> bool:
        """Swap in an updated copy of a retained event with the same id and outcome;
        False if it already left the log."""
        with self._lock:
            for index, kept in enumerate(self._events):
                if kept.id == event.id and kept.outcome is event.outcome:
                    self._events[index] = event
                    return True
            return False

    def recent(self, n: int | None = None) -> list[ReloadEvent]:
        """Up to `n` events, most recent first (all retained ones when `n` is None)."""
        with self._lock:
            events = list(self._events)
        events.reverse()
        return events if n is None else events[: max(0, n)]

    def get(self, event_id: int) -> ReloadEvent | None:
        """The most recent retained event with `event_id`."""
        with self._lock:
            for event in reversed(self._events):
                if event.id == event_id:
                    return event
            return None

    def __len__(self) -> int:
        return len(self._events)

    def summary(self) -> dict[str, object]:
        """Counts by outcome since start (not only retained ones) and the last event."""
        with self._lock:
            totals = {outcome.value: self._totals[outcome] for outcome in Outcome}
            last = self._events[-1] if self._events else None
        return {
            "total": sum(totals.values()),
            "by_outcome": totals,
            "retained": len(self._events),
            "last": last.to_dict() if last else None,
        }
