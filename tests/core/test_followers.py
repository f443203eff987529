"""Adapters as versions bound to versions of a base: an adapter version holds its base
version, a base's new version carries its adapters prepared on it and commits them with
it, and one adapter that cannot follow refuses the base's new version.

The fakes raise `UseAfterUnload` when an adapter, or the base version it holds, is used
after its unload; the race moves in lockstep rounds (a barrier, no sleeps): each round
every client leases the live adapter and holds the lease across the next adapter reload
(and, every fifth round, a base reload that brings the adapter along), then uses it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pytest

from hotweights.core import Outcome, PreparedVersion, Reloader
from hotweights.core.following import prepare_followers
from hotweights.core.reload_queue import ReloadJob
from hotweights.errors import NotPrepared
from tests.fakes import FakeAdapter, FakeAdapterLoader, FakeLoader, FakeModel

RELOADS = 50
CLIENTS = 4
MEET = 60.0


class Following:
    """The base's `Followers`: every adapter reloader given."""

    def __init__(self, adapters: list[Reloader[Any]]) -> None:
        self.adapters = adapters

    def prepare_on(
        self, base: PreparedVersion[Any], generations: Mapping[str, int]
    ) -> tuple[PreparedVersion[Any], ...]:
        return prepare_followers(base, self.adapters, generations, timeout=MEET)


class GatedAdapters(FakeAdapterLoader):
    """`FakeAdapterLoader` whose load of a source in `gates` waits for that gate (and
    sets `started[source]` first)."""

    def __init__(self, base: Reloader[FakeModel]) -> None:
        super().__init__(base)
        self.gates: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}

    def gate(self, source: str) -> tuple[threading.Event, threading.Event]:
        """The gate that holds `source`'s load, and the event set when it begins."""
        self.gates[source], self.started[source] = threading.Event(), threading.Event()
        return self.gates[source], self.started[source]

    def load_on(self, source: str, base_generation: int | None) -> FakeAdapter:
        if source in self.gates:
            self.started[source].set()
            self.gates[source].wait(MEET)
        return super().load_on(source, base_generation)


def _pair() -> tuple[Reloader[FakeModel], Reloader[FakeAdapter], FakeLoader, GatedAdapters]:
    models = FakeLoader()
    base: Reloader[FakeModel] = Reloader(models, name="base", drain_timeout=MEET)
    assert base.reload("b0", timeout=MEET).succeeded
    adapters = GatedAdapters(base)
    adapter: Reloader[FakeAdapter] = Reloader(adapters, name="alpha", drain_timeout=MEET)
    assert adapter.reload("a0", timeout=MEET).succeeded
    base.follow_with(Following([adapter]))
    return base, adapter, models, adapters


def test_fifty_adapter_reloads_racing_requests_never_use_an_unloaded_adapter_or_base() -> None:
    base, adapter, models, adapters = _pair()
    meet = threading.Barrier(CLIENTS + 1, timeout=MEET)
    errors: list[BaseException] = []
    answers: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        try:
            for _ in range(RELOADS):
                lease = adapter.slot.acquire()  # on the live adapter, before the reload
                meet.wait()  # the reload (and maybe a base reload) runs now
                meet.wait()
                with lease, lease.use() as model:
                    answer = model()  # raises if the adapter or its base was unloaded
                with lock:
                    answers.append(answer)
        except BaseException as exc:
            errors.append(exc)
            meet.abort()

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for round_ in range(1, RELOADS + 1):
        meet.wait()
        assert adapter.reload(f"a{round_}", timeout=MEET).succeeded
        if round_ % 5 == 0:
            event = base.reload(f"b{round_}", timeout=MEET)
            assert event.succeeded, event.error_message
            (live,) = [m for v, m in adapter.models() if v is adapter.live_version]
            assert live.base_generation == base.live_version.generation  # type: ignore[union-attr]
        meet.wait()
    for thread in threads:
        thread.join(MEET)
    assert errors == []
    assert len(answers) == RELOADS * CLIENTS
    adapter.close(MEET)
    base.close(MEET)
    assert all(a.unloaded for a in adapters.loaded)  # every version unloaded, each once
    assert models.live_models() == []  # and every base version, adapters' holds released


def test_a_base_version_an_adapter_does_not_fit_is_refused_naming_the_adapter() -> None:
    base, adapter, models, adapters = _pair()
    adapters.unfit.add("b-wide")
    event = base.reload("b-wide", timeout=MEET)
    assert event.outcome is Outcome.DISCARDED
    assert "adapter alpha" in (event.error_message or "")
    assert base.live_version is not None
    assert base.live_version.source == "b0"
    lease = adapter.slot.acquire()
    with lease, lease.use() as model:
        assert model() == "a0 on b0"  # the adapter serves on, on the old base
    assert base.wait_drained(MEET)
    adapter.close(MEET)
    base.close(MEET)
    assert models.live_models() == []


