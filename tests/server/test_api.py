"""The HTTP surface with a fake model: shapes, errors, admin, access, metrics."""

from __future__ import annotations

import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from hotweights.core import Notice, ReloadFinished
from hotweights.errors import LoadError, ValidationError
from tests.fakes import FakeTextLoader
from tests.server.conftest import Serve

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3}


def _error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    error: dict[str, Any] = body["error"]
    return error


@pytest.fixture
def server_url(serve: Serve, tmp_path: Path) -> str:
    return serve(FakeTextLoader(), tmp_path / "1", max_prompt_tokens=50, max_body_bytes=4000).url


def test_completions_name_their_generation(server_url: str, tmp_path: Path) -> None:
    chat = httpx.post(f"{server_url}/v1/chat/completions", json=CHAT)
    assert chat.status_code == 200
    assert chat.headers["x-hotweights-generation"] == "1"
    body = chat.json()
    assert body["object"] == "chat.completion"
    assert body["system_fingerprint"].startswith("hw-g1-")
    assert body["choices"][0]["message"]["content"] == "".join(
        f"{tmp_path / '1'}:{i} " for i in range(3)
    )
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    text = httpx.post(
        f"{server_url}/v1/completions", json={"model": "m", "prompt": "a b c", "max_tokens": 2}
    ).json()
    assert text["object"] == "text_completion"
    assert text["usage"]["prompt_tokens"] == 3
    models = httpx.get(f"{server_url}/v1/models").json()
    assert [(m["id"], m["generation"]) for m in models["data"]] == [("m", 1)]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "m"}, 400, "invalid_request"),
        ({**CHAT, "messages": []}, 400, "invalid_request"),
        ({**CHAT, "temperature": 5}, 400, "invalid_request"),
        ({**CHAT, "top_p": 0}, 400, "invalid_request"),
        ({**CHAT, "n": 17}, 400, "invalid_request"),
        ({**CHAT, "top_logprobs": 2}, 400, "invalid_request"),
        ({**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "invalid_request"),
        ({**CHAT, "logit_bias": {"x": 1}}, 400, "invalid_request"),
        ({**CHAT, "logit_bias": {"5000": 1}}, 400, "invalid_request"),
        ({**CHAT, "presence_penalty": 3}, 400, "invalid_request"),
        ({**CHAT, "response_format": {"type": "json_object"}}, 400, "invalid_request"),
        (
            {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
            400,
            "invalid_request",
        ),
        ({**CHAT, "tool_choice": "required"}, 400, "invalid_request"),
        ({**CHAT, "reasoning_effort": "low"}, 400, "invalid_request"),
        ({**CHAT, "no_such_field": 1}, 400, "invalid_request"),
        ({**CHAT, "functions": [{"name": "f"}]}, 400, "invalid_request"),
        ({**CHAT, "function_call": {"name": "f"}}, 400, "invalid_request"),
        ({**CHAT, "modalities": ["text", "audio"]}, 400, "invalid_request"),
        ({**CHAT, "audio": {"voice": "x"}}, 400, "invalid_request"),
        ({**CHAT, "prediction": {"type": "content", "content": "x"}}, 400, "invalid_request"),
        ({**CHAT, "verbosity": "low"}, 400, "invalid_request"),
        ({**CHAT, "web_search_options": {}}, 400, "invalid_request"),
        (
            {
                **CHAT,
                "messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}],
            },
            400,
            "invalid_request",
        ),
        ({**CHAT, "max_tokens": 0}, 400, "invalid_request"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_request"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_request"),
        ({**CHAT, "model": "other"}, 404, "model_not_found"),
        ({**CHAT, "messages": [{"role": "user", "content": "w " * 60}]}, 413, "payload_too_large"),
        ({**CHAT, "messages": [{"role": "user", "content": "w" * 5000}]}, 413, "payload_too_large"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(
    server_url: str, body: dict[str, Any], status: int, code: str
) -> None:
    response = httpx.post(f"{server_url}/v1/chat/completions", json=body)
    assert _error(response, status)["code"] == code


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "tools": [{"type": "function"}]}, "tools.0.function"),
        ({**CHAT, "response_format": {"type": "json_schema"}}, "response_format"),
        ({**CHAT, "tool_choice": "required"}, "tool_choice"),
        ({**CHAT, "no_such_field": 1}, "no_such_field"),
        ({**CHAT, "audio": {"voice": "x"}}, "audio"),
    ],
)
def test_a_refusal_names_its_field(server_url: str, body: dict[str, Any], param: str) -> None:
    error = _error(httpx.post(f"{server_url}/v1/chat/completions", json=body), 400)
    assert error["param"] == param
    assert param in error["message"]


