"""The canary on a running server: a canary that fails a fifth of its requests is rolled
back within its bake with no failure a client sees, and marked bad; a healthy one is
promoted; a stream that began on the canary finishes on it; operators end a bake early."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from hotweights.cli import main
from hotweights.core import Notice, VersionChanged, VersionState
from hotweights.generation import GenerationParams, TokenChunk
from hotweights.sources import publish
from hotweights.testing import ServerThread
from tests.fakes import FakeTextLoader, FakeTextModel
from tests.server.conftest import Serve
from tests.server.test_repository_serving import Finished
from tests.sources.layouts import WEIGHTS, write_files


class FaultyModel(FakeTextModel):
    """Fails every `every`-th stream before its first token (an injected fault)."""

    def __init__(self, source: str, every: int) -> None:
        super().__init__(source)
        self.every = every
        self.calls = itertools.count(1)

    def stream(self, prompt: str | Sequence[int], params: GenerationParams) -> Iterator[TokenChunk]:
        if next(self.calls) % self.every == 0:
            raise RuntimeError(f"injected fault in {self.source}")
        return super().stream(prompt, params)


class FaultyLoader(FakeTextLoader):
    """Loads sources holding a file `FAULTY` as `FaultyModel`s failing 1 in 5."""

    def load(self, source: str) -> FakeTextModel:
        if not (Path(source) / "FAULTY").is_file():
            return super().load(source)
        model = FaultyModel(source, every=5)
        model.before_step = self.before_step
        self.models.append(model)
        return model


class Traffic:
    """Clients asking until stopped, streamed and not; keeps (status, generations)."""

    def __init__(self, server: ServerThread, clients: int = 2) -> None:
        self.server = server
        self.results: list[tuple[int, set[int]]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, client_id: int) -> None:
        body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(base_url=self.server.url, timeout=30) as client:
            for turn in itertools.count():
                if self._stop.is_set():
                    return
                stream = (turn + client_id) % 2 == 0
                request = {**body, "max_tokens": 3, "stream": stream}
                with client.stream("POST", "/v1/chat/completions", json=request) as response:
                    text = response.read().decode()
                generations = {int(response.headers.get("x-hotweights-generation", 0))}
                ok = response.status_code == 200 and '"error"' not in text
                self.results.append((response.status_code if ok else 500, generations))


def _baking(server: ServerThread) -> threading.Event:
    started = threading.Event()

    def observe(notice: Notice) -> None:
        if isinstance(notice, VersionChanged) and notice.new is VersionState.CANARY:
            started.set()

    server.state.models["m"].reloader.subscribe(observe)
    return started


def test_a_canary_failing_a_fifth_of_its_requests_is_rolled_back_unseen(
    serve: Serve, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    publish(write_files(tmp_path / "good", WEIGHTS), repo, "m")
    options = {"canary": "50%", "bake": "120s", "canary_min_requests": 10}
    server = serve(
        FaultyLoader(), None, repo=str(repo), watch="poll", poll_interval=3600, **options
    )
    finished = Finished(server, "m")
    with Traffic(server) as traffic:
        faulty = write_files(tmp_path / "faulty", {**WEIGHTS, "FAULTY": b"1"})
        publish(faulty, repo, "m", description="fails 1 request in 5")
        assert set(httpx.post(f"{server.url}/admin/rescan").json()["submitted"]) == {"m"}
        event = finished.wait(120).to_dict()
    assert event["outcome"] == "canary_failed", event
    assert "error rate" in event["error_message"]
    figures = event["canary"]
    assert figures["decision"] == "rolled back"
    assert figures["canary"]["generation"] == 2
    assert figures["canary"]["errors"] >= 2
    assert event["phases"]["bake"] < 120  # detected within the bake
    # Every canary failure was retried on the stable version: no client saw one.
    assert traffic.results
    assert {status for status, _ in traffic.results} == {200}
    listed = httpx.get(f"{server.url}/admin/repository").json()["models"]["m"]["versions"]
    status = {v["version"]: (v["status"], v.get("reason") or "") for v in listed}
    assert status[2][0] == "bad"
    assert "canary_failed" in status[2][1]
    assert httpx.get(f"{server.url}/admin/status").json()["models"]["m"]["live"]["generation"] == 1
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'hotweights_canary_retries_total{generation="2",model="m"}' in metrics
    assert 'hotweights_reloads_total{model="m",outcome="canary_failed"} 1.0' in metrics


def test_a_healthy_canary_is_promoted_after_its_bake(serve: Serve, tmp_path: Path) -> None:
    v1, v2 = (write_files(tmp_path / name, WEIGHTS) for name in ("1", "2"))
    server = serve(FakeTextLoader(), v1, canary="25%", bake="1s", canary_min_requests=1)
    with Traffic(server) as traffic:
        reply = httpx.post(f"{server.url}/admin/reload", json={"path": str(v2)}, timeout=60)
    event = reply.json()
    assert reply.status_code == 200, event
    assert event["outcome"] == "live"
    assert event["canary"]["decision"] == "promoted"
    assert event["phases"]["bake"] >= 1.0
    assert {status for status, _ in traffic.results} == {200}
    generations = [g for _, gs in traffic.results for g in gs]
    assert set(generations) <= {1, 2}
    assert httpx.get(f"{server.url}/admin/status").json()["models"]["m"]["live"]["generation"] == 2


@pytest.mark.parametrize("end", ["rollback", "promote"])
def test_a_stream_that_began_on_the_canary_finishes_on_it(
    serve: Serve, tmp_path: Path, end: str
) -> None:
    v1, v2 = (write_files(tmp_path / name, WEIGHTS) for name in ("1", "2"))
    held, release = threading.Event(), threading.Event()
    loader = FakeTextLoader()

    def hold_the_canary(step: int) -> None:
        if (
            step == 1
            and not held.is_set()
            and threading.current_thread().name.startswith("hotweights-gen")
        ):
            held.set()
            release.wait(30)

    server = serve(loader, v1, canary="50%", bake="600s")
    baking = _baking(server)
    assert httpx.post(f"{server.url}/admin/promote").status_code == 409  # no canary yet
    assert main(["promote", "--url", server.url]) == 1  # the CLI says so too
    reload = httpx.post(f"{server.url}/admin/reload", json={"path": str(v2), "wait": False})
    assert reload.status_code == 202
    assert baking.wait(30)
    canary_model = loader.models[-1]
    canary_model.before_step = hold_the_canary
    pinned = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "m@g2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
    )
    assert pinned.headers["x-hotweights-generation"] == "2"  # pins reach the canary
    held.clear()
    chunks: list[dict[str, Any]] = []

    def stream() -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        with httpx.stream(
            "POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunks.append(json.loads(line.removeprefix("data: ")))

    streams = []
    while not held.is_set():  # half of the admissions are the canary's
        thread = threading.Thread(target=stream)
        thread.start()
        streams.append(thread)
        while thread.is_alive() and not held.wait(0.05):
            pass
    ended = httpx.post(f"{server.url}/admin/{end}", timeout=60)
    assert ended.status_code == 200, ended.text
    assert ended.json()["outcome"] == ("live" if end == "promote" else "canary_failed")
    release.set()
    for thread in streams:
        thread.join(30)
    on_canary = [c for c in chunks if c["system_fingerprint"].startswith("hw-g2-")]
    assert len(on_canary) >= 5  # the held stream: every chunk, to the end, on g2
    assert [c for c in on_canary if c["choices"] and c["choices"][0]["finish_reason"]]
    after = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
    )
    assert after.headers["x-hotweights-generation"] == ("2" if end == "promote" else "1")
