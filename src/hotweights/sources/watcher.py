"""Watchers: strategies that notice when a model repository may have changed.

`EventWatcher` listens to filesystem events (watchfiles: inotify, FSEvents, ...);
`PollingWatcher` compares a snapshot of names, sizes and mtimes every `interval` seconds
and needs nothing installed. `make_watcher("auto")` picks events and falls back to polling
when watchfiles is missing; an `EventWatcher` whose events fail at run time polls instead.

A watcher only says "look again": it calls `on_change()` and its owner rescans. Changes
under hidden entries (publish staging directories) are ignored; the rename that publishes
a version is what counts.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from hotweights.errors import HotweightsError, WatcherUnavailable

log = logging.getLogger("hotweights.sources")

WatcherKind = Literal["auto", "events", "poll"]
"""`auto`: events when available, else polling; `events`: events only; `poll`: polling."""
WATCHER_KINDS: tuple[WatcherKind, ...] = ("auto", "events", "poll")
_Snapshot = frozenset[tuple[str, int, int]] | None


class Watcher(ABC):
    """Calls `on_change` when the watched root may have changed, debounced.

    `start` once; `on_change` then runs on the watcher's dispatch thread, never twice at
    once: a burst of changes gives one call, made `debounce` seconds after the last change
    of the burst, or `max_delay` after its first, whichever comes first. An exception from
    `on_change` is logged and the watcher goes on. `rescan` asks for a call right away and
    `close` stops; both are thread-safe and return without waiting for `on_change`.
    """

    kind: str = "none"
    """The strategy in use: "events" or "poll"."""

    def __init__(self, root: Path | str, *, debounce: float, max_delay: float = 1.0) -> None:
        self.root = Path(os.path.abspath(root))
        self.debounce = debounce
        self.max_delay = max(max_delay, debounce)
        self._stop = threading.Event()
        self._cond = threading.Condition(threading.RLock())
        self._pending = self._urgent = self._closed = False
        self._first = self._last = 0.0
        self._on_change: Callable[[], None] | None = None
        self.ready = threading.Event()
        """Set once the watcher is watching: changes made after it are seen."""
        self._threads: list[threading.Thread] = []

    def start(self, on_change: Callable[[], None]) -> None:
        """Begin watching; raises `HotweightsError` if started twice."""
        if self._on_change is not None:
            raise HotweightsError(f"{type(self).__name__} for {self.root} already started")
        self._on_change = on_change
        for target, role in ((self._dispatch, "dispatch"), (self._watch, "watch")):
            thread = threading.Thread(
                target=target, name=f"hotweights-{self.kind}-{role}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def rescan(self) -> None:
        """Ask for an `on_change` call as soon as the dispatch thread is free."""
        with self._cond:
            self._pending = self._urgent = True
            self._cond.notify()

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop watching and wait (up to `timeout`) for the threads. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._stop.set()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    def changed(self) -> None:
        """Called by the watching strategy on each change it sees."""
        with self._cond:
            now = time.monotonic()
            if not self._pending:
                self._first = now
            self._pending = True
            self._last = now
            self._cond.notify()

    @abstractmethod
    def _run(self, stop: threading.Event) -> None:
        """Watch until `stop` is set, calling `changed()` on every change seen."""

    def _watch(self) -> None:
        try:
            self._run(self._stop)
        except Exception:
            log.exception("the %s watcher of %s crashed", self.kind, self.root)

    def _dispatch(self) -> None:
        while self._next_call():
            callback = self._on_change
            try:
                if callback is not None:
                    callback()
            except Exception:
                log.exception("repository change handler for %s failed", self.root)

    def _next_call(self) -> bool:
        """Wait until a call is due; False once closed."""
        with self._cond:
            while True:
                if self._closed:
                    return False
                if self._pending:
                    due = min(self._last + self.debounce, self._first + self.max_delay)
                    wait = 0.0 if self._urgent else due - time.monotonic()
                    if wait <= 0:
                        self._pending = self._urgent = False
                        return True
                    self._cond.wait(wait)
                else:
                    self._cond.wait()


class PollingWatcher(Watcher):
    """Compares a snapshot of the tree (names, sizes, mtimes; hidden entries skipped)
    every `interval` seconds. Works anywhere, network filesystems included."""

    kind = "poll"

    def __init__(self, root: Path | str, interval: float = 1.0, *, debounce: float = 0.0) -> None:
        super().__init__(root, debounce=debounce)
        self.interval = interval

    def _run(self, stop: threading.Event) -> None:
        poll(self.root, self.interval, stop, self.changed, self.ready)


class EventWatcher(Watcher):
    """Filesystem events through watchfiles. Raises `WatcherUnavailable` when watchfiles
    is not installed. While the root is missing it waits for it to come back, polling
    every `fallback_interval`; if events fail while the root exists, it polls from then on.
    """

    kind = "events"

    def __init__(
        self,
        root: Path | str,
        *,
        debounce: float = 0.05,
        max_delay: float = 1.0,
        fallback_interval: float = 1.0,
    ) -> None:
        try:
            import watchfiles
        except ImportError as exc:
            raise WatcherUnavailable(
                "event watching needs watchfiles (pip install watchfiles)"
            ) from exc
        super().__init__(root, debounce=debounce, max_delay=max_delay)
        self._watchfiles: Any = watchfiles
        self.fallback_interval = fallback_interval

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            identity = _identity(self.root)
            if identity is None:
                self.ready.set()
                while not stop.wait(self.fallback_interval) and _identity(self.root) is None:
                    pass
                self.changed()
                continue
            try:
                self._follow(stop, identity)
            except Exception as exc:
                if _identity(self.root) is None:
                    continue
                log.warning(
                    "watching %s for events failed (%s); polling every %g s instead",
                    self.root,
                    exc,
                    self.fallback_interval,
                )
                self.kind = "poll"
                poll(self.root, self.fallback_interval, stop, self.changed, self.ready)
                return

    def _follow(self, stop: threading.Event, identity: tuple[int, int]) -> None:
        """Report events until `stop`, or until the root is replaced or removed."""
        changes_of = self._watchfiles.watch(
            self.root,
            watch_filter=self._visible,
            debounce=int(self.max_delay * 1000),
            step=50,
            stop_event=stop,
            rust_timeout=int(max(self.fallback_interval, 0.1) * 1000),
            yield_on_timeout=True,
            raise_interrupt=False,
            ignore_permission_denied=True,
        )
        for changes in changes_of:
            self.ready.set()  # the first yield (changes or a timeout) means it is installed
            if changes:
                self.changed()
            if _identity(self.root) != identity:
                self.changed()
                return

    def _visible(self, _change: object, path: str) -> bool:
        """False for paths under hidden entries; paths may come symlink-resolved."""
        for base in (str(self.root), os.path.realpath(self.root)):
            relative = os.path.relpath(path, base)
            if not relative.startswith(os.pardir):
                return not any(part.startswith(".") for part in Path(relative).parts)
        return True


def make_watcher(
    kind: WatcherKind,
    root: Path | str,
    *,
    interval: float = 1.0,
    debounce: float = 0.05,
) -> Watcher:
    """The watcher for `kind`. `interval` is the polling period (and an event watcher's
    fallback). Raises `WatcherUnavailable` for `events` without watchfiles."""
    if kind == "poll":
        return PollingWatcher(root, interval)
    if kind == "events":
        return EventWatcher(root, debounce=debounce, fallback_interval=interval)
    if kind != "auto":
        raise ValueError(f"watcher kind must be one of {WATCHER_KINDS}, got {kind!r}")
    try:
        return EventWatcher(root, debounce=debounce, fallback_interval=interval)
    except WatcherUnavailable as exc:
        log.info("%s; polling %s every %g s", exc, root, interval)
        return PollingWatcher(root, interval)


def poll(
    root: Path,
    interval: float,
    stop: threading.Event,
    changed: Callable[[], None],
    ready: threading.Event | None = None,
) -> None:
    """Call `changed` whenever the snapshot of `root` differs from the previous one,
    checking every `interval` seconds until `stop` is set; `ready` is set after the first
    snapshot."""
    last = snapshot(root)
    if ready is not None:
        ready.set()
    while not stop.wait(interval):
        current = snapshot(root)
        if current != last:
            last = current
            changed()


def snapshot(root: Path) -> _Snapshot:
    """(relative path, size, mtime ns) of every visible file under `root` (directories by
    name only), plus the root's own (device, inode) under the name "/" so that a replaced
    root counts as a change; None when the root cannot be read."""
    identity = _identity(root)
    if identity is None:
        return None
    found: set[tuple[str, int, int]] = {("/", *identity)}
    try:
        _collect(str(root), "", found)
    except OSError:
        return None
    return frozenset(found)


def _collect(directory: str, prefix: str, found: set[tuple[str, int, int]]) -> None:
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            name = f"{prefix}{entry.name}"
            try:
                info = entry.stat()
                is_dir = entry.is_dir(follow_symlinks=False)
            except FileNotFoundError:
                continue
            # Directories count by name only: their mtime moves when hidden entries come
            # and go (a publish staging directory), which is not a change worth a scan.
            found.add((name, 0, 0) if is_dir else (name, info.st_size, info.st_mtime_ns))
            if is_dir:
                try:
                    _collect(entry.path, f"{name}/", found)
                except FileNotFoundError:
                    continue


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the directory at `path`; None if there is none."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if stat.S_ISDIR(info.st_mode) else None
