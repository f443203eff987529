from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from hotweights.digests import CHUNK_BYTES, DIGEST_ALGORITHMS, DigestAlgorithm, new_hasher
from hotweights.errors import ManifestError, VerificationError
from hotweights.sources import (
    MANIFEST_NAME,
    VerifyMode,
    build_manifest,
    expected_digests,
    read_manifest,
    sha256_file,
    verify,
    write_manifest,
)
from tests.sources.layouts import WEIGHTS, write_files


@pytest.fixture(params=DIGEST_ALGORITHMS)
def algorithm(request: pytest.FixtureRequest) -> DigestAlgorithm:
    chosen: DigestAlgorithm = request.param
    return chosen


@pytest.fixture
def version(tmp_path: Path, algorithm: DigestAlgorithm) -> Path:
    directory = write_files(tmp_path / "1", {**WEIGHTS, "sub/extra.txt": b"tokenizer"})
    write_manifest(
        directory,
        description="step 900",
        metadata={"step": 900, "loss": 1.5},
        algorithm=algorithm,
    )
    return directory


def _hex(algorithm: DigestAlgorithm, data: bytes) -> str:
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return hasher.hexdigest()


def test_round_trip(version: Path, algorithm: DigestAlgorithm) -> None:
    manifest = read_manifest(version)
    assert set(manifest.files) == {"config.json", "model.safetensors", "sub/extra.txt"}
    weights = manifest.files["model.safetensors"]
    assert weights.size == len(WEIGHTS["model.safetensors"])
    assert weights.digest == _hex(algorithm, WEIGHTS["model.safetensors"])
    assert manifest.algorithm == algorithm
    assert manifest.description == "step 900"
    assert manifest.metadata == {"step": 900, "loss": 1.5}
    assert manifest.created_at > 0
    assert manifest.format_version == (1 if algorithm == "sha256" else 2)
    result = verify(version)
    assert (result.mode, result.files, result.bytes) == ("digest", 3, manifest.total_bytes)


def test_hidden_entries_and_the_manifest_itself_are_not_listed(tmp_path: Path) -> None:
    directory = write_files(tmp_path / "1", {"a.bin": b"a", ".cache/x": b"x", ".DS_Store": b""})
    manifest = write_manifest(directory)
    assert set(manifest.files) == {"a.bin"}
    (directory / ".later").write_bytes(b"hidden files may come and go")
    verify(directory)
    assert not (directory / f".{MANIFEST_NAME}.tmp").exists()


@pytest.mark.parametrize("mode", ["digest", "size"])
def test_missing_file_is_named(version: Path, mode: VerifyMode) -> None:
    (version / "model.safetensors").unlink()
    with pytest.raises(VerificationError, match=r"model\.safetensors: missing") as info:
        verify(version, mode)
    assert info.value.problems == ("model.safetensors: missing",)


@pytest.mark.parametrize("mode", ["digest", "size"])
def test_truncated_file_names_both_sizes(version: Path, mode: VerifyMode) -> None:
    with open(version / "model.safetensors", "r+b") as file:
        file.truncate(100)
    expected = len(WEIGHTS["model.safetensors"])
    with pytest.raises(VerificationError, match=f"100 bytes on disk, manifest says {expected}"):
        verify(version, mode)


def test_digest_mismatch_with_the_same_size(version: Path, algorithm: DigestAlgorithm) -> None:
    data = bytearray(WEIGHTS["model.safetensors"])
    data[500] ^= 0xFF
    (version / "model.safetensors").write_bytes(bytes(data))
    expected = _hex(algorithm, WEIGHTS["model.safetensors"])
    pattern = rf"model\.safetensors: {algorithm} [0-9a-f]{{64}} on disk, manifest says {expected}"
    with pytest.raises(VerificationError, match=pattern):
        verify(version, "digest")
    verify(version, "size")  # sizes still agree
    verify(version, "none")


def test_extra_files_are_refused(version: Path) -> None:
    (version / "model-00002.safetensors").write_bytes(b"stray shard")
    with pytest.raises(VerificationError, match=r"model-00002\.safetensors: not in the manifest"):
        verify(version, "size")


def test_every_problem_is_listed(version: Path) -> None:
    (version / "config.json").unlink()
    (version / "sub" / "extra.txt").write_bytes(b"longer than before")
    (version / "new.txt").write_bytes(b"new")
    with pytest.raises(VerificationError) as info:
        verify(version, "size")
    assert len(info.value.problems) == 3


