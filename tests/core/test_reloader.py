"""The reloader: outcomes, failures in each phase, single flight, rollback, retries."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from hotweights.core import (
    MemoryCheck,
    Notice,
    Outcome,
    ReloadFinished,
    RetryPolicy,
    VersionChanged,
    VersionState,
)
from hotweights.errors import LoadError, NoPreviousVersion, ValidationError
from tests.core.conftest import MakeReloader
from tests.fakes import FakeLoader


def test_reload_goes_live_and_names_its_generation(make_reloader: MakeReloader) -> None:
    reloader = make_reloader()
    event = reloader.reload("/m/1", description="first")
    assert event.outcome is Outcome.LIVE
    assert (event.old_generation, event.new_generation) == (0, 1)
    assert set(event.phases) == {"load", "validate", "warmup"}
    assert event.memory_estimate_bytes == 1004
    assert event.fingerprint is not None
    with reloader.slot.acquire() as lease:
        assert lease.generation == 1
        assert lease.model() == "/m/1"
        assert lease.version.description == "first"
    event = reloader.reload("/m/2")
    assert (event.old_generation, event.new_generation) == (1, 2)
    assert reloader.wait_drained(10)
    drained = reloader.log.get(event.id)
    assert drained is not None
    assert set(drained.phases) == {"load", "validate", "warmup", "drain"}
    assert 0 <= drained.phases["drain"] < 10  # a duration, inside wait_drained's 10 s


PHASE_FAILURES = [
    ("load", LoadError("model.safetensors is truncated"), "LoadError"),
    ("load", MemoryError(), "MemoryError"),
    ("load", RuntimeError("loader bug"), "RuntimeError"),
    ("validate", ValidationError("logits are not finite"), "ValidationError"),
    ("warmup", RuntimeError("warmup crashed"), "RuntimeError"),
    ("warmup", MemoryError("out of memory"), "MemoryError"),
]


@pytest.mark.parametrize(("phase", "error", "error_type"), PHASE_FAILURES)
def test_a_failure_in_any_phase_leaves_the_old_version_serving(
    make_reloader: MakeReloader,
    loader: FakeLoader,
    phase: str,
    error: BaseException,
    error_type: str,
) -> None:
    reloader = make_reloader()
    reloader.reload("/m/good")
    loader.fail[("/m/bad", phase)] = error
    with reloader.slot.acquire() as held:
        event = reloader.reload("/m/bad")
        assert held.model() == "/m/good"
    assert event.outcome is Outcome.FAILED
    assert event.new_generation is None
    assert event.error_type == error_type
    assert event.error_message is not None
    assert event.error_message.startswith(f"{phase}:")
    assert reloader.generation == 1
    assert [v.source for v in reloader.history.history()] == ["/m/good"]
    with reloader.slot.acquire() as lease:
        assert (lease.generation, lease.model()) == (1, "/m/good")
    # A model that loaded but failed later is unloaded once; the good one never.
    assert [m.source for m in loader.unloaded] == ([] if phase == "load" else ["/m/bad"])
    assert reloader.log.recent(1)[0] == event


def test_a_thousand_triggers_cost_at_most_two_loads(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader()
    loader.gates["/m/first"] = gate = threading.Event()
    first = reloader.submit("/m/first")
    assert loader.started("/m/first").wait(10)
    barrier = threading.Barrier(20)
    tickets = []
    lock = threading.Lock()

    def trigger(worker: int) -> None:
        barrier.wait()
        for i in range(50):
            ticket = reloader.submit(f"/m/target-{(worker * 50 + i) % 7}", trigger="watch")
            with lock:
                tickets.append(ticket)

    threads = [threading.Thread(target=trigger, args=(w,)) for w in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    gate.set()
    outcomes = Counter(ticket.wait(10).outcome for ticket in tickets)
    assert len(tickets) == 1000
    assert first.wait(10).outcome is Outcome.LIVE
    assert sum(loader.loads.values()) <= 2
    assert outcomes[Outcome.LIVE] >= 1
    assert set(outcomes) <= {Outcome.LIVE, Outcome.SUPERSEDED}


def test_requests_for_the_same_target_join_one_load(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader()
    loader.gates["/m/1"] = gate = threading.Event()
    tickets = [reloader.submit("/m/1") for _ in range(100)]
    gate.set()
    assert {ticket.id for ticket in tickets} == {tickets[0].id}
    assert tickets[-1].wait(10).outcome is Outcome.LIVE
    assert loader.loads["/m/1"] == 1


def test_a_newer_target_supersedes_the_queued_one(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader()
    loader.gates["/m/1"] = gate = threading.Event()
    running = reloader.submit("/m/1")
    assert loader.started("/m/1").wait(10)
    queued = reloader.submit("/m/2")
    newest = reloader.submit("/m/3")
    superseded = queued.wait(10)
    assert superseded.outcome is Outcome.SUPERSEDED
    assert superseded.error_message == "superseded by /m/3"
    gate.set()
    assert running.wait(10).new_generation == 1
    assert newest.wait(10).new_generation == 2
    assert loader.loads["/m/2"] == 0


def test_rollback_makes_the_previous_source_live_again(make_reloader: MakeReloader) -> None:
    reloader = make_reloader()
    with pytest.raises(NoPreviousVersion):
        reloader.rollback()
    reloader.reload("/m/1")
    with pytest.raises(NoPreviousVersion):
        reloader.rollback()
    reloader.reload("/m/2")
    event = reloader.rollback().wait(10)
    assert event.outcome is Outcome.ROLLED_BACK
    assert event.trigger == "rollback"
    assert (event.old_generation, event.new_generation) == (2, 3)
    with reloader.slot.acquire() as lease:
        assert lease.model() == "/m/1"


def test_transient_failures_are_retried_with_a_bound(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader(retry=RetryPolicy(retries=2, base_delay=0.0))
    loader.transient["/m/1"] = 2
    event = reloader.reload("/m/1")
    assert (event.outcome, event.retries) == (Outcome.LIVE, 2)
    loader.transient["/m/2"] = 3
    event = reloader.reload("/m/2")
    assert (event.outcome, event.error_type, event.retries) == (
        Outcome.FAILED,
        "TransientLoadError",
        2,
    )
    assert loader.loads["/m/2"] == 3


def test_observers_see_every_state_and_a_broken_one_changes_nothing(
    make_reloader: MakeReloader,
) -> None:
    reloader = make_reloader()
    notices: list[Notice] = []
    reloader.subscribe(notices.append)

    def broken(notice: Notice) -> None:
        raise RuntimeError("observer bug")

    reloader.subscribe(broken)
    reloader.reload("/m/1")
    reloader.reload("/m/2")
    assert reloader.wait_drained(10)
    first = [
        (n.old, n.new)
        for n in notices
        if isinstance(n, VersionChanged) and n.version.source == "/m/1"
    ]
    S = VersionState
    assert first == [
        (S.LOADING, S.VALIDATING),
        (S.VALIDATING, S.PREPARED),
        (S.PREPARED, S.LIVE),
        (S.LIVE, S.DRAINING),
        (S.DRAINING, S.RETIRED),
    ]
    finished = [n for n in notices if isinstance(n, ReloadFinished)]
    assert [(n.event.new_generation, n.drained) for n in finished] == [
        (1, False),
        (2, False),
        (2, True),
    ]


def test_a_load_past_its_deadline_fails_and_is_unloaded_when_it_returns(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader(phase_timeout=0.05)
    reloader.reload("/m/1")
    loader.gates["/m/hung"] = gate = threading.Event()
    event = reloader.reload("/m/hung")
    assert (event.outcome, event.error_type) == (Outcome.FAILED, "PhaseTimeout")
    assert event.error_message == "load: load of /m/hung did not finish within 0.05 s"
    with reloader.slot.acquire() as lease:
        assert lease.model() == "/m/1"
    loader.unload_signal.clear()
    gate.set()  # the hung load returns after all: its model must not leak
    assert loader.unload_signal.wait(10)
    assert [m.source for m in loader.unloaded] == ["/m/hung"]


def test_a_warmup_past_its_deadline_unloads_only_after_it_returns(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader(phase_timeout=0.05)
    reloader.reload("/m/1")
    loader.gates["warmup:/m/slow"] = gate = threading.Event()
    event = reloader.reload("/m/slow")
    assert event.error_message == "warmup: warmup of /m/slow did not finish within 0.05 s"
    assert loader.unloaded == []  # still inside warmup: unloading now would pull it away
    gate.set()
    assert loader.unload_signal.wait(10)
    assert [m.source for m in loader.unloaded] == ["/m/slow"]
    assert reloader.generation == 1


def test_a_version_that_cannot_fit_beside_the_live_one_is_refused(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    free = iter([1200, 300, 300])
    reloader = make_reloader(memory=MemoryCheck(available=lambda: next(free)))
    assert reloader.reload("/m/1").outcome is Outcome.LIVE  # needs ~1.1 x 1004 bytes
    event = reloader.reload("/m/2")
    assert (event.outcome, event.error_type) == (Outcome.FAILED, "InsufficientMemory")
    assert "the resource policy would fit it" in (event.error_message or "")
    assert loader.loads["/m/2"] == 0
    free_now = [1200]
    resource = make_reloader(policy="resource", memory=MemoryCheck(available=lambda: free_now[0]))
    assert resource.reload("/m/1").outcome is Outcome.LIVE
    free_now[0] = 300  # the same room as above: enough once the live version is gone
    assert resource.reload("/m/2").outcome is Outcome.LIVE
