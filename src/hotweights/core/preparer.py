"""Bringing one version up beside the live one: the phases (load, validate, warm up), the
gate's judgement against the live version, and the hold that makes it a prepared version
(numbered, resident, reachable only by a pin). Used by the swap strategies, on the
reloader's worker thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from hotweights.core.gate import Gate
from hotweights.core.phases import Attempt, PhaseFailed, PhaseRunner
from hotweights.core.prepared import PreparedVersion
from hotweights.core.reload_queue import ReloadJob
from hotweights.core.reload_records import ReloadRecords
from hotweights.core.swap_policy import SwapPolicy
from hotweights.core.version import ModelVersion, VersionState

ModelT = TypeVar("ModelT")


class Preparer(Generic[ModelT]):
    """Brings versions up for one reloader. Not thread-safe: its worker calls it."""

    def __init__(
        self,
        phases: PhaseRunner[ModelT],
        records: ReloadRecords,
        gate: Gate[ModelT] | None,
    ) -> None:
        self.phases = phases
        self.records = records
        self.slot = records.slot
        self.history = records.history
        self.gate = gate

    def bring_up(
        self,
        job: ReloadJob,
        *,
        fit: SwapPolicy | None,
        baseline: Callable[[str], object] | None = None,
        earlier: float = 0.0,
    ) -> tuple[ModelVersion, ModelT, Attempt]:
        """Load, validate and warm up `job.source`, then let the gate judge it against
        `baseline(source)` (which took `earlier` seconds if measured before). With `fit`,
        refuse a version that will not fit beside what is resident under that policy.
        Raises `PhaseFailed` after cleaning up."""
        version = ModelVersion(job.source, job.description, base_generation=job.base_generation)
        resident = self.resident_bytes()

        def on_phase(phase: str) -> None:
            job.phase = phase

        def fits(estimate: int) -> None:
            if fit is not None:
                self.phases.check_fit(job.source, estimate, fit, resident)

        try:
            model, attempt = self.phases.bring_up(
                version,
                on_phase,
                lambda: self.records.transition(version, VersionState.VALIDATING),
                fits,
            )
            if self.gate is not None and baseline is not None and self.gated(job):
                job.phase = "gate"
                measure = baseline
                self.phases.judge(
                    self.gate, version, model, attempt, lambda: measure(job.source), earlier
                )
        except PhaseFailed:
            self.records.transition(version, VersionState.FAILED)
            raise
        return version, model, attempt

    def hold(
        self,
        job: ReloadJob,
        version: ModelVersion,
        model: ModelT,
        attempt: Attempt,
        previous: ModelVersion | None = None,
    ) -> PreparedVersion[ModelT]:
        """Number `version` (as `job.generation`, if given) and make it resident beside
        the live one, reachable by a pin; observers hear of it once it is reachable.
        Raises `PhaseFailed` (after unloading `model`) when its generation was taken
        meanwhile: a prepare numbered by its caller lost to a version numbered next."""
        try:
            self.history.number(version, job.generation)
            self.slot.hold(version, model)
        except ValueError as exc:
            self.phases.unload_quietly(model, version)
            self.records.transition(version, VersionState.FAILED)
            raise PhaseFailed("prepare", exc, attempt) from exc
        self.records.version_changed(version, VersionState.VALIDATING, VersionState.PREPARED)
        job.phase = "prepared"
        return PreparedVersion(
            self.records.name, version, self.slot, self.records, job, attempt, previous=previous
        )

    def gated(self, job: ReloadJob) -> bool:
        """Whether `job` passes the gate: new versions do; rollbacks (an operator's way
        back to a version that served) and an adapter following its base do not."""
        return self.gate is not None and job.trigger not in ("rollback", "follow")

    def measure_live(self, source: str) -> object:
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

    def resident_bytes(self) -> int:
        return sum(version.size_bytes or 0 for version in self.slot.resident())
