"""A replica's model without Ray (`ModelReplica`, in the `FleetReplica` that builds it):
start on the committed version, hold a prepared one beside it, finish (it goes live, the
old one is unloaded) or abort (it is discarded)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from hotweights.config import Config
from hotweights.core import Loader, Notice, VersionChanged, VersionState
from hotweights.errors import LoadError
from hotweights.fleet.model_replica import Joined, ModelReplica, Prepared, Target
from hotweights.fleet.replica import FleetReplica
from tests.fakes import FakeLoader

TIMEOUT = 10.0
"""What a test gives a blocking call: far more than it needs, so only a hang fails it."""

Make = Callable[[Loader[Any]], ModelReplica]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "repo"


@pytest.fixture
def make(repo: Path) -> Iterator[Make]:
    """Build replicas of model `m` in `repo` (each closed at teardown); their model `m`."""
    made: list[FleetReplica] = []
    config = Config.load({"repo": str(repo)}, environ={})
    (repo / "m").mkdir(parents=True, exist_ok=True)

    def build(loader: Loader[Any]) -> ModelReplica:
        replica = FleetReplica(config, ["m"], replica_id="r1", hold_seconds=600, loader=loader)
        made.append(replica)
        return replica.model("m")

    yield build
    for replica in made:
        replica.close(timeout=TIMEOUT)


def source(repo: Path, number: int) -> str:
    return str(repo / "m" / str(number))


class Retired:
    """Waits for a generation to be retired (drained and unloaded) on a replica."""

    def __init__(self, replica: ModelReplica) -> None:
        self._retired: set[int] = set()
        self._changed = threading.Condition()
        replica.reloader.subscribe(self._observe)

    def _observe(self, notice: Notice) -> None:
        if isinstance(notice, VersionChanged) and notice.new is VersionState.RETIRED:
            with self._changed:
                self._retired.add(notice.version.generation)
                self._changed.notify_all()

    def wait(self, generation: int, *, timeout: float = TIMEOUT) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: generation in self._retired, timeout)


def resident(replica: ModelReplica) -> list[tuple[int, str]]:
    described = replica.describe()["resident"]
    assert isinstance(described, list)
    return [(entry["generation"], entry["state"]) for entry in described]


def started(make: Make, repo: Path, loader: Loader[Any] | None = None) -> ModelReplica:
    """A replica with g3 (version 3) live."""
    replica = make(loader if loader is not None else FakeLoader())
    replica.start(Joined(Target(3, source(repo, 3))), TIMEOUT)
    return replica


def test_start_makes_the_committed_generation_live(make: Make, repo: Path) -> None:
    replica = started(make, repo)
    described = replica.describe()
    assert described["live"] == 3
    assert described["resident"] == [{"generation": 3, "version": "3", "state": "live"}]
    assert described["inflight"] == {"3": 0}


def test_start_refuses_a_committed_version_that_fails_to_load(make: Make, repo: Path) -> None:
    loader = FakeLoader(fail={(source(repo, 3), "load"): LoadError("version 3: no weights")})
    replica = make(loader)
    with pytest.raises(RuntimeError, match=r"g3 .*no weights"):
        replica.start(Joined(Target(3, source(repo, 3))), TIMEOUT)
    assert replica.describe()["live"] is None


def test_start_mid_cutover_holds_the_version_being_prepared(make: Make, repo: Path) -> None:
    replica = make(FakeLoader())
    replica.start(Joined(Target(3, source(repo, 3)), Target(5, source(repo, 5))), TIMEOUT)
    assert replica.describe()["live"] == 3
    assert resident(replica) == [(5, "held"), (3, "live")]


def test_hold_keeps_the_version_beside_the_live_one_and_a_repeat_is_not_fresh(
    make: Make, repo: Path
) -> None:
    replica = started(make, repo)
    target = Target(5, source(repo, 5))
    first = replica.hold(target, TIMEOUT)
    assert (first.replica, first.generation, first.ok, first.fresh) == ("r1", 5, True, True)
    assert first.error is None
    assert replica.describe()["live"] == 3
    assert resident(replica) == [(5, "held"), (3, "live")]
    again = replica.hold(target, TIMEOUT)
    assert again == Prepared("r1", 5, ok=True, fresh=False)
    assert resident(replica) == [(5, "held"), (3, "live")]


def test_finish_makes_the_held_version_live_and_unloads_the_old_one(make: Make, repo: Path) -> None:
    loader = FakeLoader()
    replica = started(make, repo, loader)
    retired = Retired(replica)
    assert replica.hold(Target(5, source(repo, 5)), TIMEOUT).ok
    assert replica.finish(5, TIMEOUT)
    assert replica.describe()["live"] == 5
    assert retired.wait(3), "g3 was never unloaded"
    assert [model.source for model in loader.unloaded] == [source(repo, 3)]
    assert resident(replica) == [(5, "live")]
    assert replica.finish(5, TIMEOUT)  # again: already live


def test_finish_of_a_generation_not_held_changes_nothing(make: Make, repo: Path) -> None:
    replica = started(make, repo)
    assert not replica.finish(5, TIMEOUT)
    assert resident(replica) == [(3, "live")]


def test_abort_discards_the_held_version_and_the_live_one_stays(make: Make, repo: Path) -> None:
    loader = FakeLoader()
    replica = started(make, repo, loader)
    retired = Retired(replica)
    assert replica.hold(Target(5, source(repo, 5)), TIMEOUT).ok
    replica.abort(5, "another replica failed")
    assert retired.wait(5), "g5 was never discarded"
    assert [model.source for model in loader.unloaded] == [source(repo, 5)]
    assert resident(replica) == [(3, "live")]
    assert not replica.finish(5, TIMEOUT)


def test_a_hold_whose_load_fails_answers_not_ok_with_the_reason(make: Make, repo: Path) -> None:
    loader = FakeLoader(fail={(source(repo, 5), "load"): LoadError("shard 2 is truncated")})
    replica = started(make, repo, loader)
    prepared = replica.hold(Target(5, source(repo, 5)), TIMEOUT)
    assert (prepared.replica, prepared.generation, prepared.ok) == ("r1", 5, False)
    assert prepared.error is not None
    assert "replica r1" in prepared.error
    assert "shard 2 is truncated" in prepared.error
    assert resident(replica) == [(3, "live")]


def test_a_hold_whose_validation_fails_answers_not_ok(make: Make, repo: Path) -> None:
    loader = FakeLoader(fail={(source(repo, 5), "validate"): ValueError("logits are NaN")})
    replica = started(make, repo, loader)
    prepared = replica.hold(Target(5, source(repo, 5)), TIMEOUT)
    assert not prepared.ok
    assert prepared.error is not None
    assert "logits are NaN" in prepared.error
    assert [model.source for model in loader.unloaded] == [source(repo, 5)]
    assert resident(replica) == [(3, "live")]


def test_a_hold_of_a_generation_not_after_the_live_one_answers_not_ok(
    make: Make, repo: Path
) -> None:
    replica = started(make, repo)
    prepared = replica.hold(Target(2, source(repo, 2)), TIMEOUT)
    assert not prepared.ok
    assert prepared.error is not None
    assert "generation 2" in prepared.error


def test_an_abort_while_the_version_loads_fails_the_hold_and_discards_it_once_loaded(
    make: Make, repo: Path
) -> None:
    loader = FakeLoader()
    target = Target(5, source(repo, 5))
    loader.gates[target.source] = gate = threading.Event()
    replica = started(make, repo, loader)
    retired = Retired(replica)
    with ThreadPoolExecutor(1) as pool:
        holding: Future[Prepared] = pool.submit(replica.hold, target, TIMEOUT)
        try:
            assert loader.started(target.source).wait(TIMEOUT), "g5 never began to load"
            replica.abort(5, "another replica failed")
            assert not holding.done()
        finally:
            gate.set()
        prepared = holding.result(TIMEOUT)
    assert (prepared.ok, prepared.error) == (False, "aborted")
    assert retired.wait(5), "g5 was never discarded"
    assert [model.source for model in loader.unloaded] == [source(repo, 5)]
    assert resident(replica) == [(3, "live")]
    assert replica.describe()["live"] == 3


def test_a_hold_past_its_timeout_answers_not_ok(make: Make, repo: Path) -> None:
    loader = FakeLoader()
    target = Target(5, source(repo, 5))
    loader.gates[target.source] = gate = threading.Event()
    replica = started(make, repo, loader)
    try:
        prepared = replica.hold(target, timeout=0.05)
    finally:
        gate.set()
    assert not prepared.ok
    assert prepared.error is not None
    assert "not ready within 0.05 s" in prepared.error


def test_an_abort_after_the_hold_timed_out_discards_the_version_once_loaded(
    make: Make, repo: Path
) -> None:
    loader = FakeLoader()
    target = Target(5, source(repo, 5))
    loader.gates[target.source] = gate = threading.Event()
    replica = started(make, repo, loader)
    retired = Retired(replica)
    try:
        assert not replica.hold(target, timeout=0.05).ok
        replica.abort(5, "not every replica was ready")
    finally:
        gate.set()
    assert retired.wait(5, timeout=2), "g5 stayed held after the fleet aborted it"


def test_an_abort_while_the_version_is_announced_discards_it(make: Make, repo: Path) -> None:
    """The fleet aborts while the reloader's worker is still telling its observers that
    g5 is prepared (before the replica has its handle): g5 is discarded all the same."""
    loader = FakeLoader()
    replica = started(make, repo, loader)
    announced, proceed = threading.Event(), threading.Event()

    def slow_observer(notice: Notice) -> None:  # on the worker, before the ticket resolves
        if isinstance(notice, VersionChanged) and notice.new is VersionState.PREPARED:
            announced.set()
            proceed.wait(TIMEOUT)

    replica.reloader.subscribe(slow_observer)
    retired = Retired(replica)
    with ThreadPoolExecutor(1) as pool:
        holding = pool.submit(replica.hold, Target(5, source(repo, 5)), TIMEOUT)
        try:
            assert announced.wait(TIMEOUT)
            replica.abort(5, "another replica failed")
        finally:
            proceed.set()
        prepared = holding.result(TIMEOUT)
    assert (prepared.ok, prepared.error) == (False, "aborted")
    assert retired.wait(5, timeout=2), "g5 stayed held after the fleet aborted it"


def test_catch_up_moves_a_starting_replica_to_what_the_fleet_has_now(
    make: Make, repo: Path
) -> None:
    loader = FakeLoader()
    replica = started(make, repo, loader)  # joined at g3 ...
    assert replica.hold(Target(4, source(repo, 4)), TIMEOUT).ok  # ... while g4 prepared
    retired = Retired(replica)
    # Meanwhile the fleet aborted g4 and committed g5: discard g4, go to g5 (g3 unloaded).
    assert not replica.catch_up(Joined(Target(5, source(repo, 5))), TIMEOUT)
    assert retired.wait(4)
    assert retired.wait(3)
    assert resident(replica) == [(5, "live")]
    assert replica.catch_up(Joined(Target(5, source(repo, 5))), TIMEOUT)  # in line now
    # A cutover began: hold its version too.
    assert not replica.catch_up(
        Joined(Target(5, source(repo, 5)), Target(6, source(repo, 6))), TIMEOUT
    )
    assert resident(replica) == [(6, "held"), (5, "live")]


def test_catch_up_finishes_a_held_version_the_fleet_committed_meanwhile(
    make: Make, repo: Path
) -> None:
    loader = FakeLoader()
    replica = started(make, repo, loader)
    assert replica.hold(Target(4, source(repo, 4)), TIMEOUT).ok  # joined while g4 prepared
    retired = Retired(replica)
    assert not replica.catch_up(Joined(Target(4, source(repo, 4))), TIMEOUT)  # g4 committed
    assert retired.wait(3)
    assert resident(replica) == [(4, "live")]
    assert replica.has(4)
    assert not replica.has(3)


def test_a_finish_right_after_hold_returned_finds_the_version(make: Make, repo: Path) -> None:
    """`hold` may return before the ticket's callbacks ran (a Future wakes its waiters
    first): the handle must already be the replica's, or the commit would miss it."""
    replica = started(make, repo, FakeLoader())
    park = threading.Event()
    prepare = replica.reloader.prepare

    def parked(*args: Any, **kwargs: Any) -> Any:
        ticket = prepare(*args, **kwargs)
        ticket._future.add_done_callback(lambda _: park.wait(TIMEOUT))  # before hold's own
        return ticket

    replica.reloader.prepare = parked  # type: ignore[method-assign]
    try:
        assert replica.hold(Target(5, source(repo, 5)), TIMEOUT).ok
        assert replica.finish(5, TIMEOUT)
    finally:
        park.set()
    live = replica.reloader.live_version
    assert live is not None
    assert live.generation == 5


