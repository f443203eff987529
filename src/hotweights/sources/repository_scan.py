"""What a scan of a model repository found: models, their versions, each with a status."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hotweights.sources.layout import Signature


class VersionStatus(Enum):
    """Whether a version directory may be loaded."""

    ELIGIBLE = "eligible"
    """Complete: its manifest matches its files, or (without a manifest) it has settled."""
    INCOMPLETE = "incomplete"
    """Not loadable as it is: files differ from the manifest, the manifest is malformed,
    the directory is empty or unreadable, or a file links outside the repository."""
    SETTLING = "settling"
    """No manifest, and its files changed less than the settle period ago."""
    BAD = "bad"
    """It failed to load or validate; not tried again until its files change."""


@dataclass(frozen=True)
class VersionInfo:
    """One version directory as the last scan saw it. Immutable."""

    model: str
    number: int
    path: Path
    """`ROOT/<model>/<number>`, as the repository builds it (not symlink-resolved); its
    string is the source handed to a reloader."""
    status: VersionStatus
    reason: str = ""
    """Why the version is not eligible (empty when it is)."""
    description: str = ""
    """From the manifest."""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """From the manifest."""
    has_manifest: bool = False
    files: int = 0
    """Visible files in the directory (the manifest included)."""
    bytes: int = 0
    signature: Signature = field(default=(), repr=False, compare=False)

    @property
    def eligible(self) -> bool:
        return self.status is VersionStatus.ELIGIBLE

    @property
    def source(self) -> str:
        return str(self.path)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready snapshot (without the signature)."""
        return {
            "version": self.number,
            "path": str(self.path),
            "status": self.status.value,
            "reason": self.reason,
            "description": self.description,
            "metadata": dict(self.metadata),
            "manifest": self.has_manifest,
            "files": self.files,
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class ModelState:
    """One model's versions, oldest first."""

    name: str
    versions: tuple[VersionInfo, ...] = ()

    def get(self, number: int) -> VersionInfo | None:
        for info in self.versions:
            if info.number == number:
                return info
        return None

    def eligible(self) -> tuple[VersionInfo, ...]:
        return tuple(info for info in self.versions if info.eligible)


@dataclass(frozen=True)
class RepositoryState:
    """The result of one scan. When the root could not be read, `readable` is False and
    `models` is what the last readable scan found: storage trouble is "no change", never
    "everything vanished"."""

    root: Path
    models: Mapping[str, ModelState] = field(default_factory=dict)
    readable: bool = True
    error: str | None = None
    """Why the root could not be read, when it could not."""
    scanned_at: float = 0.0
    """The repository clock's reading at the scan."""
    settle_due: float | None = None
    """Seconds from the scan until the next settling version may become eligible; a rescan
    then is needed, since a directory that stopped changing fires no more watch events."""

    def model(self, name: str) -> ModelState | None:
        return self.models.get(name)


@dataclass(frozen=True)
class CheckedVersion:
    """A cached outcome of checking a version that has a manifest."""

    signature: Signature
    status: VersionStatus
    reason: str
    description: str
    metadata: dict[str, object]


@dataclass
class BadMark:
    """Why a version was marked bad, and the files it had then (a change clears it)."""

    reason: str
    signature: Signature | None
