"""Weights pushed from a training process (`hotweights.push`, `POST .../versions`): whole or
partial, over a socket or handed over in shared memory, with and without a repository; bad
tensors refused by name; a client gone mid-stream leaves nothing behind. A real tiny model,
built here, served by the transformers loader."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hotweights
from hotweights.backends import TransformersLoader
from hotweights.core import Outcome
from hotweights.demo.tinylm import save_tiny_model
from hotweights.push_client import PushFailed, push_file
from hotweights.sources import publish
from hotweights.testing import ServerThread
from tests.server.conftest import Serve

pytestmark = pytest.mark.llm


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two tiny versions' weights: the served one's, and a second seed's."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("push-models")
    first = save_tiny_model(root / "1", seed=1)
    second = save_tiny_model(root / "2", seed=2)
    return {
        "dir": first,
        "v1": load_file(str(first / "model.safetensors")),
        "v2": load_file(str(second / "model.safetensors")),
        "v2_file": second / "model.safetensors",
    }


@pytest.fixture
def server(serve: Serve, trained: dict[str, Any], tmp_path: Path) -> ServerThread:
    import shutil

    source = tmp_path / "models" / "1"
    shutil.copytree(trained["dir"], source)
    return serve(TransformersLoader(), source, admin_token="secret")


def _live_weights(server: ServerThread) -> dict[str, Any]:
    served = server.state.models["m"]
    ((_, model),) = [pair for pair in served.reloader.models() if pair[0].state.value == "live"]
    return dict(model.model.state_dict())


def _same(a: Any, b: Any) -> bool:
    import torch

    return bool(torch.equal(a.to(torch.float32), b.to(torch.float32)))


def test_a_whole_state_dict_goes_live_and_is_what_serves(
    server: ServerThread, trained: dict[str, Any]
) -> None:
    event = hotweights.push(server.url, trained["v2"], model="m", token="secret", handover="socket")
    assert (event.outcome, event.new_generation, event.trigger) == (Outcome.LIVE, 2, "push")
    assert {"load", "validate", "warmup"} <= set(event.phases)
    served = _live_weights(server)
    name = "model.layers.0.mlp.up_proj.weight"
    assert _same(served[name], trained["v2"][name])
    assert not _same(served[name], trained["v1"][name])
    source = Path(server.state.models["m"].reloader.live_version.source)  # type: ignore[union-attr]
    assert source.name.startswith("hotweights-push-m-")  # staged in memory, not in the roots
    assert str(source) in server.state.pushed


def test_a_partial_push_changes_only_its_tensors_and_casts_its_dtype(
    server: ServerThread, trained: dict[str, Any]
) -> None:
    import torch

    name = "model.layers.0.mlp.up_proj.weight"
    changed = {name: trained["v2"][name].to(torch.float64)}  # cast to the served float32
    event = hotweights.push(server.url, changed, model="m", token="secret", handover="socket")
    assert event.outcome is Outcome.LIVE
    served = _live_weights(server)
    assert _same(served[name], trained["v2"][name])
    other = "model.layers.1.self_attn.q_proj.weight"
    assert _same(served[other], trained["v1"][other])


def test_shared_memory_handover_leaves_no_file(
    server: ServerThread, trained: dict[str, Any]
) -> None:
    before = set(Path("/dev/shm").glob("hotweights-push-*.safetensors"))
    event = hotweights.push(
        server.url, trained["v2"], model="m", token="secret", handover="shared-memory"
    )
    assert event.new_generation == 2
    assert set(Path("/dev/shm").glob("hotweights-push-*.safetensors")) == before


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"model.no_such.weight": (2, 2)}, "pushed tensor 'model.no_such.weight' is not in"),
        ({"model.norm.weight": (3,)}, "pushed tensor 'model.norm.weight' has shape [3]"),
    ],
)
def test_tensors_that_do_not_fit_the_base_are_refused_by_name(
    server: ServerThread, tensors: dict[str, tuple[int, ...]], message: str
) -> None:
    import torch

    weights = {name: torch.zeros(shape) for name, shape in tensors.items()}
    with pytest.raises(PushFailed) as refused:
        hotweights.push(server.url, weights, model="m", token="secret", handover="socket")
    assert refused.value.status == 400
    assert message in str(refused.value)
    assert refused.value.event is None
    assert server.state.models["m"].reloader.generation == 1  # nothing else happened
    assert not list(_staging_dirs())


def test_a_push_needs_the_admin_token(server: ServerThread, trained: dict[str, Any]) -> None:
    with pytest.raises(PushFailed) as refused:
        hotweights.push(server.url, trained["v2"], model="m", handover="socket")
    assert refused.value.status == 401


def test_weights_that_fail_validation_are_refused_and_the_old_version_serves(
    server: ServerThread, trained: dict[str, Any]
) -> None:
    import torch

    broken = {"model.norm.weight": torch.full_like(trained["v1"]["model.norm.weight"], torch.nan)}
    with pytest.raises(PushFailed) as refused:
        hotweights.push(server.url, broken, model="m", token="secret", handover="socket")
    assert refused.value.status == 422
    assert refused.value.event is not None
    assert refused.value.event.outcome is Outcome.FAILED
    live = server.state.models["m"].reloader.live_version
    assert live is not None
    assert live.generation == 1
    assert server.state.models["m"].reloader.wait_drained(10)
    assert not list(_staging_dirs())  # a failed version's files go with it


def test_a_client_gone_mid_stream_leaves_nothing(
    server: ServerThread, trained: dict[str, Any]
) -> None:
    body = Path(trained["v2_file"]).read_bytes()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(
            b"POST /admin/models/m/versions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer secret\r\nContent-Type: application/octet-stream\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        _wait_for(lambda: bool(list(_staging_dirs())), "the push never started staging")
    _wait_for(lambda: not list(_staging_dirs()), "a staging directory outlived its client")
    assert server.state.models["m"].reloader.generation == 1


def test_a_truncated_body_is_refused(server: ServerThread, trained: dict[str, Any]) -> None:
    import httpx

    body = Path(trained["v2_file"]).read_bytes()
    (length,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8 : 8 + length])
    assert header  # a real safetensors file
    response = httpx.post(
        f"{server.url}/admin/models/m/versions",
        content=body[: len(body) - 1000],
        headers={"Authorization": "Bearer secret"},
    )
    assert response.status_code == 400
    assert "truncated" in response.json()["error"]["message"]
    assert not list(_staging_dirs())


def test_with_a_repository_a_push_is_a_published_version(
    serve: Serve, trained: dict[str, Any], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    publish(trained["dir"], repo, "m", description="trained")
    server = serve(TransformersLoader(), None, repo=str(repo), model_roots=(str(repo),))
    event = push_file(server.url, trained["v2_file"], model="m", description="step 900")
    assert (event.outcome, event.new_generation) == (Outcome.LIVE, 2)
    version = repo / "m" / "2"
    assert event.target == str(version)
    files = {path.name for path in version.iterdir()}
    assert {"config.json", "model.safetensors", "hotweights.json", "tokenizer.json"} <= files
    manifest = json.loads((version / "hotweights.json").read_text())
    assert manifest["description"] == "step 900"
    assert (version / "config.json").stat().st_ino == (
        repo / "m" / "1" / "config.json"
    ).stat().st_ino
    assert not [p for p in (repo / "m").iterdir() if p.name.startswith(".")]  # no staging left


def _staging_dirs() -> Iterator[Path]:
    for root in (Path("/dev/shm"), Path("/tmp")):
        yield from (p for p in root.glob("hotweights-push-m-*") if p.is_dir())


def _wait_for(condition: Any, message: str, timeout: float = 30.0) -> None:
    """Poll an observable condition of another process's making (a server thread reacting
    to a closed socket has no event to wait on) with a deadline."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(0.01)


