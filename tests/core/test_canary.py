"""The canary inside the core: its share of admissions, the monitor's judgement, promotion,
rollback (automatic and by an operator), and leases that began on the canary."""

from __future__ import annotations

import threading

import pytest

from hotweights.core import Notice, Outcome, Reloader, VersionChanged, VersionState
from hotweights.core.canary import CanaryMonitor, CanaryPolicy
from hotweights.errors import NoCanary
from tests.core.conftest import MakeReloader
from tests.fakes import FakeLoader, FakeModel


def _baking(reloader: Reloader[FakeModel]) -> threading.Event:
    """Set when a version becomes a canary (an observer, not a sleep)."""
    started = threading.Event()

    def observe(notice: Notice) -> None:
        if isinstance(notice, VersionChanged) and notice.new is VersionState.CANARY:
            started.set()

    reloader.subscribe(observe)
    return started


def _start_canary(
    make_reloader: MakeReloader, policy: CanaryPolicy
) -> tuple[Reloader[FakeModel], object]:
    reloader = make_reloader(canary=policy)
    assert reloader.reload("/m/1").outcome is Outcome.LIVE  # nothing live: no bake
    started = _baking(reloader)
    ticket = reloader.submit("/m/2")
    assert started.wait(10)
    return reloader, ticket


@pytest.mark.parametrize(("share", "canaries"), [(0.1, 100), (0.25, 250), (0.5, 500)])
def test_the_canary_takes_exactly_its_share_spread_evenly(
    make_reloader: MakeReloader, share: float, canaries: int
) -> None:
    reloader, ticket = _start_canary(make_reloader, CanaryPolicy(share, bake_seconds=600))
    picks = []
    for _ in range(1000):
        with reloader.slot.acquire() as lease:
            picks.append(lease.model())
    assert picks.count("/m/2") == canaries
    gaps = {
        b - a for a, b in zip(*[[i for i, p in enumerate(picks) if p == "/m/2"]] * 2, strict=False)
    }
    assert len(gaps) <= 2  # evenly spread, not bunched
    for _ in range(100):  # the stable path never sees the canary
        with reloader.slot.acquire(stable=True) as lease:
            assert lease.model() == "/m/1"
    pinned = reloader.acquire_resident(lambda v: v.generation == 2)
    assert pinned is not None
    assert pinned.model() == "/m/2"  # model@g2 reaches the canary
    pinned.release()
    reloader.promote()
    assert ticket.wait(10).outcome is Outcome.LIVE  # type: ignore[attr-defined]


