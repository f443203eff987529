"""The coordinator: the fleet's single source of truth about versions, for every model it
serves, LoRA adapters included. Each base model's versions cut over on their own, an
adapter's with its base's (`model_fleet.ModelFleet`: its own
committed generation, bad marks, pin, cutover in progress, prepare, commit and abort); the
coordinator holds them together with what they share: the repository and its watcher, the
record (`FleetRecord`, kept by the `RecordStore` that `--fleet-state` names), the
generation count, and the places to prepare in (`--prepare-parallel`, `PrepareSlots`:
shared by every model, since they are what the replicas' machines can afford).

Until a model's finish, a replica that starts loads its g(N-1) beside gN
(`Joined.draining`): a request admitted before the flip finds its generation wherever it
is routed.

The coordinator never touches a request. It reaches the replicas and the ingress through
a `FleetLink` (Ray handles in `deployment.py`, plain objects in tests). Thread-safe.
"""

from __future__ import annotations

import logging
import os
import threading
from functools import partial

from hotweights.errors import InvalidRequest, UnknownModel
from hotweights.fleet.adoption import adopt_adapter
from hotweights.fleet.coalesced import Coalesced
from hotweights.fleet.cutover_record import reason
from hotweights.fleet.fleet_link import FleetLink, admit_until
from hotweights.fleet.fleet_models import fleet_models
from hotweights.fleet.ledger import restore
from hotweights.fleet.model_fleet import INTERRUPTED_LIMIT, ModelFleet
from hotweights.fleet.model_replica import Joined
from hotweights.fleet.prepare_slots import PrepareSlots
from hotweights.fleet.record_store import FleetRecord, RecordStore, make_store
from hotweights.fleet.settings import FleetSettings
from hotweights.sources import ModelRepository, make_watcher
from hotweights.sources.repository_scan import RepositoryState
from hotweights.sources.watcher import Watcher

__all__ = ["INTERRUPTED_LIMIT", "Coordinator"]

log = logging.getLogger("hotweights.fleet")
SETTLE_MARGIN_S = 0.05
RESUME_ADMIT_S = 30.0
"""How long a restarted coordinator tries to tell the ingress of each adapter it serves."""


