from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest

from hotweights.digests import DigestAlgorithm, FileDigest
from hotweights.errors import PublishError, VersionExists
from hotweights.sources import MANIFEST_NAME, checkpoint_transfer, read_manifest, stage, verify
from hotweights.sources import publisher as publish_module
from hotweights.sources.publisher import publish, publish_pretrained
from hotweights.sources.rename import rename_noreplace
from tests.fakes import FakePretrained
from tests.sources.layouts import WEIGHTS, write_files


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_files(tmp_path / "checkpoint", {**WEIGHTS, "tok/vocab.json": b"{}"})


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "models"


def listing(root: Path, model: str = "m") -> list[str]:
    """Everything in the model directory, hidden entries included."""
    return sorted(path.name for path in (root / model).iterdir())


def test_publish_creates_consecutive_versions(src: Path, root: Path) -> None:
    first = publish(src, root, "m", description="step 100", metadata={"step": 100})
    second = publish(src, root, "m")
    assert (first.version, second.version) == (1, 2)
    assert first.path == root / "m" / "1"
    assert listing(root) == ["1", "2"]
    manifest = read_manifest(first.path)
    assert manifest == first.manifest
    assert (manifest.description, manifest.metadata) == ("step 100", {"step": 100})
    assert set(manifest.files) == {"config.json", "model.safetensors", "tok/vocab.json"}
    verify(first.path)


def test_publish_continues_after_the_highest_number(src: Path, root: Path) -> None:
    write_files(root / "m" / "7", {"a": b"a"})
    write_files(root / "m" / "latest", {"a": b"a"})
    assert publish(src, root, "m").version == 8


def test_publish_skips_hidden_files_and_an_old_manifest(src: Path, root: Path) -> None:
    write_files(src, {".git/HEAD": b"ref", MANIFEST_NAME: b"stale"})
    published = publish(src, root, "m")
    assert not (published.path / ".git").exists()
    assert MANIFEST_NAME not in published.manifest.files
    verify(published.path)


def test_explicit_version_is_never_overwritten(src: Path, root: Path) -> None:
    assert publish(src, root, "m", version=5).version == 5
    before = read_manifest(root / "m" / "5")
    with pytest.raises(VersionExists, match="version 5 already exists"):
        publish(src, root, "m", version=5)
    assert read_manifest(root / "m" / "5") == before
    assert listing(root) == ["5"]


def test_explicit_version_taken_while_staging(src: Path, root: Path) -> None:
    with stage(root, "m") as staged:
        write_files(staged.path, WEIGHTS)
        (root / "m" / "3").mkdir()  # an empty directory: plain rename() would replace it
        with pytest.raises(VersionExists):
            staged.commit(version=3)
    assert listing(root) == ["3"]
    assert list((root / "m" / "3").iterdir()) == []


def test_rename_noreplace_refuses_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c"]


def test_disk_full_midway_leaves_nothing(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(src, root, "m")
    real = checkpoint_transfer.copy_file

    def copy_until_full(source: Path, target: Path, algorithm: DigestAlgorithm) -> FileDigest:
        if source.name == "model.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real(source, target, algorithm)

    monkeypatch.setattr(checkpoint_transfer, "copy_file", copy_until_full)
    with pytest.raises(PublishError, match="No space left on device") as info:
        publish(src, root, "m")
    assert "nothing was published" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert listing(root) == ["1"]  # no version 2, no staging directory


def test_disk_full_while_writing_the_manifest(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(publish_module, "write_manifest", full)
    with pytest.raises(PublishError, match="No space left"):
        publish(src, root, "m")
    assert listing(root) == []


def test_concurrent_publishers_get_distinct_versions(
    src: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publishers = 4
    together = threading.Barrier(publishers)
    real = publish_module.next_version
    raced: set[int] = set()

    def next_version_in_step(model_dir: Path) -> int:
        """Every publisher picks its number at the same moment, so all pick the same."""
        ident = threading.get_ident()
        if ident not in raced:
            raced.add(ident)
            together.wait(timeout=30)
        return real(model_dir)

    monkeypatch.setattr(publish_module, "next_version", next_version_in_step)
    results: list[int] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(publish(src, root, "m").version)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(publishers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert sorted(results) == [1, 2, 3, 4]
    assert listing(root) == ["1", "2", "3", "4"]
    for number in results:
        verify(root / "m" / str(number))


@pytest.mark.parametrize("model", [".hidden", "a/b", "", "x.tmp", ".."])
def test_bad_model_names(src: Path, root: Path, model: str) -> None:
    with pytest.raises(PublishError, match="not a valid model name"):
        publish(src, root, model)


def test_bad_sources(tmp_path: Path, root: Path) -> None:
    with pytest.raises(PublishError, match="missing: it does not exist"):
        publish(tmp_path / "missing", root, "m")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(PublishError, match="not a directory"):
        publish(tmp_path / "file", root, "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PublishError, match="nothing to publish"):
        publish(tmp_path / "empty", root, "m")
    assert listing(root) == []
    with pytest.raises(PublishError, match="positive"):
        publish(tmp_path / "empty", root, "m", version=0)


def test_metadata_must_be_json(src: Path, root: Path) -> None:
    with pytest.raises(PublishError, match="not plain JSON"):
        publish(src, root, "m", metadata={"x": {1, 2}})
    assert listing(root) == []


def test_stage_discards_on_error(root: Path) -> None:
    def crash_while_saving() -> None:
        with stage(root, "m") as staged:
            write_files(staged.path, WEIGHTS)
            raise RuntimeError("training crashed")

    with pytest.raises(RuntimeError):
        crash_while_saving()
    assert listing(root) == []
    with stage(root, "m") as staged:
        write_files(staged.path, WEIGHTS)  # no commit: discarded too
    assert listing(root) == []
    with pytest.raises(PublishError, match="already committed or discarded"):
        staged.commit()


def test_staging_is_hidden_and_readable_by_others(root: Path) -> None:
    with stage(root, "m") as staged:
        assert staged.path.parent == root / "m"
        assert staged.path.name.startswith(".")
        assert staged.path.stat().st_mode & 0o055 == (root / "m").stat().st_mode & 0o055
        write_files(staged.path, WEIGHTS)
        published = staged.commit(description="from a training loop")
    assert published.version == 1
    assert read_manifest(published.path).description == "from a training loop"


def test_publish_pretrained(root: Path) -> None:
    model = FakePretrained({"config.json": b"{}", "model.safetensors": b"weights"})
    tokenizer = FakePretrained({"tokenizer.json": b"{}"})
    published = publish_pretrained(model, tokenizer, root, "m", max_shard_size="1GB")
    assert model.calls == [{"safe_serialization": True, "max_shard_size": "1GB"}]
    assert tokenizer.calls == [{}]
    assert set(published.manifest.files) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert listing(root) == ["1"]


def test_publish_pretrained_failure_leaves_nothing(root: Path) -> None:
    model = FakePretrained({"config.json": b"{}", "a": b"a"}, fail=OSError(errno.ENOSPC, "full"))
    with pytest.raises(PublishError, match="saving m"):
        publish_pretrained(model, None, root, "m")
    assert listing(root) == []


@pytest.mark.llm
def test_publish_pretrained_with_a_real_tiny_model(root: Path) -> None:
    pytest.importorskip("transformers")
    from hotweights.demo.tinylm import build_model, build_tokenizer

    tokenizer = build_tokenizer()
    published = publish_pretrained(build_model(tokenizer), tokenizer, root, "tiny")
    names = set(published.manifest.files)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(name.endswith(".bin") for name in names)
    verify(published.path)
