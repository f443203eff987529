from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotweights.core import Notice, Outcome, Reloader, ReloadFinished, RetryPolicy
from hotweights.errors import LoadError, NoPreviousVersion, ValidationError
from hotweights.sources import (
    ModelRepository,
    PollingWatcher,
    RepositorySync,
    VersionStatus,
    Watcher,
    publish,
    write_manifest,
)
from hotweights.sources.watcher import EventWatcher
from tests.fakes import FakeLoader, FakeModel
from tests.sources.layouts import WEIGHTS, make_version, write_files

WAIT = 20.0


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return write_files(tmp_path / "checkpoint", WEIGHTS)


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


@pytest.fixture
def reloader(loader: FakeLoader) -> Iterator[Reloader[FakeModel]]:
    made: Reloader[FakeModel] = Reloader(
        loader, name="m", retry=RetryPolicy(retries=0, base_delay=0.0), drain_timeout=60.0
    )
    yield made
    made.close(timeout=10)


@pytest.fixture
def repo(root: Path) -> ModelRepository:
    return ModelRepository(root, read_backoff=0.0)


@pytest.fixture
def syncs() -> Iterator[list[RepositorySync]]:
    made: list[RepositorySync] = []
    yield made
    for sync in made:
        sync.close()


def make_sync(
    syncs: list[RepositorySync],
    repo: ModelRepository,
    reloader: Reloader[FakeModel],
    watcher: Watcher | None = None,
) -> RepositorySync:
    sync = RepositorySync(repo, {"m": reloader}, watcher)
    syncs.append(sync)
    return sync


def live(reloader: Reloader[FakeModel]) -> str | None:
    version = reloader.slot.live_version
    return version.source if version else None


def went_live(reloader: Reloader[FakeModel], source: Path) -> threading.Event:
    """Set when a reload of `source` ends live (or rolled back)."""
    done = threading.Event()

    def observe(notice: Notice) -> None:
        if not isinstance(notice, ReloadFinished) or notice.event.target != str(source):
            return
        if notice.event.succeeded:
            done.set()

    reloader.subscribe(observe)
    return done


def sync_and_wait(sync: RepositorySync) -> Outcome:
    (ticket,) = sync.sync().submitted.values()
    return ticket.wait(WAIT).outcome


def test_follows_the_repository(
    root: Path,
    src: Path,
    repo: ModelRepository,
    loader: FakeLoader,
    reloader: Reloader[FakeModel],
    syncs: list[RepositorySync],
    tmp_path: Path,
) -> None:
    sync = make_sync(syncs, repo, reloader)
    assert sync.sync().submitted == {}  # an empty repository: nothing to do

    v1 = publish(src, root, "m", description="first").path
    (ticket,) = sync.sync().submitted.values()
    event = ticket.wait(WAIT)
    assert (event.outcome, event.trigger, event.description) == (
        Outcome.LIVE,
        "watch",
        "m v1: first",
    )
    assert live(reloader) == str(v1)
    assert sync.sync().submitted == {}  # unchanged: nothing submitted

    v2 = publish(src, root, "m").path
    assert sync_and_wait(sync) is Outcome.LIVE
    assert live(reloader) == str(v2)

    # v3 is broken: a weight byte flipped after publishing (same size)
    v3 = publish(src, root, "m").path
    data = bytearray((v3 / "model.safetensors").read_bytes())
    data[0] ^= 1
    (v3 / "model.safetensors").write_bytes(bytes(data))
    assert sync.sync().submitted == {}
    assert loader.loads[str(v3)] == 0

    # v4 loads but fails validation: marked bad, never retried, v2 keeps serving
    v4 = root / "m" / "4"
    loader.fail[(str(v4), "validate")] = ValidationError("NaN in logits")
    publish(src, root, "m", version=4)
    assert sync_and_wait(sync) is Outcome.FAILED
    for _ in range(3):
        assert sync.sync().submitted == {}
    statuses = {info.number: info.status for info in repo.versions("m")}
    assert statuses == {
        1: VersionStatus.ELIGIBLE,
        2: VersionStatus.ELIGIBLE,
        3: VersionStatus.INCOMPLETE,
        4: VersionStatus.BAD,
    }
    assert "NaN in logits" in repo.versions("m")[3].reason
    assert loader.loads[str(v4)] == 1
    assert live(reloader) == str(v2)

    # the repository goes away: nothing is unloaded, nothing submitted
    root.rename(tmp_path / "away")
    report = sync.sync()
    assert (report.readable, report.submitted) == (False, {})
    assert live(reloader) == str(v2)
    assert [model.source for model in loader.live_models()] == [str(v2)]
    (tmp_path / "away").rename(root)

    # v4 is fixed in place: its files changed, so it is tried again
    del loader.fail[(str(v4), "validate")]
    (v4 / "model.safetensors").write_bytes(b"retrained")
    write_manifest(v4)
    assert sync_and_wait(sync) is Outcome.LIVE
    assert live(reloader) == str(v4)


