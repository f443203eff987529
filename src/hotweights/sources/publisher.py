"""The atomic publisher: a new version appears whole, or not at all.

Files are written into a hidden staging directory beside the versions (same filesystem,
so the final rename is atomic), fsynced, the manifest written last, and the directory
renamed to the next version number without replacing anything. Readers (the repository,
the watcher) ignore hidden directories, so they never see a version half-written.

    publish("checkpoints/step-900", "models", "my-llm")              # a directory, copied
    publish("checkpoints/step-900", "models", "my-llm", mode="move") # ... or moved, linked
    publish_pretrained(model, tokenizer, "models", "my-llm")         # a transformers model
    with stage("models", "my-llm") as staged:                        # anything else
        write_files(staged.path)
        staged.commit(description="step 900")

Every file is hashed once, on its way in (`checkpoint_transfer`), and the manifest is
built from those digests. Nothing here prints; nothing here imports torch or transformers.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from hotweights.digests import DEFAULT_ALGORITHM, DigestAlgorithm, FileDigest
from hotweights.errors import PublishError, VersionExists
from hotweights.sources import layout
from hotweights.sources.checkpoint_transfer import PublishMode, Transfer, transfer_tree
from hotweights.sources.manifest import (
    Manifest,
    fsync_directory,
    list_files,
    write_manifest,
)
from hotweights.sources.rename import rename_noreplace

log = logging.getLogger("hotweights.sources")
STAGING_PREFIX = ".tmp-publish-"
_MAX_RACES = 100
_EXISTS = (errno.EEXIST, errno.ENOTEMPTY)


@dataclass(frozen=True)
class PublishedVersion:
    """A version that a publish made visible."""

    model: str
    version: int
    path: Path
    manifest: Manifest


class SavesPretrained(Protocol):
    """Anything with transformers' `save_pretrained` (models, tokenizers, processors)."""

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any: ...


class StagedVersion:
    """A hidden directory in `ROOT/<model>/` to write one version into.

    Write files under `path`, then `commit`. As a context manager it discards the staging
    directory when the block raises or ends without a commit. Not thread-safe: one
    writer per staged version (separate stagings of one model may run concurrently).
    """

    def __init__(self, repo_root: Path | str, model: str) -> None:
        if not layout.is_model_name(model):
            raise PublishError(f"{model!r} is not a valid model name (hidden, temporary or a path)")
        self.model = model
        self.model_dir = Path(os.path.abspath(repo_root)) / model
        try:
            self.model_dir.mkdir(parents=True, exist_ok=True)
            self.path = _make_staging_dir(self.model_dir)
        except OSError as exc:
            raise PublishError(
                f"cannot stage a version of {model} in {self.model_dir}: {exc}"
            ) from exc
        self._done = False
        self._before_discard: list[Callable[[], None]] = []

    def before_discard(self, action: Callable[[], None]) -> None:
        """Run `action` when the staging directory is discarded, before it is removed
        (a move publish puts the checkpoint's files back)."""
        self._before_discard.append(action)

    def commit(
        self,
        *,
        version: int | None = None,
        description: str = "",
        metadata: Mapping[str, Any] | None = None,
        algorithm: DigestAlgorithm = DEFAULT_ALGORITHM,
        digests: Mapping[str, FileDigest] | None = None,
    ) -> PublishedVersion:
        """Fsync the staged files, write the manifest last, and rename the directory to
        `version` (default: one above the highest number present, moving up if another
        publisher takes it first). Never replaces an existing version.

        The manifest's digests use `algorithm`; `digests` computed while the files were
        written are used as they are (see `build_manifest`), the other files are hashed.

        Raises `VersionExists` when the explicit `version` exists, `PublishError` for any
        other failure (disk full, ...); either way the staging directory is removed and
        nothing became visible.
        """
        if self._done:
            raise PublishError(f"{self.path} was already committed or discarded")
        if version is not None and version < 1:
            self.discard()
            raise PublishError(f"version must be a positive integer, got {version}")
        try:
            if version is not None:
                refuse_existing(self.model_dir, version)
            if not list_files(self.path):
                raise PublishError(f"nothing to publish: {self.path} holds no files")
            _fsync_tree(self.path)
            manifest = write_manifest(
                self.path,
                description=description,
                metadata=metadata,
                algorithm=algorithm,
                known=digests,
            )
            number = self._rename(version)
            fsync_directory(self.model_dir)
        except BaseException as exc:
            self.discard()
            if isinstance(exc, PublishError) or not isinstance(exc, Exception):
                raise
            raise PublishError(
                f"publishing {self.model} into {self.model_dir} failed, nothing was "
                f"published: {exc}"
            ) from exc
        self._done = True
        path = self.model_dir / str(number)
        log.info("published %s version %d at %s", self.model, number, path)
        return PublishedVersion(self.model, number, path, manifest)

    def discard(self) -> None:
        """Remove the staging directory (idempotent)."""
        self._done = True
        actions, self._before_discard = self._before_discard, []
        try:
            for action in actions:
                action()
        finally:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> StagedVersion:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if not self._done:
            self.discard()

    def _rename(self, version: int | None) -> int:
        if version is not None:
            try:
                rename_noreplace(self.path, self.model_dir / str(version))
            except OSError as exc:
                if exc.errno in _EXISTS:
                    refuse_existing(self.model_dir, version)
                raise
            return version
        number = next_version(self.model_dir)
        for _ in range(_MAX_RACES):
            try:
                rename_noreplace(self.path, self.model_dir / str(number))
            except OSError as exc:
                if exc.errno not in _EXISTS:
                    raise
                number = max(number + 1, next_version(self.model_dir))
                continue
            return number
        raise PublishError(f"gave up after {_MAX_RACES} concurrent publishes took each number")


