"""Preparing the models that follow a base model on its new version (see `followers.py`):
the one loop every `Followers` runs, whatever decides which models follow."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hotweights.core.prepared import Decision, PreparedVersion
from hotweights.core.reloader import Reloader
from hotweights.errors import FollowFailed

FOLLOW_SECONDS = 600.0
"""How long a base's new version waits for one follower to be prepared on it."""
FOLLOW_HOLD = 86_400.0
"""How long a prepared follower waits for its base's decision: as long as the base may
(a canary's bake), since the base's discard discards it too."""


def prepare_followers(
    base: PreparedVersion[Any],
    followers: Sequence[Reloader[Any]],
    generations: Mapping[str, int] | None = None,
    *,
    timeout: float = FOLLOW_SECONDS,
) -> tuple[PreparedVersion[Any], ...]:
    """Prepare the live source of each of `followers` again, on `base` (trigger `follow`,
    no gate: it served), one after the other, as the generation `generations` gives its
    name (its next one where it gives none); returns their prepared versions. Raises
    `FollowFailed` naming the first that could not be prepared (or took over `timeout`
    seconds), after discarding those that were."""
    prepared: list[PreparedVersion[Any]] = []
    try:
        for reloader in followers:
            live = reloader.live_version
            if live is None:
                continue
            ticket = reloader.prepare(
                live.source,
                trigger="follow",
                description=f"{reloader.name} on {base.model} g{base.generation}",
                base_generation=base.generation,
                generation=(generations or {}).get(reloader.name),
                hold_seconds=FOLLOW_HOLD,
            )
            try:
                result = ticket.wait(timeout)
            except TimeoutError:
                raise FollowFailed(
                    f"adapter {reloader.name} was not prepared on {base.model} "
                    f"g{base.generation} within {timeout:g} s"
                ) from None
            if not isinstance(result, PreparedVersion):
                reason = result.error_message or result.outcome.value
                raise FollowFailed(
                    f"adapter {reloader.name} (from {live.source}) does not fit {base.model} "
                    f"g{base.generation}: {reason}"
                )
            prepared.append(result)
    except BaseException:
        for handle in prepared:
            handle.claim(Decision.DISCARD, f"{base.model} g{base.generation} was refused")
        raise
    return tuple(prepared)
