"""The request-path half of a reloader: what the server may ask of it. Leases on the live
version (or a canary, for its share, or a pinned version), the versions resident and
their leases, the history. Nothing here waits for a load, a validation or a drain."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from hotweights.core.history import VersionHistory
from hotweights.core.lease import Lease
from hotweights.core.slot import ModelSlot
from hotweights.core.version import ModelVersion

ModelT = TypeVar("ModelT")


class ServingView(Generic[ModelT]):
    """Read and lease; never change what is live. Thread-safe. `Reloader` is one."""

    slot: ModelSlot[ModelT]
    history: VersionHistory

    def record(self, generation: int, *, ok: bool, seconds: float, tokens: int = 0) -> None:
        """One finished request, for a canary's judgement (see `Reloader.record`)."""
        raise NotImplementedError

    async def acquire_async(self, *, stable: bool = False) -> Lease[ModelT]:
        """Lease the live version, or the canary for its share of requests; with `stable`
        never the canary (see `ModelSlot.acquire_async`)."""
        return await self.slot.acquire_async(stable=stable)

    def acquire_resident(self, choose: Callable[[ModelVersion], bool]) -> Lease[ModelT] | None:
        """Lease the newest resident version `choose` accepts (see `ModelSlot`): how a
        request pinned to a generation reaches a prepared or draining version."""
        return self.slot.acquire_resident(choose)

    async def retry_on_stable(
        self, lease: Lease[ModelT], *, seconds: float
    ) -> Lease[ModelT] | None:
        """An unpinned request failed on `lease` before its first byte. If the lease is on
        a canary (the only way such a request gets a version newer than the live one),
        count the failure against the canary, release the lease and return a lease on the
        stable version: a bad canary costs latency, not failures. Otherwise return None
        and leave the lease alone (the caller answers with the error)."""
        live = self.slot.live_version
        if live is None or lease.generation <= live.generation:
            return None
        self.record(lease.generation, ok=False, seconds=seconds)
        lease.release()
        return await self.slot.acquire_async(stable=True)

    @property
    def live_version(self) -> ModelVersion | None:
        return self.slot.live_version

    @property
    def canary_version(self) -> ModelVersion | None:
        """The version baking as a canary, if one is."""
        return self.slot.canary_version

    def resident(self) -> list[ModelVersion]:
        """Versions with a loaded model: prepared, canary, live, draining; newest first."""
        return self.slot.resident()

    def inflight(self) -> dict[int, int]:
        """Leases held now, by generation."""
        return self.slot.inflight()

    def models(self) -> list[tuple[ModelVersion, ModelT]]:
        """The resident versions with their loaded models, newest first (for status)."""
        return self.slot.resident_models()

    def versions(self) -> list[ModelVersion]:
        """The versions that were numbered (prepared or live), newest first (bounded)."""
        return self.history.history()

    def last_live(self) -> ModelVersion | None:
        """The version numbered last, even if it is no longer resident."""
        return self.history.current_version()

    @property
    def generation(self) -> int:
        return self.history.generation
