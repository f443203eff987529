"""A version's manifest, `hotweights.json`: every file with its size and digest.

The publisher writes the manifest last, so its presence marks a complete version, and its
content lets a reader check that the files on disk are the files that were published.

Which files count: every regular file under the version directory, in subdirectories too,
named by its POSIX path relative to the directory, except the manifest itself and hidden
entries (a name starting with `.`, at any depth). Symlinks to files are followed; symlinks
to directories are not. Extra files that the manifest does not list are refused: a version
is exactly what was published, since a stray weight shard would change what loads.

Two formats. Format 1 (every manifest before BLAKE3, and any sha256 manifest written now):
each file has `size` and `sha256`. Format 2 names its algorithm at the top,
`"algorithm": "blake3"`, and each file has `size` and a digest under the algorithm's name.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from hotweights.digests import (
    DEFAULT_ALGORITHM,
    DIGEST_ALGORITHMS,
    HEX_LENGTH,
    DigestAlgorithm,
    FileDigest,
    hash_file,
    hash_files,
    run_parallel,
)
from hotweights.errors import ManifestError, VerificationError

MANIFEST_NAME = "hotweights.json"
FORMATS = (1, 2)
"""The manifest formats this code reads: 1 (sha256 only) and 2 (names its algorithm)."""
VerifyMode = Literal["digest", "size", "none"]
"""How closely a version's files are checked against its manifest: every byte (its
digest), presence and sizes only, or not at all (the manifest only marks the version
complete)."""
VERIFY_MODES: tuple[VerifyMode, ...] = ("digest", "size", "none")

_MAX_LISTED_PROBLEMS = 5
_TEMP_NAME = f".{MANIFEST_NAME}.tmp"


@dataclass(frozen=True)
class FileEntry:
    """One file of a version, as the manifest records it."""

    size: int
    digest: str
    """Lower-case hex digest, by the manifest's algorithm."""