def test_a_vanished_live_version_is_kept(
    root: Path,
    src: Path,
    repo: ModelRepository,
    loader: FakeLoader,
    reloader: Reloader[FakeModel],
    syncs: list[RepositorySync],
) -> None:
    sync = make_sync(syncs, repo, reloader)
    publish(src, root, "m")
    v2 = publish(src, root, "m").path
    assert sync_and_wait(sync) is Outcome.LIVE
    shutil.rmtree(v2)
    assert sync.sync().submitted == {}
    assert live(reloader) == str(v2)
    assert loader.unloaded == []


def test_rollback_pin_and_unpin(
    root: Path,
    src: Path,
    repo: ModelRepository,
    reloader: Reloader[FakeModel],
    syncs: list[RepositorySync],
) -> None:
    sync = make_sync(syncs, repo, reloader)
    with pytest.raises(NoPreviousVersion):
        sync.rollback("m")
    v1 = publish(src, root, "m").path
    publish(src, root, "m")
    assert sync_and_wait(sync) is Outcome.LIVE

    (ticket,) = sync.rollback("m").submitted.values()
    assert ticket.wait(WAIT).outcome is Outcome.ROLLED_BACK
    assert live(reloader) == str(v1)
    v3 = publish(src, root, "m").path
    assert sync.sync().submitted == {}  # the rollback pin holds over rescans
    assert sync.status()["models"] == {
        "m": {
            "policy": "pinned",
            "pin": 1,
            "reason": "rollback",
            "served": True,
            "live": 1,
            "target": 1,
            "candidates": [1],
            "versions": [info.to_dict() for info in repo.versions("m")],
        }
    }

    (ticket,) = sync.unpin("m").submitted.values()
    assert ticket.wait(WAIT).outcome is Outcome.LIVE
    assert live(reloader) == str(v3)
    (ticket,) = sync.pin("m", 2).submitted.values()
    assert ticket.wait(WAIT).outcome is Outcome.LIVE
    assert live(reloader) == str(root / "m" / "2")


def test_startup_falls_back_to_the_next_candidate(
    root: Path,
    src: Path,
    repo: ModelRepository,
    loader: FakeLoader,
    reloader: Reloader[FakeModel],
    syncs: list[RepositorySync],
) -> None:
    v1 = publish(src, root, "m").path
    v2 = publish(src, root, "m").path
    loader.fail[(str(v2), "load")] = LoadError("truncated safetensors header")
    v1_live = went_live(reloader, v1)
    sync = make_sync(syncs, repo, reloader)
    (ticket,) = sync.start().submitted.values()
    event = ticket.wait(WAIT)
    assert (event.target, event.trigger, event.outcome) == (str(v2), "startup", Outcome.FAILED)
    assert v1_live.wait(WAIT)
    assert live(reloader) == str(v1)
    assert sync.sync().submitted == {}


@pytest.mark.parametrize("kind", ["poll", "events"])
def test_a_publish_goes_live_through_the_watcher(
    root: Path,
    src: Path,
    repo: ModelRepository,
    reloader: Reloader[FakeModel],
    syncs: list[RepositorySync],
    kind: str,
) -> None:
    if kind == "events":
        pytest.importorskip("watchfiles")
    watcher: Watcher = (
        PollingWatcher(root, 0.02) if kind == "poll" else EventWatcher(root, fallback_interval=0.1)
    )
    sync = make_sync(syncs, repo, reloader, watcher)
    sync.start()
    assert watcher.ready.wait(WAIT)
    for number in (1, 2):
        done = went_live(reloader, root / "m" / str(number))
        publish(src, root, "m")
        assert done.wait(WAIT)
    assert sync.status()["watcher"] == kind


def test_a_settled_version_goes_live_without_an_event(
    root: Path,
    reloader: Reloader[FakeModel],
    syncs: list[RepositorySync],
) -> None:
    repo = ModelRepository(root, settle_seconds=0.05)
    version = make_version(root, "m", 1, manifest=False)
    done = went_live(reloader, version)
    sync = make_sync(syncs, repo, reloader)
    assert sync.start().submitted == {}  # settling
    assert done.wait(WAIT)  # the settle timer looked again


def test_status_lists_every_model(
    root: Path,
    src: Path,
    repo: ModelRepository,
    reloader: Reloader[FakeModel],
    syncs: list[RepositorySync],
) -> None:
    publish(src, root, "m")
    publish(src, root, "other")
    sync = make_sync(syncs, repo, reloader)
    sync_and_wait(sync)
    status = sync.status()
    assert (status["root"], status["readable"], status["watcher"]) == (str(root), True, None)
    models = status["models"]
    assert isinstance(models, dict)
    assert set(models) == {"m", "other"}
    assert models["other"]["served"] is False
    assert models["m"]["live"] == 1


def test_a_failed_reload_from_elsewhere_marks_nothing(
    root: Path,
    src: Path,
    repo: ModelRepository,
    loader: FakeLoader,
    reloader: Reloader[FakeModel],
    syncs: list[RepositorySync],
) -> None:
    make_sync(syncs, repo, reloader)
    loader.fail[("/elsewhere/1", "load")] = LoadError("no such file")
    assert reloader.reload("/elsewhere/1", timeout=WAIT).outcome is Outcome.FAILED
    publish(src, root, "m")
    repo.scan()
    assert [info.status for info in repo.versions("m")] == [VersionStatus.ELIGIBLE]
