"""A recorded fake `FleetLink`, and a repository with a coordinator over it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from hotweights.config import Config
from hotweights.fleet.coordinator import Coordinator
from hotweights.fleet.model_replica import Prepared, Target
from hotweights.fleet.record_store import RecordStore
from hotweights.fleet.settings import FleetSettings
from hotweights.sources import publish
from tests.sources.layouts import WEIGHTS, write_files

Call = tuple[object, ...]
Round = Sequence[Prepared | BaseException] | BaseException
"""One scripted answer to `prepare`: the replicas' answers, or what the call raises."""


class FakeLink:
    """A `FleetLink` that records every call in order. `prepare` answers the next of
    `rounds` if any; otherwise every replica of `replica_ids` holds the target, fresh the
    first time it is asked for that generation."""

    def __init__(self, replica_ids: Sequence[str] = ("r1", "r2")) -> None:
        self.replica_ids = tuple(replica_ids)
        self.calls: list[Call] = []
        self.rounds: list[Round] = []
        self.stuck = 0
        """What `drained` answers: requests left on the old generation."""
        self.failures: dict[str, BaseException] = {}
        """What `flip`, `drained` or `finish` raise (by name), once each."""
        self.finishes: list[Sequence[bool | BaseException]] = []
        """Scripted answers of `finish`, one per call; then every replica finishes."""
        self.refusals: list[Sequence[BaseException | None]] = []
        """Scripted answers of `add`, one per call; then every replica serves it."""
        self._held: set[tuple[str, int]] = set()
        self.models: list[tuple[str, str, int]] = []
        """(call, model, generation) of every call that names a model."""

    def prepare(self, target: Target, timeout: float) -> Sequence[Prepared | BaseException]:
        self.calls.append(("prepare", target.generation, Path(target.source).name))
        self.models.append(("prepare", target.model, target.generation))
        if self.rounds:
            scripted = self.rounds.pop(0)
            if isinstance(scripted, BaseException):
                raise scripted
            return scripted
        answers = []
        for replica in self.replica_ids:
            fresh = (replica, target.generation) not in self._held
            self._held.add((replica, target.generation))
            answers.append(Prepared(replica, target.generation, ok=True, seconds=0.5, fresh=fresh))
        return answers

    def abort(self, model: str, generation: int, reason: str) -> None:
        self.calls.append(("abort", generation, reason))
        self.models.append(("abort", model, generation))

    def flip(self, model: str, generation: int, followers: Mapping[str, int]) -> None:
        self.calls.append(("flip", generation))
        self.models.append(("flip", model, generation))
        for adapter, follower in followers.items():
            self.models.append(("flip", adapter, follower))
        self._maybe_fail("flip")

    def drained(self, generation: int, timeout: float) -> int:
        self.calls.append(("drained", generation))
        self._maybe_fail("drained")
        return self.stuck

    def finish(self, model: str, generation: int, timeout: float) -> Sequence[bool | BaseException]:
        self.calls.append(("finish", generation))
        self.models.append(("finish", model, generation))
        self._maybe_fail("finish")
        if self.finishes:
            return self.finishes.pop(0)
        return [True for _ in self.replica_ids]

    def _maybe_fail(self, name: str) -> None:
        failure = self.failures.pop(name, None)
        if failure is not None:
            raise failure

    def add(self, model: str, target: Target, timeout: float) -> Sequence[BaseException | None]:
        self.calls.append(("add", target.generation))
        self.models.append(("add", model, target.generation))
        if self.refusals:
            return self.refusals.pop(0)
        return [None for _ in self.replica_ids]

    def remove(self, model: str) -> None:
        self.calls.append(("remove", model))

    def admit(self, model: str, parent: str, generation: int) -> None:
        self.models.append(("admit", model, generation))

    def replicas(self) -> Sequence[dict[str, object] | BaseException]:
        return [{"replica": replica} for replica in self.replica_ids]

    def ingress(self) -> dict[str, object]:
        return {"generation": None}

    def names(self) -> list[object]:
        """The calls by name only."""
        return [call[0] for call in self.calls]


class Fleet:
    """A repository of model `m` and a coordinator over it with a fake link."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.repo = tmp_path / "repo"
        self.link = FakeLink()
        self._builds = 0

    def publish(self, description: str = "", model: str = "m") -> Path:
        """Publish a new version of `model`; its directory."""
        self._builds += 1
        files = write_files(self.tmp_path / "build" / str(self._builds), WEIGHTS)
        return publish(files, self.repo, model, description=description).path

    def coordinator(
        self, fleet_id: str = "", model: str | None = "m", store: RecordStore | None = None
    ) -> Coordinator:
        """A coordinator of this fleet (of `model`; None: every model of the repository);
        built again with the same `fleet_id`, it is the first one restarted (it reads the
        record the first one left)."""
        config = Config.load({"repo": str(self.repo)}, environ={})
        settings = FleetSettings(config, model, prepare_timeout=5.0)
        return Coordinator(settings, self.link, fleet_id=fleet_id, store=store)
