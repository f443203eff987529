"""The key/value cache of one engine: a row per running sequence.

Every layer keeps two buffers of shape (rows, kv_heads, columns, head_dim). A sequence
holds one row from when it joins until it leaves; its tokens sit at columns `[0, length)`
of the row, so a row's keys are one contiguous view and attention reads them in place (no
gather, no shifting: rows never move). The buffers are anonymous memory nobody has
written, so the cache costs what its sequences have written, not what it could hold: a
page is reserved the first time a token lands in it. The budget (rows x columns) stays the
explicit upper bound the memory check counts.

Only the engine thread touches a `KVRows`; nothing here is thread-safe.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hotweights.backends.private_weights import zeroed_bytes

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class KVShape:
    """What one token of one sequence costs in every layer."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    def bytes_per_token(self) -> int:
        """Keys and values of one token across all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def columns_for(self, budget_bytes: int, rows: int) -> int:
        """How many token columns `rows` rows get from `budget_bytes`."""
        return budget_bytes // (self.bytes_per_token() * max(rows, 1))


def kv_shape(config: Any, dtype_bytes: int) -> KVShape:
    """The per-token cache shape of a transformers decoder config (`num_hidden_layers`,
    `num_key_value_heads`, `head_dim` or `hidden_size / num_attention_heads`)."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    return KVShape(int(config.num_hidden_layers), kv_heads, int(head_dim), dtype_bytes)


class KVRows:
    """The cache: `rows` sequences of up to `columns` tokens each."""

    def __init__(
        self, shape: KVShape, rows: int, columns: int, dtype: torch.dtype, device: str
    ) -> None:
        self.keys, self.values = layer_buffers(shape, rows, columns, dtype, device)
        self.rows = rows
        self.columns = columns
        self.device = device
        self._free = list(range(rows))
        """Free rows, a heap: the lowest is taken first, so used rows stay low and a
        batched call over rows `[0, highest used]` wastes little."""

    def nbytes(self) -> int:
        return buffer_bytes(self.keys, self.values)

    @property
    def free_rows(self) -> int:
        return len(self._free)

    def take_row(self) -> int:
        """The lowest free row; raises `IndexError` when none is."""
        return heapq.heappop(self._free)

    def give_row(self, row: int) -> None:
        heapq.heappush(self._free, row)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s key and value buffers, (rows, kv_heads, columns, head_dim)."""
        return self.keys[index], self.values[index]


def layer_buffers(
    shape: KVShape, rows: int, columns: int, dtype: torch.dtype, device: str
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's key and value buffers, (rows, kv_heads, columns, head_dim) each, in
    memory nobody has written (see `_zeros`)."""
    dims = (rows, shape.kv_heads, columns, shape.head_dim)
    keys = [_zeros(dims, dtype, device) for _ in range(shape.layers)]
    values = [_zeros(dims, dtype, device) for _ in range(shape.layers)]
    return keys, values


def buffer_bytes(keys: list[torch.Tensor], values: list[torch.Tensor]) -> int:
    """What `layer_buffers` reserve at most."""
    return sum(t.numel() * t.element_size() for t in (*keys, *values))


def _zeros(dims: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """A zero tensor; on the CPU in untouched anonymous memory, so a large cache costs
    nothing until its columns are written (torch.zeros would write every byte now)."""
    import torch

    if not device.startswith("cpu"):
        return torch.zeros(dims, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    count = math.prod(dims)
    block = zeroed_bytes(max(1, count * itemsize))
    return block[: count * itemsize].view(dtype).view(dims)  # type: ignore[no-any-return]