@dataclass(frozen=True)
class Manifest:
    """The content of `hotweights.json`. Immutable."""

    files: Mapping[str, FileEntry]
    """Relative POSIX path → size and digest; never includes the manifest itself."""
    description: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """Free JSON object from the publisher (training step, metrics, ...)."""
    created_at: float = 0.0
    """Wall-clock time the manifest was written."""
    algorithm: DigestAlgorithm = "sha256"
    """How every file's digest was computed."""

    @property
    def format_version(self) -> int:
        """1 for sha256 (readable by every version of hotweights), else 2."""
        return 1 if self.algorithm == "sha256" else 2

    @property
    def total_bytes(self) -> int:
        return sum(entry.size for entry in self.files.values())

    def digests(self) -> dict[str, FileDigest]:
        """Each file's size and digest, as a load checks them."""
        return {
            name: FileDigest(entry.size, self.algorithm, entry.digest)
            for name, entry in self.files.items()
        }

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "format": self.format_version,
            "created_at": self.created_at,
            "description": self.description,
            "metadata": dict(self.metadata),
            "files": {
                name: {"size": entry.size, self.algorithm: entry.digest}
                for name, entry in sorted(self.files.items())
            },
        }
        if self.format_version > 1:
            data["algorithm"] = self.algorithm
        return data

    @classmethod
    def from_dict(cls, data: object, *, where: str = MANIFEST_NAME) -> Manifest:
        """Parse a decoded manifest; raises `ManifestError` naming `where` and the field."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt not in FORMATS or isinstance(fmt, bool):
            raise ManifestError(f"{where}: format {fmt!r} is not supported (expected 1 or 2)")
        algorithm = _algorithm(data.get("algorithm") if fmt == 2 else "sha256", where)
        files = data.get("files")
        if not isinstance(files, dict):
            raise ManifestError(f"{where}: 'files' must be an object of name → entry")
        entries = {name: _entry(name, value, algorithm, where) for name, value in files.items()}
        description = data.get("description", "")
        metadata = data.get("metadata", {})
        created_at = data.get("created_at", 0.0)
        if not isinstance(description, str):
            raise ManifestError(f"{where}: 'description' must be a string")
        if not isinstance(metadata, dict):
            raise ManifestError(f"{where}: 'metadata' must be an object")
        if not isinstance(created_at, int | float) or isinstance(created_at, bool):
            raise ManifestError(f"{where}: 'created_at' must be a number")
        return cls(entries, description, metadata, float(created_at), algorithm)


@dataclass(frozen=True)
class VerifyResult:
    """A successful verification."""

    mode: VerifyMode
    files: int
    bytes: int
    """Bytes the manifest lists (all of them hashed in `digest` mode)."""
    seconds: float


def sha256_file(path: Path | str) -> str:
    """The hex sha256 of a file (see `hotweights.digests.hash_file`)."""
    return hash_file(path, "sha256").hexdigest


def list_files(directory: Path) -> dict[str, int]:
    """Every file a manifest would cover under `directory`: relative name → size.

    Raises `OSError` (e.g. `FileNotFoundError` when the directory vanished)."""
    return {name: size for name, size in _walk(directory, PurePosixPath())}


def build_manifest(
    directory: Path | str,
    *,
    description: str = "",
    metadata: Mapping[str, Any] | None = None,
    algorithm: DigestAlgorithm = DEFAULT_ALGORITHM,
    known: Mapping[str, FileDigest] | None = None,
) -> Manifest:
    """A manifest of every file under `directory` (not written anywhere).

    `known` digests (computed while the files were copied in) are used for the files whose
    size on disk is the size they were computed over and whose algorithm is `algorithm`;
    every other file is hashed now, several at a time on threads."""
    root = Path(directory)
    listed = list_files(root)
    known = known or {}
    usable = {
        name: found
        for name, found in known.items()
        if listed.get(name) == found.size and found.algorithm == algorithm
    }
    missing = {name: root / name for name in listed if name not in usable}
    digests = {**usable, **hash_files(missing, algorithm)}
    files = {
        name: FileEntry(digests[name].size, digests[name].hexdigest) for name in sorted(listed)
    }
    return Manifest(files, description, dict(metadata or {}), time.time(), algorithm)


def write_manifest(
    directory: Path | str,
    *,
    description: str = "",
    metadata: Mapping[str, Any] | None = None,
    algorithm: DigestAlgorithm = DEFAULT_ALGORITHM,
    known: Mapping[str, FileDigest] | None = None,
) -> Manifest:
    """Hash the files of `directory` (see `build_manifest`) and write its manifest durably.

    The manifest goes to a hidden temporary file, is fsynced, renamed into place and the
    directory fsynced, so a reader sees either no manifest or a whole one. Call it only
    once every other file is written. Raises `ManifestError` if `metadata` is not JSON,
    `OSError` on I/O failure.
    """
    root = Path(directory)
    manifest = build_manifest(
        root, description=description, metadata=metadata, algorithm=algorithm, known=known
    )
    try:
        text = json.dumps(manifest.to_dict(), indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ManifestError(f"{root}: manifest metadata is not plain JSON: {exc}") from exc
    temp = root / _TEMP_NAME
    try:
        with open(temp, "w", encoding="utf-8") as file:
            file.write(text + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, root / MANIFEST_NAME)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(root)
    return manifest


def read_manifest(directory: Path | str) -> Manifest:
    """Read `directory/hotweights.json`. Raises `ManifestError` if it is missing, not
    JSON or not a manifest; other `OSError`s (possibly transient) propagate."""
    path = Path(directory) / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: no manifest") from exc
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not UTF-8 text") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from exc
    return Manifest.from_dict(data, where=str(path))


def verify(
    directory: Path | str, mode: VerifyMode = "digest", *, manifest: Manifest | None = None
) -> VerifyResult:
    """Check `directory` against its manifest (or the one given).

    `none` checks only that the manifest parses; `size` also that exactly the listed files
    exist with the listed sizes; `digest` also hashes every file. Raises `ManifestError`
    (no or bad manifest), `VerificationError` (listing every difference by file name), or
    `OSError` for I/O failures other than a missing file. Thread-safe; reads only.
    """
    if mode not in VERIFY_MODES:
        raise ValueError(f"verification mode must be one of {VERIFY_MODES}, got {mode!r}")
    root = Path(directory)
    started = time.monotonic()
    if manifest is None:
        manifest = read_manifest(root)
    if mode != "none":
        _check(root, manifest, _size_problems(root, manifest))
    if mode == "digest":
        _check(root, manifest, _digest_problems(root, manifest))
    return VerifyResult(mode, len(manifest.files), manifest.total_bytes, time.monotonic() - started)


def expected_digests(directory: Path | str) -> dict[str, FileDigest] | None:
    """What a loader must confirm as it reads `directory`: each file's size and digest, by
    its manifest. None when the directory has no manifest (nothing to confirm).

    Checks first, in `size` mode, that exactly the listed files are there with the listed
    sizes, so that the loader only has to hash what it reads. Raises `ManifestError` (bad
    manifest) or `VerificationError` (the files differ from the listing). Reads metadata
    only. An `ExpectedDigests` for a loader (see `hotweights.digests`)."""
    root = Path(directory)
    if not (root / MANIFEST_NAME).exists():
        return None
    manifest = read_manifest(root)
    _check(root, manifest, _size_problems(root, manifest))
    return manifest.digests()


def fsync_directory(directory: Path) -> None:
    """Make the directory's entries (creations, renames) durable. No-op where a directory
    cannot be opened for fsync (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size_problems(root: Path, manifest: Manifest) -> list[str]:
    on_disk = list_files(root)
    problems: list[str] = []
    for name, entry in sorted(manifest.files.items()):
        size = on_disk.pop(name, None)
        if size is None:
            problems.append(f"{name}: missing")
        elif size != entry.size:
            problems.append(f"{name}: {size} bytes on disk, manifest says {entry.size}")
    problems.extend(f"{name}: not in the manifest" for name in sorted(on_disk))
    return problems


def _digest_problems(root: Path, manifest: Manifest) -> list[str]:
    expected = manifest.digests()

    def problem(path: Path) -> str | None:
        name = path.relative_to(root).as_posix()
        try:
            actual = hash_file(path, manifest.algorithm)
        except FileNotFoundError:
            return f"{name}: missing"
        return expected[name].mismatch(name, actual)

    found = run_parallel(problem, {name: root / name for name in sorted(expected)})
    return [line for _, line in sorted(found.items()) if line is not None]


def _check(root: Path, manifest: Manifest, problems: list[str]) -> None:
    if not problems:
        return
    shown = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
    more = len(problems) - _MAX_LISTED_PROBLEMS
    suffix = f" (and {more} more)" if more > 0 else ""
    raise VerificationError(
        f"{root}: files do not match {MANIFEST_NAME}: {shown}{suffix}", tuple(problems)
    )


def _walk(directory: Path, prefix: PurePosixPath) -> Iterator[tuple[str, int]]:
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from _walk(Path(entry.path), prefix / entry.name)
            elif entry.is_file():
                name = str(prefix / entry.name)
                if name != MANIFEST_NAME:
                    yield name, entry.stat().st_size


def _algorithm(value: object, where: str) -> DigestAlgorithm:
    for algorithm in DIGEST_ALGORITHMS:
        if value == algorithm:
            return algorithm
    raise ManifestError(f"{where}: 'algorithm' {value!r} is not one of {DIGEST_ALGORITHMS}")


def _entry(name: object, value: object, algorithm: DigestAlgorithm, where: str) -> FileEntry:
    if not isinstance(name, str) or not _is_safe_name(name):
        raise ManifestError(f"{where}: file name {name!r} is not a relative path inside it")
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: entry for {name} must be an object")
    size, digest = value.get("size"), value.get(algorithm)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{where}: {name}: 'size' must be a non-negative integer")
    if not isinstance(digest, str) or len(digest) != HEX_LENGTH or not _is_hex(digest):
        raise ManifestError(f"{where}: {name}: '{algorithm}' must be {HEX_LENGTH} hex digits")
    return FileEntry(size, digest.lower())


def _is_safe_name(name: str) -> bool:
    path = PurePosixPath(name)
    return (
        str(path) == name
        and name != "."
        and not path.is_absolute()
        and ".." not in path.parts
        and "\\" not in name
    )


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)
