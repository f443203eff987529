"""The slot that holds the live version, and the leases requests take on it.

Admission (`acquire`) is a lock, a reference read and a counter increment: it never waits
for a load, a validation or a drain. The swap (`publish`) is one reference assignment
under the same lock. A version that stops being live drains: `drain` waits until its last
lease is released or its deadline passes, then marks it retired (leases still held raise
`ModelRetired` on their next use), waits for steps already running to return, and calls
`unload` exactly once.

During a canary's bake a second version (`publish_canary`) takes a fixed share of new
admissions, spread evenly (every tenth request for 10%), until it is promoted to live or
withdrawn to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar

from hotweights.core.version import ModelVersion, VersionState
from hotweights.errors import ModelRetired, NotReady

ModelT = TypeVar("ModelT")

_WHOLE = 1_000_000
StateCallback = Callable[[ModelVersion, VersionState, VersionState], None]


class _Resident(Generic[ModelT]):
    """A version that is live or draining, with its lease bookkeeping (guarded by the
    slot's lock)."""

    __slots__ = ("active", "drained", "leases", "model", "retired", "unloaded", "version")

    def __init__(self, version: ModelVersion, model: ModelT) -> None:
        self.version = version
        self.model: ModelT | None = model
        self.leases = 0
        self.active = 0
        self.retired = False
        self.unloaded = False
        self.drained = threading.Event()


@dataclass(frozen=True)
class DrainReport:
    """How a drain ended."""

    generation: int
    seconds: float
    """From the start of the drain to the end of unload."""
    stuck_leases: int
    """Leases still held at the deadline; they get `ModelRetired` on their next use."""


class Lease(Generic[ModelT]):
    """A request's hold on one version, from admission to its end.

    Sync and async context manager; `release` is idempotent. The lease pins its version:
    it never switches to a newer one. Use the model through `model` (for a quick call) or
    `use()` (for a step that must not overlap an unload); both raise `ModelRetired` once
    the version was retired under the lease. One lease belongs to one request: it is not
    meant to be shared between threads.
    """

    __slots__ = ("_entry", "_released", "_slot")

    def __init__(self, slot: ModelSlot[ModelT], entry: _Resident[ModelT]) -> None:
        self._slot = slot
        self._entry = entry
        self._released = False

    @property
    def version(self) -> ModelVersion:
        return self._entry.version

    @property
    def generation(self) -> int:
        return self._entry.version.generation

    @property
    def released(self) -> bool:
        return self._released

    @property
    def model(self) -> ModelT:
        """The pinned model; raises `ModelRetired` if the version was retired."""
        self.check()
        model = self._entry.model
        if model is None:  # unreachable while check() passes; kept for the type checker
            raise ModelRetired(f"version {self._entry.version.label} was unloaded")
        return model

    def check(self) -> None:
        """Raise `ModelRetired` if the version was retired, or the lease released."""
        if self._released:
            raise ModelRetired(f"lease on {self._entry.version.label} was already released")
        if self._entry.retired:
            raise ModelRetired(
                f"version {self._entry.version.label} passed its drain deadline and was "
                "retired while this request was still running"
            )

    @contextmanager
    def use(self) -> Iterator[ModelT]:
        """Run one step on the model; unload will not start until the step returns."""
        model = self._slot._begin_use(self)
        try:
            yield model
        finally:
            self._slot._end_use(self._entry)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._slot._release(self._entry)

    def __enter__(self) -> Lease[ModelT]:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> Lease[ModelT]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class ModelSlot(Generic[ModelT]):
    """Holds the live version of one model and every version still draining.

    Thread-safe. `acquire`/`acquire_async` are the request path; `publish`, `withdraw`,
    `drain` and `end_gap` belong to the reloader.
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
        self._live: _Resident[ModelT] | None = None
        self._canary: _Resident[ModelT] | None = None
        self._share = 0
        self._credit = 0
        self._residents: dict[int, _Resident[ModelT]] = {}
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

    def _admit(self, stable: bool) -> _Resident[ModelT] | None:
        # Called with the lock held: the live entry, or the canary's turn.
        canary = self._canary
        if canary is None or stable or self._live is None:
            return self._live
        self._credit += self._share  # in millionths: exact shares, no float drift
        if self._credit >= _WHOLE:
            self._credit -= _WHOLE
            return canary
        return self._live

    def _wait_live(self, timeout: float) -> _Resident[ModelT]:
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

    def _release(self, entry: _Resident[ModelT]) -> None:
        with self._lock:
            entry.leases -= 1
            if entry.leases == 0 and entry is not self._live and entry is not self._canary:
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

    def _end_use(self, entry: _Resident[ModelT]) -> None:
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
        """Versions live or draining (still loaded), newest first."""
        with self._lock:
            entries = sorted(self._residents.items(), reverse=True)
        return [entry.version for _, entry in entries]

    def resident_models(self) -> list[tuple[ModelVersion, ModelT]]:
        """`resident`, each with its loaded model."""
        with self._lock:
            entries = sorted(self._residents.items(), reverse=True)
        return [(entry.version, entry.model) for _, entry in entries if entry.model is not None]

    def publish(self, version: ModelVersion, model: ModelT) -> int | None:
        """Make `version` (already LIVE, with its generation) the one new leases get.
        Returns the generation that stopped being live (now DRAINING), if any; the caller
        must `drain` it."""
        entry = _Resident(version, model)
        with self._lock:
            old = self._live
            self._residents[version.generation] = entry
            self._live = entry  # the swap
            self._gap = False
            if old is not None and old.leases == 0:
                old.drained.set()
            self._wake_waiters()
        if old is None:
            return None
        self._transition(old.version, VersionState.DRAINING)
        return old.version.generation

    def publish_canary(self, version: ModelVersion, model: ModelT, share: float) -> None:
        """Give `version` (already CANARY, with its generation) `share` of new admissions
        beside the live version, which stays live."""
        entry = _Resident(version, model)
        with self._lock:
            if self._live is None or self._canary is not None:
                raise ValueError("a canary needs a live version and no other canary")
            self._residents[version.generation] = entry
            self._canary = entry
            self._share = round(share * _WHOLE)
            self._credit = 0

    def promote_canary(self) -> int:
        """Make the canary the live version; returns the generation that stopped being
        live (now DRAINING), which the caller must `drain`."""
        with self._lock:
            canary, old = self._canary, self._live
            if canary is None or old is None:
                raise ValueError("no canary to promote")
            self._live, self._canary = canary, None
            if old.leases == 0:
                old.drained.set()
        self._transition(canary.version, VersionState.LIVE)
        self._transition(old.version, VersionState.DRAINING)
        return old.version.generation

    def withdraw_canary(self) -> int:
        """Stop admitting to the canary; returns its generation (now DRAINING), which the
        caller must `drain`."""
        with self._lock:
            canary, self._canary = self._canary, None
            if canary is None:
                raise ValueError("no canary to withdraw")
            if canary.leases == 0:
                canary.drained.set()
        self._transition(canary.version, VersionState.DRAINING)
        return canary.version.generation

    def withdraw(self) -> int | None:
        """Take the live version down and make admissions wait for the next `publish`
        (or `end_gap`). Returns the generation now draining, if there was one."""
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
        if entry is None or entry is self._live or entry is self._canary:
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
