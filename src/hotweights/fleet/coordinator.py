"""The coordinator: holds the fleet's committed version and moves every replica to a new
one in two phases.

```
 repository change, /admin/reload, /admin/rollback
        │
   PREPARE ── every replica loads, validates, warms and holds gN beside g(N-1)
        │  └─ any replica fails, dies or times out ──► ABORT: all discard gN,
        │                                              g(N-1) stays, vN marked bad
   COMMIT ─── the ingress flips: requests admitted from now on carry gN
        │
   DRAIN ──── requests the ingress admitted on g(N-1) finish
        │
   FINISH ─── every replica makes gN its live version; g(N-1) is unloaded
```

The coordinator never touches a request. It reaches the replicas and the ingress through
a `FleetLink` (Ray handles in `deployment.py`, plain objects in tests). Thread-safe: one
cutover runs at a time; a storm of triggers queues on a lock and each finds the
repository's target already committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from hotweights.fleet.replica import Joined, Prepared, Target
from hotweights.fleet.settings import PREPARE_ROUNDS, FleetSettings
from hotweights.sources import ModelRepository, make_watcher
from hotweights.sources.repository_scan import VersionInfo
from hotweights.sources.watcher import Watcher

log = logging.getLogger("hotweights.fleet")

MAX_CUTOVERS = 32
FINISH_ATTEMPTS = 3
SETTLE_MARGIN_S = 0.05


class FleetLink(Protocol):
    """How the coordinator reaches the replicas and the ingress. Blocking calls."""

    def prepare(self, target: Target, timeout: float) -> Sequence[Prepared | BaseException]:
        """Every running replica's answer; raises `TimeoutError` past `timeout`."""

    def abort(self, generation: int, reason: str) -> None: ...

    def flip(self, generation: int) -> None:
        """The ingress stamps `generation` on every request admitted from now on."""

    def drained(self, generation: int, timeout: float) -> int:
        """Wait until the ingress has no request on `generation` in flight, or `timeout`;
        the number still in flight."""

    def finish(self, generation: int, timeout: float) -> Sequence[bool | BaseException]: ...

    def replicas(self) -> Sequence[dict[str, object] | BaseException]: ...

    def ingress(self) -> dict[str, object]: ...


@dataclass
class Cutover:
    """One attempt to move the fleet to a version, as `/admin/fleet` reports it."""

    generation: int
    version: int
    trigger: str
    description: str = ""
    """What the operator said (`hotweights reload --description`), if anything."""
    started_at: float = field(default_factory=time.time)
    outcome: str = "preparing"
    """preparing, committed, aborted, or skipped (no replica to prepare)."""
    error: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds of prepare, commit, drain and finish."""
    replicas: dict[str, float] = field(default_factory=dict)
    """Each replica's prepare time."""
    stuck: int = 0
    """Requests still running on the old generation at the drain deadline."""

    def to_dict(self) -> dict[str, object]:
        return {
            "generation": self.generation,
            "version": self.version,
            "trigger": self.trigger,
            "description": self.description,
            "started_at": self.started_at,
            "outcome": self.outcome,
            "error": self.error,
            # list(): one copy under the GIL while the cutover's thread may add a phase
            "phases": {name: round(seconds, 4) for name, seconds in list(self.phases.items())},
            "replicas": {name: round(s, 4) for name, s in list(self.replicas.items())},
            "stuck": self.stuck,
        }


