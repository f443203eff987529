"""What a reloader writes down: each attempt's `ReloadEvent` in the log, the notices its
observers get, and the drains it leaves running after a swap (which add their time to the
event once the old version is unloaded)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any

from hotweights.core.bake import figures
from hotweights.core.events import Outcome, ReloadEvent, ReloadLog
from hotweights.core.gate import GateRefused
from hotweights.core.history import VersionHistory
from hotweights.core.observers import ObserverList, ReloadFinished, VersionChanged
from hotweights.core.phases import Attempt, PhaseFailed
from hotweights.core.prepared import PreparedVersion
from hotweights.core.reload_queue import ReloadJob
from hotweights.core.slot import ModelSlot
from hotweights.core.version import ModelVersion, VersionState

log = logging.getLogger("hotweights.reload")

FAILURES = (Outcome.FAILED, Outcome.GATED, Outcome.CANARY_FAILED)


class ReloadRecords:
    """The log, the observers and the drains of one reloader. Thread-safe."""

    def __init__(
        self,
        name: str,
        slot: ModelSlot[Any],
        history: VersionHistory,
        log: ReloadLog,
        drain_timeout: float,
    ) -> None:
        self.name = name
        self.slot = slot
        self.history = history
        self.log = log
        self.observers = ObserverList()
        self.drain_timeout = drain_timeout
        self._lock = threading.Lock()
        self._drains: set[threading.Thread] = set()

    def event(
        self,
        job: ReloadJob,
        outcome: Outcome,
        *,
        version: ModelVersion | None = None,
        error: BaseException | str | None = None,
        attempt: Attempt | None = None,
        phase: str | None = None,
    ) -> ReloadEvent:
        """The event of `job` ending with `outcome` (not recorded yet)."""
        attempt = attempt or Attempt()
        error_type = error_message = None
        if isinstance(error, BaseException):
            error_type = type(error).__name__
            where = f"{phase}: " if phase else ""
            error_message = f"{where}{error}" if str(error) else f"{where}{error_type}"
        elif error is not None:
            error_message = error
        return ReloadEvent(
            id=job.id,
            trigger=job.trigger,
            target=job.source,
            outcome=outcome,
            old_generation=(
                self.history.generation if job.old_generation is None else job.old_generation
            ),
            new_generation=version.generation if version is not None else None,
            description=job.description,
            error_type=error_type,
            error_message=error_message,
            started_at=job.accepted_at,
            ended_at=time.time(),
            phases=dict(attempt.phases),
            memory_estimate_bytes=attempt.estimate,
            retries=attempt.retries,
            fingerprint=version.fingerprint if version is not None else None,
            gate=attempt.verdict.checks if attempt.verdict is not None else (),
        )

    def failed(self, job: ReloadJob, failure: PhaseFailed) -> ReloadEvent:
        """The event of a bring-up that failed in one of its phases."""
        outcome = Outcome.GATED if isinstance(failure.cause, GateRefused) else Outcome.FAILED
        return self.event(
            job, outcome, error=failure.cause, attempt=failure.attempt, phase=failure.phase
        )

    def record(self, event: ReloadEvent) -> None:
        """Log `event` and tell the observers."""
        self.log.record(event)
        if event.outcome in FAILURES:
            log.error(
                "%s: reload %d of %s failed: %s",
                self.name,
                event.id,
                event.target,
                event.error_message,
            )
        self.observers.notify(ReloadFinished(self.name, event))

    def finish(self, job: ReloadJob, event: ReloadEvent, *also: ReloadEvent) -> None:
        """Record `event` (and `also`, a restore that followed it) and end `job` with it,
        unless its caller already has an answer (a prepare's ticket)."""
        for done in (event, *also):
            self.record(done)
        if not job.future.done():
            job.future.set_result(event)

    def committed(
        self, handle: PreparedVersion[Any], old: int | None, *, record: bool = True
    ) -> ReloadEvent:
        """Write down that `handle` went live (it replaced `old`, which now drains) and
        settle it. With `record` False the caller records the event itself."""
        outcome = Outcome.ROLLED_BACK if handle.job.trigger == "rollback" else Outcome.LIVE
        event = self._decided(handle, outcome, version=handle.version)
        log.info("%s: %s is live (%s)", self.name, handle.version.label, handle.reason)
        if record:
            self.record(event)
        if old is not None:  # after the record and notice, which the drain updates
            self.drain_later(old, event.id)
        handle.settle(event)
        return event

    def discarded(self, handle: PreparedVersion[Any]) -> ReloadEvent:
        """The event of a discarded `handle` (a canary's says it was rolled back)."""
        generation = handle.generation
        if handle.monitor is not None:
            outcome, error = Outcome.CANARY_FAILED, f"canary g{generation} rolled back"
        else:
            outcome, error = Outcome.DISCARDED, f"g{generation} discarded"
        event = self._decided(handle, outcome, error=f"{error}: {handle.reason}")
        return dataclasses.replace(event, fingerprint=handle.version.fingerprint)

    def _decided(
        self,
        handle: PreparedVersion[Any],
        outcome: Outcome,
        *,
        version: ModelVersion | None = None,
        error: str | None = None,
    ) -> ReloadEvent:
        if handle.bake_started is not None:
            handle.attempt.phases["bake"] = time.monotonic() - handle.bake_started
        event = self.event(
            handle.job, outcome, version=version, error=error, attempt=handle.attempt
        )
        return dataclasses.replace(event, canary=figures(handle))

    def version_changed(self, version: ModelVersion, old: VersionState, new: VersionState) -> None:
        self.observers.notify(VersionChanged(self.name, version, old, new))

    def transition(self, version: ModelVersion, new: VersionState) -> None:
        old = version.transition(new)
        self.version_changed(version, old, new)

    def drain_later(self, generation: int, event_id: int) -> None:
        """Drain `generation` on a thread of its own; its time joins event `event_id`."""

        def drain() -> None:
            try:
                report = self.slot.drain(generation, self.drain_timeout)
            except Exception:
                log.exception("%s: draining g%d failed", self.name, generation)
                return
            finally:
                with self._lock:
                    self._drains.discard(threading.current_thread())
            if report.stuck_leases:
                log.warning(
                    "%s: g%d retired at its drain deadline with %d requests still running",
                    self.name,
                    generation,
                    report.stuck_leases,
                )
            event = self.log.get(event_id)
            if event is not None:
                updated = event.with_phase("drain", report.seconds)
                self.log.replace(updated)
                self.observers.notify(ReloadFinished(self.name, updated, drained=True))

        thread = threading.Thread(
            target=drain, name=f"hotweights-drain-{self.name}-g{generation}", daemon=True
        )
        with self._lock:
            self._drains.add(thread)
        thread.start()

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Wait for every drain started so far; True if all finished in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            drains = list(self._drains)
        for thread in drains:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in drains)
