"""Next-token sampling with each request's own parameters and random numbers.

Both engines pick tokens with the same arithmetic, on rows of logits: the per-request loop
passes one row, the batched engine all its rows at once. A sampled token is drawn by
inverse transform from one uniform number of the request's own `random.Random` (seeded, or
from the OS), one number per token: the same seed, prompt and logits give the same text
whatever else shares the batch. Greedy picks the most likely token.

torch is imported inside the functions, so importing this module does not import torch.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from hotweights.generation import GenerationParams

if TYPE_CHECKING:
    import torch


def random_numbers(seed: int | None) -> random.Random:
    """A request's own source of uniform numbers: seeded, or from the OS."""
    return random.Random(seed) if seed is not None else random.Random()


def sample_rows(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    uniforms: Sequence[float],
) -> torch.Tensor:
    """One sampled token per row of `logits` (rows, vocab), float32: softmax at the row's
    temperature, cut to its top-p nucleus (the most likely token always stays), then the
    token where the row's uniform number falls in the cumulative distribution. Returns
    (rows,) long. Rows with a nucleus and rows without are computed apart, so a row's
    token never depends on the others. Call under `torch.inference_mode()`."""
    import torch

    device = logits.device
    temperature = torch.tensor(temperatures, dtype=torch.float32, device=device)[:, None]
    uniform = torch.tensor(uniforms, dtype=torch.float64, device=device)
    probs = torch.softmax(logits / temperature, dim=-1)  # (rows, vocab)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=device)
    nucleus = [i for i, top_p in enumerate(top_ps) if top_p < 1]
    whole = [i for i, top_p in enumerate(top_ps) if top_p >= 1]
    for group, draw in ((whole, _whole), (nucleus, _nucleus)):
        if len(group) == len(top_ps):  # every row alike: no gather and scatter
            return draw(probs, uniform, top_ps)
        if group:
            index = torch.tensor(group, dtype=torch.long, device=device)
            tokens[index] = draw(probs[index], uniform[index], [top_ps[i] for i in group])
    return tokens


def _whole(probs: torch.Tensor, uniform: torch.Tensor, top_ps: Sequence[float]) -> torch.Tensor:
    return _inverse_cdf(probs, uniform)


def _nucleus(probs: torch.Tensor, uniform: torch.Tensor, top_ps: Sequence[float]) -> torch.Tensor:
    import torch

    top_p = torch.tensor(top_ps, device=probs.device)[:, None]
    ranked, order = torch.sort(probs, dim=-1, descending=True)  # (n, vocab) x2
    ahead = torch.cumsum(ranked, dim=-1) - ranked  # the mass before each token
    outside = ahead >= top_p
    outside[:, 0] = False
    picked = _inverse_cdf(ranked.masked_fill(outside, 0.0), uniform)  # (n,)
    return order.gather(1, picked[:, None])[:, 0]


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The index in each row of `probs` (rows, vocab) where `uniform` (rows,) in [0, 1) of
    the row's total mass falls: a token of probability 0 is never picked."""
    import torch

    cdf = torch.cumsum(probs.double(), dim=-1)  # (rows, vocab)
    target = (uniform * cdf[:, -1])[:, None]  # (rows, 1)
    index = torch.searchsorted(cdf, target, right=True)[:, 0]
    return index.clamp(max=probs.shape[-1] - 1)


def sample_next_token(
    logits: torch.Tensor, params: GenerationParams, numbers: random.Random
) -> int:
    """Pick the next token id from `logits` (vocab,) as `params` say: `sample_rows` for one
    row, or the most likely token when `params.greedy`."""
    import torch

    if params.greedy:
        return int(torch.argmax(logits).item())
    row = logits.float()[None, :]
    return int(sample_rows(row, [params.temperature], [params.top_p], [numbers.random()])[0])


def adjust_logits(
    logits: torch.Tensor, params: GenerationParams, generated: Mapping[int, int]
) -> torch.Tensor:
    """`logits` (vocab,) with `params`' logit_bias added and its penalties subtracted, as
    OpenAI defines them: for a token generated `c` times so far,
    `logit - (c * frequency_penalty + (c > 0) * presence_penalty)`. Returns a new tensor."""
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
