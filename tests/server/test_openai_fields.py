"""The OpenAI request fields beyond plain chat, through the official `openai` client and
LangChain's `ChatOpenAI`, against a real tiny model: logprobs, echo scoring, `n`, prompt
lists, penalties and bias, and the fields that are refused by name."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI, OpenAI
from pydantic import SecretStr
from transformers import AutoModelForCausalLM, AutoTokenizer

from hotweights.backends import TransformersLoader
from hotweights.backends.per_request import PerRequestEngine
from hotweights.engine.batching import BatchEngine
from hotweights.engine.batching_loader import BatchingLoader, EngineSettings
from hotweights.testing import ServerThread
from tests.backends.conftest import save_lively_model
from tests.fakes import engine_modes
from tests.server.conftest import Serve

pytestmark = pytest.mark.llm

MESSAGES: Any = [{"role": "user", "content": "Tell me a story."}]
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "v1": save_lively_model(root / "1", seed=7),
        "v2": save_lively_model(root / "2", seed=8),
    }


def _loader(batched: bool) -> BatchingLoader:
    settings = EngineSettings(max_batch=8, kv_cache_bytes=2**23, batched=batched)
    return BatchingLoader(TransformersLoader(), settings)


@pytest.fixture(params=["batched", "per-request"])
def server(request: pytest.FixtureRequest, serve: Serve, models: dict[str, Path]) -> ServerThread:
    """The same tests on the batched engine and on the per-request engine, each checked
    to be the one that serves (a batched engine that failed its check would fall back)."""
    batched = request.param == "batched"
    server = serve(_loader(batched), models["v1"], model_name="tiny")
    [(_, model)] = server.state.models["tiny"].reloader.models()
    expected = BatchEngine if batched else PerRequestEngine
    assert isinstance(model.engine, expected), model.engine_note
    [mode] = engine_modes(server.url, "tiny").values()
    assert mode.startswith(request.param), mode  # and /admin/status says so
    return server


@pytest.fixture
def client(server: ServerThread) -> Iterator[openai.OpenAI]:
    url = f"{server.url}/v1"
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def _score(model_dir: Path, text: str) -> list[float]:
    """Each token's log-probability after the ones before it, computed in-process with
    transformers on the same weights."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer(text)["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_n_choices_are_indexed_seeded_and_stream_alike(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="tiny", messages=MESSAGES, n=3, max_tokens=8, seed=5, temperature=1.0
    )
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) > 1  # seed + i: the choices are different samples
    assert whole.usage is not None
    single = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=8, seed=5, temperature=1.0
    )
    assert single.usage is not None
    assert whole.usage.prompt_tokens == single.usage.prompt_tokens  # counted once
    assert texts[0] == single.choices[0].message.content
    streamed: dict[int, str] = defaultdict(str)
    finished: dict[int, str | None] = {}
    for chunk in client.chat.completions.create(
        model="tiny", messages=MESSAGES, n=3, max_tokens=8, seed=5, temperature=1.0, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    assert [streamed[i] for i in range(3)] == texts
    assert finished.keys() == {0, 1, 2}


def test_chat_logprobs_have_one_entry_per_token_with_bytes(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None
    assert choice.logprobs.content is not None
    content = choice.logprobs.content
    assert reply.usage is not None
    assert len(content) == reply.usage.completion_tokens
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token  # greedy takes the most likely
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    streamed = [
        entry
        for chunk in client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            logprobs=True,
            top_logprobs=2,
            stream=True,
        )
        for c in chunk.choices
        if c.logprobs is not None and c.logprobs.content
        for entry in c.logprobs.content
    ]
    # The second request restores the prompt's prefix from the engine's cache: the same
    # tokens, log-probabilities equal up to float rounding.
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=6, temperature=0, logprobs=2
    )
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens is not None
    assert logprobs.token_logprobs is not None
    assert logprobs.top_logprobs is not None
    assert reply.usage is not None
    assert len(logprobs.tokens) == reply.usage.completion_tokens
    offsets = logprobs.text_offset or []
    assert offsets[0] == 0
    starts = [0]
    for token in logprobs.tokens[:-1]:
        starts.append(starts[-1] + len(token))
    assert offsets == starts
    for token, value, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert top[token] == pytest.approx(value)  # the sampled token is among them
        assert max(top.values()) == pytest.approx(value)  # greedy
        assert 1 <= len(top) <= 3


