from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hotweights.errors import HotweightsError, WatcherUnavailable
from hotweights.sources import EventWatcher, PollingWatcher, Watcher, make_watcher, publish
from hotweights.sources.watcher import snapshot
from tests.sources.layouts import WEIGHTS, write_files

WAIT = 20.0  # generous: a slow CI machine, never a pacing device


class Calls:
    """An `on_change` that records calls and wakes waiters when `condition` holds."""

    def __init__(self, condition: Callable[[], bool] = lambda: True) -> None:
        self.condition = condition
        self.count = 0
        self.seen = threading.Event()

    def __call__(self) -> None:
        self.count += 1
        if self.condition():
            self.seen.set()


class ManualWatcher(Watcher):
    """Watches nothing: tests drive `changed()` and `rescan()` themselves."""

    kind = "manual"

    def _run(self, stop: threading.Event) -> None:
        self.ready.set()
        stop.wait()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_files(tmp_path / "checkpoint", WEIGHTS)


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    made: list[Watcher] = []
    yield made
    for watcher in made:
        watcher.close()


def started(watchers: list[Watcher], watcher: Watcher, on_change: Callable[[], None]) -> Watcher:
    watchers.append(watcher)
    watcher.start(on_change)
    assert watcher.ready.wait(WAIT)
    return watcher


def test_polling_watcher_fires_on_publish(root: Path, src: Path, watchers: list[Watcher]) -> None:
    calls = Calls(lambda: (root / "m" / "1").exists())
    started(watchers, PollingWatcher(root, 0.02), calls)
    publish(src, root, "m")
    assert calls.seen.wait(WAIT)


def test_event_watcher_fires_on_publish(root: Path, src: Path, watchers: list[Watcher]) -> None:
    pytest.importorskip("watchfiles")
    calls = Calls(lambda: (root / "m" / "1").exists())
    started(watchers, EventWatcher(root, fallback_interval=0.1), calls)
    assert calls.count == 0
    publish(src, root, "m")
    assert calls.seen.wait(WAIT)


def test_event_watcher_waits_for_a_missing_root(
    tmp_path: Path, src: Path, watchers: list[Watcher]
) -> None:
    pytest.importorskip("watchfiles")
    root = tmp_path / "later"
    calls = Calls(lambda: (root / "m" / "1").exists())
    started(watchers, EventWatcher(root, fallback_interval=0.05), calls)
    publish(src, root, "m")
    assert calls.seen.wait(WAIT)


def test_event_watcher_falls_back_to_polling(
    root: Path, src: Path, watchers: list[Watcher]
) -> None:
    pytest.importorskip("watchfiles")

    class BrokenWatchfiles:
        def watch(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("inotify watch limit reached")

    watcher = EventWatcher(root, fallback_interval=0.02)
    watcher._watchfiles = BrokenWatchfiles()
    calls = Calls(lambda: (root / "m" / "1").exists())
    started(watchers, watcher, calls)
    assert watcher.kind == "poll"
    publish(src, root, "m")
    assert calls.seen.wait(WAIT)


def test_changes_under_hidden_entries_are_ignored(root: Path) -> None:
    (root / "m").mkdir()
    before = snapshot(root)
    write_files(root / "m" / ".tmp-publish-1", WEIGHTS)
    assert snapshot(root) == before
    write_files(root / "m" / "1", WEIGHTS)
    assert snapshot(root) != before
    assert snapshot(root / "missing") is None


def test_a_burst_of_changes_gives_one_call(tmp_path: Path, watchers: list[Watcher]) -> None:
    calls = Calls()
    watcher = started(watchers, ManualWatcher(tmp_path, debounce=3600.0, max_delay=3600.0), calls)
    for _ in range(100):
        watcher.changed()
    watcher.rescan()  # due at once, and covers the whole burst
    assert calls.seen.wait(WAIT)
    watcher.close()
    assert calls.count == 1


def test_debounce_ends_a_burst(tmp_path: Path, watchers: list[Watcher]) -> None:
    calls = Calls()
    watcher = started(watchers, ManualWatcher(tmp_path, debounce=0.01), calls)
    watcher.changed()
    assert calls.seen.wait(WAIT)


def test_a_failing_callback_does_not_stop_the_watcher(
    tmp_path: Path, watchers: list[Watcher]
) -> None:
    first, second = threading.Event(), threading.Event()

    def on_change() -> None:
        if not first.is_set():
            first.set()
            raise RuntimeError("sync failed")
        second.set()

    watcher = started(watchers, ManualWatcher(tmp_path, debounce=0.0), on_change)
    watcher.rescan()
    assert first.wait(WAIT)
    watcher.rescan()  # asked after the failing call began: a call of its own
    assert second.wait(WAIT)


def test_start_twice_is_refused(tmp_path: Path, watchers: list[Watcher]) -> None:
    watcher = started(watchers, ManualWatcher(tmp_path, debounce=0.0), Calls())
    with pytest.raises(HotweightsError, match="already started"):
        watcher.start(Calls())


def test_make_watcher(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_watcher("poll", root, interval=0.5), PollingWatcher)
    pytest.importorskip("watchfiles")
    assert isinstance(make_watcher("auto", root), EventWatcher)
    assert isinstance(make_watcher("events", root), EventWatcher)
    monkeypatch.setitem(sys.modules, "watchfiles", None)  # as if not installed
    assert isinstance(make_watcher("auto", root), PollingWatcher)
    with pytest.raises(WatcherUnavailable, match="pip install watchfiles"):
        make_watcher("events", root)
    with pytest.raises(ValueError, match="watcher kind"):
        make_watcher("inotify", root)  # type: ignore[arg-type]


def test_event_filter_skips_hidden_paths_through_a_symlinked_root(tmp_path: Path) -> None:
    pytest.importorskip("watchfiles")
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    watcher = EventWatcher(tmp_path / "link")
    assert watcher._visible(None, str(real / "m" / "1" / "model.safetensors"))
    assert watcher._visible(None, str(tmp_path / "link" / "m" / "1"))
    assert not watcher._visible(None, str(real / "m" / ".tmp-publish-1" / "x"))
    assert not watcher._visible(None, str(tmp_path / "link" / ".cache"))
