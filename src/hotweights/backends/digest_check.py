"""Checking a version's files against the digests its manifest gives, on the load's read.

`make_weights_private` reads each safetensors file's data section into private memory.
A `DigestCheck` hands it one hasher per file, already fed the file's first bytes (the
length field and the header exactly as parsed), and each chunk is hashed as it lands: the
whole file's digest costs hashing, not another read. The files the load does not stream
(config and tokenizer, small; every file when the weights go to a GPU or through the
helper process) are hashed by `check_rest`, several at a time on threads.

What was hashed is what was loaded: a file rewritten after the check cannot reach the
served model, whose weights live in private memory. Not thread-safe: one load's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from hotweights.backends.safetensors_header import SafetensorsHeader
from hotweights.digests import FileDigest, Hasher, hash_file, new_hasher, run_parallel
from hotweights.errors import VerificationError

_MAX_LISTED_PROBLEMS = 5


class DigestCheck:
    """The expected digests of one version directory, and which of them are confirmed."""

    def __init__(self, root: Path, expected: Mapping[str, FileDigest]) -> None:
        self.root = root
        self.expected = dict(expected)
        self._confirmed: set[str] = set()
        self._problems: list[str] = []

    def hashers(self, headers: Sequence[SafetensorsHeader]) -> list[Hasher | None]:
        """A hasher per header's file (None for a file the manifest does not list), fed the
        bytes before the data section; the caller feeds it the data section in order."""
        hashers: list[Hasher | None] = []
        for header in headers:
            expected = self.expected.get(self._name(header.path))
            if expected is None:
                hashers.append(None)
                continue
            hasher = new_hasher(expected.algorithm)
            hasher.update(len(header.raw).to_bytes(8, "little"))
            hasher.update(header.raw)
            hashers.append(hasher)
        return hashers

    def confirm_streamed(
        self, headers: Sequence[SafetensorsHeader], hashers: Sequence[Hasher | None]
    ) -> None:
        """Compare each fed hasher with its file's expected digest (the file's size as
        the header read it: what was hashed)."""
        for header, hasher in zip(headers, hashers, strict=True):
            if hasher is None:
                continue
            name = self._name(header.path)
            expected = self.expected[name]
            actual = FileDigest(header.file_size, expected.algorithm, hasher.hexdigest())
            self._note(name, expected.mismatch(name, actual))

    def check_rest(self, skip: Sequence[SafetensorsHeader] = ()) -> None:
        """Hash every listed file not confirmed yet (on threads), but `skip`'s files (to be
        streamed later), then raise `VerificationError` naming each file that differs so
        far, with expected and actual digest. Raises `OSError` if a file cannot be read."""
        later = {self._name(header.path) for header in skip}
        rest = {
            name: name
            for name in sorted(self.expected)
            if name not in self._confirmed and name not in later
        }

        def check(name: str) -> str | None:
            expected = self.expected[name]
            try:
                actual = hash_file(self.root / name, expected.algorithm)
            except FileNotFoundError:
                return f"{name}: missing"
            return expected.mismatch(name, actual)

        for name, problem in run_parallel(check, rest).items():
            self._note(name, problem)
        if self._problems:
            shown = "; ".join(self._problems[:_MAX_LISTED_PROBLEMS])
            more = len(self._problems) - _MAX_LISTED_PROBLEMS
            suffix = f" (and {more} more)" if more > 0 else ""
            raise VerificationError(
                f"{self.root}: refused, its files differ from its manifest: {shown}{suffix}",
                tuple(self._problems),
            )

    def _note(self, name: str, problem: str | None) -> None:
        self._confirmed.add(name)
        if problem is not None:
            self._problems.append(problem)

    def _name(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:  # a shard outside the directory: not in the manifest
            return str(path)
