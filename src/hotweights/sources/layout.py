"""The on-disk layout of a model repository: `ROOT/<model>/<version>/<files>`.

Which names count, where a symlink may point, and the cheap signature of a version
directory (names, sizes, mtimes) that tells whether its files changed without reading them.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import TypeVar

from hotweights.errors import EscapesRoot

T = TypeVar("T")
log = logging.getLogger("hotweights.sources")

Signature = tuple[tuple[str, int, int], ...]
"""Every entry under a version directory, hidden ones included: (relative name, size,
mtime in ns), sorted. Equal signatures mean, for practical purposes, unchanged files."""

TRANSIENT_ERRNOS = frozenset(
    {errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.EIO, errno.ESTALE, errno.ETIMEDOUT}
    | {errno.EMFILE, errno.ENFILE}
)
"""Read errors worth retrying: busy or flaky storage (NFS included), descriptor pressure."""

TEMP_PREFIXES = (".", "_tmp", "tmp-", "tmp.")
TEMP_SUFFIXES = (".tmp", ".temp", ".part", ".partial", ".incomplete", "~")


def is_ignored_name(name: str) -> bool:
    """Hidden (`.x`) or temporary (`x.tmp`, `x.partial`, `tmp-x`, `x~`, ...) entries,
    which hold work in progress and never name a model or a version."""
    return name.startswith(TEMP_PREFIXES) or name.endswith(TEMP_SUFFIXES)


def is_model_name(name: str) -> bool:
    """A name that can be a model directory (and a publish target)."""
    return (
        bool(name)
        and not is_ignored_name(name)
        and "/" not in name
        and "\\" not in name
        and name not in (".", "..")
    )


def parse_version(name: str) -> int | None:
    """The version number a directory name stands for: a positive integer written without
    sign, spaces or leading zeros (`7`, not `07`, which would be ambiguous); else None."""
    if not name.isascii() or not name.isdigit() or name.startswith("0"):
        return None
    return int(name)


def is_within(path: str, root_real: str) -> bool:
    """True when `path` (already resolved) is `root_real` or lies under it."""
    return path == root_real or path.startswith(root_real.rstrip(os.sep) + os.sep)


def check_link(path: Path, root_real: str) -> None:
    """Raise `EscapesRoot` when `path` is a symlink that resolves outside the root."""
    if path.is_symlink() and not is_within(os.path.realpath(path), root_real):
        raise EscapesRoot(f"{path} links to {os.path.realpath(path)}, outside {root_real}")


def signature(directory: Path, root_real: str) -> Signature:
    """The signature of a version directory (see `Signature`).

    Raises `FileNotFoundError` when the directory vanished, `EscapesRoot` when an entry
    links outside the repository, other `OSError`s as they come. Reads metadata only.
    """
    return tuple(sorted(_walk(directory, PurePosixPath(), root_real)))


def visible_names(sig: Signature) -> list[str]:
    """The non-hidden file names in a signature."""
    return [name for name, _, _ in sig if not any(p.startswith(".") for p in name.split("/"))]


def locate(root: Path, source: str) -> tuple[str, int] | None:
    """The (model, version) that `source` names under `root`, or None if it names none.
    Compares paths textually, as the repository builds them."""
    path = Path(os.path.abspath(source))
    number = parse_version(path.name)
    if number is None or path.parent.parent != root or not is_model_name(path.parent.name):
        return None
    return path.parent.name, number


def _walk(directory: Path, prefix: PurePosixPath, root_real: str) -> Iterator[tuple[str, int, int]]:
    with os.scandir(directory) as entries:
        for entry in entries:
            name = str(prefix / entry.name)
            if entry.is_symlink() and not is_within(os.path.realpath(entry.path), root_real):
                raise EscapesRoot(f"{name} links outside the repository")
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(Path(entry.path), prefix / entry.name, root_real)
                continue
            try:
                stat = entry.stat()
            except FileNotFoundError:  # a dangling link, or removed since listed
                continue
            yield name, stat.st_size, stat.st_mtime_ns


def retry_transient(action: Callable[[], T], retries: int, backoff: float) -> T:
    """Run `action`, retrying an `OSError` with a `TRANSIENT_ERRNOS` code up to `retries`
    times with exponential backoff from `backoff` seconds; other errors propagate at once."""
    attempt = 0
    while True:
        try:
            return action()
        except OSError as exc:
            if exc.errno not in TRANSIENT_ERRNOS or attempt >= retries:
                raise
            log.debug("retrying a read after %s", exc)
        time.sleep(backoff * 2**attempt)
        attempt += 1
