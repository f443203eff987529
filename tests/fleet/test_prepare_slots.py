"""`--prepare-parallel`'s places, as a table of asks and answers."""

from __future__ import annotations

import pytest

from hotweights.fleet.prepare_slots import PrepareSlots

Step = tuple[str, int, str, bool | None]
"""(take or give, generation, replica, what `take` answers; None for a give)."""


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
                ("take", 3, "b", True),  # ... the next cutover starts with every place free
                ("take", 2, "c", False),  # an older generation gets none
                ("give", 2, "a", None),  # and giving one back for it changes nothing
                ("take", 3, "c", False),
            ],
        ),
    ],
    ids=["unlimited", "one-at-a-time", "two-at-a-time", "a-new-generation-frees-all"],
)
def test_places(limit: int, steps: list[Step]) -> None:
    slots = PrepareSlots(limit)
    for action, generation, replica, expected in steps:
        if action == "take":
            assert slots.take(generation, replica) is expected, (action, generation, replica)
        else:
            slots.give_back(generation, replica)


def test_a_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="0 \\(all at once\\) or more, got -1"):
        PrepareSlots(-1)
