"""Streams keep their version to the end; disconnects and deadlines release it."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from hotweights.config import Config
from hotweights.server.assembly import build_state
from hotweights.server.server_state import ServerState
from hotweights.testing import ServerThread
from tests.fakes import FakeTextLoader, StepGate
from tests.server.conftest import Serve


def _events(lines: Iterator[str]) -> Iterator[Any]:
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


def _chat(stream: bool, max_tokens: int = 6) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


def _reload(server: ServerThread, path: Path, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/reload", json={"path": str(path), **body}, timeout=30)


def test_a_stream_started_on_g1_finishes_on_g1(serve: Serve, tmp_path: Path) -> None:
    gate = StepGate(at=3)
    loader = FakeTextLoader(before_step=gate)
    v1, v2 = tmp_path / "1", tmp_path / "2"
    server = serve(loader, v1)
    reloader = server.state.models["m"].reloader
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=_chat(True)) as response:
            assert response.headers["x-hotweights-generation"] == "1"
            events = _events(response.iter_lines())
            first = next(events)
            assert gate.reached.wait(10)
            # Generation 2 goes live while the stream is held mid-way.
            assert _reload(server, v2).json()["new_generation"] == 2
            loader.before_step = None
            loader.models[-1].before_step = None
            fresh = client.post("/v1/chat/completions", json=_chat(False, 2)).json()
            assert fresh["system_fingerprint"].startswith("hw-g2-")
            gate.release()
            rest = list(events)
        assert rest[-1] == "[DONE]"
        chunks = [first, *rest[:-1]]
        assert {c["system_fingerprint"] for c in chunks} == {first["system_fingerprint"]}
        assert first["system_fingerprint"].startswith("hw-g1-")
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == "".join(f"{v1}:{i} " for i in range(6))
    assert reloader.wait_drained(10)
    assert loader.models[0].unloaded


def test_a_client_that_disconnects_releases_its_lease(serve: Serve, tmp_path: Path) -> None:
    gate = StepGate(at=2)
    loader = FakeTextLoader(before_step=gate)
    server = serve(loader, tmp_path / "1", drain_timeout=60)
    reloader = server.state.models["m"].reloader
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=_chat(True, 50)) as response,
    ):
        # Keep the line iterator alive: dropping it would close the response early.
        events = _events(response.iter_lines())
        next(events)
        assert gate.reached.wait(10)
        assert reloader.slot.inflight() == {1: 1}
    # The client hung up mid-stream. Once g2 is live, g1 can drain only if that lease
    # was released: with a 60 s drain timeout, a leak would hold the drain past 10 s.
    loader.before_step = None
    assert _reload(server, tmp_path / "2").status_code == 200
    gate.release()
    assert reloader.wait_drained(10)
    assert loader.models[0].unloaded
    assert reloader.slot.inflight() == {2: 0}


def test_a_non_stream_client_that_disconnects_stops_its_generation(
    serve: Serve, tmp_path: Path
) -> None:
    gate = StepGate(at=2)
    steps: list[int] = []

    def record(step: int) -> None:
        steps.append(step)
        gate(step)

    loader = FakeTextLoader(before_step=record)
    server = serve(loader, tmp_path / "1", drain_timeout=60)
    served = server.state.models["m"]
    reloader = served.reloader
    body = json.dumps(_chat(False, 1000)).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert gate.reached.wait(10)
        assert served.pending == 1
    # The client hung up (its connection closed) while step 2 is held. The server notices
    # and gives the request up: nothing waits for it any more.
    for _ in range(1000):
        if served.pending == 0:
            break
        threading.Event().wait(0.01)
    assert served.pending == 0, "the server did not notice the disconnect"
    loader.before_step = None
    assert _reload(server, tmp_path / "2").status_code == 200
    gate.release()
    assert reloader.wait_drained(10)
    assert max(steps) == 2, f"generated {max(steps) + 1} tokens for nobody"
    assert loader.models[0].unloaded


def test_a_stream_past_the_drain_deadline_ends_with_an_error_event(
    serve: Serve, tmp_path: Path
) -> None:
    gate = StepGate(at=2)
    loader = FakeTextLoader(before_step=gate)
    server = serve(loader, tmp_path / "1", drain_timeout=0.05)
    reloader = server.state.models["m"].reloader
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=_chat(True, 8)) as response,
    ):
        events = _events(response.iter_lines())
        next(events)
        assert gate.reached.wait(10)
        loader.before_step = None
        assert _reload(server, tmp_path / "2").status_code == 200
        # Step 2 is running inside the lease: the drain waits for it to return.
        assert not reloader.wait_drained(0.2)
        gate.release()
        rest = list(events)
    assert rest[-1] == "[DONE]"
    error = rest[-2]["error"]
    assert error["code"] == "version_retired"
    assert "drain deadline" in error["message"]
    assert reloader.wait_drained(10)
    assert loader.models[0].unloaded


def test_model_at_version_reaches_a_draining_version(serve: Serve, tmp_path: Path) -> None:
    gate = StepGate(at=1)
    loader = FakeTextLoader(before_step=gate)
    server = serve(loader, tmp_path / "1")
    reloader = server.state.models["m"].reloader
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json=_chat(True, 4)) as response,
    ):
        events = _events(response.iter_lines())
        next(events)
        assert gate.reached.wait(10)
        loader.before_step = None
        assert _reload(server, tmp_path / "2").status_code == 200

        def ask(model: str) -> httpx.Response:
            return client.post("/v1/chat/completions", json={**_chat(False, 1), "model": model})

        for model, generation in (("m@1", 1), ("m@g1", 1), ("m@2", 2), ("m", 2)):
            answer = ask(model)
            assert answer.status_code == 200, answer.text
            assert answer.json()["system_fingerprint"].startswith(f"hw-g{generation}-")
        missing = ask("m@7")
        assert missing.status_code == 404
        assert "resident: 2 (g2), 1 (g1)" in missing.json()["error"]["message"]
        assert ask("m@x").status_code == 400
        gate.release()
        assert list(events)[-1] == "[DONE]"
    assert reloader.wait_drained(10)
    assert ask_after(server, "m@1").status_code == 404


def ask_after(server: ServerThread, model: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", json={**_chat(False, 1), "model": model})


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_a_response_still_generating_when_shutdown_ends_gets_an_error(
    tmp_path: Path, stream: bool
) -> None:
    """uvicorn cancels what is left when its grace ends; just before, the server tells
    each response still generating, at its next token, instead of dropping it."""
    at_step = threading.Event()
    state: ServerState | None = None

    def hold_until_the_cut(step: int) -> None:
        if step == 3:
            at_step.set()
            assert state is not None
            assert state.cut.wait(30), "the server never cut this response"

    source = tmp_path / "1"
    config = Config.load({"source": str(source), "model_name": "m"}, environ={})
    state = build_state(config, FakeTextLoader(before_step=hold_until_the_cut))
    server = ServerThread(state, grace=2).start()
    server.wait_live()

    def stop_once_held() -> None:
        assert at_step.wait(30)
        server.stop()  # shutdown: the listener closes, the grace (2 s) runs

    stopper = threading.Thread(target=stop_once_held)
    stopper.start()
    with httpx.Client(timeout=30) as client:
        body = _chat(stream, 1000)
        if stream:
            with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as reply:
                rest = list(_events(reply.iter_lines()))
            assert rest[-1] == "[DONE]"
            error = rest[-2]["error"]
            pieces = [e["choices"][0]["delta"].get("content") for e in rest[:-2]]
            assert pieces[-3:] == [f"{source}:{i} " for i in (1, 2, 3)]  # to the held step
        else:
            response = client.post(f"{server.url}/v1/chat/completions", json=body)
            assert response.status_code == 503
            error = response.json()["error"]
    stopper.join(30)
    assert not stopper.is_alive()
    assert (error["type"], error["code"]) == ("service_unavailable", "shutting_down")
    assert "shut down before this response was complete" in error["message"]
    assert state.models["m"].pending == 0
    assert state.models["m"].reloader.slot.inflight() == {}
