"""The reloader: brings new versions into service off the request path.

One worker thread per reloader runs each attempt through load, validate, warmup, the gate
(when there is one), publish (or, with a canary policy, bake beside the live version, then
promote or roll back), drain and retire. Requests are single-flight: a request for
the target already loading or already queued joins it; a request for another target
replaces the queued one (which ends `superseded`). At most one load runs and one waits,
whatever the number of triggers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from hotweights.core.canary import Bake, CanaryMonitor, CanaryPolicy
from hotweights.core.events import DEFAULT_MAX_EVENTS, Outcome, ReloadEvent, ReloadLog, Trigger
from hotweights.core.gate import Gate, GateRefused
from hotweights.core.history import DEFAULT_MAX_HISTORY, VersionHistory
from hotweights.core.loader import Loader
from hotweights.core.memory import MemoryCheck
from hotweights.core.observers import (
    Observer,
    ObserverList,
    ReloadFinished,
    ReloadStarted,
    VersionChanged,
)
from hotweights.core.phases import Attempt, PhaseFailed, PhaseRunner
from hotweights.core.slot import Lease, ModelSlot
from hotweights.core.swap_policy import RetryPolicy, SwapPolicy
from hotweights.core.version import ModelVersion, VersionState
from hotweights.errors import NoCanary, NoPreviousVersion, ReloaderClosed

ModelT = TypeVar("ModelT")
log = logging.getLogger("hotweights.reload")


@dataclass
class _Job:
    id: int
    source: str
    trigger: Trigger
    description: str
    accepted_at: float = field(default_factory=time.time)
    future: Future[ReloadEvent] = field(default_factory=Future)
    phase: str = "queued"
    old_generation: int | None = None
    generation: int | None = None
    """The generation to go live as (a fleet's number); None: the next one."""


class ReloadTicket:
    """A handle on an accepted reload request: its event id and, later, its outcome."""

    def __init__(self, job: _Job) -> None:
        self.id = job.id
        self.target = job.source
        self._future = job.future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> ReloadEvent:
        """Block until the attempt ends; raises `TimeoutError` if it does not in time."""
        return self._future.result(timeout)

    async def wait_async(self) -> ReloadEvent:
        return await asyncio.wrap_future(self._future)


class Reloader(Generic[ModelT]):
    """Owns one model's slot, history and reload log, and the worker that changes them.

    Thread-safe. `submit`, `reload`, `reload_async` and `rollback` may be called from any
    thread or the event loop; none of them runs loader code on the caller's thread.
    """

    def __init__(
        self,
        loader: Loader[ModelT],
        *,
        name: str = "default",
        policy: SwapPolicy = "availability",
        drain_timeout: float = 30.0,
        admission_timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        max_history: int = DEFAULT_MAX_HISTORY,
        max_events: int = DEFAULT_MAX_EVENTS,
        phase_timeout: float | None = None,
        memory: MemoryCheck | None = None,
        gate: Gate[ModelT] | None = None,
        canary: CanaryPolicy | None = None,
    ) -> None:
        self.loader = loader
        self.gate = gate
        """Judges each new version before it goes live; rollbacks and restores skip it."""
        if canary is not None and policy != "availability":
            raise ValueError("a canary needs the availability policy (two versions resident)")
        self.canary = canary
        """Bakes each new version on a share of requests before it takes them all."""
        self._bake: Bake | None = None
        self.name = name
        self.policy: SwapPolicy = policy
        self.drain_timeout = drain_timeout
        self.retry = retry or RetryPolicy()
        self.history = VersionHistory(max_history)
        self.log = ReloadLog(max_events)
        self.observers = ObserverList()
        self.slot: ModelSlot[ModelT] = ModelSlot(
            loader.unload, admission_timeout=admission_timeout, on_state=self._version_changed
        )
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running: _Job | None = None
        self._pending: _Job | None = None
        self._closed = False
        self._stop = threading.Event()
        self._phases = PhaseRunner(
            loader, retry=self.retry, phase_timeout=phase_timeout, memory=memory, stop=self._stop
        )
        self._drains: set[threading.Thread] = set()
        self._worker = threading.Thread(
            target=self._work, name=f"hotweights-reloader-{name}", daemon=True
        )
        self._worker.start()

    # -- requests -----------------------------------------------------------------------

    def submit(
        self,
        source: str,
        *,
        trigger: Trigger = "api",
        description: str = "",
        generation: int | None = None,
    ) -> ReloadTicket:
        """Accept a request to make `source` live; returns at once with a ticket. With
        `generation`, it goes live (or bakes) as that generation, which must be ahead of
        every one so far (`ValueError` otherwise): a fleet replica takes the fleet's
        numbers, so every replica names a version alike."""
        superseded: _Job | None = None
        with self._lock:
            if self._closed:
                raise ReloaderClosed(f"reloader for {self.name!r} is closed")
            if generation is not None and generation <= self.history.generation:
                raise ValueError(
                    f"{self.name}: generation {generation} is not after "
                    f"generation {self.history.generation}"
                )
            for job in (self._running, self._pending):
                if job is not None and job.source == source and job.generation == generation:
                    return ReloadTicket(job)
            superseded = self._pending
            job = _Job(next(self._ids), source, trigger, description, generation=generation)
            self._pending = job
            self._wake.notify()
        if superseded is not None:
            self._finish(
                superseded,
                self._event(superseded, Outcome.SUPERSEDED, error=f"superseded by {source}"),
            )
        return ReloadTicket(job)

    def reload(
        self,
        source: str,
        *,
        trigger: Trigger = "api",
        description: str = "",
        timeout: float | None = None,
        generation: int | None = None,
    ) -> ReloadEvent:
        """Make `source` live and return the outcome (blocking); `generation` as `submit`."""
        ticket = self.submit(
            source, trigger=trigger, description=description, generation=generation
        )
        return ticket.wait(timeout)

    async def reload_async(
        self, source: str, *, trigger: Trigger = "api", description: str = ""
    ) -> ReloadEvent:
        """`reload` for the event loop."""
        return await self.submit(source, trigger=trigger, description=description).wait_async()

    def rollback(self, *, description: str = "") -> ReloadTicket:
        """Make the most recent earlier version (by source) live again, as a new
        generation; during a canary's bake, roll the canary back instead (its ticket).
        Raises `NoPreviousVersion` when the history holds none."""
        with contextlib.suppress(NoCanary):
            return self.end_bake(promote=False, reason=description or "rolled back by an operator")
        target = self.history.rollback_target()
        if target is None:
            raise NoPreviousVersion(f"model {self.name!r} has no earlier version to roll back to")
        text = description or f"rollback to g{target.generation}"
        return self.submit(target.source, trigger="rollback", description=text)

    def promote(self, *, reason: str = "promoted by an operator") -> ReloadTicket:
        """End the canary's bake now and make it live; the ticket of its reload. Raises
        `NoCanary` when none is baking."""
        return self.end_bake(promote=True, reason=reason)

    def end_bake(self, *, promote: bool, reason: str) -> ReloadTicket:
        """Decide the bake in progress now; raises `NoCanary` if none is baking or it was
        already decided."""
        with self._lock:
            bake, job = self._bake, self._running
        if bake is None or job is None or not bake.end(promote, reason):
            raise NoCanary(f"model {self.name!r} has no canary baking")
        return ReloadTicket(job)

    def record(self, generation: int, *, ok: bool, seconds: float, tokens: int = 0) -> None:
        """One finished request (the server calls this on the request path): counted
        toward the canary's judgement while one bakes, ignored otherwise."""
        bake = self._bake
        if bake is not None:
            bake.monitor.record(generation, ok, seconds, tokens)

    async def retry_on_stable(
        self, lease: Lease[ModelT], *, seconds: float
    ) -> Lease[ModelT] | None:
        """An unpinned request failed on `lease` before its first byte. If the lease is on
        a canary (the only way such a request gets a version newer than the live one),
        count the failure against the canary, release the lease and return a lease on the
        stable version: a bad canary costs latency, not failures. Otherwise return None
        and leave the lease alone (the caller answers with the error)."""
        live = self.slot.live_version
        if live is None or lease.generation <= live.generation:
            return None
        self.record(lease.generation, ok=False, seconds=seconds)
        lease.release()
        return await self.slot.acquire_async(stable=True)

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Call `observer` with every `Notice`; returns a function that unsubscribes."""
        return self.observers.add(observer)

    # -- what the server may ask ---------------------------------------------------------

    async def acquire_async(self, *, stable: bool = False) -> Lease[ModelT]:
        """Lease the live version, or the canary for its share of requests; with `stable`
        never the canary (see `ModelSlot.acquire_async`)."""
        return await self.slot.acquire_async(stable=stable)

    def acquire_resident(self, choose: Callable[[ModelVersion], bool]) -> Lease[ModelT] | None:
        """Lease the newest resident version `choose` accepts (see `ModelSlot`)."""
        return self.slot.acquire_resident(choose)

    @property
    def live_version(self) -> ModelVersion | None:
        return self.slot.live_version

    @property
    def canary_version(self) -> ModelVersion | None:
        """The version baking as a canary, if one is."""
        return self.slot.canary_version

    def resident(self) -> list[ModelVersion]:
        """Versions with a loaded model: the live one and those still draining."""
        return self.slot.resident()

    def inflight(self) -> dict[int, int]:
        """Leases held now, by generation."""
        return self.slot.inflight()

    def versions(self) -> list[ModelVersion]:
        """The versions that went live, oldest first (bounded)."""
        return self.history.history()

    def last_live(self) -> ModelVersion | None:
        """The version that went live last, even if it is no longer resident."""
        return self.history.current_version()

    def models(self) -> list[tuple[ModelVersion, ModelT]]:
        """The resident versions with their loaded models, newest first (for status)."""
        return self.slot.resident_models()

    @property
    def generation(self) -> int:
        return self.history.generation

    def status(self) -> dict[str, object]:
        """A JSON-ready snapshot: live version, in-flight leases, reload in progress."""
        with self._lock:
            running = _job_status(self._running)
            queued = _job_status(self._pending)
        live = self.slot.live_version
        bake = self._bake
        canary = self.slot.canary_version
        return {
            "canary": (
                {
                    "version": canary.to_dict(),
                    "share": self.canary.share if self.canary else None,
                    **bake.monitor.figures(),
                }
                if canary is not None and bake is not None
                else None
            ),
            "model": self.name,
            "policy": self.policy,
            "generation": self.history.generation,
            "live": live.to_dict() if live else None,
            "inflight": {str(gen): n for gen, n in self.slot.inflight().items()},
            "resident": [version.generation for version in self.slot.resident()],
            "reloading": running,
            "queued": queued,
        }

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Wait for every drain started so far; True if all finished in time."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            drains = list(self._drains)
        for thread in drains:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in drains)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, end the queued one, let the running one finish, then
        drain and unload whatever is live. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = self._pending, None
            bake = self._bake
            self._wake.notify()
        if bake is not None:
            bake.end(False, "the reloader is closing")
        self._stop.set()
        if pending is not None:
            self._finish(pending, self._event(pending, Outcome.SUPERSEDED, error="closed"))
        self._worker.join(timeout)
        old = self.slot.withdraw()
        self.slot.end_gap()
        if old is not None:
            self.slot.drain(old, self.drain_timeout)
        self.wait_drained(timeout)

    # -- the worker ---------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                if self._pending is None:
                    return
                job, self._pending = self._pending, None
                live = self.slot.live_version
                job.old_generation = live.generation if live is not None else 0
                self._running = job
            self.observers.notify(ReloadStarted(self.name, job.id, job.source, job.trigger))
            retiring: int | None = None
            restored: ReloadEvent | None = None
            try:
                event, retiring, restored = self._run(job)
            except Exception as exc:  # a bug in the reloader itself: never kill the worker
                log.exception("reload %d of %s crashed", job.id, self.name)
                event = self._event(job, Outcome.FAILED, error=exc)
                if self.slot.in_gap and self.slot.live_version is None:
                    self.slot.end_gap()  # never leave admissions waiting on nothing
            with self._lock:
                self._running = None
            try:
                self._finish(job, event, retiring, restored)
            except Exception as exc:  # never leave a caller waiting on a dead worker
                log.exception("finishing reload %d of %s crashed", job.id, self.name)
                if not job.future.done():
                    job.future.set_exception(exc)

    def _run(self, job: _Job) -> tuple[ReloadEvent, int | None, ReloadEvent | None]:
        """Run one attempt. Returns its event, the generation left to drain (if any) and
        the event of a restore that followed a failure (if any)."""
        if self.policy == "resource":
            return self._run_resource(job)
        try:
            version, model, attempt = self._bring_up(job, baseline=self._measure_live)
        except PhaseFailed as failure:
            return self._failed(job, failure), None, None
        if self.canary is not None and job.trigger != "rollback" and self.slot.live_version:
            return self._bake_canary(self.canary, job, version, model, attempt)
        old = self._go_live(version, model, job.generation)
        return self._event(job, self._success(job), version=version, attempt=attempt), old, None

    def _bake_canary(
        self,
        policy: CanaryPolicy,
        job: _Job,
        version: ModelVersion,
        model: ModelT,
        attempt: Attempt,
    ) -> tuple[ReloadEvent, int, None]:
        """Give `version` its share of new requests beside the live one until the bake
        ends; then promote it (the old version drains) or roll it back (it drains and is
        unloaded). Returns the event and the generation to drain."""
        stable = self.slot.live_version
        if stable is None:  # pragma: no cover - the caller checked, and only it swaps
            raise RuntimeError("a canary needs a live version")
        self.history.go_live(version, VersionState.CANARY, job.generation)
        bake = Bake(
            CanaryMonitor(
                policy,
                stable.generation,
                version.generation,
                on_breach=lambda reason: bake.end(False, reason),
            )
        )
        with self._lock:  # decidable (promote, end_bake) before anyone can see it
            self._bake = bake
            closing = self._closed
        self.slot.publish_canary(version, model, policy.share)
        # Told after it is reachable: an observer may pin a request to it at once.
        self._version_changed(version, VersionState.VALIDATING, VersionState.CANARY)
        if closing:
            bake.end(False, "the reloader is closing")
        job.phase = "bake"
        log.info(
            "%s: %s takes %g%% of new requests for %g s",
            self.name,
            version.label,
            policy.share * 100,
            policy.bake_seconds,
        )
        started = time.monotonic()
        bake.wait(policy.bake_seconds, promote=policy.promote_when_baked)
        attempt.phases["bake"] = time.monotonic() - started
        with self._lock:
            self._bake = None
        figures: dict[str, object] = {
            "share": policy.share,
            "decision": "promoted" if bake.promote else "rolled back",
            "reason": bake.reason,
            **bake.monitor.figures(),
        }
        if bake.promote:
            old = self.slot.promote_canary()
            log.info("%s: canary %s promoted: %s", self.name, version.label, bake.reason)
            event = self._event(job, Outcome.LIVE, version=version, attempt=attempt)
            return dataclasses.replace(event, canary=figures), old, None
        withdrawn = self.slot.withdraw_canary()
        self.history.withdraw(version)
        error = f"canary g{version.generation} rolled back: {bake.reason}"
        event = self._event(job, Outcome.CANARY_FAILED, error=error, attempt=attempt)
        event = dataclasses.replace(event, canary=figures, fingerprint=version.fingerprint)
        return event, withdrawn, None

    def _run_resource(self, job: _Job) -> tuple[ReloadEvent, None, ReloadEvent | None]:
        # Refuse what cannot fit even with the live version gone, before taking it down.
        probe, attempt = ModelVersion(job.source), Attempt()
        try:
            self._phases.describe(probe, attempt)
            if attempt.estimate is not None:
                self._phases.check_fit(
                    job.source, attempt.estimate, "resource", self._resident_bytes()
                )
        except Exception as exc:
            return (
                self._event(job, Outcome.FAILED, error=exc, attempt=attempt, phase="load"),
                None,
                None,
            )
        measured: object = None
        measured_in = 0.0
        if self._gated(job):
            started = time.monotonic()
            try:  # the live version is about to go: measure it now
                measured = self._measure_live(job.source)
                measured_in = time.monotonic() - started
            except Exception as exc:
                event = self._event(job, Outcome.FAILED, error=exc, attempt=attempt, phase="gate")
                return event, None, None
        previous = self.slot.live_version
        old = self.slot.withdraw()
        drain_s = self.slot.drain(old, self.drain_timeout).seconds if old is not None else 0.0
        try:
            version, model, attempt = self._bring_up(
                job, check_fit=False, baseline=lambda _: measured, earlier=measured_in
            )
        except PhaseFailed as failure:
            event = self._failed(job, failure)
            restored = self._restore(previous) if previous is not None else None
            self.slot.end_gap()
            return event.with_phase("drain", drain_s), None, restored
        self._go_live(version, model, job.generation)
        event = self._event(job, self._success(job), version=version, attempt=attempt)
        return event.with_phase("drain", drain_s), None, None

    def _restore(self, previous: ModelVersion) -> ReloadEvent:
        """Under `resource`, the old version was unloaded before the failed load: bring its
        source back so something serves again."""
        text = f"restore g{previous.generation} after a failed reload"
        job = _Job(next(self._ids), previous.source, "rollback", text)
        job.old_generation = self.history.generation
        try:
            version, model, attempt = self._bring_up(job)
        except PhaseFailed as failure:
            log.error("%s: restoring %s failed too", self.name, previous.label)
            return self._failed(job, failure)
        self._go_live(version, model)
        return self._event(job, Outcome.ROLLED_BACK, version=version, attempt=attempt)

    def _bring_up(
        self,
        job: _Job,
        check_fit: bool = True,
        baseline: Callable[[str], object] | None = None,
        earlier: float = 0.0,
    ) -> tuple[ModelVersion, ModelT, Attempt]:
        """Load, validate and warm up `job.source`, then let the gate judge it against
        `baseline(source)` (which took `earlier` seconds if measured before); raise
        `PhaseFailed` after cleaning up. Under `availability` the new version must fit
        beside what is resident."""
        version = ModelVersion(job.source, job.description)
        resident = self._resident_bytes()

        def on_phase(phase: str) -> None:
            job.phase = phase

        def fits(estimate: int) -> None:
            if check_fit:
                self._phases.check_fit(job.source, estimate, self.policy, resident)

        try:
            model, attempt = self._phases.bring_up(
                version,
                on_phase,
                lambda: self._transition(version, VersionState.VALIDATING),
                fits,
            )
            if self.gate is not None and baseline is not None and self._gated(job):
                job.phase = "gate"
                measure = baseline
                self._phases.judge(
                    self.gate, version, model, attempt, lambda: measure(job.source), earlier
                )
        except PhaseFailed:
            self._fail(version)
            raise
        job.phase = "publish"
        return version, model, attempt

    def _gated(self, job: _Job) -> bool:
        """Whether `job` passes the gate: new versions do, rollbacks and restores (an
        operator's way back to a version that served) do not."""
        return self.gate is not None and job.trigger != "rollback"

    def _measure_live(self, source: str) -> object:
        """The gate's baseline for `source` on the live version, leased for the call (or
        on nothing, when none is live)."""
        gate = self.gate
        if gate is None:
            return None
        live = self.slot.live_version
        lease = self.slot.acquire_resident(lambda v: v is live) if live is not None else None
        if lease is None:
            return gate.baseline(source, None)
        with lease, lease.use() as model:
            return gate.baseline(source, model)

    def _resident_bytes(self) -> int:
        return sum(version.size_bytes or 0 for version in self.slot.resident())

    def _go_live(
        self, version: ModelVersion, model: ModelT, generation: int | None = None
    ) -> int | None:
        self.history.go_live(version, generation=generation)
        self._version_changed(version, VersionState.VALIDATING, VersionState.LIVE)
        old = self.slot.publish(version, model)
        log.info("%s: %s is live", self.name, version.label)
        return old

    def _drain_later(self, generation: int, event_id: int) -> None:
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

    # -- bookkeeping --------------------------------------------------------------------

    def _success(self, job: _Job) -> Outcome:
        return Outcome.ROLLED_BACK if job.trigger == "rollback" else Outcome.LIVE

    def _failed(self, job: _Job, failure: PhaseFailed) -> ReloadEvent:
        outcome = Outcome.GATED if isinstance(failure.cause, GateRefused) else Outcome.FAILED
        return self._event(
            job, outcome, error=failure.cause, attempt=failure.attempt, phase=failure.phase
        )

    def _event(
        self,
        job: _Job,
        outcome: Outcome,
        *,
        version: ModelVersion | None = None,
        error: BaseException | str | None = None,
        attempt: Attempt | None = None,
        phase: str | None = None,
    ) -> ReloadEvent:
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

    def _finish(
        self,
        job: _Job,
        event: ReloadEvent,
        retiring: int | None = None,
        restored: ReloadEvent | None = None,
    ) -> None:
        for done in (event, restored):
            if done is None:
                continue
            self.log.record(done)
            if done.outcome in (Outcome.FAILED, Outcome.GATED, Outcome.CANARY_FAILED):
                log.error(
                    "%s: reload %d of %s failed: %s",
                    self.name,
                    done.id,
                    done.target,
                    done.error_message,
                )
            self.observers.notify(ReloadFinished(self.name, done))
        if retiring is not None:  # after the record and notice, which the drain updates
            self._drain_later(retiring, event.id)
        if not job.future.done():
            job.future.set_result(event)

    def _fail(self, version: ModelVersion) -> None:
        self._transition(version, VersionState.FAILED)

    def _transition(self, version: ModelVersion, new: VersionState) -> None:
        old = version.transition(new)
        self._version_changed(version, old, new)

    def _version_changed(self, version: ModelVersion, old: VersionState, new: VersionState) -> None:
        self.observers.notify(VersionChanged(self.name, version, old, new))


def _job_status(job: _Job | None) -> dict[str, object] | None:
    if job is None:
        return None
    return {"id": job.id, "target": job.source, "trigger": job.trigger, "phase": job.phase}
