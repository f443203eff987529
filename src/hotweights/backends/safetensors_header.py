"""Reading and checking a safetensors file's header without loading any tensor.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON naming each
tensor's dtype, shape and `[begin, end)` byte span in the data section, then the data.
Checking that every span lies inside the file catches a truncated copy in microseconds,
before torch maps gigabytes of it. Pure Python: no torch, no safetensors package.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from hotweights.errors import LoadError

MAX_HEADER_BYTES = 100_000_000
"""The safetensors format's own bound on the JSON header."""

DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
"""Bytes per element of each safetensors dtype whose elements are whole bytes."""

FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
"""The dtypes `from_pretrained(dtype=...)` converts; other tensors keep their dtype."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as its file's header describes it."""

    name: str
    dtype: str
    """The safetensors dtype code, such as `F32` or `BF16`."""
    shape: tuple[int, ...]
    begin: int
    """Offset of the first byte in the data section (after the header)."""
    end: int
    """Offset one past the last byte in the data section."""

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked header: every tensor span lies within the file."""

    path: Path
    raw: bytes
    """The JSON header bytes exactly as stored."""
    data_start: int
    """Offset in the file where the data section begins (8 + header length)."""
    file_size: int
    tensors: tuple[TensorEntry, ...]

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data the header accounts for."""
        return sum(tensor.nbytes for tensor in self.tensors)


def read_header(path: Path) -> SafetensorsHeader:
    """Read and check the header of the safetensors file at `path`.

    Raises `LoadError` naming `path` when the file is too short for its header, when the
    header is not JSON of the expected shape, when a tensor's span disagrees with its
    dtype and shape, or when the data section is shorter than the spans need
    ("... is truncated: header says N bytes of tensor data, file has M").
    """
    try:
        file_size = path.stat().st_size
        with path.open("rb") as stream:
            prefix = stream.read(8)
            if len(prefix) < 8:
                raise LoadError(
                    f"{path} is truncated: {file_size} bytes, too short for the 8-byte "
                    "safetensors header length"
                )
            (header_length,) = struct.unpack("<Q", prefix)
            if header_length > MAX_HEADER_BYTES:
                raise LoadError(
                    f"{path} is not a safetensors file: its header length field says "
                    f"{header_length} bytes (at most {MAX_HEADER_BYTES} expected)"
                )
            if 8 + header_length > file_size:
                raise LoadError(
                    f"{path} is truncated: header length field says {header_length} bytes "
                    f"of header, file has {file_size - 8} after the length field"
                )
            raw = stream.read(header_length)
    except OSError as exc:
        raise LoadError(f"cannot read {path}: {exc}") from exc
    tensors = parse_entries(path, raw)
    data_size = file_size - 8 - header_length
    needed = max((tensor.end for tensor in tensors), default=0)
    if needed > data_size:
        raise LoadError(
            f"{path} is truncated: header says {needed} bytes of tensor data, file has {data_size}"
        )
    return SafetensorsHeader(path, raw, 8 + header_length, file_size, tensors)


def parse_entries(path: Path, raw: bytes) -> tuple[TensorEntry, ...]:
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"{path} is corrupt: its header is not valid JSON ({exc})") from exc
    if not isinstance(document, dict):
        raise LoadError(f"{path} is corrupt: its header is not a JSON object")
    entries: list[TensorEntry] = []
    for name, spec in document.items():
        if name == "__metadata__":
            continue
        entries.append(_parse_entry(path, name, spec))
    return tuple(sorted(entries, key=lambda entry: entry.begin))


def _parse_entry(path: Path, name: str, spec: object) -> TensorEntry:
    where = f"{path} is corrupt: tensor {name!r}"
    if not isinstance(spec, dict):
        raise LoadError(f"{where} is not described by a JSON object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str):
        raise LoadError(f"{where} has no dtype")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise LoadError(f"{where} has shape {shape!r}, expected a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(offset) for offset in offsets)
        or offsets[0] > offsets[1]
    ):
        raise LoadError(f"{where} has data_offsets {offsets!r}, expected [begin, end]")
    entry = TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])
    itemsize = DTYPE_BYTES.get(dtype)
    if itemsize is not None and entry.numel * itemsize != entry.nbytes:
        raise LoadError(
            f"{where} spans {entry.nbytes} bytes, but {dtype} {list(shape)} needs "
            f"{entry.numel * itemsize}"
        )
    return entry


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