def test_echo_scores_a_text_as_transformers_does(
    client: openai.OpenAI, models: dict[str, Path]
) -> None:
    """How evaluation harnesses score a text: echo, no new tokens, logprobs."""
    reply = client.completions.create(
        model="tiny", prompt=TEXT, echo=True, max_tokens=0, logprobs=1
    )
    choice = reply.choices[0]
    assert choice.text == TEXT
    assert choice.finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 0
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs is not None
    values: list[float | None] = list(choice.logprobs.token_logprobs)
    assert values[0] is None
    assert choice.logprobs.top_logprobs is not None
    tops: list[Any] = list(choice.logprobs.top_logprobs)
    assert tops[0] is None
    expected = _score(models["v1"], TEXT)
    scored = [value for value in values[1:] if value is not None]
    assert scored == pytest.approx(expected, abs=1e-4)
    assert sum(scored) == pytest.approx(sum(expected), abs=1e-3)
    echoed = client.completions.create(
        model="tiny", prompt=TEXT, echo=True, max_tokens=3, temperature=0, logprobs=0
    )
    assert echoed.choices[0].text.startswith(TEXT)
    assert echoed.choices[0].logprobs is not None
    assert len(echoed.choices[0].logprobs.tokens or []) == reply.usage.prompt_tokens + 3
    stream = client.completions.create(
        model="tiny", prompt=TEXT, echo=True, max_tokens=0, logprobs=1, stream=True
    )
    streamed = [
        value
        for chunk in stream
        for c in chunk.choices
        if c.logprobs is not None
        for value in c.logprobs.token_logprobs or []
    ]
    assert streamed == values


def test_a_list_of_prompts_and_token_ids(client: openai.OpenAI, models: dict[str, Path]) -> None:
    prompts = ["Once upon", "The cat sat"]
    batch = client.completions.create(
        model="tiny", prompt=prompts, n=2, max_tokens=5, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    alone = [
        client.completions.create(model="tiny", prompt=p, max_tokens=5, temperature=0)
        for p in prompts
    ]
    texts = [c.text for c in batch.choices]
    assert texts == [alone[0].choices[0].text] * 2 + [alone[1].choices[0].text] * 2
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone if a.usage)
    by_ids = client.completions.create(
        model="tiny", prompt=_token_ids(models["v1"], "Once upon"), max_tokens=5, temperature=0
    )
    assert by_ids.choices[0].text == alone[0].choices[0].text
    echoed = client.completions.create(
        model="tiny", prompt=_token_ids(models["v1"], "Once upon"), max_tokens=0, echo=True
    )
    assert echoed.choices[0].text == "Once upon"
    streamed: dict[int, str] = defaultdict(str)
    for chunk in client.completions.create(
        model="tiny", prompt=prompts, max_tokens=5, temperature=0, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[0], streamed[1]] == [a.choices[0].text for a in alone]


def _token_ids(model_dir: Path, text: str) -> list[int]:
    return list(AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"])


def test_penalties_and_bias_change_the_answer(
    client: openai.OpenAI, models: dict[str, Path]
) -> None:
    z = _token_ids(models["v1"], "z")[-1]
    biased = client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=6, temperature=0, logit_bias={str(z): 100}
    )
    assert biased.choices[0].text == "z" * 6
    plain = client.completions.create(
        model="tiny", prompt="abc abc abc", max_tokens=10, temperature=0
    )
    penalised = client.completions.create(
        model="tiny", prompt="abc abc abc", max_tokens=10, temperature=0, frequency_penalty=2.0
    )
    assert penalised.choices[0].text != plain.choices[0].text


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
                }
            },
            "uniqueItems",
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"n": 17}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logit_bias": {"99999": 5}}, "logit_bias"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"extra_body": {"top_k": 5}}, "top_k"),
    ],
)
def test_unsupported_fields_are_refused_by_name(
    client: openai.OpenAI, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, **options)
    assert field in str(refused.value)


