"""LoRA adapters served end to end on a real tiny model: from a repository and through
vLLM's endpoints, answering as PEFT does, each request on the adapter version (and base
version) it started with, across loads, unloads and a base reload."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from hotweights.core import Notice, VersionChanged, VersionState
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
    """Stops the base model's live engine (its step observer) at the pass that would
    choose the last token of the one stream the test then starts, until released: every
    earlier token is out, and the stream is certainly still in flight while the test acts."""

    def __init__(self, server: ServerThread) -> None:
        base = server.state.models["tiny"].reloader.models()[0][1]
        self._engine = base.engine
        self._passes = 0
        self._held = threading.Event()
        self._go = threading.Event()
        self._engine._on_step = self._observe

    def _observe(self, _: object) -> None:
        self._passes += 1  # pass k chooses token k of the stream
        if self._passes == TOKENS:
            self._held.set()
            self._go.wait(60)

    def wait_held(self) -> None:
        assert self._held.wait(30), "the engine did not reach the stream's last token"

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
    retired = threading.Event()

    def observe(notice: Notice) -> None:
        if isinstance(notice, VersionChanged) and notice.new is VersionState.RETIRED:
            retired.set()

    reloader.subscribe(observe)
    expected = _text(server, adapter_answer(built["base1"], built["beta1"], _ids(server), TOKENS))
    body = {"model": "beta", "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0,
            "stream": True}  # fmt: skip
    pieces: list[str] = []
    paused = Pause(server)  # before the request: its last pass waits
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
    assert retired.wait(30)
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
    head = save_adapter(
        built["base1"], built["base1"].parent.parent / "head" / "1", seed=9, targets=["lm_head"]
    )
    refused = _load(server, "gamma", head)
    assert refused.status_code == 422
    assert "output head" in refused.text
    unknown = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "zeta"})
    assert unknown.status_code == 404
    assert _ask(server, "alpha").status_code == 200  # the live adapter serves on


def test_at_most_n_adapters_stay_resident_and_an_evicted_one_comes_back_as_it_was(
    serve: Serve, built: dict[str, Path], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    publish(built["base1"], repo, "tiny")
    publish(built["alpha1"], repo, "alpha")
    publish(built["beta1"], repo, "beta")
    server = serve(None, None, repo=str(repo), watch="poll", max_resident_adapters=1,
                   max_batch_size=8, kv_cache_memory="16MiB")  # fmt: skip
    ids = _ids(server)
    answers = {
        name: _text(server, adapter_answer(built["base1"], built[f"{name}1"], ids, TOKENS))
        for name in ("alpha", "beta")
    }

    def resident() -> dict[str, bool]:
        data = httpx.get(f"{server.url}/v1/models").json()["data"]
        return {m["id"]: m["resident"] for m in data if "resident" in m}

    assert sorted(resident().values()) == [False, True]
    for name, other in (("alpha", "beta"), ("beta", "alpha"), ("alpha", "beta")):
        response = _ask(server, name)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == answers[name]
        assert response.headers["x-hotweights-adapter-generation"] == "1"  # kept
        assert resident() == {name: True, other: False}
    held = server.state.models["alpha"].reloader.slot.acquire()  # a request in flight
    try:
        assert _ask(server, "beta").status_code == 200
        assert resident() == {"alpha": True, "beta": True}  # alpha has a lease: not evicted
    finally:
        held.release()
    assert _ask(server, "beta").status_code == 200
    assert resident() == {"alpha": False, "beta": True}


def test_the_gate_judges_an_adapter_against_its_own_live_version(
    serve: Serve, built: dict[str, Path], tmp_path: Path
) -> None:
    """`same_as_live` compares a new adapter version with the adapter's live version (not
    with the base): the same weights again pass, v2's different answer is refused (422,
    the reason from the gate) and v1 serves on."""
    gate = tmp_path / "gate.json"
    prompt = {"prompt": PROMPT, "expect": {"same_as_live": True}, "max_tokens": TOKENS}
    gate.write_text(json.dumps({"prompts": [prompt]}))
    root = built["base1"].parent.parent
    copy = root / "alpha-again" / "1"
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(built["alpha1"], copy)
    server = serve(None, built["base1"], model_name="tiny", gate=str(gate),
                   model_roots=(str(root),), max_batch_size=8, kv_cache_memory="16MiB")  # fmt: skip
    assert _load(server, "alpha", built["alpha1"]).status_code == 200  # nothing live: passes
    assert _load(server, "alpha", copy).status_code == 200  # the same answers
    refused = _load(server, "alpha", built["alpha2"])
    assert refused.status_code == 422
    assert "gate" in refused.text
    answer = _ask(server, "alpha")
    assert answer.headers["x-hotweights-adapter-generation"] == "2"  # the copy serves on


def test_a_base_version_its_adapter_does_not_fit_is_refused_naming_the_adapter(
    server: ServerThread, tmp_path: Path
) -> None:
    server.wait_live()
    wide = save_tiny_model(
        tmp_path / "wide" / "2", seed=1, shape=TinyShape(hidden_size=96, tie_word_embeddings=False)
    )
    finished = Finished(server, "tiny")
    publish(wide, Path(server.state.config.repo or ""), "tiny")  # watched
    event = finished.wait(120)
    assert not event.succeeded
    assert "adapter alpha" in (event.error_message or "")
    assert "q_proj" in (event.error_message or "")  # which module, with both shapes
    response = _ask(server, "alpha")
    assert response.status_code == 200
    assert response.headers["x-hotweights-generation"] == "1"  # the old pair serves on


def test_the_watcher_serves_new_adapters_and_brings_an_unloaded_one_back_only_when_newer(
    serve: Serve, built: dict[str, Path], tmp_path: Path
) -> None:
    """Syncs are explicit (the poll interval is an hour): an adapter published while
    serving is served; an unloaded one stays unloaded across syncs until a newer version
    is published, and then numbers its generations after the ones it had."""
    repo = tmp_path / "repo"
    publish(built["base1"], repo, "tiny")
    publish(built["alpha1"], repo, "alpha")
    server = serve(None, None, repo=str(repo), watch="poll", poll_interval=3600,
                   max_batch_size=8, kv_cache_memory="16MiB")  # fmt: skip
    sync = server.state.sync
    assert sync is not None
    assert _ask(server, "beta").status_code == 404
    publish(built["beta1"], repo, "beta")
    assert sync.sync(trigger="api").submitted["beta"].wait(120).succeeded
    assert _ask(server, "beta").headers["x-hotweights-adapter-generation"] == "1"

    unloaded = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "alpha"})
    assert unloaded.status_code == 200
    assert "alpha" not in sync.sync(trigger="api").submitted
    assert _ask(server, "alpha").status_code == 404  # not brought back
    publish(built["alpha2"], repo, "alpha")
    assert sync.sync(trigger="api").submitted["alpha"].wait(120).succeeded
    back = _ask(server, "alpha")
    assert back.status_code == 200
    assert back.headers["x-hotweights-adapter-generation"] == "2"  # after its g1, not g1 again