def test_a_canary_failing_a_fifth_of_its_requests_is_rolled_back_and_unloaded(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    policy = CanaryPolicy(0.5, bake_seconds=600, max_error_rate=0.05, min_requests=10)
    reloader, ticket = _start_canary(make_reloader, policy)
    canary_requests = 0
    while canary_requests < 10:
        with reloader.slot.acquire() as lease:
            on_canary = lease.version.state is VersionState.CANARY
            lease.model()
            if on_canary:
                canary_requests += 1
            failed = on_canary and canary_requests % 5 == 0  # 20% injected failures
            reloader.record(lease.generation, ok=not failed, seconds=0.01, tokens=4)
    # Judged at its tenth request, its minimum (else this waits out a 600 s bake).
    event = ticket.wait(10)  # type: ignore[attr-defined]
    assert event.outcome is Outcome.CANARY_FAILED
    assert event.canary["canary"]["requests"] == 10
    assert "error rate 0.200 on g2" in (event.error_message or "")
    assert event.canary["decision"] == "rolled back"
    assert event.canary["canary"]["errors"] == 2
    assert event.canary["stable"]["errors"] == 0
    assert "bake" in event.phases
    assert reloader.wait_drained(10)
    canary_model = next(m for m in loader.models if m.source == "/m/2")
    assert canary_model.unloaded
    live = reloader.live_version
    assert live is not None
    assert (live.source, live.generation) == ("/m/1", 1)
    assert reloader.last_live() is live  # the rolled-back canary is no rollback target
    with reloader.slot.acquire() as lease:
        assert lease.model() == "/m/1"


def test_a_healthy_canary_is_promoted_when_its_bake_ends(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    policy = CanaryPolicy(0.5, bake_seconds=0.2, min_requests=1)
    reloader, ticket = _start_canary(make_reloader, policy)
    for _ in range(10):
        with reloader.slot.acquire() as lease:
            lease.model()
            reloader.record(lease.generation, ok=True, seconds=0.01, tokens=4)
    event = ticket.wait(30)  # type: ignore[attr-defined]
    assert event.outcome is Outcome.LIVE
    assert event.new_generation == 2
    assert event.canary["decision"] == "promoted"
    assert event.canary["canary"]["requests"] == 5
    assert reloader.wait_drained(10)
    assert next(m for m in loader.models if m.source == "/m/1").unloaded
    with reloader.slot.acquire() as lease:
        assert lease.model() == "/m/2"


@pytest.mark.parametrize("promote", [True, False])
def test_a_request_that_began_on_the_canary_finishes_on_it(
    make_reloader: MakeReloader, loader: FakeLoader, promote: bool
) -> None:
    reloader, ticket = _start_canary(make_reloader, CanaryPolicy(0.5, bake_seconds=600))
    with reloader.slot.acquire() as first:
        first.model()
    held = reloader.slot.acquire()  # every second admission is the canary's
    assert held.model() == "/m/2"
    if promote:
        assert reloader.promote().wait(10).outcome is Outcome.LIVE
    else:
        assert reloader.rollback().wait(10).outcome is Outcome.CANARY_FAILED
    assert held.model() == "/m/2"  # still on the canary, whatever was decided
    if not promote:
        assert not reloader.wait_drained(0.05)  # the canary waits for its last lease
        assert not next(m for m in loader.models if m.source == "/m/2").unloaded
    held.release()
    assert reloader.wait_drained(10)
    assert ticket.wait(10).outcome is (Outcome.LIVE if promote else Outcome.CANARY_FAILED)  # type: ignore[attr-defined]


def test_promote_without_a_canary_is_refused_and_closing_ends_a_bake(
    make_reloader: MakeReloader,
) -> None:
    reloader = make_reloader(canary=CanaryPolicy(0.1, bake_seconds=600))
    with pytest.raises(NoCanary):
        reloader.promote()
    reloader.reload("/m/1")
    started = _baking(reloader)
    ticket = reloader.submit("/m/2")
    assert started.wait(10)
    reloader.close(timeout=10)
    assert ticket.wait(10).outcome is Outcome.CANARY_FAILED
    assert "closing" in (ticket.wait(0).error_message or "")


def test_a_canary_needs_the_availability_policy(make_reloader: MakeReloader) -> None:
    with pytest.raises(ValueError, match="availability"):
        make_reloader(canary=CanaryPolicy(0.1), policy="resource")


@pytest.mark.parametrize(
    ("canary", "stable", "breach"),
    [
        # (errors, requests, seconds) on each side; the monitor's verdict
        ((1, 20, 0.1), (0, 100, 0.1), None),  # 5% over 0%: at the limit, not over
        ((2, 20, 0.1), (0, 100, 0.1), "error rate 0.100"),
        ((2, 19, 0.1), (0, 100, 0.1), None),  # too few canary requests yet
        ((10, 100, 0.1), (6, 100, 0.1), None),  # both fail: the canary is no worse
        ((0, 20, 0.5), (0, 100, 0.1), "p99 latency 0.5"),
        ((0, 20, 0.08), (0, 100, 0.035), None),  # 2.3x, but within the 50 ms slack
        ((0, 20, 0.5), (0, 10, 0.1), None),  # too few stable requests to compare
    ],
)
def test_the_monitor_judges_error_rate_and_latency_by_table(
    canary: tuple[int, int, float], stable: tuple[int, int, float], breach: str | None
) -> None:
    reasons: list[str] = []
    monitor = CanaryMonitor(CanaryPolicy(0.1, min_requests=20), 1, 2, reasons.append)
    for generation, (errors, requests, seconds) in ((1, stable), (2, canary)):
        for i in range(requests):
            monitor.record(generation, i < requests - errors, seconds, 10)
    monitor.record(7, False, 1.0, 1)  # another generation: ignored
    if breach is None:
        assert reasons == []
    else:
        assert len(reasons) == 1
        assert reasons[0].startswith(breach)


def test_a_given_generation_must_be_ahead(make_reloader: MakeReloader) -> None:
    reloader = make_reloader()
    assert reloader.reload("/m/1", generation=3).new_generation == 3
    with pytest.raises(ValueError, match="generation 3 is not after generation 3"):
        reloader.submit("/m/2", generation=3)
    assert reloader.reload("/m/2").new_generation == 4  # without one: the next
