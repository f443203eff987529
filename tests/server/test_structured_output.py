"""`response_format` and tools, held to their schemas by a grammar, end to end: a real tiny
model on the batched engine (and the per-request one), through httpx, the official openai
client and LangChain."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field, StringConstraints

from hotweights.backends import TransformersLoader
from hotweights.demo.tinylm import TinyShape, build_model, build_tokenizer, save_pretrained
from hotweights.demo.training import train_answers
from hotweights.engine.batching_loader import BatchingLoader, EngineSettings
from hotweights.testing import ServerThread
from tests.server.conftest import Serve

pytestmark = pytest.mark.llm

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 6}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ORDER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 10},
                "tier": {"enum": ["gold", "silver"]},
            },
            "required": ["name", "tier"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                    "count": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "count"],
                "additionalProperties": False,
            },
            "maxItems": 3,
        },
        "express": {"type": "boolean"},
    },
    "required": ["customer", "items", "express"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREET = [{"role": "user", "content": "Say hello."}]
CALL_TEXT = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
)


LONG = TinyShape(max_position_embeddings=2048)
"""Room for the tools' signatures, a byte a token."""


def _lively(path: Path, seed: int) -> Path:
    """A random model with large weights (varied text), long enough for tool prompts."""
    import torch

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed, shape=LONG)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3, generator=generator)
    return save_pretrained(path, model, tokenizer)


def _batched() -> BatchingLoader:
    return BatchingLoader(TransformersLoader(), EngineSettings(max_batch=8, kv_cache_bytes=2**23))


def _start(loader: Any, source: Path) -> ServerThread:
    from hotweights.config import Config
    from hotweights.server.assembly import build_state

    options = {"source": str(source), "model_name": "m", "model_roots": (str(source.parent),)}
    return ServerThread(build_state(Config.load(options, environ={}), loader)).start()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("structured")
    return {
        "v1": _lively(root / "1", seed=1),
        "v2": _lively(root / "2", seed=2),
    }


@pytest.fixture(scope="module")
def url(models: dict[str, Path]) -> Iterator[str]:
    server = _start(_batched(), models["v1"])
    server.wait_live()
    yield server.url
    server.stop()


@pytest.fixture
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120) as made:
        yield made


def _chat(url: str, **body: Any) -> dict[str, Any]:
    response = httpx.post(
        f"{url}/v1/chat/completions", json={"model": "m", "max_tokens": 400, **body}, timeout=120
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def _calls_valid(message: dict[str, Any], names: set[str]) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = message["tool_calls"]
    assert calls
    for call in calls:
        assert call["type"] == "function"
        assert call["id"].startswith("call_")
        assert call["function"]["name"] in names
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, SCHEMAS[call["function"]["name"]])
    return calls


class Customer(BaseModel):
    name: Annotated[str, StringConstraints(max_length=8)]
    tier: Literal["gold", "silver", "bronze"]
    age: int = Field(ge=18, le=99)


class Booking(BaseModel):
    customers: list[Customer] = Field(max_length=2)
    nights: int = Field(ge=1, le=14)


def test_the_openai_clients_parse_gets_a_valid_pydantic_object(client: openai.OpenAI) -> None:
    for seed in range(3):
        completion = client.chat.completions.parse(
            model="m",
            messages=[{"role": "user", "content": "Book a room."}],
            response_format=Booking,
            max_tokens=400,
            seed=seed,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Booking)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_with_nested_objects_arrays_and_enums_always_validates(
    url: str, temperature: float
) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER}}
    for seed in range(4):
        answer = _chat(
            url,
            messages=GREET,
            response_format=response_format,
            temperature=temperature,
            seed=seed,
            presence_penalty=1.0,
            logit_bias={"123": 50},
        )
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(choice["message"]["content"]), ORDER)


