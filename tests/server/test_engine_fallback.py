"""A model the batched engine cannot run is served through the per-request engine, by the
same server path, and answers what the model's own decode loop answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hotweights.backends import LoadedLM, TransformersLoader
from hotweights.backends.per_request import PerRequestEngine
from hotweights.engine import row_attention
from hotweights.engine.batching_loader import BatchingLoader, EngineSettings
from hotweights.generation import GenerationParams
from hotweights.testing import ServerThread
from tests.backends.conftest import save_lively_model
from tests.server.conftest import Serve

pytestmark = pytest.mark.llm

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lively_model(tmp_path_factory.mktemp("models") / "1", seed=5)


@pytest.fixture(scope="module")
def alone(source: Path) -> Iterator[LoadedLM]:
    """The same weights loaded on their own: what the per-request loop answers."""
    loader = TransformersLoader()
    model = loader.load(str(source))
    yield model
    loader.unload(model)


@pytest.fixture
def server(serve: Serve, source: Path, monkeypatch: pytest.MonkeyPatch) -> ServerThread:
    def broken(*args: object) -> object:
        raise RuntimeError("this architecture's attention cannot read a shared cache")

    monkeypatch.setattr(row_attention, "_sdpa", broken)
    settings = EngineSettings(max_batch=4, kv_cache_bytes=2**22)
    return serve(BatchingLoader(TransformersLoader(), settings), source, model_name="tiny")


def _complete(server: ServerThread, **body: Any) -> dict[str, Any]:
    reply = httpx.post(
        f"{server.url}/v1/completions",
        json={"model": "tiny", "prompt": PROMPT, **body},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    answer: dict[str, Any] = reply.json()
    return answer


def test_the_fallback_is_the_per_request_engine_and_says_why(server: ServerThread) -> None:
    [(_, model)] = server.state.models["tiny"].reloader.models()
    assert isinstance(model.engine, PerRequestEngine)
    engines = httpx.get(f"{server.url}/admin/status").json()["models"]["tiny"]["engines"]
    assert engines["1"]["mode"].startswith("per-request (the batched check failed")
    assert engines["1"]["running"] == engines["1"]["waiting"] == 0


def test_greedy_and_seeded_answers_equal_the_models_own_loop(
    server: ServerThread, alone: LoadedLM
) -> None:
    greedy = _complete(server, max_tokens=12, temperature=0)
    expected = alone.generate(PROMPT, GenerationParams(temperature=0, max_tokens=12))
    assert greedy["choices"][0]["text"] == expected.text
    assert greedy["usage"]["completion_tokens"] == expected.completion_tokens
    seeded = _complete(server, max_tokens=12, temperature=0.8, top_p=0.9, seed=3, n=2)
    for index, choice in enumerate(seeded["choices"]):
        params = GenerationParams(temperature=0.8, top_p=0.9, seed=3 + index, max_tokens=12)
        assert choice["text"] == alone.generate(PROMPT, params).text


def test_logprobs_and_stops_equal_the_models_own_loop(
    server: ServerThread, alone: LoadedLM
) -> None:
    params = GenerationParams(temperature=0, max_tokens=10, logprobs=2)
    chunks = list(alone.stream(PROMPT, params))
    entries = [entry for chunk in chunks for entry in chunk.logprobs]
    answer = _complete(server, max_tokens=10, temperature=0, logprobs=2)["choices"][0]
    assert answer["logprobs"]["tokens"] == [entry.token for entry in entries]
    assert answer["logprobs"]["token_logprobs"] == pytest.approx(
        [entry.logprob for entry in entries]
    )
    text = "".join(chunk.text for chunk in chunks)
    stop = text[2:4]
    stopped = _complete(server, max_tokens=10, temperature=0, stop=[stop])["choices"][0]
    expected = alone.generate(PROMPT, GenerationParams(temperature=0, max_tokens=10, stop=[stop]))
    assert stopped["text"] == expected.text
    assert stopped["finish_reason"] == expected.finish_reason == "stop"