def test_a_replica_starting_while_the_fleet_drains_holds_both_generations(
    make: Make, repo: Path
) -> None:
    """Started between a commit (g5) and its finish: requests the ingress stamped g4
    before the flip may still be routed here, so g4 is live and g5 held beside it."""
    replica = make(FakeLoader())
    draining = Joined(Target(5, source(repo, 5)), draining=Target(4, source(repo, 4)), issued=5)
    replica.start(draining, TIMEOUT)
    assert resident(replica) == [(5, "held"), (4, "live")]
    assert replica.has(4)
    assert replica.has(5)
    assert replica.catch_up(draining, TIMEOUT)  # in line: nothing to do until the finish
    assert resident(replica) == [(5, "held"), (4, "live")]
    retired = Retired(replica)
    assert not replica.catch_up(Joined(Target(5, source(repo, 5)), issued=5), TIMEOUT)
    assert retired.wait(4)
    assert resident(replica) == [(5, "live")]


def test_a_replica_catching_up_keeps_the_generation_the_ingress_still_drains(
    make: Make, repo: Path
) -> None:
    """A replica that learns of a commit by itself (a request stamped with the new
    generation) holds the new one and unloads nothing until the fleet has drained."""
    replica = started(make, repo, FakeLoader())  # g3 live
    draining = Joined(Target(4, source(repo, 4)), draining=Target(3, source(repo, 3)), issued=4)
    assert not replica.catch_up(draining, TIMEOUT)
    assert resident(replica) == [(4, "held"), (3, "live")]
    assert replica.catch_up(draining, TIMEOUT)
    retired = Retired(replica)
    assert not replica.catch_up(Joined(Target(4, source(repo, 4)), issued=4), TIMEOUT)
    assert retired.wait(3)
    assert resident(replica) == [(4, "live")]


def test_catch_up_leaves_alone_a_version_prepared_after_its_answer(make: Make, repo: Path) -> None:
    replica = started(make, repo, FakeLoader())
    assert replica.hold(Target(6, source(repo, 6)), TIMEOUT).ok  # asked for after ...
    stale = Joined(Target(3, source(repo, 3)), issued=5)  # ... this answer was given
    assert replica.catch_up(stale, TIMEOUT)
    assert resident(replica) == [(6, "held"), (3, "live")]
