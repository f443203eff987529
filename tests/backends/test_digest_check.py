"""A load confirms each file's digest on the pass that reads it into private memory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from hotweights.backends import TransformersLoader
from hotweights.digests import DIGEST_ALGORITHMS, DigestAlgorithm, hash_file
from hotweights.errors import VerificationError
from hotweights.sources import expected_digests, write_manifest


class CountingOpen:
    """Stands in for `open` in `hotweights.digests`: every path a separate hash opened."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, file: Any, *args: Any, **kwargs: Any) -> Any:
        self.paths.append(Path(os.fspath(file)).name)
        return open(file, *args, **kwargs)


def _published(tmp_path: Path, tiny_dir: Path, algorithm: DigestAlgorithm = "blake3") -> Path:
    version = tmp_path / "1"
    shutil.copytree(tiny_dir, version)
    write_manifest(version, algorithm=algorithm)
    return version


def _flip_a_byte(path: Path, at: int) -> None:
    with open(path, "r+b") as file:  # in place, same size: only a digest can tell
        file.seek(at)
        byte = file.read(1)
        file.seek(at)
        file.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("algorithm", DIGEST_ALGORITHMS)
def test_a_matching_version_loads_and_its_weights_are_not_read_twice(
    tmp_path: Path, tiny_dir: Path, algorithm: DigestAlgorithm, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = _published(tmp_path, tiny_dir, algorithm)
    opened = CountingOpen()
    monkeypatch.setattr("hotweights.digests.open", opened, raising=False)
    loader = TransformersLoader(expected_digests=expected_digests)
    assert loader.checks_digests
    model = loader.load(str(version))
    loader.unload(model)
    assert "model.safetensors" not in opened.paths  # hashed on the read into memory
    assert "config.json" in opened.paths  # small files are hashed apart


def test_a_weight_rewritten_in_place_is_refused_naming_both_digests(
    tmp_path: Path, tiny_dir: Path
) -> None:
    version = _published(tmp_path, tiny_dir)
    expected = hash_file(version / "model.safetensors").hexdigest
    _flip_a_byte(version / "model.safetensors", (version / "model.safetensors").stat().st_size - 3)
    actual = hash_file(version / "model.safetensors").hexdigest
    loader = TransformersLoader(expected_digests=expected_digests)
    with pytest.raises(VerificationError) as info:
        loader.load(str(version))
    assert info.value.problems == (
        f"model.safetensors: blake3 {actual} on disk, manifest says {expected}",
    )
    assert str(version) in str(info.value)


def test_a_changed_tokenizer_is_refused_before_it_is_parsed(tmp_path: Path, tiny_dir: Path) -> None:
    version = _published(tmp_path, tiny_dir)
    _flip_a_byte(version / "tokenizer.json", 0)
    loader = TransformersLoader(expected_digests=expected_digests)
    with pytest.raises(VerificationError, match=r"tokenizer\.json: blake3 [0-9a-f]{64} on disk"):
        loader.load(str(version))


def test_a_version_without_manifest_loads_unchecked(tmp_path: Path, tiny_dir: Path) -> None:
    loader = TransformersLoader(expected_digests=expected_digests)
    model = loader.load(str(tiny_dir))
    loader.unload(model)


def test_without_expected_digests_nothing_is_checked(tmp_path: Path, tiny_dir: Path) -> None:
    version = _published(tmp_path, tiny_dir)
    _flip_a_byte(version / "model.safetensors", (version / "model.safetensors").stat().st_size - 3)
    loader = TransformersLoader()
    assert not loader.checks_digests
    loader.unload(loader.load(str(version)))


def test_the_helper_process_load_is_checked_too(tmp_path: Path, tiny_dir: Path) -> None:
    version = _published(tmp_path, tiny_dir)
    loader = TransformersLoader(load_in="process", expected_digests=expected_digests)
    try:
        loader.unload(loader.load(str(version)))
        _flip_a_byte(
            version / "model.safetensors", (version / "model.safetensors").stat().st_size - 3
        )
        with pytest.raises(VerificationError, match=r"model\.safetensors: blake3"):
            loader.load(str(version))
    finally:
        loader.close()
