"""Next-token sampling with a request's own parameters and random generator.

torch is imported inside the function, so importing this module does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hotweights.generation import GenerationParams

if TYPE_CHECKING:
    import torch


def sample_next_token(
    logits: torch.Tensor, params: GenerationParams, generator: torch.Generator
) -> int:
    """Pick the next token id from `logits` (shape: (vocab,)) as `params` say.

    Greedy at temperature 0; otherwise temperature-scaled softmax, cut to the top-p
    nucleus, sampled with `generator` alone so concurrent requests do not share
    random state. Call under `torch.inference_mode()`.
    """
    import torch

    if params.temperature == 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)  # (vocab,)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)  # (vocab,), (vocab,)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass ahead of each
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (1,)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())
