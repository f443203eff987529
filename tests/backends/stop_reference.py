"""What a stream cut at stop strings should say, computed the slow and obvious way."""

from __future__ import annotations

from collections.abc import Sequence


def first_stop_reference(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the first stop string to complete, reading one character at a time."""
    for end in range(1, len(text) + 1):
        starts = [end - len(stop) for stop in stops if text[:end].endswith(stop)]
        if starts:
            return text[: min(starts)], True
    return text, False