def test_none_mode_needs_only_a_manifest(version: Path) -> None:
    (version / "model.safetensors").unlink()
    assert verify(version, "none").files == 3
    (version / MANIFEST_NAME).unlink()
    with pytest.raises(ManifestError, match="no manifest"):
        verify(version, "none")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ('{"format": 3, "files": {}}', "format 3 is not supported"),
        ('{"format": 2, "files": {}}', "'algorithm' None is not one of"),
        ('{"format": 2, "algorithm": "md5", "files": {}}', "'algorithm' 'md5' is not one of"),
        (
            '{"format": 2, "algorithm": "blake3", "files": {"a": {"size": 1, "sha256": "'
            + "0" * 64
            + '"}}}',
            "'blake3' must be 64 hex digits",
        ),
        ('{"format": 1}', "'files' must be an object"),
        ('{"format": 1, "files": {"a": {"size": -1, "sha256": "' + "0" * 64 + '"}}}', "size"),
        ('{"format": 1, "files": {"a": {"size": 1, "sha256": "xyz"}}}', "64 hex digits"),
        ('{"format": 1, "files": {"../a": {"size": 1, "sha256": "' + "0" * 64 + '"}}}', "inside"),
        ('{"format": 1, "files": {"/etc/a": {"size": 1, "sha256": "' + "0" * 64 + '"}}}', "inside"),
        ('{"format": 1, "files": {}, "metadata": []}', "'metadata' must be an object"),
    ],
)
def test_malformed_manifests(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / MANIFEST_NAME).write_text(content)
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)


def test_metadata_must_be_json(tmp_path: Path) -> None:
    directory = write_files(tmp_path / "1", WEIGHTS)
    with pytest.raises(ManifestError, match="not plain JSON"):
        write_manifest(directory, metadata={"when": object()})
    assert sorted(p.name for p in directory.iterdir()) == sorted(WEIGHTS)


def test_manifest_is_stable_json(version: Path, algorithm: DigestAlgorithm) -> None:
    data = json.loads((version / MANIFEST_NAME).read_text())
    if algorithm == "sha256":  # exactly what every earlier hotweights wrote and reads
        assert data["format"] == 1
        assert "algorithm" not in data
    else:
        assert (data["format"], data["algorithm"]) == (2, algorithm)
    assert list(data["files"]) == sorted(data["files"])
    assert all(set(entry) == {"size", algorithm} for entry in data["files"].values())


def test_a_manifest_written_by_earlier_code_still_verifies(tmp_path: Path) -> None:
    """Format 1, as hotweights wrote it before manifests named their algorithm."""
    directory = write_files(tmp_path / "1", WEIGHTS)
    files = {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        for name, data in WEIGHTS.items()
    }
    old = {"format": 1, "created_at": 1.0, "description": "", "metadata": {}, "files": files}
    (directory / MANIFEST_NAME).write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    manifest = read_manifest(directory)
    assert manifest.algorithm == "sha256"
    assert verify(directory).files == len(WEIGHTS)
    assert manifest.to_dict() == old  # and it would be written back the same way
    (directory / "config.json").write_bytes(b'{"layers": 3}')
    with pytest.raises(VerificationError, match=r"config\.json: sha256"):
        verify(directory)


def test_expected_digests_checks_sizes_and_hands_over_digests(
    version: Path, algorithm: DigestAlgorithm
) -> None:
    expected = expected_digests(version)
    assert expected is not None
    weights = expected["model.safetensors"]
    assert (weights.algorithm, weights.size) == (algorithm, len(WEIGHTS["model.safetensors"]))
    assert weights.hexdigest == _hex(algorithm, WEIGHTS["model.safetensors"])
    (version / "stray.safetensors").write_bytes(b"x")
    with pytest.raises(VerificationError, match=r"stray\.safetensors: not in the manifest"):
        expected_digests(version)


def test_expected_digests_of_a_directory_without_manifest_is_none(tmp_path: Path) -> None:
    assert expected_digests(write_files(tmp_path / "1", WEIGHTS)) is None


def test_known_digests_are_used_and_the_rest_hashed(tmp_path: Path) -> None:
    directory = write_files(tmp_path / "1", WEIGHTS)
    fake = build_manifest(directory, algorithm="blake3").digests()["config.json"]
    fake = type(fake)(fake.size, fake.algorithm, "f" * 64)
    manifest = build_manifest(directory, algorithm="blake3", known={"config.json": fake})
    assert manifest.files["config.json"].digest == "f" * 64  # taken as computed on the way in
    assert manifest.files["model.safetensors"].digest == _hex(
        "blake3", WEIGHTS["model.safetensors"]
    )
    stale = type(fake)(fake.size + 1, fake.algorithm, "f" * 64)
    rebuilt = build_manifest(directory, algorithm="blake3", known={"config.json": stale})
    assert rebuilt.files["config.json"].digest == _hex("blake3", WEIGHTS["config.json"])


def test_sha256_over_several_chunks(tmp_path: Path) -> None:
    data = bytes(range(256)) * (CHUNK_BYTES // 256 * 2 + 3)
    (tmp_path / "big").write_bytes(data)
    assert sha256_file(tmp_path / "big") == hashlib.sha256(data).hexdigest()


def test_build_manifest_writes_nothing(tmp_path: Path) -> None:
    directory = write_files(tmp_path / "1", WEIGHTS)
    assert set(build_manifest(directory).files) == set(WEIGHTS)
    assert not (directory / MANIFEST_NAME).exists()


def test_unknown_mode_is_refused(version: Path) -> None:
    with pytest.raises(ValueError, match="verification mode"):
        verify(version, "fast")  # type: ignore[arg-type]
