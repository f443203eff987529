"""What one engine pass computes: which tokens go in, where each belongs, which logits
come out.

`plan` spends a pass's token budget: one decode token for every generating sequence, then
chunks of the prompts being read, the oldest first, then the first chunks of sequences
joining now. `lay_out` turns a plan into the flat run the model reads (token ids and
positions), the `StepLayout` the attention uses, and the positions whose logits are kept:
each generating sequence's, and the last of a prompt that ends in this pass (every
position, for a prompt whose log-probabilities were asked for). Engine thread only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from hotweights.backends.lora_layers import AdapterGroup, LoraWeights
from hotweights.backends.sequence import TokenSequence
from hotweights.engine.row_attention import Chunk, StepLayout
from hotweights.generation import Deliver

if TYPE_CHECKING:
    import torch

    from hotweights.engine.kv import KVRows

StepKind = Literal["prefill", "decode", "mixed"]


@dataclass(eq=False)
class EngineSequence:
    """One request inside an engine, from its submission to its last chunk."""

    tokens: TokenSequence
    deliver: Deliver
    cut: threading.Event | None
    adapter: LoraWeights | None = None
    """The LoRA adapter version it generates with; None: the base model alone."""
    row: int = -1
    """Its cache row; -1 while it waits, and once it left."""
    length: int = 0
    """Tokens in its cache row."""
    pending: int | None = None
    """The last chosen token, not yet in the cache."""
    produced: int = 0
    scored: list[torch.Tensor] = field(default_factory=list)
    """Logits of the prompt's chunks so far, when its prompt is scored."""
    cancelled: bool = False
    """Its client went away: it leaves at the next pass and gets nothing more."""
    stopped: bool = False
    """The text thread has sent its last item."""

    @property
    def prompt(self) -> list[int]:
        return self.tokens.prompt_ids

    @property
    def prefix_salt(self) -> bytes:
        """What names its prompt's prefix blocks besides the version: its adapter's key."""
        return self.adapter.key.encode() if self.adapter is not None else b""

    @property
    def reading(self) -> bool:
        """Still reading its prompt (no token chosen yet)."""
        return self.length < len(self.tokens.prompt_ids)


@dataclass(frozen=True)
class StepStats:
    """One pass of an engine, for metrics."""

    kind: StepKind
    """`decode` (only generating sequences), `prefill` (only prompt chunks) or `mixed`."""
    batch: int
    """Sequences in the pass."""
    tokens: int
    """Query tokens in the pass."""
    waiting: int
    """Sequences still waiting for a row after it."""
    seconds: float
    """The forward pass alone."""


@dataclass
class Plan:
    decoding: list[EngineSequence]
    chunks: list[tuple[EngineSequence, int]]
    """Prompt chunks: the sequence and how many of its prompt's next tokens."""

    def __bool__(self) -> bool:
        return bool(self.decoding or self.chunks)


def plan(
    running: list[EngineSequence],
    budget: int,
    chunk: int,
    admit: Callable[[], EngineSequence | None],
) -> Plan:
    """The next pass over `running` (in the order they joined) within `budget` tokens,
    prompts read at most `chunk` tokens at a time; `admit` gives the next joining sequence
    (with its row, and its length set past any restored prefix) or None."""
    decoding = [s for s in running if not s.reading]
    left = budget - len(decoding)
    chunks: list[tuple[EngineSequence, int]] = []
    for sequence in [s for s in running if s.reading]:
        if left <= 0:
            break
        count = min(chunk, len(sequence.prompt) - sequence.length, left)
        chunks.append((sequence, count))
        left -= count
    while left > 0:
        joining = admit()
        if joining is None:
            break
        count = min(chunk, len(joining.prompt) - joining.length, left)
        chunks.append((joining, count))
        left -= count
    return Plan(decoding, chunks)


@dataclass
class PassInputs:
    ids: list[int]
    positions: list[int]
    keep: list[int]
    """Flat positions whose logits are computed, in this order."""
    reads: list[tuple[EngineSequence, int, int]]
    """Prompt chunks with kept logits: the sequence, its first kept row, how many."""
    layout: StepLayout
    adapters: tuple[AdapterGroup, ...]
    """The pass's tokens that use an adapter, grouped by adapter."""


def lay_out(step: Plan, kv: KVRows, device: str) -> PassInputs:
    """The flat inputs of `step`: decode tokens first (kept logits `[0, decoding)`), then
    the prompt chunks."""
    import torch

    decoding = step.decoding
    ids = [_pending(s) for s in decoding]
    positions = [s.length for s in decoding]
    keep = list(range(len(decoding)))
    chunks: list[Chunk] = []
    reads: list[tuple[EngineSequence, int, int]] = []
    for sequence, count in step.chunks:
        offset, start = len(ids), sequence.length
        ids.extend(sequence.prompt[start : start + count])
        positions.extend(range(start, start + count))
        chunks.append(Chunk(sequence.row, start, count, offset))
        if sequence.tokens.scores_prompt:
            reads.append((sequence, len(keep), count))
            keep.extend(range(offset, offset + count))
        elif start + count == len(sequence.prompt):
            reads.append((sequence, len(keep), 1))
            keep.append(offset + count - 1)
    rows = [s.row for s in decoding]
    span = max(rows, default=-1) + 1
    lengths = [0] * span
    for sequence in decoding:
        lengths[sequence.row] = sequence.length + 1
    row_index = torch.tensor(rows, dtype=torch.long, device=device)
    layout = StepLayout(
        kv=kv,
        decode_rows=row_index,
        decode_columns=torch.tensor(positions[: len(decoding)], dtype=torch.long, device=device),
        decode_span=span,
        decode_lengths=torch.tensor(lengths, dtype=torch.long, device=device),
        decode_width=max(lengths, default=0),
        chunks=tuple(chunks),
    )
    return PassInputs(ids, positions, keep, reads, layout, _adapter_groups(step, device))


def _adapter_groups(step: Plan, device: str) -> tuple[AdapterGroup, ...]:
    """The flat positions of each adapter's tokens in `step` (laid out as `lay_out` does);
    one group with no index when every token uses the same adapter."""
    import torch

    spans: list[tuple[LoraWeights | None, int, int]] = [
        (sequence.adapter, index, 1) for index, sequence in enumerate(step.decoding)
    ]
    offset = len(spans)
    for sequence, count in step.chunks:
        spans.append((sequence.adapter, offset, count))
        offset += count
    used = {id(adapter): adapter for adapter, _, _ in spans if adapter is not None}
    if not used:
        return ()
    if len(used) == 1 and all(adapter is not None for adapter, _, _ in spans):
        return (AdapterGroup(next(iter(used.values())), None),)
    positions: dict[int, list[int]] = {key: [] for key in used}
    for adapter, first, count in spans:
        if adapter is not None:
            positions[id(adapter)].extend(range(first, first + count))
    return tuple(
        AdapterGroup(used[key], torch.tensor(flat, dtype=torch.long, device=device))
        for key, flat in positions.items()
    )


def _pending(sequence: EngineSequence) -> int:
    if sequence.pending is None:
        raise RuntimeError("a generating sequence has no pending token")
    return sequence.pending
