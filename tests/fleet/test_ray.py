"""The fleet on a real local Ray cluster (loopback, no dashboard): 2 replicas of a tiny
model, one cluster shared by the fleet's Ray tests (`conftest.py`), each test leaving it
serving."""

from __future__ import annotations

import time
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from tests.fleet import faults  # noqa: E402
from tests.fleet.cluster import CHAT, MODEL, Running, Traffic, live_everywhere  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.llm, pytest.mark.timeout(300)]


def test_a_publish_goes_live_on_every_replica_with_no_failed_request(running: Running) -> None:
    before = running.status()
    old = before["committed"]["generation"]
    with Traffic(running.fleet.url) as traffic:
        traffic.wait_for(10)
        version = running.publish(seed=2)
        status = running.wait(live_everywhere(old + 1))
        cutover = status["last_cutover"]
        committed_at = cutover["started_at"] + cutover["phases"]["prepare"]
        committed_at += cutover["phases"]["commit"]
        traffic.wait_for(10, after=committed_at)
    assert cutover["outcome"] == "committed"
    assert cutover["version"] == version
    assert status["models"][MODEL]["committed"] == status["committed"]
    assert set(cutover["replicas"]) == {r["replica"] for r in status["replicas"]}
    assert traffic.failed == []
    late_old = [a for a in traffic.answers if a.sent_at > committed_at and a.generation == old]
    assert late_old == []  # nothing admitted after the commit ran on the old generation
    assert {a.generation for a in traffic.answers} == {old, old + 1}
    served_by = {a.replica for a in traffic.answers if a.generation == old + 1}
    assert len(served_by) == 2  # both replicas answered on the new generation


def test_a_version_one_replica_cannot_load_aborts_and_nothing_changes(running: Running) -> None:
    before = running.status()
    live = before["committed"]
    with Traffic(running.fleet.url) as traffic:
        traffic.wait_for(6)
        version = running.publish(seed=3, fault=True)
        status = running.wait(
            lambda s: (
                s["last_cutover"] is not None
                and s["last_cutover"]["version"] == version
                and s["last_cutover"]["outcome"] == "aborted"
            )
        )
        started = time.time()
        traffic.wait_for(6, after=started)
    cutover = status["last_cutover"]
    assert "injected fault on replica" in cutover["error"]
    assert status["committed"] == live
    assert live_everywhere(live["generation"])(running.wait(live_everywhere(live["generation"])))
    assert traffic.failed == []
    assert {a.generation for a in traffic.answers} == {live["generation"]}
    marked = running.admin.post("/admin/reload").json()  # the bad version is not retried
    assert marked["outcome"] == "unchanged"


def test_rollback_goes_back_through_both_phases(running: Running) -> None:
    committed = running.status()["committed"]
    assert running.admin.get("/admin/status").json()["committed"] == committed  # `status`
    pinned = running.admin.post("/v1/chat/completions", json={**CHAT, "model": f"{MODEL}@g1"})
    assert pinned.status_code == 400
    assert "pins (model@N) are for one server" in pinned.json()["error"]["message"]
    answer = running.admin.post("/admin/rollback", json={"description": "a bad eval"})
    assert answer.status_code == 200, answer.text
    record = answer.json()
    assert record["outcome"] == "committed"
    assert record["description"] == "a bad eval"
    assert record["version"] < committed["version"]
    assert record["generation"] > committed["generation"]
    running.wait(live_everywhere(record["generation"]))
    other = running.admin.post("/admin/reload", json={"model": "other"})
    assert other.status_code == 404, other.text
    assert "this fleet serves 'tiny', not 'other'" in other.json()["error"]["message"]
    refused = running.admin.post("/admin/reload", json={"path": str(running.repo / MODEL / "1")})
    assert refused.status_code == 400
    assert "not a path" in refused.json()["error"]["message"]
    again = running.admin.post("/admin/reload")  # unpinned: the latest good version again
    assert again.status_code == 200, again.text
    assert again.json()["version"] == committed["version"]


def test_a_killed_replica_comes_back_on_the_committed_version(running: Running) -> None:
    status = running.status()
    generation = status["committed"]["generation"]
    victim = status["replicas"][0]["replica"]
    with Traffic(running.fleet.url) as traffic:
        traffic.wait_for(6)
        ray.kill(_replica_actor(victim), no_restart=True)
        killed_at = time.time()
        status = running.wait(
            lambda s: (
                live_everywhere(generation)(s)
                and victim not in {r["replica"] for r in s["replicas"]}
            )
        )
        recovered_at = time.time()
        traffic.wait_for(10, after=recovered_at)
    newcomer = ({r["replica"] for r in status["replicas"]} - {victim}).pop()
    assert newcomer
    assert all(a.sent_at < killed_at + 30 for a in traffic.failed)
    assert [a for a in traffic.failed if a.sent_at > recovered_at] == []
    assert all(a.generation == generation for a in traffic.answers if a.status == 200)


def test_a_replica_that_dies_in_prepare_aborts_the_cutover(running: Running) -> None:
    import os
    import signal

    before = running.status()
    live = before["committed"]
    with Traffic(running.fleet.url) as traffic:
        traffic.wait_for(6)
        version = running.publish(seed=4, hold=True)
        preparing = running.wait(lambda s: s["preparing"] is not None)
        assert preparing["preparing"]["version"] == version
        victim = preparing["replicas"][0]
        os.kill(int(victim["pid"]), signal.SIGKILL)
        # The coordinator decides once every replica answered: let the survivor load.
        faults.released(running.repo / MODEL / str(version)).touch()
        status = running.wait(lambda s: s["last_cutover"]["outcome"] == "aborted")
        status = running.wait(
            lambda s: (
                live_everywhere(live["generation"])(s)
                and victim["replica"] not in {r["replica"] for r in s["replicas"]}
            )
        )
        traffic.wait_for(6, after=time.time())
    cutover = status["last_cutover"]
    assert cutover["version"] == version
    assert "a replica failed" in cutover["error"]
    assert status["committed"] == live
    held = [v for r in status["replicas"] for v in r["resident"] if v["state"] == "held"]
    assert held == []  # the replacement did not keep the aborted version either
    assert all(a.status == 200 for a in traffic.answers if a.sent_at > time.time() - 5)
    assert {a.generation for a in traffic.answers if a.status == 200} == {live["generation"]}


def _replica_actor(replica_id: str) -> Any:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].endswith(f"#{replica_id}"):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise AssertionError(f"no actor for replica {replica_id}")


def test_the_http_endpoint_listens_on_loopback_only(running: Running) -> None:
    import psutil

    port = int(running.fleet.url.rsplit(":", 1)[1])
    listening = [
        c.laddr[0]
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr[1] == port
    ]
    assert listening == ["127.0.0.1"]
