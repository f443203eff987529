"""The versioned model repository on disk: `ROOT/<model>/<version>/`.

A scan lists models and versions and gives each version a status (see `VersionStatus`).
Digest verification runs once per distinct signature of a version's files, so a scan of
an unchanged repository reads metadata only. Where the loader checks every file's digest
on the pass that reads it into memory (`loader_checks_digests`), the scan checks the
manifest's listing and sizes only, and a version's bytes are read once, by the load.
Storage trouble never reads as "gone": an unreadable root keeps the last state; a
vanished version simply drops out, and the `Latest` policy never moves backwards.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TypeVar

from hotweights.errors import (
    EscapesRoot,
    ManifestError,
    NoPreviousVersion,
    UnknownVersion,
    VerificationError,
)
from hotweights.sources import layout
from hotweights.sources.manifest import MANIFEST_NAME, VERIFY_MODES, VerifyMode, read_manifest
from hotweights.sources.manifest import verify as verify_files
from hotweights.sources.repository_scan import (
    BadMark,
    CheckedVersion,
    ModelState,
    RepositoryState,
    VersionInfo,
    VersionStatus,
)
from hotweights.sources.version_policy import (
    Latest,
    Pinned,
    PinReason,
    VersionPolicy,
    choose_target,
    previous_version,
)

log = logging.getLogger("hotweights.sources")
T = TypeVar("T")
_Key = tuple[str, int]


class ModelRepository:
    """A versioned model repository. Thread-safe.

    `scan` does the I/O (serialised by a lock); every other query reads the state of the
    last scan, scanning first only if there has been none. Pins, rollbacks and bad marks
    live in memory: they survive rescans, not restarts.
    """

    def __init__(
        self,
        root: Path | str,
        *,
        verify: VerifyMode = "digest",
        settle_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        read_retries: int = 3,
        read_backoff: float = 0.05,
        loader_checks_digests: bool = False,
    ) -> None:
        """`loader_checks_digests`: the loader of these versions confirms each file's
        digest as it reads it (it is handed `manifest.expected_digests`), so in `digest`
        mode a scan checks sizes only. Leave it False for any other reader."""
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.root = Path(os.path.abspath(root))
        self.verify_mode: VerifyMode = verify
        self.scan_mode: VerifyMode = (
            "size" if verify == "digest" and loader_checks_digests else verify
        )
        """What a scan checks: `verify_mode`, less the digests a loader checks."""
        self.settle_seconds = settle_seconds
        self.read_retries = read_retries
        self.read_backoff = read_backoff
        self._clock = clock
        self._scan_lock = threading.Lock()
        self._lock = threading.Lock()
        self._state: RepositoryState | None = None
        self._checked: dict[_Key, CheckedVersion] = {}
        self._settling: dict[_Key, tuple[layout.Signature, float]] = {}
        self._bad: dict[_Key, BadMark] = {}
        self._policies: dict[str, VersionPolicy] = {}
        self._logged: set[tuple[str, str]] = set()
        self._visited: set[str] = set()  # paths looked at by the scan in progress

    # -- scanning -----------------------------------------------------------------------

    def scan(self) -> RepositoryState:
        """Look at the disk and return the new state. Blocks while another scan runs.
        May hash files (first sight of a version with a manifest, in `digest` mode, unless
        the loader checks digests)."""
        with self._scan_lock:
            self._visited.clear()
            now = self._clock()
            previous = self._state or RepositoryState(self.root)
            try:
                root_real = os.path.realpath(self.root)
                entries = self._retry(lambda: self._model_dirs(root_real))
            except OSError as exc:
                if previous.readable:
                    log.warning("model repository %s is unreadable: %s", self.root, exc)
                state = replace(previous, readable=False, error=str(exc), scanned_at=now)
                self._state = state
                return state
            if not previous.readable:
                log.info("model repository %s is readable again", self.root)
            models: dict[str, ModelState] = {}
            due: list[float] = []
            for name, path in entries:
                try:
                    versions = self._retry(partial(self._version_dirs, path, root_real))
                except OSError as exc:
                    self._log_once(str(path), f"model directory {path} is unreadable: {exc}")
                    if name in previous.models:
                        models[name] = previous.models[name]
                    continue
                infos = []
                for number, version_path in versions:
                    info = self._examine(name, number, version_path, root_real, now, due)
                    if info is not None:
                        infos.append(info)
                models[name] = ModelState(name, tuple(infos))
            self._forget_missing(models)
            self._logged = {key for key in self._logged if key[0] in self._visited}
            state = RepositoryState(
                self.root, models, True, None, now, min(due) - now if due else None
            )
            self._state = state
            return state

    def state(self) -> RepositoryState:
        """The last scan's state (scanning now if there was none)."""
        state = self._state
        return state if state is not None else self.scan()

    # -- queries ------------------------------------------------------------------------

    def models(self) -> list[str]:
        return sorted(self.state().models)

    def versions(self, model: str) -> tuple[VersionInfo, ...]:
        """Every version of `model`, oldest first; empty for an unknown model."""
        found = self.state().model(model)
        return found.versions if found else ()

    def eligible(self, model: str) -> tuple[VersionInfo, ...]:
        return tuple(info for info in self.versions(model) if info.eligible)

    def policy(self, model: str) -> VersionPolicy:
        with self._lock:
            return self._policies.get(model, Latest())

    def target(self, model: str, *, live: int | None = None) -> VersionInfo | None:
        """The version the model's policy wants live, given the live version number (see
        `choose_target`); None means keep what is live."""
        return choose_target(self.policy(model), self.versions(model), live)

    def candidates(self, model: str) -> list[VersionInfo]:
        """Versions to try at start-up, in order: the pinned one if pinned, else every
        eligible version, newest first (the next is tried when one fails and is marked bad)."""
        policy = self.policy(model)
        eligible = sorted(self.eligible(model), key=lambda info: -info.number)
        if isinstance(policy, Pinned):
            return [info for info in eligible if info.number == policy.version]
        return eligible

    def locate(self, source: str) -> tuple[str, int] | None:
        """The (model, version) a source path names in this repository, or None."""
        return layout.locate(self.root, source)

    # -- policy -------------------------------------------------------------------------

    def pin(self, model: str, version: int, *, reason: PinReason = "pin") -> None:
        """Want `version` live until `unpin`. An explicit pin clears the version's bad mark
        (it asks for another try). Raises `UnknownVersion` if the last scan did not see it.
        """
        found = self.state().model(model)
        if found is None or found.get(version) is None:
            raise UnknownVersion(f"model {model!r} has no version {version} in {self.root}")
        with self._lock:
            self._policies[model] = Pinned(version, reason)
            self._bad.pop((model, version), None)

    def unpin(self, model: str) -> None:
        """Back to the default policy, `Latest`."""
        with self._lock:
            self._policies.pop(model, None)

    def rollback(self, model: str, *, live: int | None = None) -> VersionInfo:
        """Pin the newest eligible version older than `live` (default: the current target).
        Raises `NoPreviousVersion` when there is none."""
        if live is None:
            current = self.target(model)
            live = current.number if current is not None else None
        previous = None if live is None else previous_version(self.versions(model), live)
        if previous is None:
            raise NoPreviousVersion(
                f"model {model!r} has no eligible version older than {live} in {self.root}"
            )
        with self._lock:
            self._policies[model] = Pinned(previous.number, "rollback")
        return previous

    def mark_bad(
        self,
        model: str,
        version: int,
        reason: str,
        *,
        signature: layout.Signature | None = None,
    ) -> None:
        """Exclude a version until its files change (judged by `signature`: the one it had
        when it was tried; default: the last scan's, or the next scan's if none). Takes
        effect from the next scan; does no I/O, so reloader observers may call it."""
        if signature is None and self._state is not None:  # never scans: observers call it
            found = self._state.model(model)
            info = found.get(version) if found else None
            signature = info.signature if info is not None else None
        with self._lock:
            self._bad[(model, version)] = BadMark(reason, signature)

    def bad_reason(self, model: str, version: int) -> str | None:
        with self._lock:
            mark = self._bad.get((model, version))
            return mark.reason if mark else None

    # -- internals ----------------------------------------------------------------------

    def _model_dirs(self, root_real: str) -> list[tuple[str, Path]]:
        with os.scandir(self.root) as entries:
            paths = [Path(entry.path) for entry in entries]
        ok = [p for p in paths if self._accept_dir(p, layout.is_model_name(p.name), root_real)]
        return [(path.name, path) for path in ok]

    def _version_dirs(self, directory: Path, root_real: str) -> list[tuple[int, Path]]:
        with os.scandir(directory) as entries:
            found = [(layout.parse_version(entry.name), Path(entry.path)) for entry in entries]
        return sorted(
            (number, path)
            for number, path in found
            if self._accept_dir(path, number is not None, root_real) and number is not None
        )

    def _accept_dir(self, path: Path, good_name: bool, root_real: str) -> bool:
        """Directories only; hidden/temp/odd names and escaping symlinks are logged once
        (once while they last: a path that went away is forgotten)."""
        self._visited.add(str(path))
        if not path.is_dir():
            return False
        if layout.is_ignored_name(path.name):
            self._log_once(str(path), f"ignoring hidden or temporary directory {path}", debug=True)
            return False
        if not good_name:
            self._log_once(str(path), f"ignoring {path}: not a model or version name")
            return False
        try:
            layout.check_link(path, root_real)
        except EscapesRoot as exc:
            self._log_once(str(path), f"ignoring {exc}")
            return False
        return True

    def _examine(
        self,
        model: str,
        number: int,
        path: Path,
        root_real: str,
        now: float,
        due: list[float],
    ) -> VersionInfo | None:
        """The version's status now; None when its directory vanished."""
        key = (model, number)
        base = VersionInfo(model, number, path, VersionStatus.INCOMPLETE)
        try:
            sig = self._retry(lambda: layout.signature(path, root_real))
        except FileNotFoundError:
            return None
        except EscapesRoot as exc:
            return replace(base, reason=str(exc))
        except OSError as exc:
            return replace(base, reason=f"unreadable: {exc}")
        names = layout.visible_names(sig)
        base = replace(
            base,
            has_manifest=MANIFEST_NAME in names,
            files=len(names),
            bytes=sum(size for name, size, _ in sig if name in names),
            signature=sig,
        )
        if base.has_manifest:
            self._settling.pop(key, None)
            info = self._check_manifest(key, base, root_real)
        else:
            info = self._settle(key, base, now, due)
        if info is None:
            return None
        return self._apply_bad_mark(key, info)

    def _check_manifest(self, key: _Key, base: VersionInfo, root_real: str) -> VersionInfo | None:
        cached = self._checked.get(key)
        if cached is None or cached.signature != base.signature:
            try:
                checked = self._retry(lambda: self._verify(base))
            except FileNotFoundError:
                return None if not base.path.exists() else replace(base, reason="file vanished")
            except OSError as exc:
                return replace(base, reason=f"unreadable: {exc}")
            try:
                unchanged = layout.signature(base.path, root_real) == base.signature
            except FileNotFoundError:
                return None
            except (OSError, EscapesRoot):
                unchanged = False
            if not unchanged:  # changed while being verified: look again next scan
                return replace(base, reason="files changed while being verified")
            self._checked[key] = cached = checked
        return replace(
            base,
            status=cached.status,
            reason=cached.reason,
            description=cached.description,
            metadata=cached.metadata,
        )

    def _verify(self, base: VersionInfo) -> CheckedVersion:
        try:
            manifest = read_manifest(base.path)
            verify_files(base.path, self.scan_mode, manifest=manifest)
        except (ManifestError, VerificationError) as exc:
            log.warning("%s/%d is not eligible: %s", base.model, base.number, exc)
            return CheckedVersion(base.signature, VersionStatus.INCOMPLETE, str(exc), "", {})
        metadata = dict(manifest.metadata)
        return CheckedVersion(
            base.signature, VersionStatus.ELIGIBLE, "", manifest.description, metadata
        )

    def _settle(
        self, key: _Key, base: VersionInfo, now: float, due: list[float]
    ) -> VersionInfo | None:
        if not base.files:
            return replace(base, reason="no files")
        seen = self._settling.get(key)
        if seen is None or seen[0] != base.signature:
            seen = (base.signature, now)
            self._settling[key] = seen
        ready_at = seen[1] + self.settle_seconds
        if now >= ready_at:
            return replace(base, status=VersionStatus.ELIGIBLE)
        due.append(ready_at)
        return replace(
            base,
            status=VersionStatus.SETTLING,
            reason=f"no manifest; eligible once unchanged for {self.settle_seconds:g} s",
        )

    def _apply_bad_mark(self, key: _Key, info: VersionInfo) -> VersionInfo:
        with self._lock:
            mark = self._bad.get(key)
            if mark is None:
                return info
            if mark.signature is None:
                mark.signature = info.signature
            elif mark.signature != info.signature:
                del self._bad[key]
                log.info("%s/%d changed on disk; it may be tried again", *key)
                return info
        return replace(info, status=VersionStatus.BAD, reason=mark.reason)

    def _forget_missing(self, models: dict[str, ModelState]) -> None:
        """Drop caches of versions that are gone (bad marks stay: files decide)."""
        present = {(m, v.number) for m, state in models.items() for v in state.versions}
        for cache in (self._checked, self._settling):
            for key in [key for key in cache if key not in present]:
                del cache[key]

    def _retry(self, action: Callable[[], T]) -> T:
        return layout.retry_transient(action, self.read_retries, self.read_backoff)

    def _log_once(self, path: str, message: str, *, debug: bool = False) -> None:
        key = (path, message)
        if key in self._logged:
            return
        self._logged.add(key)
        log.log(logging.DEBUG if debug else logging.WARNING, message)
