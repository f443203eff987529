"""The swap policies as strategies: how a version is prepared, and what a discard owes.

- `Availability` (the default) brings the new version up beside the live one, which serves
  throughout (about 2x memory). Nothing has to come back after a failure or a discard.
- `Resource` drains and unloads the live version first, so that the new one loads into
  its memory (about 1x); requests arriving meanwhile wait in admission. There is no
  "beside": a failed prepare, or a discard, must bring the old version back.

`make_strategy` picks one by its `SwapPolicy` name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from hotweights.core.events import Outcome, ReloadEvent
from hotweights.core.phases import Attempt, PhaseFailed
from hotweights.core.prepared import PreparedVersion
from hotweights.core.preparer import Preparer
from hotweights.core.reload_queue import ReloadJob
from hotweights.core.swap_policy import SwapPolicy
from hotweights.core.version import ModelVersion

ModelT = TypeVar("ModelT")


@dataclass(frozen=True)
class PrepareFailed:
    """A prepare that did not produce a version: its event, and under `resource` the
    version that was unloaded for it and must be brought back."""

    event: ReloadEvent
    restore: ModelVersion | None = None


class SwapStrategy(Protocol[ModelT]):
    """How one reloader prepares versions. Called on its worker thread only."""

    policy: SwapPolicy

    def prepare(self, job: ReloadJob) -> PreparedVersion[ModelT] | PrepareFailed:
        """Bring `job.source` up as a prepared version, or say why not."""
        ...


class Availability(Generic[ModelT]):
    """Load beside the live version; it serves, untouched, until the commit."""

    policy: SwapPolicy = "availability"

    def __init__(self, preparer: Preparer[ModelT]) -> None:
        self.preparer = preparer

    def prepare(self, job: ReloadJob) -> PreparedVersion[ModelT] | PrepareFailed:
        preparer = self.preparer
        try:
            version, model, attempt = preparer.bring_up(
                job, fit=self.policy, baseline=preparer.measure_live
            )
            return preparer.hold(job, version, model, attempt)
        except PhaseFailed as failure:
            return PrepareFailed(preparer.records.failed(job, failure))


class Resource(Generic[ModelT]):
    """Drain and unload the live version, then load into its memory."""

    policy: SwapPolicy = "resource"

    def __init__(self, preparer: Preparer[ModelT], drain_timeout: float) -> None:
        self.preparer = preparer
        self.drain_timeout = drain_timeout

    def prepare(self, job: ReloadJob) -> PreparedVersion[ModelT] | PrepareFailed:
        preparer, records, slot = self.preparer, self.preparer.records, self.preparer.slot
        # Refuse what cannot fit even with the live version gone, before taking it down.
        probe, attempt = ModelVersion(job.source), Attempt()
        try:
            preparer.phases.describe(probe, attempt)
            if attempt.estimate is not None:
                preparer.phases.check_fit(
                    job.source, attempt.estimate, self.policy, preparer.resident_bytes()
                )
        except Exception as exc:
            event = records.event(job, Outcome.FAILED, error=exc, attempt=attempt, phase="load")
            return PrepareFailed(event)
        measured: object = None
        measured_in = 0.0
        if preparer.gated(job):
            started = time.monotonic()
            try:  # the live version is about to go: measure it now
                measured = preparer.measure_live(job.source)
                measured_in = time.monotonic() - started
            except Exception as exc:
                event = records.event(job, Outcome.FAILED, error=exc, attempt=attempt, phase="gate")
                return PrepareFailed(event)
        previous = slot.live_version
        old = slot.withdraw()
        drain_s = slot.drain(old, self.drain_timeout).seconds if old is not None else 0.0
        try:
            version, model, attempt = preparer.bring_up(
                job, fit=None, baseline=lambda _: measured, earlier=measured_in
            )
            attempt.phases["drain"] = drain_s
            return preparer.hold(job, version, model, attempt, previous=previous)
        except PhaseFailed as failure:
            event = records.failed(job, failure).with_phase("drain", drain_s)
            return PrepareFailed(event, restore=previous)


def make_strategy(
    policy: SwapPolicy, preparer: Preparer[ModelT], drain_timeout: float
) -> SwapStrategy[ModelT]:
    """The strategy named `policy`."""
    if policy == "availability":
        return Availability(preparer)
    if policy == "resource":
        return Resource(preparer, drain_timeout)
    raise ValueError(f"unknown swap policy {policy!r}; expected availability or resource")
