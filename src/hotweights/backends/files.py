"""Checking a Hugging Face model directory before anything heavy touches it.

`inspect_model_dir` answers, cheaply and with a message naming the file, whether a
directory looks loadable: config, weights in an accepted format with intact headers, a
tokenizer. `fingerprint` and `estimate_bytes` build on what it read. Pure Python.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from hotweights.backends.safetensors_header import (
    DTYPE_BYTES,
    FLOAT_DTYPES,
    SafetensorsHeader,
    read_header,
)
from hotweights.errors import LoadError

WeightFormat = Literal["safetensors", "pickle"]

CONFIG_FILE = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
"""Weight files read with `torch.load`, which unpickles and can run arbitrary code."""
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)
"""Any one of these makes a tokenizer (with `merges.txt` beside `vocab.json` for BPE)."""
FINGERPRINTED_FILES = (
    CONFIG_FILE,
    "generation_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "merges.txt",
    *TOKENIZER_FILES,
)
"""Small files that change what a model answers; `fingerprint` hashes them whole."""

_TENSOR_SAMPLE = 64  # bytes read at the start, middle and end of each tensor
_PICKLE_SAMPLE = 65_536  # bytes read at the start, middle and end of each pickle file
_DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


@dataclass(frozen=True)
class ModelFiles:
    """What `inspect_model_dir` found in a model directory."""

    root: Path
    config: Mapping[str, Any]
    """The parsed config.json."""
    weight_format: WeightFormat
    weights: tuple[Path, ...]
    """The weight files that make up the model, sorted by name."""
    headers: tuple[SafetensorsHeader, ...]
    """Checked headers of the safetensors weights (empty for pickle weights)."""

    @property
    def config_dtype(self) -> str | None:
        """The dtype the checkpoint declares (`dtype`, or the older `torch_dtype`)."""
        value = self.config.get("dtype") or self.config.get("torch_dtype")
        return value if isinstance(value, str) else None


def inspect_model_dir(source: str | Path, *, allow_pickle: bool = False) -> ModelFiles:
    """Check that `source` is a loadable Hugging Face causal-LM directory.

    Raises `LoadError` naming the path and the file: the path is missing or not a
    directory; config.json is missing or not a JSON object; there are no safetensors
    weights (pickle-based ones are refused unless `allow_pickle`); a shard named in the
    index is missing; a safetensors header is corrupt or the file is truncated; no
    tokenizer file is present. Reads headers only, never tensor data.
    """
    root = Path(source)
    if not root.exists():
        raise LoadError(f"model path {root} does not exist")
    if not root.is_dir():
        raise LoadError(f"model path {root} is not a directory (expected a model directory)")
    config = _read_config(root / CONFIG_FILE)
    try:
        weight_format, weights = _find_weights(root, allow_pickle)
    except OSError as exc:
        raise LoadError(f"cannot list the weights in {root}: {exc}") from exc
    headers: tuple[SafetensorsHeader, ...] = ()
    if weight_format == "safetensors":
        headers = tuple(read_header(path) for path in weights)
    _check_tokenizer(root)
    return ModelFiles(root, config, weight_format, weights, headers)


def fingerprint(files: ModelFiles) -> str:
    """A 16-hex-digit digest of a model directory's content, cheap at any model size.

    Covers: the bytes of every file in `FINGERPRINTED_FILES` present (config, generation
    config, tokenizer, chat template); for each safetensors file its name, size, whole
    header and 64 bytes at the start, middle and end of every tensor's data; for each
    pickle file its name, size and 64 KiB at its start, middle and end. Not the
    directory's path, not timestamps: a copy of the same model has the same fingerprint.
    Retraining or replacing a tensor changes it; a change confined to bytes no sample
    covers does not (the repository manifest's per-file sha256 is the exact check).
    """
    digest = hashlib.sha256(b"hotweights-fingerprint-v1\0")
    for name in FINGERPRINTED_FILES:
        path = files.root / name
        if path.is_file():
            _update(digest, name, _read(path))
    for header in files.headers:
        _update(digest, header.path.name, str(header.file_size).encode(), header.raw)
        spans = ((header.data_start + t.begin, t.nbytes) for t in header.tensors)
        _update(digest, *_samples(header.path, spans, _TENSOR_SAMPLE))
    if files.weight_format == "pickle":
        for path in files.weights:
            size = _size(path)
            _update(digest, path.name, str(size).encode())
            _update(digest, *_samples(path, [(0, size)], _PICKLE_SAMPLE))
    return digest.hexdigest()[:16]


def estimate_bytes(files: ModelFiles, dtype: str) -> int:
    """Bytes the weights take once loaded as `dtype` (`float32`, `bfloat16`, `float16`).

    Sums each safetensors tensor's size from the headers; floating tensors are counted at
    `dtype`'s width, others at their stored width. Pickle weights count their file size.
    """
    target = DTYPE_BYTES[_DTYPE_CODES[dtype]]
    if files.weight_format == "pickle":
        return sum(_size(path) for path in files.weights)
    total = 0
    for header in files.headers:
        for tensor in header.tensors:
            total += tensor.numel * target if tensor.dtype in FLOAT_DTYPES else tensor.nbytes
    return total


def _read_config(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise LoadError(f"{path} is missing: a model directory needs {CONFIG_FILE}")
    try:
        config = json.loads(_read(path))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise LoadError(f"{path} is not a JSON object")
    return config


def _find_weights(root: Path, allow_pickle: bool) -> tuple[WeightFormat, tuple[Path, ...]]:
    index = root / SAFETENSORS_INDEX
    if index.is_file():
        return "safetensors", _shards_in_index(index)
    single = root / "model.safetensors"
    if single.is_file():
        return "safetensors", (single,)
    safetensors = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if safetensors:
        return "safetensors", tuple(safetensors)
    pickles = sorted(p for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not pickles:
        raise LoadError(
            f"no weights in {root}: expected model.safetensors (or *.safetensors shards)"
        )
    if not allow_pickle:
        names = ", ".join(p.name for p in pickles)
        raise LoadError(
            f"refusing pickle-based weights in {root} ({names}): loading them can run "
            "arbitrary code; convert them to model.safetensors, or opt in with allow_pickle"
        )
    return "pickle", tuple(pickles)


def _shards_in_index(index: Path) -> tuple[Path, ...]:
    try:
        document = json.loads(_read(index))
        weight_map = document["weight_map"]
        names = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise LoadError(f"{index} is corrupt: expected JSON with a weight_map ({exc})") from exc
    if not names or not all(isinstance(name, str) and "/" not in name for name in names):
        raise LoadError(f"{index} is corrupt: its weight_map names no shard files")
    shards = tuple(index.parent / name for name in names)
    for shard in shards:
        if not shard.is_file():
            raise LoadError(f"{shard} is missing: {index.name} lists it as a weight shard")
    return shards


def _check_tokenizer(root: Path) -> None:
    if any((root / name).is_file() for name in TOKENIZER_FILES):
        return
    raise LoadError(
        f"no tokenizer in {root}: expected tokenizer.json "
        f"(or one of {', '.join(TOKENIZER_FILES[1:])})"
    )


def _samples(path: Path, spans: Iterable[tuple[int, int]], width: int) -> list[bytes]:
    """Bytes at the start, middle and end of each `(offset, length)` span of `path`."""
    pieces: list[bytes] = []
    try:
        with path.open("rb") as stream:
            for offset, length in spans:
                for start in sorted({0, max(0, length // 2 - width // 2), max(0, length - width)}):
                    stream.seek(offset + start)
                    pieces.append(stream.read(min(width, length - start)))
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc}") from exc
    return pieces


class _Digest(Protocol):
    def update(self, data: bytes, /) -> None: ...


def _update(digest: _Digest, *parts: bytes | str) -> None:
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc}") from exc


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc}") from exc
