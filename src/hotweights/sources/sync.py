"""Keeps each model's live version in line with its repository.

On every change the watcher reports (and on `rescan`), `RepositorySync` scans the
repository and, for each model whose policy target is not what is live, submits the
target to the model's reloader. It listens to the reloaders: a repository version whose
reload failed is marked bad, so it is not tried again until its files change, and the
repository is looked at again, so the next candidate can be tried. It never unloads
anything: a vanished version or an unreadable repository means "no change".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hotweights.core import Notice, Outcome, Reloader, ReloadFinished, ReloadTicket, Trigger
from hotweights.errors import ReloaderClosed
from hotweights.sources.layout import Signature
from hotweights.sources.repository import ModelRepository
from hotweights.sources.repository_scan import RepositoryState, VersionInfo
from hotweights.sources.version_policy import describe
from hotweights.sources.watcher import Watcher

log = logging.getLogger("hotweights.sources")


@dataclass(frozen=True)
class SyncReport:
    """What one sync did."""

    readable: bool
    """False when the repository could not be read (nothing was submitted)."""
    submitted: Mapping[str, ReloadTicket] = field(default_factory=dict)
    """Model name → the ticket of the reload submitted for it."""


class RepositorySync:
    """Drives `reloaders` (model name → reloader) from `repository`, watched by `watcher`.

    Thread-safe: `sync` (and everything that calls it) is serialised by a lock, and may be
    called from any thread except a reloader's own (observers must not block). A sync of
    an unchanged repository costs one metadata walk. Without a watcher, changes are seen
    only through `sync`/`rescan` calls.
    """

    def __init__(
        self,
        repository: ModelRepository,
        reloaders: Mapping[str, Reloader[Any]],
        watcher: Watcher | None = None,
    ) -> None:
        self.repository = repository
        self.reloaders = dict(reloaders)
        self.watcher = watcher
        self._lock = threading.Lock()
        self._tried_lock = threading.Lock()
        self._tried: dict[str, Signature] = {}
        self.adopt: Callable[[str], Reloader[Any] | None] | None = None
        """Given a model of the repository this sync does not drive yet (a LoRA adapter
        published while serving, or one unloaded that got a newer version), its new
        reloader, or None to leave it alone. Called under the sync's lock."""
        self._floors: dict[str, int] = {}
        """Per model: versions at or below this number are no targets (an adapter loaded
        from a path through the API is superseded only by a newer published version)."""
        self._timer: threading.Timer | None = None
        self._closed = False
        self._unsubscribe: list[Callable[[], None]] = [
            reloader.subscribe(self._observe) for reloader in self.reloaders.values()
        ]

    # -- driving ------------------------------------------------------------------------

    def start(self) -> SyncReport:
        """Sync once (trigger `startup`), then follow the watcher. Returns at once; the
        tickets in the report say how the first loads end."""
        report = self.sync(trigger="startup")
        if self.watcher is not None:
            self.watcher.start(self._on_change)
        return report

    def sync(self, *, trigger: Trigger = "watch") -> SyncReport:
        """Scan and submit every model whose target differs from what is live."""
        with self._lock:
            state = self.repository.scan()
            self._schedule_settle(state)
            if not state.readable:
                return SyncReport(False)
            submitted: dict[str, ReloadTicket] = {}
            self._adopt_new()
            for name, reloader in self.reloaders.items():
                live = self._live(name, reloader)
                target = self.repository.target(name, live=live[1])
                if target is None or target.source == live[0]:
                    continue
                if target.number <= self._floors.get(name, 0):
                    continue
                try:
                    submitted[name] = self._submit(reloader, target, trigger)
                except ReloaderClosed:
                    log.warning("%s: reloader closed, not submitting %s", name, target.source)
            return SyncReport(True, submitted)

    def supersede_only_by_newer(self, model: str) -> None:
        """From now on make `model` live only from a version newer than its newest now
        (what a path loaded beside the repository asks: nothing older replaces it)."""
        with self._lock:
            newest = max((info.number for info in self.repository.versions(model)), default=0)
            self._floors[model] = max(self._floors.get(model, 0), newest)

    def add(self, model: str, reloader: Reloader[Any]) -> None:
        """Drive one more model's reloader (an adapter loaded through the API)."""
        with self._lock:
            self.reloaders[model] = reloader
            self._unsubscribe.append(reloader.subscribe(self._observe))

    def forget(self, model: str) -> None:
        """Stop driving `model` (an adapter unloaded through the API): the watcher brings
        it back (through `adopt`) only for a version newer than its newest now."""
        with self._lock:
            self.reloaders.pop(model, None)
            newest = max((info.number for info in self.repository.versions(model)), default=0)
            self._floors[model] = max(self._floors.get(model, 0), newest)

    def rescan(self, *, trigger: Trigger = "api") -> SyncReport:
        """A forced sync on the caller's thread (POST /admin/rescan)."""
        return self.sync(trigger=trigger)

    def request_rescan(self) -> None:
        """Ask for a sync soon, without waiting for it (SIGHUP, observers). Safe from any
        thread."""
        if self._closed:
            return
        if self.watcher is not None:
            self.watcher.rescan()
            return
        threading.Thread(target=self._on_change, name="hotweights-rescan", daemon=True).start()

    # -- policy -------------------------------------------------------------------------

    def pin(self, model: str, version: int) -> SyncReport:
        """Pin `model` to `version` (see `ModelRepository.pin`) and sync."""
        self.repository.pin(model, version)
        return self.sync(trigger="api")

    def unpin(self, model: str) -> SyncReport:
        """Back to the latest eligible version, and sync."""
        self.repository.unpin(model)
        return self.sync(trigger="api")

    def rollback(self, model: str) -> SyncReport:
        """Pin the newest eligible version older than the live one (older than the target
        when nothing from the repository is live), and sync. Raises `NoPreviousVersion`
        when there is none."""
        reloader = self.reloaders.get(model)
        live = self._live(model, reloader)[1] if reloader is not None else None
        self.repository.rollback(model, live=live)
        return self.sync(trigger="rollback")

    # -- reporting ----------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        """A JSON-ready snapshot for the admin API: every model of the repository with its
        policy, live and target version numbers, and every version with its status."""
        state = self.repository.state()
        models: dict[str, object] = {}
        for name in sorted(set(state.models) | set(self.reloaders)):
            reloader = self.reloaders.get(name)
            live = self._live(name, reloader)[1] if reloader is not None else None
            target = self.repository.target(name, live=live)
            models[name] = {
                **describe(self.repository.policy(name)),
                "served": reloader is not None,
                "live": live,
                "target": target.number if target is not None else None,
                "candidates": [info.number for info in self.repository.candidates(name)],
                "versions": [info.to_dict() for info in self.repository.versions(name)],
            }
        return {
            "root": str(state.root),
            "readable": state.readable,
            "error": state.error,
            "watcher": self.watcher.kind if self.watcher is not None else None,
            "models": models,
        }

    def close(self) -> None:
        """Stop watching and listening; reloaders stay as they are (they are not ours)."""
        self._closed = True
        if self.watcher is not None:
            self.watcher.close()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()

    # -- internals ----------------------------------------------------------------------

    def _adopt_new(self) -> None:
        """Called with the lock held: models of the repository not driven yet, with a
        version newer than any they had when they stopped being driven, for `adopt`."""
        if self.adopt is None:
            return
        for name in self.repository.models():
            if name in self.reloaders:
                continue
            newest = max((info.number for info in self.repository.eligible(name)), default=0)
            if newest <= self._floors.get(name, 0):
                continue
            reloader = self.adopt(name)
            if reloader is not None:
                self.reloaders[name] = reloader
                self._unsubscribe.append(reloader.subscribe(self._observe))

    def _live(self, model: str, reloader: Reloader[Any] | None) -> tuple[str | None, int | None]:
        """The live source, and its version number if it is a version of `model` here."""
        version = reloader.live_version if reloader is not None else None
        if version is None:
            return None, None
        located = self.repository.locate(version.source)
        if located is None or located[0] != model:
            return version.source, None
        return version.source, located[1]

    def _submit(
        self, reloader: Reloader[Any], target: VersionInfo, trigger: Trigger
    ) -> ReloadTicket:
        with self._tried_lock:
            self._tried[target.source] = target.signature
        text = f"{target.model} v{target.number}"
        if target.description:
            text = f"{text}: {target.description}"
        log.info("%s: submitting %s (%s)", reloader.name, target.source, trigger)
        return reloader.submit(target.source, trigger=trigger, description=text)

    def _observe(self, notice: Notice) -> None:
        """Runs on a reloader's thread: mark a failed repository version bad, then ask for
        a rescan so the next candidate gets its turn."""
        if not isinstance(notice, ReloadFinished) or notice.drained:
            return
        event = notice.event
        if event.outcome not in (Outcome.FAILED, Outcome.GATED, Outcome.CANARY_FAILED):
            return
        located = self.repository.locate(event.target)
        if located is None:
            return
        with self._tried_lock:
            signature = self._tried.get(event.target)
        reason = (
            f"reload {event.id} {event.outcome.value}: {event.error_message or event.error_type}"
        )
        self.repository.mark_bad(*located, reason, signature=signature)
        log.warning("%s/%d marked bad until its files change: %s", *located, reason)
        self.request_rescan()

    def _on_change(self) -> None:
        try:
            self.sync(trigger="watch")
        except Exception:
            log.exception("syncing %s failed", self.repository.root)

    def _schedule_settle(self, state: RepositoryState) -> None:
        """A settling version fires no event when it settles: look again when it may."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if state.settle_due is None or self._closed:
            return
        self._timer = threading.Timer(state.settle_due + 0.05, self.request_rescan)
        self._timer.daemon = True
        self._timer.start()
