"""LoRA adapters served end to end on a real tiny model: from a repository and through
vLLM's endpoints, answering as PEFT does, each request on the adapter version (and base
version) it started with, across loads, unloads and a base reload."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from hotweights.demo.tinylm import TinyShape, save_tiny_model
from hotweights.sources import publish
from hotweights.testing import ServerThread
from tests.backends.lora_adapters import adapter_answer, save_adapter
from tests.server.conftest import Serve
from tests.server.test_repository_serving import Finished

pytestmark = [pytest.mark.llm, pytest.mark.server]

SHAPE = TinyShape(max_position_embeddings=512, tie_word_embeddings=False)
PROMPT = "Which version are you?"
TOKENS = 8


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two base versions and three adapters on base 1 (all outside any repository)."""
    root = tmp_path_factory.mktemp("lora")
    base1 = save_tiny_model(root / "build" / "tiny" / "1", seed=3, shape=SHAPE)
    base2 = save_tiny_model(root / "build" / "tiny" / "2", seed=4, shape=SHAPE)
    return {
        "base1": base1,
        "base2": base2,
        "alpha1": save_adapter(base1, root / "build" / "alpha" / "1", seed=1),
        "alpha2": save_adapter(base1, root / "build" / "alpha" / "2", seed=2),
        "beta1": save_adapter(base1, root / "build" / "beta" / "1", seed=5),
    }


@pytest.fixture
def server(serve: Serve, built: dict[str, Path], tmp_path: Path) -> ServerThread:
    """`serve --repo` over base 1 and adapter alpha 1."""
    repo = tmp_path / "repo"
    publish(built["base1"], repo, "tiny")
    publish(built["alpha1"], repo, "alpha")
    roots = (str(repo), str(built["base1"].parent.parent))
    running = serve(None, None, repo=str(repo), watch="poll", poll_interval=0.05,
                    model_roots=roots, max_batch_size=8, kv_cache_memory="16MiB")  # fmt: skip
    return running


class Pause:
    """Stops the base model's live engine after its first pass from now on (its step
    observer) until released: the one stream the test then starts has its first token
    out and is certainly still in flight while the test acts."""

    def __init__(self, server: ServerThread) -> None:
        base = server.state.models["tiny"].reloader.models()[0][1]
        self._engine = base.engine
        self._passes = 0
        self._held = threading.Event()
        self._go = threading.Event()
        self._engine._on_step = self._observe

    def _observe(self, _: object) -> None:
        self._passes += 1
        if self._passes > 1 and not self._go.is_set():
            self._held.set()
            self._go.wait(60)

    def wait_held(self) -> None:
        assert self._held.wait(30), "the engine ran no second pass"

    def release(self) -> None:
        self._go.set()


def _ask(server: ServerThread, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, **extra}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)


def _ids(server: ServerThread) -> list[int]:
    base = server.state.models["tiny"].reloader.models()[0][1]
    ids: list[int] = base.prompt_ids(PROMPT)
    return ids


def _text(server: ServerThread, ids: list[int]) -> str:
    base = server.state.models["tiny"].reloader.models()[0][1]
    text: str = base.decode(ids)
    return text


def _load(server: ServerThread, name: str, path: Path) -> httpx.Response:
    body = {"lora_name": name, "lora_path": str(path)}
    return httpx.post(f"{server.url}/v1/load_lora_adapter", json=body, timeout=120)


def test_an_adapter_in_the_repository_answers_as_peft_and_names_both_generations(
    server: ServerThread, built: dict[str, Path]
) -> None:
    server.wait_live()
    expected = _text(server, adapter_answer(built["base1"], built["alpha1"], _ids(server), TOKENS))
    response = _ask(server, "alpha")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["text"] == expected
    assert response.headers["x-hotweights-generation"] == "1"
    assert response.headers["x-hotweights-adapter-generation"] == "1"
    assert body["system_fingerprint"].startswith("hw-g1-a1-")
    base = _ask(server, "tiny")
    assert base.json()["choices"][0]["text"] != expected
    assert "x-hotweights-adapter-generation" not in base.headers
    models = {m["id"]: m for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    assert models["alpha"]["parent"] == "tiny"
    assert models["alpha"]["generation"] == 1
    assert "parent" not in models["tiny"]


def test_a_stream_on_v1_stays_on_v1_across_a_load_of_v2(
    server: ServerThread, built: dict[str, Path]
) -> None:
    server.wait_live()
    ids = _ids(server)
    v1 = _text(server, adapter_answer(built["base1"], built["alpha1"], ids, TOKENS))
    v2 = _text(server, adapter_answer(built["base1"], built["alpha2"], ids, TOKENS))
    assert v1 != v2
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0,
            "stream": True}  # fmt: skip
    pieces: list[str] = []
    headers: dict[str, str] = {}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as stream:
        headers = dict(stream.headers)
        lines = stream.iter_lines()
        for line in lines:  # the first token is out: the stream is on v1
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
                break
        loaded = _load(server, "alpha", built["alpha2"])
        assert loaded.status_code == 200, loaded.text
        assert loaded.json()["new_generation"] == 2
        after = _ask(server, "alpha")
        assert after.headers["x-hotweights-adapter-generation"] == "2"
        assert after.json()["choices"][0]["text"] == v2
        for line in lines:
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert headers["x-hotweights-adapter-generation"] == "1"
    assert "".join(pieces) == v1


