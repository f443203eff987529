"""A request's end is recorded exactly once, its lease released and its pending count left,
whatever ends it: an error before admission or before the first byte, a JSON answer, a
stream's end, a client that went away, a canary retried on the stable version."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from hotweights.core import Notice, VersionChanged, VersionState
from hotweights.generation import GenerationParams, TokenChunk
from hotweights.server.admission import CLIENT_CLOSED, Admission
from hotweights.server.server_state import ServedModel, ServerState
from hotweights.testing import ServerThread
from tests.fakes import FakeTextLoader, FakeTextModel, StepGate
from tests.server.conftest import Serve


@dataclass(frozen=True)
class Record:
    generation: int
    status: int
    tokens: int


class Records:
    """Every `ServerState.finished` call of a server, in order."""

    def __init__(self, state: ServerState, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[Record] = []
        self._changed = threading.Condition()
        original = state.finished

        def finished(
            served: ServedModel,
            endpoint: str,
            generation: int,
            status: int,
            seconds: float,
            tokens: int = 0,
        ) -> None:
            original(served, endpoint, generation, status, seconds, tokens)
            with self._changed:
                self.calls.append(Record(generation, status, tokens))
                self._changed.notify_all()

        monkeypatch.setattr(state, "finished", finished)

    def wait(self, count: int, timeout: float = 10) -> list[Record]:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.calls) >= count, timeout), self.calls
            return list(self.calls)


def _chat(stream: bool = False, max_tokens: int = 3, **extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": max_tokens,
        "stream": stream,
        **extra,
    }


def _settled(server: ServerThread, records: Records, count: int) -> list[Record]:
    """Every record once `count` were made and the server has stopped (so that no second,
    wrong, record of a request can come later); the model's pending count is back to 0."""
    records.wait(count)
    server.stop()
    assert server.state.models["m"].pending == 0
    return list(records.calls)


@pytest.fixture
def gated(serve: Serve, tmp_path: Path) -> tuple[ServerThread, StepGate]:
    gate = StepGate(at=1)
    return serve(FakeTextLoader(before_step=gate), tmp_path / "1"), gate


def test_json_answers_and_refusals_are_each_recorded_once(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(FakeTextLoader(), tmp_path / "1")
    records = Records(server.state, monkeypatch)
    url = f"{server.url}/v1/chat/completions"
    assert httpx.post(url, json=_chat(), timeout=10).status_code == 200
    # Refused by the model when its sequence is submitted: before the first byte.
    refused = httpx.post(url, json=_chat(logit_bias={"5000": 1}), timeout=10)
    assert refused.status_code == 400, refused.text
    # Refused at admission: a version that is not resident.
    assert httpx.post(url, json={**_chat(), "model": "m@9"}, timeout=10).status_code == 404
    assert _settled(server, records, 3) == [
        Record(1, 200, 3),
        Record(1, 400, 0),
        Record(0, 404, 0),
    ]


def test_a_stream_is_recorded_once_when_it_ends(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(FakeTextLoader(), tmp_path / "1")
    records = Records(server.state, monkeypatch)
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=_chat(True, 4), timeout=10
    ) as reply:
        lines = [line for line in reply.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert _settled(server, records, 1) == [Record(1, 200, 4)]


def test_a_stream_whose_client_went_away_is_recorded_once(
    gated: tuple[ServerThread, StepGate], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, gate = gated
    records = Records(server.state, monkeypatch)
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=_chat(True, 50), timeout=10
    ) as reply:
        next(line for line in reply.iter_lines() if line.startswith("data: {"))
        assert gate.reached.wait(10)
    calls = records.wait(1)  # noticed while the engine still holds the step
    gate.release()
    assert calls == [Record(1, CLIENT_CLOSED, 1)]
    assert _settled(server, records, 1) == calls


def test_a_json_request_whose_client_went_away_is_recorded_once(
    gated: tuple[ServerThread, StepGate], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, gate = gated
    records = Records(server.state, monkeypatch)
    body = json.dumps(_chat(False, 50)).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert gate.reached.wait(10)
    calls = records.wait(1)
    gate.release()
    assert calls == [Record(1, CLIENT_CLOSED, 0)]
    assert _settled(server, records, 1) == calls


def test_a_request_refused_for_overload_is_recorded_once_without_a_generation(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = StepGate(at=1)
    server = serve(FakeTextLoader(before_step=gate), tmp_path / "1", max_pending=1)
    records = Records(server.state, monkeypatch)
    url = f"{server.url}/v1/chat/completions"
    held: list[int] = []
    first = threading.Thread(target=lambda: held.append(httpx.post(url, json=_chat()).status_code))
    first.start()
    assert gate.reached.wait(10)
    assert httpx.post(url, json=_chat(), timeout=10).status_code == 429
    assert records.wait(1) == [Record(0, 429, 0)]
    gate.release()
    first.join(10)
    assert held == [200]
    assert _settled(server, records, 2) == [Record(0, 429, 0), Record(1, 200, 3)]


class FailingModel(FakeTextModel):
    """Refuses every stream with a server-side error (a broken version)."""

    def stream(self, prompt: str | Sequence[int], params: GenerationParams) -> Iterator[TokenChunk]:
        raise RuntimeError(f"injected fault in {self.source}")


class CanaryLoader(FakeTextLoader):
    """Loads directory `2` as a `FailingModel`."""

    def load(self, source: str) -> FakeTextModel:
        if Path(source).name != "2":
            return super().load(source)
        model = FailingModel(source)
        self.models.append(model)
        return model


def test_a_request_retried_from_a_failing_canary_is_recorded_once_on_stable(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "2").mkdir()
    options = {"canary": "50%", "bake": "120s", "canary_min_requests": 1000}
    server = serve(CanaryLoader(), tmp_path / "1", **options)
    reloader = server.state.models["m"].reloader
    baking = threading.Event()

    def observe(notice: Notice) -> None:
        if isinstance(notice, VersionChanged) and notice.new is VersionState.CANARY:
            baking.set()

    reloader.subscribe(observe)
    reload = {"path": str(tmp_path / "2"), "wait": False}
    assert httpx.post(f"{server.url}/admin/reload", json=reload, timeout=10).status_code == 202
    assert baking.wait(30)
    records = Records(server.state, monkeypatch)
    url = f"{server.url}/v1/chat/completions"
    for stream in (False, True, False, True):
        with httpx.stream("POST", url, json=_chat(stream), timeout=10) as reply:
            reply.read()
            assert reply.status_code == 200
            assert reply.headers["x-hotweights-generation"] == "1"
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'hotweights_canary_retries_total{generation="2",model="m"} 2.0' in metrics
    assert _settled(server, records, 4) == [Record(1, 200, 3)] * 4


async def test_finish_is_idempotent_and_releases_once(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(FakeTextLoader(), tmp_path / "1")
    records = Records(server.state, monkeypatch)
    served = server.state.models["m"]
    admission = Admission(server.state, served, "chat")
    lease = await admission.admit()
    assert served.pending == 1
    assert served.reloader.inflight() == {1: 1}
    admission.finish(200, 5)
    admission.finish(500)
    admission.fail(RuntimeError("late"))
    assert admission.finished
    assert lease.released
    assert served.pending == 0
    assert served.reloader.inflight() == {1: 0}
    assert records.calls == [Record(1, 200, 5)]
