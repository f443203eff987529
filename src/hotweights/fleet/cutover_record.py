"""What `/admin/fleet` says about a cutover, and the small formatting the coordinator's
reports share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from hotweights.fleet.model_replica import Target
from hotweights.sources.repository_scan import VersionInfo


@dataclass
class Cutover:
    """One attempt to move the fleet to a version, as `/admin/fleet` reports it."""

    generation: int
    version: int
    trigger: str
    description: str = ""
    """What the operator said (`hotweights reload --description`), if anything."""
    started_at: float = field(default_factory=time.time)
    outcome: str = "preparing"
    """preparing, committed, aborted, or skipped (no replica to prepare)."""
    error: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds of prepare, commit, drain and finish."""
    replicas: dict[str, float] = field(default_factory=dict)
    """Each replica's prepare time."""
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    """When each replica's prepare began and ended (wall clock, seconds since the epoch;
    a wait for a place under `--prepare-parallel` not included)."""
    stuck: int = 0
    """Requests still running on the old generation at the drain deadline."""

    def to_dict(self) -> dict[str, object]:
        return {
            "generation": self.generation,
            "version": self.version,
            "trigger": self.trigger,
            "description": self.description,
            "started_at": self.started_at,
            "outcome": self.outcome,
            "error": self.error,
            # list(): one copy under the GIL while the cutover's thread may add a phase
            "phases": {name: round(seconds, 4) for name, seconds in list(self.phases.items())},
            "replicas": {name: round(s, 4) for name, s in list(self.replicas.items())},
            "windows": {name: [round(t, 4) for t in w] for name, w in list(self.windows.items())},
            "stuck": self.stuck,
        }


def describe(info: VersionInfo) -> str:
    """A version's description for its `Target`: `model vN`, and what its publisher said."""
    text = f"{info.model} v{info.number}"
    return f"{text}: {info.description}" if info.description else text


def target_json(target: Target) -> dict[str, object]:
    """A target for `/admin/fleet`: with the base generation an adapter's is on, and the
    generations a base's new version gives the adapters on it."""
    number = int(target.number) if target.number.isdigit() else target.number
    found: dict[str, object] = {
        "generation": target.generation,
        "version": number,
        "source": target.source,
    }
    if target.base_generation is not None:
        found["base_generation"] = target.base_generation
    if target.followers:
        found["followers"] = dict(target.followers)
    return found


def reason(exc: BaseException) -> str:
    """The first line of an error (a Ray task error carries the whole remote traceback)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"