def stage(repo_root: Path | str, model: str) -> StagedVersion:
    """A new staging directory for `model` (see `StagedVersion`)."""
    return StagedVersion(repo_root, model)


def publish(
    src_dir: Path | str,
    repo_root: Path | str,
    model: str,
    *,
    version: int | None = None,
    description: str = "",
    metadata: Mapping[str, Any] | None = None,
    mode: PublishMode = "copy",
    algorithm: DigestAlgorithm = DEFAULT_ALGORITHM,
) -> PublishedVersion:
    """Publish `src_dir` as a new version of `model` atomically (see `StagedVersion.commit`).

    Takes every file except hidden ones and an existing `hotweights.json` (a fresh one is
    written), by `mode` (see `checkpoint_transfer`): `copy` leaves the source untouched;
    `link` (reflinks, else hard links) and `move` need the source on the repository's
    filesystem and cost one hash per file. A hard-linked file changes if the trainer
    rewrites it: `link` is safe only when it never does. A failed `move` puts the files
    back. Raises `VersionExists` or `PublishError`; nothing partial stays behind.
    """
    source = Path(src_dir)
    if not source.exists():
        raise PublishError(f"cannot publish {source}: it does not exist")
    if not source.is_dir():
        raise PublishError(f"cannot publish {source}: not a directory")
    if version is not None:
        refuse_existing(Path(os.path.abspath(repo_root)) / model, version)
    with stage(repo_root, model) as staged:
        transfer = Transfer()
        staged.before_discard(transfer.undo)
        try:
            transfer_tree(source, staged.path, mode, algorithm, transfer)
        except OSError as exc:
            verb = {"copy": "copying", "link": "linking", "move": "moving"}[mode]
            raise PublishError(
                f"{verb} {source} into {staged.model_dir} failed, nothing was published: {exc}"
            ) from exc
        return staged.commit(
            version=version,
            description=description,
            metadata=metadata,
            algorithm=algorithm,
            digests=transfer.digests,
        )


def publish_pretrained(
    model: SavesPretrained,
    tokenizer: SavesPretrained | None,
    repo_root: Path | str,
    name: str,
    *,
    version: int | None = None,
    description: str = "",
    metadata: Mapping[str, Any] | None = None,
    **save_options: Any,
) -> PublishedVersion:
    """Save a transformers model (safetensors only) and its tokenizer straight into a new
    version of `name`. `save_options` go to the model's `save_pretrained` (for example
    `max_shard_size`). In distributed training, call it from the main process only."""
    if version is not None:
        refuse_existing(Path(os.path.abspath(repo_root)) / name, version)
    with stage(repo_root, name) as staged:
        try:
            model.save_pretrained(str(staged.path), safe_serialization=True, **save_options)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staged.path))
        except Exception as exc:
            raise PublishError(
                f"saving {name} into {staged.model_dir} failed, nothing was published: {exc}"
            ) from exc
        return staged.commit(version=version, description=description, metadata=metadata)


def refuse_existing(model_dir: Path, version: int) -> None:
    """Raise `VersionExists` if `model_dir` already holds `version`."""
    if os.path.lexists(model_dir / str(version)):
        raise VersionExists(
            f"{model_dir.name} version {version} already exists in {model_dir}; "
            "versions are never overwritten"
        )


def next_version(model_dir: Path) -> int:
    """One above the highest version number in `model_dir` (1 when there is none)."""
    try:
        names = os.listdir(model_dir)
    except FileNotFoundError:
        return 1
    numbers = [n for n in map(layout.parse_version, names) if n is not None]
    return max(numbers, default=0) + 1


def _make_staging_dir(model_dir: Path) -> Path:
    while True:
        path = model_dir / f"{STAGING_PREFIX}{secrets.token_hex(8)}"
        try:
            path.mkdir()  # mode 0o777 less the umask, unlike mkdtemp's 0o700
        except FileExistsError:
            continue
        return path


def _fsync_tree(directory: Path) -> None:
    for parent, _, files in os.walk(directory):
        for name in files:
            fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(Path(parent))
