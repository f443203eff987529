"""Publishing by copy, link and move: one read per file, the same manifest either way."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from hotweights.cli import main
from hotweights.digests import DIGEST_ALGORITHMS, DigestAlgorithm, hash_file
from hotweights.errors import PublishError, VerificationError
from hotweights.sources import (
    MANIFEST_NAME,
    PUBLISH_MODES,
    PublishMode,
    build_manifest,
    checkpoint_transfer,
    publish,
    read_manifest,
    verify,
)
from hotweights.sources import publisher as publish_module
from tests.sources.layouts import WEIGHTS, write_files

FILES = {**WEIGHTS, "tok/vocab.json": b'{"a": 1}'}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_files(tmp_path / "checkpoint", {**FILES, ".trainer-state": b"hidden"})


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.mark.parametrize("mode", PUBLISH_MODES)
@pytest.mark.parametrize("algorithm", DIGEST_ALGORITHMS)
def test_every_mode_gives_the_manifest_a_separate_hash_would(
    src: Path, root: Path, mode: PublishMode, algorithm: DigestAlgorithm
) -> None:
    published = publish(src, root, "m", mode=mode, algorithm=algorithm, description="d")
    assert set(published.manifest.files) == set(FILES)
    separately = build_manifest(published.path, algorithm=algorithm)  # a second, plain read
    assert published.manifest.files == separately.files
    assert read_manifest(published.path) == published.manifest
    verify(published.path)
    for name, data in FILES.items():
        assert (published.path / name).read_bytes() == data
    if algorithm == "sha256":  # what the copy-then-hash publisher wrote before
        for name, data in FILES.items():
            digest = hashlib.sha256(data).hexdigest()
            assert published.manifest.files[name].digest == digest


def test_copy_leaves_the_source_untouched(src: Path, root: Path) -> None:
    published = publish(src, root, "m")
    assert all((src / name).read_bytes() == data for name, data in FILES.items())
    assert (
        os.stat(src / "model.safetensors").st_ino
        != os.stat(published.path / "model.safetensors").st_ino
    )


def test_link_shares_or_clones_the_files(src: Path, root: Path) -> None:
    published = publish(src, root, "m", mode="link")
    for name in FILES:
        original, staged = os.stat(src / name), os.stat(published.path / name)
        # a hard link is the same inode; a reflink is a new inode with the same bytes
        assert (
            original.st_ino == staged.st_ino
            or (src / name).read_bytes() == (published.path / name).read_bytes()
        )
    assert not (published.path / ".trainer-state").exists()


def test_a_hard_linked_file_rewritten_in_place_fails_verification(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hazard the README names: `--link` is safe only if the trainer never rewrites."""
    monkeypatch.setattr(checkpoint_transfer, "_reflink", lambda origin, destination: False)
    published = publish(src, root, "m", mode="link")
    data = bytearray(FILES["model.safetensors"])
    data[7] ^= 0xFF
    with open(src / "model.safetensors", "r+b") as file:  # in place: same inode
        file.write(bytes(data))
    with pytest.raises(VerificationError, match=r"model\.safetensors: blake3"):
        verify(published.path)


def test_move_takes_the_files_and_leaves_hidden_ones(src: Path, root: Path) -> None:
    published = publish(src, root, "m", mode="move")
    verify(published.path)
    assert sorted(p.name for p in src.rglob("*") if p.is_file()) == [".trainer-state"]


def test_a_failed_move_puts_the_files_back(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(publish_module, "write_manifest", full)
    with pytest.raises(PublishError, match="No space left"):
        publish(src, root, "m", mode="move")
    assert all((src / name).read_bytes() == data for name, data in FILES.items())
    assert sorted(p.name for p in (root / "m").iterdir()) == []


@pytest.mark.parametrize("mode", ["link", "move"])
def test_link_and_move_refuse_another_filesystem(
    src: Path, root: Path, mode: PublishMode, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = checkpoint_transfer.filesystem_of
    source = os.path.realpath(src)

    def elsewhere(path: Path) -> int:
        return real(path) + (1 if os.path.realpath(path) == source else 0)

    monkeypatch.setattr(checkpoint_transfer, "filesystem_of", elsewhere)
    with pytest.raises(PublishError, match=f"cannot publish {src} with --{mode}: .*another"):
        publish(src, root, "m", mode=mode)
    assert all((src / name).read_bytes() == data for name, data in FILES.items())
    assert sorted(p.name for p in (root / "m").iterdir()) == []
    assert publish(src, root, "m").version == 1  # a copy may cross


@pytest.mark.parametrize("mode", ["link", "move"])
def test_link_and_move_refuse_a_real_other_filesystem(tmp_path: Path, mode: PublishMode) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem to publish from")
    source = write_files(shm / f"hotweights-test-{os.getpid()}-{mode}", FILES)
    try:
        with pytest.raises(PublishError, match=f"{source} with --{mode}"):
            publish(source, tmp_path / "models", "m", mode=mode)
        assert (source / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    finally:
        for name in FILES:
            (source / name).unlink()
        (source / "tok").rmdir()
        source.rmdir()


@pytest.mark.parametrize("mode", PUBLISH_MODES)
def test_a_missing_source_is_named(tmp_path: Path, root: Path, mode: PublishMode) -> None:
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(PublishError, match=f"cannot publish {missing}: it does not exist"):
        publish(missing, root, "m", mode=mode)


def test_move_refuses_a_symbolic_link_before_moving_anything(src: Path, root: Path) -> None:
    (src / "linked.json").symlink_to(src / "config.json")
    with pytest.raises(PublishError, match=r"linked\.json with --move: it is a symbolic link"):
        publish(src, root, "m", mode="move")
    assert (src / "model.safetensors").read_bytes() == FILES["model.safetensors"]


def test_the_cli_publishes_by_each_mode(
    src: Path, root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["publish", "--repo", str(root), "--model", "m"]
    assert main([*base, str(src), "--link", "--digest", "sha256"]) == 0
    assert read_manifest(root / "m" / "1").algorithm == "sha256"
    assert main([*base, str(src)]) == 0
    assert read_manifest(root / "m" / "2").algorithm == "blake3"
    assert main([*base, str(src), "--move"]) == 0
    assert capsys.readouterr().out.split() == ["1", "2", "3"]
    assert not (src / "model.safetensors").exists()
    assert main([*base, str(src), "--move"]) == 1  # nothing left to publish
    assert "nothing to publish" in capsys.readouterr().err
    verify(root / "m" / "3")
    assert hash_file(root / "m" / "3" / "config.json").size == len(FILES["config.json"])
    assert not (root / "m" / "3" / MANIFEST_NAME).is_symlink()
