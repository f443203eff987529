"""LoRA adapters in a fleet, as the coordinator drives them (a recorded fake link): an
adapter is a model with cutovers of its own, loaded on its base's committed generation;
a base's cutover numbers a version of each adapter on it, flips them with the base in one
step, and its commit moves them in the record, so a restarted coordinator carries on."""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from hotweights.fleet.model_replica import Prepared, Target
from hotweights.sources import publish
from tests.fleet.fake_link import FakeLink, Fleet
from tests.sources.layouts import write_files

TIMEOUT = 10.0


def publish_adapter(fleet: Fleet, name: str, base: str, build: str) -> Path:
    config = {"peft_type": "LORA", "base_model_name_or_path": base}
    files = {"adapter_config.json": json.dumps(config).encode(), "w": build.encode()}
    return publish(write_files(fleet.tmp_path / "adapters" / build, files), fleet.repo, name).path


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    """Base models `a` and `b`, adapter `lora` on `a` and `other` on `b`."""
    fleet = Fleet(tmp_path)
    fleet.publish(model="a")
    fleet.publish(model="b")
    publish_adapter(fleet, "lora", "a", "l1")
    publish_adapter(fleet, "other", "models/b/1", "o1")  # a path to a version names b
    return fleet


def test_adapters_are_served_each_bound_to_its_base_committed_generation(fleet: Fleet) -> None:
    coordinator = fleet.coordinator(model=None)
    assert list(coordinator.models) == ["a", "b", "lora", "other"]
    assert coordinator.bases() == {"lora": "a", "other": "b"}
    assert coordinator.committed() == {"a": 1, "b": 2, "lora": 3, "other": 4}
    joined = coordinator.join()
    assert joined["lora"].committed.base_generation == 1
    assert joined["other"].committed.base_generation == 2
    models = coordinator.status()["models"]
    assert isinstance(models, dict)
    assert (models["lora"]["parent"], models["a"]["parent"]) == ("a", None)
    assert models["lora"]["committed"]["base_generation"] == 1
    only_b = fleet.coordinator(model="b")
    assert list(only_b.models) == ["b", "other"]  # --model b: b and the adapters on it


def test_an_adapter_whose_base_is_not_served_is_left_out(fleet: Fleet) -> None:
    publish_adapter(fleet, "orphan", "nowhere", "x1")
    assert "orphan" not in fleet.coordinator(model=None).models


def test_a_new_adapter_version_cuts_over_the_adapter_alone_on_the_committed_base(
    fleet: Fleet,
) -> None:
    coordinator = fleet.coordinator(model=None)
    publish_adapter(fleet, "lora", "a", "l2")
    record = coordinator.sync(model="lora")
    assert record is not None
    assert (record["generation"], record["outcome"]) == (5, "committed")
    assert {c for c in fleet.link.models if c[0] == "prepare"} == {("prepare", "lora", 5)}
    assert ("flip", "lora", 5) in fleet.link.models
    assert {m for _, m, _ in fleet.link.models} == {"lora"}  # prepare, flip, finish
    assert coordinator.committed()["a"] == 1
    assert coordinator.join()["lora"].committed.base_generation == 1


class Recorded(FakeLink):
    """Keeps every target prepared and every flip with its followers."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[Target] = []
        self.flips: list[tuple[str, int, dict[str, int]]] = []

    def prepare(self, target: Target, timeout: float) -> Sequence[Prepared | BaseException]:
        self.targets.append(target)
        return super().prepare(target, timeout)

    def flip(self, model: str, generation: int, followers: Mapping[str, int]) -> None:
        self.flips.append((model, generation, dict(followers)))
        super().flip(model, generation, followers)


def test_a_base_cutover_numbers_its_adapters_and_flips_them_with_it(fleet: Fleet) -> None:
    link = Recorded()
    fleet.link = link
    coordinator = fleet.coordinator("f", model=None)
    fleet.publish(model="a")
    record = coordinator.sync(model="a")
    assert record is not None
    assert record["outcome"] == "committed"
    assert {(t.generation, t.followers) for t in link.targets} == {(5, (("lora", 6),))}
    assert link.flips == [("a", 5, {"lora": 6})]  # one step: base and adapter together
    assert [name for name, *_ in link.models if name == "finish"] == ["finish"]  # the base's
    assert coordinator.committed() == {"a": 5, "b": 2, "lora": 6, "other": 4}
    lora = coordinator.join()["lora"]
    assert (lora.committed.base_generation, lora.draining) == (5, None)
    assert lora.committed.source.endswith("lora/1")  # the same version, on the new base
    again = fleet.coordinator("f", model=None)  # restarted: read from the record
    assert again.committed() == coordinator.committed()
    assert again.join()["lora"].committed.base_generation == 5
    assert again.resume() is None  # nothing was left half done


class HeldDrain(FakeLink):
    """Holds the drain of a base's cutover until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.draining = threading.Event()
        self.release = threading.Event()

    def drained(self, generation: int, timeout: float) -> int:
        self.draining.set()
        assert self.release.wait(TIMEOUT), "the drain was never released"
        return super().drained(generation, timeout)