def test_fields_that_cannot_change_the_answer_are_accepted(server_url: str) -> None:
    plain = httpx.post(f"{server_url}/v1/chat/completions", json=CHAT).json()
    accepted = {
        **CHAT,
        "user": "u",
        "metadata": {"k": "v"},
        "store": True,
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
        "parallel_tool_calls": True,
        "tool_choice": "none",
        "modalities": ["text"],
        "response_format": {"type": "text"},
        "stream_options": None,
        "messages": [{"role": "user", "content": "hi there", "name": "ann"}],
    }
    answer = httpx.post(f"{server_url}/v1/chat/completions", json=accepted)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"] == plain["choices"]


def test_prompt_and_choice_limits(server_url: str) -> None:
    url = f"{server_url}/v1/completions"
    many = httpx.post(url, json={"model": "m", "prompt": ["a"] * 65})
    assert "64 prompts" in _error(many, 400)["message"]
    wide = httpx.post(url, json={"model": "m", "prompt": ["a"] * 33, "n": 2})
    assert "at most 64" in _error(wide, 400)["message"]
    fits = httpx.post(url, json={"model": "m", "prompt": ["a b"] * 32, "n": 2, "max_tokens": 1})
    assert [c["index"] for c in fits.json()["choices"]] == list(range(64))
    for missing in ("/v1/embeddings", "/v1/responses"):
        assert httpx.post(f"{server_url}{missing}", json={"model": "m"}).status_code == 404


