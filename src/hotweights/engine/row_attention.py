"""Attention over the engine's cache rows, for one mixed pass of many sequences.

The batched engine runs one forward pass per step over a flat run of tokens: one decode
token for each running sequence and chunks of joining prompts, each token with its own
position. The model's layers do everything per token (projections, rotary embeddings, the
MLP) except attention, which must see each token's own sequence. That part is this module:
an attention function registered with transformers under `ATTENTION` and switched on for a
model by `adopt`. While the engine's thread has a `StepLayout` in place (`running`), each
layer's call writes the step's new keys and values into the sequences' rows of `KVRows` and
attends each query to its own row: every decode query in one batched call over the rows'
used columns, each prompt chunk in a call of its own (causal, after what its row holds).
Outside a step (the per-request loop, the warmup check's plain pass, another thread) the
function is transformers' own SDPA attention, unchanged.

A model whose attention does not go through transformers' attention interface, or that asks
for something this function does not do (a logit soft cap, attention sinks), raises during
the engine's pass, so the warmup check falls back to the per-request engine.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from hotweights.engine.kv import KVRows

ATTENTION = "hotweights_rows"
"""The name the attention function is registered under with transformers."""

_UNSUPPORTED = ("softcap", "s_aux", "sinks")
_local = threading.local()


@dataclass(frozen=True)
class Chunk:
    """A run of one prompt's tokens in the pass: `count` query tokens at flat offset
    `offset`, written to row `row` from column `start` (what the row already holds)."""

    row: int
    start: int
    count: int
    offset: int


@dataclass
class StepLayout:
    """Where each token of one pass belongs: built by the engine for every step.

    Decode tokens come first in the flat run, one per entry of `decode_rows`, each written at
    column `decode_columns[i]` of its row; prompt chunks follow (`chunks`).
    """

    kv: KVRows
    decode_rows: torch.Tensor
    """(decodes,) long: the row of each decode token, in flat order."""
    decode_columns: torch.Tensor
    """(decodes,) long: where each decode token is written (its row's length before it)."""
    decode_span: int
    """Rows `[0, decode_span)` cover every decode row: the batched call runs over them."""
    decode_lengths: torch.Tensor
    """(decode_span,) long: columns each of those rows attends (0 for rows not decoding)."""
    decode_width: int
    """The longest of `decode_lengths`."""
    chunks: tuple[Chunk, ...]
    calls: int = 0
    """Attention calls served in this step (the engine checks every layer came here)."""


@contextmanager
def running(layout: StepLayout) -> Iterator[StepLayout]:
    """Route this thread's attention calls through `layout` for the duration."""
    _local.layout = layout
    try:
        yield layout
    finally:
        _local.layout = None


def adopt(model: Any) -> None:
    """Register the attention function (once) and switch `model` to it.

    Raises `ValueError` when the model attends some other way than SDPA (eager, flash,
    flex): the function falls back to SDPA outside a step, so it only replaces SDPA."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, rows_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    configs = [model.config]
    text = model.config.get_text_config()
    if text is not model.config:
        configs.append(text)
    for config in configs:
        current = getattr(config, "_attn_implementation", None)
        if current not in ("sdpa", ATTENTION):
            raise ValueError(f"the model attends with {current!r}; the engine replaces only sdpa")
    for config in configs:
        config._attn_implementation = ATTENTION


def rows_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (1, heads, tokens, head_dim), key and value
    (1, kv_heads, tokens, head_dim) for the pass's flat run; returns (1, tokens, heads,
    head_dim). Without a layout on this thread, SDPA attention as transformers runs it."""
    layout: StepLayout | None = getattr(_local, "layout", None)
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(f"the engine's attention does not do {name}")
    import torch

    layout.calls += 1
    window: int | None = kwargs.get("sliding_window")
    keys, values = layout.kv.layer(int(module.layer_idx))
    heads, tokens, head_dim = query.shape[1], query.shape[2], query.shape[3]
    output = query.new_empty((tokens, heads, head_dim))
    decodes = int(layout.decode_rows.shape[0])
    if decodes:
        # Write each decode token's key and value at its row's next column.
        new_keys = key[0, :, :decodes].transpose(0, 1)  # (decodes, kv_heads, head_dim)
        new_values = value[0, :, :decodes].transpose(0, 1)
        keys[layout.decode_rows, :, layout.decode_columns] = new_keys
        values[layout.decode_rows, :, layout.decode_columns] = new_values
        span, width = layout.decode_span, layout.decode_width
        # One query per row of [0, span): rows not decoding get a zero query, masked whole.
        queries = query.new_zeros((span, heads, 1, head_dim))
        queries[layout.decode_rows, :, 0] = query[0, :, :decodes].transpose(0, 1)
        column = torch.arange(width, device=query.device)
        visible = column[None, :] < layout.decode_lengths[:, None]  # (span, width)
        if window is not None:
            visible &= column[None, :] >= layout.decode_lengths[:, None] - window
        visible[:, 0] |= layout.decode_lengths == 0  # a fully masked row would give NaN
        attended = _sdpa(
            queries,
            keys[:span, :, :width],
            values[:span, :, :width],
            visible[:, None, None, :],
            scaling,
        )  # (span, heads, 1, head_dim)
        output[:decodes] = attended[layout.decode_rows, :, 0]
    for chunk in layout.chunks:
        stop = chunk.start + chunk.count
        flat = slice(chunk.offset, chunk.offset + chunk.count)
        keys[chunk.row, :, chunk.start : stop] = key[0, :, flat]
        values[chunk.row, :, chunk.start : stop] = value[0, :, flat]
        column = torch.arange(stop, device=query.device)
        position = torch.arange(chunk.start, stop, device=query.device)
        visible = column[None, :] <= position[:, None]  # (count, stop)
        if window is not None:
            visible &= column[None, :] > position[:, None] - window
        attended = _sdpa(
            query[:, :, flat],
            keys[chunk.row : chunk.row + 1, :, :stop],
            values[chunk.row : chunk.row + 1, :, :stop],
            visible[None, None],
            scaling,
        )  # (1, heads, count, head_dim)
        output[flat] = attended[0].transpose(0, 1)
    return output[None], None


def _sdpa(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    scaling: float | None,
) -> torch.Tensor:
    import torch

    grouped = query.shape[1] != keys.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=scaling, enable_gqa=grouped
    )
