"""The `Loader` role: turns a source into a runnable model and back into nothing.

A loader is handed to a `Reloader`; the reloader calls it from its worker thread, never
from the request path, one call at a time. Constructors are cheap: all heavy work happens
in `load`, `validate`, `warmup` and `unload`.
"""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

ModelT = TypeVar("ModelT")
ModelT_co = TypeVar("ModelT_co", covariant=True)


class Loader(Protocol[ModelT]):
    """Loads, checks and releases one kind of model.

    Called only by the reloader's worker thread (and the slot's drain threads for
    `unload`), so implementations need not be thread-safe across calls, but `unload` may
    run while a later version is being loaded.
    """

    def load(self, source: str) -> ModelT:
        """Read `source` and return a model. Raise `LoadError` (or `TransientLoadError`
        for a failure worth retrying); any other exception also fails the reload."""
        ...

    def validate(self, model: ModelT) -> None:
        """Check that `model` is fit to serve; raise `ValidationError` if not."""
        ...

    def warmup(self, model: ModelT) -> None:
        """Exercise `model` so the first real requests after a swap do not stall."""
        ...

    def unload(self, model: ModelT) -> None:
        """Release everything `model` holds. Called exactly once per loaded model, after
        its last request, or after the drain deadline, or when it failed to go live."""
        ...


@runtime_checkable
class Fingerprinting(Protocol):
    """Optional: a loader that can name a source's content with a short digest."""

    def fingerprint(self, source: str) -> str:
        """A content digest of `source` (hex), computed without loading it."""
        ...


@runtime_checkable
class SizeEstimating(Protocol):
    """Optional: a loader that can estimate the memory a source will take once loaded."""

    def estimate_bytes(self, source: str) -> int:
        """Approximate resident size of `source` once loaded, in bytes."""
        ...


@runtime_checkable
class Closing(Protocol):
    """Optional: a loader that holds something of its own beyond its models (a helper
    process, say), released by `close`."""

    def close(self) -> None:
        """Release what the loader holds. Called once, by whoever built the loader, after
        its reloader has closed (no load runs any more); a later load may start it again."""
        ...


@runtime_checkable
class LibraryImporting(Protocol):
    """Optional: a loader whose libraries take long to import, imported ahead of the first
    load (so a process can freeze its startup heap with them in it)."""

    def import_libraries(self) -> None:
        """Import what `load` needs (and start any helper it uses). Called once, before the
        first load, from the thread that starts serving; safe to skip."""
        ...


@runtime_checkable
class BaseBound(Protocol[ModelT_co]):
    """Optional: a loader of adapters, whose versions are bound to a version of a base
    model (a LoRA adapter): each loaded adapter holds a lease on the base version it was
    loaded on, so that version stays resident while the adapter version does."""

    def load_on(self, source: str, base_generation: int | None) -> ModelT_co:
        """`load`, on the base model's `base_generation` (resident: live or prepared), or
        on its live version when None. Raises `LoadError` when that version is not
        resident, or the adapter does not fit it."""
        ...
