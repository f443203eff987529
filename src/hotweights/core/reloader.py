"""The reloader: brings new versions into service off the request path, in two phases.

`prepare` loads, validates, warms up and gates a version beside the live one (its swap
strategy decides what "beside" means) and gives a `PreparedVersion`; `commit` is the one
reference swap, after which the old version drains and is released; `discard` unloads a
prepared version and records why. Everything else is made of these three:

- a reload (`submit`, `reload`) is prepare, then commit;
- a canary is prepare, a share of new requests for a bake (`core/bake.py`), then commit or
  discard;
- a fleet replica prepares, and the fleet commits or discards (a hold nobody decides in
  time is discarded by itself).

One worker thread runs the jobs of a single-flight queue (`core/reload_queue.py`); it
stays with a prepared version until it is decided, so at most one version is prepared at
a time and at most one more waits.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from hotweights.core.canary import CanaryPolicy
from hotweights.core.events import DEFAULT_MAX_EVENTS, Outcome, ReloadEvent, ReloadLog, Trigger
from hotweights.core.followers import Followers
from hotweights.core.gate import Gate
from hotweights.core.history import DEFAULT_MAX_HISTORY, VersionHistory
from hotweights.core.loader import Loader
from hotweights.core.memory import MemoryCheck
from hotweights.core.observers import Observer
from hotweights.core.phases import PhaseRunner
from hotweights.core.prepared import PreparedVersion, PrepareTicket
from hotweights.core.preparer import Preparer
from hotweights.core.reload_queue import (
    JobKind,
    ReloadJob,
    ReloadQueue,
    ReloadTicket,
)
from hotweights.core.reload_records import ReloadRecords
from hotweights.core.reload_status import CanaryStatus, ReloaderStatus
from hotweights.core.reload_worker import ReloadWorker, commit
from hotweights.core.serving_view import ServingView
from hotweights.core.slot import ModelSlot
from hotweights.core.swap_policy import RetryPolicy, SwapPolicy
from hotweights.core.swap_strategies import make_strategy
from hotweights.core.version import ModelVersion, VersionState
from hotweights.errors import NoCanary, NoPreviousVersion, NotPrepared

ModelT = TypeVar("ModelT")
log = logging.getLogger("hotweights.reload")


class Reloader(ServingView[ModelT], Generic[ModelT]):
    """Owns one model's slot, history and reload log, and the worker that changes them.

    Thread-safe. `submit`, `reload`, `prepare`, `commit`, `discard`, `rollback` and the
    rest may be called from any thread or the event loop; none runs loader code on the
    caller's thread (except `discard` under `resource`, which brings the old version back).
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
        if canary is not None and policy != "availability":
            raise ValueError("a canary needs the availability policy (two versions resident)")
        self.loader, self.gate, self.canary, self.name = loader, gate, canary, name
        self.history = VersionHistory(max_history)
        self.log = ReloadLog(max_events)
        self.slot: ModelSlot[ModelT] = ModelSlot(
            loader.unload, admission_timeout=admission_timeout, on_state=self._on_state
        )
        self.records = ReloadRecords(name, self.slot, self.history, self.log, drain_timeout)
        self.observers = self.records.observers
        self._stop = threading.Event()
        self._closing = threading.Lock()
        phases = PhaseRunner(
            loader, retry=retry or RetryPolicy(), phase_timeout=phase_timeout, memory=memory,
            stop=self._stop,
        )  # fmt: skip
        self._preparer = Preparer(phases, self.records, gate)
        self.strategy = make_strategy(policy, self._preparer, drain_timeout)
        self.queue = ReloadQueue(name)
        self._worker = ReloadWorker(name, self.queue, self.strategy, self.records, canary)

    @property
    def policy(self) -> SwapPolicy:
        return self.strategy.policy

    # -- the two phases ----------------------------------------------------------------

    def submit(
        self,
        source: str,
        *,
        trigger: Trigger = "api",
        description: str = "",
        generation: int | None = None,
        base_generation: int | None = None,
    ) -> ReloadTicket:
        """Accept a request to make `source` live (prepare, then commit, or bake as a
        canary); returns at once. With `generation`, it serves as that generation, which
        must be ahead of every one so far (`ValueError` otherwise): a fleet numbers its
        versions. An adapter's `base_generation` names the version of its base to load
        it on (None: the live one)."""
        job = self._put(source, trigger, description, "reload", generation, None, base_generation)
        return ReloadTicket(job)

    def reload(
        self,
        source: str,
        *,
        trigger: Trigger = "api",
        description: str = "",
        timeout: float | None = None,
        generation: int | None = None,
        base_generation: int | None = None,
    ) -> ReloadEvent:
        """Make `source` live and return the outcome (blocking); `generation` and
        `base_generation` as `submit`."""
        ticket = self.submit(
            source,
            trigger=trigger,
            description=description,
            generation=generation,
            base_generation=base_generation,
        )
        return ticket.wait(timeout)

    async def reload_async(
        self, source: str, *, trigger: Trigger = "api", description: str = ""
    ) -> ReloadEvent:
        """`reload` for the event loop."""
        return await self.submit(source, trigger=trigger, description=description).wait_async()

    def prepare(
        self,
        source: str,
        *,
        trigger: Trigger = "api",
        description: str = "",
        generation: int | None = None,
        hold_seconds: float = 600.0,
        base_generation: int | None = None,
        follower_generations: Mapping[str, int] | None = None,
    ) -> PrepareTicket[ModelT]:
        """Accept a request to prepare `source` beside the live version; returns at once.
        The ticket's result is the `PreparedVersion` (for `commit` or `discard`; one that
        nobody decides within `hold_seconds` is discarded by itself), or the event of the
        attempt that failed or was superseded. `generation` as in `submit`; an adapter's
        `base_generation` names the version of its base to prepare it on; a base's
        `follower_generations` numbers the versions its followers get on it (by name: a
        fleet numbers every model's versions)."""
        followers = tuple(sorted((follower_generations or {}).items()))
        job = self._put(
            source, trigger, description, "prepare", generation, hold_seconds, base_generation,
            followers,
        )  # fmt: skip
        return PrepareTicket(job)

    def commit(
        self,
        handle: PreparedVersion[ModelT],
        *together: PreparedVersion[Any],
        reason: str = "committed",
    ) -> ReloadEvent:
        """Make `handle` live: the one reference swap (under every slot's lock when
        `together` names prepared versions of other models, such as adapters on this
        base: all swap in the same step). The old versions drain and are released.
        Returns `handle`'s event (the others' are on their handles). Raises `NotPrepared`
        if any of them was already committed or discarded, or if an adapter carried as a
        follower went live in a newer version after the follower was read (committing
        would take it back): then those not yet decided are discarded, and the reason,
        naming the adapter, is on their events."""
        if handle.slot is not self.slot:
            raise ValueError(f"{handle!r} was prepared by another reloader than {self.name!r}")
        return commit((handle, *together), reason)

    def discard(self, handle: PreparedVersion[ModelT], reason: str) -> ReloadEvent | None:
        """Discard `handle`: no new request reaches it, it drains and is unloaded, and the
        reload log says why (under `resource`, the old version is loaded again). Raises
        `NotPrepared` if it was already decided. Returns its event, or None when the
        worker applies it (called from the worker's own thread, by an observer)."""
        return self._worker.discard(handle, reason)

    # -- compositions ------------------------------------------------------------------

    def follow_with(self, followers: Followers | None) -> None:
        """Have every version this reloader prepares from now on carry the versions of
        the models that follow it (its adapters; see `core/followers.py`)."""
        self._worker.followers = followers

    def rollback(self, *, description: str = "") -> ReloadTicket:
        """Make the most recent earlier version (by source) live again, as a new
        generation; during a canary's bake, roll the canary back instead (its ticket).
        Raises `NoPreviousVersion` when the history holds none."""
        try:
            return self.end_bake(promote=False, reason=description or "rolled back by an operator")
        except NoCanary:
            pass
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
        """Commit or discard the canary baking now; raises `NoCanary` if none is baking or
        it was already decided."""
        handle = self._worker.held
        if handle is None or handle.monitor is None:
            raise NoCanary(f"model {self.name!r} has no canary baking")
        try:
            if promote:
                self.commit(handle, reason=reason)
            else:
                self.discard(handle, reason)
        except NotPrepared:
            raise NoCanary(f"model {self.name!r} has no canary baking") from None
        return ReloadTicket(handle.job)

    def record(self, generation: int, *, ok: bool, seconds: float, tokens: int = 0) -> None:
        """One finished request (the server calls this on the request path): counted
        toward the canary's judgement while one bakes, ignored otherwise."""
        handle = self._worker.held
        if handle is not None and handle.monitor is not None:
            handle.monitor.record(generation, ok, seconds, tokens)

    def subscribe(self, observer: Observer) -> Callable[[], None]:
        """Call `observer` with every `Notice`; returns a function that unsubscribes."""
        return self.observers.add(observer)

    def status(self) -> ReloaderStatus:
        """A snapshot: live version, in-flight leases, what is prepared, reloading, queued."""
        running, queued = self.queue.status()
        handle = self._worker.held
        canary = self.slot.canary_version
        monitor = handle.monitor if handle is not None else None
        return ReloaderStatus(
            model=self.name,
            policy=self.policy,
            generation=self.history.generation,
            live=self.slot.live_version,
            inflight=self.slot.inflight(),
            resident=[version.generation for version in self.slot.resident()],
            prepared=handle.version if handle is not None else None,
            canary=(
                CanaryStatus(canary, self.canary.share, monitor.figures())
                if canary is not None and monitor is not None and self.canary is not None
                else None
            ),
            reloading=running,
            queued=queued,
        )

    def wait_drained(self, timeout: float | None = None) -> bool:
        """Wait for every drain started so far; True if all finished in time."""
        return self.records.wait_drained(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new requests, end the queued one, discard a prepared version, let the
        running job finish, then drain and unload whatever is live. Idempotent."""
        with self._closing:
            if self._stop.is_set():
                return
            self._stop.set()
        self._worker.close(timeout)
        old = self.slot.withdraw()
        self.slot.end_gap()
        if old is not None:
            self.slot.drain(old, self.records.drain_timeout)
        self.wait_drained(timeout)

    # -- the worker's job queue ------------------------------------------------------------

    def _put(
        self,
        source: str,
        trigger: Trigger,
        description: str,
        kind: JobKind,
        generation: int | None,
        hold_seconds: float | None,
        base_generation: int | None = None,
        follower_generations: tuple[tuple[str, int], ...] = (),
    ) -> ReloadJob:
        job, superseded = self.queue.put(
            source, trigger, description, kind=kind, generation=generation,
            hold_seconds=hold_seconds, after=self.history.generation,
            base_generation=base_generation, follower_generations=follower_generations,
        )  # fmt: skip
        if superseded is not None:
            event = self.records.event(
                superseded, Outcome.SUPERSEDED, error=f"superseded by {source}"
            )
            self.records.finish(superseded, event)
        return job

    def _on_state(self, version: ModelVersion, old: VersionState, new: VersionState) -> None:
        self.records.version_changed(version, old, new)
