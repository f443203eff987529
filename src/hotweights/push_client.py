"""Pushing weights from a training process to a running server: `hotweights.push`.

    import hotweights
    event = hotweights.push("http://127.0.0.1:8000", model, model="my-llm")
    print(event.new_generation, event.phases)

The weights (a `torch.nn.Module` or a state dict) are sent as one safetensors stream to
`POST /admin/models/{model}/versions` (`server/push_api.py`), one tensor at a time: the
client never holds a second copy of the model. Tensors that share their storage (tied
weights) are sent once, under the first name. On the same host (a loopback URL and a
writable /dev/shm) the weights are written to a file in shared memory instead and the
server takes it over without a socket (`handover`). The call returns once the version is
live (under a canary, once its bake ended) and raises `PushFailed` otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote, urlsplit

from hotweights.core import ReloadEvent
from hotweights.errors import HotweightsError

if TYPE_CHECKING:
    import torch

SHM_DIR = Path("/dev/shm")
PUSH_FILE_HEADER = "x-hotweights-push-file"
PUSH_FILE_PREFIX = "hotweights-push-"
CHUNK_BYTES = 16 * 2**20
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
_DTYPES = {
    "float32": "F32",
    "bfloat16": "BF16",
    "float16": "F16",
    "float64": "F64",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
Handover = Literal["auto", "socket", "shared-memory"]


class PushFailed(HotweightsError):
    """A push did not go live: refused before a reload (`event` None: tensors that do not
    fit the base, a bad token; or the server could not be reached, `status` 0), refused by
    the reload (422: validation, gate, canary), or superseded (409). `status` is the HTTP
    status; `event` the reload event, when a reload ran."""

    def __init__(self, message: str, status: int, event: ReloadEvent | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.event = event


def push(
    url: str,
    weights: torch.nn.Module | Mapping[str, torch.Tensor],
    model: str | None = None,
    base: int | None = None,
    description: str | None = None,
    token: str | None = None,
    *,
    handover: Handover = "auto",
    timeout: float | None = None,
) -> ReloadEvent:
    """Send `weights` to the server at `url` as a new version of `model` (the only model
    served when None) and return its reload event once it is live.

    `base` is the version the push builds on (a repository version number, or a
    generation without a repository; default: the live one): its config and tokenizer
    are used, and a push may hold only the tensors that changed against it. `token` is
    the admin token. Raises `PushFailed` (with `status` and, when a reload ran, `event`)
    if the server refused the weights (400), the reload refused the version (422) or a
    newer version superseded it (409)."""
    import httpx

    tensors = _tensors(weights)
    path, params, headers = _request(model, base, description, token)
    handed: Path | None = None
    if handover == "shared-memory" or (handover == "auto" and _same_host(url)):
        handed = _write_shared(tensors)
        headers[PUSH_FILE_HEADER] = str(handed)
        content: bytes | Iterator[bytes] = b""
    else:
        content = _stream(tensors)
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(timeout, connect=10.0)) as client:
            response = client.post(path, params=params, headers=headers, content=content)
    except httpx.HTTPError as exc:
        raise PushFailed(f"cannot push to {url}: {exc}", 0) from exc
    finally:
        if handed is not None:
            handed.unlink(missing_ok=True)  # the server moved it away unless it refused
    return _answer(response)


def push_file(
    url: str,
    path: Path | str,
    model: str | None = None,
    base: int | None = None,
    description: str | None = None,
    token: str | None = None,
    *,
    timeout: float | None = None,
) -> ReloadEvent:
    """`push` for weights already saved: a safetensors file, or a directory whose
    safetensors files (shards) hold them. One file is streamed as it is (no torch); shards
    are read into one state dict first."""
    import httpx

    source = Path(path)
    files = sorted(source.glob("*.safetensors")) if source.is_dir() else [source]
    if not files or not all(file.is_file() for file in files):
        raise PushFailed(f"{source}: no safetensors file to push", 0)
    if len(files) > 1:
        from safetensors.torch import load_file

        state: dict[str, Any] = {}
        for file in files:
            state.update(load_file(str(file)))
        return push(url, state, model, base, description, token, handover="socket")
    route, params, headers = _request(model, base, description, token)
    try:
        with (
            files[0].open("rb") as stream,
            httpx.Client(base_url=url, timeout=httpx.Timeout(timeout, connect=10.0)) as client,
        ):
            chunks = iter(lambda: stream.read(CHUNK_BYTES), b"")
            response = client.post(route, params=params, headers=headers, content=chunks)
    except httpx.HTTPError as exc:
        raise PushFailed(f"cannot push to {url}: {exc}", 0) from exc
    return _answer(response)


def _request(
    model: str | None, base: int | None, description: str | None, token: str | None
) -> tuple[str, dict[str, str], dict[str, str]]:
    """The route, query and headers of a push."""
    route = f"/admin/models/{quote(model, safe='')}/versions" if model else "/admin/versions"
    params: dict[str, str] = {}
    if base is not None:
        params["base"] = str(base)
    if description:
        params["description"] = description
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    headers["content-type"] = "application/octet-stream"
    return route, params, headers


def _answer(response: Any) -> ReloadEvent:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code == 200:
        return ReloadEvent.from_dict(body)
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else response.text
    raw = body.get("event") if isinstance(body, dict) else None
    event = None
    if isinstance(raw, dict) and "id" in raw:
        event = ReloadEvent.from_dict(raw)
    raise PushFailed(
        f"push refused ({response.status_code}): {message}", response.status_code, event
    )


def _tensors(weights: Any) -> list[tuple[str, torch.Tensor]]:
    """Name, tensor pairs to send: contiguous, on the CPU, each storage once."""
    import torch

    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    seen: set[tuple[int, int, tuple[int, ...], torch.dtype]] = set()
    kept: list[tuple[str, torch.Tensor]] = []
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weights[{name!r}] is a {type(tensor).__name__}, not a tensor")
        key = (
            tensor.untyped_storage().data_ptr(),
            int(tensor.storage_offset()),
            tuple(tensor.shape),
            tensor.dtype,
        )
        if key in seen:
            continue  # tied to a tensor already sent
        seen.add(key)
        if str(tensor.dtype).removeprefix("torch.") not in _DTYPES:
            raise TypeError(f"weights[{name!r}] has dtype {tensor.dtype}, which safetensors lacks")
        kept.append((name, tensor.detach().to("cpu").contiguous()))
    return kept


def _header(tensors: list[tuple[str, torch.Tensor]]) -> bytes:
    document: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        document[name] = {
            "dtype": _DTYPES[str(tensor.dtype).removeprefix("torch.")],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(document, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _views(tensors: list[tuple[str, torch.Tensor]]) -> Iterator[memoryview]:
    """Each tensor's bytes, in chunks, without copying the tensor."""
    import torch

    for _, tensor in tensors:
        data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy().data)
        for start in range(0, len(data), CHUNK_BYTES):
            yield data[start : start + CHUNK_BYTES]


def _stream(tensors: list[tuple[str, torch.Tensor]]) -> Iterator[bytes]:
    yield _header(tensors)
    for chunk in _views(tensors):
        yield bytes(chunk)  # one chunk at a time: httpx sends bytes


def _write_shared(tensors: list[tuple[str, torch.Tensor]]) -> Path:
    path = SHM_DIR / f"{PUSH_FILE_PREFIX}{os.getpid()}-{secrets.token_hex(8)}.safetensors"
    try:
        with path.open("xb") as sink:
            sink.write(_header(tensors))
            for chunk in _views(tensors):
                sink.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def _same_host(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in _LOOPBACK and SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)
