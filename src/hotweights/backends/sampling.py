"""Next-token sampling with a request's own parameters and random generator.

torch is imported inside the function, so importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from hotweights.generation import GenerationParams

if TYPE_CHECKING:
    import torch


def sample_next_token(
    logits: torch.Tensor, params: GenerationParams, generator: torch.Generator
) -> int:
    """Pick the next token id from `logits` (shape: (vocab,)) as `params` say.

    Greedy when `params.greedy`; otherwise temperature-scaled softmax, cut to the top-p
    nucleus, sampled with `generator` alone so concurrent requests do not share
    random state. Call under `torch.inference_mode()`.
    """
    import torch

    if params.greedy:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # (vocab,)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)  # (vocab,), (vocab,)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass ahead of each
        outside = before >= params.top_p
        outside[0] = False  # the most likely token stays, however small top_p is
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (1,)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def adjust_logits(
    logits: torch.Tensor, params: GenerationParams, generated: Mapping[int, int]
) -> torch.Tensor:
    """`logits` (vocab,) with `params`' logit_bias added and its penalties subtracted, as
    OpenAI defines them: for a token generated `c` times so far,
    `logit - c * frequency_penalty - (c > 0) * presence_penalty`. Returns a new tensor."""
    import torch

    adjusted = logits.float().clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=logits.device)
        values = list(params.logit_bias.values())  # ints are valid biases too
        bias = torch.tensor(values, dtype=torch.float32, device=logits.device)
        adjusted.index_add_(0, ids, bias)
    if generated and (params.presence_penalty or params.frequency_penalty):
        ids = torch.tensor(list(generated), dtype=torch.long, device=logits.device)
        counts = torch.tensor(list(generated.values()), dtype=torch.float32, device=logits.device)
        penalty = counts * params.frequency_penalty + params.presence_penalty
        adjusted.index_add_(0, ids, -penalty)
    return adjusted


def top_tokens(logprobs: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """The `k` most likely ids of each row of `logprobs` (rows, vocab), most likely first,
    with their log-probabilities."""
    import torch

    if k == 0:
        return [[] for _ in range(logprobs.shape[0])]
    values, ids = torch.topk(logprobs, k, dim=-1)  # (rows, k), (rows, k)
    return [
        list(zip(row_ids, row_values, strict=True))
        for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
    ]