def test_while_its_base_drains_a_replica_starting_gets_the_adapters_old_pair(
    fleet: Fleet,
) -> None:
    link = HeldDrain()
    fleet.link = link
    coordinator = fleet.coordinator(model=None)
    fleet.publish(model="a")
    done: list[dict[str, object] | None] = []
    cutover = threading.Thread(target=lambda: done.append(coordinator.sync(model="a")))
    cutover.start()
    try:
        assert link.draining.wait(TIMEOUT)
        joined = coordinator.join()
        assert joined["a"].draining is not None
        assert joined["a"].draining.generation == 1
        lora = joined["lora"]
        assert lora.draining is not None
        assert (lora.draining.generation, lora.draining.base_generation) == (3, 1)
        assert (lora.committed.generation, lora.committed.base_generation) == (6, 5)
    finally:
        link.release.set()
        cutover.join(TIMEOUT)
    assert [r["outcome"] if r else None for r in done] == ["committed"]
    assert coordinator.join()["lora"].draining is None


def test_a_refused_base_cutover_leaves_its_adapters_where_they_were(fleet: Fleet) -> None:
    coordinator = fleet.coordinator(model=None)
    fleet.publish(model="a")
    refusal = "adapter lora does not fit a g5: module q_proj"
    fleet.link.rounds.append([Prepared("r1", 5, ok=False, error=refusal)])
    record = coordinator.sync(model="a")
    assert record is not None
    assert record["outcome"] == "aborted"
    assert "adapter lora does not fit" in str(record["error"])
    assert coordinator.committed() == {"a": 1, "b": 2, "lora": 3, "other": 4}
    assert coordinator.join()["lora"].committed.base_generation == 1


def test_a_coordinator_restarted_after_a_base_commit_finishes_its_adapters_too(
    fleet: Fleet,
) -> None:
    """The first coordinator is held in its drain (committed, recorded); the one Ray
    would start after its death reads the adapter's new and draining versions from the
    record, and finishes the base's cutover with the adapter in it."""
    held = HeldDrain()
    fleet.link = held
    first = fleet.coordinator("f", model=None)
    fleet.publish(model="a")
    cutover = threading.Thread(target=lambda: first.sync(model="a"), daemon=True)
    cutover.start()
    try:
        assert held.draining.wait(TIMEOUT)
        link = Recorded()
        fleet.link = link
        second = fleet.coordinator("f", model=None)
        lora = second.join()["lora"]
        assert lora.draining is not None
        assert (lora.draining.generation, lora.draining.base_generation) == (3, 1)
        assert (lora.committed.generation, lora.committed.base_generation) == (6, 5)
        done = second.resume()
        assert done is not None
        assert done["a"]["outcome"] == "committed"
        assert "lora" not in done  # its follow was finished by its base's cutover
        assert link.flips == [("a", 5, {"lora": 6})]
        assert second.join()["lora"].draining is None
        third = fleet.coordinator("f", model=None)
        assert third.resume() is None  # the record says nothing is left to do
        assert third.committed() == {"a": 5, "b": 2, "lora": 6, "other": 4}
    finally:
        held.release.set()
        cutover.join(TIMEOUT)


