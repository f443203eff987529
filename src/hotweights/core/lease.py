"""A request's lease on one resident version, and the bookkeeping a slot keeps per version.

The slot (`core/slot.py`) owns the locks and the decisions; a `Lease` only forwards its
uses and its release to the slot that granted it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Generic, Protocol, TypeVar

from hotweights.core.version import ModelVersion
from hotweights.errors import ModelRetired

ModelT = TypeVar("ModelT")


class Resident(Generic[ModelT]):
    """A version that is live or draining, with its lease bookkeeping (guarded by the
    slot's lock)."""

    __slots__ = ("active", "drained", "held", "leases", "model", "retired", "unloaded", "version")

    def __init__(self, version: ModelVersion, model: ModelT, *, held: bool = False) -> None:
        self.version = version
        self.model: ModelT | None = model
        self.held = held
        """Prepared and not yet committed or withdrawn (never counted as drained)."""
        self.leases = 0
        self.active = 0
        self.retired = False
        self.unloaded = False
        self.drained = threading.Event()


class LeaseOwner(Protocol[ModelT]):
    """The slot side of a lease (`ModelSlot`)."""

    def _begin_use(self, lease: Lease[ModelT]) -> ModelT: ...

    def _end_use(self, entry: Resident[ModelT]) -> None: ...

    def _release(self, entry: Resident[ModelT]) -> None: ...


class Lease(Generic[ModelT]):
    """A request's hold on one version, from admission to its end.

    Sync and async context manager; `release` is idempotent. The lease pins its version:
    it never switches to a newer one. Use the model through `model` (for a quick call) or
    `use()` (for a step that must not overlap an unload); both raise `ModelRetired` once
    the version was retired under the lease. One lease belongs to one request: it is not
    meant to be shared between threads.
    """

    __slots__ = ("_entry", "_released", "_slot")

    def __init__(self, slot: LeaseOwner[ModelT], entry: Resident[ModelT]) -> None:
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
