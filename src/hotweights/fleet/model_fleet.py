"""One model's versions across the fleet: its committed generation, its cutover in
progress, its bad marks and pin, and the two phases that move every replica to a new
version of it.

```
 repository change, /admin/reload, /admin/rollback (for this model)
        │
   PREPARE ── every replica loads, validates, warms and holds gN beside g(N-1)
        │  └─ any replica fails, dies or times out ──► ABORT: all discard gN,
        │                                              g(N-1) stays, vN marked bad
   COMMIT ─── recorded (the commit point), then the ingress flips this model: requests
        │     for it admitted from now on carry gN
   DRAIN ──── requests the ingress admitted on g(N-1) finish
        │
   FINISH ─── every replica makes gN this model's live version; g(N-1) is unloaded
```

A LoRA adapter is a model of its own here, bound to its base (`base`): its versions are
loaded on the base's committed generation, and it shares the base's lock (one cutover of
a base and its adapters at a time). A base's cutover numbers a version of each adapter on
it (`Target.followers`); every replica prepares them with the base's and commits them with
it, and the ingress flips the base and its adapters in one step.

Every step is written to the fleet's record (`FleetRecord`) before it is taken, so a
coordinator that dies and is restarted carries on (`resume`): a cutover it left in prepare
is aborted, one it left committed is finished. Each base model has its own lock: a cutover
of one never waits for another's. The record and the generation count are shared.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from hotweights.fleet.coalesced import Coalesced
from hotweights.fleet.cutover_record import Cutover, describe, target_json
from hotweights.fleet.fleet_link import (
    FleetLink,
    finish_everywhere,
    flip_until,
    prepare_everywhere,
)
from hotweights.fleet.ledger import Mark, ModelRecord, Pending, Phase, restore
from hotweights.fleet.model_replica import Joined, Target
from hotweights.fleet.prepare_slots import PrepareSlots
from hotweights.fleet.record_store import FleetRecord
from hotweights.fleet.settings import FleetSettings
from hotweights.sources import ModelRepository
from hotweights.sources.layout import Signature
from hotweights.sources.repository_scan import RepositoryState, VersionInfo, VersionStatus
from hotweights.sources.version_policy import Pinned
from hotweights.sources.version_policy import describe as describe_policy

log = logging.getLogger("hotweights.fleet")

MAX_CUTOVERS = 32
INTERRUPTED_LIMIT = 2
"""A version whose prepare a coordinator died in this many times is marked bad: it may be
what kills it."""


class ModelFleet:
    """One model's cutovers (one per model the fleet serves). `restarted`: the record is
    this fleet's own (Ray restarted its coordinator), so its committed generation and its
    cutover in progress are taken from it; otherwise only bad marks and the pin are."""

    def __init__(
        self,
        name: str,
        settings: FleetSettings,
        link: FleetLink,
        repository: ModelRepository,
        shared: FleetRecord,
        *,
        restarted: bool,
        scan: Callable[[], RepositoryState],
        slots: PrepareSlots,
        base: ModelFleet | None = None,
    ) -> None:
        self.name = name
        self.base = base
        """For a LoRA adapter: its base model (see the module)."""
        self.adapters: list[ModelFleet] = []
        """For a base model: the adapters on it (the coordinator adds each it serves)."""
        self.settings = settings
        self.link = link
        self.repository = repository
        self.shared = shared
        self.slots = slots
        self._scan = scan
        self._entry: ModelRecord = shared.record.model(name)
        self._preparing: Target | None = None
        self._cutovers: deque[Cutover] = deque(maxlen=MAX_CUTOVERS)
        # one cutover of this model (and of a base's adapters) at a time
        self.lock: threading.Lock = base.lock if base is not None else threading.Lock()
        self._state = threading.Lock()  # the fields `join` and `status` read
        self._syncer = Coalesced(lambda: self.sync("watch"), f"hotweights-fleet-{name}")
        restore(self._entry, repository, name)
        self._interrupted: Pending | None = None
        self._draining: Target | None = None
        entry = self._entry
        if restarted and entry.committed is not None and entry.number is not None:
            self._committed, self._number = entry.committed, entry.number
            self._interrupted = entry.pending
            if entry.pending is not None and entry.pending.phase is Phase.COMMITTED:
                self._draining = entry.pending.previous
            return
        first = repository.target(name)
        if first is None:
            raise ValueError(
                f"model {name!r} has no eligible version in {repository.root} "
                f"(models there: {', '.join(repository.models()) or 'none'})"
            )
        self._committed = self._target(first, describe(first))
        self._number = first.number
        with shared.lock:
            entry.committed, entry.number, entry.pending = self._committed, first.number, None

    # -- asked by replicas and the ingress ---------------------------------------------------

    def join(self, issued: int) -> Joined:
        with self._state:
            return Joined(self._committed, self._preparing, self._draining, issued)

    def committed(self) -> int:
        with self._state:
            committed: Target = self._committed
        return committed.generation

    def _target(self, info: VersionInfo, description: str) -> Target:
        """A new generation of version `info`: an adapter's on its base's committed
        generation; a base's with a new generation for each adapter on it."""
        generation = self.shared.issue()
        if self.base is not None:
            base = self.base.committed()
            return Target(generation, info.source, description, base_generation=base)
        followers = tuple((adapter.name, self.shared.issue()) for adapter in self.adapters)
        return Target(generation, info.source, description, followers=followers)

    # -- driving ---------------------------------------------------------------------------

    def resume(self) -> dict[str, object] | None:
        """Carry on where the coordinator before this one died (see `Coordinator.resume`)."""
        with self.lock:
            pending, self._interrupted = self._interrupted, None
            if pending is None or pending.trigger == "follow":
                return None  # an adapter's follow: its base's cutover finishes it
            generation = pending.target.generation
            record = Cutover(generation, pending.number, "restart", pending.target.description)
            with self._state:
                self._cutovers.appendleft(record)
            if pending.phase is Phase.COMMITTED:
                log.info("cutover g%d was committed before a restart: finishing", generation)
                record.outcome = "committed"
                self._complete(record, pending)
                return record.to_dict()
            with self.shared.lock:
                count = self._entry.interrupted.get(pending.number, 0) + 1
                self._entry.interrupted[pending.number] = count
            why = f"the coordinator died while g{generation} prepared ({count} time(s))"
            blame = count >= INTERRUPTED_LIMIT
            return self._abort(record, pending.number, None, [why], blame=blame).to_dict()

    def poke(self) -> None:
        """Sync in the background (the watcher saw a change). Coalesced: a storm of pokes
        while a sync runs costs one more sync."""
        self._syncer.poke()

    def sync(self, trigger: str = "watch", description: str = "") -> dict[str, object] | None:
        """Scan the repository; cut over to this model's target if that is not the
        committed version. The cutover's record, or None when there was nothing to do."""
        with self.lock:
            if not self._scan().readable:
                return None
            target = self.repository.target(self.name, live=self._number)
            if target is None or target.number == self._number:
                return None
            return self._cutover(target, trigger, description).to_dict()

    def reload(self, version: int | None, description: str) -> dict[str, object] | None:
        """Pin `version` (or, with None, follow the latest eligible one again) and sync."""
        self.repository.scan()
        with self.lock:
            if version is None:
                self.repository.unpin(self.name)
            else:
                self.repository.pin(self.name, version)
                with self.shared.lock:
                    self._entry.bad.pop(version, None)
            self._remember_policy()
        return self.sync("api", description)

    def rollback(self, description: str) -> dict[str, object] | None:
        """Pin the newest eligible version older than the committed one and sync."""
        self.repository.scan()
        with self.lock:
            self.repository.rollback(self.name, live=self._number)
            self._remember_policy()
        return self.sync("rollback", description)

    # -- reporting ---------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """This model's part of `/admin/fleet`."""
        with self._state:
            committed, preparing, draining = self._committed, self._preparing, self._draining
            cutovers = [cutover.to_dict() for cutover in self._cutovers]
        bad = {
            str(info.number): info.reason
            for info in self.repository.versions(self.name)
            if info.status is VersionStatus.BAD
        }
        return {
            "model": self.name,
            "parent": self.base.name if self.base is not None else None,
            "committed": target_json(committed),
            "preparing": target_json(preparing) if preparing is not None else None,
            "draining": target_json(draining) if draining is not None else None,
            "policy": describe_policy(self.repository.policy(self.name)),
            "bad": bad,
            "last_cutover": cutovers[0] if cutovers else None,
            "cutovers": cutovers,
        }

    # -- the two phases ----------------------------------------------------------------------

    def _cutover(self, info: VersionInfo, trigger: str, description: str) -> Cutover:
        number, signature = info.number, info.signature
        target = self._target(info, description or describe(info))
        generation = target.generation
        pending = Pending(target, number, Phase.PREPARING, self._committed, trigger)
        with self.shared.lock:
            self._entry.pending = pending
            self.shared.save()  # nothing has started if this raises
        record = Cutover(generation, number, trigger, description)
        with self._state:
            self._cutovers.appendleft(record)
            self._preparing = target
        log.info("cutover g%d to %s v%d: prepare", generation, self.name, number)
        started = time.monotonic()
        self.slots.open(generation)
        try:
            answers, errors = prepare_everywhere(self.link, target, self.settings.prepare_timeout)
        finally:
            self.slots.close(generation)
            record.phases["prepare"] = time.monotonic() - started
        record.replicas = {a.replica: a.seconds for a in answers if a.fresh}
        record.windows = {a.replica: (a.started_at, a.ended_at) for a in answers if a.fresh}
        if errors or not answers:
            return self._abort(record, number, signature, errors)
        started = time.monotonic()
        try:
            self._commit(pending)
        except OSError as exc:  # not the version's fault: not marked bad
            why = f"the commit could not be recorded in {self.shared.store.where}: {exc}"
            return self._abort(record, number, signature, [why], blame=False)
        record.outcome = "committed"
        self._complete(record, pending, started)
        return record

    def _commit(self, pending: Pending) -> None:
        """The commit point: the record says the fleet committed `pending`. Raises
        `OSError` (and commits nothing) if it cannot be kept."""
        entry = self._entry
        follows = [(adapter, adapter._follow(pending.target)) for adapter in self._led(pending)]
        with self.shared.lock:
            kept = [(a, a._entry.committed, a._entry.pending) for a, _ in follows]
            entry.committed, entry.number = pending.target, pending.number
            entry.pending = replace(pending, phase=Phase.COMMITTED)
            for adapter, follow in follows:
                adapter._entry.committed, adapter._entry.pending = follow.target, follow
            interrupted = entry.interrupted.pop(pending.number, None)
            try:
                self.shared.save()
            except OSError:
                entry.committed, entry.number = self._committed, self._number
                entry.pending = pending
                for adapter, committed, before in kept:
                    adapter._entry.committed, adapter._entry.pending = committed, before
                if interrupted is not None:
                    entry.interrupted[pending.number] = interrupted
                raise
        with self._state:
            self._committed, self._number = pending.target, pending.number
            self._preparing, self._draining = None, pending.previous
        for adapter, follow in follows:
            with adapter._state:
                adapter._committed, adapter._draining = follow.target, follow.previous
        log.info("cutover g%d of %s committed", pending.target.generation, self.name)

    def _complete(self, record: Cutover, pending: Pending, started: float | None = None) -> None:
        """Flip, drain and finish a committed cutover (also one a dead coordinator left)."""
        generation, old = pending.target.generation, pending.previous.generation
        started = time.monotonic() if started is None else started
        followers = dict(pending.target.followers)
        flip_until(self.link, self.name, generation, self.settings.prepare_timeout, followers)
        record.phases["commit"] = time.monotonic() - started
        log.info("cutover g%d: draining g%d", generation, old)
        started = time.monotonic()
        try:
            record.stuck = self.link.drained(old, self.settings.config.drain_timeout)
        except Exception as exc:  # an ingress that died took its requests with it
            log.warning("cutover g%d: the ingress did not report its drain: %s", generation, exc)
        record.phases["drain"] = time.monotonic() - started
        started = time.monotonic()
        timeout = self.settings.prepare_timeout
        record.error = finish_everywhere(self.link, self.name, generation, timeout)
        record.phases["finish"] = time.monotonic() - started
        led = self._led(pending)
        for model in (self, *led):
            with model._state:
                model._draining = None
        with self.shared.lock:
            self._entry.pending = None
            for adapter in led:
                adapter._entry.pending = None
            self.shared.save_quietly()  # if lost, a restart finishes again: harmless

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
        if not errors:  # nothing answered: no replica yet, not the version's fault
            record.outcome, record.error = "skipped", "no replica was running to prepare it"
            with self.shared.lock:
                self._entry.pending = None
                self.shared.save_quietly()
            return record
        why = "; ".join(errors)
        record.outcome, record.error = "aborted", why
        log.error("cutover g%d to %s v%d aborted: %s", generation, self.name, number, why)
        try:
            self.link.abort(self.name, generation, why)
        except Exception as exc:  # each replica's held copy rolls back when its hold ends
            log.warning("cutover g%d: telling the replicas to abort failed: %s", generation, exc)
        with self.shared.lock:
            self._entry.pending = None
            if blame:
                mark = Mark(f"fleet cutover g{generation} aborted: {why}", signature)
                self.repository.mark_bad(self.name, number, mark.reason, signature=signature)
                self._entry.bad[number] = mark
            self.shared.save_quietly()  # kept before `status` shows it: a restart keeps it
        if blame:
            self.repository.scan()  # the mark counts from a scan on
        return record

    def _led(self, pending: Pending) -> list[ModelFleet]:
        """The adapters `pending` (a base's cutover) brings along."""
        named = dict(pending.target.followers)
        return [adapter for adapter in self.adapters if adapter.name in named]

    def _follow(self, base: Target) -> Pending:
        """(An adapter's.) Its committed version again, on the base's `base` (committed
        now), as the generation `base.followers` gives it: the follow the base's commit
        records, which the base's finish ends."""
        generation = dict(base.followers)[self.name]
        with self._state:
            committed, number = self._committed, self._number
        target = replace(committed, generation=generation, base_generation=base.generation)
        return Pending(target, number, Phase.COMMITTED, committed, "follow")

    def _remember_policy(self) -> None:
        policy = self.repository.policy(self.name)
        with self.shared.lock:
            self._entry.pin = policy if isinstance(policy, Pinned) else None
            self.shared.save_quietly()
