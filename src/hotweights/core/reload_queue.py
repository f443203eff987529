"""The reloader's job queue: single flight, with tickets for the callers.

At most one job runs and one waits. A request for the target already running or queued
(same source, same kind, same given generation) joins that job and shares its ticket; any
other request replaces the queued job, which ends `superseded`. A storm of triggers costs
at most one load in progress plus one queued.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

from hotweights.core.events import ReloadEvent, Trigger
from hotweights.errors import ReloaderClosed

JobKind = Literal["reload", "prepare"]
"""`reload`: prepare, then commit (or bake as a canary); `prepare`: prepare and hold
until a caller commits or discards it."""


@dataclass
class ReloadJob:
    """One accepted request, from the queue to its outcome."""

    id: int
    source: str
    trigger: Trigger
    description: str
    kind: JobKind = "reload"
    generation: int | None = None
    """The generation to serve as (a fleet's number); None: the next one."""
    hold_seconds: float | None = None
    """For `prepare`: how long the prepared version waits for a decision."""
    base_generation: int | None = None
    """For an adapter: the base model's generation to prepare it on (None: the live one)."""
    follower_generations: tuple[tuple[str, int], ...] = ()
    """For a base model: the generation each model that follows it (by name) gets on this
    version (a fleet numbers them); a follower not named takes its own next one."""
    accepted_at: float = field(default_factory=time.time)
    future: Future[Any] = field(default_factory=Future)
    phase: str = "queued"
    old_generation: int | None = None
    decided: bool = False
    """Its version was committed or discarded: a new request for it is a new job."""

    def joins(
        self, source: str, kind: JobKind, generation: int | None, base_generation: int | None
    ) -> bool:
        mine = (self.source, self.kind, self.generation, self.base_generation)
        return mine == (source, kind, generation, base_generation) and not self.decided


class ReloadTicket:
    """A handle on an accepted reload request: its event id and, later, its outcome."""

    def __init__(self, job: ReloadJob) -> None:
        self.id = job.id
        self.target = job.source
        self._future: Future[ReloadEvent] = job.future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> ReloadEvent:
        """Block until the attempt ends; raises `TimeoutError` if it does not in time."""
        return self._future.result(timeout)

    async def wait_async(self) -> ReloadEvent:
        return await asyncio.wrap_future(self._future)


@dataclass(frozen=True)
class JobStatus:
    """A job running or queued, for status."""

    id: int
    target: str
    trigger: Trigger
    phase: str
    kind: JobKind

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "target": self.target, "trigger": self.trigger, "phase": self.phase}


class ReloadQueue:
    """One running job and one queued. Thread-safe; `take` is for the worker alone."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._running: ReloadJob | None = None
        self._pending: ReloadJob | None = None
        self._closed = False

    def new_job(self, source: str, trigger: Trigger, description: str) -> ReloadJob:
        """A job that does not go through the queue (the restore after a failure)."""
        return ReloadJob(next(self._ids), source, trigger, description)

    def put(
        self,
        source: str,
        trigger: Trigger,
        description: str,
        *,
        kind: JobKind = "reload",
        generation: int | None = None,
        hold_seconds: float | None = None,
        after: int = 0,
        base_generation: int | None = None,
        follower_generations: tuple[tuple[str, int], ...] = (),
    ) -> tuple[ReloadJob, ReloadJob | None]:
        """Queue a request (or join the same one); returns its job and the job it
        superseded, which the caller must end. `generation` must exceed `after`."""
        with self._lock:
            if self._closed:
                raise ReloaderClosed(f"reloader for {self.name!r} is closed")
            if generation is not None and generation <= after:
                raise ValueError(
                    f"{self.name}: generation {generation} is not after generation {after}"
                )
            for job in (self._running, self._pending):
                if job is not None and job.joins(source, kind, generation, base_generation):
                    return job, None
            superseded = self._pending
            self._pending = ReloadJob(
                next(self._ids),
                source,
                trigger,
                description,
                kind=kind,
                generation=generation,
                hold_seconds=hold_seconds,
                base_generation=base_generation,
                follower_generations=follower_generations,
            )
            self._wake.notify()
            return self._pending, superseded

    def take(self) -> ReloadJob | None:
        """Block until a job is queued and make it the running one; None once closed."""
        with self._lock:
            while self._pending is None and not self._closed:
                self._wake.wait()
            job, self._pending = self._pending, None
            self._running = job
            return job

    def done(self) -> None:
        with self._lock:
            self._running = None

    def close(self) -> ReloadJob | None:
        """Refuse new requests and wake the worker; returns the queued job (to end), if
        any. Idempotent: later calls return None."""
        with self._lock:
            self._closed = True
            pending, self._pending = self._pending, None
            self._wake.notify()
            return pending

    @property
    def closed(self) -> bool:
        return self._closed

    def status(self) -> tuple[JobStatus | None, JobStatus | None]:
        """The running and the queued job."""
        with self._lock:
            return _status(self._running), _status(self._pending)


def _status(job: ReloadJob | None) -> JobStatus | None:
    if job is None:
        return None
    return JobStatus(job.id, job.source, job.trigger, job.phase, job.kind)
