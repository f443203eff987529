"""The slot that holds the live version, and the leases requests take on it.

Admission (`acquire`) is a lock, a reference read and a counter increment: it never waits
for a load, a validation or a drain. The swap (`publish`) is one reference assignment
under the same lock. A version that stops being live drains: `drain` waits until its last
lease is released or its deadline passes, then marks it retired (leases still held raise
`ModelRetired` on their next use), waits for steps already running to return, and calls
`unload` exactly once.

A prepared version (`hold`) is resident beside the live one and reachable only through
`acquire_resident` (a request pinned to its generation). During a canary's bake it
(`start_canary`) takes a fixed share of new admissions, spread evenly (every tenth request
for 10%). `commit_together` makes prepared versions live, in one or several slots at once,
under all their locks: no request sees one slot's new version beside another's old one.
`withdraw_prepared` stops admitting to one, so that it drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from hotweights.core.lease import Lease, Resident
from hotweights.core.version import ModelVersion, VersionState
from hotweights.errors import ModelRetired, NotReady

ModelT = TypeVar("ModelT")
log = logging.getLogger("hotweights.reload")

_WHOLE = 1_000_000
StateCallback = Callable[[ModelVersion, VersionState, VersionState], None]


@dataclass(frozen=True)
class DrainReport:
    """How a drain ended."""

    generation: int
    seconds: float
    """From the start of the drain to the end of unload."""
    stuck_leases: int
    """Leases still held at the deadline; they get `ModelRetired` on their next use."""


class ModelSlot(Generic[ModelT]):
    """Holds the live version of one model and every version still draining.

    Thread-safe. `acquire`/`acquire_async`/`acquire_resident` are the request path;
    `hold`, `start_canary`, `commit_together`, `withdraw_prepared`, `withdraw`, `drain` and
    `end_gap` belong to the reloader.
    """

    def __init__(
        self,
        unload: Callable[[ModelT], None],
        *,
        admission_timeout: float = 30.0,
        on_state: StateCallback | None = None,
    ) -> None:
        self._unload = unload
        self.admission_timeout = admission_timeout
        self._on_state = on_state
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._live: Resident[ModelT] | None = None
        self._canary: Resident[ModelT] | None = None
        self._share = 0
        self._credit = 0
        self._residents: dict[int, Resident[ModelT]] = {}
        self._gap = False
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    # -- request path -------------------------------------------------------------------

    def acquire(self, timeout: float | None = None, *, stable: bool = False) -> Lease[ModelT]:
        """Lease the live version (or, for its share, the canary; never with `stable`).
        If a swap has taken the live version down (the `resource` policy), wait up to
        `timeout` (default: the admission timeout) for the next one; raise `NotReady` if
        none is live or none arrives in time."""
        with self._lock:
            entry = self._admit(stable)
            if entry is None:
                entry = self._wait_live(self.admission_timeout if timeout is None else timeout)
            entry.leases += 1
        return Lease(self, entry)

    async def acquire_async(
        self, timeout: float | None = None, *, stable: bool = False
    ) -> Lease[ModelT]:
        """`acquire` for the event loop: waits without blocking the loop."""
        limit = self.admission_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            with self._lock:
                entry = self._admit(stable)
                if entry is not None:
                    entry.leases += 1
                    return Lease(self, entry)
                if not self._gap:
                    raise NotReady("no model version is live")
                loop = asyncio.get_running_loop()
                waiter: asyncio.Future[None] = loop.create_future()
                self._async_waiters.append((loop, waiter))
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                raise NotReady(
                    f"no model version became live within the admission timeout ({limit:g} s)"
                ) from None
            finally:
                with self._lock:
                    if (loop, waiter) in self._async_waiters:
                        self._async_waiters.remove((loop, waiter))

    def acquire_resident(self, choose: Callable[[ModelVersion], bool]) -> Lease[ModelT] | None:
        """Lease the newest resident version (live, or draining with leases still held)
        that `choose` accepts; None if there is none. A draining version whose last lease
        was already released is on its way out and is never chosen."""
        with self._lock:
            for generation in sorted(self._residents, reverse=True):
                entry = self._residents[generation]
                if entry.retired or (entry is not self._live and entry.drained.is_set()):
                    continue
                if choose(entry.version):
                    entry.leases += 1
                    return Lease(self, entry)
        return None

    def _admit(self, stable: bool) -> Resident[ModelT] | None:
        # Called with the lock held: the live entry, or the canary's turn.
        canary = self._canary
        if canary is None or stable or self._live is None:
            return self._live
        self._credit += self._share  # in millionths: exact shares, no float drift
        if self._credit >= _WHOLE:
            self._credit -= _WHOLE
            return canary
        return self._live

    def _wait_live(self, timeout: float) -> Resident[ModelT]:
        # Called with the lock held (through the condition).
        if not self._gap:
            raise NotReady("no model version is live")
        if not self._changed.wait_for(lambda: self._live is not None or not self._gap, timeout):
            raise NotReady(
                f"no model version became live within the admission timeout ({timeout:g} s)"
            )
        if self._live is None:
            raise NotReady("the reload that took the live version down did not bring one up")
        return self._live

    def _release(self, entry: Resident[ModelT]) -> None:
        with self._lock:
            entry.leases -= 1
            if entry.leases == 0 and not self._serving(entry):
                entry.drained.set()

    def _begin_use(self, lease: Lease[ModelT]) -> ModelT:
        with self._lock:
            lease.check()
            entry = lease._entry
            entry.active += 1
            model = entry.model
        if model is None:  # pragma: no cover - retired implies check() raised
            raise ModelRetired(f"version {entry.version.label} was unloaded")
        return model

    def _end_use(self, entry: Resident[ModelT]) -> None:
        with self._lock:
            entry.active -= 1
            if entry.active == 0 and entry.retired:
                self._changed.notify_all()

    # -- reloader side ------------------------------------------------------------------

    @property
    def live_version(self) -> ModelVersion | None:
        entry = self._live
        return entry.version if entry else None

    @property
    def canary_version(self) -> ModelVersion | None:
        entry = self._canary
        return entry.version if entry else None

    @property
    def in_gap(self) -> bool:
        """True while a swap has taken the live version down and admissions wait."""
        return self._gap

    def inflight(self) -> dict[int, int]:
        """Leases held, by generation, for every live or draining version."""
        with self._lock:
            return {gen: entry.leases for gen, entry in self._residents.items()}

    def resident(self) -> list[ModelVersion]:
        """Versions loaded (prepared, canary, live or draining), newest first."""
        with self._lock:
            entries = sorted(self._residents.items(), reverse=True)
        return [entry.version for _, entry in entries]

    def resident_models(self) -> list[tuple[ModelVersion, ModelT]]:
        """`resident`, each with its loaded model."""
        with self._lock:
            entries = sorted(self._residents.items(), reverse=True)
        return [(entry.version, entry.model) for _, entry in entries if entry.model is not None]

    def hold(self, version: ModelVersion, model: ModelT) -> None:
        """Make `version` (already PREPARED, with its generation) resident beside the live
        one, reachable only through `acquire_resident`."""
        with self._lock:
            if version.generation in self._residents:
                raise ValueError(f"generation {version.generation} is already resident")
            self._residents[version.generation] = Resident(version, model, held=True)

    def start_canary(self, generation: int, share: float) -> None:
        """Give the prepared `generation` `share` of new admissions beside the live
        version, which stays live; the version becomes CANARY."""
        with self._lock:
            entry = self._residents.get(generation)
            if entry is None or not entry.held or self._live is None or self._canary:
                raise ValueError(
                    f"g{generation}: a canary needs a prepared version, a live one and "
                    "no other canary"
                )
            self._canary = entry
            self._share = round(share * _WHOLE)
            self._credit = 0
        self._transition(entry.version, VersionState.CANARY)

    @staticmethod
    def commit_together(
        moves: Sequence[tuple[ModelSlot[Any], int]], *, first: Callable[[], None] | None = None
    ) -> list[int | None]:
        """Make each prepared (or canary) generation live in its slot, all in one step:
        every slot's lock is held while the references change. `first` is called under
        those locks before anything changes (it may read `live_version`, not call the
        slots' other methods); if it raises, nothing swaps. Returns, per move, the
        generation that stopped being live (now DRAINING; the caller must `drain` it)."""
        slots = sorted({id(slot): slot for slot, _ in moves}.values(), key=id)
        if len(slots) != len(moves):
            raise ValueError("one commit can make only one version live per model")
        with contextlib.ExitStack() as locks:
            for slot in slots:
                locks.enter_context(slot._lock)
            if first is not None:
                first()
            entries = [slot._committable(generation) for slot, generation in moves]  # may raise
            olds = [slot._swap(entry) for (slot, _), entry in zip(moves, entries, strict=True)]
        # Swapped: from here on nothing may stop the old versions from being drained.
        for (slot, _), entry, old in zip(moves, entries, olds, strict=True):
            slot._transition(entry.version, VersionState.LIVE)
            if old is not None:
                slot._transition(old.version, VersionState.DRAINING)
        return [old.version.generation if old is not None else None for old in olds]

    def withdraw_prepared(self, generation: int) -> int:
        """Stop admitting to the prepared (or canary) `generation`; returns it (now
        DRAINING), and the caller must `drain` it."""
        with self._lock:
            entry = self._residents.get(generation)
            if entry is None or not (entry.held or entry is self._canary):
                raise ValueError(f"generation {generation} is not prepared")
            entry.held = False
            if entry is self._canary:
                self._canary = None
            if entry.leases == 0:
                entry.drained.set()
        self._transition(entry.version, VersionState.DRAINING)
        return generation

    def _committable(self, generation: int) -> Resident[ModelT]:
        # Called with the lock held.
        entry = self._residents.get(generation)
        if entry is None or not (entry.held or entry is self._canary):
            raise ValueError(f"generation {generation} is not prepared")
        return entry

    def _swap(self, entry: Resident[ModelT]) -> Resident[ModelT] | None:
        # Called with the lock held: the one reference assignment of a commit.
        old = self._live
        self._live = entry
        entry.held = False
        if entry is self._canary:
            self._canary = None
        self._gap = False
        if old is not None and old.leases == 0:
            old.drained.set()
        self._wake_waiters()
        return old

    def _serving(self, entry: Resident[ModelT]) -> bool:
        # Called with the lock held: whether new or pinned requests may still reach it.
        return entry is self._live or entry is self._canary or entry.held

    def withdraw(self) -> int | None:
        """Take the live version down and make admissions wait for the next commit (or
        `end_gap`). Returns the generation now draining, if there was one."""
        with self._lock:
            old = self._live
            self._live = None
            self._gap = True
            if old is not None and old.leases == 0:
                old.drained.set()
        if old is None:
            return None
        self._transition(old.version, VersionState.DRAINING)
        return old.version.generation

    def end_gap(self) -> None:
        """Stop holding admissions: waiting requests get `NotReady` unless one is live."""
        with self._lock:
            self._gap = False
            self._wake_waiters()

    def drain(self, generation: int, timeout: float) -> DrainReport:
        """Wait for the last lease on `generation` or for `timeout` seconds, then retire
        and unload it. Blocks; called by the reloader (or a drain thread it started)."""
        started = time.monotonic()
        with self._lock:
            entry = self._residents.get(generation)
            if entry is None or self._serving(entry):
                raise ValueError(f"generation {generation} is not draining")
        entry.drained.wait(timeout)
        with self._lock:
            entry.retired = True
            stuck = entry.leases
            # Steps already inside `use()` finish before the model goes away.
            self._changed.wait_for(lambda: entry.active == 0)
            del self._residents[generation]
            model, entry.model = entry.model, None
        try:
            if model is not None and not entry.unloaded:
                entry.unloaded = True
                self._unload(model)
        except Exception:  # the version is gone from the slot either way; say so, go on
            log.exception("unloading %s raised", entry.version.label)
        finally:
            self._transition(entry.version, VersionState.RETIRED)
        return DrainReport(generation, time.monotonic() - started, stuck)

    def _wake_waiters(self) -> None:
        # Called with the lock held.
        self._changed.notify_all()
        for loop, waiter in self._async_waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed meanwhile
                loop.call_soon_threadsafe(_resolve, waiter)
        self._async_waiters.clear()

    def _transition(self, version: ModelVersion, new: VersionState) -> None:
        old = version.transition(new)
        if self._on_state is not None:
            self._on_state(version, old, new)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