def test_unload_while_a_stream_runs_lets_it_finish_then_releases_the_adapter(
    server: ServerThread, built: dict[str, Path]
) -> None:
    server.wait_live()
    loaded = _load(server, "beta", built["beta1"])
    assert loaded.status_code == 200, loaded.text
    reloader = server.state.models["beta"].reloader
    (_, beta_model), = reloader.models()  # fmt: skip
    expected = _text(server, adapter_answer(built["base1"], built["beta1"], _ids(server), TOKENS))
    body = {"model": "beta", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0,
            "stream": True}  # fmt: skip
    pieces: list[str] = []
    paused = Pause(server)  # before the request: its second pass waits
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
                break
        paused.wait_held()
        unloaded = httpx.post(
            f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "beta"}, timeout=30
        )
        assert unloaded.status_code == 200, unloaded.text
        assert _ask(server, "beta").status_code == 404
        assert beta_model.weights is not None  # still in use by the stream
        paused.release()
        for line in lines:
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert "".join(pieces) == expected
    assert reloader.wait_drained(30)
    assert beta_model.weights is None  # released after its last request
    assert (
        httpx.post(
            f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "beta"}, timeout=30
        ).status_code
        == 404
    )


def test_a_base_reload_brings_its_adapters_along(
    server: ServerThread, built: dict[str, Path], tmp_path: Path
) -> None:
    server.wait_live()
    held = threading.Event()
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0,
            "stream": True}  # fmt: skip
    old = _text(server, adapter_answer(built["base1"], built["alpha1"], _ids(server), TOKENS))
    new = _text(server, adapter_answer(built["base2"], built["alpha1"], _ids(server), TOKENS))
    assert old != new
    pieces: list[str] = []
    paused = Pause(server)  # base 1's engine: the stream stays in flight on it
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
                held.set()
                break
        paused.wait_held()
        finished = Finished(server, "tiny")
        publish(built["base2"], Path(server.state.config.repo or ""), "tiny")  # watched
        event = finished.wait(120)
        assert event.succeeded, event.error_message
        after = _ask(server, "alpha")
        assert after.status_code == 200, after.text
        assert after.headers["x-hotweights-generation"] == "2"
        assert after.headers["x-hotweights-adapter-generation"] == "2"
        assert after.json()["choices"][0]["text"] == new
        paused.release()
        for line in lines:
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    assert held.is_set()
    assert "".join(pieces) == old


def test_bad_adapter_requests_get_clear_errors(
    server: ServerThread, built: dict[str, Path], tmp_path: Path
) -> None:
    server.wait_live()
    assert _load(server, "tiny", built["alpha2"]).status_code == 400
    assert _load(server, "a@2", built["alpha2"]).status_code == 400
    assert _load(server, "a/b", built["alpha2"]).status_code == 400
    assert _load(server, "gamma", tmp_path).status_code == 403  # outside the model roots
    broken = built["base1"].parent.parent / "broken" / "1"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "adapter_config.json").write_text("{not json")
    refused = _load(server, "gamma", broken)
    assert refused.status_code == 422
    assert "adapter_config.json" in refused.text
    assert "gamma" not in {m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]}
    other = save_tiny_model(
        tmp_path / "wide" / "1", seed=1, shape=TinyShape(hidden_size=96, tie_word_embeddings=False)
    )
    unfit = save_adapter(other, built["base1"].parent.parent / "unfit" / "1", seed=9)
    refused = _load(server, "gamma", unfit)
    assert refused.status_code == 422
    assert "q_proj" in refused.text
    unknown = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "zeta"})
    assert unknown.status_code == 404
    assert _ask(server, "alpha").status_code == 200  # the live adapter serves on
