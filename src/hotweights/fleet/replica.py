"""One fleet replica: the hotweights engine of `hotweights serve` on its own copy of the
model, answering requests pinned to the generation the ingress stamped on them.

A replica holds at most two versions: the committed one and, during a cutover, the one
being prepared. `prepare` loads, validates and warms a version beside the live one and
keeps it *held* (a canary with a share of 0: only requests pinned to its generation reach
it) under the fleet's generation number; `finish` makes it the replica's live version
once the fleet committed it (the old one drains and is unloaded); `abort` discards it.
A held version that nobody finishes or aborts within `hold_seconds` rolls back by
itself, so a lost coordinator cannot pin a second copy of the model in memory forever.

Ray-free: `fleet/deployment.py` wraps it in a Ray Serve deployment; tests drive it
directly with a fake loader.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hotweights.config import Config
from hotweights.core import (
    CanaryPolicy,
    Loader,
    Notice,
    Outcome,
    Reloader,
    ReloadFinished,
    VersionChanged,
    VersionState,
)
from hotweights.errors import NoCanary
from hotweights.fleet.bridge import Forwarded, Head, answer
from hotweights.server.app import create_app
from hotweights.server.assembly import build_state

log = logging.getLogger("hotweights.fleet")

REPLICA_HEADER = "x-hotweights-replica"
RECENT_RELOADS = 3
"""A replica's last reloads `describe` shows, with their phases (a held version's load,
validate and warmup are in its event once it is finished or aborted)."""


@dataclass(frozen=True)
class Target:
    """A version the fleet asks its replicas to hold, under a fleet generation."""

    generation: int
    source: str
    description: str = ""

    @property
    def number(self) -> str:
        """The repository version number (the directory's name)."""
        return Path(self.source).name


@dataclass(frozen=True)
class Joined:
    """What a replica starting now must load before it takes traffic: the committed
    version, and the one being prepared if a cutover is under way."""

    committed: Target
    preparing: Target | None = None


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


class FleetReplica:
    """The engine of one replica. `start` (blocking) loads the committed version; the
    other methods are called by the coordinator (through Ray) and are safe to call
    concurrently from the replica's event loop."""

    def __init__(
        self,
        config: Config,
        name: str,
        *,
        replica_id: str,
        hold_seconds: float,
        loader: Loader[Any] | None = None,
    ) -> None:
        self.id = replica_id
        self.name = name
        hold = CanaryPolicy(0.0, bake_seconds=hold_seconds, promote_when_baked=False, judge=False)
        self.state = build_state(replica_config(config, name), loader=loader, canary=hold)
        self.reloader: Reloader[Any] = self.state.resolve(name).reloader
        self.app = create_app(self.state)
        self._aborted: set[int] = set()
        self._finished: deque[int] = deque(maxlen=64)
        """Ids of the reloads that ended lately (their notice comes before their ticket)."""
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.reloader.subscribe(self._notice)

    # -- the versions ---------------------------------------------------------------------

    def start(self, joined: Joined, timeout: float) -> None:
        """Load the committed version and make it live; then, if a cutover is preparing,
        prepare its version too (a replica that joins mid-cutover must hold it before
        the commit can route to it). Raises `RuntimeError` if the committed version
        fails to load: the replica must not take traffic."""
        committed = joined.committed
        event = self.reloader.reload(
            committed.source,
            trigger="startup",
            description=committed.description or f"fleet g{committed.generation}",
            generation=committed.generation,
            timeout=timeout,
        )
        if event.outcome is not Outcome.LIVE:
            raise RuntimeError(
                f"replica {self.id}: the committed version g{committed.generation} "
                f"({committed.source}) failed to load: {event.error_message}"
            )
        if joined.preparing is not None:
            prepared = self.hold(joined.preparing, timeout)
            if not prepared.ok:
                log.warning("replica %s: preparing on start failed: %s", self.id, prepared.error)

    def catch_up(self, joined: Joined, timeout: float) -> bool:
        """Bring a starting replica in line with the fleet as it is now (`joined`, asked
        again after `start`: a cutover may have ended meanwhile). Discards a held version
        the fleet no longer prepares, moves to a newer committed version (held, then
        finished: nothing is routed here yet), holds the version being prepared. True
        if it was in line already."""
        in_line = True
        held, preparing = self.reloader.canary_version, joined.preparing
        if held is not None and held.generation == joined.committed.generation:
            self.finish(held.generation, timeout)  # committed while this replica started
            in_line = False
        elif held is not None and (preparing is None or held.generation != preparing.generation):
            self.abort(held.generation, "the fleet no longer prepares it")
            in_line = False
        live = self.reloader.live_version
        if live is None or live.generation != joined.committed.generation:
            if self.hold(joined.committed, timeout).ok:
                self.finish(joined.committed.generation, timeout)
            in_line = False
        if preparing is not None and not self.has(preparing.generation):
            self.hold(preparing, timeout)
            in_line = False
        return in_line

    def hold(self, target: Target, timeout: float) -> Prepared:
        """Load, validate and warm `target` beside the live version and hold it (blocking;
        idempotent: a version already held answers at once with `fresh` False)."""
        started = time.monotonic()
        if self.has(target.generation):
            return Prepared(self.id, target.generation, ok=True, fresh=False)
        try:
            ticket = self.reloader.submit(
                target.source,
                description=target.description or f"fleet g{target.generation}",
                generation=target.generation,
            )
        except ValueError as exc:
            return Prepared(self.id, target.generation, ok=False, error=str(exc))
        deadline = started + timeout
        with self._lock:
            while not (self.has(target.generation) or ticket.id in self._finished):
                left = deadline - time.monotonic()
                if left <= 0:
                    self._aborted.add(target.generation)
                    return Prepared(
                        self.id,
                        target.generation,
                        ok=False,
                        error=f"replica {self.id}: not ready within {timeout:g} s",
                        seconds=time.monotonic() - started,
                    )
                self._changed.wait(left)
            aborted = target.generation in self._aborted
        seconds = time.monotonic() - started
        if aborted:  # the fleet gave up on it while it loaded (`_notice` discards it)
            return Prepared(self.id, target.generation, ok=False, error="aborted", seconds=seconds)
        if self.has(target.generation):
            return Prepared(self.id, target.generation, ok=True, seconds=seconds)
        event = ticket.wait(max(0.0, deadline - time.monotonic()))
        error = event.error_message or event.outcome.value
        return Prepared(
            self.id,
            target.generation,
            ok=False,
            error=f"replica {self.id}: {error}",
            seconds=seconds,
        )

    def finish(self, generation: int, timeout: float) -> bool:
        """Make the held `generation` this replica's live version (the fleet committed it
        and every request admitted before the commit has finished); the old version
        drains and is unloaded. True if it is live now."""
        live = self.reloader.live_version
        if live is not None and live.generation == generation:
            return True
        canary = self.reloader.canary_version
        if canary is None or canary.generation != generation:
            log.warning("replica %s: g%d is not held here, nothing to finish", self.id, generation)
            return False
        try:
            ticket = self.reloader.promote(reason=f"the fleet committed g{generation}")
        except NoCanary:
            return False
        return ticket.wait(timeout).outcome is Outcome.LIVE

    def abort(self, generation: int, reason: str) -> None:
        """Discard `generation` (held, or still loading: then when it is ready)."""
        with self._lock:
            self._aborted.add(generation)
        self._discard(generation, reason)

    def _discard(self, generation: int, reason: str) -> None:
        canary = self.reloader.canary_version
        if canary is not None and canary.generation == generation:
            with contextlib.suppress(NoCanary):
                self.reloader.end_bake(promote=False, reason=f"fleet abort: {reason}")

    def has(self, generation: int) -> bool:
        """Whether requests stamped `generation` can be answered here: it is live or
        held (not draining: a draining version is on its way out)."""
        return any(
            v.generation == generation and v.state in (VersionState.LIVE, VersionState.CANARY)
            for v in self.reloader.resident()
        )

    def _notice(self, notice: Notice) -> None:
        """Wakes `hold`; discards a version the fleet aborted while it loaded. Runs on the
        reloader's thread (after the version is decidable: see `Reloader._bake_canary`)."""
        discard = None
        with self._lock:
            if isinstance(notice, ReloadFinished) and not notice.drained:
                self._finished.append(notice.event.id)
            elif (
                isinstance(notice, VersionChanged)
                and notice.new is VersionState.CANARY
                and notice.version.generation in self._aborted
            ):
                discard = notice.version.generation
            self._changed.notify_all()
        if discard is not None:
            self._discard(discard, "aborted while it loaded")

    # -- requests and reports ---------------------------------------------------------------

    async def forward(self, generation: int, request: Forwarded) -> AsyncIterator[Head | bytes]:
        """Answer `request` on `generation` (see `bridge.answer`)."""
        headers = ((REPLICA_HEADER.encode(), self.id.encode()),)
        async for item in answer(self.app, request, f"g{generation}", headers):
            yield item

    def describe(self) -> dict[str, object]:
        """This replica's versions and requests in flight, JSON-ready."""
        live = self.reloader.live_version
        resident = [
            {
                "generation": v.generation,
                "version": Path(v.source).name,
                "state": "held" if v.state is VersionState.CANARY else v.state.value,
            }
            for v in self.reloader.resident()
        ]
        return {
            "replica": self.id,
            "pid": os.getpid(),
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

    def metrics(self) -> bytes:
        return self.state.metrics.render()

    def close(self, timeout: float) -> None:
        self.state.close(timeout=timeout)


def replica_config(config: Config, name: str) -> Config:
    """The config a replica's own server runs with: the fleet's, serving `name` from
    whichever version directory the coordinator names (no watcher, no canary of its own)."""
    return replace(config, source=config.repo or ".", repo=None, model_name=name, canary=None)