def test_an_adapter_published_while_serving_is_adopted_then_follows_its_base(
    fleet: Fleet,
) -> None:
    link = Recorded()
    fleet.link = link
    coordinator = fleet.coordinator(model=None)
    publish_adapter(fleet, "late", "a", "n1")
    assert coordinator.adopt() == ["late"]
    assert coordinator.adopt() == []  # served already
    assert [c for c in link.models if c[1] == "late"] == [("add", "late", 5), ("admit", "late", 5)]
    assert coordinator.bases()["late"] == "a"
    assert coordinator.join()["late"].committed.base_generation == 1
    fleet.publish(model="a")
    assert coordinator.sync(model="a") is not None
    assert {t.followers for t in link.targets} == {(("lora", 7), ("late", 8))}
    assert coordinator.committed()["late"] == 8


def test_an_adapter_a_replica_cannot_load_is_taken_off_and_marked_bad(fleet: Fleet) -> None:
    coordinator = fleet.coordinator(model=None)
    publish_adapter(fleet, "late", "a", "n1")
    fleet.link.refusals.append([None, RuntimeError("replica r2: late does not fit a")])
    assert coordinator.adopt() == []
    assert ("remove", "late") in fleet.link.calls
    assert "late" not in coordinator.models
    assert "late does not fit a" in str(coordinator.repository.bad_reason("late", 1))
    assert coordinator.adopt() == []  # its only version is bad: not tried again
    assert [c for c in fleet.link.calls if c[0] == "add"] == [("add", 5)]
    publish_adapter(fleet, "late", "a", "n2")  # a new version is
    assert coordinator.adopt() == ["late"]


def test_a_refused_adoption_is_remembered_and_the_adapter_left_out_on_a_restart(
    fleet: Fleet,
) -> None:
    first = fleet.coordinator("f", model=None)
    publish_adapter(fleet, "late", "a", "n1")
    fleet.link.refusals.append([RuntimeError("replica r1: no")])
    assert first.adopt() == []
    again = fleet.coordinator("f", model=None)  # Ray restarted it: the mark is in the record
    assert "late" not in again.models
    assert "replica r1: no" in str(again.repository.bad_reason("late", 1))


def test_after_a_restart_an_adapter_never_adopted_is_adopted_and_the_ingress_told_again(
    fleet: Fleet,
) -> None:
    first = fleet.coordinator("f", model=None)
    assert first.committed()["lora"] == 3
    publish_adapter(fleet, "late", "a", "n1")  # published as the coordinator died
    link = Recorded()
    fleet.link = link
    again = fleet.coordinator("f", model=None)
    assert "late" not in again.models  # not served until every replica has it
    assert again.resume() is None
    admitted = [c for c in link.models if c[0] == "admit"]
    assert admitted == [("admit", "lora", 3), ("admit", "other", 4)]  # harmless if known
    assert again.adopt() == ["late"]
    assert ("add", "late", 5) in link.models


def test_an_adapter_on_a_base_published_since_does_not_stop_the_others(fleet: Fleet) -> None:
    coordinator = fleet.coordinator(model=None)
    fleet.publish(model="c")  # a new base: served after a restart
    publish_adapter(fleet, "on-c", "c", "c1")
    publish_adapter(fleet, "late", "a", "n1")
    assert coordinator.adopt() == ["late"]
    assert "on-c" not in coordinator.models


def test_replicas_that_cannot_be_asked_leave_the_adapter_unmarked_for_the_next_look(
    fleet: Fleet,
) -> None:
    class Unreachable(FakeLink):
        def add(self, model: str, target: Target, timeout: float) -> Sequence[BaseException | None]:
            raise ConnectionError("no replica deployed yet")

    coordinator = fleet.coordinator(model=None)
    publish_adapter(fleet, "late", "a", "n1")
    coordinator.link = Unreachable()
    assert coordinator.adopt() == []
    assert coordinator.repository.bad_reason("late", 1) is None
    coordinator.link = fleet.link
    assert coordinator.adopt() == ["late"]
    assert coordinator.committed()["late"] == 6  # g5 was given out: never again


def test_a_fleet_of_one_base_and_its_adapters_takes_admin_calls_that_name_no_model(
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path)
    fleet.publish(model="a")
    publish_adapter(fleet, "lora", "a", "l1")
    coordinator = fleet.coordinator(model=None)
    fleet.publish(model="a")
    record = coordinator.reload()  # the only base model
    assert record is not None
    assert record["outcome"] == "committed"
    status = coordinator.status()
    assert status["model"] == "a"  # its fields at the top level, as for one model
