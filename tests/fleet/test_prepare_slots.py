"""`--prepare-parallel`'s places, as a table of asks and answers."""

from __future__ import annotations

import pytest

from hotweights.fleet.prepare_slots import PrepareSlots

Step = tuple[str, int, str, bool | None]
"""(take, give, open or close; generation; replica; what `take` answers, None for the
others). Generations 2 and 3 are open from the start."""


@pytest.mark.parametrize(
    ("limit", "steps"),
    [
        (0, [("take", 2, "a", True), ("take", 2, "b", True), ("take", 2, "c", True)]),
        (
            1,
            [
                ("take", 2, "a", True),
                ("take", 2, "b", False),  # a prepares
                ("take", 2, "a", True),  # asking again keeps the place
                ("give", 2, "a", None),
                ("take", 2, "b", True),
            ],
        ),
        (
            2,
            [
                ("take", 2, "a", True),
                ("take", 2, "b", True),
                ("take", 2, "c", False),
                ("give", 2, "b", None),
                ("take", 2, "c", True),
            ],
        ),
        (
            1,
            [
                ("take", 2, "a", True),  # a dies holding it ...
                ("take", 3, "b", False),  # ... and another model's cutover waits
                ("close", 2, "", None),  # until the cutover of g2 ended
                ("take", 3, "b", True),
                ("take", 2, "c", False),  # a closed generation gets none
                ("give", 2, "a", None),  # and giving one back for it changes nothing
                ("take", 3, "c", False),
            ],
        ),
        (
            2,
            [
                ("take", 2, "a", True),  # two models cut over at once ...
                ("take", 3, "a", True),  # ... and share the places
                ("take", 3, "b", False),
                ("give", 2, "a", None),
                ("take", 3, "b", True),
                ("take", 4, "c", False),  # never opened (a restarted coordinator's)
                ("open", 4, "", None),
                ("take", 4, "c", False),  # open, but both places are taken
            ],
        ),
    ],
    ids=["unlimited", "one-at-a-time", "two-at-a-time", "closing-frees-all", "across-models"],
)
def test_places(limit: int, steps: list[Step]) -> None:
    slots = PrepareSlots(limit)
    slots.open(2)
    slots.open(3)
    for action, generation, replica, expected in steps:
        if action == "take":
            assert slots.take(generation, replica) is expected, (action, generation, replica)
        elif action == "give":
            slots.give_back(generation, replica)
        elif action == "open":
            slots.open(generation)
        else:
            slots.close(generation)


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="0 \\(all at once\\) or more, got -1"):
        PrepareSlots(-1)
