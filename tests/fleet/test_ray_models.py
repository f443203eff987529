"""A fleet of every base model of a repository, on a Ray cluster started apart (`ray start
--head` on 127.0.0.1), with its record in Ray's internal key-value store
(`--fleet-state ray-kv`) and one replica preparing at a time (`--prepare-parallel 1`).

The repository holds two base models and a LoRA adapter on one of them, which the fleet
serves with its base and cuts over with it. The
fleet runs in a driver process of its own (this process may be attached to the other
tests' cluster), built as `hotweights fleet` builds it but with the test loader of
`faults.py`, whose probe records how many loads ran at once."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("ray")

from hotweights.demo.tinylm import save_tiny_model
from hotweights.fleet.ledger import LEDGER_NAME
from hotweights.sources import publish
from tests.backends.lora_adapters import save_adapter
from tests.fleet import faults
from tests.fleet.cluster import CHAT, Traffic
from tests.fleet.head_node import DEADLINE_S, Cluster, until

pytestmark = [pytest.mark.server, pytest.mark.llm, pytest.mark.timeout(600)]
MODELS = ("a", "b")
ADAPTER = "lora"
DRIVER = """
import signal, sys, threading
import ray
from hotweights.config import Config
from hotweights.fleet import deployment
from hotweights.fleet.settings import FleetSettings
from tests.fleet import faults

