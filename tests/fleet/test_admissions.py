"""The ingress's flip point: what `admit` stamps, what `flip` changes, how `drained` waits."""

from __future__ import annotations

import asyncio
import re

import pytest

from hotweights.errors import InvalidRequest, UnknownModel
from hotweights.fleet.admissions import Admissions, Stamp, requested_model


def test_admit_stamps_the_committed_generation_and_counts_it() -> None:
    admissions = Admissions({"m": 4})
    stamps = [admissions.admit("m"), admissions.admit("m")]
    assert stamps == [Stamp(4), Stamp(4)]
    assert admissions.inflight() == {4: 2}
    assert admissions.admitted == {4: 2}
    admissions.done(stamps[0])
    assert admissions.inflight() == {4: 1}
    admissions.done(stamps[1])
    assert admissions.inflight() == {}
    assert admissions.admitted == {4: 2}  # since start, not in flight


def test_after_a_flip_new_requests_carry_the_new_generation_and_old_ones_stay_on_theirs() -> None:
    admissions = Admissions({"m": 1})
    before = [admissions.admit("m"), admissions.admit("m")]
    admissions.flip("m", 2)
    after = admissions.admit("m")
    assert ([s.generation for s in before], after.generation) == ([1, 1], 2)
    assert admissions.generations["m"] == 2
    assert admissions.inflight() == {1: 2, 2: 1}
    admissions.done(before[0])
    assert admissions.inflight() == {1: 1, 2: 1}
    assert admissions.admitted == {1: 2, 2: 1}


async def test_drained_answers_at_once_when_nothing_is_in_flight() -> None:
    admissions = Admissions({"m": 1})
    admissions.done(admissions.admit("m"))
    admissions.flip("m", 2)
    # A timeout this long would fail the test by its own timeout if `drained` waited.
    assert await admissions.drained(1, timeout=3600) == 0
    assert await admissions.drained(7, timeout=3600) == 0  # a generation never admitted


async def test_drained_waits_for_the_last_request_on_the_generation() -> None:
    admissions = Admissions({"m": 1})
    first, second = admissions.admit("m"), admissions.admit("m")
    admissions.flip("m", 2)
    newer = admissions.admit("m")
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
    admissions = Admissions({"m": 1})
    stamped = admissions.admit("m")
    waiters = [asyncio.create_task(admissions.drained(1, timeout=30)) for _ in range(2)]
    await asyncio.sleep(0)
    admissions.done(stamped)
    assert await asyncio.wait_for(asyncio.gather(*waiters), timeout=5) == [0, 0]


async def test_drained_returns_the_count_left_at_its_timeout() -> None:
    admissions = Admissions({"m": 1})
    stamps = [admissions.admit("m") for _ in range(3)]
    admissions.flip("m", 2)
    assert await admissions.drained(1, timeout=0.01) == 3
    admissions.done(stamps[0])
    assert await admissions.drained(1, timeout=0.01) == 2
    admissions.done(stamps[1])
    admissions.done(stamps[2])
    assert await admissions.drained(1, timeout=0.01) == 0


def test_each_model_is_stamped_and_flipped_on_its_own() -> None:
    admissions = Admissions({"a": 1, "b": 2})
    assert (admissions.admit("a"), admissions.admit("b")) == (Stamp(1), Stamp(2))
    assert admissions.flip("b", 3) == 3
    assert (admissions.admit("a"), admissions.admit("b")) == (Stamp(1), Stamp(3))  # a stays
    assert admissions.flip("a", 0) == 1  # a late, older flip changes nothing
    assert admissions.inflight() == {1: 2, 2: 1, 3: 1}


@pytest.mark.parametrize(
    ("body", "served", "expected"),
    [
        (b'{"model": "b", "messages": []}', ["a", "b"], "b"),
        (b'{"messages": []}', ["a"], "a"),  # one model: its server says what is missing
        (b"not json", ["a"], "a"),
        (b"", ["a"], "a"),
        (b'{"model": "c"}', ["a", "b"], UnknownModel("model 'c' is not served here")),
        (b'{"model": "a@2"}', ["a"], InvalidRequest("model 'a@2': a fleet serves the")),
        (b'{"messages": []}', ["a", "b"], InvalidRequest("this fleet serves a, b")),
        (b"[1]", ["a", "b"], InvalidRequest('name the model in "model"')),
    ],
    ids=["named", "only", "not-json", "empty", "unknown", "pinned", "unnamed", "not-an-object"],
)
def test_the_model_a_request_is_stamped_for(
    body: bytes, served: list[str], expected: str | Exception
) -> None:
    if isinstance(expected, str):
        assert requested_model(body, served) == expected
    else:
        with pytest.raises(type(expected), match=re.escape(str(expected))):
            requested_model(body, served)


async def test_an_adapter_request_carries_both_generations_and_its_base_drains_it() -> None:
    """A request for adapter `lora` (on base `m`) is stamped with the adapter's generation
    and its base's; a base's flip moves its adapters in the same step, and the base's
    old generation is drained only once the adapter's requests on it ended."""
    admissions = Admissions({"m": 1, "lora": 2}, parents={"lora": "m"})
    old = admissions.admit("lora")
    assert old == Stamp(2, base_generation=1)
    assert admissions.inflight() == {1: 1, 2: 1}
    assert admissions.admitted == {2: 1}
    assert admissions.flip("m", 3, {"lora": 4}) == 3
    assert admissions.admit("lora") == Stamp(4, base_generation=3)  # never 4 on 1, 2 on 3
    assert admissions.admit("m") == Stamp(3)
    waiting = asyncio.create_task(admissions.drained(1, timeout=30))
    await asyncio.sleep(0)  # parked on its event
    assert not waiting.done()  # the adapter's request holds the old base
    admissions.done(old)
    assert await asyncio.wait_for(waiting, timeout=5) == 0
    assert admissions.inflight() == {3: 2, 4: 1}


def test_an_unnamed_request_goes_to_the_only_base_model_beside_its_adapters() -> None:
    body = b'{"messages": []}'
    assert requested_model(body, ["lora", "m"], ["m"]) == "m"
    assert requested_model(b'{"model": "lora"}', ["lora", "m"], ["m"]) == "lora"
    with pytest.raises(InvalidRequest, match="this fleet serves a, b"):
        requested_model(body, ["a", "b", "lora"], ["a", "b"])
