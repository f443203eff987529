"""Access to inference, overload, the audit trail across restarts, graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hotweights.testing import free_port
from tests.fakes import FakeTextLoader, StepGate
from tests.server.conftest import Serve
from tests.server.test_streams import _chat, _events, _reload


def test_the_inference_api_key(serve: Serve, tmp_path: Path) -> None:
    server = serve(FakeTextLoader(), tmp_path / "1", api_key="k3y")
    url = f"{server.url}/v1/chat/completions"
    assert httpx.post(url, json=_chat(False)).status_code == 401
    wrong = httpx.post(url, json=_chat(False), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403
    assert wrong.json()["error"]["type"] == "permission_error"
    ok = httpx.post(url, json=_chat(False), headers={"Authorization": "Bearer k3y"})
    assert ok.status_code == 200
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes stay open


def test_a_full_admission_queue_answers_429_and_recovers(serve: Serve, tmp_path: Path) -> None:
    gate = StepGate(at=1)
    server = serve(FakeTextLoader(before_step=gate), tmp_path / "1", max_pending=2)
    url = f"{server.url}/v1/chat/completions"
    with httpx.Client(timeout=30) as client:
        streams = [client.stream("POST", url, json=_chat(True, 3)) for _ in range(2)]
        responses = [stream.__enter__() for stream in streams]
        lines = [_events(response.iter_lines()) for response in responses]
        for events in lines:
            next(events)
        refused = client.post(url, json=_chat(False, 1))
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        gate.release()
        for events in lines:
            assert list(events)[-1] == "[DONE]"
        for stream in streams:
            stream.__exit__(None, None, None)
        assert client.post(url, json=_chat(False, 1)).status_code == 200
    assert server.state.models["m"].pending == 0


def test_the_audit_trail_survives_a_restart(serve: Serve, tmp_path: Path) -> None:
    audit = tmp_path / "audit" / "reloads.jsonl"
    first = serve(FakeTextLoader(), tmp_path / "1", audit_file=str(audit))
    assert _reload(first, tmp_path / "2").status_code == 200
    assert first.state.models["m"].reloader.wait_drained(10)
    first.stop()
    second = serve(FakeTextLoader(), tmp_path / "1", audit_file=str(audit))
    events = httpx.get(f"{second.url}/admin/reloads").json()["events"]
    assert [(e["trigger"], e["target"]) for e in events] == [
        ("startup", str(tmp_path / "1")),
        ("api", str(tmp_path / "2")),
        ("startup", str(tmp_path / "1")),
    ]
    assert "drain" in events[1]["phases"]  # the drain update folded into its event
    lines = audit.read_text().splitlines()
    assert all(json.loads(line)["model"] == "m" for line in lines)


@pytest.mark.llm
def test_sigterm_turns_unready_first_and_lets_a_stream_finish(tmp_path: Path) -> None:
    from hotweights.demo.tinylm import save_tiny_model

    source = save_tiny_model(tmp_path / "models" / "1")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "hotweights.cli", "serve", str(source), "--port", str(port)],
        env={**os.environ, "HOTWEIGHTS_SHUTDOWN_DELAY": "1.5", "HOTWEIGHTS_LOG_LEVEL": "warning"},
        stderr=log,
    )
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(600):  # up to 60 s for torch to import and the model to load
                try:
                    if client.get("/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if process.poll() is not None:
                    pytest.fail(f"the server exited: {(tmp_path / 'server.log').read_text()}")
                threading_wait(0.1)
            else:
                pytest.fail("the server did not become ready")
            body = {**_chat(True, 300), "model": "models", "temperature": 0}
            with client.stream("POST", "/v1/chat/completions", json=body) as response:
                events = _events(response.iter_lines())
                next(events)
                process.send_signal(signal.SIGTERM)
                assert client.get("/ready").status_code == 503
                rest = list(events)
            assert rest[-1] == "[DONE]"
            assert "error" not in rest[-2]
        # uvicorn re-raises the signal once shut down, as process managers expect.
        assert process.wait(60) in (0, -signal.SIGTERM)
        assert "Traceback" not in (tmp_path / "server.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def threading_wait(seconds: float) -> None:
    """Pacing a readiness poll (not synchronisation)."""
    import threading

    threading.Event().wait(seconds)


def _client_port(response: httpx.Response) -> int:
    stream = response.extensions["network_stream"]
    port: int = stream.get_extra_info("client_addr")[1]
    return port


@pytest.mark.parametrize(("keep_alive", "same_connection"), [(3.0, True), (1.0, False)])
def test_the_server_closes_an_idle_connection_only_after_its_keep_alive(
    serve: Serve, tmp_path: Path, keep_alive: float, same_connection: bool
) -> None:
    """After a 2 s pause a pooled connection is still the same one under a 3 s setting,
    and was closed by the server under a 1 s one."""
    server = serve(FakeTextLoader(), tmp_path / "v1", keep_alive_timeout=keep_alive)
    with httpx.Client(base_url=server.url, limits=httpx.Limits(keepalive_expiry=60)) as client:
        before = _client_port(client.get("/ready"))
        time.sleep(2.0)  # idle: the property under test is wall time
        second = client.get("/ready")
        assert second.status_code == 200
        assert (_client_port(second) == before) is same_connection


def test_by_default_idle_connections_outlive_the_clients_pools(
    serve: Serve, tmp_path: Path
) -> None:
    """120 s, longer than httpx and the openai client keep an idle connection (5 s), so a
    client never reuses one the server is closing (uvicorn's default, 5 s, failed 12 of
    480 requests sent after about 5 s idle: `bench/keep_alive.py`)."""
    server = serve(FakeTextLoader(), tmp_path / "v1")
    assert server.server.config.timeout_keep_alive == 120