def test_json_object_and_a_streamed_schema(url: str) -> None:
    answer = _chat(url, messages=GREET, response_format={"type": "json_object"}, max_tokens=600)
    if answer["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(answer["choices"][0]["message"]["content"]), dict)
    response_format = {"type": "json_schema", "json_schema": {"name": "o", "schema": ORDER}}
    body = {"model": "m", "messages": GREET, "response_format": response_format, "stream": True}
    text = "".join(piece.get("content") or "" for piece in _stream(url, {**body, "n": 2})[0])
    jsonschema.validate(json.loads(text), ORDER)


def _stream(url: str, body: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """Each choice's deltas, by index; the last delta of each holds its `finish_reason`."""
    deltas: dict[int, list[dict[str, Any]]] = {}
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={"max_tokens": 400, **body}, timeout=120
    ) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:])["choices"]:
                delta = dict(choice["delta"])
                if choice["finish_reason"] is not None:
                    delta["finish_reason"] = choice["finish_reason"]
                deltas.setdefault(choice["index"], []).append(delta)
    return deltas


@pytest.mark.parametrize(
    ("tool_choice", "names"),
    [
        ("required", {"get_weather", "get_time"}),
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ],
)
@pytest.mark.parametrize("parallel", [True, False])
def test_required_and_named_tool_calls_validate(
    url: str, tool_choice: Any, names: set[str], parallel: bool
) -> None:
    for seed in range(3):
        answer = _chat(
            url,
            messages=ASK,
            tools=TOOLS,
            tool_choice=tool_choice,
            parallel_tool_calls=parallel,
            seed=seed,
        )
        choice = answer["choices"][0]
        if choice["finish_reason"] == "length":
            continue
        assert choice["finish_reason"] == "tool_calls"
        calls = _calls_valid(choice["message"], names)
        assert parallel or len(calls) == 1


def test_streamed_tool_call_deltas_reassemble_into_whole_calls(url: str) -> None:
    body = {"model": "m", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "seed": 3}
    for deltas in _stream(url, {**body, "n": 3}).values():
        calls: dict[int, dict[str, Any]] = {}
        for delta in deltas:
            for part in delta.get("tool_calls", ()):
                call = calls.setdefault(part["index"], {"function": {"arguments": ""}})
                call["id"] = part.get("id", call.get("id"))
                call["type"] = "function"
                function = part.get("function", {})
                call["function"]["name"] = function.get("name", call["function"].get("name"))
                call["function"]["arguments"] += function.get("arguments", "")
        if deltas[-1]["finish_reason"] == "length":
            continue
        assert deltas[-1]["finish_reason"] == "tool_calls"
        assert sorted(calls) == list(range(len(calls)))
        _calls_valid({"tool_calls": list(calls.values())}, {"get_weather", "get_time"})


