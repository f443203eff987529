"""End to end with a real tiny transformers model, through the official openai client."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from hotweights.backends import LoadedLM, TransformersLoader
from hotweights.demo.tinylm import save_tiny_model
from hotweights.engine.batching import BatchEngine
from hotweights.engine.batching_loader import BatchingLoader, EngineSettings
from hotweights.generation import Deliver, GenerationParams, TokenChunk
from tests.fakes import assert_batched
from tests.server.conftest import Serve

pytestmark = pytest.mark.llm


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    v1 = save_tiny_model(root / "1", seed=1)
    v2 = save_tiny_model(root / "2", seed=2)
    truncated = Path(shutil.copytree(v1, root / "truncated"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    no_tokenizer = Path(shutil.copytree(v1, root / "no-tokenizer"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    wrong_type = Path(shutil.copytree(v1, root / "wrong-type"))
    (wrong_type / "model.safetensors").write_text("these are not weights\n")
    return {
        "v1": v1,
        "v2": v2,
        "truncated": truncated,
        "no-tokenizer": no_tokenizer,
        "wrong-type": wrong_type,
    }


def batched() -> BatchingLoader:
    """The loader `hotweights serve` builds: batched engines, with a small cache."""
    return BatchingLoader(TransformersLoader(), EngineSettings(max_batch=8, kv_cache_bytes=2**23))


_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Close every client a test opened, so no socket is left for the collector."""
    yield
    while _clients:
        _clients.pop().close()


def _client(url: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    _clients.append(client)
    return client


def _generation(fingerprint: str | None) -> int:
    assert fingerprint is not None
    assert fingerprint.startswith("hw-g")
    return int(fingerprint.split("-")[1][1:])


MESSAGES: Any = [{"role": "user", "content": "Which version are you?"}]


def test_chat_and_completions_streamed_and_not(serve: Serve, models: dict[str, Path]) -> None:
    server = serve(batched(), models["v1"], model_name="tiny")
    assert_batched(server.url, "tiny", 1)
    client = _client(server.url)
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5)
    assert _generation(chat.system_fingerprint) == 1
    assert chat.choices[0].finish_reason in {"stop", "length"}
    assert chat.usage is not None
    assert chat.usage.prompt_tokens > 10
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert {_generation(c.system_fingerprint) for c in chunks} == {1}
    assert chunks[-1].usage is not None
    seeded = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, seed=11, stream=True
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in seeded if c.choices)
    sampled = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, seed=11)
    assert streamed == sampled.choices[0].message.content
    greedy = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=5, temperature=0
    )
    again = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in again if c.choices) == (
        greedy.choices[0].message.content
    )
    text = client.completions.create(model="tiny", prompt="Once upon", max_tokens=4)
    assert text.object == "text_completion"
    assert _generation(text.system_fingerprint) == 1
    pieces = list(client.completions.create(model="tiny", prompt="Once", max_tokens=3, stream=True))
    assert {_generation(p.system_fingerprint) for p in pieces} == {1}
    assert [m.id for m in client.models.list()] == ["tiny"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=9)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=MESSAGES)


class HeldLoader(BatchingLoader):
    """Holds the engine of the first version it warms up at a sequence's token `at`, until
    released: the engine's thread waits, with every sequence on it."""

    def __init__(self, at: int) -> None:
        super().__init__(TransformersLoader(), EngineSettings(max_batch=8, kv_cache_bytes=2**23))
        self.at = at
        self.armed = threading.Event()  # not during validate and warmup
        self.reached = threading.Event()
        self.release = threading.Event()
        self._held = False

    def warmup(self, model: LoadedLM) -> None:
        super().warmup(model)
        engine = model.engine
        if self._held or not isinstance(engine, BatchEngine):
            return
        self._held = True
        submit = engine.submit

        def held(
            ids: list[int], params: GenerationParams, deliver: Deliver, cut: Any = None
        ) -> Any:
            count = 0

            def hold(item: TokenChunk | BaseException) -> None:
                nonlocal count
                if self.armed.is_set() and count == self.at:
                    self.reached.set()
                    self.release.wait(30)
                count += 1
                deliver(item)

            return submit(ids, params, hold, cut)

        setattr(engine, "submit", held)  # noqa: B010 - an instance override, for this test


def test_a_stream_on_g1_finishes_on_g1_while_g2_goes_live(
    serve: Serve, models: dict[str, Path]
) -> None:
    loader = HeldLoader(at=2)
    server = serve(loader, models["v1"], model_name="tiny")
    assert_batched(server.url, "tiny", 1)  # the hold is on the engine: no engine, no hold
    loader.armed.set()
    client = _client(server.url)
    stream = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stream=True
    )
    first = next(iter(stream))
    assert loader.reached.wait(30)
    reload = httpx.post(f"{server.url}/admin/reload", json={"path": str(models["v2"])}, timeout=60)
    assert reload.json()["new_generation"] == 2
    fresh = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert _generation(fresh.system_fingerprint) == 2
    assert_batched(server.url, "tiny", 1, 2)  # two engines side by side
    loader.release.set()
    rest = list(stream)
    assert {_generation(c.system_fingerprint) for c in [first, *rest]} == {1}
    assert rest[-1].choices[0].finish_reason in {"stop", "length"}
    assert server.state.models["tiny"].reloader.wait_drained(30)


@pytest.mark.parametrize(
    ("broken", "cause"),
    [
        ("truncated", "model.safetensors"),
        ("no-tokenizer", "tokenizer"),
        ("wrong-type", "model.safetensors"),
    ],
)
def test_a_corrupt_version_answers_with_its_cause_and_the_old_one_serves(
    serve: Serve, models: dict[str, Path], broken: str, cause: str
) -> None:
    server = serve(batched(), models["v1"], model_name="tiny")
    response = httpx.post(
        f"{server.url}/admin/reload", json={"path": str(models[broken])}, timeout=60
    )
    assert response.status_code == 422
    error = response.json()["error"]
    assert cause in error["message"]
    assert str(models[broken]) in error["message"]
    assert "generation 1 keeps serving" in error["message"]
    chat = _client(server.url).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=2
    )
    assert _generation(chat.system_fingerprint) == 1


def test_reload_rollback_versions_and_log(serve: Serve, models: dict[str, Path]) -> None:
    server = serve(batched(), models["v1"], model_name="tiny")
    url = server.url
    client = _client(url)
    first = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    reloaded = httpx.post(f"{url}/admin/reload", json={"path": str(models["v2"])}, timeout=60)
    assert reloaded.status_code == 200
    second = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert _generation(second.system_fingerprint) == 2
    assert second.system_fingerprint != first.system_fingerprint
    rolled = httpx.post(f"{url}/admin/rollback", timeout=60).json()
    assert rolled["outcome"] == "rolled_back"
    third = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    assert third.system_fingerprint is not None
    assert first.system_fingerprint is not None
    # Same weights as generation 1 (same digest), served as generation 3.
    assert third.system_fingerprint.split("-")[2] == first.system_fingerprint.split("-")[2]
    assert _generation(third.system_fingerprint) == 3
    assert_batched(server.url, "tiny", 3)
    versions = httpx.get(f"{url}/admin/versions").json()["versions"]
    assert (versions[0]["generation"], versions[0]["state"]) == (3, "live")
    events = httpx.get(f"{url}/admin/reloads").json()["events"]
    assert [(e["trigger"], e["outcome"]) for e in events] == [
        ("rollback", "rolled_back"),
        ("api", "live"),
        ("startup", "live"),
    ]
    assert all(set(e["phases"]) >= {"load", "validate", "warmup"} for e in events)