class Coordinator:
    """The fleet's single source of truth about versions (one per fleet)."""

    def __init__(self, settings: FleetSettings, link: FleetLink) -> None:
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
        first = self.repository.target(self.model)
        if first is None:
            raise ValueError(
                f"model {self.model!r} has no eligible version in {config.repo} "
                f"(models there: {', '.join(self.repository.models()) or 'none'})"
            )
        self._committed = Target(1, first.source, _describe(first))
        self._number = first.number
        self._next = 2
        self._preparing: Target | None = None
        self._cutovers: deque[Cutover] = deque(maxlen=MAX_CUTOVERS)
        self._lock = threading.Lock()  # one cutover at a time
        self._state = threading.Lock()  # the fields `join` and `status` read
        self._watcher: Watcher | None = None
        self._settle: threading.Timer | None = None

    # -- asked by replicas and the ingress ---------------------------------------------------

    def join(self) -> Joined:
        """What a replica starting now must load (see `FleetReplica.start`)."""
        with self._state:
            return Joined(self._committed, self._preparing)

    def committed(self) -> int:
        """The committed generation (an ingress that restarts stamps it)."""
        with self._state:
            return self._committed.generation

    # -- driving ---------------------------------------------------------------------------

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

    def reload(self, version: int | None = None, description: str = "") -> dict[str, object] | None:
        """Pin `version` (or, with None, follow the latest eligible one again) and sync."""
        self.repository.scan()
        if version is None:
            self.repository.unpin(self.model)
        else:
            self.repository.pin(self.model, version)
        return self.sync("api", description)

    def rollback(self, description: str = "") -> dict[str, object] | None:
        """Pin the newest eligible version older than the committed one and sync."""
        self.repository.scan()
        with self._state:
            live = self._number
        self.repository.rollback(self.model, live=live)
        return self.sync("rollback", description)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
        if self._settle is not None:
            self._settle.cancel()

    # -- reporting ---------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """`GET /admin/fleet`: the committed generation, the last cutovers, each replica's
        live and resident generations and requests in flight, the ingress's counts."""
        with self._state:
            committed, preparing = self._committed, self._preparing
            cutovers = [cutover.to_dict() for cutover in self._cutovers]
        return {
            "model": self.model,
            "committed": _target(committed),
            "preparing": _target(preparing) if preparing is not None else None,
            "last_cutover": cutovers[0] if cutovers else None,
            "cutovers": cutovers,
            "replicas": [
                r if isinstance(r, dict) else {"error": _reason(r)} for r in self.link.replicas()
            ],
            "ingress": self.link.ingress(),
        }

    # -- the two phases ----------------------------------------------------------------------

    def _cutover(self, info: VersionInfo, trigger: str, description: str = "") -> Cutover:
        generation, self._next = self._next, self._next + 1
        target = Target(generation, info.source, description or _describe(info))
        record = Cutover(generation, info.number, trigger, description)
        with self._state:
            self._cutovers.appendleft(record)
            self._preparing = target
        log.info("cutover g%d to %s v%d: prepare", generation, self.model, info.number)
        started = time.monotonic()
        try:
            answers, errors = self._prepare(target)
        finally:
            record.phases["prepare"] = time.monotonic() - started
        record.replicas = {a.replica: a.seconds for a in answers if a.fresh}
        if errors or not answers:
            return self._abort(record, info, errors)
        started = time.monotonic()
        try:
            self.link.flip(generation)
        except Exception as exc:  # not the version's fault: not marked bad
            self._flip_back()
            reason = f"the ingress did not flip: {_reason(exc)}"
            return self._abort(record, info, [reason], blame=False)
        with self._state:
            old, self._committed, self._preparing = self._committed, target, None
            self._number = info.number
            record.outcome = "committed"
        record.phases["commit"] = time.monotonic() - started
        log.info("cutover g%d committed; draining g%d", generation, old.generation)
        started = time.monotonic()
        try:
            record.stuck = self.link.drained(old.generation, self.settings.config.drain_timeout)
        except Exception as exc:  # an ingress that died took its requests with it
            log.warning("cutover g%d: the ingress did not report its drain: %s", generation, exc)
        record.phases["drain"] = time.monotonic() - started
        started = time.monotonic()
        record.error = self._finish(generation)
        record.phases["finish"] = time.monotonic() - started
        return record

    def _flip_back(self) -> None:
        """A flip that failed may have happened all the same: stamp the committed
        generation again (retried: an ingress left on a discarded one fails everything)."""
        for _ in range(FINISH_ATTEMPTS):
            try:
                self.link.flip(self._committed.generation)
                return
            except Exception as exc:
                back = self._committed.generation
                log.error("flipping the ingress back to g%d failed: %s", back, exc)

    def _finish(self, generation: int) -> str | None:
        """Every replica makes `generation` live (a replica that lacks it catches up
        first). Retried; what still failed, for the record (None: all finished)."""
        finished: Sequence[bool | BaseException] = []
        for _ in range(FINISH_ATTEMPTS):
            try:
                finished = self.link.finish(generation, self.settings.prepare_timeout)
            except Exception as exc:
                finished = [exc]
            if all(answer is True for answer in finished):
                return None
        failed = [a if isinstance(a, bool) else _reason(a) for a in finished if a is not True]
        error = f"committed, but {len(failed)} replica(s) did not finish: {failed}"
        log.error("cutover g%d: %s", generation, error)
        return error

    def _prepare(self, target: Target) -> tuple[list[Prepared], list[str]]:
        answers: dict[str, Prepared] = {}
        errors: list[str] = []
        for _ in range(PREPARE_ROUNDS):
            try:
                results = self.link.prepare(target, self.settings.prepare_timeout)
            except TimeoutError:
                wait = self.settings.prepare_timeout
                errors.append(f"not every replica was ready within {wait:g} s")
                break
            except Exception as exc:
                errors.append(f"preparing failed: {_reason(exc)}")
                break
            fresh = False
            for result in results:
                if isinstance(result, BaseException):
                    errors.append(f"a replica failed: {_reason(result)}")
                elif not result.ok:
                    errors.append(result.error or f"replica {result.replica} failed")
                else:
                    fresh = fresh or result.fresh
                    if result.replica not in answers or result.fresh:
                        answers[result.replica] = result
            if errors or not fresh:
                break
        return list(answers.values()), errors

    def _abort(
        self, record: Cutover, info: VersionInfo, errors: list[str], *, blame: bool = True
    ) -> Cutover:
        generation = record.generation
        with self._state:
            self._preparing = None
        if not errors:  # nothing answered: no replica yet, not the version's fault
            record.outcome, record.error = "skipped", "no replica was running to prepare it"
            return record
        reason = "; ".join(errors)
        record.outcome, record.error = "aborted", reason
        log.error("cutover g%d to v%d aborted: %s", generation, info.number, reason)
        try:
            self.link.abort(generation, reason)
        except Exception as exc:  # each replica's held copy rolls back when its hold ends
            log.warning("cutover g%d: telling the replicas to abort failed: %s", generation, exc)
        if blame:
            why = f"fleet cutover g{generation} aborted: {reason}"
            self.repository.mark_bad(self.model, info.number, why, signature=info.signature)
        return record

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


def _describe(info: VersionInfo) -> str:
    text = f"{info.model} v{info.number}"
    return f"{text}: {info.description}" if info.description else text


def _target(target: Target) -> dict[str, object]:
    return {
        "generation": target.generation,
        "version": int(target.number) if target.number.isdigit() else target.number,
        "source": target.source,
    }


def _reason(exc: BaseException) -> str:
    """The first line of an error (a Ray task error carries the whole remote traceback)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"
