"""The coordinator's durable record, and its first home: a JSON file beside the versions
it is about (`record_store.py` has the other, Ray's key-value store).

A coordinator that dies (its process killed, its node lost) is restarted by Ray and reads
this record to carry on: for each model it serves, the generation the fleet committed, the
cutover in progress and how far it got, the versions marked bad with their reasons and the
pin; for the fleet, the next generation number (one count for every model: a generation is
never reused, invariant 5). The file is `ROOT/.hotweights-fleet.json`: hidden, so the
repository's scan never takes it for a model, and it lasts as long as the repository, so
bad marks and pins survive a stop and start of the fleet as well. A record written by a
fleet of one model (before it served several) has the same shape with one entry under
`models`, and reads as it is.

```
 cutover:  none ──► PREPARING ──► COMMITTED ──► none      (finished)
                        │
                        └────────────────────► none       (aborted)
```

A coordinator that restarts with a cutover in PREPARING aborts it (nothing was routed to
it); one in COMMITTED finishes it (requests may already carry the new generation).

Written whole each time, atomically (a temporary file, fsync, rename, fsync of the
directory): a reader sees the old record or the new one, never a mix. Not thread-safe on
its own: the coordinator calls it under its lock.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hotweights.errors import UnknownVersion
from hotweights.fleet.model_replica import Target
from hotweights.sources import ModelRepository
from hotweights.sources.layout import Signature
from hotweights.sources.version_policy import Pinned

log = logging.getLogger("hotweights.fleet")
LEDGER_NAME = ".hotweights-fleet.json"
FORMAT = 1


class Phase(Enum):
    """How far the cutover in progress got."""

    PREPARING = "preparing"
    """Replicas are preparing its version; nothing is routed to it."""
    COMMITTED = "committed"
    """The fleet committed it; the old generation drains, then every replica finishes."""


@dataclass(frozen=True)
class Pending:
    """The cutover in progress."""

    target: Target
    number: int
    """Its repository version."""
    phase: Phase
    previous: Target
    """The generation committed before it (draining once it is committed)."""
    trigger: str = "watch"


@dataclass(frozen=True)
class Mark:
    """A version marked bad, why, and the files it had then (a change clears the mark)."""

    reason: str
    signature: Signature | None = None


@dataclass
class ModelRecord:
    """One model's part of the record."""

    committed: Target | None = None
    number: int | None = None
    """The committed generation's repository version."""
    pending: Pending | None = None
    pin: Pinned | None = None
    bad: dict[int, Mark] = field(default_factory=dict)
    interrupted: dict[int, int] = field(default_factory=dict)
    """Versions whose prepare a coordinator died in, and how often."""


@dataclass
class Record:
    """The whole record."""

    fleet: str = ""
    """The fleet that wrote it (`deployment.start` names each fleet it starts)."""
    starts: int = 0
    """How often that fleet's coordinator started (1: never restarted)."""
    next_generation: int = 1
    models: dict[str, ModelRecord] = field(default_factory=dict)

    def model(self, name: str) -> ModelRecord:
        return self.models.setdefault(name, ModelRecord())


class FleetLedger:
    """Reads and writes the record at `path` (the `repo` store of `record_store.py`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def where(self) -> str:
        return str(self.path)

    def load(self) -> Record:
        """The record on disk; an empty one if there is none. Raises `ValueError` naming
        the file if it cannot be read as a record."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return Record()
        except OSError as exc:
            raise ValueError(f"cannot read the fleet's record {self.path}: {exc}") from exc
        return read_record(raw, self.where)

    def save(self, record: Record) -> None:
        """Replace the record on disk in one rename. Raises `OSError` if it cannot."""
        text = record_text(record)
        directory = self.path.parent
        handle, temporary = tempfile.mkstemp(prefix=".hotweights-fleet.", dir=directory)
        try:
            with os.fdopen(handle, "w") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def restore(entry: ModelRecord, repository: ModelRepository, model: str) -> None:
    """Give `repository` the pin and the bad marks `entry` kept for `model` (the pin
    first: it clears its version's mark), then scan so that the marks count. A pin of a
    version that is gone is dropped from `entry`."""
    if entry.pin is not None:
        try:
            repository.pin(model, entry.pin.version, reason=entry.pin.reason)
        except UnknownVersion as exc:
            log.warning("the fleet's pin of v%d is dropped: %s", entry.pin.version, exc)
            entry.pin = None
    for number, mark in entry.bad.items():
        repository.mark_bad(model, number, mark.reason, signature=mark.signature)
    repository.scan()


