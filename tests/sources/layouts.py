"""Builds model repository layouts on disk for the sources tests."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from hotweights.sources import write_manifest

WEIGHTS = {"config.json": b'{"layers": 2}', "model.safetensors": bytes(range(256)) * 8}
"""A version's files: small, but with a weight file worth truncating."""


def write_files(directory: Path, files: Mapping[str, bytes]) -> Path:
    """Write `files` (relative name → bytes) under `directory`, creating it."""
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return directory


def make_version(
    root: Path,
    model: str,
    number: int,
    files: Mapping[str, bytes] | None = None,
    *,
    manifest: bool = True,
    description: str = "",
) -> Path:
    """`root/model/number` with `files` (default `WEIGHTS`) and, unless `manifest` is
    False, a manifest written last."""
    directory = write_files(root / model / str(number), WEIGHTS if files is None else files)
    if manifest:
        write_manifest(directory, description=description)
    return directory
