"""A watched repository whose loader checks digests: a version whose bytes changed after
its publish is refused before the swap, naming the file; the live version serves on."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from hotweights.backends import TransformersLoader
from hotweights.demo.tinylm import save_tiny_model
from hotweights.digests import hash_file
from hotweights.sources import checkpoint_transfer, expected_digests, publish
from tests.server.conftest import Serve
from tests.server.test_repository_serving import Finished


def _complete(url: str) -> httpx.Response:
    body = {"model": "m", "prompt": "hi", "max_tokens": 2}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=30)


def test_a_linked_file_rewritten_after_publish_is_refused_and_v1_serves_on(
    serve: Serve, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoint_transfer, "_reflink", lambda origin, destination: False)
    repo = tmp_path / "repo"
    publish(save_tiny_model(tmp_path / "step-100", seed=1), repo, "m", mode="link")
    loader = TransformersLoader(expected_digests=expected_digests)
    server = serve(loader, None, repo=str(repo), watch="poll", poll_interval=0.05)
    sync = server.state.sync
    assert sync is not None
    assert sync.repository.scan_mode == "size"  # the load hashes, the scan does not
    assert int(_complete(server.url).headers["x-hotweights-generation"]) == 1
    finished = Finished(server, "m")

    # Published by hard link into a directory the server does not watch, then rewritten
    # in place by the "trainer" before it moves into the repository: as if the rewrite
    # had come between the publish and the load.
    checkpoint = save_tiny_model(tmp_path / "step-200", seed=2)
    staged = publish(checkpoint, tmp_path / "elsewhere", "m", mode="link")
    weights = checkpoint / "model.safetensors"
    expected = staged.manifest.files["model.safetensors"].digest
    with open(weights, "r+b") as file:  # same inode: the published file changes too
        file.seek(weights.stat().st_size - 4)
        file.write(b"\xff\xff\xff\xff")
    actual = hash_file(weights).hexdigest
    assert actual != expected
    os.rename(staged.path, repo / "m" / "2")

    event = finished.wait(60)
    assert event.outcome.value == "failed"
    assert event.target == str(repo / "m" / "2")
    assert event.error_type == "VerificationError"
    assert f"model.safetensors: blake3 {actual} on disk, manifest says {expected}" in (
        event.error_message or ""
    )
    assert int(_complete(server.url).headers["x-hotweights-generation"]) == 1
    reason = sync.repository.bad_reason("m", 2)  # not tried again until its files change
    assert reason is not None
    assert "model.safetensors" in reason
