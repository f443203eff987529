"""One model on one fleet replica: the versions of that model the fleet asks the replica
to hold, finish or abort, through the model's own reloader.

A replica holds at most two versions of each model: the committed one and, during a
cutover of that model, the one being prepared. `hold` is the reloader's prepare: it loads,
validates and warms a version beside the live one under the fleet's generation number,
reachable only by requests pinned to it; `finish` is the reloader's commit, once the fleet
committed (the old version drains and is unloaded); `abort` is its discard. A prepared
version that nobody finishes or aborts within `hold_seconds` is discarded by the reloader
itself, so a lost coordinator cannot pin a second copy of the model in memory forever.

Ray-free and HTTP-free: `replica.py` puts one of these per model in a replica's process.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hotweights.core import (
    Outcome,
    PreparedVersion,
    Reloader,
    ReloadEvent,
    VersionState,
)
from hotweights.errors import NotPrepared

log = logging.getLogger("hotweights.fleet")
RECENT_RELOADS = 3
"""A replica's last reloads `describe` shows, with their phases (a held version's load,
validate and warmup are in its event once it is finished or aborted)."""


@dataclass(frozen=True)
class Target:
    """A version the fleet asks its replicas to hold, under a fleet generation."""

    generation: int
    source: str
    description: str = ""
    base_generation: int | None = None
    """For a LoRA adapter: the generation of its base it is loaded on."""
    followers: tuple[tuple[str, int], ...] = ()
    """For a base model: the generation each adapter on it (by name) gets on this
    version, prepared and committed with it (numbered by the fleet, like the base's)."""

    @property
    def number(self) -> str:
        """The repository version number (the directory's name)."""
        return Path(self.source).name

    @property
    def model(self) -> str:
        """The repository model it is a version of (`ROOT/<model>/<number>`)."""
        return Path(self.source).parent.name


@dataclass(frozen=True)
class Joined:
    """Where the fleet is, for a replica that starts or catches up: the committed version,
    the one being prepared if a cutover is under way, and the one committed before if the
    ingress may still route requests to it (a cutover between its commit and its finish)."""

    committed: Target
    preparing: Target | None = None
    draining: Target | None = None
    issued: int | None = None
    """The newest generation the coordinator had given out when it answered (None: not
    said): a version held here under a newer one was asked for after this answer, which
    says nothing about it."""


@dataclass(frozen=True)
class Prepared:
    """One replica's answer to `prepare`."""

    replica: str
    generation: int
    ok: bool
    error: str | None = None
    seconds: float = 0.0
    fresh: bool = True
    """False when the version was already held here (a repeated prepare)."""
    started_at: float = 0.0
    """When this replica's prepare began and ended (wall clock: comparable between the
    replicas of one machine), for `/admin/fleet`'s prepare windows."""
    ended_at: float = 0.0


class ModelReplica:
    """One model's versions on one replica. `start` (blocking) loads the committed
    version; the other methods are called by the coordinator (through Ray) and are safe
    to call concurrently from the replica's event loop."""

    def __init__(self, reloader: Reloader[Any], *, replica_id: str, hold_seconds: float) -> None:
        self.id = replica_id
        self.name = reloader.name
        self.hold_seconds = hold_seconds
        self.reloader = reloader
        self._held: dict[int, PreparedVersion[Any]] = {}
        self._aborted: set[int] = set()
        self._lock = threading.Lock()

    # -- the versions ---------------------------------------------------------------------

    def start(self, joined: Joined, timeout: float, *, prepare: bool = True) -> None:
        """Load the committed version and make it live; then, if a cutover is preparing
        and `prepare`, prepare its version too (a replica that joins mid-cutover must hold
        it before the commit can route to it; without `prepare`, when the fleet bounds
        how many replicas prepare at once, the cutover's next round asks it). While the
        fleet drains the generation committed before, that one is made live and the
        committed one held beside it: requests the ingress stamped with either can come
        here. Raises `RuntimeError` if a version fails to load: the replica must not take
        traffic. The two steps are `start_live` and `start_held` (a replica with adapters
        takes the first for every model before the second: a base's held version brings
        along the adapters live on it)."""
        self.start_live(joined, timeout)
        self.start_held(joined, timeout, prepare=prepare)

    def start_live(self, joined: Joined, timeout: float) -> None:
        """Load and make live the version the ingress routes to now: the committed one,
        or while the fleet drains the one committed before, that one."""
        self._start_on(joined.draining or joined.committed, timeout)

    def start_held(self, joined: Joined, timeout: float, *, prepare: bool = True) -> None:
        """Hold what the fleet has beside the live version (see `start`)."""
        committed = joined.committed
        if joined.draining is not None:
            held = self.hold(committed, timeout)  # at once if it followed its base here
            if not held.ok:
                raise RuntimeError(f"replica {self.id}: {held.error}")
            return
        if joined.preparing is not None and prepare:
            prepared = self.hold(joined.preparing, timeout)
            if not prepared.ok:
                log.warning("replica %s: preparing on start failed: %s", self.id, prepared.error)

    def _start_on(self, committed: Target, timeout: float) -> None:
        event = self.reloader.reload(
            committed.source,
            trigger="startup",
            description=committed.description or f"fleet g{committed.generation}",
            generation=committed.generation,
            base_generation=committed.base_generation,
            timeout=timeout,
        )
        if event.outcome is not Outcome.LIVE:
            raise RuntimeError(
                f"replica {self.id}: the committed version g{committed.generation} "
                f"({committed.source}) failed to load: {event.error_message}"
            )

    def catch_up(self, joined: Joined, timeout: float, *, prepare: bool = True) -> bool:
        """Bring this replica in line with the fleet as it is now (`joined`, asked again
        after `start`, or when a request or a health check found it behind). Discards a
        held version the fleet no longer prepares, moves to a newer committed version
        (held, then finished; while the fleet drains the one live here, only held),
        holds the version being prepared if `prepare` (see `start`). True if it was in
        line already."""
        in_line = True
        committed, preparing = joined.committed, joined.preparing
        held = self.held_generation()
        if held is not None and joined.issued is not None and held > joined.issued:
            held = None  # asked for after `joined` was answered: not this answer's business
        live = self.reloader.live_version
        draining = joined.draining is not None and (
            live is not None and live.generation == joined.draining.generation
        )
        if held is not None and held == committed.generation:
            if not draining:  # committed while this replica held it, and drained since
                self.finish(held, timeout)
                in_line = False
        elif held is not None and (preparing is None or held != preparing.generation):
            self.abort(held, "the fleet no longer prepares it")
            in_line = False
        live = self.reloader.live_version
        behind = live is None or live.generation != committed.generation
        if behind and not self.has(committed.generation):
            in_line = False
            if self.hold(committed, timeout).ok and not draining:
                self.finish(committed.generation, timeout)
        if prepare and preparing is not None and not self.has(preparing.generation):
            self.hold(preparing, timeout)
            in_line = False
        return in_line

    def hold(self, target: Target, timeout: float) -> Prepared:
        """Prepare `target` beside the live version (blocking; idempotent: a version
        already held answers at once with `fresh` False)."""
        started, began = time.monotonic(), time.time()
        generation = target.generation
        if self.has(generation):
            return Prepared(self.id, generation, ok=True, fresh=False)
        try:
            result = self._prepare(target, timeout)
        finally:
            ended = time.time()
        return replace(result, seconds=time.monotonic() - started, started_at=began, ended_at=ended)

    def _prepare(self, target: Target, timeout: float) -> Prepared:
        generation = target.generation
        try:
            ticket = self.reloader.prepare(
                target.source,
                description=target.description or f"fleet g{generation}",
                generation=generation,
                hold_seconds=self.hold_seconds,
                base_generation=target.base_generation,
                follower_generations=dict(target.followers),
            )
        except ValueError as exc:
            return Prepared(self.id, generation, ok=False, error=str(exc))
        ticket.then(lambda result: self._arrived(generation, result))
        try:
            result = ticket.wait(timeout)
        except TimeoutError:
            self.abort(generation, f"not ready within {timeout:g} s")
            error = f"replica {self.id}: not ready within {timeout:g} s"
            return Prepared(self.id, generation, ok=False, error=error)
        if isinstance(result, ReloadEvent):
            error = f"replica {self.id}: {result.error_message or result.outcome.value}"
            return Prepared(self.id, generation, ok=False, error=error)
        self._arrived(generation, result)  # the callback may not have run yet: see `then`
        if result.decision is not None:  # the fleet gave up on it while it loaded
            return Prepared(self.id, generation, ok=False, error="aborted")
        return Prepared(self.id, generation, ok=True)

    def finish(self, generation: int, timeout: float) -> bool:
        """Commit the held `generation` here (the fleet committed it, and every request
        admitted before the commit has finished); the old version drains and is
        unloaded. True if it is live now. `timeout` is kept for the coordinator's call:
        the commit is one swap and does not wait."""
        live = self.reloader.live_version
        if live is not None and live.generation == generation:
            return True
        with self._lock:
            handle = self._held.pop(generation, None)
        if handle is None:
            log.warning("replica %s: g%d is not held here, nothing to finish", self.id, generation)
            return False
        try:
            event = self.reloader.commit(handle, reason=f"the fleet committed g{generation}")
        except NotPrepared:
            return False
        return event.outcome is Outcome.LIVE

    def abort(self, generation: int, reason: str) -> None:
        """Discard `generation` (held, or still loading: then as soon as it is ready)."""
        with self._lock:
            self._aborted.add(generation)
            handle = self._held.pop(generation, None)
        if handle is not None:
            with contextlib.suppress(NotPrepared):
                self.reloader.discard(handle, f"fleet abort: {reason}")

    def aborted(self, generation: int) -> bool:
        """Whether the fleet aborted `generation` (a replica waiting for a place to
        prepare it stops waiting)."""
        with self._lock:
            return generation in self._aborted

    def held_generation(self) -> int | None:
        """The generation prepared here and not yet decided, if any."""
        with self._lock:
            for generation, handle in list(self._held.items()):
                if handle.decision is None:
                    return generation
                del self._held[generation]  # discarded by its hold time
        return None

    def has(self, generation: int) -> bool:
        """Whether requests stamped `generation` can be answered here: it is live or
        held (not draining: a draining version is on its way out)."""
        return any(
            v.generation == generation and v.state in (VersionState.LIVE, VersionState.PREPARED)
            for v in self.reloader.resident()
        )

    def _arrived(self, generation: int, result: PreparedVersion[Any] | ReloadEvent) -> None:
        """A prepare's result (on the reloader's worker): kept for `finish`, or discarded
        at once if the fleet aborted it while it loaded."""
        if not isinstance(result, PreparedVersion):
            return
        with self._lock:
            aborted = generation in self._aborted
            if not aborted:
                self._held[generation] = result
        if aborted:
            with contextlib.suppress(NotPrepared):
                self.reloader.discard(result, "fleet abort: aborted while it loaded")

    def describe(self) -> dict[str, object]:
        """This model's versions and requests in flight here, JSON-ready."""
        live = self.reloader.live_version
        resident = [
            {
                "generation": v.generation,
                "version": Path(v.source).name,
                "state": "held" if v.state is VersionState.PREPARED else v.state.value,
            }
            for v in self.reloader.resident()
        ]
        return {
            "live": live.generation if live is not None else None,
            "resident": resident,
            "inflight": {str(g): n for g, n in self.reloader.inflight().items()},
            "reloads": [
                {
                    "generation": event.new_generation,
                    "outcome": event.outcome.value,
                    "phases": {name: round(s, 4) for name, s in event.phases.items()},
                }
                for event in self.reloader.log.recent(RECENT_RELOADS)
            ],
        }
