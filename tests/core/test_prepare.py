"""The two phases: prepare (beside the live version, reachable only by a pin), commit (the
one swap, of one or several models together) and discard (with its reason), under both
swap strategies. The fake model raises if it is used after its unload."""

from __future__ import annotations

import threading

import pytest

from hotweights.core import (
    Outcome,
    PreparedVersion,
    Reloader,
    ReloadEvent,
    VersionState,
)
from hotweights.errors import NotPrepared
from tests.core.conftest import MakeReloader
from tests.fakes import FakeLoader, FakeModel


def _prepared(
    reloader: Reloader[FakeModel], source: str, **options: object
) -> PreparedVersion[FakeModel]:
    result = reloader.prepare(source, **options).wait(10)  # type: ignore[arg-type]
    assert isinstance(result, PreparedVersion), result
    return result


def test_a_prepared_version_is_reached_only_by_a_pin(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader()
    reloader.reload("/m/1", generation=4)
    handle = _prepared(reloader, "/m/2", generation=7)
    assert handle.generation == 7
    assert handle.version.state is VersionState.PREPARED
    for _ in range(1000):  # no unpinned request reaches it
        with reloader.slot.acquire() as lease:
            assert lease.model() == "/m/1"
    pinned = reloader.acquire_resident(lambda v: v.generation == 7)
    assert pinned is not None
    with pinned:
        assert pinned.model() == "/m/2"
    status = reloader.status()
    assert status.prepared is handle.version
    assert status.resident == [7, 4]
    assert status.to_dict()["prepared"] == handle.version.to_dict()


def test_commit_is_the_swap_and_the_old_version_drains_after_its_last_lease(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader()
    reloader.reload("/m/1")
    handle = _prepared(reloader, "/m/2")
    old = reloader.slot.acquire()
    event = reloader.commit(handle, reason="the fleet committed it")
    assert (event.outcome, event.new_generation, event.old_generation) == (Outcome.LIVE, 2, 1)
    assert {"load", "validate", "warmup"} <= set(event.phases)
    with reloader.slot.acquire() as lease:
        assert lease.model() == "/m/2"
    assert old.model() == "/m/1"  # still usable: its version drains, it is not unloaded
    assert [m.source for m in loader.unloaded] == []
    old.release()
    assert reloader.wait_drained(10)
    assert [m.source for m in loader.unloaded] == ["/m/1"]
    with pytest.raises(NotPrepared):
        reloader.commit(handle)
    with pytest.raises(NotPrepared):
        reloader.discard(handle, "too late")


def test_discard_unloads_after_the_pinned_leases_and_records_why(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader()
    reloader.reload("/m/1")
    handle = _prepared(reloader, "/m/2")
    pinned = reloader.acquire_resident(lambda v: v.generation == handle.generation)
    assert pinned is not None
    event = reloader.discard(handle, "the fleet aborted")
    assert event is not None
    assert event.outcome is Outcome.DISCARDED
    assert event.error_message == "g2 discarded: the fleet aborted"
    assert reloader.log.get(event.id) == event
    assert pinned.model() == "/m/2"  # in flight: it finishes on its version
    pinned.release()
    assert reloader.acquire_resident(lambda v: v.generation == 2) is None  # on its way out
    assert reloader.wait_drained(10)
    assert [m.source for m in loader.unloaded] == ["/m/2"]
    assert reloader.live_version is not None
    assert reloader.live_version.source == "/m/1"
    assert reloader.history.rollback_target() is None  # a discarded version is forgotten
    with pytest.raises(NotPrepared):
        reloader.commit(handle)


def test_a_hold_nobody_decides_is_discarded_by_itself(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader()
    reloader.reload("/m/1")
    handle = _prepared(reloader, "/m/2", hold_seconds=0.2)
    assert handle.settled.wait(10)
    event = handle.event
    assert event is not None
    assert event.outcome is Outcome.DISCARDED
    assert "nothing committed it within 0.2 s" in (event.error_message or "")
    assert reloader.wait_drained(10)
    assert [m.source for m in loader.unloaded] == ["/m/2"]
    assert reloader.reload("/m/3").new_generation == 3  # the worker moved on


def test_a_prepared_version_is_never_judged_by_its_requests(make_reloader: MakeReloader) -> None:
    """No canary: failures on a prepared version do not discard it (its holder decides)."""
    reloader = make_reloader()
    reloader.reload("/m/1")
    handle = _prepared(reloader, "/m/2")
    for _ in range(100):
        reloader.record(2, ok=False, seconds=0.01)
    assert handle.decision is None
    assert reloader.commit(handle).outcome is Outcome.LIVE


def test_a_newer_prepare_supersedes_a_queued_one(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader()
    reloader.reload("/m/1")
    loader.gates["/m/2"] = gate = threading.Event()
    running = reloader.prepare("/m/2")
    assert loader.started("/m/2").wait(10)
    queued = reloader.prepare("/m/3")
    assert reloader.prepare("/m/3").id == queued.id  # the same request joins it
    newer = reloader.prepare("/m/4")
    superseded = queued.wait(10)
    assert isinstance(superseded, ReloadEvent)
    assert superseded.outcome is Outcome.SUPERSEDED
    gate.set()
    first = running.wait(10)
    assert isinstance(first, PreparedVersion)
    reloader.discard(first, "not this one")
    last = newer.wait(10)
    assert isinstance(last, PreparedVersion)
    assert reloader.commit(last).new_generation == 3  # g2 was /m/2, discarded
    assert loader.loads["/m/3"] == 0


def test_a_failed_prepare_answers_with_its_event(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader()
    reloader.reload("/m/1")
    loader.fail[("/m/bad", "validate")] = ValueError("NaN in the weights")
    result = reloader.prepare("/m/bad").wait(10)
    assert isinstance(result, ReloadEvent)
    assert (result.outcome, result.error_type) == (Outcome.FAILED, "ValueError")
    assert result.error_message == "validate: NaN in the weights"
    assert reloader.live_version is not None
    assert reloader.live_version.generation == 1
    assert reloader.generation == 1  # a failed load is an event, not a generation


def test_commit_of_several_models_swaps_all_or_none(loader: FakeLoader) -> None:
    base: Reloader[FakeModel] = Reloader(loader, name="base")
    adapter: Reloader[FakeModel] = Reloader(loader, name="adapter")
    try:
        base.reload("/base/1")
        adapter.reload("/adapter/1")
        new_base = _prepared(base, "/base/2")
        new_adapter = _prepared(adapter, "/adapter/2")
        adapter.discard(new_adapter, "refused")
        with pytest.raises(NotPrepared):
            base.commit(new_base, new_adapter)
        assert new_base.decision is None  # nothing was claimed: it can still go live
        again = _prepared(adapter, "/adapter/3")
        event = base.commit(new_base, again, reason="base and adapter together")
        assert event.new_generation == 2
        assert again.event is not None
        assert again.event.outcome is Outcome.LIVE
        lives = (base.live_version, adapter.live_version)
        assert [v.source if v else None for v in lives] == ["/base/2", "/adapter/3"]
    finally:
        base.close(10)
        adapter.close(10)


def test_close_discards_a_prepared_version(make_reloader: MakeReloader, loader: FakeLoader) -> None:
    reloader = make_reloader()
    reloader.reload("/m/1")
    handle = _prepared(reloader, "/m/2")
    reloader.close(10)
    assert handle.settled.is_set()
    assert handle.event is not None
    assert handle.event.error_message == "g2 discarded: the reloader is closing"
    assert sorted(m.source for m in loader.unloaded) == ["/m/1", "/m/2"]


def test_under_resource_the_live_version_goes_first_and_a_discard_brings_it_back(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader(policy="resource")
    reloader.reload("/m/1")
    handle = _prepared(reloader, "/m/2")
    assert loader.loaded_when_load_began["/m/2"] == []  # nothing beside it
    assert reloader.status().live is None  # admissions wait for the decision
    event = reloader.discard(handle, "changed my mind")
    assert event is not None
    assert event.outcome is Outcome.DISCARDED
    live = reloader.live_version
    assert live is not None
    assert (live.source, live.generation) == ("/m/1", 3)  # back, as a new generation
    restored = reloader.log.recent(1)[0]
    assert restored.outcome is Outcome.ROLLED_BACK
    with reloader.slot.acquire(timeout=0) as lease:
        assert lease.model() == "/m/1"


def test_a_prepare_whose_generation_was_taken_fails_and_unloads_what_it_loaded(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader()
    reloader.reload("/m/1")
    loader.gates["/m/2"] = gate = threading.Event()
    running = reloader.submit("/m/2")  # will be numbered 2
    assert loader.started("/m/2").wait(10)
    numbered = reloader.prepare("/m/3", generation=2)  # accepted: 2 is ahead of 1, for now
    gate.set()
    assert running.wait(10).new_generation == 2
    failed = numbered.wait(10)
    assert isinstance(failed, ReloadEvent)
    assert failed.outcome is Outcome.FAILED
    assert failed.error_message == "prepare: generation 2 is not after generation 2"
    assert [m.source for m in loader.unloaded if m.source == "/m/3"] == ["/m/3"]


def test_commit_names_one_version_of_each_model(make_reloader: MakeReloader) -> None:
    reloader = make_reloader()
    reloader.reload("/m/1")
    handle = _prepared(reloader, "/m/2")
    with pytest.raises(ValueError, match="one version of each model"):
        reloader.commit(handle, handle)
    assert handle.decision is None  # nothing was claimed or swapped
    assert reloader.commit(handle).new_generation == 2


def test_a_handle_belongs_to_its_reloader(loader: FakeLoader) -> None:
    one: Reloader[FakeModel] = Reloader(loader, name="one")
    other: Reloader[FakeModel] = Reloader(loader, name="other")
    try:
        one.reload("/one/1")
        other.reload("/other/1")
        handle = _prepared(one, "/one/2")
        with pytest.raises(ValueError, match="another reloader"):
            other.discard(handle, "wrong reloader")
        with pytest.raises(ValueError, match="another reloader"):
            other.commit(handle)
        assert one.commit(handle).outcome is Outcome.LIVE
    finally:
        one.close(10)
        other.close(10)


class _UnloadRaises(FakeLoader):
    def unload(self, model: FakeModel) -> None:
        super().unload(model)
        if model.source == "/m/2":
            raise RuntimeError("the device refused to free the memory")


def test_under_resource_a_discard_whose_unload_raises_still_restores() -> None:
    reloader: Reloader[FakeModel] = Reloader(_UnloadRaises(), policy="resource")
    try:
        reloader.reload("/m/1")
        handle = _prepared(reloader, "/m/2")
        reloader.discard(handle, "changed my mind")
        assert handle.settled.is_set()
        live = reloader.live_version
        assert live is not None
        assert (live.source, live.generation) == ("/m/1", 3)
        assert reloader.reload("/m/3").outcome is Outcome.LIVE  # the worker is free
    finally:
        reloader.close(10)


def test_closing_under_resource_brings_nothing_back(loader: FakeLoader) -> None:
    reloader: Reloader[FakeModel] = Reloader(loader, policy="resource")
    reloader.reload("/m/1")
    _prepared(reloader, "/m/2")
    reloader.close(10)
    assert loader.loads["/m/1"] == 1  # the old version was not loaded again to be closed
    assert [m.source for m in loader.models if not m.unloaded] == []
