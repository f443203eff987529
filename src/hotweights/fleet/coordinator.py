"""The coordinator: holds the fleet's committed version and moves every replica to a new
one in two phases.

```
 repository change, /admin/reload, /admin/rollback
        │
   PREPARE ── every replica loads, validates, warms and holds gN beside g(N-1)
        │  └─ any replica fails, dies or times out ──► ABORT: all discard gN,
        │                                              g(N-1) stays, vN marked bad
   COMMIT ─── recorded on disk (the commit point), then the ingress flips: requests
        │     admitted from now on carry gN
   DRAIN ──── requests the ingress admitted on g(N-1) finish
        │
   FINISH ─── every replica makes gN its live version; g(N-1) is unloaded
```

Every step is written to the fleet's record (`ledger.py`) before it is taken, so a
coordinator that dies and is restarted carries on (`resume`): a cutover it left in
prepare is aborted, one it left committed is finished. Until the finish, a replica that
starts loads g(N-1) beside gN (`Joined.draining`): a request admitted before the flip
finds its generation wherever it is routed.

The coordinator never touches a request. It reaches the replicas and the ingress through
a `FleetLink` (Ray handles in `deployment.py`, plain objects in tests). Thread-safe: one
cutover runs at a time; a storm of triggers queues on a lock and each finds the
repository's target already committed.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

from hotweights.errors import UnknownModel
from hotweights.fleet.cutover_record import Cutover, describe, reason, target_json
from hotweights.fleet.fleet_link import (
    FleetLink,
    finish_everywhere,
    flip_until,
    prepare_everywhere,
)
from hotweights.fleet.ledger import LEDGER_NAME, FleetLedger, Mark, Pending, Phase, restore
from hotweights.fleet.replica import Joined, Target
from hotweights.fleet.settings import FleetSettings
from hotweights.sources import ModelRepository, make_watcher
from hotweights.sources.layout import Signature
from hotweights.sources.repository_scan import VersionInfo, VersionStatus
from hotweights.sources.version_policy import Pinned
from hotweights.sources.version_policy import describe as describe_policy
from hotweights.sources.watcher import Watcher

log = logging.getLogger("hotweights.fleet")

MAX_CUTOVERS = 32
SETTLE_MARGIN_S = 0.05
INTERRUPTED_LIMIT = 2
"""A version whose prepare a coordinator died in this many times is marked bad: it may be
what kills it."""


class Coordinator:
    """The fleet's single source of truth about versions (one per fleet).

    `fleet_id` names the fleet this coordinator serves: built again with the same name
    (Ray restarting its actor), it takes the committed generation and the cutover in
    progress from the record; with another name (a fleet started anew on the same
    repository) only the bad marks, the pins and the generation count."""

    def __init__(self, settings: FleetSettings, link: FleetLink, *, fleet_id: str = "") -> None:
        config = settings.config
        if config.repo is None:  # pragma: no cover - FleetSettings checks
            raise ValueError("a fleet serves a model repository")
        self.settings = settings
        self.link = link
        self.model = settings.model
        self.repository = ModelRepository(
            config.repo, verify=config.verify, settle_seconds=config.settle_seconds
        )
        state = self.repository.scan()
        if not state.readable:
            raise ValueError(f"cannot read the model repository {config.repo}: {state.error}")
        self.ledger = FleetLedger(Path(config.repo) / LEDGER_NAME)
        record = self.ledger.load()
        restarted = bool(fleet_id) and record.fleet == fleet_id
        record.fleet, record.starts = fleet_id, record.starts + 1 if restarted else 1
        self.restarts = record.starts - 1
        """How often Ray restarted this fleet's coordinator."""
        self._record = record
        self._entry = record.model(self.model)
        self._preparing: Target | None = None
        self._cutovers: deque[Cutover] = deque(maxlen=MAX_CUTOVERS)
        self._lock = threading.Lock()  # one cutover at a time; every change of the record
        self._state = threading.Lock()  # the fields `join` and `status` read
        self._watcher: Watcher | None = None
        self._settle: threading.Timer | None = None
        restore(self._entry, self.repository, self.model)
        self._interrupted: Pending | None = None
        self._draining: Target | None = None
        entry = self._entry
        if restarted and entry.committed is not None and entry.number is not None:
            self._committed, self._number = entry.committed, entry.number
            self._interrupted = entry.pending
            if entry.pending is not None and entry.pending.phase is Phase.COMMITTED:
                self._draining = entry.pending.previous
        else:
            first = self.repository.target(self.model)
            if first is None:
                raise ValueError(
                    f"model {self.model!r} has no eligible version in {config.repo} "
                    f"(models there: {', '.join(self.repository.models()) or 'none'})"
                )
            self._committed = Target(self._issue(), first.source, describe(first))
            self._number = first.number
            entry.committed, entry.number, entry.pending = self._committed, first.number, None
        self.ledger.save(record)

    # -- asked by replicas and the ingress ---------------------------------------------------

    def join(self) -> Joined:
        """What a replica starting now must load (see `FleetReplica.start`)."""
        with self._state:
            issued = self._record.next_generation - 1
            return Joined(self._committed, self._preparing, self._draining, issued)

    def committed(self) -> int:
        """The committed generation (an ingress that restarts stamps it)."""
        with self._state:
            return self._committed.generation

    # -- driving ---------------------------------------------------------------------------

    def resume(self) -> dict[str, object] | None:
        """Carry on where the coordinator before this one died: abort a cutover it left in
        prepare (not the version's fault, unless it happened `INTERRUPTED_LIMIT` times),
        finish one it left committed. Call once, before `watch`. The record of what was
        done, or None when nothing was left."""
        with self._lock:
            pending, self._interrupted = self._interrupted, None
            if pending is None:
                return None
            generation = pending.target.generation
            record = Cutover(generation, pending.number, "restart", pending.target.description)
            with self._state:
                self._cutovers.appendleft(record)
            if pending.phase is Phase.COMMITTED:
                log.info("cutover g%d was committed before a restart: finishing", generation)
                record.outcome = "committed"
                self._complete(record, pending)
                return record.to_dict()
            count = self._entry.interrupted.get(pending.number, 0) + 1
            self._entry.interrupted[pending.number] = count
            why = f"the coordinator died while g{generation} prepared ({count} time(s))"
            blame = count >= INTERRUPTED_LIMIT
            return self._abort(record, pending.number, None, [why], blame=blame).to_dict()

    def watch(self) -> None:
        """Follow the repository from now on (call once the replicas serve), starting
        with a sync in the background: a version published while the fleet started is
        not missed."""
        config = self.settings.config
        if self._watcher is not None or config.repo is None:
            return
        self._watcher = make_watcher(config.watch, config.repo, interval=config.poll_interval)
        self._watcher.start(self._on_change)
        threading.Thread(target=self._on_change, name="hotweights-fleet-sync", daemon=True).start()

    def sync(self, trigger: str = "watch", description: str = "") -> dict[str, object] | None:
        """Scan the repository; cut over to its target if that is not the committed
        version. The cutover's record, or None when there was nothing to do."""
        with self._lock:
            state = self.repository.scan()
            self._settle_later(state.settle_due)
            if not state.readable:
                return None
            target = self.repository.target(self.model, live=self._number)
            if target is None or target.number == self._number:
                return None
            return self._cutover(target, trigger, description).to_dict()

    def reload(
        self, version: int | None = None, description: str = "", model: str | None = None
    ) -> dict[str, object] | None:
        """Pin `version` (or, with None, follow the latest eligible one again) and sync.
        Raises `UnknownModel` for a `model` the fleet does not serve."""
        self._served(model)
        self.repository.scan()
        with self._lock:
            if version is None:
                self.repository.unpin(self.model)
            else:
                self.repository.pin(self.model, version)
                self._entry.bad.pop(version, None)
            self._remember_policy()
        return self.sync("api", description)

    def rollback(self, description: str = "", model: str | None = None) -> dict[str, object] | None:
        """Pin the newest eligible version older than the committed one and sync."""
        self._served(model)
        self.repository.scan()
        with self._lock:
            self.repository.rollback(self.model, live=self._number)
            self._remember_policy()
        return self.sync("rollback", description)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
        if self._settle is not None:
            self._settle.cancel()

    # -- reporting ---------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """`GET /admin/fleet`: the committed generation, the last cutovers, the bad marks
        and the pin (also under `models`, by name), each replica's live and resident
        generations and requests in flight, the ingress's counts, and the coordinator's
        own process."""
        with self._state:
            committed, preparing, draining = self._committed, self._preparing, self._draining
            cutovers = [cutover.to_dict() for cutover in self._cutovers]
        bad = {
            str(info.number): info.reason
            for info in self.repository.versions(self.model)
            if info.status is VersionStatus.BAD
        }
        model: dict[str, object] = {
            "model": self.model,
            "committed": target_json(committed),
            "preparing": target_json(preparing) if preparing is not None else None,
            "draining": target_json(draining) if draining is not None else None,
            "policy": describe_policy(self.repository.policy(self.model)),
            "bad": bad,
            "last_cutover": cutovers[0] if cutovers else None,
            "cutovers": cutovers,
        }
        return model | {
            "models": {self.model: model},
            "replicas": [
                r if isinstance(r, dict) else {"error": reason(r)} for r in self.link.replicas()
            ],
            "ingress": self.link.ingress(),
            "coordinator": {"pid": os.getpid(), "restarts": self.restarts},
        }

    # -- the two phases ----------------------------------------------------------------------

    def _cutover(self, info: VersionInfo, trigger: str, description: str) -> Cutover:
        number, signature = info.number, info.signature
        target = Target(self._issue(), info.source, description or describe(info))
        generation = target.generation
        pending = Pending(target, number, Phase.PREPARING, self._committed, trigger)
        self._entry.pending = pending
        self.ledger.save(self._record)  # nothing has started if this raises
        record = Cutover(generation, number, trigger, description)
        with self._state:
            self._cutovers.appendleft(record)
            self._preparing = target
        log.info("cutover g%d to %s v%d: prepare", generation, self.model, number)
        started = time.monotonic()
        try:
            answers, errors = prepare_everywhere(self.link, target, self.settings.prepare_timeout)
        finally:
            record.phases["prepare"] = time.monotonic() - started
        record.replicas = {a.replica: a.seconds for a in answers if a.fresh}
        if errors or not answers:
            return self._abort(record, number, signature, errors)
        started = time.monotonic()
        try:
            self._commit(pending)
        except OSError as exc:  # not the version's fault: not marked bad
            why = f"the commit could not be recorded in {self.ledger.path}: {exc}"
            return self._abort(record, number, signature, [why], blame=False)
        record.outcome = "committed"
        self._complete(record, pending, started)
        return record

    def _commit(self, pending: Pending) -> None:
        """The commit point: the record on disk says the fleet committed `pending`. Raises
        `OSError` (and commits nothing) if it cannot be written."""
        entry = self._entry
        entry.committed, entry.number = pending.target, pending.number
        entry.pending = replace(pending, phase=Phase.COMMITTED)
        interrupted = entry.interrupted.pop(pending.number, None)
        try:
            self.ledger.save(self._record)
        except OSError:
            entry.committed, entry.number, entry.pending = self._committed, self._number, pending
            if interrupted is not None:
                entry.interrupted[pending.number] = interrupted
            raise
        with self._state:
            self._committed, self._number = pending.target, pending.number
            self._preparing, self._draining = None, pending.previous
        log.info("cutover g%d committed", pending.target.generation)

    def _complete(self, record: Cutover, pending: Pending, started: float | None = None) -> None:
        """Flip, drain and finish a committed cutover (also one a dead coordinator left)."""
        generation, old = pending.target.generation, pending.previous.generation
        started = time.monotonic() if started is None else started
        flip_until(self.link, generation, self.settings.prepare_timeout)
        record.phases["commit"] = time.monotonic() - started
        log.info("cutover g%d: draining g%d", generation, old)
        started = time.monotonic()
        try:
            record.stuck = self.link.drained(old, self.settings.config.drain_timeout)
        except Exception as exc:  # an ingress that died took its requests with it
            log.warning("cutover g%d: the ingress did not report its drain: %s", generation, exc)
        record.phases["drain"] = time.monotonic() - started
        started = time.monotonic()
        record.error = finish_everywhere(self.link, generation, self.settings.prepare_timeout)
        record.phases["finish"] = time.monotonic() - started
        with self._state:
            self._draining = None
        self._entry.pending = None
        self._save_quietly()  # if lost, a restarted coordinator finishes again: harmless

    def _abort(
        self,
        record: Cutover,
        number: int,
        signature: Signature | None,
        errors: list[str],
        *,
        blame: bool = True,
    ) -> Cutover:
        generation = record.generation
        with self._state:
            self._preparing = None
        self._entry.pending = None
        if not errors:  # nothing answered: no replica yet, not the version's fault
            record.outcome, record.error = "skipped", "no replica was running to prepare it"
            self._save_quietly()
            return record
        why = "; ".join(errors)
        record.outcome, record.error = "aborted", why
        log.error("cutover g%d to v%d aborted: %s", generation, number, why)
        try:
            self.link.abort(generation, why)
        except Exception as exc:  # each replica's held copy rolls back when its hold ends
            log.warning("cutover g%d: telling the replicas to abort failed: %s", generation, exc)
        if blame:
            mark = Mark(f"fleet cutover g{generation} aborted: {why}", signature)
            self.repository.mark_bad(self.model, number, mark.reason, signature=signature)
            self._entry.bad[number] = mark
        self._save_quietly()  # on disk before `status` shows it: a restart keeps what it saw
        if blame:
            self.repository.scan()  # the mark counts from a scan on
        return record

    def _served(self, model: str | None) -> None:
        if model is not None and model != self.model:
            raise UnknownModel(f"this fleet serves {self.model!r}, not {model!r}")

    # -- the record --------------------------------------------------------------------------

    def _issue(self) -> int:
        """A new generation number (kept on disk with the next save)."""
        with self._state:
            generation = self._record.next_generation
            self._record.next_generation += 1
        return generation

    def _remember_policy(self) -> None:
        policy = self.repository.policy(self.model)
        self._entry.pin = policy if isinstance(policy, Pinned) else None
        self._save_quietly()

    def _save_quietly(self) -> None:
        """Write the record; a failure is logged (what it loses is redone on a restart)."""
        try:
            self.ledger.save(self._record)
        except OSError as exc:
            log.error("the fleet's record %s could not be written: %s", self.ledger.path, exc)

    def _settle_later(self, due: float | None) -> None:
        """A version without a manifest becomes eligible once its files have settled,
        which no file event announces: look again then (as `RepositorySync` does)."""
        if self._settle is not None:
            self._settle.cancel()
            self._settle = None
        if due is None or self._watcher is None:
            return
        self._settle = threading.Timer(due + SETTLE_MARGIN_S, self._watcher.rescan)
        self._settle.daemon = True
        self._settle.start()

    def _on_change(self) -> None:
        try:
            self.sync("watch")
        except Exception:
            log.exception("fleet: syncing %s failed", self.settings.config.repo)
