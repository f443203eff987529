"""A replica's process without Ray (`FleetReplica`): the server of the fleet's models, built
from the repository and narrowed to them, answering a forwarded request on the generation
its ingress stamped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hotweights.config import Config
from hotweights.fleet.bridge import Forwarded, Head
from hotweights.fleet.model_replica import Joined, Target
from hotweights.fleet.replica import REPLICA_HEADER, FleetReplica
from tests.fakes import FakeLoader, FakeTextLoader

TIMEOUT = 10.0


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return tmp_path / "repo"


def source(repo: Path, number: int, model: str = "m") -> str:
    return str(repo / model / str(number))


async def test_forward_answers_on_the_stamped_generation_and_names_the_replica(
    repo: Path,
) -> None:
    (repo / "m").mkdir(parents=True)
    config = Config.load({"repo": str(repo)}, environ={})
    replica = FleetReplica(
        config, ["m"], replica_id="r1", hold_seconds=600, loader=FakeTextLoader()
    )
    replica.start({"m": Joined(Target(3, source(repo, 3)))}, TIMEOUT)
    assert replica.model("m").hold(Target(5, source(repo, 5)), TIMEOUT).ok
    described = replica.describe()
    assert (described["replica"], described["live"]) == ("r1", 3)  # one model: at the top
    assert described["models"] == {"m": replica.model("m").describe()}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    request = Forwarded(
        "POST",
        "/v1/chat/completions",
        b"",
        ((b"content-type", b"application/json"),),
        json.dumps(body).encode(),
    )

    for generation in (3, 5):
        items = [item async for item in replica.forward(generation, request)]
        assert len(items) == 1
        head = items[0]
        assert isinstance(head, Head)
        headers = dict(head.headers)
        assert head.status == 200
        assert headers[REPLICA_HEADER.encode()] == b"r1"
        assert headers[b"x-hotweights-generation"] == str(generation).encode()
        content = json.loads(head.body)["choices"][0]["message"]["content"]
        assert content.startswith(f"{source(repo, generation)}:0")
    replica.close(timeout=TIMEOUT)


def test_a_replica_serves_the_fleets_models_and_no_other_of_the_repository(repo: Path) -> None:
    for name in ("m", "n", "lora"):
        (repo / name).mkdir(parents=True)
    config = Config.load({"repo": str(repo)}, environ={})
    replica = FleetReplica(
        config, ["m", "n"], replica_id="r1", hold_seconds=600, loader=FakeLoader()
    )
    try:
        assert sorted(replica.state.models) == ["m", "n"]  # lora's reloader was dropped
        assert replica.state.sync is None  # the coordinator, not the replica, follows the repo
        joined = {
            name: Joined(Target(g, source(repo, 1, name))) for name, g in (("m", 1), ("n", 2))
        }
        replica.start(joined, TIMEOUT)
        described = replica.describe()
        assert "live" not in described  # several models: only under `models`
        models = described["models"]
        assert isinstance(models, dict)
        assert {name: m["live"] for name, m in models.items()} == {"m": 1, "n": 2}
        with pytest.raises(KeyError, match="replica r1 serves m, n, not 'lora'"):
            replica.model("lora")
    finally:
        replica.close(timeout=TIMEOUT)
    with pytest.raises(ValueError, match=r"holds no model 'x' \(models there: "):
        FleetReplica(config, ["x"], replica_id="r2", hold_seconds=600, loader=FakeLoader())
