"""The reloader's worker: one thread that runs each job of the queue through its strategy's
prepare and then waits with the prepared version until it is decided (a reload commits at
once, a canary bakes, a prepare waits for its caller or its hold time). Also the two
decisions: `commit` (the one swap, of one or several prepared versions) and the
application of a discard.

Who applies what: a commit is applied by its caller (one swap under every slot's lock, so
several models can go live together); a discard by its caller, or by the worker for a
discard that was only claimed (a canary's breach, seen on the request path; a hold that
timed out; a shutdown).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Generic, TypeVar

from hotweights.core.bake import bake
from hotweights.core.canary import CanaryPolicy
from hotweights.core.events import Outcome, ReloadEvent
from hotweights.core.followers import Followers
from hotweights.core.observers import ReloadStarted
from hotweights.core.prepared import Decision, PreparedVersion, claim_all
from hotweights.core.reload_queue import ReloadJob, ReloadQueue
from hotweights.core.reload_records import ReloadRecords
from hotweights.core.slot import ModelSlot
from hotweights.core.swap_strategies import PrepareFailed, SwapStrategy
from hotweights.core.version import ModelVersion
from hotweights.errors import FollowFailed, NotPrepared

ModelT = TypeVar("ModelT")
log = logging.getLogger("hotweights.reload")


def commit(handles: tuple[PreparedVersion[Any], ...], reason: str) -> ReloadEvent:
    """Make every prepared version in `handles`, and the versions that follow each, live
    in one step (see `Reloader.commit`); returns the first one's event. Raises
    `NotPrepared` if any was already decided, or if a follower's model has another live
    version than the one the follower was prepared from (`_changed_follower`): then each
    of them not yet decided is discarded instead, with that reason, and their workers
    apply it."""
    given = handles
    handles = tuple(version for handle in handles for version in (handle, *handle.followers))
    if len({id(handle.slot) for handle in handles}) != len(handles):
        raise ValueError(f"{handles}: one commit makes one version of each model live")
    claimed = False

    def decide() -> None:  # under every slot's lock: no live version can change meanwhile
        nonlocal claimed
        changed = _changed_follower(given)
        if changed is not None:
            for handle in handles:  # each not yet decided (one decided keeps its decision)
                handle.claim(Decision.DISCARD, changed)
            raise NotPrepared(changed)
        if not claim_all(handles, Decision.COMMIT, reason):
            raise NotPrepared(f"{', '.join(map(repr, handles))}: already committed or discarded")
        claimed = True
        for handle in handles:
            handle.begin_apply()

    try:
        olds = ModelSlot.commit_together(
            [(handle.slot, handle.generation) for handle in handles], first=decide
        )
    except Exception as exc:
        if claimed:  # nothing swapped; never leave a worker waiting on a version
            for handle in handles:
                handle.settle(handle.records.event(handle.job, Outcome.FAILED, error=exc))
        raise
    events = [
        handle.records.committed(handle, old) for handle, old in zip(handles, olds, strict=True)
    ]
    return events[0]


def _changed_follower(handles: tuple[PreparedVersion[Any], ...]) -> str | None:
    """Why committing `handles` would take a follower's model back to an older version,
    or None. A follower is its model's live version prepared again on the new base; if
    another version of that model went live after it was read (a reload of the adapter
    that committed first), the follower is stale and the base is refused: dropping the
    follower instead would leave the newer adapter version on the old base, which drains
    away. Called under every slot's lock."""
    for base in handles:
        for follower in base.followers:
            was, live = follower.replaces, follower.slot.live_version
            if was is None or live is None or live.generation == was.generation:
                continue
            return (
                f"adapter {follower.model} changed version while {base.model} "
                f"g{base.generation} was prepared ({was.label} is no longer live, "
                f"{live.label} is): committing would take it back; reload "
                f"{base.model} again"
            )
    return None


