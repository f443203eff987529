"""An injected fault for the fleet's Ray tests: a loader that fails a version's load on
exactly one replica (whichever claims it first), shipped to the replicas by value."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hotweights.config import Config
from hotweights.core import Loader
from hotweights.errors import LoadError
from hotweights.server.runner import transformers_loader

FAULT_FILE = "fail-on-one-replica"
"""A version directory holding this file fails to load on one replica; the others load
it (the file is not part of the model, and the publisher copies it like any other)."""


class OneReplicaFails:
    """The transformers loader, except that the first replica to load a version holding
    `FAULT_FILE` fails with a `LoadError` (a claim file next to the version decides)."""

    def __init__(self, config: Config) -> None:
        self._inner: Loader[Any] = transformers_loader(config)

    def load(self, source: str) -> Any:
        if (Path(source) / FAULT_FILE).exists():
            claim = Path(source).parent / f".claimed-{Path(source).name}"
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                raise LoadError(f"{source}: injected fault on replica pid {os.getpid()}")
        return self._inner.load(source)

    def validate(self, model: Any) -> None:
        self._inner.validate(model)

    def warmup(self, model: Any) -> None:
        self._inner.warmup(model)

    def unload(self, model: Any) -> None:
        self._inner.unload(model)

    def fingerprint(self, source: str) -> str:
        fingerprint: str = self._inner.fingerprint(source)  # type: ignore[attr-defined]
        return fingerprint

    def estimate_bytes(self, source: str) -> int:
        estimate: int = self._inner.estimate_bytes(source)  # type: ignore[attr-defined]
        return estimate


def one_replica_fails(config: Config) -> Loader[Any]:
    return OneReplicaFails(config)
