"""A coordinator that dies and is built again from the fleet's record (`ledger.py`), as
Ray restarts its actor: it carries on from where the first one was. A death is a
`Killed` raised out of the fake link at the chosen call: nothing after it runs, and only
what the first coordinator wrote to disk survives it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from hotweights.fleet.coordinator import INTERRUPTED_LIMIT, Coordinator
from hotweights.fleet.ledger import LEDGER_NAME, FleetLedger, Phase
from hotweights.fleet.model_replica import Prepared
from hotweights.sources.repository_scan import RepositoryState
from tests.fleet.fake_link import Fleet

FLEET = "fleet-a"


class Killed(BaseException):
    """The coordinator's process died here (not an `Exception`: nothing handles it)."""


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    fleet = Fleet(tmp_path)
    fleet.publish()
    return fleet


def restarted(fleet: Fleet) -> Coordinator:
    fleet.link.calls.clear()
    return fleet.coordinator(FLEET)


def test_a_coordinator_restarted_while_idle_carries_on_from_the_record(fleet: Fleet) -> None:
    first = fleet.coordinator(FLEET)
    fleet.publish()
    assert first.sync() is not None
    assert first.status()["coordinator"] == {"pid": _pid(), "restarts": 0}
    second = restarted(fleet)
    assert second.status()["coordinator"] == {"pid": _pid(), "restarts": 1}
    assert second.committed() == {"m": 2}
    assert second.join()["m"].draining is None
    assert second.resume() is None  # nothing was left half done
    assert fleet.link.calls == []  # and nothing asked of the replicas to know it
    fleet.publish()
    record = second.sync()
    assert record is not None
    assert (record["generation"], record["outcome"]) == (3, "committed")
    assert restarted(fleet).status()["coordinator"] == {"pid": _pid(), "restarts": 2}


def test_a_cutover_left_in_prepare_is_aborted_and_its_version_tried_again(fleet: Fleet) -> None:
    first = fleet.coordinator(FLEET)
    fleet.publish()
    fleet.link.rounds = [Killed()]
    with pytest.raises(Killed):
        first.sync()
    second = restarted(fleet)
    assert second.committed() == {"m": 1}
    assert second.join()["m"].preparing is None
    record = (second.resume() or {}).get("m")
    assert record is not None
    assert (record["generation"], record["outcome"], record["trigger"]) == (2, "aborted", "restart")
    assert fleet.link.names() == ["abort"]
    assert fleet.link.calls[0][1] == 2
    assert "the coordinator died while g2 prepared" in str(fleet.link.calls[0][2])
    assert second.repository.bad_reason("m", 2) is None  # not the version's fault, once
    again = second.sync()
    assert again is not None
    assert (again["generation"], again["version"], again["outcome"]) == (3, 2, "committed")


def test_a_version_whose_prepare_the_coordinator_died_in_twice_is_marked_bad(
    fleet: Fleet,
) -> None:
    coordinator = fleet.coordinator(FLEET)
    fleet.publish()
    for _ in range(INTERRUPTED_LIMIT):
        fleet.link.rounds = [Killed()]
        with pytest.raises(Killed):
            coordinator.sync()
        coordinator = restarted(fleet)
        record = (coordinator.resume() or {}).get("m")
        assert record is not None
        assert record["outcome"] == "aborted"
    bad = coordinator.repository.bad_reason("m", 2)
    assert bad is not None
    assert "died while g3 prepared (2 time(s))" in bad
    assert coordinator.sync() is None
    assert coordinator.committed() == {"m": 1}


