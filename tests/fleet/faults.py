"""Injected faults and probes for the fleet's Ray tests, in a loader shipped to the
replicas by value: a version's load fails on exactly one replica (whichever claims it
first), waits until the test releases it, or records how many loads of it overlapped."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from hotweights.config import Config
from hotweights.core import Loader
from hotweights.errors import LoadError
from hotweights.server.assembly import transformers_loader

FAULT_FILE = "fail-on-one-replica"
"""A version directory holding this file fails to load on one replica; the others load
it (the file is not part of the model, and the publisher copies it like any other)."""
HOLD_FILE = "hold-until-released"
"""A version directory holding this file loads only once `released(version)` exists (or
after `HOLD_LIMIT_S`): a test can act while every replica is in prepare."""
HOLD_LIMIT_S = 60.0
PROBE_FILE = "probe-overlaps"
"""A version directory holding this file has each load record how many loads of versions
holding it (of any model) ran at once (`overlaps`)."""
PROBE_WAIT_S = 1.5
"""How long a probed load stays in, waiting for company: a correct bound never fails by
it; a broken one is caught when two loads begin within it of each other."""


def probes(root: Path) -> Path:
    """The folder where the probed loads under repository `root` leave their marks."""
    return root / ".probes"


def overlaps(root: Path) -> list[int]:
    """How many probed loads ran at once, as each load saw it at its busiest."""
    return sorted(int(p.read_text()) for p in probes(root).glob("seen-*"))


def released(source: Path) -> Path:
    """The file whose creation lets a held version's loads go on (beside the version)."""
    return source.parent / f".released-{source.name}"


class OneReplicaFails:
    """The transformers loader, except that the first replica to load a version holding
    `FAULT_FILE` fails with a `LoadError` (a claim file next to the version decides)."""

    def __init__(self, config: Config) -> None:
        self._inner: Loader[Any] = transformers_loader(config)

    def load(self, source: str) -> Any:
        if (Path(source) / PROBE_FILE).exists():
            self._probe(Path(source))
        if (Path(source) / HOLD_FILE).exists():
            deadline = time.monotonic() + HOLD_LIMIT_S
            while not released(Path(source)).exists() and time.monotonic() < deadline:
                time.sleep(0.02)  # another process decides: the filesystem is the signal
        if (Path(source) / FAULT_FILE).exists():
            claim = Path(source).parent / f".claimed-{Path(source).name}"
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                pass
            else:
                raise LoadError(f"{source}: injected fault on replica pid {os.getpid()}")
        return self._inner.load(source)

    def _probe(self, source: Path) -> None:
        """Be in while other probed loads come or `PROBE_WAIT_S` passes; write down the
        most loads (this one included) seen in at once."""
        folder = probes(source.parents[1])
        folder.mkdir(exist_ok=True)
        name = f"{source.parent.name}-{source.name}-{os.getpid()}"
        mark = folder / f"in-{name}"
        mark.touch()
        seen = 1
        deadline = time.monotonic() + PROBE_WAIT_S
        try:
            while time.monotonic() < deadline and seen < 2:
                seen = max(seen, len(list(folder.glob("in-*"))))
                time.sleep(0.02)  # the other loads are other processes: the folder is the signal
        finally:
            mark.unlink()
        (folder / f"seen-{name}").write_text(str(seen))

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