class Coordinator:
    """The fleet's coordinator (one per fleet).

    `fleet_id` names the fleet this coordinator serves: built again with the same name
    (Ray restarting its actor), it takes each model's committed generation and cutover in
    progress from the record; with another name (a fleet started anew on the same
    repository) only the bad marks, the pins and the generation count. `store` keeps the
    record (default: the one `settings.fleet_state` names)."""

    def __init__(
        self,
        settings: FleetSettings,
        link: FleetLink,
        *,
        fleet_id: str = "",
        store: RecordStore | None = None,
    ) -> None:
        config = settings.config
        if config.repo is None:  # pragma: no cover - FleetSettings checks
            raise ValueError("a fleet serves a model repository")
        self.settings = settings
        self.link = link
        self.repository = ModelRepository(
            config.repo, verify=config.verify, settle_seconds=config.settle_seconds
        )
        state = self.repository.scan()
        if not state.readable:
            raise ValueError(f"cannot read the model repository {config.repo}: {state.error}")
        served = fleet_models(self.repository, settings.model, config.lora_base)
        store = store if store is not None else make_store(settings.fleet_state, config.repo)
        record = store.load()
        restarted = bool(fleet_id) and record.fleet == fleet_id
        record.fleet, record.starts = fleet_id, record.starts + 1 if restarted else 1
        self.restarts = record.starts - 1
        """How often Ray restarted this fleet's coordinator."""
        self.shared = FleetRecord(store, record)
        self.slots = PrepareSlots(settings.prepare_parallel)
        self._watcher: Watcher | None = None
        self._settle: threading.Timer | None = None
        self._settle_lock = threading.Lock()
        self._adopting = threading.Lock()
        self.models: dict[str, ModelFleet] = {}
        """Replaced whole when an adapter is adopted: readers see the old or the new."""
        for name in served.names:  # the bases first: an adapter is built on its base
            parent = served.adapters.get(name)
            entry = record.models.get(name)
            if restarted and parent is not None and (entry is None or entry.committed is None):
                if entry is not None:  # its bad marks count when `adopt` looks at it
                    restore(entry, self.repository, name)
                continue  # not adopted before the restart: `adopt` (the watcher) will
            try:
                model = self._model_fleet(name, parent, restarted)
            except ValueError as exc:  # every version bad, as the record says
                if parent is None:
                    raise
                log.warning("the fleet leaves out adapter %s: %s", name, exc)
                continue
            self._serve(model)
        self._adopter = Coalesced(self.adopt, "hotweights-fleet-adopt")
        self.shared.save()

    # -- asked by replicas and the ingress ---------------------------------------------------

    def join(self) -> dict[str, Joined]:
        """What a replica starting now must load, by model (see `FleetReplica.start`)."""
        issued = self.shared.record.next_generation - 1
        return {name: model.join(issued) for name, model in self.models.items()}

    def committed(self) -> dict[str, int]:
        """Each model's committed generation (an ingress that restarts stamps them)."""
        return {name: model.committed() for name, model in self.models.items()}

    def bases(self) -> dict[str, str]:
        """Each LoRA adapter served, with its base (the ingress stamps both generations)."""
        return {name: m.base.name for name, m in self.models.items() if m.base is not None}

    def prepare_slot(self, generation: int, replica: str) -> bool:
        """Whether `replica` may prepare `generation` now (see `PrepareSlots`)."""
        return self.slots.take(generation, replica)

    def prepared(self, generation: int, replica: str) -> None:
        self.slots.give_back(generation, replica)

    # -- driving ---------------------------------------------------------------------------

    def resume(self) -> dict[str, dict[str, object]] | None:
        """Carry on where the coordinator before this one died: abort a cutover it left in
        prepare (not the version's fault, unless it happened `INTERRUPTED_LIMIT` times),
        finish one it left committed, for each model (each in its own thread: a model's
        finish does not wait for another's). Call once, before `watch`. What was done,
        by model (None when nothing was left)."""
        done: dict[str, dict[str, object]] = {}

        def carry_on(model: ModelFleet) -> None:
            result = model.resume()
            if result is not None:
                done[model.name] = result

        threads = [
            threading.Thread(target=carry_on, args=(m,), name=f"hotweights-resume-{m.name}")
            for m in self.models.values()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name, parent in self.bases().items():  # one adopted as the last one died
            admit_until(self.link, name, parent, self.models[name].committed(), RESUME_ADMIT_S)
        return done or None

    def watch(self) -> None:
        """Follow the repository from now on (call once the replicas serve), starting
        with a sync of every model in the background: a version published while the
        fleet started is not missed."""
        config = self.settings.config
        if self._watcher is not None or config.repo is None:
            return
        self._watcher = make_watcher(config.watch, config.repo, interval=config.poll_interval)
        self._watcher.start(self._on_change)
        self._on_change()

    def sync(
        self, trigger: str = "watch", description: str = "", model: str | None = None
    ) -> dict[str, object] | None:
        """Scan the repository; cut `model` (the fleet's only one if None) over to its
        target if that is not its committed version. The cutover's record, or None."""
        return self._model(model).sync(trigger, description)

    def reload(
        self, version: int | None = None, description: str = "", model: str | None = None
    ) -> dict[str, object] | None:
        """Pin `version` of `model` (or, with None, follow the latest eligible one again)
        and sync it. Raises `UnknownModel` for a model the fleet does not serve, and
        `InvalidRequest` for none named when it serves several."""
        return self._model(model).reload(version, description)

    def rollback(self, description: str = "", model: str | None = None) -> dict[str, object] | None:
        """Pin the newest eligible version of `model` older than the committed one and
        sync it (errors as `reload`)."""
        return self._model(model).rollback(description)

    def adopt(self) -> list[str]:
        """Serve the LoRA adapters published since the fleet started on a base it serves
        (the watcher asks; see `adoption.py`). The adapters adopted."""
        settings = self.settings
        with self._adopting:
            self._scan()
            found = fleet_models(self.repository, settings.model, settings.config.lora_base)
            adopted = []
            for name, parent in found.adapters.items():
                if name in self.models or parent not in self.models:
                    continue  # served, or on a base published since (served after a restart)
                base, timeout = self.models[parent], settings.prepare_timeout
                try:
                    build = partial(self._model_fleet, name, parent, restarted=False)
                    model = adopt_adapter(name, base, build, self._serve, self.link, timeout)
                except Exception:
                    log.exception("adopting adapter %s failed", name)
                    continue
                if model is not None:
                    adopted.append(name)
            return adopted

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
        with self._settle_lock:
            if self._settle is not None:
                self._settle.cancel()

    # -- reporting ---------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """`GET /admin/fleet`: each model's committed generation, last cutovers, bad marks
        and pin under `models`, by name (for a fleet of one model, also at the top level,
        as before it served several), each replica's live and resident generations and
        requests in flight, the ingress's counts, the coordinator's own process, and where
        the record is kept."""
        models = {name: model.status() for name, model in self.models.items()}
        bases = [status for status in models.values() if status["parent"] is None]
        only = bases[0] if len(bases) == 1 else {}
        return only | {
            "models": models,
            "replicas": [
                r if isinstance(r, dict) else {"error": reason(r)} for r in self.link.replicas()
            ],
            "ingress": self.link.ingress(),
            "coordinator": {"pid": os.getpid(), "restarts": self.restarts},
            "state": self.shared.store.where,
            "preparing_replicas": self.slots.preparing(),
        }

    # -- internals ---------------------------------------------------------------------------

    def _model_fleet(self, name: str, parent: str | None, restarted: bool) -> ModelFleet:
        """Model `name` (an adapter when `parent` names its base), not served yet."""
        return ModelFleet(
            name,
            self.settings,
            self.link,
            self.repository,
            self.shared,
            restarted=restarted,
            scan=self._scan,
            slots=self.slots,
            base=self.models[parent] if parent is not None else None,
        )

    def _serve(self, model: ModelFleet) -> None:
        """Serve `model` from now on: `join` names it, the watcher pokes it, and an
        adapter's base brings it along in its cutovers."""
        if model.base is not None:
            model.base.adapters.append(model)
        self.models = {**self.models, model.name: model}

    def _model(self, name: str | None) -> ModelFleet:
        if name is None:
            bases = [model for model in self.models.values() if model.base is None]
            if len(bases) == 1:
                return bases[0]
            raise InvalidRequest(
                f"this fleet serves several models ({', '.join(self.models)}): name one "
                'with "model"'
            )
        model = self.models.get(name)
        if model is None:
            raise UnknownModel(
                f"this fleet serves {', '.join(repr(m) for m in self.models)}, not {name!r}"
            )
        return model

    def _scan(self) -> RepositoryState:
        """Scan the repository, and look again when a version without a manifest has
        settled (which no file event announces, as `RepositorySync` does)."""
        state = self.repository.scan()
        with self._settle_lock:
            if self._settle is not None:
                self._settle.cancel()
                self._settle = None
            if state.settle_due is not None and self._watcher is not None:
                due = state.settle_due + SETTLE_MARGIN_S
                self._settle = threading.Timer(due, self._watcher.rescan)
                self._settle.daemon = True
                self._settle.start()
        return state

    def _on_change(self) -> None:
        self._adopter.poke()
        for model in self.models.values():
            model.poke()
