from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hotweights.errors import NoPreviousVersion, UnknownVersion
from hotweights.sources import (
    ModelRepository,
    Pinned,
    VersionStatus,
    layout,
    verify,
    write_manifest,
)
from tests.fakes import FakeClock
from tests.sources.layouts import WEIGHTS, make_version, write_files

E, INC, S, B = (
    VersionStatus.ELIGIBLE,
    VersionStatus.INCOMPLETE,
    VersionStatus.SETTLING,
    VersionStatus.BAD,
)
VERIFY_FILES = "hotweights.sources.repository.verify_files"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def repo(root: Path, clock: FakeClock) -> ModelRepository:
    return ModelRepository(root, settle_seconds=10.0, clock=clock, read_backoff=0.0)


def statuses(repo: ModelRepository, model: str = "m") -> dict[int, VersionStatus]:
    return {info.number: info.status for info in repo.versions(model)}


def test_complete_versions_are_eligible(root: Path, repo: ModelRepository) -> None:
    make_version(root, "m", 1, description="first")
    make_version(root, "m", 2)
    state = repo.scan()
    assert state.readable
    assert repo.models() == ["m"]
    assert statuses(repo) == {1: E, 2: E}
    first = repo.versions("m")[0]
    assert (first.description, first.has_manifest, first.files) == ("first", True, 3)
    assert first.path == root / "m" / "1"
    target = repo.target("m")
    assert target is not None
    assert target.number == 2


def test_truncated_file_is_incomplete(root: Path, repo: ModelRepository) -> None:
    version = make_version(root, "m", 1)
    with open(version / "model.safetensors", "r+b") as file:
        file.truncate(10)
    repo.scan()
    (info,) = repo.versions("m")
    assert info.status is INC
    assert "model.safetensors: 10 bytes on disk" in info.reason
    assert repo.target("m") is None
    assert repo.candidates("m") == []


def test_digest_mismatch_with_the_same_size(root: Path, clock: FakeClock) -> None:
    version = make_version(root, "m", 1)
    (version / "config.json").write_bytes(b'{"layers": 3}')  # same length, other bytes
    digest = ModelRepository(root, clock=clock)
    digest.scan()
    assert statuses(digest) == {1: INC}
    assert "blake3" in digest.versions("m")[0].reason
    size = ModelRepository(root, verify="size", clock=clock)
    size.scan()
    assert statuses(size) == {1: E}


