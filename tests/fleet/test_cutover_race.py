"""The two phases in one process, racing real requests: two `FleetReplica`s, the ingress's
`Admissions`, the `Coordinator`, and a link that calls them directly (no Ray).

Requests admitted while a version prepares are held back until the ingress has flipped,
then sent: admitted before the commit, they reach their replica after it, which is when a
coordinator that finished (unloaded the old version) before the ingress drained would
fail them. Every answer must come from the generation stamped on its request, none may
fail, and no fake model may run after it was unloaded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import pytest

from hotweights.config import Config
from hotweights.fleet.admissions import Admissions
from hotweights.fleet.bridge import Forwarded, Head
from hotweights.fleet.coordinator import Coordinator
from hotweights.fleet.replica import FleetReplica
from hotweights.fleet.settings import FleetSettings
from hotweights.sources import publish
from tests.fakes import FakeTextLoader
from tests.fleet.direct_link import DirectLink
from tests.sources.layouts import WEIGHTS, write_files

TIMEOUT = 30.0
CUTOVERS = 5
CLIENTS = 12
BODY = json.dumps(
    {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
).encode()
REQUEST = Forwarded(
    "POST", "/v1/chat/completions", b"", ((b"content-type", b"application/json"),), BODY
)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    source = write_files(tmp_path / "build", WEIGHTS)
    publish(source, tmp_path / "repo", "m")
    return tmp_path / "repo"


async def test_requests_racing_cutovers_answer_on_their_stamp_and_none_fails(
    repo: Path, tmp_path: Path
) -> None:
    config = Config.load({"repo": str(repo), "drain_timeout": TIMEOUT}, environ={})
    settings = FleetSettings(config, "m", replicas=2, prepare_timeout=TIMEOUT)
    loaders = [FakeTextLoader(), FakeTextLoader()]
    replicas = [
        FleetReplica(config, ["m"], replica_id=f"r{i}", hold_seconds=600, loader=loader)
        for i, loader in enumerate(loaders)
    ]
    admissions = Admissions({"m": 1})
    link = DirectLink(replicas, admissions, asyncio.get_running_loop())
    coordinator = Coordinator(settings, link)
    joined = coordinator.join()
    for replica in replicas:
        await asyncio.to_thread(replica.start, joined, TIMEOUT)
    answers: list[tuple[int, int, int]] = []  # (stamped, answered, status)
    held_back = 0
    stop = asyncio.Event()
    turns = itertools.cycle(replicas)

    async def client() -> None:
        nonlocal held_back
        while not stop.is_set():
            stamped = admissions.admit("m")
            try:
                if link.preparing.is_set():  # admitted before the commit ...
                    held_back += 1
                    await link.flipped.wait()  # ... arriving after it
                replica = next(turns)
                items = [item async for item in replica.forward(stamped.generation, REQUEST)]
            finally:
                admissions.done(stamped)
            head = items[0]
            assert isinstance(head, Head)
            answered = int(dict(head.headers).get(b"x-hotweights-generation", b"-1"))
            answers.append((stamped.generation, answered, head.status))

    clients = [asyncio.create_task(client()) for _ in range(CLIENTS)]
    try:
        for _ in range(CUTOVERS):
            publish(write_files(tmp_path / "build", WEIGHTS), repo, "m")
            record = await asyncio.to_thread(coordinator.sync)
            assert record is not None
            assert record["outcome"] == "committed", record
        stop.set()
        await asyncio.gather(*clients)
        # only the last version is still loaded on each replica; nothing ran unloaded
        loaded = [[not m.unloaded for m in loader.models] for loader in loaders]
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
        for replica in replicas:
            await asyncio.to_thread(replica.close, TIMEOUT)
    assert coordinator.committed() == {"m": 1 + CUTOVERS}
    assert held_back > 0, "no request was admitted during a prepare: the race never ran"
    failed = [a for a in answers if a[2] != 200]
    assert failed == []
    assert [a for a in answers if a[0] != a[1]] == []
    assert {a[0] for a in answers} == set(range(1, 2 + CUTOVERS))
    assert loaded == [[False] * CUTOVERS + [True]] * 2
    assert link.calls.count("finish") == CUTOVERS
