from __future__ import annotations

from pathlib import Path

import pytest

from hotweights.sources import (
    Latest,
    Pinned,
    VersionInfo,
    VersionPolicy,
    VersionStatus,
    choose_target,
)
from hotweights.sources.version_policy import describe, previous_version

E, INC, S, B = (
    VersionStatus.ELIGIBLE,
    VersionStatus.INCOMPLETE,
    VersionStatus.SETTLING,
    VersionStatus.BAD,
)


def versions(*statuses: VersionStatus) -> list[VersionInfo]:
    """Versions 1, 2, ... with the given statuses."""
    return [VersionInfo("m", n, Path(f"/r/m/{n}"), status) for n, status in enumerate(statuses, 1)]


@pytest.mark.parametrize(
    ("policy", "statuses", "live", "expected"),
    [
        (Latest(), (), None, None),
        (Latest(), (E,), None, 1),
        (Latest(), (E, E, E), None, 3),
        (Latest(), (E, E, INC), None, 2),
        (Latest(), (E, S, B), None, 1),
        (Latest(), (INC, S, B), None, None),
        (Latest(), (E, E), 1, 2),
        (Latest(), (E, E), 2, 2),
        (Latest(), (E, E), 3, None),  # the live version 3 vanished: never move backwards
        (Latest(), (E, E, B), 3, None),  # the live version 3 turned bad on disk: no change
        (Pinned(1), (E, E, E), 3, 1),
        (Pinned(2), (E, INC, E), 3, None),  # pinned but not eligible: no change
        (Pinned(5), (E, E), 1, None),
        (Pinned(1, "rollback"), (E, E), 2, 1),
    ],
)
def test_choose_target(
    policy: VersionPolicy,
    statuses: tuple[VersionStatus, ...],
    live: int | None,
    expected: int | None,
) -> None:
    target = choose_target(policy, versions(*statuses), live)
    assert (target.number if target else None) == expected


@pytest.mark.parametrize(
    ("statuses", "before", "expected"),
    [
        ((E, E, E), 3, 2),
        ((E, INC, E), 3, 1),
        ((E, B, E), 3, 1),
        ((INC, E), 2, None),
        ((E, E), 1, None),
        ((E, E), 5, 2),
    ],
)
def test_previous_version(
    statuses: tuple[VersionStatus, ...], before: int, expected: int | None
) -> None:
    found = previous_version(versions(*statuses), before)
    assert (found.number if found else None) == expected


def test_describe() -> None:
    assert describe(Latest()) == {"policy": "latest", "pin": None, "reason": None}
    assert describe(Pinned(3, "rollback")) == {"policy": "pinned", "pin": 3, "reason": "rollback"}