class CountingOpen:
    """Stands in for `open` where files are hashed, and records every path opened."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self._open = open

    def __call__(self, file: Any, *args: Any, **kwargs: Any) -> Any:
        self.paths.append(os.fspath(file))
        return self._open(file, *args, **kwargs)

    def read(self, name: str) -> int:
        return sum(1 for path in self.paths if path.endswith(name))


def test_a_scan_reads_no_bytes_when_the_loader_checks_digests(
    root: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = make_version(root, "m", 1)
    opened = CountingOpen()
    monkeypatch.setattr("hotweights.digests.open", opened, raising=False)
    hashing = ModelRepository(root, clock=clock)
    hashing.scan()
    assert opened.read("model.safetensors") == 1  # the control: a scan that hashes opens it
    opened.paths.clear()
    loading = ModelRepository(root, clock=clock, loader_checks_digests=True)
    assert loading.scan_mode == "size"
    loading.scan()
    assert statuses(loading) == {1: E}
    (version / "config.json").write_bytes(b'{"layers": 3}')  # same size, other bytes:
    loading.scan()  # the load refuses it (tests/server), the scan does not read it
    assert statuses(loading) == {1: E}
    (version / "model.safetensors").write_bytes(b"short")
    loading.scan()
    assert statuses(loading) == {1: INC}  # sizes are still checked at scan
    assert "model.safetensors: 5 bytes on disk" in loading.versions("m")[0].reason
    assert opened.paths == []


def test_size_and_none_modes_are_not_changed_by_a_loader_that_checks(root: Path) -> None:
    for mode in ("size", "none"):
        assert ModelRepository(root, verify=mode, loader_checks_digests=True).scan_mode == mode


def test_without_manifest_a_version_settles(
    root: Path, repo: ModelRepository, clock: FakeClock
) -> None:
    version = make_version(root, "m", 1, manifest=False)
    state = repo.scan()
    assert statuses(repo) == {1: S}
    assert state.settle_due == 10.0
    clock.advance(9.0)
    repo.scan()
    assert statuses(repo) == {1: S}
    (version / "more.bin").write_bytes(b"still copying")  # a change restarts the wait
    clock.advance(5.0)
    state = repo.scan()
    assert statuses(repo) == {1: S}
    assert state.settle_due == 10.0
    clock.advance(10.0)
    state = repo.scan()
    assert statuses(repo) == {1: E}
    assert state.settle_due is None


def test_hidden_part_files_keep_a_version_settling(
    root: Path, repo: ModelRepository, clock: FakeClock
) -> None:
    version = make_version(root, "m", 1, manifest=False)
    repo.scan()
    clock.advance(8.0)
    (version / ".model.safetensors.part").write_bytes(b"downloading")
    clock.advance(8.0)
    repo.scan()
    assert statuses(repo) == {1: S}


def test_empty_version_is_incomplete(root: Path, repo: ModelRepository, clock: FakeClock) -> None:
    (root / "m" / "1").mkdir(parents=True)
    clock.advance(100.0)
    repo.scan()
    clock.advance(100.0)
    repo.scan()
    assert statuses(repo) == {1: INC}


def test_odd_names_are_ignored(
    root: Path, repo: ModelRepository, caplog: pytest.LogCaptureFixture
) -> None:
    make_version(root, "m", 1)
    for name in (".tmp-publish-1", "2.partial", "latest", "03", "-4", "tmp-5"):
        write_files(root / "m" / name, WEIGHTS)
    (root / "m" / "6").write_bytes(b"a file, not a directory")
    write_files(root / ".hidden-model" / "1", WEIGHTS)
    (root / "README").write_text("not a model")
    repo.scan()
    repo.scan()
    assert repo.models() == ["m"]
    assert statuses(repo) == {1: E}
    warnings = [
        r.getMessage() for r in caplog.records if "not a model or version name" in r.getMessage()
    ]
    assert len(warnings) == 3  # latest, 03, -4: each logged once over two scans


def test_symlinks(root: Path, tmp_path: Path, repo: ModelRepository) -> None:
    make_version(root, "m", 1)
    outside = make_version(tmp_path / "elsewhere", "m", 9)
    (root / "m" / "2").symlink_to(outside)  # leaves the root: refused
    (root / "m" / "3").symlink_to(root / "m" / "1")  # stays inside: fine
    (root / "other").symlink_to(tmp_path / "elsewhere" / "m")
    linked = make_version(root, "n", 1, {"config.json": b"{}"}, manifest=False)
    (linked / "weights.bin").symlink_to(outside / "model.safetensors")
    repo.scan()
    assert repo.models() == ["m", "n"]
    assert statuses(repo) == {1: E, 3: E}
    (info,) = repo.versions("n")
    assert info.status is INC
    assert "links outside" in info.reason


def test_version_deleted_while_being_verified(
    root: Path, repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_version(root, "m", 1)
    doomed = make_version(root, "m", 2)
    real = verify

    def delete_then_verify(directory: Path | str, *args: Any, **kwargs: Any) -> Any:
        if Path(directory) == doomed:
            shutil.rmtree(doomed)
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(VERIFY_FILES, delete_then_verify)
    repo.scan()
    assert statuses(repo) == {1: E}


def test_file_replaced_while_being_verified_is_not_cached(
    root: Path, repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = make_version(root, "m", 1)
    real = verify
    calls = []

    def verify_while_copying(directory: Path | str, *args: Any, **kwargs: Any) -> Any:
        calls.append(directory)
        if len(calls) == 1:
            (version / "late.bin").write_bytes(b"arrived during the hash")
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(VERIFY_FILES, verify_while_copying)
    repo.scan()
    assert statuses(repo) == {1: INC}
    (version / "late.bin").unlink()
    repo.scan()
    assert statuses(repo) == {1: E}
    assert len(calls) == 2


def test_digests_are_checked_once_per_signature(
    root: Path, repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = make_version(root, "m", 1)
    real = verify
    calls: list[str] = []

    def counting(directory: Path | str, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(directory))
        return real(directory, *args, **kwargs)

    monkeypatch.setattr(VERIFY_FILES, counting)
    for _ in range(3):
        repo.scan()
    assert len(calls) == 1
    os.utime(version / "config.json", ns=(5, 5))
    repo.scan()
    assert len(calls) == 2


def test_pin_unpin_and_rollback_survive_rescans(root: Path, repo: ModelRepository) -> None:
    for n in (1, 2, 3):
        make_version(root, "m", n)
    repo.scan()
    repo.pin("m", 1)
    make_version(root, "m", 4)
    repo.scan()
    target = repo.target("m", live=3)
    assert target is not None
    assert target.number == 1
    assert [info.number for info in repo.candidates("m")] == [1]
    repo.unpin("m")
    target = repo.target("m", live=1)
    assert target is not None
    assert target.number == 4
    rolled = repo.rollback("m", live=4)
    assert rolled.number == 3
    repo.scan()
    assert repo.policy("m") == Pinned(3, "rollback")
    assert repo.rollback("m").number == 2  # from the current target, 3
    with pytest.raises(UnknownVersion):
        repo.pin("m", 9)
    with pytest.raises(NoPreviousVersion):
        repo.rollback("m", live=1)


def test_bad_until_files_change(root: Path, repo: ModelRepository) -> None:
    make_version(root, "m", 1)
    version = make_version(root, "m", 2)
    repo.scan()
    repo.mark_bad("m", 2, "validation failed: NaN logits")
    repo.scan()
    repo.scan()
    assert statuses(repo) == {1: E, 2: B}
    assert repo.versions("m")[1].reason == "validation failed: NaN logits"
    target = repo.target("m")
    assert target is not None
    assert target.number == 1
    (version / "model.safetensors").write_bytes(b"fixed weights")
    write_manifest(version)
    repo.scan()
    assert statuses(repo) == {1: E, 2: E}
    assert repo.bad_reason("m", 2) is None


def test_an_explicit_pin_clears_a_bad_mark(root: Path, repo: ModelRepository) -> None:
    make_version(root, "m", 1)
    repo.scan()
    repo.mark_bad("m", 1, "failed")
    repo.pin("m", 1)
    repo.scan()
    assert statuses(repo) == {1: E}


def test_unreadable_root_is_no_change(root: Path, tmp_path: Path, repo: ModelRepository) -> None:
    make_version(root, "m", 1)
    repo.scan()
    root.rename(tmp_path / "away")
    state = repo.scan()
    assert not state.readable
    assert state.error is not None
    assert statuses(repo) == {1: E}  # what the last readable scan saw
    (tmp_path / "away").rename(root)
    assert repo.scan().readable


def test_missing_root_at_start(tmp_path: Path) -> None:
    repo = ModelRepository(tmp_path / "nothing")
    state = repo.scan()
    assert not state.readable
    assert repo.models() == []


def flaky(real: Callable[..., Any], failures: list[OSError]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop(0)
        return real(*args, **kwargs)

    return call


def test_transient_errors_are_retried(
    root: Path, repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_version(root, "m", 1)
    failures = [OSError(errno.EIO, "I/O error"), OSError(errno.ESTALE, "stale handle")]
    monkeypatch.setattr(layout, "signature", flaky(layout.signature, failures))
    repo.scan()
    assert statuses(repo) == {1: E}
    assert failures == []


def test_lasting_errors_make_a_version_unreadable(
    root: Path, repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_version(root, "m", 1)
    failures = [OSError(errno.EACCES, "Permission denied")]
    monkeypatch.setattr(layout, "signature", flaky(layout.signature, failures))
    repo.scan()
    (info,) = repo.versions("m")
    assert info.status is INC
    assert "unreadable" in info.reason


def test_transient_errors_are_bounded(
    root: Path, repo: ModelRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_version(root, "m", 1)
    failures = [OSError(errno.EIO, "I/O error") for _ in range(10)]
    monkeypatch.setattr(layout, "signature", flaky(layout.signature, failures))
    repo.scan()
    assert statuses(repo) == {1: INC}
    assert len(failures) == 10 - 4  # one try and three retries


def test_candidates_newest_first(root: Path, repo: ModelRepository) -> None:
    for n in (1, 2, 3):
        make_version(root, "m", n)
    make_version(root, "m", 4, manifest=False)
    repo.scan()
    assert [info.number for info in repo.candidates("m")] == [3, 2, 1]


def test_locate(root: Path, repo: ModelRepository) -> None:
    assert repo.locate(str(root / "m" / "2")) == ("m", 2)
    assert repo.locate("/elsewhere/m/2") is None


def test_to_dict(root: Path, repo: ModelRepository) -> None:
    make_version(root, "m", 1, description="d")
    repo.scan()
    data = repo.versions("m")[0].to_dict()
    assert data["status"] == "eligible"
    assert data["description"] == "d"
    assert "signature" not in data
