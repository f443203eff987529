"""The fleet's coordinator and ingress killed on a real local Ray cluster, under traffic.

Ray restarts the coordinator, which carries on from the fleet's record: idle, it follows
the repository again; killed in prepare, the cutover is aborted (its generation never
answers) and the version prepared again; killed after the commit, the cutover is
finished. None of it fails a request. The ingress is the one process requests pass
through: killing it fails the requests in flight on it, and nothing sent once Serve has
restarted it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from hotweights.fleet.ledger import LEDGER_NAME, FleetLedger, Phase  # noqa: E402
from tests.fleet import faults  # noqa: E402
from tests.fleet.cluster import MODEL, Running, Traffic, live_everywhere  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.llm, pytest.mark.timeout(300)]
DEADLINE_S = 90.0


def restarted(before: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """The coordinator of `before` has been replaced by Ray."""
    restarts = before["coordinator"]["restarts"]
    return lambda s: s["coordinator"]["restarts"] > restarts


def live_on(version: int) -> Callable[[dict[str, Any]], bool]:
    """`version` is committed and live, alone, on every replica."""

    def check(status: dict[str, Any]) -> bool:
        committed = status["committed"]
        return committed["version"] == version and live_everywhere(committed["generation"])(status)

    return check


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def test_killed_while_idle_it_keeps_its_bad_marks_and_a_publish_goes_live(
    running: Running,
) -> None:
    with Traffic(running.fleet.url) as traffic:
        traffic.wait_for(6)
        bad = running.publish(seed=11, fault=True)
        before = running.wait(lambda s: str(bad) in s["bad"])
        os.kill(before["coordinator"]["pid"], signal.SIGKILL)
        after = running.wait(restarted(before))
        assert after["coordinator"]["pid"] != before["coordinator"]["pid"]
        assert after["committed"] == before["committed"]
        assert after["bad"] == before["bad"]  # the aborted version stays bad
        killed_at = time.monotonic()
        version = running.publish(seed=12)
        status = running.wait(live_on(version))
        live_again_s = time.monotonic() - killed_at
        traffic.wait_for(6, after=time.time())
    assert status["last_cutover"]["outcome"] == "committed"
    assert traffic.failed == []
    print(f"killed idle: a publish went live {live_again_s:.2f} s after the restart was seen")


def test_killed_in_prepare_the_cutover_aborts_and_the_version_goes_live_after(
    running: Running,
) -> None:
    with Traffic(running.fleet.url) as traffic:
        traffic.wait_for(6)
        version = running.publish(seed=13, hold=True)
        before = running.wait(lambda s: s["preparing"] is not None)
        interrupted = before["preparing"]["generation"]
        os.kill(before["coordinator"]["pid"], signal.SIGKILL)
        running.wait(restarted(before))
        faults.released(running.repo / MODEL / str(version)).touch()
        status = running.wait(live_on(version))
        traffic.wait_for(6, after=time.time())
    outcomes = {c["generation"]: (c["outcome"], c["trigger"]) for c in status["cutovers"]}
    assert outcomes[interrupted] == ("aborted", "restart")
    assert status["committed"]["generation"] > interrupted
    assert str(version) not in status["bad"]  # a first interruption is not its fault
    assert traffic.failed == []
    assert [a for a in traffic.answers if a.generation == interrupted] == []


def test_killed_after_the_commit_the_cutover_is_finished(running: Running) -> None:
    """The ingress is frozen (SIGSTOP) across the commit, so the coordinator is caught
    with the commit on disk and the flip not answered; it is killed there. The clients
    let their requests come back before the freeze and go on sending during it (a
    replica streaming to a frozen ingress stalls, prepare included)."""
    ledger = FleetLedger(running.repo / LEDGER_NAME)
    with Traffic(running.fleet.url) as traffic:
        traffic.wait_for(6)
        old = running.status()["committed"]["generation"]
        version = running.publish(seed=14, hold=True)
        before = running.wait(lambda s: s["preparing"] is not None)
        generation = before["preparing"]["generation"]
        ingress = before["ingress"]["pid"]
        traffic.pause()
        os.kill(ingress, signal.SIGSTOP)
        traffic.resume()
        try:
            faults.released(running.repo / MODEL / str(version)).touch()

            def committed() -> bool:
                pending = ledger.load().models[MODEL].pending
                return pending is not None and pending.phase is Phase.COMMITTED

            until(committed, f"g{generation} committed on disk")
            os.kill(before["coordinator"]["pid"], signal.SIGKILL)
        finally:
            os.kill(ingress, signal.SIGCONT)
        status = running.wait(lambda s: restarted(before)(s) and live_on(version)(s))
        traffic.wait_for(6, after=time.time())
    finished = [c for c in status["cutovers"] if c["generation"] == generation]
    assert [(c["outcome"], c["trigger"], c["error"]) for c in finished] == [
        ("committed", "restart", None)
    ]
    assert status["committed"]["generation"] == generation
    assert ledger.load().models[MODEL].pending is None
    assert traffic.failed == []
    assert {a.generation for a in traffic.answers} <= {old, generation}


def test_an_ingress_killed_in_a_cutover_fails_only_what_it_held(running: Running) -> None:
    with Traffic(running.fleet.url) as traffic:
        traffic.wait_for(6)
        version = running.publish(seed=15, hold=True)
        before = running.wait(lambda s: s["preparing"] is not None)
        generation = before["preparing"]["generation"]
        ingress = before["ingress"]["pid"]
        os.kill(ingress, signal.SIGKILL)
        killed_at = time.time()
        faults.released(running.repo / MODEL / str(version)).touch()

        def back() -> bool:
            status = running.answers()
            return status is not None and status["ingress"].get("pid") not in (None, ingress)

        until(back, "Serve restarted the ingress")
        back_at = time.time()
        status = running.wait(
            lambda s: (
                s["last_cutover"]["generation"] == generation
                and s["last_cutover"]["outcome"] in ("committed", "aborted")
                and live_everywhere(s["committed"]["generation"])(s)
            )
        )
        traffic.wait_for(10, after=back_at)
    failed = traffic.failed
    assert [a for a in failed if a.sent_at > back_at] == []
    assert all(a.sent_at < back_at for a in failed)
    outcome = status["last_cutover"]["outcome"]
    if outcome == "committed":
        assert status["committed"]["version"] == version
    held = sum(a.sent_at <= killed_at < a.ended_at for a in traffic.answers)
    down = sum(killed_at < a.sent_at < back_at for a in traffic.answers)
    print(
        f"ingress killed: {len(failed)} failed; {held} were in flight at the kill and {down} "
        f"sent until it was back {back_at - killed_at:.2f} s later; the cutover {outcome}"
    )
