"""The role every benchmarked system plays, and the records the benchmark keeps of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

Stage = Literal["install", "start", "run"]


class PeerUnavailable(Exception):
    """A system could not be installed, started or driven; the report names the stage and
    the reason instead of dropping the system."""

    def __init__(self, stage: Stage, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


@dataclass(frozen=True)
class ModelVersion:
    """One version the benchmark makes live: its number and the directory it loads."""

    number: int
    """1 for the version served at start, then 2, 3, ... in the order they go live."""
    path: Path
    """A Hugging Face model directory (safetensors), one of the two weight sets."""
    weights: str
    """Which weight set `path` holds ("A" or "B"); versions alternate between the two."""


@dataclass(frozen=True)
class Workload:
    """What every request asks, identical for every system."""

    prompt: str
    max_tokens: int


@dataclass
class ReloadResult:
    """One reload as the benchmark saw it: from the trigger to the system saying live."""

    version: int
    weights: str
    trigger: float
    """Seconds since the run's start when the reload was triggered."""
    live: float
    """Seconds since the run's start when the system reported the version live."""
    ok: bool
    detail: str = ""
    server: dict[str, Any] = field(default_factory=dict)
    """What the system itself reported (hotweights: the reload event)."""
    done: float | None = None
    """When the reload's last synchronous step (a peer's unload of the old version) ended;
    None when nothing followed `live`."""

    @property
    def seconds(self) -> float:
        return self.live - self.trigger


@dataclass(frozen=True)
class Request:
    """One inference call: path on the system's base URL and JSON body."""

    path: str
    body: dict[str, Any]


class System(Protocol):
    """A model server the benchmark drives. Methods are called from one thread at a time,
    except `reload`, which runs in a worker thread while the load generator reads
    `answer_label` on the event loop."""

    name: str
    """Shown in the report: `hotweights/availability`, `torchserve`, ..."""
    base_url: str

    def install(self) -> None:
        """Make the system runnable (a cached virtual environment); raise `PeerUnavailable`."""
        ...

    def start(self, first: ModelVersion) -> None:
        """Serve `first` and return once it answers; raise `PeerUnavailable`."""
        ...

    def server_pid(self) -> int:
        """The root process whose tree's resident memory the benchmark samples."""
        ...

    def request(self, workload: Workload) -> Request: ...

    def answer_label(self, headers: dict[str, str], body: Any) -> tuple[str, str]:
        """(label of the version that answered, generated text) from a 2xx answer."""
        ...

    def version_of(self, label: str) -> int | None:
        """The `ModelVersion.number` a label names, once the run is over."""
        ...

    def reload(self, version: ModelVersion, clock: Clock) -> ReloadResult:
        """Make `version` live through the system's own mechanism; blocks until it is live
        or the reload failed. Never raises for a failed reload: says so in the result."""
        ...

    def stop(self) -> None:
        """Stop every process started; idempotent."""
        ...


class Clock(Protocol):
    def __call__(self) -> float:
        """Seconds since the run's start."""
        ...