def test_refused_completion_fields(client: openai.OpenAI) -> None:
    refused_options: list[tuple[dict[str, Any], str]] = [
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"max_tokens": 0}, "echo"),
        ({"logprobs": 21}, "logprobs"),
    ]
    for options, field in refused_options:
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model="tiny", prompt="x", **options)
        assert field in str(refused.value)
    with pytest.raises(openai.BadRequestError, match="token id"):
        client.completions.create(model="tiny", prompt=[[1, 10**6]], max_tokens=2)
    text_reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=2, response_format={"type": "text"}
    )
    assert text_reply.choices[0].finish_reason in {"stop", "length"}


def test_logprobs_come_from_the_generation_that_served(
    serve: Serve, models: dict[str, Path], request: pytest.FixtureRequest
) -> None:
    server = serve(_loader(True), models["v1"], model_name="tiny")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    request.addfinalizer(client.close)

    def score() -> tuple[int, list[float]]:
        raw = client.completions.with_raw_response.create(
            model="tiny", prompt=TEXT, echo=True, max_tokens=0, logprobs=0
        )
        body = raw.parse()
        assert body.choices[0].logprobs is not None
        values = body.choices[0].logprobs.token_logprobs or []
        return int(raw.headers["x-hotweights-generation"]), [v for v in values[1:] if v is not None]

    first = score()
    reload = httpx.post(f"{server.url}/admin/reload", json={"path": str(models["v2"])}, timeout=60)
    assert reload.status_code == 200, reload.text
    second = score()
    assert (first[0], second[0]) == (1, 2)
    assert first[1] == pytest.approx(_score(models["v1"], TEXT), abs=1e-4)
    assert second[1] == pytest.approx(_score(models["v2"], TEXT), abs=1e-4)
    assert not math.isclose(sum(first[1]), sum(second[1]), abs_tol=1e-2)


@pytest.fixture
def langchain_url(serve: Serve, models: dict[str, Path]) -> str:
    return f"{serve(_loader(True), models['v1'], model_name='tiny').url}/v1"


def test_langchain_chat_streaming_and_logprobs(
    langchain_url: str, request: pytest.FixtureRequest
) -> None:
    """LangChain's ChatOpenAI, unmodified, pointed at the server (with an HTTP client
    the test closes, so no socket outlives it)."""
    http = httpx.Client(timeout=60)
    request.addfinalizer(http.close)
    chat = ChatOpenAI(
        model="tiny",
        base_url=langchain_url,
        api_key=SecretStr("x"),
        max_completion_tokens=8,
        http_client=http,
    ).bind(temperature=0)
    answer = chat.invoke("Tell me a story.")
    assert isinstance(answer.content, str)
    assert answer.content
    assert answer.response_metadata["system_fingerprint"].startswith("hw-g1-")
    pieces = [piece for piece in chat.stream("Tell me a story.")]
    assert all(isinstance(piece, AIMessageChunk) for piece in pieces)
    assert "".join(str(piece.content) for piece in pieces) == answer.content
    scored = chat.bind(logprobs=True, top_logprobs=2).invoke("Tell me a story.")
    assert scored.content == answer.content
    content = scored.response_metadata["logprobs"]["content"]
    assert len(content) == scored.usage_metadata["output_tokens"]  # type: ignore[index]
    assert all(entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2 for entry in content)
    legacy = OpenAI(
        model="tiny", base_url=langchain_url, api_key=SecretStr("x"), max_tokens=4, http_client=http
    )
    assert isinstance(legacy.invoke("Once upon"), str)