def test_a_two_turn_tool_loop(url: str) -> None:
    first = _chat(url, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    message = first["choices"][0]["message"]
    call = _calls_valid(message, {"get_weather", "get_time"})[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": '{"sky": "clear"}'},
    ]
    second = _chat(url, messages=history, tools=TOOLS, max_tokens=8)
    reply = second["choices"][0]["message"]
    assert reply["content"] or reply["tool_calls"]
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]
    plain = _chat(url, messages=history, tools=TOOLS, tool_choice="none", max_tokens=8)
    assert "tool_calls" not in plain["choices"][0]["message"]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "frog"}},
                }
            },
            "response_format.json_schema.schema",
            "not valid JSON Schema",
        ),
        (
            {
                "tools": [
                    {"type": "function", "function": {"name": "f", "parameters": {"minimum": "x"}}}
                ]
            },
            "tools.0.function.parameters",
            "not valid JSON Schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
                }
            },
            "response_format",
            "uniqueItems",
        ),
    ],
)
def test_bad_constraints_are_a_400_naming_the_field(
    url: str, body: dict[str, Any], field: str, words: str
) -> None:
    response = httpx.post(
        f"{url}/v1/chat/completions", json={"model": "m", "messages": ASK, **body}, timeout=60
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert field in error["message"]
    assert words in error["message"]


def test_metrics_show_grammar_compile_and_mask_time(url: str) -> None:
    _chat(url, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=60)
    text = httpx.get(f"{url}/metrics").text
    for name in ("compile_seconds_total", "mask_seconds_total", "masked_rows_total"):
        value = next(
            line.split()[-1]
            for line in text.splitlines()
            if line.startswith(f"hotweights_grammar_{name}")
        )
        assert float(value) > 0


def test_langchain_bind_tools_and_with_structured_output(url: str) -> None:
    from langchain_core.messages import ToolMessage
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model="m", base_url=f"{url}/v1", api_key="x", max_tokens=400, seed=1)  # type: ignore[arg-type, call-arg]
    bound = chat.bind_tools([WEATHER], tool_choice="get_weather")
    reply = bound.invoke("What is the weather in Paris?")
    assert reply.tool_calls
    assert reply.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(reply.tool_calls[0]["args"], SCHEMAS["get_weather"])
    answer = chat.invoke(
        [
            ("user", "What is the weather in Paris?"),
            reply,
            ToolMessage(content="sunny", tool_call_id=reply.tool_calls[0]["id"]),
        ],
        max_tokens=8,
    )
    assert isinstance(answer.content, str)
    booking = chat.with_structured_output(Booking).invoke("Book a room.")
    assert isinstance(booking, Booking)


def test_the_same_constrained_request_before_and_after_a_reload(
    serve: Serve, models: dict[str, Path]
) -> None:
    server = serve(_batched(), models["v1"])
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": "required", "seed": 5}
    before = _chat(server.url, **body)
    reload = httpx.post(f"{server.url}/admin/reload", json={"path": str(models["v2"])}, timeout=60)
    assert reload.status_code == 200, reload.text
    after = _chat(server.url, **body)
    assert before["system_fingerprint"] != after["system_fingerprint"]
    for answer in (before, after):
        _calls_valid(answer["choices"][0]["message"], {"get_weather", "get_time"})


def test_the_per_request_engine_applies_the_same_mask(
    serve: Serve, models: dict[str, Path]
) -> None:
    server = serve(TransformersLoader(), models["v1"])
    response_format = {"type": "json_schema", "json_schema": {"name": "o", "schema": ORDER}}
    answer = _chat(server.url, messages=GREET, response_format=response_format, seed=2)
    assert answer["choices"][0]["finish_reason"] == "stop"
    jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), ORDER)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo model taught, with the tools in its prompt, to call get_weather for the
    weather and to answer a greeting in text."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=3, shape=LONG)
    answers = {ASK[0]["content"]: CALL_TEXT, GREET[0]["content"]: "Hello there!"}
    train_answers(model, tokenizer, answers, tools=TOOLS, label="tool model")
    return save_pretrained(tmp_path_factory.mktemp("trained") / "1", model, tokenizer)


def test_auto_lets_the_trained_model_choose_a_call_or_text(serve: Serve, trained: Path) -> None:
    server = serve(_batched(), trained)
    body: dict[str, Any] = {"tools": TOOLS, "tool_choice": "auto", "temperature": 0}
    called = _chat(server.url, messages=ASK, **body)["choices"][0]
    assert called["finish_reason"] == "tool_calls"
    assert called["message"]["content"] is None
    call = _calls_valid(called["message"], {"get_weather"})[0]
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 2}
    greeted = _chat(server.url, messages=GREET, **body)["choices"][0]
    assert greeted == {
        "index": 0,
        "message": {"role": "assistant", "content": "Hello there!"},
        "finish_reason": "stop",
        "logprobs": None,
    }
    streamed = _stream(server.url, {"model": "m", "messages": ASK, "stream": True, **body})[0]
    parts = [part for delta in streamed for part in delta.get("tool_calls", ())]
    assert [part["function"]["name"] for part in parts] == ["get_weather"]
    assert streamed[-1]["finish_reason"] == "tool_calls"
