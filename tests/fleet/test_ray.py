"""The fleet on a real local Ray cluster (loopback, no dashboard): 2 replicas of a tiny
model, one cluster shared by every test of this module, each test leaving it serving."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

ray = pytest.importorskip("ray")

from hotweights.config import Config  # noqa: E402
from hotweights.demo.tinylm import save_tiny_model  # noqa: E402
from hotweights.fleet import deployment  # noqa: E402
from hotweights.fleet.settings import FleetSettings  # noqa: E402
from hotweights.sources import publish  # noqa: E402
from hotweights.testing import free_port  # noqa: E402
from tests.fleet import faults  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.llm, pytest.mark.timeout(300)]
MODEL = "tiny"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}


@dataclass
class Answer:
    sent_at: float
    status: int
    generation: int | None
    replica: str | None = None
    error: str | None = None


@dataclass
class Traffic:
    """Clients sending chat completions (every other one streamed) until stopped."""

    url: str
    clients: int = 3
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Traffic:
        for index in range(self.clients):
            thread = threading.Thread(target=self._client, args=(index,), daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def wait_for(self, count: int, after: float = 0.0, timeout: float = 60.0) -> None:
        """Until `count` answers to requests sent after `after` (wall clock) came back."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if sum(a.sent_at > after for a in self.answers) >= count:
                    return
            self._stop.wait(0.05)
        raise AssertionError(f"fewer than {count} answers after {after} in {timeout} s")

    @property
    def failed(self) -> list[Answer]:
        with self._lock:
            return [a for a in self.answers if a.status != 200 or a.error is not None]

    def _client(self, index: int) -> None:
        stream = index % 2 == 1
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self._stop.is_set():
                self._record(self._ask(client, stream))
                stream = not stream

    def _ask(self, client: httpx.Client, stream: bool) -> Answer:
        sent_at = time.time()
        try:
            response = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        except httpx.HTTPError as exc:
            return Answer(sent_at, 0, None, error=repr(exc))
        generation = response.headers.get("x-hotweights-generation")
        answer = Answer(
            sent_at,
            response.status_code,
            int(generation) if generation else None,
            response.headers.get("x-hotweights-replica"),
        )
        if stream and not response.text.rstrip().endswith("data: [DONE]"):
            answer.error = f"stream ended without [DONE]: {response.text[-200:]!r}"
        elif response.status_code != 200:
            answer.error = response.text[:300]
        return answer

    def _record(self, answer: Answer) -> None:
        with self._lock:
            self.answers.append(answer)


@dataclass
class Running:
    fleet: deployment.Fleet
    repo: Path
    builds: Path
    admin: httpx.Client

    def status(self) -> dict[str, Any]:
        response = self.admin.get("/admin/fleet")
        assert response.status_code == 200, response.text
        status: dict[str, Any] = response.json()
        return status

    def publish(self, seed: int, *, fault: bool = False, hold: bool = False) -> int:
        source = save_tiny_model(self.builds / f"seed-{seed}-{fault}-{hold}", seed=seed)
        if fault:
            (source / faults.FAULT_FILE).write_text("this version fails on one replica\n")
        if hold:
            (source / faults.HOLD_FILE).write_text("loads once released\n")
        return publish(source, self.repo, MODEL).version

    def wait(self, condition: Callable[[dict[str, Any]], bool], timeout: float = 90.0) -> Any:
        """Poll /admin/fleet until `condition` holds (the fleet runs in other processes:
        its status is the only thing to wait on)."""
        deadline = time.monotonic() + timeout
        status = self.status()
        while not condition(status):
            assert time.monotonic() < deadline, f"fleet never got there: {status}"
            time.sleep(0.1)
            status = self.status()
        return status


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("fleet")
    repo, builds = root / "repo", root / "builds"
    publish(save_tiny_model(builds / "first", seed=1), repo, MODEL)
    config = Config.load(
        {
            "repo": str(repo),
            "port": free_port(),
            "watch": "poll",
            "poll_interval": 0.1,
            "max_tokens_limit": 16,
            "drain_timeout": 20.0,
        },
        environ={},
    )
    ray.cloudpickle.register_pickle_by_value(faults)
    settings = FleetSettings(
        config, MODEL, replicas=2, prepare_timeout=60.0, loader=faults.one_replica_fails
    )
    fleet = deployment.start(settings, log_to_driver=False)
    try:
        with httpx.Client(base_url=fleet.url, timeout=120) as admin:
            yield Running(fleet, repo, builds, admin)
    finally:
        fleet.stop()
        shutil.rmtree(root, ignore_errors=True)


def _live_everywhere(generation: int) -> Callable[[dict[str, Any]], bool]:
    def check(status: dict[str, Any]) -> bool:
        replicas = status["replicas"]
        return (
            status["committed"]["generation"] == generation
            and len(replicas) == 2
            and all(r.get("live") == generation for r in replicas)
            and all([v["generation"] for v in r["resident"]] == [generation] for r in replicas)
        )

    return check


def test_a_publish_goes_live_on_every_replica_with_no_failed_request(running: Running) -> None:
    before = running.status()
    old = before["committed"]["generation"]
    with Traffic(running.fleet.url) as traffic:
        traffic.wait_for(10)
        version = running.publish(seed=2)
        status = running.wait(_live_everywhere(old + 1))
        cutover = status["last_cutover"]
        committed_at = cutover["started_at"] + cutover["phases"]["prepare"]
        committed_at += cutover["phases"]["commit"]
        traffic.wait_for(10, after=committed_at)
    assert cutover["outcome"] == "committed"
    assert cutover["version"] == version
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
    assert _live_everywhere(live["generation"])(running.wait(_live_everywhere(live["generation"])))
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
    running.wait(_live_everywhere(record["generation"]))
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
                _live_everywhere(generation)(s)
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
                _live_everywhere(live["generation"])(s)
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
