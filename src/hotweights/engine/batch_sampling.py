"""Every row's next token of one engine step, in one vectorized pass.

`RowSampler` belongs to one engine. It keeps, per cache row, how often each token was
generated (for the penalties) and the row's logit_bias, as dense tensors allocated the
first time a request needs them. `pick` then takes the step's logits for all the rows
that sample and, in a handful of tensor operations whatever the row count: adds biases
and subtracts penalties, takes the argmax of the greedy rows, draws the sampled rows'
tokens (`sample_rows`, with each request's own uniform number), and gathers the
log-probabilities asked for. The results come back to the host in one transfer: one
synchronisation per step, not one per row. Engine thread only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hotweights.backends.sampling import sample_rows
from hotweights.generation import GenerationParams

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Draw:
    """What one row asks of a step."""

    row: int
    """Its cache row (the penalty counts and bias kept for it)."""
    params: GenerationParams
    numbers: random.Random | None
    """Its uniform numbers; None for greedy."""


@dataclass(frozen=True)
class Picked:
    token: int
    logprob: float | None
    """The token's log-probability under the raw logits, when asked."""
    top: list[tuple[int, float]]
    """The most likely tokens and their log-probabilities, as many as asked."""


class RowSampler:
    """Per-row sampling state of one engine's `rows` cache rows over `vocab` tokens."""

    def __init__(self, rows: int, vocab: int, device: str) -> None:
        self._rows, self._vocab, self._device = rows, vocab, device
        self._counts: torch.Tensor | None = None
        """(rows, vocab) float32: times each token was generated on the row."""
        self._bias: torch.Tensor | None = None
        """(rows, vocab) float32: the row's logit_bias, dense."""
        self._adjusting: set[int] = set()
        """Rows whose request has penalties or a bias."""

    def join(self, row: int, params: GenerationParams) -> None:
        """A sequence takes `row`: forget the previous one's counts and bias."""
        import torch

        self._adjusting.discard(row)
        if not params.adjusts_logits:
            return
        if self._counts is None or self._bias is None:
            shape = (self._rows, self._vocab)
            self._counts = torch.zeros(shape, dtype=torch.float32, device=self._device)
            self._bias = torch.zeros(shape, dtype=torch.float32, device=self._device)
        self._counts[row] = 0
        self._bias[row] = 0
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=self._device)
            values = [float(v) for v in params.logit_bias.values()]
            self._bias[row, ids] = torch.tensor(values, device=self._device)
        self._adjusting.add(row)

    def pick(
        self, logits: torch.Tensor, draws: list[Draw], allowed: torch.Tensor | None = None
    ) -> list[Picked]:
        """The next token of each of `draws`, whose logits are the rows of `logits`
        (draws, vocab), float32, in order. Records the tokens for the penalties. With
        `allowed` (draws, vocab) bool, a grammar's masks, only allowed tokens are picked:
        the mask applies after biases and penalties; log-probabilities stay raw."""
        import torch

        device = logits.device
        everyone = len(draws)
        adjusted = logits
        adjusting = [i for i, draw in enumerate(draws) if draw.row in self._adjusting]
        penalised = [i for i in adjusting if _penalises(draws[i].params)]
        if adjusting and self._counts is not None and self._bias is not None:
            rows = _longs([draws[i].row for i in adjusting], device)
            whole = len(adjusting) == everyone  # the common case: no gather and scatter
            index = None if whole else _longs(adjusting, device)
            # (logits + bias) - penalty, in that order, as the per-request loop rounds it
            change = (logits if index is None else logits[index]) + self._bias[rows]
            if penalised:
                counts = self._counts[rows]  # (adjusting, vocab)
                frequency = [draws[i].params.frequency_penalty for i in adjusting]
                presence = [draws[i].params.presence_penalty for i in adjusting]
                change = change - (
                    counts * torch.tensor(frequency, device=device)[:, None]
                    + (counts > 0) * torch.tensor(presence, device=device)[:, None]
                )
            if index is None:
                adjusted = change
            else:
                adjusted = logits.clone()
                adjusted[index] = change
        if allowed is not None:
            adjusted = adjusted.masked_fill(~allowed, float("-inf"))
        tokens = torch.argmax(adjusted, dim=-1)  # (draws,)
        sampled = [i for i, draw in enumerate(draws) if draw.numbers is not None]
        if sampled:
            chosen = sample_rows(
                adjusted if len(sampled) == everyone else adjusted[_longs(sampled, device)],
                [draws[i].params.temperature for i in sampled],
                [draws[i].params.top_p for i in sampled],
                [draws[i].numbers.random() for i in sampled],  # type: ignore[union-attr]
            )
            if len(sampled) == everyone:
                tokens = chosen
            else:
                tokens[_longs(sampled, device)] = chosen
        if penalised and self._counts is not None:
            rows = _longs([draws[i].row for i in penalised], device)
            picked = tokens[_longs(penalised, device)]
            ones = torch.ones_like(picked, dtype=torch.float32)
            self._counts.index_put_((rows, picked), ones, accumulate=True)
        return self._gather(logits, tokens, draws)

    def _gather(
        self, logits: torch.Tensor, tokens: torch.Tensor, draws: list[Draw]
    ) -> list[Picked]:
        """Tokens and the log-probabilities asked for, read back in one transfer."""
        import torch

        asked = [d.params.logprobs for d in draws if d.params.logprobs is not None]
        k = max(asked, default=-1)
        if k < 0:
            return [Picked(int(token), None, []) for token in tokens.tolist()]
        logprobs = torch.log_softmax(logits, dim=-1)  # (draws, vocab)
        chosen = logprobs.gather(1, tokens[:, None])  # (draws, 1)
        parts = [tokens[:, None].double(), chosen.double()]
        if k:
            values, ids = torch.topk(logprobs, k, dim=-1)  # (draws, k) x2
            parts += [ids.double(), values.double()]
        table = torch.cat(parts, dim=1).tolist()  # (draws, 2 + 2k)
        picked: list[Picked] = []
        for draw, line in zip(draws, table, strict=True):
            wanted = draw.params.logprobs
            token = int(line[0])
            if wanted is None:
                picked.append(Picked(token, None, []))
                continue
            top = [(int(line[2 + j]), line[2 + k + j]) for j in range(wanted)]
            picked.append(Picked(token, line[1], top))
        return picked


def _penalises(params: GenerationParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty)


def _longs(values: list[int], device: str | torch.device) -> torch.Tensor:
    import torch

    return torch.tensor(values, dtype=torch.long, device=device)