@pytest.mark.parametrize("dies_in", ["flip", "drained", "finish"])
def test_a_cutover_left_after_its_commit_is_finished(fleet: Fleet, dies_in: str) -> None:
    first = fleet.coordinator(FLEET)
    v2 = fleet.publish()
    fleet.link.failures[dies_in] = Killed()
    with pytest.raises(Killed):
        first.sync()
    assert FleetLedger(fleet.repo / LEDGER_NAME).load().models["m"].pending is not None
    second = restarted(fleet)
    assert second.committed() == {"m": 2}  # committed is committed: the record says so
    joined = second.join()["m"]
    assert joined.committed.source == str(v2)
    assert joined.draining is not None
    assert joined.draining.generation == 1  # a replica starting now loads g1 as well
    record = (second.resume() or {}).get("m")
    assert record is not None
    assert (record["generation"], record["outcome"], record["error"]) == (2, "committed", None)
    assert fleet.link.calls == [("flip", 2), ("drained", 1), ("finish", 2)]
    assert second.join()["m"].draining is None
    pending = FleetLedger(fleet.repo / LEDGER_NAME).load().models["m"].pending
    assert pending is None


def test_the_record_says_committed_before_the_ingress_is_flipped(fleet: Fleet) -> None:
    coordinator = fleet.coordinator(FLEET)
    fleet.publish()
    ledger = FleetLedger(fleet.repo / LEDGER_NAME)
    seen: list[object] = []
    flip = fleet.link.flip

    def flip_and_look(model: str, generation: int, followers: Mapping[str, int]) -> None:
        entry = ledger.load().models["m"]
        pending = entry.pending
        seen.append(
            (entry.committed.generation if entry.committed else None, pending and pending.phase)
        )
        flip(model, generation, followers)

    fleet.link.flip = flip_and_look  # type: ignore[method-assign]
    assert coordinator.sync() is not None
    assert seen == [(2, Phase.COMMITTED)]


def test_a_bad_mark_is_on_disk_before_status_can_show_it(fleet: Fleet) -> None:
    """`status` shows a mark once a scan applied it: a coordinator killed right after
    `status` showed it must find it in the record."""
    coordinator = fleet.coordinator(FLEET)
    fleet.publish()
    fleet.link.rounds = [[Prepared("r1", 2, ok=False, error="replica r1: broken")]]
    ledger = FleetLedger(fleet.repo / LEDGER_NAME)
    scan = coordinator.repository.scan
    on_disk: list[list[int]] = []

    def scan_and_look() -> RepositoryState:
        on_disk.append(sorted(ledger.load().models["m"].bad))
        return scan()

    coordinator.repository.scan = scan_and_look  # type: ignore[method-assign]
    assert coordinator.sync() is not None
    assert on_disk[-1] == [2]
    assert "2" in coordinator.status()["bad"]  # type: ignore[operator]


def test_bad_marks_and_pins_outlive_the_fleet_on_the_same_repository(fleet: Fleet) -> None:
    first = fleet.coordinator(FLEET)
    fleet.publish()
    fleet.link.rounds = [[Prepared("r1", 2, ok=False, error="replica r1: broken")]]
    record = first.sync()
    assert record is not None
    assert record["outcome"] == "aborted"
    assert "replica r1: broken" in first.status()["bad"]["2"]  # type: ignore[index]
    assert first.reload(1) is None  # pinned to the committed version: nothing to do
    # A new fleet (another name) on the same repository.
    second = fleet.coordinator("fleet-b")
    status = second.status()
    assert status["coordinator"] == {"pid": _pid(), "restarts": 0}
    assert "replica r1: broken" in status["bad"]["2"]  # type: ignore[index]
    assert status["policy"] == {"policy": "pinned", "pin": 1, "reason": "pin"}
    assert second.committed() == {"m": 3}  # generations go on: none is ever reused
    fleet.publish()
    assert second.sync() is None  # pinned
    assert second.reload(None) is not None  # unpinned: v3, the newest good one
    third = fleet.coordinator("fleet-c")
    assert third.status()["policy"] == {"policy": "latest", "pin": None, "reason": None}
    assert third.join()["m"].committed.number == "3"
    assert "2" in third.status()["bad"]  # type: ignore[operator]


def test_a_record_that_cannot_be_read_stops_the_start_and_says_where(fleet: Fleet) -> None:
    (fleet.repo / LEDGER_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=r"\.hotweights-fleet\.json is unreadable"):
        fleet.coordinator(FLEET)


def _pid() -> int:
    import os

    return os.getpid()
