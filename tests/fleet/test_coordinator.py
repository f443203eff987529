"""The coordinator's two phases against a recorded fake link: prepare on every replica,
flip, drain the old generation, finish; any failure aborts and marks the version bad."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from hotweights.config import Config
from hotweights.errors import UnknownModel
from hotweights.fleet.coordinator import Coordinator
from hotweights.fleet.fleet_link import FINISH_ATTEMPTS
from hotweights.fleet.model_replica import Prepared, Target
from hotweights.fleet.settings import PREPARE_ROUNDS, FleetSettings
from hotweights.sources import publish
from tests.fleet.fake_link import Call, FakeLink, Fleet
from tests.sources.layouts import WEIGHTS, make_version, write_files


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path)


def committed(coordinator: Coordinator) -> tuple[int, str]:
    """The committed generation and version directory, as a joining replica sees them."""
    joined = coordinator.join()["m"]
    return joined.committed.generation, Path(joined.committed.source).name


def cut_over_calls(generation: int, version: int, old: int) -> list[Call]:
    """A clean cutover: prepare twice (the second round finds every replica holding it),
    flip, drain the old generation, finish."""
    prepare = ("prepare", generation, str(version))
    return [prepare, prepare, ("flip", generation), ("drained", old), ("finish", generation)]


def test_the_first_committed_version_is_the_latest_eligible_as_generation_1(
    fleet: Fleet,
) -> None:
    fleet.publish()
    latest = fleet.publish(description="nightly")
    coordinator = fleet.coordinator()
    joined = coordinator.join()["m"]
    assert joined.committed == Target(1, str(latest), "m v2: nightly")
    assert joined.preparing is None
    assert coordinator.committed() == {"m": 1}
    assert fleet.link.calls == []  # nothing is asked of the replicas to start


def test_a_repository_without_the_model_refuses_to_start(fleet: Fleet) -> None:
    fleet.publish()
    config = Config.load({"repo": str(fleet.repo)}, environ={})
    with pytest.raises(ValueError, match=r"model 'other' is not in .* \(models there: m\)"):
        Coordinator(FleetSettings(config, "other"), fleet.link)
    (fleet.repo / "other" / "1").mkdir(parents=True)  # nothing eligible in it
    with pytest.raises(ValueError, match="'other' has no eligible version"):
        Coordinator(FleetSettings(config, None), fleet.link)


def test_sync_with_nothing_new_does_nothing(fleet: Fleet) -> None:
    fleet.publish()
    coordinator = fleet.coordinator()
    assert coordinator.sync() is None
    assert fleet.link.calls == []


def test_a_new_version_is_prepared_flipped_drained_and_finished_in_that_order(
    fleet: Fleet,
) -> None:
    fleet.publish()
    coordinator = fleet.coordinator()
    fleet.link.stuck = 1
    v2 = fleet.publish()
    record = coordinator.sync()
    assert fleet.link.calls == cut_over_calls(2, version=2, old=1)
    assert record is not None
    assert (record["generation"], record["version"], record["trigger"]) == (2, 2, "watch")
    assert (record["outcome"], record["error"], record["stuck"]) == ("committed", None, 1)
    assert record["replicas"] == {"r1": 0.5, "r2": 0.5}
    phases = record["phases"]
    assert isinstance(phases, dict)
    assert set(phases) == {"prepare", "commit", "drain", "finish"}
    joined = coordinator.join()["m"]
    assert (joined.committed.generation, joined.committed.source) == (2, str(v2))
    assert joined.preparing is None
    assert coordinator.committed() == {"m": 2}
    assert coordinator.sync() is None  # committed now: nothing more to do
    status = coordinator.status()
    assert status["committed"] == {"generation": 2, "version": 2, "source": str(v2)}
    assert status["last_cutover"] == record
    assert status["replicas"] == [{"replica": "r1"}, {"replica": "r2"}]


@pytest.mark.parametrize(
    ("failing", "reason"),
    [
        (Prepared("r2", 2, ok=False, error="replica r2: load: shard 3 truncated"), "shard 3"),
        (RuntimeError("RayActorError: the actor died\nwhile preparing"), "while preparing"),
    ],
    ids=["answers-not-ok", "raises"],
)
def test_a_replica_failing_prepare_aborts_and_marks_the_version_bad(
    fleet: Fleet, failing: Prepared | BaseException, reason: str
) -> None:
    v1 = fleet.publish()
    coordinator = fleet.coordinator()
    fleet.publish()
    fleet.link.rounds = [[Prepared("r1", 2, ok=True), failing]]
    record = coordinator.sync()
    assert record is not None
    assert record["outcome"] == "aborted"
    assert isinstance(record["error"], str)
    assert reason in record["error"]
    assert fleet.link.names() == ["prepare", "abort"]
    assert fleet.link.calls[1][:2] == ("abort", 2)
    assert reason in str(fleet.link.calls[1][2])
    bad = coordinator.repository.bad_reason("m", 2)
    assert bad is not None
    assert "fleet cutover g2 aborted" in bad
    assert reason in bad
    assert coordinator.join()["m"].committed.source == str(v1)
    assert coordinator.join()["m"].preparing is None
    assert coordinator.committed() == {"m": 1}
    assert coordinator.sync() is None  # the bad version is not tried again
    assert fleet.link.names() == ["prepare", "abort"]


def test_a_prepare_past_its_timeout_aborts(fleet: Fleet) -> None:
    fleet.publish()
    coordinator = fleet.coordinator()
    fleet.publish()
    fleet.link.rounds = [TimeoutError()]
    record = coordinator.sync()
    assert record is not None
    assert record["outcome"] == "aborted"
    assert record["error"] == "not every replica was ready within 5 s"
    assert fleet.link.calls == [
        ("prepare", 2, "2"),
        ("abort", 2, "not every replica was ready within 5 s"),
    ]
    assert coordinator.repository.bad_reason("m", 2) is not None
    assert coordinator.committed() == {"m": 1}


def test_with_no_replica_running_the_cutover_is_skipped_and_the_version_stays_good(
    fleet: Fleet,
) -> None:
    fleet.publish()
    coordinator = fleet.coordinator()
    fleet.publish()
    fleet.link.rounds = [[]]
    record = coordinator.sync()
    assert record is not None
    assert (record["generation"], record["outcome"]) == (2, "skipped")
    assert fleet.link.calls == [("prepare", 2, "2")]  # no abort: nothing to discard
    assert coordinator.repository.bad_reason("m", 2) is None
    assert coordinator.committed() == {"m": 1}
    assert coordinator.join()["m"].preparing is None
    retried = coordinator.sync()  # replicas are up now: the version is tried again
    assert retried is not None
    assert retried["outcome"] == "committed"
    assert fleet.link.calls[1:] == cut_over_calls(3, version=2, old=1)


def test_rollback_pins_the_previous_version_and_cuts_over_to_it(fleet: Fleet) -> None:
    v1 = fleet.publish()
    coordinator = fleet.coordinator()
    fleet.publish()
    assert coordinator.sync() is not None
    fleet.link.calls.clear()
    record = coordinator.rollback()
    assert record is not None
    assert (record["generation"], record["version"], record["trigger"]) == (3, 1, "rollback")
    assert record["outcome"] == "committed"
    assert fleet.link.calls == cut_over_calls(3, version=1, old=2)
    assert committed(coordinator) == (3, "1")
    assert coordinator.join()["m"].committed.source == str(v1)
    fleet.publish()
    assert coordinator.sync() is None  # pinned by the rollback: v3 waits
    assert committed(coordinator) == (3, "1")


def test_reload_pins_a_version_and_reload_of_none_follows_the_latest_again(
    fleet: Fleet,
) -> None:
    fleet.publish()
    fleet.publish()
    coordinator = fleet.coordinator()  # g1: v2
    record = coordinator.reload(1)
    assert record is not None
    assert (record["generation"], record["trigger"]) == (2, "api")
    assert committed(coordinator) == (2, "1")
    record = coordinator.reload(None)
    assert record is not None
    assert record["version"] == 2
    assert committed(coordinator) == (3, "2")


def test_prepare_is_repeated_until_a_round_finds_every_replica_already_holding_it(
    fleet: Fleet,
) -> None:
    fleet.publish()
    coordinator = fleet.coordinator()
    fleet.publish()
    fleet.link.rounds = [
        [Prepared("r1", 2, ok=True, seconds=1.0)],
        [Prepared("r1", 2, ok=True, fresh=False), Prepared("r2", 2, ok=True, seconds=2.0)],
        [Prepared("r1", 2, ok=True, fresh=False), Prepared("r2", 2, ok=True, fresh=False)],
    ]
    record = coordinator.sync()
    assert record is not None
    assert record["outcome"] == "committed"
    assert fleet.link.names() == ["prepare"] * 3 + ["flip", "drained", "finish"]
    assert record["replicas"] == {"r1": 1.0, "r2": 2.0}  # each one's fresh prepare


def test_prepare_rounds_are_bounded(fleet: Fleet) -> None:
    fleet.publish()
    coordinator = fleet.coordinator()
    fleet.publish()
    always_fresh = [Prepared("r1", 2, ok=True)]
    fleet.link.rounds = [always_fresh] * (PREPARE_ROUNDS + 1)
    record = coordinator.sync()
    assert record is not None
    assert record["outcome"] == "committed"
    assert fleet.link.names() == ["prepare"] * PREPARE_ROUNDS + ["flip", "drained", "finish"]


def test_a_replica_failing_in_a_later_round_still_aborts(fleet: Fleet) -> None:
    fleet.publish()
    coordinator = fleet.coordinator()
    fleet.publish()
    fleet.link.rounds = [
        [Prepared("r1", 2, ok=True)],
        [Prepared("r1", 2, ok=True, fresh=False), Prepared("r2", 2, ok=False, error="r2: OOM")],
    ]
    record = coordinator.sync()
    assert record is not None
    assert (record["outcome"], record["error"]) == ("aborted", "r2: OOM")
    assert fleet.link.names() == ["prepare", "prepare", "abort"]
    assert coordinator.committed() == {"m": 1}


def test_generations_are_never_reused_after_an_abort(fleet: Fleet) -> None:
    fleet.publish()
    coordinator = fleet.coordinator()
    fleet.publish()
    fleet.link.rounds = [TimeoutError()]
    aborted = coordinator.sync()
    assert aborted is not None
    assert aborted["generation"] == 2
    fleet.publish()
    record = coordinator.sync()
    assert record is not None
    assert (record["generation"], record["version"], record["outcome"]) == (3, 3, "committed")
    assert fleet.link.calls[2:] == cut_over_calls(3, version=3, old=1)
    assert committed(coordinator) == (3, "3")
    cutovers = coordinator.status()["cutovers"]
    assert isinstance(cutovers, list)
    assert [(c["generation"], c["outcome"]) for c in cutovers] == [
        (3, "committed"),
        (2, "aborted"),
    ]


def test_an_ingress_that_cannot_flip_at_first_is_flipped_again_after_the_commit(
    fleet: Fleet,
) -> None:
    """The commit point is the record on disk: a flip that fails (the ingress is being
    restarted) is tried again, never undone (a restarted ingress stamps the committed
    generation by itself)."""
    fleet.publish()
    coordinator = fleet.coordinator()
    fleet.publish()
    fleet.link.failures["flip"] = ConnectionError("the ingress is gone")
    record = coordinator.sync()
    assert record is not None
    assert (record["outcome"], record["error"]) == ("committed", None)
    assert fleet.link.names() == ["prepare", "prepare", "flip", "flip", "drained", "finish"]
    assert coordinator.committed() == {"m": 2}


def test_an_ingress_that_cannot_report_its_drain_still_finishes_the_cutover(
    fleet: Fleet,
) -> None:
    fleet.publish()
    coordinator = fleet.coordinator()
    fleet.publish()
    fleet.link.failures["drained"] = ConnectionError("the ingress restarted")
    record = coordinator.sync()
    assert record is not None
    assert (record["outcome"], record["stuck"]) == ("committed", 0)
    assert fleet.link.calls == cut_over_calls(2, version=2, old=1)
    assert coordinator.committed() == {"m": 2}


def test_finish_is_retried_until_every_replica_finished(fleet: Fleet) -> None:
    fleet.publish()
    coordinator = fleet.coordinator()
    fleet.publish()
    fleet.link.failures["finish"] = ConnectionError("a replica is restarting")
    fleet.link.finishes = [[True, False]]
    record = coordinator.sync()
    assert record is not None
    assert record["outcome"] == "committed"
    assert fleet.link.names()[-3:] == ["finish", "finish", "finish"]
    assert fleet.link.names().count("finish") == 3


def test_finish_gives_up_after_its_attempts_and_the_cutover_stays_committed(
    fleet: Fleet,
) -> None:
    fleet.publish()
    coordinator = fleet.coordinator()
    fleet.publish()
    fleet.link.finishes = [[True, RuntimeError("r2 died")]] * (FINISH_ATTEMPTS + 1)
    record = coordinator.sync()
    assert record is not None
    assert record["outcome"] == "committed"
    assert fleet.link.names().count("finish") == FINISH_ATTEMPTS
    assert coordinator.committed() == {"m": 2}
    assert record["error"] == (
        "committed, but 1 replica(s) did not finish: ['RuntimeError: r2 died']"
    )


def test_a_prepare_call_that_fails_outright_aborts_and_clears_preparing(fleet: Fleet) -> None:
    fleet.publish()
    coordinator = fleet.coordinator()
    fleet.publish()
    fleet.link.rounds = [ConnectionError("the replicas' handle is gone")]
    try:
        coordinator.sync()
    finally:
        assert coordinator.join()["m"].preparing is None
    assert fleet.link.names() == ["prepare", "abort"]


class Flipped(FakeLink):
    """Sets `flipped` when the ingress is told to stamp a generation (from the
    coordinator's threads)."""

    def __init__(self) -> None:
        super().__init__()
        self.flipped = threading.Event()

    def flip(self, model: str, generation: int, followers: Mapping[str, int]) -> None:
        super().flip(model, generation, followers)
        self.flipped.set()


def test_a_version_without_a_manifest_is_cut_over_to_once_its_files_settled(
    tmp_path: Path,
) -> None:
    """No file event says a manifest-less version settled: the coordinator looks again
    when it may have (and, watching, syncs once at the start)."""
    repo = tmp_path / "repo"
    publish(write_files(tmp_path / "build", WEIGHTS), repo, "m")
    config = Config.load(
        {"repo": str(repo), "watch": "poll", "poll_interval": 3600.0, "settle_seconds": 0.3},
        environ={},
    )
    link = Flipped()
    coordinator = Coordinator(FleetSettings(config, "m", prepare_timeout=5.0), link)
    make_version(repo, "m", 2, manifest=False)
    try:
        coordinator.watch()  # its first sync finds v2 settling, and schedules a look
        assert link.flipped.wait(10), "the settled version was never cut over to"
    finally:
        coordinator.close()
    assert committed(coordinator) == (2, "2")


def test_status_keeps_its_fields_and_adds_them_under_models_by_name(fleet: Fleet) -> None:
    fleet.publish()
    status = fleet.coordinator().status()
    models = status["models"]
    assert isinstance(models, dict)
    assert list(models) == ["m"]
    assert all(status[field] == value for field, value in models["m"].items())


def test_a_reload_or_rollback_of_a_model_the_fleet_does_not_serve_is_refused(
    fleet: Fleet,
) -> None:
    fleet.publish()
    coordinator = fleet.coordinator()
    with pytest.raises(UnknownModel, match="this fleet serves 'm', not 'other'"):
        coordinator.reload(None, model="other")
    with pytest.raises(UnknownModel, match="not 'other'"):
        coordinator.rollback(model="other")
    assert coordinator.reload(None, model="m") is None  # its own model: as without one
    assert fleet.link.calls == []