class ReloadWorker(Generic[ModelT]):
    """Runs the jobs of one reloader. Thread-safe; `held` is the version prepared now."""

    def __init__(
        self,
        name: str,
        queue: ReloadQueue,
        strategy: SwapStrategy[ModelT],
        records: ReloadRecords,
        canary: CanaryPolicy | None,
    ) -> None:
        self.name = name
        self.queue = queue
        self.strategy = strategy
        self.records = records
        self.slot = records.slot
        self.canary = canary
        self._lock = threading.Lock()
        self._held: PreparedVersion[ModelT] | None = None
        self._closing = False
        self.followers: Followers | None = None
        """Asked for the versions that follow each version this worker prepares."""
        self._thread = threading.Thread(target=self._work, name=f"hotweights-reloader-{name}")
        self._thread.daemon = True
        self._thread.start()

    @property
    def held(self) -> PreparedVersion[ModelT] | None:
        """The version prepared now and not yet settled, if any."""
        handle = self._held
        return handle if handle is not None and not handle.settled.is_set() else None

    def discard(self, handle: PreparedVersion[ModelT], reason: str) -> ReloadEvent | None:
        """See `Reloader.discard`."""
        if handle.slot is not self.slot:
            raise ValueError(f"{handle!r} was prepared by another reloader than {self.name!r}")
        if not handle.claim(Decision.DISCARD, reason):
            decided = handle.decision.value if handle.decision else "decided"
            raise NotPrepared(f"{handle!r} was already {decided}")
        _drop_followers(handle, reason)
        if threading.current_thread() is self._thread or not handle.begin_apply():
            return None  # the worker applies it as soon as this call returns
        self._apply_discard(handle)
        return handle.event

    def close(self, timeout: float | None) -> None:
        """End the queued job, discard the prepared version, let the running job end."""
        with self._lock:
            self._closing = True
            held = self._held
        pending = self.queue.close()
        if held is not None:
            held.claim(Decision.DISCARD, "the reloader is closing")
        if pending is not None:
            event = self.records.event(pending, Outcome.SUPERSEDED, error="closed")
            self.records.finish(pending, event)
        self._thread.join(timeout)

    def _work(self) -> None:
        while (job := self.queue.take()) is not None:
            live = self.slot.live_version
            job.old_generation = live.generation if live is not None else 0
            self.records.observers.notify(ReloadStarted(self.name, job.id, job.source, job.trigger))
            try:
                self._run(job)
            except Exception as exc:  # a bug in the reloader itself: never kill the worker
                log.exception("reload %d of %s crashed", job.id, self.name)
                self._recover(job, exc)
            finally:
                with self._lock:
                    self._held = None
                self.queue.done()

    def _run(self, job: ReloadJob) -> None:
        prepared = self.strategy.prepare(job)
        if isinstance(prepared, PrepareFailed):
            restored = self._restore(prepared.restore) if prepared.restore else None
            self.slot.end_gap()
            self.records.finish(job, prepared.event, *([restored] if restored else []))
            return
        handle = prepared
        with self._lock:
            self._held = handle
            if self._closing:
                handle.claim(Decision.DISCARD, "the reloader is closing")
        self._follow(handle, dict(job.follower_generations))
        stable = self.slot.live_version
        if job.kind == "prepare":
            job.future.set_result(handle)
            hold = job.hold_seconds or 0.0
            if not handle.wait_decided(hold):
                handle.claim(Decision.DISCARD, f"nothing committed it within {hold:g} s")
        elif self.canary and job.trigger != "rollback" and stable and not handle.decision:
            bake(self.canary, handle, stable, self._commit_one)
        elif not handle.decision:
            self._commit_one(handle, "reloaded")
        if handle.decision is Decision.DISCARD and handle.begin_apply():
            _drop_followers(handle, handle.reason)
            self._apply_discard(handle)
        handle.settled.wait()
        if not job.future.done() and handle.event is not None:
            job.future.set_result(handle.event)

    def _follow(self, handle: PreparedVersion[ModelT], generations: dict[str, int]) -> None:
        """Prepare the versions that follow `handle` (its adapters) on it, numbered by
        `generations` where it names them; when one cannot be, discard `handle`, naming
        why."""
        followers = self.followers
        if followers is None or handle.decision is not None:
            return
        try:
            handle.followers = followers.prepare_on(handle, generations)
        except FollowFailed as exc:
            handle.claim(Decision.DISCARD, str(exc))

    def _recover(self, job: ReloadJob, exc: Exception) -> None:
        """After a crash: no prepared version left held, no admission left waiting, and
        the job's caller answered (with its version's event if that was decided)."""
        handle = self._held
        if handle is not None and not handle.settled.is_set():
            handle.claim(Decision.DISCARD, f"the reload crashed: {exc}")
            if handle.begin_apply():
                try:
                    self._apply_discard(handle)
                except Exception:
                    log.exception("discarding %r after a crash failed too", handle)
        if self.slot.in_gap and self.slot.live_version is None:
            self.slot.end_gap()  # never leave admissions waiting on nothing
        if job.future.done():
            return
        if handle is not None and handle.event is not None:
            job.future.set_result(handle.event)
        else:
            self.records.finish(job, self.records.event(job, Outcome.FAILED, error=exc))

    def _commit_one(self, handle: PreparedVersion[Any], reason: str) -> object:
        try:
            return commit((handle,), reason)
        except NotPrepared:  # refused, and discarded (a follower went stale): applied below
            return None

    def _apply_discard(self, handle: PreparedVersion[ModelT]) -> None:
        """Withdraw, record and drain a discarded version (under `resource`, drain it now
        and bring the old version back)."""
        try:
            generation = self.slot.withdraw_prepared(handle.generation)
            self.records.history.withdraw(handle.version)
            event = self.records.discarded(handle)
        except Exception as exc:
            handle.settle(self.records.event(handle.job, Outcome.FAILED, error=exc))
            raise
        if handle.previous is None:
            self.records.record(event)
            self.records.drain_later(generation, event.id)
            handle.settle(event)
            return
        restored: ReloadEvent | None = None
        try:  # `resource`: it drains now, and the old version comes back in its memory
            self.slot.drain(generation, self.records.drain_timeout)
            with self._lock:
                closing = self._closing
            if not closing:  # a closing reloader brings nothing back to life
                restored = self._restore(handle.previous)
        finally:
            self.slot.end_gap()
            self.records.record(event)
            if restored is not None:
                self.records.record(restored)
            handle.settle(event)

    def _restore(self, previous: ModelVersion) -> ReloadEvent:
        """Under `resource`, the old version was unloaded for a version that failed or was
        discarded: bring its source back so that something serves again."""
        text = f"restore g{previous.generation} after a failed reload"
        job = self.queue.new_job(previous.source, "rollback", text)
        job.old_generation = self.records.history.generation
        prepared = self.strategy.prepare(job)
        if isinstance(prepared, PrepareFailed):
            log.error("%s: restoring %s failed too", self.name, previous.label)
            return prepared.event
        claim_all((prepared,), Decision.COMMIT, text)
        prepared.begin_apply()
        (old,) = ModelSlot.commit_together([(self.slot, prepared.generation)])
        return self.records.committed(prepared, old, record=False)


def _drop_followers(handle: PreparedVersion[Any], reason: str) -> None:
    """Discard the versions prepared to follow a discarded `handle` (their reloaders'
    workers, waiting on them, apply it)."""
    for follower in handle.followers:
        follower.claim(Decision.DISCARD, f"{handle!r} was discarded: {reason}")
