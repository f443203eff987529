"""Thousands of leases from threads and asyncio tasks racing a hundred swaps.

The fake model raises `UseAfterUnload` if it is called after its unload, so any lease
accounting error (a drain that does not wait, a lease on the wrong entry) fails here.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import Counter

from hotweights.core import Lease, Notice, Outcome, VersionChanged, VersionState
from hotweights.core.canary import CanaryPolicy
from tests.core.conftest import MakeReloader
from tests.fakes import FakeLoader, FakeModel

SWAPS = 120
THREADS = 8
TASKS = 32


def _check_lease(lease: Lease[FakeModel], mistakes: list[str]) -> None:
    """Every call on one lease answers from the one version the lease pinned."""
    expected = lease.version.source
    for _ in range(3):
        with lease.use() as model:
            answer = model()
        if answer != expected or lease.model() != expected:
            mistakes.append(f"g{lease.generation} answered {answer}, pinned {expected}")


def test_leases_racing_swaps_never_touch_an_unloaded_model(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader(drain_timeout=60)
    reloader.reload("/m/0")
    stop = threading.Event()
    start = threading.Barrier(THREADS + 2)
    mistakes: list[str] = []
    errors: list[BaseException] = []
    seen: Counter[int] = Counter()
    lock = threading.Lock()

    def thread_client() -> None:
        start.wait()
        local: Counter[int] = Counter()
        try:
            while not stop.is_set():
                with reloader.slot.acquire() as lease:
                    os.sched_yield()  # hold the lease across a chance to swap
                    _check_lease(lease, mistakes)
                    local[lease.generation] += 1
        except BaseException as exc:
            errors.append(exc)
        with lock:
            seen.update(local)

    async def task_client() -> None:
        while not stop.is_set():
            async with await reloader.slot.acquire_async() as lease:
                await asyncio.sleep(0)
                _check_lease(lease, mistakes)
                seen[lease.generation] += 1

    def loop_clients() -> None:
        async def main() -> None:
            start.wait()
            await asyncio.gather(*(task_client() for _ in range(TASKS)))

        try:
            asyncio.run(main())
        except BaseException as exc:
            errors.append(exc)

    clients = [threading.Thread(target=thread_client) for _ in range(THREADS)]
    clients.append(threading.Thread(target=loop_clients))
    for client in clients:
        client.start()
    start.wait()
    outcomes = [reloader.reload(f"/m/{i}").outcome for i in range(1, SWAPS + 1)]
    stop.set()
    for client in clients:
        client.join(60)
    assert reloader.wait_drained(60)

    assert errors == []
    assert mistakes == []
    assert outcomes == [Outcome.LIVE] * SWAPS
    assert reloader.generation == SWAPS + 1
    assert sum(seen.values()) >= 1000, seen
    assert len(seen) > 10, "leases should have spread over many generations"
    # Each retired version was unloaded exactly once (a second unload raises in the fake),
    # and only the live one is still loaded.
    assert sorted(m.source for m in loader.unloaded) == sorted(f"/m/{i}" for i in range(SWAPS))
    assert [m.source for m in loader.live_models()] == [f"/m/{SWAPS}"]
    assert reloader.slot.inflight() == {SWAPS + 1: 0}


def test_leases_racing_canaries_promoted_and_rolled_back(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    """Each new version bakes as a canary while threads lease; an operator promotes two
    in three and rolls back the third. Nothing runs on an unloaded model, every version but
    the live one is unloaded exactly once, and rolled-back canaries did serve their share."""
    rounds = 60
    reloader = make_reloader(drain_timeout=60, canary=CanaryPolicy(0.3, bake_seconds=600))
    reloader.reload("/m/0")
    baking = threading.Semaphore(0)

    def observe(notice: Notice) -> None:
        if isinstance(notice, VersionChanged) and notice.new is VersionState.CANARY:
            baking.release()

    reloader.subscribe(observe)
    stop = threading.Event()
    start = threading.Barrier(THREADS + 1)
    mistakes: list[str] = []
    errors: list[BaseException] = []
    seen: Counter[int] = Counter()
    lock = threading.Lock()

    def client() -> None:
        start.wait()
        local: Counter[int] = Counter()
        try:
            while not stop.is_set():
                with reloader.slot.acquire() as lease:
                    os.sched_yield()
                    _check_lease(lease, mistakes)
                    local[lease.generation] += 1
                    reloader.record(lease.generation, ok=True, seconds=0.001, tokens=1)
        except BaseException as exc:
            errors.append(exc)
        with lock:
            seen.update(local)

    clients = [threading.Thread(target=client) for _ in range(THREADS)]
    for thread in clients:
        thread.start()
    start.wait()
    outcomes = []
    for i in range(1, rounds + 1):
        ticket = reloader.submit(f"/m/{i}")
        assert baking.acquire(timeout=30)
        while reloader.inflight().get(reloader.generation, 0) == 0:  # let it take requests
            os.sched_yield()
        ended = reloader.rollback() if i % 3 == 0 else reloader.promote()
        assert ended.id == ticket.id
        outcomes.append(ticket.wait(30).outcome)
    stop.set()
    for thread in clients:
        thread.join(60)
    assert reloader.wait_drained(60)

    assert errors == []
    assert mistakes == []
    numbers = range(1, rounds + 1)
    expected = [Outcome.CANARY_FAILED if i % 3 == 0 else Outcome.LIVE for i in numbers]
    assert outcomes == expected
    rolled_back = [i + 1 for i in numbers if i % 3 == 0]  # round i made generation i + 1
    assert all(seen[g] > 0 for g in rolled_back), "each canary served its share first"
    live = reloader.live_version
    assert live is not None
    assert live.source == f"/m/{rounds - 1}"  # round 60 was rolled back
    unloaded = sorted(m.source for m in loader.unloaded)
    assert unloaded == sorted(f"/m/{i}" for i in range(rounds + 1) if i != rounds - 1)
    assert [m.source for m in loader.live_models()] == [live.source]
    assert reloader.slot.inflight() == {live.generation: 0}
