"""Schema-driven fuzzing of every endpoint, from the live server's own OpenAPI schema.

Whatever schemathesis sends (bodies that fit the schema, and bodies, parameters and
types that do not, with or without the admin token), a server with a fake model never
answers 5xx, and every 4xx carries OpenAI's error shape:
`{"error": {"message", "type", "param", "code"}}`.

Each operation runs in three modes (about 30 examples each, derandomized so CI sees the
same cases every run):
- `steered`: valid data with the admin token, the `name` parameters naming the served
  model and three bodies in four pointed at it (`model: m@...`, a reload path inside the
  model root, a pin to a version that exists), so the cases get past "no such model"
  into the handlers;
- `negative`: data that breaks the schema, with the admin token;
- `anonymous`: valid data, the authorization header generated too (401/403 shapes).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Ok
from schemathesis.schemas import APIOperation, BaseSchema

from hotweights.backends import TransformersLoader
from hotweights.demo.tinylm import save_tiny_model
from hotweights.engine.batching_loader import BatchingLoader, EngineSettings
from hotweights.sources import publish
from hotweights.testing import ServerThread
from tests.fakes import FakeTextLoader, assert_batched
from tests.server.conftest import Serve
from tests.sources.layouts import WEIGHTS, write_files

TOKEN = "fuzz-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MODEL = "m"
Operation = APIOperation[Any, Any, Any, Any]
AnyCase = Case[Any]
MIN_OPERATIONS = 21
"""What the schema held when this was written: a route gone missing fails loudly."""


def _fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,  # the same cases on every run: a CI failure reproduces
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )


@dataclass(frozen=True)
class Mode:
    name: str
    generation: GenerationMode
    examples: int
    authorized: bool
    steered: bool


MODES = (
    Mode("steered", GenerationMode.POSITIVE, 30, authorized=True, steered=True),
    Mode("negative", GenerationMode.NEGATIVE, 30, authorized=True, steered=False),
    Mode("anonymous", GenerationMode.POSITIVE, 10, authorized=False, steered=False),
)


@dataclass(frozen=True)
class Target:
    """What the fuzzed server serves, for steering cases at it."""

    server: ServerThread
    reload_root: Path
    """A directory reload paths may lie in (the model root, or the repository's model)."""
    versions: tuple[int, ...] = ()
    """Version numbers a pin may name (a repository's)."""


def _pin_suffix() -> st.SearchStrategy[str]:
    common = st.sampled_from(["", "", "", "@1", "@2", "@g1", "@g2", "@7", "@g", "@"])
    free = st.tuples(st.sampled_from(["@", "@g"]), st.text(max_size=6)).map("".join)
    return common | free


def _steer(case: AnyCase, data: st.DataObject, target: Target) -> None:
    """Point most bodies at what the server serves (a new dict: schemathesis notices)."""
    body = case.body
    if not isinstance(body, dict) or data.draw(st.integers(0, 3), label="steer") == 0:
        return
    if "messages" in body or "prompt" in body:
        case.body = {**body, "model": MODEL + data.draw(_pin_suffix(), label="model")}
    elif "path" in body:
        name = data.draw(st.sampled_from(["1", "2", "3"]) | st.text(max_size=12), label="path")
        case.body = {**body, "path": str(target.reload_root / name)}
    elif "version" in body and target.versions:
        case.body = {**body, "version": data.draw(st.sampled_from(target.versions))}


def check_openai_error_shape(label: str, status: int, content: bytes) -> None:
    """A 4xx/5xx body is `{"error": {"message", "type", "param", "code"}}`."""
    if status < 400:
        return
    where = f"{label} answered {status}"
    try:
        body = json.loads(content)
    except ValueError as exc:
        raise AssertionError(f"{where} with a body that is not JSON: {content[:200]!r}") from exc
    assert isinstance(body, dict), f"{where} with {body!r}"
    error = body.get("error")
    assert isinstance(error, dict), f"{where} without an 'error' object: {body!r}"
    assert set(error) >= {"message", "type", "param", "code"}, f"{where}: {error!r}"
    for field in ("message", "type"):  # always a non-empty string
        assert isinstance(error[field], str), f"{where}: {error!r}"
        assert error[field], f"{where} with an empty {field}: {error!r}"
    for field in ("param", "code"):  # a string or null
        assert error[field] is None or isinstance(error[field], str), f"{where}: {error!r}"


def _named(operation: Operation, location: str) -> dict[str, Any] | None:
    """`{"name": "m"}` when the operation has a `name` parameter in `location`."""
    names = {(p.name, p.location) for p in operation.iter_parameters()}
    return {"name": MODEL} if ("name", location) in names else None


Steer = Callable[[AnyCase, st.DataObject, Target], None]


def _fuzz(operation: Operation, mode: Mode, target: Target, steer: Steer | None = None) -> None:
    """Run `mode` on `operation`; raises what hypothesis raises (the shrunk failure)."""
    strategy = operation.as_strategy(
        generation_mode=mode.generation,
        headers=AUTH if mode.authorized else None,
        path_parameters=_named(operation, "path") if mode.steered else None,
        query=_named(operation, "query") if mode.steered else None,
    )

    @_fuzz_settings(mode.examples)
    @given(case=strategy, data=st.data())
    def fuzz(case: AnyCase, data: st.DataObject) -> None:
        if mode.steered:
            (steer or _steer)(case, data, target)
        response = case.call(base_url=target.server.url, timeout=30)
        status = response.status_code
        case.validate_response(response, checks=[not_a_server_error])
        check_openai_error_shape(case.operation.label, status, response.content)

    fuzz()


def _operations(schema: BaseSchema) -> Iterator[Operation]:
    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            raise AssertionError(f"the server's schema has an invalid operation: {result}")
        yield result.ok()


def _fuzz_everything(target: Target) -> None:
    """Every operation in every mode; all failures reported together."""
    schema = schemathesis.openapi.from_url(f"{target.server.url}/openapi.json", timeout=10)
    operations = list(_operations(schema))
    assert len(operations) >= MIN_OPERATIONS, [op.label for op in operations]
    failures: list[str] = []
    negative_runs = 0
    for operation in operations:
        for mode in MODES:
            try:
                _fuzz(operation, mode, target)
            except Unsatisfiable:
                # Nothing of this operation can break its schema (no body, string
                # parameters only, the token fixed): no negative case exists.
                assert mode.generation is GenerationMode.NEGATIVE, operation.label
                continue
            except (Exception, FailureGroup) as exc:  # FailureGroup: a BaseExceptionGroup
                failures.append(f"{operation.label} [{mode.name}]: {type(exc).__name__}: {exc}")
            negative_runs += mode.generation is GenerationMode.NEGATIVE
    assert negative_runs >= 8, "negative cases ran for too few operations"
    assert not failures, "\n\n".join(failures)
    for served in target.server.state.models.values():
        assert served.pending == 0, f"{served.name} still counts requests in progress"


def test_fuzz_every_endpoint_of_a_model_directory(serve: Serve, tmp_path: Path) -> None:
    root = tmp_path / "models"
    server = serve(FakeTextLoader(), root / "1", admin_token=TOKEN, model_name=MODEL)
    _fuzz_everything(Target(server, reload_root=root))


def test_fuzz_every_endpoint_of_a_repository(serve: Serve, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for name in ("a", "b"):
        publish(write_files(tmp_path / "build" / name, WEIGHTS), repo, MODEL)
    server = serve(FakeTextLoader(), None, repo=str(repo), admin_token=TOKEN, watch="poll")
    _fuzz_everything(Target(server, reload_root=repo / MODEL, versions=(1, 2)))


# What fuzzing found.


def test_a_pin_of_digits_that_are_not_ascii_is_a_client_error(serve: Serve, tmp_path: Path) -> None:
    """`m@g²`: '²'.isdigit() but int('²') raises; it was a 500 (fixed in f3c3b1c)."""
    server = serve(FakeTextLoader(), tmp_path / "1")
    for model in ("m@g²", "m@²", "m@g٣", "m@٣"):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
        assert response.status_code in (400, 404), (model, response.text)
        check_openai_error_shape(model, response.status_code, response.content)
    assert server.state.models["m"].pending == 0


def test_a_reload_path_with_a_nul_byte_is_a_client_error(serve: Serve, tmp_path: Path) -> None:
    """os.path.realpath raises ValueError on a NUL byte; it was a 500."""
    server = serve(FakeTextLoader(), tmp_path / "models" / "1")
    path = str(tmp_path / "models" / "2\x00")
    response = httpx.post(f"{server.url}/admin/reload", json={"path": path}, timeout=30)
    assert response.status_code in (400, 403), response.text
    check_openai_error_shape("POST /admin/reload", response.status_code, response.content)


GENERATION = ("POST /v1/chat/completions", "POST /v1/completions")
GENERATING = {
    *("model", "messages", "prompt", "temperature", "top_p", "stop", "seed", "stream"),
    *("stream_options", "n", "presence_penalty", "frequency_penalty", "logit_bias"),
    *("logprobs", "top_logprobs", "echo", "max_tokens", "max_completion_tokens"),
}
"""The fields that change what is generated; the rest are refused or have no effect."""


def _steer_to_the_engine(case: AnyCase, data: st.DataObject, target: Target) -> None:
    """Three bodies in four keep only the fields that generate, named at the model."""
    body = case.body
    if not isinstance(body, dict) or data.draw(st.integers(0, 3), label="steer") == 0:
        return
    kept = {key: value for key, value in body.items() if key in GENERATING}
    prompt = kept.get("prompt")
    if isinstance(prompt, list):  # token ids the tiny model has
        kept["prompt"] = _tiny_ids([_tiny_ids(i) if isinstance(i, list) else i for i in prompt])
    bias = kept.get("logit_bias")
    if isinstance(bias, dict):
        kept["logit_bias"] = {str(abs(hash(key)) % 200): value for key, value in bias.items()}
    case.body = {**kept, "model": MODEL}


def _tiny_ids(items: list[Any]) -> list[Any]:
    return [
        item % 200 if isinstance(item, int) and not isinstance(item, bool) else item
        for item in items
    ]


@pytest.mark.llm
def test_fuzz_generation_on_a_real_model(serve: Serve, tmp_path: Path) -> None:
    """The two generation endpoints against a real tiny model on its batched engine, so
    every field the schema offers (logprobs, echo, n, prompt lists, token ids, penalties,
    logit_bias) reaches the engine: no 5xx, and OpenAI's error shape on every 4xx."""
    source = save_tiny_model(tmp_path / "models" / "1", seed=1)
    loader = BatchingLoader(TransformersLoader(), EngineSettings(max_batch=8, kv_cache_bytes=2**22))
    server = serve(loader, source, model_name=MODEL, max_tokens_limit=4, max_prompt_tokens=64)
    assert_batched(server.url, MODEL, 1)
    target = Target(server, reload_root=source.parent)
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", timeout=10)
    operations = [op for op in _operations(schema) if op.label in GENERATION]
    assert len(operations) == len(GENERATION)
    failures: list[str] = []
    for operation in operations:
        for mode in MODES[:2]:
            try:
                _fuzz(operation, mode, target, _steer_to_the_engine)
            except (Exception, FailureGroup) as exc:
                failures.append(f"{operation.label} [{mode.name}]: {type(exc).__name__}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert server.state.models[MODEL].pending == 0
    answered = httpx.get(f"{server.url}/metrics").text
    for endpoint in ("chat", "completions"):  # cases got through validation to the engine
        labels = rf'endpoint="{endpoint}"[^}}]*status="200"'
        ok = re.search(rf"hotweights_requests_total{{[^}}]*{labels}[^}}]*}} (\S+)", answered)
        assert ok is not None, answered
        assert float(ok.group(1)) >= 3, ok.group(0)
