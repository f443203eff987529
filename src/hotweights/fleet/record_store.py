"""Where the fleet's record lives (`--fleet-state`): strategies behind one `RecordStore`.

- `repo` (the default): `ROOT/.hotweights-fleet.json` beside the versions (`FleetLedger`).
  It lasts as long as the repository: bad marks and pins outlive the Ray cluster.
- `ray-kv`: Ray's internal key-value store (held by the cluster's GCS), under a key named
  by the repository's resolved path, so the repository need not be writable. It lasts as
  long as the cluster: a coordinator restart and a stop and start of the fleet on a
  cluster that goes on keep it; a cluster that stops takes it along (unless its GCS is
  made fault tolerant with external storage, which is Ray's business).

Both write the whole record in one step (a rename; one `put`), so a reader sees the old
record or the new one. Neither is thread-safe on its own: the coordinator saves under its
record lock.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from hotweights.fleet.ledger import LEDGER_NAME, FleetLedger, Record, read_record, record_text
from hotweights.fleet.settings import FLEET_STATES, FleetState

log = logging.getLogger("hotweights.fleet")
KV_NAMESPACE = "hotweights-fleet"
"""The internal KV namespace the fleet's records are kept in (one key per repository)."""


class RecordStore(Protocol):
    """Keeps the fleet's record. Called by the coordinator only, under its record lock."""

    @property
    def where(self) -> str:
        """Where the record is, in words for errors and `/admin/fleet`."""

    def load(self) -> Record:
        """The record kept; an empty one if there is none. Raises `ValueError` naming
        `where` if what is kept cannot be read as a record."""

    def save(self, record: Record) -> None:
        """Replace the record whole. Raises `OSError` if it cannot be kept (then the one
        before is still there)."""


Get = Callable[[bytes], bytes | None]
Put = Callable[[bytes, bytes], object]


class RayKvStore:
    """The record in Ray's internal key-value store. `get` and `put` default to
    `ray.experimental.internal_kv` in this process, which must be connected to the
    cluster (a Ray actor, such as the coordinator, is)."""

    def __init__(self, repo: str | Path, get: Get | None = None, put: Put | None = None) -> None:
        self.key = f"record:{os.path.realpath(repo)}".encode()
        if get is None or put is None:
            get, put = _internal_kv()
        self._get, self._put = get, put

    @property
    def where(self) -> str:
        return f"Ray internal KV {KV_NAMESPACE}/{self.key.decode()}"

    def load(self) -> Record:
        try:
            raw = self._get(self.key)
        except Exception as exc:  # the GCS could not be reached
            raise ValueError(f"cannot read the fleet's record {self.where}: {exc}") from exc
        return Record() if raw is None else read_record(raw, self.where)

    def save(self, record: Record) -> None:
        try:
            self._put(self.key, record_text(record).encode())
        except Exception as exc:
            raise OSError(f"cannot write the fleet's record {self.where}: {exc}") from exc


def _internal_kv() -> tuple[Get, Put]:
    from ray.experimental import internal_kv

    if not internal_kv._internal_kv_initialized():
        raise ValueError("the ray-kv fleet state needs a process connected to Ray")

    def get(key: bytes) -> bytes | None:
        value: bytes | None = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
        return value

    def put(key: bytes, value: bytes) -> object:
        return internal_kv._internal_kv_put(key, value, overwrite=True, namespace=KV_NAMESPACE)

    return get, put


def make_store(kind: FleetState, repo: str | Path) -> RecordStore:
    """The store `--fleet-state` names, for the repository at `repo`."""
    if kind == "repo":
        return FleetLedger(Path(repo) / LEDGER_NAME)
    if kind == "ray-kv":
        return RayKvStore(repo)
    raise ValueError(f"fleet state must be one of {', '.join(FLEET_STATES)}, got {kind!r}")


class FleetRecord:
    """The record every model's part is kept in, its store, and the generation count.
    Thread-safe: every change of the record and every save holds `lock`."""

    def __init__(self, store: RecordStore, record: Record) -> None:
        self.store = store
        self.record = record
        self.lock = threading.RLock()

    def issue(self) -> int:
        """A new generation number, for any model (kept with the next save)."""
        with self.lock:
            generation = self.record.next_generation
            self.record.next_generation += 1
        return generation

    def save(self) -> None:
        """Keep the record. Raises `OSError` if it cannot."""
        with self.lock:
            self.store.save(self.record)

    def save_quietly(self) -> None:
        """Keep the record; a failure is logged (what it loses is redone on a restart)."""
        try:
            self.save()
        except OSError as exc:
            log.error("the fleet's record %s could not be written: %s", self.store.where, exc)
