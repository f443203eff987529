"""Version policies: which version of a model should be live. Pure functions of state.

`Latest` wants the newest eligible version but never moves backwards on its own: when the
newest eligible version is older than the live one (the live one was deleted, or turned
bad on disk), it wants no change. Going back is explicit, through a pin or a rollback.
`Pinned` wants one version, and no change while that version is not eligible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from hotweights.sources.repository_scan import VersionInfo

PinReason = Literal["pin", "rollback"]


@dataclass(frozen=True)
class Latest:
    """The newest eligible version (the default)."""

    name: Literal["latest"] = "latest"


@dataclass(frozen=True)
class Pinned:
    """One version, set by an operator (`pin`) or by a rollback."""

    version: int
    reason: PinReason = "pin"
    name: Literal["pinned"] = "pinned"


VersionPolicy = Latest | Pinned


def choose_target(
    policy: VersionPolicy, versions: Sequence[VersionInfo], live: int | None = None
) -> VersionInfo | None:
    """The version `policy` wants live among `versions` (any order), given the number of
    the live version from this model's repository (None when nothing from it is live).

    None means "no change": keep whatever is live. The result may be the live version.
    """
    eligible = [info for info in versions if info.eligible]
    if isinstance(policy, Pinned):
        return next((info for info in eligible if info.number == policy.version), None)
    if not eligible:
        return None
    newest = max(eligible, key=lambda info: info.number)
    if live is not None and newest.number < live:
        return None
    return newest


def previous_version(versions: Sequence[VersionInfo], before: int) -> VersionInfo | None:
    """The newest eligible version older than `before` (the rollback target)."""
    older = [info for info in versions if info.eligible and info.number < before]
    return max(older, key=lambda info: info.number, default=None)


def describe(policy: VersionPolicy) -> dict[str, object]:
    """A JSON-ready form for the admin API."""
    if isinstance(policy, Pinned):
        return {"policy": policy.name, "pin": policy.version, "reason": policy.reason}
    return {"policy": policy.name, "pin": None, "reason": None}
