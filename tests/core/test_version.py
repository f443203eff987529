from __future__ import annotations

import itertools
import time

import pytest

from hotweights.core import LEGAL_TRANSITIONS, ModelVersion, VersionState
from hotweights.errors import IllegalTransition

S = VersionState
LEGAL = {
    (S.LOADING, S.VALIDATING),
    (S.LOADING, S.FAILED),
    (S.VALIDATING, S.PREPARED),
    (S.VALIDATING, S.FAILED),
    (S.PREPARED, S.LIVE),
    (S.PREPARED, S.CANARY),
    (S.PREPARED, S.DRAINING),
    (S.CANARY, S.LIVE),
    (S.CANARY, S.DRAINING),
    (S.LIVE, S.DRAINING),
    (S.DRAINING, S.RETIRED),
}


def _at(state: VersionState) -> ModelVersion:
    path = {
        S.LOADING: [],
        S.VALIDATING: [S.VALIDATING],
        S.PREPARED: [S.VALIDATING, S.PREPARED],
        S.LIVE: [S.VALIDATING, S.PREPARED, S.LIVE],
        S.CANARY: [S.VALIDATING, S.PREPARED, S.CANARY],
        S.DRAINING: [S.VALIDATING, S.PREPARED, S.LIVE, S.DRAINING],
        S.RETIRED: [S.VALIDATING, S.PREPARED, S.LIVE, S.DRAINING, S.RETIRED],
        S.FAILED: [S.FAILED],
    }[state]
    version = ModelVersion("/m/1")
    for step in path:
        version.transition(step)
    return version


@pytest.mark.parametrize(("old", "new"), list(itertools.product(S, S)))
def test_transition_table(old: VersionState, new: VersionState) -> None:
    version = _at(old)
    if (old, new) in LEGAL:
        assert version.transition(new) is old
        assert version.state is new
    else:
        with pytest.raises(IllegalTransition, match=f"{old.value} to {new.value}"):
            version.transition(new)
        assert version.state is old


def test_table_matches_the_published_edges() -> None:
    published = {(a, b) for a, targets in LEGAL_TRANSITIONS.items() for b in targets}
    assert published == LEGAL


def test_live_stamps_times_and_fingerprint() -> None:
    version = _at(S.VALIDATING)
    assert version.age == 0.0
    version.generation = 3
    version.fingerprint = "1a2b3c4d5e6f"
    wall, before = time.time(), time.monotonic()
    version.transition(S.PREPARED)  # reachable by a pin from here: its age starts
    version.transition(S.LIVE)
    after = time.monotonic()
    assert version.loaded_at is not None
    assert wall <= version.loaded_at <= time.time()
    went_live = version.loaded_at_monotonic
    assert went_live is not None
    assert before <= went_live <= after
    asked = time.monotonic()
    age = version.age
    assert asked - went_live <= age <= time.monotonic() - went_live  # counted from being prepared
    assert version.system_fingerprint == "hw-g3-1a2b3c4d"
    assert version.to_dict()["state"] == "live"