def record_text(record: Record) -> str:
    """The record as JSON text (what every store keeps)."""
    return json.dumps(_json(record), indent=1, sort_keys=True)


def read_record(text: str | bytes, where: str) -> Record:
    """The record in `text`. Raises `ValueError` naming `where` (the file or key it came
    from) if it is not one."""
    try:
        return _record(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"the fleet's record {where} is unreadable: {exc!r}") from exc


def _json(record: Record) -> dict[str, object]:
    return {
        "format": FORMAT,
        "fleet": record.fleet,
        "starts": record.starts,
        "next_generation": record.next_generation,
        "models": {name: _model_json(model) for name, model in record.models.items()},
    }


def _model_json(model: ModelRecord) -> dict[str, object]:
    pending = model.pending
    return {
        "committed": _target_json(model.committed) if model.committed else None,
        "number": model.number,
        "pending": None
        if pending is None
        else {
            "target": _target_json(pending.target),
            "number": pending.number,
            "phase": pending.phase.value,
            "previous": _target_json(pending.previous),
            "trigger": pending.trigger,
        },
        "pin": None
        if model.pin is None
        else {"version": model.pin.version, "reason": model.pin.reason},
        "bad": {
            str(number): {"reason": mark.reason, "signature": mark.signature}
            for number, mark in model.bad.items()
        },
        "interrupted": {str(number): count for number, count in model.interrupted.items()},
    }


def _target_json(target: Target) -> dict[str, object]:
    return {
        "generation": target.generation,
        "source": target.source,
        "description": target.description,
        "base_generation": target.base_generation,
        "followers": [[name, generation] for name, generation in target.followers],
    }


def _record(raw: object) -> Record:
    if not isinstance(raw, dict):
        raise TypeError("the record is not an object")
    if raw.get("format") != FORMAT:
        raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT}")
    models = raw["models"]
    if not isinstance(models, dict):
        raise TypeError("models is not an object")
    return Record(
        fleet=str(raw["fleet"]),
        starts=_int(raw["starts"]),
        next_generation=_int(raw["next_generation"]),
        models={str(name): _model(model) for name, model in models.items()},
    )


def _model(raw: object) -> ModelRecord:
    if not isinstance(raw, dict):
        raise TypeError("a model's record is not an object")
    committed, pending, pin = raw["committed"], raw["pending"], raw["pin"]
    bad, interrupted = raw["bad"], raw["interrupted"]
    if not isinstance(bad, dict) or not isinstance(interrupted, dict):
        raise TypeError("bad and interrupted must be objects")
    return ModelRecord(
        committed=_target(committed) if committed is not None else None,
        number=_int(raw["number"]) if raw["number"] is not None else None,
        pending=_pending(pending) if pending is not None else None,
        pin=_pin(pin) if pin is not None else None,
        bad={int(number): _mark(mark) for number, mark in bad.items()},
        interrupted={int(number): _int(count) for number, count in interrupted.items()},
    )


def _pending(raw: object) -> Pending:
    if not isinstance(raw, dict):
        raise TypeError("pending is not an object")
    return Pending(
        _target(raw["target"]),
        _int(raw["number"]),
        Phase(raw["phase"]),
        _target(raw["previous"]),
        str(raw["trigger"]),
    )


def _pin(raw: object) -> Pinned:
    if not isinstance(raw, dict):
        raise TypeError("a pin is not an object")
    reason = raw["reason"]
    if reason not in ("pin", "rollback"):
        raise ValueError(f"a pin's reason is 'pin' or 'rollback', got {reason!r}")
    return Pinned(_int(raw["version"]), reason)


def _mark(raw: object) -> Mark:
    if not isinstance(raw, dict):
        raise TypeError("a bad mark is not an object")
    signature = raw["signature"]
    if signature is None:
        return Mark(str(raw["reason"]), None)
    entries = tuple((str(name), _int(size), _int(mtime)) for name, size, mtime in signature)
    return Mark(str(raw["reason"]), entries)


def _target(raw: object) -> Target:
    if not isinstance(raw, dict):
        raise TypeError("a target is not an object")
    base = raw.get("base_generation")  # absent from a record written before adapters
    followers = raw.get("followers", [])
    if not isinstance(followers, list):
        raise TypeError("a target's followers is not a list")
    return Target(
        _int(raw["generation"]),
        str(raw["source"]),
        str(raw["description"]),
        base_generation=_int(base) if base is not None else None,
        followers=tuple((str(name), _int(generation)) for name, generation in followers),
    )


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value
