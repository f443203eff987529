"""32 streams on one batched engine while a new version goes live beside it."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from hotweights.backends import LoadedLM, TransformersLoader
from hotweights.demo.tinylm import save_tiny_model
from hotweights.engine.batching import BatchEngine
from hotweights.engine.batching_loader import BatchingLoader, EngineSettings
from hotweights.engine.step_plan import StepStats
from hotweights.generation import Deliver, GenerationParams, TokenChunk
from tests.fakes import assert_batched
from tests.server.conftest import Serve

pytestmark = pytest.mark.llm

STREAMS = 32


class FreezingLoader(BatchingLoader):
    """Freezes the first version's engine once all `STREAMS` sequences run on it: its thread
    waits in a delivery until `thaw` is set. Each stream is then mid-way, on g1."""

    def __init__(self) -> None:
        settings = EngineSettings(max_batch=STREAMS, kv_cache_bytes=2**24)
        super().__init__(TransformersLoader(), settings)
        self.frozen = threading.Event()
        self.thaw = threading.Event()
        self._wrapped = False

    def warmup(self, model: LoadedLM) -> None:
        super().warmup(model)
        engine = model.engine
        if self._wrapped or not isinstance(engine, BatchEngine):
            return
        self._wrapped = True
        submit, lock = engine.submit, threading.Lock()
        submitted = 0
        all_in = threading.Event()

        def gated_submit(
            ids: list[int], params: GenerationParams, deliver: Deliver, cut: Any = None
        ) -> Any:
            nonlocal submitted
            with lock:
                submitted += 1
                if submitted == STREAMS:
                    all_in.set()

            def gated(item: TokenChunk | BaseException) -> None:
                all_in.wait(60)  # the first sequences wait for the last to be queued
                if not self.frozen.is_set() and engine.load()["running"] == STREAMS:
                    self.frozen.set()
                    self.thaw.wait(60)
                deliver(item)

            return submit(ids, params, gated, cut)

        setattr(engine, "submit", gated_submit)  # noqa: B010 - an instance override
        observe = engine._on_step

        def gated_step(stats: StepStats) -> None:
            # No pass runs beyond the first sequences' first until all are queued: on a
            # busy machine the early ones would otherwise finish before the last joins.
            if submitted:
                all_in.wait(60)
            if observe is not None:
                observe(stats)

        engine._on_step = gated_step


def test_32_streams_finish_on_g1_while_g2_goes_live_beside_it(serve: Serve, tmp_path: Path) -> None:
    v1 = save_tiny_model(tmp_path / "1", seed=1)
    v2 = save_tiny_model(tmp_path / "2", seed=2)
    loader = FreezingLoader()
    server = serve(loader, v1, model_name="tiny")
    assert_batched(server.url, "tiny", 1)
    url = f"{server.url}/v1/chat/completions"
    results: dict[int, dict[str, Any]] = {}

    def stream(index: int) -> None:
        body = {
            "model": "tiny",
            "messages": [{"role": "user", "content": f"stream number {index}"}],
            "max_tokens": 24,
            "temperature": 0,
            "stream": True,
        }
        seen: dict[str, Any] = {"fingerprints": set(), "text": "", "finish": None, "error": None}
        try:
            with httpx.stream("POST", url, json=body, timeout=120) as response:
                seen["status"] = response.status_code
                for line in response.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = httpx.Response(200, content=line[6:]).json()
                    if "error" in chunk:
                        seen["error"] = chunk["error"]
                        continue
                    seen["fingerprints"].add(chunk["system_fingerprint"])
                    for choice in chunk["choices"]:
                        seen["text"] += choice["delta"].get("content") or ""
                        seen["finish"] = choice["finish_reason"] or seen["finish"]
        except httpx.HTTPError as exc:
            seen["error"] = repr(exc)
        results[index] = seen

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    assert loader.frozen.wait(60), "the 32 sequences never ran together"
    reloader = server.state.models["tiny"].reloader
    assert reloader.inflight() == {1: STREAMS}
    reload = httpx.post(f"{server.url}/admin/reload", json={"path": str(v2)}, timeout=120)
    assert reload.json()["new_generation"] == 2
    fresh = httpx.post(
        url.replace("chat/completions", "completions"),
        json={"model": "tiny", "prompt": "new", "max_tokens": 3},
        timeout=60,
    )
    assert fresh.headers["x-hotweights-generation"] == "2"  # g1's engine is still frozen
    assert reloader.inflight() == {1: STREAMS, 2: 0}
    assert_batched(server.url, "tiny", 1, 2)  # g2's engine runs beside g1's
    loader.thaw.set()
    for thread in threads:
        thread.join(120)
    assert len(results) == STREAMS
    for index, seen in results.items():
        assert seen["status"] == 200, (index, seen)
        assert seen["error"] is None, (index, seen)
        assert seen["finish"] in {"stop", "length"}, (index, seen)
        assert len(seen["fingerprints"]) == 1, (index, seen)
        assert next(iter(seen["fingerprints"])).startswith("hw-g1-"), (index, seen)
    assert reloader.wait_drained(60)
    assert [version.generation for version in reloader.resident()] == [2]


@pytest.mark.parametrize("choices", [1, 4])
def test_a_client_that_hangs_up_frees_its_row_and_its_lease(
    serve: Serve, tmp_path: Path, choices: int
) -> None:
    """With `n` choices, every one of its sequences leaves the engine."""
    v1 = save_tiny_model(tmp_path / "1", seed=1)
    loader = BatchingLoader(TransformersLoader(), EngineSettings(max_batch=4, kv_cache_bytes=2**22))
    server = serve(loader, v1, model_name="tiny")
    reloader = server.state.models["tiny"].reloader
    [(_, model)] = reloader.models()
    engine = model.engine
    assert isinstance(engine, BatchEngine)
    ended = threading.Event()
    original = engine._free

    def observed(sequence: Any) -> None:
        original(sequence)
        if engine.load()["running"] == 0:
            ended.set()

    setattr(engine, "_free", observed)  # noqa: B010
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "a long answer please"}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
        "n": choices,
    }
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as reply:
        lines = reply.iter_lines()
        texted: set[int] = set()  # choices with generated text: their rows are running (the
        while len(texted) < choices:  # opening chunk comes first, maybe still waiting)
            texted |= _with_text(next(lines))
        assert reloader.inflight() == {1: 1}
    # The connection is closed: the engine drops the sequence at its next pass.
    assert ended.wait(30)
    assert engine.load() == {"running": 0, "waiting": 0}
    answer = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "tiny", "prompt": "still here", "max_tokens": 2},
        timeout=60,
    )
    assert answer.status_code == 200


def _with_text(line: str) -> set[int]:
    """The indexes of the choices a streamed chunk carries generated text for."""
    if not line.startswith("data: {"):
        return set()
    chunk = json.loads(line.removeprefix("data: "))
    return {choice["index"] for choice in chunk["choices"] if choice["delta"].get("content")}
