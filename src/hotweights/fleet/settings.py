"""What a fleet runs with: the server's `Config` (the repository, security, engine) and the
few settings only a fleet has."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from hotweights.config import Config
from hotweights.core import Loader

FleetState = Literal["repo", "ray-kv"]
"""Where the fleet's record lives (`record_store.py`): beside the versions, or in Ray's
internal key-value store."""
FLEET_STATES: tuple[FleetState, ...] = get_args(FleetState)
PREPARE_ROUNDS = 3
"""Prepare is repeated until a round finds every replica already holding the version (a
replica that started during the round holds it too), at most this many times."""
HOLD_MARGIN_S = 60.0
"""A held version outlives prepare plus drain by this much before it rolls back alone."""


@dataclass(frozen=True)
class FleetSettings:
    """A fleet's settings. Frozen and picklable: Ray ships it to every actor."""

    config: Config
    """The repository (`config.repo`), host, port, tokens and engine settings."""
    model: str | None = None
    """The one repository base model the fleet serves, with the LoRA adapters on it;
    None: every base model of the repository and every adapter on them."""
    replicas: int = 2
    """How many replicas serve the model, each with its own copy of it."""
    prepare_timeout: float = 300.0
    """Seconds every replica has to load, validate and warm a new version (waiting for its
    turn included, see `prepare_parallel`); past it the cutover aborts."""
    prepare_parallel: int = 0
    """How many replicas prepare a new version at once; the others wait for a place
    (0: all at once)."""
    ray_address: str | None = None
    """An existing Ray cluster to join; None: start a local one on 127.0.0.1."""
    replace: bool = False
    """Replace a fleet already running on the cluster (its Serve application and
    coordinator); False: refuse to start beside it."""
    replica_cpus: float = 0.0
    """CPUs each replica asks Ray for (0: placement by memory only, as on one machine)."""
    fleet_state: FleetState = "repo"
    """Where the coordinator keeps its record (see `record_store.py`)."""
    loader: Callable[[Config], Loader[Any]] | None = None
    """Builds each replica's loader from the config (None: the transformers loader of
    `hotweights serve`). Shipped to the replicas by Ray, so it must pickle."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"a fleet needs at least 1 replica, got {self.replicas}")
        if self.prepare_parallel < 0:
            raise ValueError(f"prepare_parallel must be 0 or more, got {self.prepare_parallel}")
        if self.prepare_timeout <= 0:
            raise ValueError(f"prepare_timeout must be positive, got {self.prepare_timeout}")
        if self.fleet_state not in FLEET_STATES:
            raise ValueError(
                f"fleet_state must be one of {', '.join(FLEET_STATES)}, got {self.fleet_state!r}"
            )
        if self.config.repo is None:
            raise ValueError("a fleet serves a model repository: give --repo ROOT")
        if self.config.max_resident_adapters:
            raise ValueError(
                "--max-resident-adapters is for one server: a fleet keeps every adapter "
                "resident on every replica (an evicted adapter would come back on the base "
                "live there, not on the one the fleet stamped its requests with)"
            )

    @property
    def hold_seconds(self) -> float:
        """How long a replica holds a prepared version that nobody commits or aborts:
        longer than every prepare round, the drain and the finish together."""
        rounds = PREPARE_ROUNDS * self.prepare_timeout
        return rounds + self.config.drain_timeout + self.prepare_timeout + HOLD_MARGIN_S
