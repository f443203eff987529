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
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from hotweights.config import Config
from hotweights.fleet.admissions import Admissions
from hotweights.fleet.bridge import Forwarded, Head
from hotweights.fleet.coordinator import Coordinator
from hotweights.fleet.model_replica import Prepared, Target
from hotweights.fleet.replica import FleetReplica
from hotweights.fleet.settings import FleetSettings
from hotweights.sources import publish
from tests.fakes import FakeTextLoader
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


class DirectLink:
    """`FleetLink` by direct calls; the ingress parts run on `loop`."""

    def __init__(
        self,
        replicas: list[FleetReplica],
        admissions: Admissions,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.members = replicas
        self.admissions = admissions
        self.loop = loop
        self.preparing = threading.Event()
        """Set while a version prepares: requests admitted now are held back."""
        self.flipped = asyncio.Event()
        self.calls: list[str] = []

    def prepare(self, target: Target, timeout: float) -> Sequence[Prepared | BaseException]:
        self.calls.append("prepare")
        self.loop.call_soon_threadsafe(self.flipped.clear)
        self.preparing.set()
        return [replica.model(target.model).hold(target, timeout) for replica in self.members]

    def abort(self, model: str, generation: int, reason: str) -> None:
        for replica in self.members:
            replica.model(model).abort(generation, reason)

    def flip(self, model: str, generation: int) -> None:
        self.calls.append("flip")

        async def flip() -> None:
            self.admissions.flip(model, generation)
            self.preparing.clear()
            self.flipped.set()

        asyncio.run_coroutine_threadsafe(flip(), self.loop).result(TIMEOUT)

    def drained(self, generation: int, timeout: float) -> int:
        self.calls.append("drained")
        waiting = self.admissions.drained(generation, timeout)
        return asyncio.run_coroutine_threadsafe(waiting, self.loop).result(timeout + TIMEOUT)

    def finish(self, model: str, generation: int, timeout: float) -> Sequence[bool | BaseException]:
        self.calls.append("finish")
        return [replica.model(model).finish(generation, timeout) for replica in self.members]

    def replicas(self) -> Sequence[dict[str, object] | BaseException]:
        return [replica.describe() for replica in self.members]

    def ingress(self) -> dict[str, object]:
        return {}


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
                items = [item async for item in next(turns).forward(stamped, REQUEST)]
            finally:
                admissions.done(stamped)
            head = items[0]
            assert isinstance(head, Head)
            answered = int(dict(head.headers).get(b"x-hotweights-generation", b"-1"))
            answers.append((stamped, answered, head.status))

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
