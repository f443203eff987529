"""LoRA adapters across a fleet's replicas, in one process on a real tiny model: two
`FleetReplica`s, the ingress's `Admissions` and the `Coordinator`, joined by a link that
calls them directly (no Ray). Every replica answers an adapter request on the pair of
generations the ingress stamped; a base's cutover brings the adapter along under one
fleet-wide generation, and a request admitted before its flip finishes on the old pair."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from hotweights.config import Config
from hotweights.fleet.admissions import Admissions, Stamp
from hotweights.fleet.bridge import Forwarded, Head
from hotweights.fleet.coordinator import Coordinator
from hotweights.fleet.replica import FleetReplica
from hotweights.fleet.settings import FleetSettings
from hotweights.sources import publish
from tests.backends.lora_adapters import save_adapter
from tests.fleet.direct_link import DirectLink

pytestmark = [pytest.mark.llm, pytest.mark.timeout(300)]

pytest.importorskip("peft")
from hotweights.demo.tinylm import TinyShape, save_tiny_model  # noqa: E402

TIMEOUT = 60.0
SHAPE = TinyShape(max_position_embeddings=512, tie_word_embeddings=False)
Answer = tuple[int, int, int | None]
"""(status, base generation, adapter generation) as a replica's headers name them."""


async def ask(replica: FleetReplica, model: str, stamp: Stamp) -> Answer:
    """One chat request for `model` on `replica`, pinned to `stamp` as the ingress does."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    headers = ((b"content-type", b"application/json"),)
    request = Forwarded("POST", "/v1/chat/completions", b"", headers, json.dumps(body).encode())
    items = [item async for item in replica.forward(stamp.generation, request)]
    head = items[0]
    assert isinstance(head, Head)
    named = dict(head.headers)
    adapter = named.get(b"x-hotweights-adapter-generation")
    base = int(named.get(b"x-hotweights-generation", b"-1"))
    return head.status, base, int(adapter) if adapter is not None else None


async def test_adapters_cut_over_across_replicas_and_follow_their_base_fleet_wide(
    tmp_path: Path,
) -> None:
    build, repo = tmp_path / "build", tmp_path / "repo"
    base1 = save_tiny_model(build / "tiny" / "1", seed=3, shape=SHAPE)
    base2 = save_tiny_model(build / "tiny" / "2", seed=4, shape=SHAPE)
    publish(base1, repo, "tiny")
    publish(save_adapter(base1, build / "alpha" / "1", seed=1), repo, "alpha")
    config = Config.load(
        {"repo": str(repo), "drain_timeout": TIMEOUT, "max_batch_size": 4,
         "kv_cache_memory": "16MiB", "max_tokens_limit": 8},
        environ={},
    )  # fmt: skip
    settings = FleetSettings(config, None, replicas=2, prepare_timeout=TIMEOUT)
    replicas = [
        FleetReplica(config, ["tiny", "alpha"], replica_id=f"r{i}", hold_seconds=600)
        for i in range(2)
    ]
    link = DirectLink(replicas, Admissions({}), asyncio.get_running_loop())
    coordinator = Coordinator(settings, link)
    admissions = link.admissions = Admissions(coordinator.committed(), coordinator.bases())
    assert admissions.generations == {"tiny": 1, "alpha": 2}
    joined = coordinator.join()
    try:
        for replica in replicas:
            await asyncio.to_thread(replica.start, joined, TIMEOUT)

        async def everywhere(model: str) -> set[Answer]:
            stamp = admissions.admit(model)
            try:
                return {await ask(replica, model, stamp) for replica in replicas}
            finally:
                admissions.done(stamp)

        assert await everywhere("alpha") == {(200, 1, 2)}
        assert await everywhere("tiny") == {(200, 1, None)}

        # the adapter's own cutover: a new version on the base's committed generation
        publish(save_adapter(base1, build / "alpha" / "2", seed=2), repo, "alpha")
        record = await asyncio.to_thread(coordinator.sync, "watch", "", "alpha")
        assert record is not None
        assert record["outcome"] == "committed", record
        assert await everywhere("alpha") == {(200, 1, 3)}
        assert [r.lagging(coordinator.join(), ["alpha"]) for r in replicas] == [[], []]

        # the base's cutover, with a request admitted before its flip still in flight
        held = admissions.admit("alpha")
        assert held == Stamp(3, base_generation=1)
        publish(base2, repo, "tiny")
        link.draining.clear()  # the adapter's cutover drained too
        done: list[dict[str, object] | None] = []
        cutover = threading.Thread(
            target=lambda: done.append(coordinator.sync(model="tiny")), daemon=True
        )
        cutover.start()
        assert await asyncio.to_thread(link.draining.wait, TIMEOUT), "no drain began"
        assert admissions.admit("alpha") == Stamp(5, base_generation=4)  # flipped together
        assert await everywhere("alpha") == {(200, 4, 5)}  # the same pair on each replica
        assert {await ask(replica, "alpha", held) for replica in replicas} == {(200, 1, 3)}
        assert done == []  # the drain waits for the request on the old pair
        admissions.done(held)
        await asyncio.to_thread(cutover.join, TIMEOUT)
        assert [r["outcome"] if r else None for r in done] == ["committed"]
        assert coordinator.committed() == {"tiny": 4, "alpha": 5}
        for replica in replicas:
            described = replica.describe()["models"]
            assert isinstance(described, dict)
            assert (described["tiny"]["live"], described["alpha"]["live"]) == (4, 5)
            for model in replica.models.values():
                assert await asyncio.to_thread(model.reloader.wait_drained, TIMEOUT)
            resident = {
                name: [v.generation for v in model.reloader.resident()]
                for name, model in replica.models.items()
            }
            assert resident == {"tiny": [4], "alpha": [5]}  # the old pair was released

        # an adapter published while serving is adopted by every replica, and by one
        # that started before the adoption when it catches up
        late = FleetReplica(config, ["tiny", "alpha"], replica_id="late", hold_seconds=600)
        link.members = list(replicas)  # the adoption misses it: it is not running yet
        replicas.append(late)
        await asyncio.to_thread(late.start, coordinator.join(), TIMEOUT)
        publish(save_adapter(base2, build / "beta" / "1", seed=6), repo, "beta")
        assert await asyncio.to_thread(coordinator.adopt) == ["beta"]
        assert admissions.admit("beta") == Stamp(6, base_generation=4)
        assert {await ask(replica, "beta", Stamp(6)) for replica in replicas[:2]} == {(200, 4, 6)}
        assert "beta" not in late.models
        assert not await asyncio.to_thread(late.catch_up, coordinator.join(), TIMEOUT)
        assert await ask(late, "beta", Stamp(6)) == (200, 4, 6)
    finally:
        for replica in replicas:
            await asyncio.to_thread(replica.close, TIMEOUT)