def test_a_prepared_base_numbers_its_followers_as_asked_and_commits_them_with_it() -> None:
    """A fleet gives every model's generations: the adapter's version on the new base
    takes the one named for it, and goes live with the base in one commit."""
    base, adapter, _, _ = _pair()
    result = base.prepare(
        "b1", generation=40, hold_seconds=MEET, follower_generations={"alpha": 41}
    ).wait(MEET)
    assert isinstance(result, PreparedVersion)
    (follower,) = result.followers
    assert (follower.version.generation, follower.version.source) == (41, "a0")
    assert adapter.live_version is not None
    assert adapter.live_version.generation == 1  # prepared beside, not yet live
    event = base.commit(result)
    assert event.succeeded, event.error_message
    assert (base.live_version.generation, adapter.live_version.generation) == (40, 41)  # type: ignore[union-attr]
    (live,) = [m for v, m in adapter.models() if v is adapter.live_version]
    assert live.base_generation == 40
    adapter.close(MEET)
    base.close(MEET)


def _announce_follows(monkeypatch: pytest.MonkeyPatch, adapter: Reloader[Any]) -> threading.Event:
    """An event set once a follow's prepare is in `adapter`'s queue (the follow has read
    the adapter's live version by then)."""
    queued = threading.Event()
    put = adapter.queue.put

    def announcing(*args: Any, **kwargs: Any) -> tuple[ReloadJob, ReloadJob | None]:
        answer = put(*args, **kwargs)
        if args[1] == "follow":
            queued.set()
        return answer

    monkeypatch.setattr(adapter.queue, "put", announcing)
    return queued


def _source(reloader: Reloader[Any]) -> str | None:
    live = reloader.live_version
    return live.source if live is not None else None


def _outcome(handle: PreparedVersion[Any]) -> tuple[Outcome | None, bool]:
    """How `handle` was settled, and whether its reason names the adapter that changed."""
    event = handle.event
    if event is None:
        return None, False
    return event.outcome, "adapter alpha changed version" in (event.error_message or "")


def _serves(adapter: Reloader[FakeAdapter]) -> str:
    lease = adapter.slot.acquire()
    with lease, lease.use() as model:
        return model()


def test_a_base_prepared_while_an_adapter_reload_went_live_is_refused_not_reverting_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The follow reads a0 as live; a reload to a2, already running, goes live before the
    follower is prepared, so the follower is a0 on b1. Committing b1 would take the
    adapter back to a0: the commit is refused and b1 and its follower are discarded."""
    base, adapter, models, adapters = _pair()
    gate, started = adapters.gate("a2")
    queued = _announce_follows(monkeypatch, adapter)
    newer = adapter.submit("a2")
    assert started.wait(MEET)  # a2 is loading on the adapter's worker
    ticket = base.prepare("b1", hold_seconds=MEET)
    assert queued.wait(MEET)  # the follow read a0 and waits behind a2
    gate.set()
    assert newer.wait(MEET).succeeded
    prepared = ticket.wait(MEET)
    assert isinstance(prepared, PreparedVersion)
    (follower,) = prepared.followers
    assert follower.version.source == "a0"
    with pytest.raises(NotPrepared, match="adapter alpha changed version"):
        base.commit(prepared)
    assert prepared.settled.wait(MEET)
    assert follower.settled.wait(MEET)
    assert _outcome(prepared) == (Outcome.DISCARDED, True)
    assert _outcome(follower) == (Outcome.DISCARDED, True)
    assert _source(base) == "b0"
    assert _source(adapter) == "a2"
    assert _serves(adapter) == "a2 on b0"  # not reverted
    event = base.reload("b2", timeout=MEET)  # reloading the base again follows a2
    assert event.succeeded, event.error_message
    assert _serves(adapter) == "a2 on b2"
    adapter.close(MEET)
    base.close(MEET)
    assert all(a.unloaded for a in adapters.loaded)
    assert models.live_models() == []


def test_a_base_reload_whose_follow_an_adapter_reload_superseded_is_refused_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The follow waits in the adapter's queue behind a1; a reload to a2 supersedes it:
    the base is refused, naming the adapter, and the adapter goes on to a2."""
    base, adapter, models, adapters = _pair()
    gate, started = adapters.gate("a1")
    queued = _announce_follows(monkeypatch, adapter)
    running = adapter.submit("a1")
    assert started.wait(MEET)
    refused = base.submit("b1")
    assert queued.wait(MEET)
    newest = adapter.submit("a2")  # supersedes the follow
    event = refused.wait(MEET)
    assert event.outcome is Outcome.DISCARDED
    assert "adapter alpha changed version" in (event.error_message or "")
    gate.set()
    assert running.wait(MEET).succeeded
    assert newest.wait(MEET).succeeded
    assert _source(base) == "b0"
    assert _serves(adapter) == "a2 on b0"
    adapter.close(MEET)
    base.close(MEET)
    assert all(a.unloaded for a in adapters.loaded)
    assert models.live_models() == []
