from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from hotweights.backends import read_header
from hotweights.errors import LoadError


def write_safetensors(path: Path, header: dict[str, object], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def two_tensors(path: Path) -> Path:
    header = {
        "__metadata__": {"format": "pt"},
        "b": {"dtype": "F32", "shape": [2, 2], "data_offsets": [4, 20]},
        "a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
    }
    return write_safetensors(path, header, bytes(range(20)))


def test_a_good_header_lists_tensors_in_file_order(tmp_path: Path) -> None:
    header = read_header(two_tensors(tmp_path / "model.safetensors"))
    assert [(t.name, t.dtype, t.shape, t.numel) for t in header.tensors] == [
        ("a", "BF16", (2,), 2),
        ("b", "F32", (2, 2), 4),
    ]
    assert header.tensor_bytes == 20
    assert header.data_start == header.file_size - 20


@pytest.mark.parametrize("keep", [0, 5, 8, 30])
def test_a_file_cut_inside_its_header_is_truncated(tmp_path: Path, keep: int) -> None:
    path = two_tensors(tmp_path / "model.safetensors")
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(LoadError, match=r"model\.safetensors is truncated"):
        read_header(path)


def test_a_file_cut_inside_its_data_names_both_sizes(tmp_path: Path) -> None:
    path = two_tensors(tmp_path / "model.safetensors")
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(LoadError) as caught:
        read_header(path)
    message = str(caught.value)
    assert str(path) in message
    assert "header says 20 bytes of tensor data, file has 17" in message


@pytest.mark.parametrize(
    ("header", "complaint"),
    [
        ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "needs 12"),
        ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "shape"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "data_offsets"),
        ({"x": {"shape": [1], "data_offsets": [0, 4]}}, "no dtype"),
        ({"x": [1, 2]}, "JSON object"),
    ],
)
def test_inconsistent_entries_are_corrupt(
    tmp_path: Path, header: dict[str, object], complaint: str
) -> None:
    path = write_safetensors(tmp_path / "w.safetensors", header, bytes(16))
    with pytest.raises(LoadError, match=complaint):
        read_header(path)


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        (struct.pack("<Q", 9) + b"{not json", "not valid JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 2**40) + b"{}", "not a safetensors file"),
    ],
)
def test_garbage_is_not_a_header(tmp_path: Path, content: bytes, complaint: str) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoadError, match=complaint):
        read_header(path)
