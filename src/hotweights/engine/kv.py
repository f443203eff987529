"""The key/value cache of one engine: preallocated rows, one per running sequence.

Every layer keeps two buffers of shape (rows, kv_heads, columns, head_dim), allocated once
when the engine starts and reused by every request after it (nothing is allocated per
request or per token). Row `r` holds one sequence; its tokens sit right-aligned, in
columns `[start_r, end)`, where `end` is shared by all rows: a decode step writes every
row's next token at column `end`, so one forward pass serves the whole batch. A column a
row does not use is masked out of its attention by `valid`.

When a prompt longer than `end` joins, every row shifts right; when `end` reaches the last
column, every row shifts left by the smallest `start` (compaction). Both copy the used
region once; sequence limits (`prompt + max_tokens <= columns`) guarantee room after it.

Only the engine thread touches a `SlotKV`; nothing here is thread-safe.
"""

from __future__ import annotations

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


class SlotKV:
    """The preallocated cache: `rows` sequences of up to `columns` tokens each."""

    def __init__(
        self, shape: KVShape, rows: int, columns: int, dtype: torch.dtype, device: str
    ) -> None:
        import torch

        dims = (rows, shape.kv_heads, columns, shape.head_dim)
        self.keys = [_zeros(dims, dtype, device) for _ in range(shape.layers)]
        self.values = [_zeros(dims, dtype, device) for _ in range(shape.layers)]
        self.valid = torch.zeros((rows, columns), dtype=torch.bool, device=device)
        self.rows = rows
        self.columns = columns
        self.end = 0
        """The column the next decode step writes; every used row ends here."""
        self.device = device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    # -- room -------------------------------------------------------------------------

    def make_room(self, length: int, used: int, starts: list[int]) -> list[int]:
        """Arrange that a sequence of `length` tokens can end at `end`, and that the next
        decode step has a column. Returns the rows' new starts (rows `[0, used)`)."""
        if self.end >= self.columns and used:
            starts = self._shift(-min(starts), used, starts)
        if length > self.end:
            starts = self._shift(length - self.end, used, starts)
        return starts

    def _shift(self, by: int, used: int, starts: list[int]) -> list[int]:
        """Move the used region of rows `[0, used)` right (`by` > 0) or left (< 0)."""
        if not used:
            self.end = max(self.end + by, 0)
            return starts
        low = min(starts)
        for buffer in (*self.keys, *self.values):
            region = buffer[:used, :, low : self.end].clone()
            buffer[:used, :, low + by : self.end + by] = region
        valid = self.valid[:used, low : self.end].clone()
        self.valid[:used, low : self.end] = False
        self.valid[:used, low + by : self.end + by] = valid
        self.end += by
        return [start + by for start in starts]

    def move_row(self, source: int, target: int, start: int) -> None:
        """Copy row `source`'s columns `[start, end)` over row `target` (to keep used rows
        contiguous)."""
        for buffer in (*self.keys, *self.values):
            buffer[target, :, start : self.end] = buffer[source, :, start : self.end]
        self.valid[target] = self.valid[source]
        self.valid[source] = False

    def clear_row(self, row: int) -> None:
        self.valid[row] = False

    # -- forward passes ---------------------------------------------------------------

    def view(self, rows: slice, first: int, write_at: int) -> Any:
        """A `transformers.Cache` over `rows`, columns `[first, ...)`, writing new tokens at
        `first + write_at`."""
        return _rows_cache(self, rows, first, write_at)

    def mask(self, rows: slice, first: int, write_at: int, queries: int) -> torch.Tensor:
        """The 4D attention mask (rows, 1, queries, write_at + queries), True where a query
        may look: a valid column no later than its own."""
        import torch

        width = write_at + queries
        valid = self.valid[rows, first : first + width]  # (rows, width)
        column = torch.arange(width, device=self.device)  # (width,)
        query = torch.arange(queries, device=self.device) + write_at  # (queries,)
        causal = column[None, :] <= query[:, None]  # (queries, width)
        return (valid[:, None, None, :] & causal[None, None, :, :]).contiguous()


def _layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):  # type: ignore[no-untyped-call]
        """One layer's view on the slot buffers: `update` writes the new keys and values
        in place and returns every column up to them."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, write_at: int) -> None:
            super().__init__()  # type: ignore[no-untyped-call]
            self._keys_buffer, self._values_buffer, self._write_at = keys, values, write_at
            self.keys, self.values = keys[:, :, :write_at], values[:, :, :write_at]
            self.is_initialized = True
            self.device = keys.device

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            # key_states: (rows, kv_heads, queries, head_dim)
            stop = self._write_at + key_states.shape[-2]
            self._keys_buffer[:, :, self._write_at : stop] = key_states
            self._values_buffer[:, :, self._write_at : stop] = value_states
            self.keys = self._keys_buffer[:, :, :stop]
            self.values = self._values_buffer[:, :, :stop]
            return self.keys, self.values

    return BufferLayer


_BUFFER_LAYER: list[type] = []


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


def _rows_cache(kv: SlotKV, rows: slice, first: int, write_at: int) -> Any:
    """A `transformers.Cache` whose layers are views on `kv` (see `SlotKV.view`)."""
    from transformers.cache_utils import Cache

    if not _BUFFER_LAYER:
        _BUFFER_LAYER.append(_layer_class())
    layer = _BUFFER_LAYER[0]
    layers = [
        layer(keys[rows, :, first:], values[rows, :, first:], write_at)
        for keys, values in zip(kv.keys, kv.values, strict=True)
    ]
    return Cache(layers=layers)
