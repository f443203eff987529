"""Preparing the models that follow a base model on its new version (see `followers.py`):
the one loop every `Followers` runs, whatever decides which models follow.

A follower is its model's live version read here and prepared again on the new base, in
that model's own queue, so it races that model's reloads:

- a reload already running goes live first, and the follower then re-prepares the
  version it replaced: the follower records which version it was read from
  (`PreparedVersion.replaces`), and the commit refuses the base (discarding it and its
  followers, naming the adapter) rather than take the adapter back to that version;
- a reload queued behind the running job is superseded by the follow (its caller is
  told `superseded` and may ask again);
- a reload put while the follow waits in the queue supersedes the follow, and the base
  is refused (`FollowFailed`, naming the adapter).

Each way the newest request for the adapter is never silently undone; the base reload
that lost the race says so, and a new one follows the adapter's version of the time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hotweights.core.events import Outcome
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
    name (its next one where it gives none); returns their prepared versions, each
    recording the live version it was prepared from (`replaces`). Raises
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
            if isinstance(result, PreparedVersion):
                result.replaces = live
                prepared.append(result)
                continue
            reason = result.error_message or result.outcome.value
            if result.outcome is Outcome.SUPERSEDED:
                raise FollowFailed(
                    f"adapter {reloader.name} changed version while {base.model} "
                    f"g{base.generation} was prepared ({reason}); reload {base.model} again"
                )
            raise FollowFailed(
                f"adapter {reloader.name} (from {live.source}) does not fit {base.model} "
                f"g{base.generation}: {reason}"
            )
    except BaseException:
        for handle in prepared:
            handle.claim(Decision.DISCARD, f"{base.model} g{base.generation} was refused")
        raise
    return tuple(prepared)
