"""The gate inside the reloader: a refused version never goes live, under either policy."""

from __future__ import annotations

import threading

import pytest

from hotweights.core import Outcome, VersionState
from hotweights.core.swap_policy import SwapPolicy
from hotweights.errors import ValidationError
from tests.core.conftest import MakeReloader
from tests.fakes import FakeLoader, ScriptedGate


@pytest.mark.parametrize("policy", ["availability", "resource"])
def test_a_refused_version_never_goes_live_and_is_unloaded(
    make_reloader: MakeReloader, loader: FakeLoader, policy: SwapPolicy
) -> None:
    gate = ScriptedGate(refuse={"/m/bad"})
    reloader = make_reloader(gate=gate, policy=policy)
    assert reloader.reload("/m/1").outcome is Outcome.LIVE
    event = reloader.reload("/m/bad")
    assert event.outcome is Outcome.GATED
    assert event.new_generation is None
    assert event.error_type == "GateRefused"
    assert "prompt 1 (exact) FAILED" in (event.error_message or "")
    assert [check.passed for check in event.gate] == [False]
    assert event.gate[0].value == "/m/bad"  # the candidate was run before it was judged
    assert "gate" in event.phases
    bad = [model for model in loader.models if model.source == "/m/bad"]
    assert len(bad) == 1
    assert bad[0].unloaded
    # The live version's baseline was measured while it was still loaded.
    assert gate.baselines[-1] == ("/m/1", False)
    live = reloader.live_version
    assert live is not None
    assert live.source == "/m/1"
    if policy == "availability":  # nothing that served changed
        assert live.generation == 1
        assert reloader.generation == 1
    else:  # resource had unloaded it to make room: it comes back as a new generation
        assert live.generation == 2
        assert reloader.log.recent(1)[0].outcome is Outcome.ROLLED_BACK
    with reloader.slot.acquire() as lease:
        assert lease.model() == "/m/1"


def test_a_passing_verdict_is_recorded_on_the_live_event(
    make_reloader: MakeReloader,
) -> None:
    gate = ScriptedGate()
    reloader = make_reloader(gate=gate)
    first = reloader.reload("/m/1")
    assert first.outcome is Outcome.LIVE
    assert gate.baselines == [(None, False)]  # nothing live to compare the first with
    second = reloader.reload("/m/2")
    assert second.outcome is Outcome.LIVE
    assert second.new_generation == 2
    assert [check.passed for check in second.gate] == [True]
    assert second.to_dict()["gate"] == [
        {
            "name": "prompt 1 (exact)",
            "passed": True,
            "value": "/m/2",
            "threshold": "good",
            "detail": "",
        }
    ]
    assert gate.baselines[-1] == ("/m/1", False)


def test_a_gate_that_raises_fails_the_reload_in_its_phase(
    make_reloader: MakeReloader, loader: FakeLoader
) -> None:
    gate = ScriptedGate(errors={"/m/2": ValidationError("the eval text is empty")})
    reloader = make_reloader(gate=gate)
    reloader.reload("/m/1")
    event = reloader.reload("/m/2")
    assert event.outcome is Outcome.FAILED
    assert event.error_message == "gate: the eval text is empty"
    assert all(model.unloaded for model in loader.models if model.source == "/m/2")
    assert reloader.generation == 1


def test_rollbacks_skip_the_gate(make_reloader: MakeReloader) -> None:
    gate = ScriptedGate()
    reloader = make_reloader(gate=gate)
    reloader.reload("/m/1")
    reloader.reload("/m/2")
    gate.refuse.add("/m/1")  # the gate would refuse it now: a rollback is the way back
    event = reloader.rollback().wait(10)
    assert event.outcome is Outcome.ROLLED_BACK
    assert gate.judged == ["/m/1", "/m/2"]


def test_requests_keep_the_live_version_while_the_gate_judges(
    make_reloader: MakeReloader,
) -> None:
    gate = ScriptedGate()
    reloader = make_reloader(gate=gate)
    reloader.reload("/m/1")
    gate.hold = hold = threading.Event()
    gate.judging.clear()
    ticket = reloader.submit("/m/2")
    assert gate.judging.wait(10)
    versions = []
    for _ in range(100):  # admission never waits on a gate
        with reloader.slot.acquire(timeout=0) as lease:
            versions.append(lease.model())
    assert set(versions) == {"/m/1"}
    running = reloader.status().reloading
    assert running is not None
    assert running.to_dict() == {
        "id": ticket.id,
        "target": "/m/2",
        "trigger": "api",
        "phase": "gate",
    }
    candidate = [v for v in reloader.resident() if v.source == "/m/2"]
    assert candidate == []  # judged, not resident: nothing can lease it yet
    hold.set()
    assert ticket.wait(10).outcome is Outcome.LIVE
    live = reloader.live_version
    assert live is not None
    assert live.state is VersionState.LIVE
    assert live.source == "/m/2"
