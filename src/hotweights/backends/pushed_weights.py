"""Turning pushed weights into a complete version directory.

A push sends one safetensors file: every tensor of the model, or only those that changed
against a base version. `plan_push` compares its tensors with the base's: every name must
be the base's and every shape the same (else `InvalidRequest` naming the tensor); a dtype
other than the base's is cast to it. `assemble` writes the version: every file of the base
but its weights, linked (or copied across filesystems), and one `model.safetensors`, which
is the pushed file itself, renamed, when it is complete and in the base's dtypes, or else a
merge of the base's bytes and the pushed ones written in one pass. Tied weights stay tied:
a tensor the base leaves out because it is tied to another is left out here too.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from hotweights.backends.files import SAFETENSORS_INDEX, ModelFiles
from hotweights.backends.safetensors_header import (
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorEntry,
    parse_entries,
    read_header,
)
from hotweights.errors import InvalidRequest

WEIGHTS_FILE = "model.safetensors"
SKIPPED = frozenset({SAFETENSORS_INDEX, "hotweights.json"})
"""Files of the base that a pushed version does not inherit (its own weights and manifest
replace them)."""
CHUNK_BYTES = 16 * 2**20
_TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


@dataclass(frozen=True)
class PushPlan:
    """What a push changes against its base, checked."""

    base: ModelFiles
    pushed: tuple[TensorEntry, ...]
    complete: bool
    """Every tensor of the base is in the push."""
    casts: dict[str, tuple[str, str]]
    """Pushed tensors whose dtype is not the base's: name -> (pushed, base) dtype codes."""

    @property
    def in_place(self) -> bool:
        """The pushed file can become the version's weights as it is."""
        return self.complete and not self.casts


def header_of(prefix: bytes, where: str) -> tuple[int, tuple[TensorEntry, ...]] | None:
    """The data offset and tensors of a safetensors stream from its first bytes; None
    while `prefix` is too short to hold the header. Raises `InvalidRequest` naming
    `where` for bytes that are not a safetensors header."""
    if len(prefix) < 8:
        return None
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise InvalidRequest(f"{where} is not a safetensors stream (header length {length})")
    if len(prefix) < 8 + length:
        return None
    try:
        return 8 + length, parse_entries(Path(where), prefix[8 : 8 + length])
    except Exception as exc:  # LoadError or a JSON error: the client sent bad bytes
        raise InvalidRequest(f"{where} is not a safetensors stream: {exc}") from exc


def plan_push(base: ModelFiles, pushed: Sequence[TensorEntry], base_label: str) -> PushPlan:
    """Check `pushed` against the base version's tensors (see the module docstring)."""
    if not pushed:
        raise InvalidRequest("the push holds no tensor")
    known = {entry.name: entry for header in base.headers for entry in header.tensors}
    casts: dict[str, tuple[str, str]] = {}
    for entry in pushed:
        mine = known.get(entry.name)
        if mine is None:
            raise InvalidRequest(
                f"pushed tensor {entry.name!r} is not in the base version {base_label} "
                f"(it has {len(known)} tensors, such as {', '.join(sorted(known)[:3])})"
            )
        if mine.shape != entry.shape:
            raise InvalidRequest(
                f"pushed tensor {entry.name!r} has shape {list(entry.shape)}; the base "
                f"version {base_label} has {list(mine.shape)}"
            )
        if mine.dtype != entry.dtype:
            if entry.dtype not in _TORCH_DTYPES or mine.dtype not in _TORCH_DTYPES:
                raise InvalidRequest(
                    f"pushed tensor {entry.name!r} is {entry.dtype}; the base version "
                    f"{base_label} has {mine.dtype}, and only float dtypes are cast"
                )
            casts[entry.name] = (entry.dtype, mine.dtype)
    complete = {entry.name for entry in pushed} == set(known)
    return PushPlan(base, tuple(pushed), complete, casts)


def assemble(plan: PushPlan, pushed_path: Path, target: Path) -> None:
    """Write the pushed version into the empty directory `target` (see the module
    docstring). `pushed_path` is consumed: renamed into place, or read and removed."""
    for source, relative in _inherited_files(plan.base):
        _link_or_copy(source, target / relative)
    weights = target / WEIGHTS_FILE
    if plan.in_place:
        os.replace(pushed_path, weights)
        return
    try:
        _merge(plan, pushed_path, weights)
    finally:
        pushed_path.unlink(missing_ok=True)


def _inherited_files(base: ModelFiles) -> Iterable[tuple[Path, Path]]:
    weights = {path.resolve() for path in base.weights}
    for directory, _, names in os.walk(base.root):
        for name in names:
            path = Path(directory) / name
            relative = path.relative_to(base.root)
            if name.startswith(".") or str(relative) in SKIPPED or path.resolve() in weights:
                continue
            yield path, relative


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(source, target)


def _merge(plan: PushPlan, pushed_path: Path, out: Path) -> None:
    """One safetensors file with the base's tensors (names, dtypes, shapes, order) where
    the pushed bytes replace the base's for the pushed names."""
    pushed_header = read_header(pushed_path)
    pushed = {entry.name: entry for entry in pushed_header.tensors}
    layout: list[tuple[SafetensorsHeader, TensorEntry, TensorEntry | None]] = [
        (header, entry, pushed.get(entry.name))
        for header in plan.base.headers
        for entry in header.tensors
    ]
    document: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for _, entry, _ in layout:
        document[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(document, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with out.open("wb") as sink, pushed_path.open("rb") as pushed_file:
        sink.write(struct.pack("<Q", len(raw)) + raw)
        for header, entry, replacement in layout:
            if replacement is None:
                _copy_span(header.path, header.data_start + entry.begin, entry.nbytes, sink)
            elif entry.name in plan.casts:
                pushed_file.seek(pushed_header.data_start + replacement.begin)
                sink.write(_cast(pushed_file.read(replacement.nbytes), *plan.casts[entry.name]))
            else:
                pushed_file.seek(pushed_header.data_start + replacement.begin)
                _copy_stream(pushed_file, replacement.nbytes, sink)
        sink.flush()
        os.fsync(sink.fileno())


def _copy_span(path: Path, start: int, count: int, sink: BinaryIO) -> None:
    with path.open("rb") as source:
        source.seek(start)
        _copy_stream(source, count, sink)


def _copy_stream(source: BinaryIO, count: int, sink: BinaryIO) -> None:
    while count > 0:
        chunk = source.read(min(CHUNK_BYTES, count))
        if not chunk:
            raise InvalidRequest("the pushed weights ended before their last tensor")
        sink.write(chunk)
        count -= len(chunk)


def _cast(data: bytes, source: str, target: str) -> bytes:
    import torch

    tensor = torch.frombuffer(bytearray(data), dtype=getattr(torch, _TORCH_DTYPES[source]))
    cast = tensor.to(getattr(torch, _TORCH_DTYPES[target]))
    return bytes(cast.view(torch.uint8).numpy())
