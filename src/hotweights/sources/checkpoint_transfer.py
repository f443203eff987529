"""How a checkpoint's files get into a staged version, each hashed on its way in.

    copy   each file read once: every chunk is hashed, then written. The source is untouched.
    link   a reflink (a copy-on-write clone) where the filesystem has them, else a hard
           link; then one read to hash. Same filesystem only.
    move   a rename; then one read to hash. Same filesystem only; the files leave the
           checkpoint directory (a failed publish moves them back).

A hard link is the trainer's own file: if the trainer rewrites it in place, the published
version changes with it. The load's digest check then refuses the version, so `link` is
safe only for a trainer that never rewrites a file it has handed over. A reflink, a move
and a copy have no such hazard.

Files are hashed several at a time on threads (hashlib and blake3 release the GIL).
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from hotweights.digests import (
    CHUNK_BYTES,
    DigestAlgorithm,
    FileDigest,
    hash_file,
    new_hasher,
    run_parallel,
)
from hotweights.errors import PublishError
from hotweights.sources.manifest import MANIFEST_NAME

PublishMode = Literal["copy", "link", "move"]
PUBLISH_MODES: tuple[PublishMode, ...] = get_args(PublishMode)

_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_NO_REFLINK = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.EXDEV, errno.ENOSYS}


@dataclass
class Transfer:
    """What a transfer put into the staging directory: each file's digest, and the moves
    to undo if the publish fails."""

    digests: dict[str, FileDigest] = field(default_factory=dict)
    moved: list[tuple[Path, Path]] = field(default_factory=list)
    """(where the file is now, where it came from), in the order moved."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record_move(self, staged: Path, original: Path) -> None:
        with self._lock:
            self.moved.append((staged, original))

    def undo(self) -> None:
        """Move every moved file that is still staged back where it came from (best
        effort: a file that cannot go back stays where it is, and is logged by the
        caller's error)."""
        with self._lock:
            moved, self.moved = self.moved, []
        for staged, original in reversed(moved):
            if staged.exists() and not original.exists():
                try:
                    os.rename(staged, original)
                except OSError:
                    continue


def transfer_tree(
    source: Path, target: Path, mode: PublishMode, algorithm: DigestAlgorithm, transfer: Transfer
) -> None:
    """Put every file of `source` (hidden ones and a top-level manifest excepted) under
    `target` by `mode`, recording each file's digest in `transfer`. Raises `PublishError`
    for a link or move across filesystems or of a symbolic link, `OSError` otherwise."""
    files = _plan(source, target)
    if mode != "copy":
        refuse_other_filesystem(source, target, mode)
    if mode == "move":
        for origin, _ in files.values():
            if origin.is_symlink():
                raise PublishError(
                    f"cannot publish {origin} with --move: it is a symbolic link (the link, "
                    "not the file, would move); publish with a copy or --link"
                )
    for _, destination in files.values():
        destination.parent.mkdir(parents=True, exist_ok=True)
    if mode == "copy":

        def put(pair: tuple[Path, Path]) -> FileDigest:
            return copy_file(pair[0], pair[1], algorithm)

    else:
        place = _link if mode == "link" else _mover(transfer)
        for origin, destination in files.values():
            place(origin, destination)

        def put(pair: tuple[Path, Path]) -> FileDigest:
            return hash_file(pair[1], algorithm)

    transfer.digests.update(run_parallel(put, files))


def refuse_other_filesystem(source: Path, target: Path, mode: PublishMode) -> None:
    """Raise `PublishError` unless `source` and `target` are on one filesystem (a link
    or a rename cannot cross filesystems; silently copying instead would hide the cost)."""
    if filesystem_of(source) != filesystem_of(target):
        raise PublishError(
            f"cannot publish {source} with --{mode}: it is on another filesystem than "
            f"{target.parent}; publish it with a copy, or write the checkpoint on the "
            "repository's filesystem"
        )


def filesystem_of(path: Path) -> int:
    """The device number of the filesystem `path` lies on (tests replace it)."""
    return os.stat(path).st_dev


def copy_file(source: Path, target: Path, algorithm: DigestAlgorithm) -> FileDigest:
    """Copy one file's bytes (symlinks followed), hashing each chunk between its read and
    its write: one read of the source. Tests replace it to simulate a full disk."""
    hasher = new_hasher(algorithm)
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    size = 0
    with open(source, "rb", buffering=0) as reader, open(target, "xb", buffering=0) as writer:
        while count := reader.readinto(buffer):
            hasher.update(view[:count])
            written = 0
            while written < count:
                written += writer.write(view[written:count]) or 0
            size += count
    return FileDigest(size, algorithm, hasher.hexdigest())


def _plan(source: Path, target: Path) -> dict[str, tuple[Path, Path]]:
    """Relative name → (source file, staged file) for every file to publish."""
    found: dict[str, tuple[Path, Path]] = {}

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as listing:
            entries = sorted(listing, key=lambda e: e.name)
        for entry in entries:
            name = f"{prefix}{entry.name}"
            if entry.name.startswith(".") or name == MANIFEST_NAME:
                continue
            if entry.is_dir():
                walk(Path(entry.path), f"{name}/")
            else:
                found[name] = (Path(entry.path), target / name)

    walk(source, "")
    return found


def _link(origin: Path, destination: Path) -> None:
    """A reflink if the filesystem makes one, else a hard link (to the file a symlink
    names)."""
    if _reflink(origin, destination):
        return
    try:
        os.link(origin, destination, follow_symlinks=True)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise PublishError(
                f"cannot link {origin} into {destination.parent}: it is on another "
                "filesystem; publish it with a copy"
            ) from exc
        raise


def _reflink(origin: Path, destination: Path) -> bool:
    """Clone `origin` into a new `destination` (btrfs, XFS, ...); False, leaving no file
    behind, where the filesystem cannot."""
    with open(origin, "rb") as reader:
        fd = os.open(destination, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            fcntl.ioctl(fd, _FICLONE, reader.fileno())
        except OSError as exc:
            os.close(fd)
            os.unlink(destination)
            if exc.errno in _NO_REFLINK:
                return False
            raise
        os.close(fd)
    return True


def _mover(transfer: Transfer) -> Callable[[Path, Path], None]:
    def move(origin: Path, destination: Path) -> None:
        try:
            os.rename(origin, destination)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise PublishError(
                    f"cannot move {origin} into {destination.parent}: it is on another "
                    "filesystem; publish it with a copy"
                ) from exc
            raise
        transfer.record_move(destination, origin)

    return move
