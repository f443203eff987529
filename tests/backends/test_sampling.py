from __future__ import annotations

from typing import Any

import pytest

from hotweights.backends import sample_next_token
from hotweights.errors import InvalidRequest
from hotweights.generation import GenerationParams


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.01},
        {"max_tokens": 0},
        {"max_tokens": 1.5},
        {"max_tokens": True},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": [""]},
        {"stop": "end"},
        {"seed": "7"},
    ],
)
def test_out_of_range_params_are_invalid_requests(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        GenerationParams(**options)


def test_valid_params_keep_their_values_and_freeze_stop() -> None:
    params = GenerationParams(temperature=0, top_p=1, max_tokens=1, stop=["a", "b"], seed=-3)
    assert params.stop == ("a", "b")
    assert GenerationParams(temperature=2.0, top_p=0.01).top_p == 0.01
    with pytest.raises(AttributeError):
        params.max_tokens = 5  # type: ignore[misc]


@pytest.mark.llm
def test_greedy_picks_the_largest_logit() -> None:
    import torch

    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    generator = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, GenerationParams(temperature=0), generator) == 1


@pytest.mark.llm
def test_top_p_samples_only_from_the_nucleus() -> None:
    import torch

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = torch.Generator().manual_seed(0)
    nucleus = GenerationParams(temperature=1.0, top_p=0.7)  # 0.5 + 0.3 reach 0.7
    seen = {sample_next_token(logits, nucleus, generator) for _ in range(300)}
    assert seen == {0, 1}
    everything = GenerationParams(temperature=1.0)
    seen = {sample_next_token(logits, everything, generator) for _ in range(300)}
    assert seen == {0, 1, 2, 3}


@pytest.mark.llm
def test_the_generator_alone_decides_the_draws() -> None:
    import torch

    logits = torch.zeros(50)
    params = GenerationParams(temperature=1.0)

    def draws(seed: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        return [sample_next_token(logits, params, generator) for _ in range(20)]

    first = draws(1)
    torch.manual_seed(12345)  # the global generator plays no part
    assert draws(1) == first
    assert draws(2) != first
