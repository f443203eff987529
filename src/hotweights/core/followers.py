"""Versions of other models that must go live together with a model's new version.

A LoRA adapter's version is bound to one version of its base model (it holds a lease on
it). When the base gets a new version, each adapter serving on the old one is prepared
again on the new one, beside the old pair, and the base and its adapters are committed in
one step: no request ever pairs the new base with an adapter prepared on the old one, and
no adapter is left on a base that drains away under it. The base's reloader asks its
`Followers` for those versions once its own is prepared; the prepared base carries them
(`PreparedVersion.followers`), and whoever commits or discards the base commits or
discards them with it (a reload, a canary's promotion or rollback, a fleet's cutover).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from hotweights.core.prepared import PreparedVersion


class Followers(Protocol):
    """What a base model's reloader asks for the models that follow it (its adapters)."""

    def prepare_on(
        self, base: PreparedVersion[Any], generations: Mapping[str, int]
    ) -> tuple[PreparedVersion[Any], ...]:
        """Prepare a new version of every follower on `base` (prepared, not committed),
        and return them; `generations` numbers those it names (a fleet's numbers), the
        others take their next. Called on the base reloader's worker thread; blocks
        until each is prepared. Raises `FollowFailed` naming the follower that could not
        be prepared, after discarding those that were."""
        ...