def test_bad_bodies_and_routes(server_url: str) -> None:
    broken = httpx.post(
        f"{server_url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert _error(broken, 400)["type"] == "invalid_request_error"
    assert _error(httpx.get(f"{server_url}/v1/nothing"), 404)["code"] == "http_404"
    assert _error(httpx.get(f"{server_url}/v1/chat/completions"), 405)["code"] == "http_405"


def test_a_failed_reload_answers_with_its_cause_and_the_old_version_serves(
    serve: Serve, tmp_path: Path
) -> None:
    bad = tmp_path / "bad"
    loader = FakeTextLoader(
        fail={
            (str(bad), "load"): LoadError(f"{bad}/model.safetensors is truncated"),
            (str(tmp_path / "odd"), "validate"): ValidationError("logits are not finite"),
        }
    )
    server = serve(loader, tmp_path / "1")
    for path, cause in ((bad, "is truncated"), (tmp_path / "odd", "not finite")):
        response = httpx.post(f"{server.url}/admin/reload", json={"path": str(path)})
        error = _error(response, 422)
        assert cause in error["message"]
        assert "generation 1 keeps serving" in error["message"]
        assert response.json()["event"]["outcome"] == "failed"
        served = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
        assert served.json()["system_fingerprint"].startswith("hw-g1-")
    reloads = httpx.get(f"{server.url}/admin/reloads").json()
    assert [e["outcome"] for e in reloads["events"]] == ["failed", "failed", "live"]
    assert reloads["summary"]["by_outcome"]["failed"] == 2


def test_admin_reload_rollback_versions_status(serve: Serve, tmp_path: Path) -> None:
    server = serve(FakeTextLoader(), tmp_path / "1")
    url = server.url
    done: dict[int, threading.Event] = defaultdict(threading.Event)

    def finished(event_id: int) -> threading.Event:
        return done[event_id]

    def observe(notice: Notice) -> None:
        if isinstance(notice, ReloadFinished):
            done[notice.event.id].set()

    server.state.models["m"].reloader.subscribe(observe)
    assert _error(httpx.post(f"{url}/admin/rollback"), 409)["code"] == "no_previous_version"
    accepted = httpx.post(f"{url}/admin/reload", json={"path": str(tmp_path / "2"), "wait": False})
    assert accepted.status_code == 202
    event_id = accepted.json()["id"]
    assert finished(event_id).wait(10)
    assert httpx.get(f"{url}/admin/reloads/{event_id}").json()["new_generation"] == 2
    assert _error(httpx.get(f"{url}/admin/reloads/999"), 404)["code"] == "http_404"
    rolled = httpx.post(f"{url}/admin/rollback").json()
    assert (rolled["outcome"], rolled["new_generation"], rolled["target"]) == (
        "rolled_back",
        3,
        str(tmp_path / "1"),
    )
    again = httpx.post(f"{url}/admin/reload").json()  # no path: the live source again
    assert (again["target"], again["new_generation"]) == (str(tmp_path / "1"), 4)
    versions = httpx.get(f"{url}/admin/versions").json()["versions"]
    assert [v["generation"] for v in versions] == [4, 3, 2, 1]
    assert versions[0]["state"] == "live"
    status = httpx.get(f"{url}/admin/status").json()["models"]["m"]
    assert status["generation"] == 4
    assert status["reloading"] is None


def test_reload_paths_must_stay_inside_the_model_roots(serve: Serve, tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "escape").symlink_to(tmp_path)
    server = serve(FakeTextLoader(), root / "1")
    for path in ("/etc", str(root / ".." / "elsewhere"), str(root / "escape")):
        response = httpx.post(f"{server.url}/admin/reload", json={"path": path})
        assert "outside the model roots" in _error(response, 403)["message"]


def test_admin_token_is_required_when_set(serve: Serve, tmp_path: Path) -> None:
    server = serve(FakeTextLoader(), tmp_path / "1", admin_token="s3cret")
    schema = httpx.get(f"{server.url}/openapi.json").json()
    routes = [
        (method.upper(), path.replace("{name}", "m").replace("{event_id}", "1"))
        for path, methods in schema["paths"].items()
        if path.startswith("/admin")
        for method in methods
    ]
    assert len(routes) >= 15  # every admin route the app has, single-model and per-model
    for method, route in routes:
        missing = httpx.request(method, server.url + route)
        assert _error(missing, 401)["type"] == "authentication_error"
        wrong = httpx.request(method, server.url + route, headers={"Authorization": "Bearer no"})
        assert _error(wrong, 403)["type"] == "permission_error"
    ok = httpx.get(f"{server.url}/admin/status", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    # Inference stays open.
    assert httpx.post(f"{server.url}/v1/chat/completions", json=CHAT).status_code == 200


def test_no_live_version_is_a_503(serve: Serve, tmp_path: Path) -> None:
    source = tmp_path / "1"
    loader = FakeTextLoader(fail={(str(source), "load"): LoadError("no weights")})
    server = serve(loader, source, wait=False)
    # Joins the startup load if it still runs, else tries once more: either way it fails.
    event = server.state.models["m"].reloader.submit(str(source)).wait(10)
    assert event.error_message == "load: no weights"
    assert _error(httpx.get(f"{server.url}/ready"), 503)["code"] == "no_live_version"
    response = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT)
    assert _error(response, 503)["code"] == "no_live_version"
    assert response.headers["retry-after"] == "1"
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_metrics_count_requests_by_generation(server_url: str) -> None:
    for _ in range(2):
        httpx.post(f"{server_url}/v1/chat/completions", json=CHAT)
    httpx.post(f"{server_url}/v1/chat/completions", json={**CHAT, "model": "nope"})
    text = httpx.get(f"{server_url}/metrics").text
    assert (
        'hotweights_requests_total{endpoint="chat",generation="1",model="m",status="200"} 2.0'
        in text
    )
    assert 'hotweights_live_generation{model="m"} 1.0' in text
    assert 'hotweights_reloads_total{model="m",outcome="live"} 1.0' in text
    assert 'hotweights_generated_tokens_total{generation="1",model="m"} 6.0' in text
    assert 'hotweights_reload_phase_seconds_count{model="m",phase="load"} 1.0' in text
