"""Work the watcher asks for, done in the background and coalesced: a storm of pokes
while the work runs costs one more run, never a queue of them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("hotweights.fleet")


class Coalesced:
    """Runs `work` on a thread of its own (named `name`) after each `poke`; pokes that
    come while it runs make it run once more after."""

    def __init__(self, work: Callable[[], object], name: str) -> None:
        self._do = work
        self._name = name
        self._lock = threading.Lock()
        self._dirty = False
        self._worker: threading.Thread | None = None

    def poke(self) -> None:
        with self._lock:
            self._dirty = True
            if self._worker is not None and self._worker.is_alive():
                return
            self._worker = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._worker.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._dirty:
                    self._worker = None
                    return
                self._dirty = False
            try:
                self._do()
            except Exception:
                log.exception("fleet: %s failed", self._name)
