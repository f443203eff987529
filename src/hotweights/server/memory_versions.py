"""Versions pushed to a server without a repository live in memory: each in a directory of
its own (under /dev/shm where there is one), removed once its version is retired, failed
or never loaded, and at shutdown. Thread-safe: the observer runs on reloaders' threads."""

from __future__ import annotations

import shutil
import threading

from hotweights.core import Notice, VersionChanged, VersionState


class MemoryVersions:
    """The directories of one server's pushed in-memory versions."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dirs: set[str] = set()

    def add(self, directory: str) -> None:
        with self._lock:
            self._dirs.add(directory)

    def remove(self, directory: str) -> None:
        """Delete `directory` now if it is one of ours (a version that never loaded)."""
        with self._lock:
            if directory not in self._dirs:
                return
            self._dirs.discard(directory)
        shutil.rmtree(directory, ignore_errors=True)

    def observe(self, notice: Notice) -> None:
        """A reloader observer: a pushed version's files go with its version."""
        if isinstance(notice, VersionChanged) and notice.new in (
            VersionState.RETIRED,
            VersionState.FAILED,
        ):
            self.remove(notice.version.source)

    def close(self) -> None:
        with self._lock:
            dirs, self._dirs = self._dirs, set()
        for directory in dirs:
            shutil.rmtree(directory, ignore_errors=True)

    def __contains__(self, directory: object) -> bool:
        with self._lock:
            return directory in self._dirs
