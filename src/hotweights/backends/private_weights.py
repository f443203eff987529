"""Weights of the model's own, read from its checkpoint with plain reads.

`from_pretrained` maps safetensors files and leaves the weights as the file's pages: fast
(nothing is read until used), but the served model then changes if the file is rewritten in
place (a training job saving into the served directory), and a truncated file kills the
process with SIGBUS at the next forward pass. `make_weights_private` reads each file's data
section once, with `readinto` in large chunks (the GIL is released during each read), into
one private block, and points every weight that came from the file at its bytes there.
What the load converted or computed (a cast to another dtype, a non-persistent buffer) is
already private, or is copied into the same block. The file mapping is dropped with the
last reference to it. Cost: about what reading the checkpoint's bytes costs; with a hasher
per file (see `digest_check`), each chunk is hashed as it lands, in smaller chunks that are
still in cache when hashed.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hotweights.backends.safetensors_header import SafetensorsHeader, TensorEntry
from hotweights.digests import CHUNK_BYTES as HASHED_CHUNK_BYTES
from hotweights.digests import Hasher

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CHUNK_BYTES = 64 * 2**20
_ALIGNMENT = 64
_TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}


def make_weights_private(
    model: PreTrainedModel,
    headers: Sequence[SafetensorsHeader],
    hashers: Sequence[Hasher | None] | None = None,
) -> int:
    """Replace every parameter and buffer of `model` by a view of one private block: bytes
    read from `headers`' files where a tensor of the same name, dtype and shape is there,
    a copy of the tensor otherwise. Tied weights stay tied. Each file's data section read
    is fed, in order, to its hasher in `hashers` (one per header, None to skip). Returns
    the bytes read from files. Raises `OSError` if a file cannot be read whole."""
    import torch

    entries: dict[str, tuple[int, TensorEntry]] = {}
    for index, header in enumerate(headers):
        for entry in header.tensors:
            entries[entry.name] = (index, entry)
    unique: dict[int, tuple[str, Any]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        unique.setdefault(id(tensor), (name, tensor))
    for name, buffer in model.named_buffers():
        unique.setdefault(id(buffer), (name, buffer))
    # Layout: each file's data section as it is stored, then the tensors found in no file.
    starts, offset = [], 0
    for header in headers:
        starts.append(offset)
        offset += _aligned(header.file_size - header.data_start)
    from_file: list[tuple[Any, int, TensorEntry]] = []
    copied: list[tuple[Any, int]] = []
    for name, tensor in unique.values():
        found = entries.get(name)
        if found is not None and _matches(found[1], tensor) and _aligned_for(found, starts, tensor):
            index, entry = found
            from_file.append((tensor, starts[index] + entry.begin, entry))
        else:
            copied.append((tensor, offset))
            offset += _aligned(tensor.numel() * tensor.element_size())
    block = zeroed_bytes(max(offset, 1))
    read = 0
    feeds = hashers if hashers is not None else [None] * len(headers)
    for header, start, hasher in zip(headers, starts, feeds, strict=True):
        target = block[start : start + header.file_size - header.data_start]
        read += _read_data(header, target, hasher)
    with torch.no_grad():
        for tensor, at, entry in from_file:
            view = block[at : at + entry.nbytes].view(tensor.dtype).view(tensor.shape)
            tensor.data = view
        for tensor, at in copied:
            length = tensor.numel() * tensor.element_size()
            view = block[at : at + length].view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor)
            tensor.data = view
    return read


def zeroed_bytes(length: int) -> Any:
    """A uint8 CPU tensor of `length` zero bytes in anonymous memory asked to use huge
    pages: nothing is written until used (the kernel's pages are zero), and the kernel
    faults it in 2 MiB at a time, which halves the cost of reading into it. Freed
    (unmapped) with the last tensor that views it."""
    import torch

    memory = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        with contextlib.suppress(OSError):  # a kernel without transparent huge pages
            memory.madvise(advice)
    return torch.frombuffer(memory, dtype=torch.uint8)


def _read_data(header: SafetensorsHeader, target: Any, hasher: Hasher | None = None) -> int:
    """Read `header`'s data section into the uint8 tensor `target` (same length), feeding
    each chunk to `hasher` as it lands."""
    view = memoryview(target.numpy()).cast("B")
    length = len(view)
    chunk = CHUNK_BYTES if hasher is None else HASHED_CHUNK_BYTES
    done = 0
    with header.path.open("rb", buffering=0) as stream:
        stream.seek(header.data_start)
        while done < length:
            count = stream.readinto(view[done : min(length, done + chunk)])
            if not count:
                raise OSError(
                    f"{header.path} ended after {done} of its {length} bytes of tensor data"
                )
            if hasher is not None:
                hasher.update(view[done : done + count])
            done += count
    return done


def _matches(entry: TensorEntry, tensor: Any) -> bool:
    nbytes: int = tensor.numel() * tensor.element_size()
    return (
        _TORCH_DTYPES.get(entry.dtype) == str(tensor.dtype).removeprefix("torch.")
        and tuple(entry.shape) == tuple(tensor.shape)
        and entry.nbytes == nbytes
    )


def _aligned_for(found: tuple[int, TensorEntry], starts: Sequence[int], tensor: Any) -> bool:
    """Whether the tensor's bytes start at a multiple of its element size in the block."""
    index, entry = found
    size: int = tensor.element_size()
    return (starts[index] + entry.begin) % size == 0


def _aligned(length: int) -> int:
    return -(-length // _ALIGNMENT) * _ALIGNMENT
