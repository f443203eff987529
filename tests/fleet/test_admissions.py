"""The ingress's flip point: what `admit` stamps, what `flip` changes, how `drained` waits."""

from __future__ import annotations

import asyncio

from hotweights.fleet.admissions import Admissions


def test_admit_stamps_the_committed_generation_and_counts_it() -> None:
    admissions = Admissions(4)
    assert [admissions.admit(), admissions.admit()] == [4, 4]
    assert admissions.inflight() == {4: 2}
    assert admissions.admitted == {4: 2}
    admissions.done(4)
    assert admissions.inflight() == {4: 1}
    admissions.done(4)
    assert admissions.inflight() == {}
    assert admissions.admitted == {4: 2}  # since start, not in flight


def test_after_a_flip_new_requests_carry_the_new_generation_and_old_ones_stay_on_theirs() -> None:
    admissions = Admissions(1)
    before = [admissions.admit(), admissions.admit()]
    admissions.flip(2)
    after = admissions.admit()
    assert (before, after) == ([1, 1], 2)
    assert admissions.generation == 2
    assert admissions.inflight() == {1: 2, 2: 1}
    admissions.done(1)
    assert admissions.inflight() == {1: 1, 2: 1}
    assert admissions.admitted == {1: 2, 2: 1}


async def test_drained_answers_at_once_when_nothing_is_in_flight() -> None:
    admissions = Admissions(1)
    admissions.done(admissions.admit())
    admissions.flip(2)
    # A timeout this long would fail the test by its own timeout if `drained` waited.
    assert await admissions.drained(1, timeout=3600) == 0
    assert await admissions.drained(7, timeout=3600) == 0  # a generation never admitted


async def test_drained_waits_for_the_last_request_on_the_generation() -> None:
    admissions = Admissions(1)
    first, second = admissions.admit(), admissions.admit()
    admissions.flip(2)
    newer = admissions.admit()
    waiting = asyncio.create_task(admissions.drained(1, timeout=30))
    await asyncio.sleep(0)  # one turn of the loop: `drained` is now parked on its event
    assert not waiting.done()
    admissions.done(first)
    admissions.done(newer)  # another generation ending says nothing about g1
    await asyncio.sleep(0)
    assert not waiting.done()
    admissions.done(second)
    assert await asyncio.wait_for(waiting, timeout=5) == 0
    assert admissions.inflight() == {}


async def test_two_waiters_on_one_generation_are_both_released() -> None:
    admissions = Admissions(1)
    stamped = admissions.admit()
    waiters = [asyncio.create_task(admissions.drained(1, timeout=30)) for _ in range(2)]
    await asyncio.sleep(0)
    admissions.done(stamped)
    assert await asyncio.wait_for(asyncio.gather(*waiters), timeout=5) == [0, 0]


async def test_drained_returns_the_count_left_at_its_timeout() -> None:
    admissions = Admissions(1)
    for _ in range(3):
        admissions.admit()
    admissions.flip(2)
    assert await admissions.drained(1, timeout=0.01) == 3
    admissions.done(1)
    assert await admissions.drained(1, timeout=0.01) == 2
    admissions.done(1)
    admissions.done(1)
    assert await admissions.drained(1, timeout=0.01) == 0
