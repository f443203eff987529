"""`hotweights fleet --ray-address` on a Ray cluster started separately (`ray start --head`
on 127.0.0.1, in its own process group, which the test ends), beside another Serve
application: the fleet starts, serves, refuses to start twice, stops and starts again, and
the other application answers all along. Every fleet is the CLI in a subprocess, as an
operator runs it (this process may be attached to the other tests' cluster)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray")

from hotweights.demo.tinylm import save_tiny_model
from hotweights.sources import publish
from hotweights.testing import free_port
from tests.fleet.cluster import CHAT, MODEL
from tests.fleet.head_node import DEADLINE_S, Cluster, until

pytestmark = [pytest.mark.server, pytest.mark.llm, pytest.mark.timeout(600)]
OTHER_APP = """
import sys
import ray
from ray import serve

ray.init(address=sys.argv[1], namespace="other", log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": int(sys.argv[2])})


@serve.deployment(ray_actor_options={"num_cpus": 0})
def other(request):
    return "the other application"


serve.run(other.bind(), name="other", route_prefix="/other")
"""


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="hw-ray-", dir="/tmp"))  # short: Ray's socket paths
    cluster = Cluster(root)
    try:
        cluster.start()
        other = subprocess.run(
            [sys.executable, "-c", OTHER_APP, cluster.address, cluster.http.rsplit(":", 1)[1]],
            env=cluster.env,
            timeout=DEADLINE_S,
            capture_output=True,
        )
        assert other.returncode == 0, other.stderr.decode()[-3000:]
        yield cluster
    finally:
        cluster.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_a_fleet_joins_a_running_cluster_stops_and_starts_again_beside_another_app(
    cluster: Cluster, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    publish(save_tiny_model(tmp_path / "build", seed=1), repo, MODEL)
    with httpx.Client(base_url=cluster.http, timeout=60) as client:
        assert _other(client)
        first = _start(cluster, repo, tmp_path / "first.log")
        try:
            assert _chat(client) == 1
            refused = subprocess.run(
                cluster.fleet(repo), env=cluster.env, capture_output=True, timeout=DEADLINE_S
            )
            assert refused.returncode == 1, refused.stderr.decode()[-2000:]
            assert b"a fleet already runs on this cluster" in refused.stderr
            assert b"--replace" in refused.stderr
            assert _chat(client) == 1  # the running fleet was not touched
            assert _other(client)
        finally:
            _stop(first)
        assert _other(client)
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 404  # gone
        second = _start(cluster, repo, tmp_path / "second.log")
        try:
            assert _chat(client) == 2  # the same repository: generations go on
            assert client.get("/admin/fleet").json()["coordinator"]["restarts"] == 0
        finally:
            _stop(second)
        assert _other(client)


def test_a_fleet_refuses_a_port_other_than_the_one_serve_listens_on(
    cluster: Cluster, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    publish(save_tiny_model(tmp_path / "build", seed=1), repo, MODEL)
    elsewhere = str(free_port())
    command = cluster.fleet(repo)
    command[command.index("--port") + 1] = elsewhere
    refused = subprocess.run(command, env=cluster.env, capture_output=True, timeout=DEADLINE_S)
    assert refused.returncode == 1, refused.stderr.decode()[-2000:]
    port = cluster.http.rsplit(":", 1)[1]
    assert f"Serve already runs on this cluster with its HTTP endpoint on 127.0.0.1:{port}" in (
        refused.stderr.decode()
    )


def _start(cluster: Cluster, repo: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            cluster.fleet(repo), env=cluster.env, stdout=out, stderr=out, start_new_session=True
        )

    def ready() -> bool:
        """Serving, and past its start (it says so once SIGTERM stops it cleanly)."""
        assert process.poll() is None, log.read_text()[-3000:]
        if "fleet serving" not in log.read_text(errors="replace"):
            return False
        try:
            return httpx.get(f"{cluster.http}/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    until(ready, "the fleet is serving")
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        assert process.wait(DEADLINE_S) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def _chat(client: httpx.Client) -> int:
    """Three answers from the fleet; the generation they name."""
    generations = set()
    for _ in range(3):
        response = client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200, response.text
        generations.add(int(response.headers["x-hotweights-generation"]))
    assert len(generations) == 1
    return generations.pop()


def _other(client: httpx.Client) -> bool:
    response = client.get("/other")
    return response.status_code == 200 and response.text == "the other application"
