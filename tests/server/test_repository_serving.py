"""Serving a model repository: publish while watched, many models, pins, fallbacks."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import httpx

from hotweights.cli import main
from hotweights.core import Notice, ReloadFinished
from hotweights.errors import ValidationError
from hotweights.sources import publish
from hotweights.testing import ServerThread
from tests.fakes import FakeTextLoader
from tests.server.conftest import Serve
from tests.sources.layouts import WEIGHTS, make_version, write_files


def _source(tmp_path: Path, name: str) -> Path:
    """A directory to publish (the fake loader does not read it)."""
    return write_files(tmp_path / "build" / name, WEIGHTS)


def _ask(server: ServerThread, model: str, client: httpx.Client | None = None) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    return (client or httpx).post(f"{server.url}/v1/chat/completions", json=body, timeout=30)


def _generation(response: httpx.Response) -> int:
    return int(response.headers["x-hotweights-generation"])


class Finished:
    """Waits for the next finished reload of a model (an observer, not a sleep)."""

    def __init__(self, server: ServerThread, model: str) -> None:
        self.events: list[Any] = []
        self._done = threading.Event()
        server.state.models[model].reloader.subscribe(self._observe)

    def _observe(self, notice: Notice) -> None:
        if isinstance(notice, ReloadFinished) and not notice.drained:
            self.events.append(notice.event)
            self._done.set()

    def wait(self, timeout: float = 30) -> Any:
        assert self._done.wait(timeout), "no reload finished in time"
        self._done.clear()
        return self.events[-1]


def test_a_publish_goes_live_under_traffic_with_no_failed_request(
    serve: Serve, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    publish(_source(tmp_path, "a"), repo, "m")
    loader = FakeTextLoader()
    server = serve(loader, None, repo=str(repo), watch="poll", poll_interval=0.05)
    finished = Finished(server, "m")
    held, release, lock = threading.Event(), threading.Event(), threading.Lock()
    answered = threading.Event()

    def hold_one(step: int) -> None:  # once one was answered, the next waits at step 1
        with lock:
            take = step == 1 and answered.is_set() and not held.is_set()
            if take:
                held.set()
        if take:
            release.wait(30)

    loader.models[0].before_step = hold_one
    statuses: list[int] = []
    generations: set[int] = set()
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                response = _ask(server, "m", client)
                statuses.append(response.status_code)
                if response.status_code == 200:
                    generations.add(_generation(response))
                answered.set()

    sender = threading.Thread(target=traffic)
    sender.start()
    assert answered.wait(30), "no answer before the publish"
    assert held.wait(30), "no request reached its second token"
    published = publish(_source(tmp_path, "b"), repo, "m", description="nightly")
    event = finished.wait()
    reloader = server.state.models["m"].reloader
    assert reloader.inflight() == {1: 1, 2: 0}  # a request on g1 overlaps the swap
    release.set()
    while 2 not in generations:  # the held request ends, then traffic reaches g2
        assert sender.is_alive()
        answered.clear()
        assert answered.wait(30)
    stop.set()
    sender.join(30)
    assert (event.outcome.value, event.trigger, event.target) == (
        "live",
        "watch",
        str(published.path),
    )
    assert event.description == "m v2: nightly"
    assert statuses
    assert set(statuses) == {200}
    assert _generation(_ask(server, "m")) == 2
    assert generations == {1, 2}


def test_two_models_are_served_and_routed(serve: Serve, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for model in ("alpha", "beta"):
        make_version(repo, model, 1)
    server = serve(FakeTextLoader(), None, repo=str(repo), watch="poll", poll_interval=3600)
    for model in ("alpha", "beta"):
        answer = _ask(server, model).json()["choices"][0]["message"]["content"]
        assert answer.startswith(f"{repo / model / '1'}:0")
    listed = httpx.get(f"{server.url}/v1/models").json()["data"]
    assert [(m["id"], m["generation"]) for m in listed] == [("alpha", 1), ("beta", 1)]
    assert _ask(server, "gamma").status_code == 404
    finished = Finished(server, "beta")
    make_version(repo, "beta", 2)
    rescanned = httpx.post(f"{server.url}/admin/rescan").json()
    assert set(rescanned["submitted"]) == {"beta"}
    assert finished.wait().new_generation == 2
    assert _generation(_ask(server, "beta")) == 2
    assert _generation(_ask(server, "alpha")) == 1
    status = httpx.get(f"{server.url}/admin/models/beta/versions").json()
    assert [v["generation"] for v in status["versions"]] == [2, 1]
    assert httpx.post(f"{server.url}/admin/reload").status_code == 400  # which model?
    assert main(["rollback", "--url", server.url, "--model", "beta"]) == 0  # the CLI names it
    assert _generation(_ask(server, "beta")) == 3  # version 1 again, as a new generation
    assert _generation(_ask(server, "alpha")) == 1


def test_incomplete_versions_are_never_loaded(serve: Serve, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    make_version(repo, "m", 1)
    loader = FakeTextLoader()
    server = serve(loader, None, repo=str(repo), watch="poll", poll_interval=3600)
    truncated = make_version(repo, "m", 2)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    same_size = make_version(repo, "m", 3)
    (same_size / "model.safetensors").write_bytes(bytes(reversed(WEIGHTS["model.safetensors"])))
    make_version(repo, "m", 4, manifest=False)  # still settling
    (repo / "m" / ".tmp-publish-x").mkdir()  # a publisher's staging directory
    (repo / "m" / "latest").mkdir()  # not a version number
    assert httpx.post(f"{server.url}/admin/rescan").json()["submitted"] == {}
    assert [m.source for m in loader.models] == [str(repo / "m" / "1")]
    versions = httpx.get(f"{server.url}/admin/repository").json()["models"]["m"]["versions"]
    assert {v["version"]: v["status"] for v in versions} == {
        1: "eligible",
        2: "incomplete",
        3: "incomplete",
        4: "settling",
    }


def test_pin_rollback_and_unpin_survive_rescans(serve: Serve, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for number in (1, 2):
        make_version(repo, "m", number)
    server = serve(FakeTextLoader(), None, repo=str(repo), watch="poll", poll_interval=3600)
    url = f"{server.url}/admin/models/m"
    assert httpx.get(f"{server.url}/admin/models/m/versions").json()["generation"] == 1
    assert _generation(_ask(server, "m")) == 1  # v2 loaded as generation 1
    rolled = httpx.post(f"{url}/rollback", timeout=30).json()
    assert (rolled["outcome"], rolled["target"]) == ("rolled_back", str(repo / "m" / "1"))
    make_version(repo, "m", 3)
    assert httpx.post(f"{server.url}/admin/rescan").json()["submitted"] == {}  # still pinned
    pinned = httpx.post(f"{url}/pin", json={"version": 3}, timeout=30).json()
    assert pinned["target"] == str(repo / "m" / "3")
    assert httpx.post(f"{url}/pin", json={"version": 9}).status_code == 404
    unpinned = httpx.post(f"{url}/unpin", timeout=30).json()
    assert unpinned["outcome"] == "unchanged"  # 3 is the latest too
    reload = httpx.post(f"{url}/reload", json={"path": str(repo / "m" / "2")}, timeout=30)
    assert reload.json()["target"] == str(repo / "m" / "2")  # a path pins
    elsewhere = httpx.post(f"{url}/reload", json={"path": str(tmp_path / "x" / "1")})
    assert elsewhere.status_code == 403


def test_startup_falls_back_to_the_newest_version_that_works(serve: Serve, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for number in (1, 2, 3):
        make_version(repo, "m", number)
    loader = FakeTextLoader(
        fail={
            (str(repo / "m" / "3"), "validate"): ValidationError("logits are not finite"),
            (str(repo / "m" / "2"), "load"): MemoryError(),
        }
    )
    server = serve(loader, None, repo=str(repo), watch="poll", poll_interval=3600)
    assert (
        _ask(server, "m")
        .json()["choices"][0]["message"]["content"]
        .startswith(f"{repo / 'm' / '1'}:0")
    )
    versions = httpx.get(f"{server.url}/admin/repository").json()["models"]["m"]["versions"]
    status = {v["version"]: (v["status"], v.get("reason") or "") for v in versions}
    assert status[1][0] == "eligible"
    assert status[2][0] == "bad"
    assert status[3][0] == "bad"
    assert "logits are not finite" in status[3][1]
    # A bad version is not retried until its files change.
    assert httpx.post(f"{server.url}/admin/rescan").json()["submitted"] == {}
    shutil.rmtree(repo / "m" / "3")
    make_version(repo, "m", 3, {**WEIGHTS, "config.json": b'{"layers": 3}'})
    del loader.fail[(str(repo / "m" / "3"), "validate")]
    assert set(httpx.post(f"{server.url}/admin/rescan").json()["submitted"]) == {"m"}


class SizeRecordingLoader(FakeTextLoader):
    """Records how big a version's weights were at the moment it was loaded."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[str, int] = {}

    def load(self, source: str) -> Any:
        self.sizes[source] = (Path(source) / "model.safetensors").stat().st_size
        return super().load(source)


def test_a_slow_copy_without_a_manifest_loads_only_once_it_settles(
    serve: Serve, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    make_version(repo, "m", 1)
    loader = SizeRecordingLoader()
    server = serve(
        loader, None, repo=str(repo), watch="poll", poll_interval=0.02, settle_seconds=0.3
    )
    finished = Finished(server, "m")
    target = repo / "m" / "2"
    target.mkdir()
    (target / "config.json").write_bytes(WEIGHTS["config.json"])
    chunk = b"w" * 4096
    paced = threading.Event()
    with (target / "model.safetensors").open("wb") as weights:
        for _ in range(40):  # a slow writer: a chunk every 20 ms, for about 0.8 s
            weights.write(chunk)
            weights.flush()
            paced.wait(0.02)  # pacing the writer, not synchronising the test
    event = finished.wait()
    assert event.target == str(target)
    assert loader.sizes[str(target)] == 40 * len(chunk)  # never a partial file