def test_a_version_pushed_in_memory_keeps_its_pages_mapped(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    """`hotweights serve`'s loader copies a checkpoint's weights into private memory (a
    file on disk may be rewritten); a version staged in the server's own memory is its
    own already, so its weights stay the staged file's pages: no second copy."""
    import shutil

    from hotweights.config import Config
    from hotweights.server.assembly import build_state

    source = tmp_path / "models" / "1"
    shutil.copytree(trained["dir"], source)
    config = Config.load(
        {"source": str(source), "model_name": "m", "model_roots": (str(source.parent),)},
        environ={},
    )
    server = ServerThread(build_state(config)).start()
    try:
        server.wait_live()
        assert _storages(server) == 1  # read from disk: one private block
        hotweights.push(server.url, trained["v2"], model="m", handover="shared-memory")
        assert _storages(server) > 1  # each tensor a view of the staged file's mapping
    finally:
        server.stop()


def _storages(server: ServerThread) -> int:
    served = server.state.models["m"]
    ((_, model),) = [pair for pair in served.reloader.models() if pair[0].state.value == "live"]
    return len({p.untyped_storage().data_ptr() for p in model.model.parameters()})


def test_a_bad_tensor_is_refused_before_the_rest_of_the_body(server: ServerThread) -> None:
    """The header names a tensor the base lacks and promises 10 GB more: the answer comes
    from the header alone (a server that read on would wait for bytes never sent)."""
    header = json.dumps(
        {"model.no_such.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    ).encode()
    prefix = struct.pack("<Q", len(header)) + header
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            b"POST /admin/models/m/versions HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer secret\r\nContent-Type: application/octet-stream\r\n"
            + f"Content-Length: {len(prefix) + 10 * 2**30}\r\n\r\n".encode()
            + prefix
        )
        answer = conn.recv(65536).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 400"), answer[:200]
    assert "model.no_such.weight" in answer
    _wait_for(lambda: not list(_staging_dirs()), "the refused push left its staging")
