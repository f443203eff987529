from __future__ import annotations

import random
from typing import Any

import pytest

from hotweights.backends import sample_next_token
from hotweights.backends.sampling import adjust_logits, sample_rows
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
    generator = random.Random(0)
    assert sample_next_token(logits, GenerationParams(temperature=0), generator) == 1


@pytest.mark.llm
def test_top_p_samples_only_from_the_nucleus() -> None:
    import torch

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    generator = random.Random(0)
    nucleus = GenerationParams(temperature=1.0, top_p=0.7)  # 0.5 + 0.3 reach 0.7
    seen = {sample_next_token(logits, nucleus, generator) for _ in range(300)}
    assert seen == {0, 1}
    everything = GenerationParams(temperature=1.0)
    seen = {sample_next_token(logits, everything, generator) for _ in range(300)}
    assert seen == {0, 1, 2, 3}


@pytest.mark.llm
def test_the_requests_own_numbers_alone_decide_the_draws() -> None:
    import torch

    logits = torch.zeros(50)
    params = GenerationParams(temperature=1.0)

    def draws(seed: int) -> list[int]:
        numbers = random.Random(seed)
        return [sample_next_token(logits, params, numbers) for _ in range(20)]

    first = draws(1)
    torch.manual_seed(12345)  # the global generators play no part
    random.seed(12345)
    assert draws(1) == first
    assert draws(2) != first


@pytest.mark.llm
def test_a_rows_token_does_not_depend_on_the_other_rows() -> None:
    """What lets a seeded request give the same text in any batch."""
    import torch

    torch.manual_seed(0)
    logits = torch.randn(6, 40)
    temperatures, top_ps = [0.7, 1.0, 1.3, 0.9, 1.0, 0.5], [1.0, 0.8, 1.0, 0.5, 1.0, 0.95]
    uniforms = [0.1, 0.5, 0.9, 0.33, 0.999, 0.0]
    together = sample_rows(logits, temperatures, top_ps, uniforms).tolist()
    for row in range(6):
        one = logits[row : row + 1]
        alone = sample_rows(one, [temperatures[row]], [top_ps[row]], [uniforms[row]])
        assert int(alone[0]) == together[row]


@pytest.mark.llm
def test_draws_follow_the_distribution() -> None:
    import torch

    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0.0]]))
    counts = [0, 0, 0, 0]
    numbers = random.Random(3)
    for _ in range(2000):
        counts[int(sample_rows(logits, [1.0], [1.0], [numbers.random()])[0])] += 1
    assert counts[3] == 0
    assert [round(c / 2000, 1) for c in counts[:3]] == [0.6, 0.3, 0.1]


def test_a_top_p_too_small_for_float32_keeps_the_most_likely_token() -> None:
    """5e-324 rounds to 0 in float32, which once masked every token (found by fuzzing)."""
    import torch

    logits = torch.tensor([0.1, 2.0, 0.3])
    generator = random.Random(0)
    params = GenerationParams(temperature=1.0, top_p=5e-324)
    assert {sample_next_token(logits, params, generator) for _ in range(20)} == {1}


def test_a_temperature_too_small_to_divide_by_is_greedy() -> None:
    import torch

    logits = torch.tensor([0.1, 2.0, 0.3])
    generator = random.Random(0)
    assert sample_next_token(logits, GenerationParams(temperature=1e-300), generator) == 1
    assert GenerationParams(temperature=1e-6).greedy
    assert not GenerationParams(temperature=0.01).greedy


def test_adjusted_logits_follow_openais_formula() -> None:
    import torch

    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    params = GenerationParams(
        presence_penalty=0.5, frequency_penalty=0.25, logit_bias={0: 10.0, 3: -100.0}
    )
    adjusted = adjust_logits(logits, params, {1: 3, 3: 1})
    # token 1: 2 - 3 * 0.25 - 0.5; token 3: 4 - 100 - 0.25 - 0.5
    assert adjusted.tolist() == pytest.approx([11.0, 0.75, 3.0, -96.75])
    assert logits.tolist() == [1.0, 2.0, 3.0, 4.0]  # a new tensor
    assert adjust_logits(logits, GenerationParams(presence_penalty=1.0), {}).tolist() == [
        1.0,
        2.0,
        3.0,
        4.0,
    ]


def test_an_integer_logit_bias_adds_as_a_float_one_does() -> None:
    import torch

    logits = torch.tensor([1.0, 2.0, 3.0])
    adjusted = adjust_logits(logits, GenerationParams(logit_bias={2: 5}), {})
    assert adjusted.tolist() == [1.0, 2.0, 8.0]


@pytest.mark.parametrize(
    "options",
    [
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3},
        {"logit_bias": {-1: 1.0}},
        {"logit_bias": {5: 101.0}},
        {"logprobs": 21},
        {"prompt_logprobs": -1},
        {"max_tokens": -1},
    ],
)
def test_out_of_range_scoring_parameters_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        GenerationParams(**options)
