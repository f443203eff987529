"""Generation parameters, the pieces a token stream yields, and next-token sampling.

`GenerationParams` checks its ranges on construction, so a model never sees a bad value.
`sample_next_token` needs torch; it is imported inside the function so that importing
this module does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from hotweights.errors import InvalidRequest

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length"]
"""`stop`: an eos token or a stop string ended the text; `length`: `max_tokens` did."""

MAX_STOP_STRINGS = 4
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class GenerationParams:
    """How to sample one completion. Raises `InvalidRequest` for out-of-range values."""

    temperature: float = 1.0
    """Softmax temperature in [0, 2]; 0 picks the most likely token (greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens holding this much
    probability, in (0, 1]."""
    max_tokens: int = 16
    """Most tokens to generate, at least 1."""
    stop: Sequence[str] = ()
    """Up to 4 non-empty strings; the text ends before the first one that appears, which
    is not part of the output. Stored as a tuple."""
    seed: int | None = None
    """Seeds this request's own random generator: same seed, same prompt, same text."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            raise InvalidRequest("stop must be a list of strings, not a string")
        object.__setattr__(self, "stop", tuple(self.stop))
        if not _is_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequest(
                f"temperature must be between 0 and {MAX_TEMPERATURE}, got {self.temperature!r}"
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(
                f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}"
            )
        if not all(isinstance(stop, str) and stop for stop in self.stop):
            raise InvalidRequest(f"stop strings must be non-empty strings, got {self.stop!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidRequest(f"seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True)
class TokenChunk:
    """One piece of a token stream.

    Every chunk but the last has non-empty `text` and `finish_reason` None; the last has
    `finish_reason` set and may have empty text. Counts are totals so far.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    """Tokens sampled so far, the eos or stop-completing token included."""
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class Completion:
    """A whole completion, as `LoadedLM.generate` returns it."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


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


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
