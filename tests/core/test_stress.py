"""Thousands of leases from threads and asyncio tasks racing a hundred swaps.

The fake model raises `UseAfterUnload` if it is called after its unload, so any lease
accounting error (a drain that does not wait, a lease on the wrong entry) fails here.

The work is bounded and interleaved by design, not by spinning: clients and the test's
thread move in lockstep, one phase at a time. In each round every client holds leases
across the swap (and keeps them through the next one, so a drain that did not wait has a
whole round to unload under them), takes a fixed burst of short leases while the swap is in
flight, and only then uses what it held. Nothing spins, so the reloader's worker is never
starved of the GIL, and the amount of work is the same on a busy machine as on an idle one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from hotweights.core import Lease, Notice, Outcome, Reloader, VersionChanged, VersionState
from hotweights.core.canary import CanaryPolicy
from tests.core.conftest import MakeReloader
from tests.fakes import FakeLoader, FakeModel

SWAPS = 120
THREADS = 4
TASKS = 16
CLIENTS = THREADS + TASKS
HELD = 2
"""Leases each client takes on the live version after a swap and holds across two more."""
BURST = 3
"""Short leases each client takes while a swap is in flight."""
MEET_TIMEOUT = 60.0
"""A phase that takes this long is a hang, not slowness."""

ThreadWork = Callable[[int, int], None]
TaskWork = Callable[[int, int], Coroutine[Any, Any, None]]


class Lockstep:
    """`THREADS` client threads and `TASKS` asyncio tasks (on one loop thread) that run
    one phase of bounded work at a time, in step with the test's thread.

    Phase `i` starts when every party has called `meet` for the `i`-th time: the clients
    then run `thread_work(i, client)` or `task_work(i, client)` while the test's thread
    does its own part, and the next `meet` waits for all of them. A client that raises
    breaks the barrier, so the test fails at once instead of hanging.
    """

    def __init__(self, phases: int, thread_work: ThreadWork, task_work: TaskWork) -> None:
        self.phases = phases
        self.errors: list[BaseException] = []
        self._barrier = threading.Barrier(THREADS + 2, timeout=MEET_TIMEOUT)
        self._thread_work = thread_work
        self._task_work = task_work
        self._clients = [
            threading.Thread(target=self._run_thread, args=(i,)) for i in range(THREADS)
        ]
        self._clients.append(threading.Thread(target=self._run_loop))
        self._met = 0

    def start(self) -> None:
        for client in self._clients:
            client.start()

    def meet(self) -> int:
        """Wait for every client to finish the phase before; returns the phase now begun."""
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise AssertionError(f"a client failed: {self.errors!r}") from None
        self._met += 1
        return self._met - 1

    def close(self) -> None:
        """Let every client finish (or, after a failure, stop) and join them."""
        if self._met <= self.phases:
            self._barrier.abort()
        for client in self._clients:
            client.join(MEET_TIMEOUT)
        assert not any(client.is_alive() for client in self._clients)

    def _run_thread(self, client: int) -> None:
        try:
            for phase in range(self.phases):
                self._barrier.wait()
                self._thread_work(phase, client)
            self._barrier.wait()
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:
            self.errors.append(exc)
            self._barrier.abort()

    def _run_loop(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            for phase in range(self.phases):
                self._barrier.wait()
                loop.run_until_complete(self._tasks(phase))
            self._barrier.wait()
        except threading.BrokenBarrierError:
            pass
        except BaseException as exc:
            self.errors.append(exc)
            self._barrier.abort()
        finally:
            loop.close()

    async def _tasks(self, phase: int) -> None:
        await asyncio.gather(*(self._task_work(phase, task) for task in range(TASKS)))


def _check_lease(lease: Lease[FakeModel], mistakes: list[str]) -> None:
    """Every call on one lease answers from the one version the lease pinned."""
    expected = lease.version.source
    for _ in range(3):
        with lease.use() as model:
            answer = model()
        if answer != expected or lease.model() != expected:
            mistakes.append(f"g{lease.generation} answered {answer}, pinned {expected}")


def _lease_newest(reloader: Reloader[FakeModel]) -> Lease[FakeModel]:
    """A lease from a thread: the newest resident version (the live one here)."""
    lease = reloader.acquire_resident(lambda version: True)
    if lease is None:
        raise AssertionError("no version was resident to lease")
    return lease


def _generations(versions: Sequence[Any]) -> set[int]:
    return {version.generation for version in versions}


def test_leases_racing_swaps_never_touch_an_unloaded_model(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    reloader = make_reloader(drain_timeout=60)
    reloader.reload("/m/0")
    # Phase 0: every client leases g1. Phase 2r - 1: swap r is in flight (g r+1 goes live)
    # and each client takes a burst of short leases. Phase 2r: each client uses every lease
    # it holds (on g r-1 and g r, both draining now), lets go of those on g r-1 and leases
    # the new live version. The last phase lets go of everything.
    phases = 2 * SWAPS + 2
    mistakes: list[str] = []
    seen: list[Counter[int]] = [Counter() for _ in range(CLIENTS)]
    held: list[deque[list[Lease[FakeModel]]]] = [deque() for _ in range(CLIENTS)]

    def settle(phase: int, client: int) -> None:
        """Use every lease held (the versions before the live one, draining now); let go
        of the oldest batch once two are held, or of everything in the last phase."""
        for batch in held[client]:
            for pinned in batch:
                _check_lease(pinned, mistakes)
        while held[client] and (len(held[client]) == 2 or phase == phases - 1):
            for pinned in held[client].popleft():
                pinned.release()

    def keep(phase: int, client: int, batch: list[Lease[FakeModel]]) -> None:
        live = phase // 2 + 1
        for fresh in batch:
            seen[client][fresh.generation] += 1
            if fresh.generation != live:
                mistakes.append(f"after swap {phase // 2}: leased g{fresh.generation}")
        held[client].append(batch)

    def in_swap(phase: int, client: int, lease: Lease[FakeModel]) -> None:
        before = phase // 2 + 1
        seen[client][lease.generation] += 1
        if lease.generation not in (before, before + 1):
            mistakes.append(f"during swap {before}: leased g{lease.generation}")
        _check_lease(lease, mistakes)

    def thread_work(phase: int, client: int) -> None:
        if phase % 2 == 0 or phase == phases - 1:
            settle(phase, client)
            if phase < phases - 1:
                keep(phase, client, [_lease_newest(reloader) for _ in range(HELD)])
            return
        for _ in range(BURST):
            with _lease_newest(reloader) as lease:
                time.sleep(0)  # hold it across a chance for the worker to swap
                in_swap(phase, client, lease)

    async def task_work(phase: int, task: int) -> None:
        client = THREADS + task
        if phase % 2 == 0 or phase == phases - 1:
            settle(phase, client)
            if phase < phases - 1:
                keep(phase, client, [await reloader.acquire_async() for _ in range(HELD)])
            return
        for _ in range(BURST):
            async with await reloader.acquire_async() as lease:
                await asyncio.sleep(0)  # the other tasks lease meanwhile
                in_swap(phase, client, lease)

    crowd = Lockstep(phases, thread_work, task_work)
    crowd.start()
    outcomes = []
    try:
        assert crowd.meet() == 0
        for swap in range(1, SWAPS + 1):
            assert crowd.meet() == 2 * swap - 1
            ticket = reloader.submit(f"/m/{swap}")
            outcomes.append(ticket.wait(MEET_TIMEOUT).outcome)
            # Every client still holds its leases on the two versions before this one.
            inflight = reloader.inflight()
            for pinned in (swap - 1, swap):
                if pinned >= 1:
                    assert inflight.get(pinned, 0) >= CLIENTS * HELD, (swap, inflight)
            assert _generations(reloader.resident()) >= {swap - 1, swap, swap + 1} - {0}
            assert crowd.meet() == 2 * swap
        assert crowd.meet() == phases - 1  # the clients let go of everything
        crowd.meet()
    finally:
        crowd.close()
        for batches in held:  # left only when the test failed: do not wait out the drains
            for batch in batches:
                for lease in batch:
                    lease.release()
    assert reloader.wait_drained(MEET_TIMEOUT)

    assert crowd.errors == []
    assert mistakes == []
    assert outcomes == [Outcome.LIVE] * SWAPS
    assert reloader.generation == SWAPS + 1
    total = sum(seen, Counter[int]())
    assert sum(total.values()) == CLIENTS * (HELD * (SWAPS + 1) + BURST * SWAPS)
    assert set(total) == set(range(1, SWAPS + 2)), "every generation should have held leases"
    # Each retired version was unloaded exactly once (a second unload raises in the fake),
    # and only the live one is still loaded.
    assert sorted(m.source for m in loader.unloaded) == sorted(f"/m/{i}" for i in range(SWAPS))
    assert [m.source for m in loader.live_models()] == [f"/m/{SWAPS}"]
    assert reloader.inflight() == {SWAPS + 1: 0}


def test_leases_racing_canaries_promoted_and_rolled_back(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    """Each new version bakes as a canary while clients lease; an operator promotes two
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
    # Round i has three phases: 3i (the canary of round i goes live beside the stable
    # version; each client uses and lets go of what it held in round i - 1), 3i + 1 (each
    # client leases: tasks as new requests, so the canary gets its share; threads pinned to
    # the canary or to the stable version) and 3i + 2 (the operator decides while every
    # client takes a burst of short leases).
    phases = 3 * rounds + 1
    mistakes: list[str] = []
    seen: list[Counter[int]] = [Counter() for _ in range(CLIENTS)]
    held: list[list[Lease[FakeModel]]] = [[] for _ in range(CLIENTS)]
    shared: Counter[int] = Counter()  # leases tasks held in this round, by generation

    def use(lease: Lease[FakeModel], client: int) -> None:
        _check_lease(lease, mistakes)
        seen[client][lease.generation] += 1
        reloader.record(lease.generation, ok=True, seconds=0.001, tokens=1)

    def let_go(client: int) -> None:
        for lease in held[client]:
            _check_lease(lease, mistakes)
            lease.release()
        held[client].clear()

    def thread_work(phase: int, client: int) -> None:
        if phase % 3 == 0:
            let_go(client)
        elif phase % 3 == 1:
            canary, stable = reloader.canary_version, reloader.live_version
            assert canary is not None
            assert stable is not None
            target = (canary if client % 2 == 0 else stable).generation
            for _ in range(HELD):
                lease = reloader.acquire_resident(lambda v: v.generation == target)
                assert lease is not None, f"g{target} could not be pinned"
                use(lease, client)
                held[client].append(lease)
        else:
            for _ in range(BURST):
                with _lease_newest(reloader) as lease:
                    time.sleep(0)
                    use(lease, client)

    async def task_work(phase: int, task: int) -> None:
        client = THREADS + task
        if phase % 3 == 0:
            let_go(client)
        elif phase % 3 == 1:
            for _ in range(HELD):
                lease = await reloader.acquire_async()
                use(lease, client)
                shared[lease.generation] += 1
                held[client].append(lease)
        else:
            for _ in range(BURST):
                async with await reloader.acquire_async() as lease:
                    await asyncio.sleep(0)
                    use(lease, client)

    crowd = Lockstep(phases, thread_work, task_work)
    crowd.start()
    outcomes = []
    try:
        for i in range(1, rounds + 1):
            assert crowd.meet() == 3 * (i - 1)
            stable = reloader.live_version
            assert stable is not None
            ticket = reloader.submit(f"/m/{i}")
            assert baking.acquire(timeout=MEET_TIMEOUT)
            canary = reloader.canary_version
            assert canary is not None
            assert canary.generation == i + 1
            shared.clear()
            crowd.meet()  # the clients lease
            assert crowd.meet() == 3 * i - 1
            assert shared[canary.generation] > 0, "each canary serves its share of requests"
            ended = reloader.rollback() if i % 3 == 0 else reloader.promote()
            assert ended.id == ticket.id
            outcomes.append(ticket.wait(MEET_TIMEOUT).outcome)
            # The clients still hold leases on both versions: neither may be unloaded yet.
            assert _generations(reloader.resident()) >= {canary.generation, stable.generation}
        crowd.meet()  # the clients let go of the last round's leases
        crowd.meet()
    finally:
        crowd.close()
        for leases in held:  # left only when the test failed: do not wait out the drains
            for lease in leases:
                lease.release()
    assert reloader.wait_drained(MEET_TIMEOUT)

    assert crowd.errors == []
    assert mistakes == []
    numbers = range(1, rounds + 1)
    expected = [Outcome.CANARY_FAILED if i % 3 == 0 else Outcome.LIVE for i in numbers]
    assert outcomes == expected
    total = sum(seen, Counter[int]())
    assert sum(total.values()) == rounds * CLIENTS * (HELD + BURST)
    live = reloader.live_version
    assert live is not None
    assert live.source == f"/m/{rounds - 1}"  # round 60 was rolled back
    unloaded = sorted(m.source for m in loader.unloaded)
    assert unloaded == sorted(f"/m/{i}" for i in range(rounds + 1) if i != rounds - 1)
    assert [m.source for m in loader.live_models()] == [live.source]
    assert reloader.inflight() == {live.generation: 0}
