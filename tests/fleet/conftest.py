"""The fleet's Ray tests share one local cluster with one fleet on it (2 replicas of a tiny
model, loopback, no dashboard); each test leaves it serving."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import httpx
import pytest

from hotweights.config import Config
from hotweights.demo.tinylm import save_tiny_model
from hotweights.sources import publish
from hotweights.testing import free_port
from tests.fleet import faults
from tests.fleet.cluster import MODEL, Running


@pytest.fixture(scope="session")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    ray = pytest.importorskip("ray")
    from hotweights.fleet import deployment
    from hotweights.fleet.settings import FleetSettings

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
