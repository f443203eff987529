"""History and reload-log bounds and ordering, as property tests."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hotweights.core import ModelVersion, Outcome, ReloadEvent, ReloadLog, VersionHistory
from hotweights.core.version import VersionState


def _validating(source: str) -> ModelVersion:
    version = ModelVersion(source)
    version.transition(VersionState.VALIDATING)
    return version


@given(max_history=st.integers(1, 10), n=st.integers(0, 40))
def test_history_is_bounded_and_most_recent_first(max_history: int, n: int) -> None:
    coordinator = VersionHistory(max_history)
    for i in range(n):
        assert coordinator.number(_validating(f"/m/{i}")) == i + 1
    history = coordinator.history()
    assert len(history) == min(n, max_history) == coordinator.retained
    assert [v.generation for v in history] == list(range(n, n - len(history), -1))
    assert coordinator.generation == coordinator.total_live == n
    current = coordinator.current_version()
    assert (current.generation if current else 0) == n


@given(
    max_events=st.integers(1, 12),
    outcomes=st.lists(st.sampled_from(list(Outcome)), max_size=50),
)
def test_log_is_bounded_and_counts_everything(max_events: int, outcomes: list[Outcome]) -> None:
    log = ReloadLog(max_events)
    for i, outcome in enumerate(outcomes):
        log.record(
            ReloadEvent(id=i, trigger="api", target=f"/m/{i}", outcome=outcome, old_generation=0)
        )
    recent = log.recent()
    assert len(recent) == len(log) == min(len(outcomes), max_events)
    assert [e.id for e in recent] == list(
        range(len(outcomes) - 1, len(outcomes) - 1 - len(recent), -1)
    )
    assert log.recent(2) == recent[:2]
    summary = log.summary()
    assert summary["total"] == len(outcomes)
    by_outcome = summary["by_outcome"]
    assert isinstance(by_outcome, dict)
    for outcome in Outcome:
        assert by_outcome[outcome.value] == outcomes.count(outcome)


def test_replace_updates_a_retained_event_only() -> None:
    log = ReloadLog(2)
    first = ReloadEvent(id=1, trigger="api", target="a", outcome=Outcome.LIVE, old_generation=0)
    log.record(first)
    assert log.replace(first.with_phase("drain", 0.5))
    updated = log.get(1)
    assert updated is not None
    assert updated.phases == {"drain": 0.5}
    for i in (2, 3):
        log.record(
            ReloadEvent(id=i, trigger="api", target="b", outcome=Outcome.LIVE, old_generation=0)
        )
    assert not log.replace(first.with_phase("drain", 1.0))
    assert log.get(1) is None


def test_rollback_target_skips_the_current_source() -> None:
    coordinator = VersionHistory()
    assert coordinator.rollback_target() is None
    for source in ("/m/1", "/m/2", "/m/2"):
        coordinator.number(_validating(source))
    target = coordinator.rollback_target()
    assert target is not None
    assert target.source == "/m/1"
