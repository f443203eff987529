"""Which version should be live: the versioned model repository on disk, its integrity
checks, the watchers that notice new versions, the atomic publisher, and the sync that
submits new targets to the reloaders. Imports no torch or transformers."""

from __future__ import annotations

from hotweights.sources.checkpoint_transfer import PUBLISH_MODES, PublishMode
from hotweights.sources.manifest import (
    MANIFEST_NAME,
    VERIFY_MODES,
    FileEntry,
    Manifest,
    VerifyMode,
    VerifyResult,
    build_manifest,
    expected_digests,
    read_manifest,
    sha256_file,
    verify,
    write_manifest,
)
from hotweights.sources.publisher import (
    PublishedVersion,
    StagedVersion,
    publish,
    publish_pretrained,
    stage,
)
from hotweights.sources.repository import ModelRepository
from hotweights.sources.repository_scan import (
    ModelState,
    RepositoryState,
    VersionInfo,
    VersionStatus,
)
from hotweights.sources.sync import RepositorySync, SyncReport
from hotweights.sources.version_policy import Latest, Pinned, VersionPolicy, choose_target
from hotweights.sources.watcher import (
    WATCHER_KINDS,
    EventWatcher,
    PollingWatcher,
    Watcher,
    WatcherKind,
    make_watcher,
)

__all__ = [
    "MANIFEST_NAME",
    "PUBLISH_MODES",
    "VERIFY_MODES",
    "WATCHER_KINDS",
    "EventWatcher",
    "FileEntry",
    "Latest",
    "Manifest",
    "ModelRepository",
    "ModelState",
    "Pinned",
    "PollingWatcher",
    "PublishMode",
    "PublishedVersion",
    "RepositoryState",
    "RepositorySync",
    "StagedVersion",
    "SyncReport",
    "VerifyMode",
    "VerifyResult",
    "VersionInfo",
    "VersionPolicy",
    "VersionStatus",
    "Watcher",
    "WatcherKind",
    "build_manifest",
    "choose_target",
    "expected_digests",
    "make_watcher",
    "publish",
    "publish_pretrained",
    "read_manifest",
    "sha256_file",
    "stage",
    "verify",
    "write_manifest",
]
