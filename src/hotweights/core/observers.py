"""What a reloader tells its observers (servers, metrics, logs) as things change."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from hotweights.core.events import ReloadEvent, Trigger
from hotweights.core.version import ModelVersion, VersionState

log = logging.getLogger("hotweights.reload")


@dataclass(frozen=True)
class VersionChanged:
    """A version moved from one lifecycle state to another."""

    model: str
    version: ModelVersion
    old: VersionState
    new: VersionState


@dataclass(frozen=True)
class ReloadStarted:
    """The worker began a reload attempt."""

    model: str
    event_id: int
    target: str
    trigger: Trigger


@dataclass(frozen=True)
class ReloadFinished:
    """A reload attempt ended (live, failed, superseded or rolled back), or its drain
    finished and the event gained its drain time (`drained` is then True)."""

    model: str
    event: ReloadEvent
    drained: bool = False


Notice = VersionChanged | ReloadStarted | ReloadFinished
Observer = Callable[[Notice], None]


class ObserverList:
    """Observers of one reloader. Thread-safe; an observer that raises is logged and
    skipped, never allowed to break a reload. Observers run on the reloader's threads and
    must return quickly."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._observers: list[Observer] = []

    def add(self, observer: Observer) -> Callable[[], None]:
        """Subscribe `observer`; returns a function that unsubscribes it."""
        with self._lock:
            self._observers.append(observer)

        def remove() -> None:
            with self._lock:
                if observer in self._observers:
                    self._observers.remove(observer)

        return remove

    def notify(self, notice: Notice) -> None:
        with self._lock:
            observers = list(self._observers)
        for observer in observers:
            try:
                observer(notice)
            except Exception:
                log.exception("reload observer %r failed on %s", observer, type(notice).__name__)
