"""Leases pin a version; drains wait for them, or retire them at the deadline."""

from __future__ import annotations

import asyncio
import threading

import pytest

from hotweights.core import ModelSlot, ModelVersion, Outcome, VersionState
from hotweights.errors import ModelRetired, NotReady
from tests.core.conftest import MakeReloader
from tests.fakes import FakeLoader, FakeModel


def _prepared(source: str, generation: int) -> ModelVersion:
    version = ModelVersion(source, generation=generation)
    version.transition(VersionState.VALIDATING)
    version.transition(VersionState.PREPARED)
    return version


def _go_live(slot: ModelSlot[FakeModel], source: str, generation: int) -> None:
    """Hold a prepared version in `slot`, then commit it (the reloader's two phases)."""
    slot.hold(_prepared(source, generation), FakeModel(source))
    ModelSlot.commit_together([(slot, generation)])


def test_a_lease_keeps_its_version_across_a_swap(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader()
    reloader.reload("/m/1")
    held = reloader.slot.acquire()
    reloader.reload("/m/2")
    assert (held.generation, held.model()) == (1, "/m/1")
    with reloader.slot.acquire() as fresh:
        assert (fresh.generation, fresh.model()) == (2, "/m/2")
    assert reloader.slot.inflight() == {1: 1, 2: 0}
    assert not reloader.wait_drained(0.05)  # held back by the lease
    assert loader.unloaded == []
    held.release()
    held.release()  # idempotent
    assert reloader.wait_drained(10)
    assert [m.source for m in loader.unloaded] == ["/m/1"]
    assert reloader.slot.inflight() == {2: 0}
    with pytest.raises(ModelRetired, match="already released"):
        held.check()


def test_a_stuck_lease_is_retired_at_the_deadline(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader(drain_timeout=0.05)
    reloader.reload("/m/1")
    stuck = reloader.slot.acquire()
    event = reloader.reload("/m/2")
    assert reloader.wait_drained(10)
    assert [m.source for m in loader.unloaded] == ["/m/1"]
    with pytest.raises(ModelRetired, match="drain deadline"):
        stuck.model()
    with pytest.raises(ModelRetired), stuck.use():
        pytest.fail("use() must not enter on a retired version")
    stuck.release()
    assert reloader.log.get(event.id).phases["drain"] >= 0.05  # type: ignore[union-attr]
    assert reloader.history.history()[1].state is VersionState.RETIRED


def test_unload_waits_for_a_step_already_running(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader(drain_timeout=0.01)
    reloader.reload("/m/1")
    lease = reloader.slot.acquire()
    inside, proceed = threading.Event(), threading.Event()
    answers: list[str] = []

    def step() -> None:
        with lease.use() as model:
            inside.set()
            proceed.wait()
            answers.append(model())  # raises UseAfterUnload if unload ran meanwhile

    worker = threading.Thread(target=step)
    worker.start()
    assert inside.wait(10)
    reloader.reload("/m/2")
    assert not reloader.wait_drained(0.3)  # the deadline passed; the step still runs
    assert loader.unloaded == []
    proceed.set()
    worker.join()
    assert answers == ["/m/1"]
    assert reloader.wait_drained(10)
    assert [m.source for m in loader.unloaded] == ["/m/1"]
    with pytest.raises(ModelRetired):
        lease.model()


def test_admission_without_a_live_version_fails_fast() -> None:
    slot: ModelSlot[FakeModel] = ModelSlot(lambda model: None)
    with pytest.raises(NotReady, match="no model version is live"):
        slot.acquire()


async def test_async_admission_waits_through_a_gap() -> None:
    slot: ModelSlot[FakeModel] = ModelSlot(lambda model: None)
    _go_live(slot, "/m/1", 1)
    assert slot.withdraw() == 1
    assert slot.in_gap
    waiting = asyncio.ensure_future(slot.acquire_async(timeout=30))
    await asyncio.sleep(0)  # let it register as a waiter; publish wakes it either way
    assert not waiting.done()
    _go_live(slot, "/m/2", 2)
    lease = await waiting
    assert (lease.generation, lease.model()) == (2, "/m/2")
    lease.release()
    slot.withdraw()
    with pytest.raises(NotReady, match="admission timeout"):
        await slot.acquire_async(timeout=0.01)


def test_a_gap_that_ends_without_a_version_fails_waiters() -> None:
    slot: ModelSlot[FakeModel] = ModelSlot(lambda model: None)
    _go_live(slot, "/m/1", 1)
    slot.withdraw()
    failures: list[BaseException] = []
    started = threading.Event()

    def admit() -> None:
        started.set()
        try:
            slot.acquire(timeout=30)
        except NotReady as exc:
            failures.append(exc)

    waiter = threading.Thread(target=admit)
    waiter.start()
    assert started.wait(10)
    slot.end_gap()
    waiter.join(10)
    assert not waiter.is_alive()
    assert len(failures) == 1


def test_resource_policy_unloads_first_and_admission_waits(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader(policy="resource", admission_timeout=30)
    reloader.reload("/m/1")
    loader.gates["/m/2"] = gate = threading.Event()
    ticket = reloader.submit("/m/2")
    assert loader.started("/m/2").wait(10)
    # The old version was drained and unloaded before the new one started loading.
    assert loader.loaded_when_load_began["/m/2"] == []
    assert [m.source for m in loader.unloaded] == ["/m/1"]
    with pytest.raises(NotReady):
        reloader.slot.acquire(timeout=0)
    seen: list[tuple[int, str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(9)

    def admit() -> None:
        barrier.wait()
        try:
            with reloader.slot.acquire() as lease:
                seen.append((lease.generation, lease.model()))
        except BaseException as exc:
            errors.append(exc)

    waiters = [threading.Thread(target=admit) for _ in range(8)]
    for waiter in waiters:
        waiter.start()
    barrier.wait()
    gate.set()
    assert ticket.wait(10).outcome is Outcome.LIVE
    for waiter in waiters:
        waiter.join(10)
    assert errors == []
    assert seen == [(2, "/m/2")] * 8


def test_resource_policy_restores_the_old_source_after_a_failure(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader(policy="resource")
    reloader.reload("/m/1")
    loader.fail[("/m/bad", "validate")] = ValueError("bad weights")
    event = reloader.reload("/m/bad")
    assert event.outcome is Outcome.FAILED
    assert "bad weights" in (event.error_message or "")
    restore = reloader.log.recent(1)[0]
    assert (restore.outcome, restore.trigger, restore.new_generation) == (
        Outcome.ROLLED_BACK,
        "rollback",
        2,
    )
    with reloader.slot.acquire() as lease:
        assert (lease.generation, lease.model()) == (2, "/m/1")


def test_a_resident_version_can_be_leased_while_it_drains(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader()
    reloader.reload("/m/1")
    held = reloader.slot.acquire()
    reloader.reload("/m/2")

    def first(version: ModelVersion) -> bool:
        return version.source == "/m/1"

    pinned = reloader.slot.acquire_resident(first)
    assert pinned is not None
    assert (pinned.generation, pinned.model()) == (1, "/m/1")
    held.release()
    assert not reloader.wait_drained(0.05)  # the pinned lease keeps g1 resident
    pinned.release()
    assert reloader.wait_drained(10)
    assert reloader.slot.acquire_resident(first) is None
    live = reloader.slot.acquire_resident(lambda version: version.source == "/m/2")
    assert live is not None
    assert live.generation == 2
    live.release()