repo, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
ray.cloudpickle.register_pickle_by_value(faults)
config = Config.load(
    {"repo": repo, "port": port, "watch": "poll", "poll_interval": 0.1,
     "max_tokens_limit": 16, "drain_timeout": 20.0},
    environ={},
)
settings = FleetSettings(
    config, None, replicas=2, prepare_timeout=90.0, prepare_parallel=1,
    ray_address=address, fleet_state="ray-kv", loader=faults.one_replica_fails,
)
fleet = deployment.start(settings, log_to_driver=False)
stop = threading.Event()
for number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(number, lambda *_: stop.set())
print("fleet serving", flush=True)
stop.wait()
fleet.stop()
"""


@dataclass
class ModelsFleet:
    cluster: Cluster
    repo: Path
    builds: Path
    admin: httpx.Client
    driver: subprocess.Popen[bytes] | None = None

    def start(self, log: Path) -> None:
        port = self.cluster.http.rsplit(":", 1)[1]
        command = [sys.executable, "-c", DRIVER, str(self.repo), self.cluster.address, port]
        with log.open("wb") as out:
            self.driver = subprocess.Popen(
                command, env=self.cluster.env, stdout=out, stderr=out, start_new_session=True
            )
        driver = self.driver

        def ready() -> bool:
            assert driver.poll() is None, log.read_text()[-3000:]
            if "fleet serving" not in log.read_text(errors="replace"):
                return False
            return self.admin.get("/ready").status_code == 200

        until(ready, "the fleet of every model is serving")

    def stop(self) -> None:
        if self.driver is None:
            return
        self.driver.send_signal(signal.SIGTERM)
        try:
            assert self.driver.wait(DEADLINE_S) == 0
        finally:
            if self.driver.poll() is None:
                os.killpg(self.driver.pid, signal.SIGKILL)
            self.driver = None

    def status(self) -> dict[str, Any]:
        response = self.admin.get("/admin/fleet")
        assert response.status_code == 200, response.text
        status: dict[str, Any] = response.json()
        return status

    def committed(self) -> dict[str, int]:
        models = self.status()["models"]
        return {name: m["committed"]["generation"] for name, m in models.items()}

    def publish(self, model: str, seed: int, *, probe: bool = False) -> int:
        source = save_tiny_model(self.builds / f"{model}-{seed}", seed=seed)
        if probe:
            (source / faults.PROBE_FILE).write_text("count the loads that overlap\n")
        return publish(source, self.repo, model).version


def adapter_on(base: Path, out: Path, model: str = "a") -> Path:
    """A PEFT adapter on the base built in `base`, its config naming `model`."""
    save_adapter(base, out, seed=7)
    config = out / "adapter_config.json"
    named = json.loads(config.read_text()) | {"base_model_name_or_path": model}
    config.write_text(json.dumps(named))
    return out


@pytest.fixture(scope="module")
def fleet() -> Iterator[ModelsFleet]:
    root = Path(tempfile.mkdtemp(prefix="hw-ray-", dir="/tmp"))  # short: Ray's socket paths
    cluster = Cluster(root)
    repo, builds = root / "repo", root / "builds"
    try:
        cluster.start()
        with httpx.Client(base_url=cluster.http, timeout=120) as admin:
            running = ModelsFleet(cluster, repo, builds, admin)
            for seed, model in enumerate(MODELS, start=1):
                running.publish(model, seed)
            publish(adapter_on(builds / "a-1", builds / ADAPTER), repo, ADAPTER)
            running.start(root / "driver.log")
            try:
                yield running
            finally:
                running.stop()
    finally:
        cluster.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_every_base_model_is_served_and_listed_with_its_committed_generation(
    fleet: ModelsFleet,
) -> None:
    committed = fleet.committed()
    assert sorted(committed) == [*MODELS, ADAPTER]
    listed = fleet.admin.get("/v1/models").json()["data"]
    assert {m["id"]: m["generation"] for m in listed} == committed
    assert {m["id"]: m.get("parent") for m in listed}[ADAPTER] == "a"
    for model in MODELS:
        response = fleet.admin.post("/v1/chat/completions", json={**CHAT, "model": model})
        assert response.status_code == 200, response.text
        assert int(response.headers["x-hotweights-generation"]) == committed[model]
    unnamed = fleet.admin.post("/v1/chat/completions", json={"messages": CHAT["messages"]})
    assert unnamed.status_code == 400
    assert "this fleet serves a, b" in unnamed.text
    reload = fleet.admin.post("/admin/reload", json={})
    assert reload.status_code == 400
    assert fleet.admin.post("/admin/reload", json={"model": "nothing"}).status_code == 404


def test_an_adapter_answers_on_both_generations_and_follows_its_base_fleet_wide(
    fleet: ModelsFleet,
) -> None:
    before = fleet.committed()
    answer = fleet.admin.post("/v1/chat/completions", json={**CHAT, "model": ADAPTER})
    assert answer.status_code == 200, answer.text
    assert int(answer.headers["x-hotweights-generation"]) == before["a"]
    assert int(answer.headers["x-hotweights-adapter-generation"]) == before[ADAPTER]
    body = {"lora_name": ADAPTER, "lora_path": str(fleet.builds / ADAPTER)}
    load = fleet.admin.post("/v1/load_lora_adapter", json=body)
    assert load.status_code == 400  # one replica would load it: the fleet refuses
    assert "publish" in load.text
    with Traffic(fleet.cluster.http, clients=2, models=(ADAPTER,)) as traffic:
        traffic.wait_for(4)
        fleet.publish("a", 40)

        def followed() -> bool:
            status = fleet.status()
            models = status["models"]
            adapter = models[ADAPTER]["committed"]
            return (
                models["a"]["committed"]["generation"] != before["a"]
                and models["a"]["last_cutover"]["outcome"] == "committed"
                and models["a"]["draining"] is None
                and adapter["base_generation"] == models["a"]["committed"]["generation"]
                and all(
                    r["models"][ADAPTER]["live"] == adapter["generation"]
                    for r in status["replicas"]
                )
            )

        until(followed, "the adapter followed its base on every replica")
        traffic.wait_for(4, after=max(a.sent_at for a in traffic.answers))
    assert traffic.failed == []
    after = fleet.committed()
    assert after[ADAPTER] not in (before[ADAPTER], after["a"])  # a generation of its own
    pairs = {(a.generation, a.adapter_generation) for a in traffic.answers}
    assert pairs <= {(before["a"], before[ADAPTER]), (after["a"], after[ADAPTER])}
    assert (after["a"], after[ADAPTER]) in pairs  # never a new base with an old adapter
    publish(adapter_on(fleet.builds / "b-2", fleet.builds / "late", "b"), fleet.repo, "late")

    def adopted() -> bool:
        response = fleet.admin.post("/v1/chat/completions", json={**CHAT, "model": "late"})
        return response.status_code == 200

    until(adopted, "the fleet adopted an adapter published while it served")
    late = fleet.status()["models"]["late"]
    assert (late["parent"], late["committed"]["base_generation"]) == ("b", after["b"])
    assert all("late" in r["models"] for r in fleet.status()["replicas"])


def test_two_models_cut_over_on_their_own_one_prepare_at_a_time(fleet: ModelsFleet) -> None:
    """Both models publish at once; with --prepare-parallel 1 their four prepares (two
    replicas each) never overlap, whichever model they are for."""
    before = fleet.committed()
    with Traffic(fleet.cluster.http, clients=4, models=MODELS) as traffic:
        traffic.wait_for(8)
        for seed, model in enumerate(MODELS, start=10):
            fleet.publish(model, seed, probe=True)

        def both_live() -> bool:
            status = fleet.status()
            models = status["models"]
            return all(
                models[m]["committed"]["generation"] != before[m]
                and models[m]["last_cutover"]["outcome"] == "committed"
                for m in MODELS
            ) and all(
                r["models"][m]["live"] == models[m]["committed"]["generation"]
                for r in status["replicas"]
                for m in MODELS
            )

        until(both_live, "both models cut over")
        traffic.wait_for(8, after=max(a.sent_at for a in traffic.answers))
    assert traffic.failed == []
    status = fleet.status()
    windows = [
        (start, end, model, replica)
        for model in MODELS
        for replica, (start, end) in status["models"][model]["last_cutover"]["windows"].items()
    ]
    assert len(windows) == 2 * len(MODELS)  # every replica prepared each model once
    windows.sort()
    for earlier, later in itertools.pairwise(windows):
        assert earlier[1] <= later[0], f"two prepares overlapped: {earlier} and {later}"
    assert faults.overlaps(fleet.repo) == [1] * len(windows)  # each load was alone
    after = fleet.committed()
    answered = {(a.model, a.generation) for a in traffic.answers}
    assert answered <= {(m, before[m]) for m in MODELS} | {(m, after[m]) for m in MODELS}


def test_the_ray_kv_record_outlives_the_coordinator_and_the_fleet(
    fleet: ModelsFleet, tmp_path: Path
) -> None:
    status = fleet.status()
    assert status["state"].startswith("Ray internal KV hotweights-fleet/record:")
    assert not (fleet.repo / LEDGER_NAME).exists()  # the repository is not written to
    committed = fleet.committed()
    restarts: int = status["coordinator"]["restarts"]
    os.kill(status["coordinator"]["pid"], signal.SIGKILL)

    def restarted() -> bool:
        try:
            now: int = fleet.status()["coordinator"]["restarts"]
            return now > restarts
        except (AssertionError, httpx.HTTPError):
            return False  # 503 while Ray restarts it

    until(restarted, "Ray restarted the coordinator")
    assert fleet.committed() == committed  # taken from the KV: nothing issued anew
    fleet.stop()
    fleet.start(tmp_path / "again.log")
    again = fleet.committed()
    newest = max(committed.values())
    assert sorted(again.values()) == [newest + 1 + i for i in range(len(committed))]  # went on
