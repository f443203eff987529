"""The quality gate on a running server, with the demo's real tiny models: a version that
answers wrongly, or predicts text far worse, is refused while traffic keeps its answers; a
retrained version as good goes live; a repository version with its own gate.json that
fails it is marked bad; `hotweights gate` judges offline with exit codes."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from hotweights.backends import TransformersLoader
from hotweights.cli import main
from hotweights.demo.versions import (
    DEMO_GATE,
    EXPECTED_ANSWERS,
    VERSION_QUESTION,
    build_bad_version,
    build_demo_versions,
)
from hotweights.engine.batching_loader import BatchingLoader, EngineSettings
from hotweights.sources import publish
from hotweights.sources.gate_spec import GATE_FILE
from hotweights.testing import ServerThread
from tests.backends.conftest import save_lively_model
from tests.server.conftest import Serve
from tests.server.test_repository_serving import Finished

pytestmark = pytest.mark.llm


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("cache")
    bad = build_bad_version(cache)
    v1, v2 = build_demo_versions(cache)
    lively = save_lively_model(cache / "demo" / "lively", seed=3)
    gate = cache / "gate.json"
    gate.write_text(json.dumps(DEMO_GATE))
    return {"v1": v1, "v2": v2, "bad": bad, "lively": lively, "gate": gate}


def _loader() -> BatchingLoader:
    settings = EngineSettings(max_batch=8, kv_cache_bytes=2**23)
    return BatchingLoader(TransformersLoader(load_in="thread"), settings)


class Traffic:
    """One client asking the version question until stopped; keeps every answer."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.results: list[tuple[int, str, int]] = []
        self.answered = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def __enter__(self) -> Traffic:
        self._thread.start()
        assert self.answered.wait(60), "no answer before the reload"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": VERSION_QUESTION}],
            "max_tokens": 32,
            "temperature": 0,
        }
        with httpx.Client(base_url=self.server.url, timeout=60) as client:
            while not self._stop.is_set():
                response = client.post("/v1/chat/completions", json=body)
                text = ""
                if response.status_code == 200:
                    text = response.json()["choices"][0]["message"]["content"]
                generation = int(response.headers.get("x-hotweights-generation", 0))
                self.results.append((response.status_code, text, generation))
                self.answered.set()


def _reload(server: ServerThread, path: Path) -> httpx.Response:
    body = {"path": str(path), "wait": True}
    return httpx.post(f"{server.url}/admin/reload", json=body, timeout=300)


def test_a_wrong_version_is_gated_under_traffic_and_a_good_one_goes_live(
    serve: Serve, versions: dict[str, Path]
) -> None:
    server = serve(_loader(), versions["v1"], gate=str(versions["gate"]))
    with Traffic(server) as traffic:
        refused = _reload(server, versions["bad"])
        during = len(traffic.results)
        accepted = _reload(server, versions["v2"])
        traffic.answered.clear()
        assert traffic.answered.wait(60)
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert "(gated)" in error["message"]
    assert "prompt 1 (regex) FAILED: 'Bananas.'" in error["message"]
    recorded = httpx.get(f"{server.url}/admin/reloads").json()["events"]
    gated = next(e for e in recorded if e["outcome"] == "gated")
    checks = {check["name"]: check for check in gated["gate"]}
    assert checks["prompt 1 (regex)"]["passed"] is False
    assert checks["prompt 2 (contains)"]["passed"] is False
    assert checks["perplexity ratio"]["passed"] is False
    assert checks["perplexity ratio"]["value"] > DEMO_GATE["max_perplexity_ratio"]
    assert "gate" in gated["phases"]
    assert gated["new_generation"] is None
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["new_generation"] == 2
    assert all(check["passed"] for check in accepted.json()["gate"])
    # Not one request failed; every answer came from a version that was allowed to serve.
    statuses = {status for status, _, _ in traffic.results}
    assert statuses == {200}
    answers = {(generation, text) for _, text, generation in traffic.results}
    assert answers <= {(1, EXPECTED_ANSWERS[1]), (2, EXPECTED_ANSWERS[2])}
    assert {text for _, text, _ in traffic.results[:during]} == {EXPECTED_ANSWERS[1]}
    assert (2, EXPECTED_ANSWERS[2]) in answers
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'hotweights_reloads_total{model="m",outcome="gated"} 1.0' in metrics
    assert 'hotweights_gate_checks_total{model="m",result="failed"}' in metrics


def test_a_version_that_predicts_text_far_worse_is_gated(
    serve: Serve, versions: dict[str, Path], tmp_path: Path
) -> None:
    gate = tmp_path / "perplexity.json"
    gate.write_text(json.dumps({"eval_text": DEMO_GATE["eval_text"], "max_perplexity_ratio": 1.2}))
    server = serve(_loader(), versions["v1"], gate=str(gate))
    response = _reload(server, versions["lively"])
    assert response.status_code == 422
    assert "perplexity ratio FAILED" in response.json()["error"]["message"]
    live = httpx.get(f"{server.url}/admin/status").json()
    assert live["models"]["m"]["generation"] == 1


def test_a_repository_version_failing_its_own_gate_is_marked_bad(
    serve: Serve, versions: dict[str, Path], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    publish(versions["v1"], repo, "m")
    server = serve(_loader(), None, repo=str(repo), watch="poll", poll_interval=3600)
    build = tmp_path / "build"
    shutil.copytree(versions["bad"], build)
    (build / GATE_FILE).write_text(json.dumps(DEMO_GATE))  # the version's own gate
    publish(build, repo, "m", description="nightly")
    finished = Finished(server, "m")
    assert set(httpx.post(f"{server.url}/admin/rescan").json()["submitted"]) == {"m"}
    event = finished.wait(120).to_dict()
    assert event["outcome"] == "gated", event
    assert event["gate"][0]["name"] == "gate.json: prompt 1 (regex)"
    listed = httpx.get(f"{server.url}/admin/repository").json()["models"]["m"]["versions"]
    status = {v["version"]: (v["status"], v.get("reason") or "") for v in listed}
    assert status[2][0] == "bad"
    assert "gated" in status[2][1]
    assert httpx.get(f"{server.url}/admin/status").json()["models"]["m"]["generation"] == 1


def test_the_gate_command_judges_offline(
    versions: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    gate = str(versions["gate"])
    against = ["--against", str(versions["v1"])]
    assert main(["gate", str(versions["bad"]), *against, "--gate", gate]) == 1
    table = capsys.readouterr().out
    assert "prompt 1 (regex)     FAIL" in table
    assert "perplexity ratio" in table
    assert main(["gate", str(versions["v2"]), *against, "--gate", gate, "--json"]) == 0
    verdict: Any = json.loads(capsys.readouterr().out)
    assert verdict["passed"] is True
    assert len(verdict["checks"]) == 5
    assert main(["gate", str(versions["v2"])]) == 2  # no gate anywhere
    assert "no gate" in capsys.readouterr().err
    assert main(["gate", str(versions["v2"]), "--gate", str(versions["v1"] / "nope.json")]) == 2
