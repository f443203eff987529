"""One coordinator for every base model of the repository: each model's versions cut over
on their own, an adapter whose base cannot be told is left out, the record keeps each
model's part (and reads a record a fleet of one model wrote), and lives where
`--fleet-state` says."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from hotweights.errors import InvalidRequest, UnknownModel
from hotweights.fleet.ledger import LEDGER_NAME, FleetLedger, Record
from hotweights.fleet.model_replica import Prepared, Target
from hotweights.fleet.record_store import KV_NAMESPACE, RayKvStore
from hotweights.sources import publish
from tests.fleet.fake_link import FakeLink, Fleet
from tests.sources.layouts import write_files

TIMEOUT = 10.0


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    fleet = Fleet(tmp_path)
    fleet.publish(model="a")
    fleet.publish(model="b")
    return fleet


def test_every_base_model_is_served_each_with_its_own_generation(fleet: Fleet) -> None:
    adapter = write_files(fleet.tmp_path / "lora", {"adapter_config.json": b"{}", "w": b"1"})
    publish(adapter, fleet.repo, "lora")
    coordinator = fleet.coordinator(model=None)
    assert sorted(coordinator.models) == ["a", "b"]  # the adapter names no base: left out
    assert coordinator.committed() == {"a": 1, "b": 2}
    joined = coordinator.join()
    assert (joined["a"].committed.model, joined["b"].committed.model) == ("a", "b")
    status = coordinator.status()
    assert "committed" not in status  # several models: only under `models`
    models = status["models"]
    assert isinstance(models, dict)
    assert {name: m["committed"]["generation"] for name, m in models.items()} == {"a": 1, "b": 2}


def test_a_new_version_of_one_model_cuts_over_that_model_alone(fleet: Fleet) -> None:
    coordinator = fleet.coordinator(model=None)
    fleet.publish(model="b")
    assert coordinator.sync(model="a") is None  # nothing new for a
    record = coordinator.sync(model="b")
    assert record is not None
    assert (record["generation"], record["outcome"]) == (3, "committed")
    assert {model for _, model, _ in fleet.link.models} == {"b"}
    assert ("flip", "b", 3) in fleet.link.models
    assert ("finish", "b", 3) in fleet.link.models
    assert coordinator.committed() == {"a": 1, "b": 3}


def test_with_several_models_reload_must_name_one_that_is_served(fleet: Fleet) -> None:
    coordinator = fleet.coordinator(model=None)
    with pytest.raises(InvalidRequest, match=r"serves several models \(a, b\): name one"):
        coordinator.reload()
    with pytest.raises(InvalidRequest, match="name one"):
        coordinator.rollback()
    with pytest.raises(UnknownModel, match="this fleet serves 'a', 'b', not 'c'"):
        coordinator.reload(model="c")
    assert fleet.link.calls == []


class HeldPrepare(FakeLink):
    """Holds model `a`'s prepare until `release` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.preparing = threading.Event()
        self.release = threading.Event()

    def prepare(self, target: Target, timeout: float) -> Sequence[Prepared | BaseException]:
        if target.model == "a":
            self.preparing.set()
            assert self.release.wait(TIMEOUT), "model a's prepare was never released"
        return super().prepare(target, timeout)


def test_one_model_cuts_over_while_another_is_in_prepare(fleet: Fleet) -> None:
    link = HeldPrepare()
    fleet.link = link
    coordinator = fleet.coordinator(model=None)
    fleet.publish(model="a")
    fleet.publish(model="b")
    results: list[dict[str, object] | None] = []
    a = threading.Thread(target=lambda: results.append(coordinator.sync(model="a")))
    a.start()
    try:
        assert link.preparing.wait(TIMEOUT)
        b = coordinator.sync(model="b")  # does not wait for a's cutover
        assert b is not None
        assert b["outcome"] == "committed"
        models = coordinator.status()["models"]
        assert isinstance(models, dict)
        assert models["a"]["preparing"] is not None
        assert coordinator.committed()["a"] == 1
    finally:
        link.release.set()
        a.join(TIMEOUT)
    assert [r["outcome"] if r else None for r in results] == ["committed"]
    generations = coordinator.committed()
    assert generations["a"] != generations["b"]  # one count for every model


def test_a_record_written_by_a_fleet_of_one_model_is_read_as_it_is(fleet: Fleet) -> None:
    """The record as a one-model fleet (3e37588) wrote it: a's pin, its bad mark and the
    generation count carry over; b, new to the record, starts on its latest version."""
    fleet.publish(model="a")  # a v2, which the old fleet marked bad
    a1 = str(fleet.repo / "a" / "1")
    old = {
        "format": 1,
        "fleet": "old-fleet",
        "starts": 2,
        "next_generation": 7,
        "models": {
            "a": {
                "committed": {"generation": 6, "source": a1, "description": "a v1"},
                "number": 1,
                "pending": None,
                "pin": None,
                "bad": {"2": {"reason": "fleet cutover g5 aborted: broken", "signature": None}},
                "interrupted": {},
            }
        },
    }
    (fleet.repo / LEDGER_NAME).write_text(json.dumps(old))
    coordinator = fleet.coordinator(model=None)
    assert coordinator.committed() == {"a": 7, "b": 8}  # a new fleet: generations go on
    assert coordinator.join()["a"].committed.source == a1  # v2 stays bad
    assert "broken" in str(coordinator.repository.bad_reason("a", 2))
    record = FleetLedger(fleet.repo / LEDGER_NAME).load()
    assert sorted(record.models) == ["a", "b"]
    assert record.models["a"].bad[2].reason == "fleet cutover g5 aborted: broken"


class FakeKv:
    """Ray's internal KV as a dict (`RayKvStore` takes its get and put)."""

    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}
        self.fail: Exception | None = None

    def get(self, key: bytes) -> bytes | None:
        return self.values.get(key)

    def put(self, key: bytes, value: bytes) -> bool:
        if self.fail is not None:
            raise self.fail
        self.values[key] = value
        return True


def test_the_ray_kv_state_keeps_the_record_out_of_the_repository(fleet: Fleet) -> None:
    kv = FakeKv()
    store = RayKvStore(fleet.repo, kv.get, kv.put)
    first = fleet.coordinator("f", model=None, store=store)
    fleet.publish(model="a")
    assert first.sync(model="a") is not None
    assert not (fleet.repo / LEDGER_NAME).exists()
    assert list(kv.values) == [f"record:{fleet.repo.resolve()}".encode()]
    assert (
        first.status()["state"] == f"Ray internal KV {KV_NAMESPACE}/record:{fleet.repo.resolve()}"
    )
    second = fleet.coordinator("f", model=None, store=RayKvStore(fleet.repo, kv.get, kv.put))
    assert second.restarts == 1
    assert second.committed() == first.committed()


def test_the_ray_kv_state_names_its_key_when_it_fails(fleet: Fleet) -> None:
    kv = FakeKv()
    store = RayKvStore(fleet.repo, kv.get, kv.put)
    kv.values[store.key] = b"{"
    with pytest.raises(ValueError, match=f"the fleet's record Ray internal KV {KV_NAMESPACE}/"):
        store.load()
    kv.fail = ConnectionError("GCS unreachable")
    with pytest.raises(OSError, match=r"cannot write the fleet's record .* GCS unreachable"):
        store.save(Record())
