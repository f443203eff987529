"""LoRA adapters inside the engine's mixed passes: rows of the base model and of two
adapters stepped together, each answering exactly as PEFT does in-process on the same
weights, with log-probabilities equal within float noise."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hotweights.backends import LoadedLM, TransformersLoader
from hotweights.backends.lora_layers import LoraWeights, install, linear_shapes
from hotweights.demo.tinylm import TinyShape, save_tiny_model
from hotweights.engine.batching import BatchEngine, EngineLimits
from hotweights.generation import GenerationParams
from tests.backends.lora_adapters import TARGETS, pairs_of, peft_adapter, peft_greedy
from tests.engine.test_batching import Collector

pytestmark = pytest.mark.llm

SHAPE = TinyShape(max_position_embeddings=512, tie_word_embeddings=False)
PROMPTS = ["Hello there", "Count to five please", "Which version are you?"]
TOKENS = 12


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("base") / "1", seed=3, shape=SHAPE)


@pytest.fixture(scope="module")
def lm(base_dir: Path) -> Iterator[LoadedLM]:
    model = TransformersLoader().load(str(base_dir))
    yield model
    model.release()


def test_base_and_two_adapters_in_one_batch_answer_as_peft(base_dir: Path, lm: LoadedLM) -> None:
    import torch

    adapters = [peft_adapter(base_dir, seed, 4 + 4 * seed, TARGETS) for seed in (1, 2)]
    like = next(lm.model.parameters())
    weights = [LoraWeights(f"a{i}", pairs_of(a), like=like) for i, a in enumerate(adapters)]
    for adapter in weights:
        install(lm.model, list(adapter.updates))
    assert set(pairs_of(adapters[0])) <= set(linear_shapes(lm.model))

    expected: list[tuple[list[int], list[float]]] = []
    jobs: list[tuple[list[int], LoraWeights | None]] = []
    for prompt in PROMPTS:
        ids = lm.prompt_ids(prompt)
        with adapters[0].disable_adapter():
            expected.append(peft_greedy(adapters[0], ids, TOKENS))
        jobs.append((ids, None))
        for peft_model, adapter in zip(adapters, weights, strict=True):
            expected.append(peft_greedy(peft_model, ids, TOKENS))
            jobs.append((ids, adapter))
    per_prompt = [expected[i : i + 3] for i in range(0, len(expected), 3)]
    assert all(len({tuple(ids) for ids, _ in answers}) == 3 for answers in per_prompt), (
        "the adapters must answer differently from the base and each other"
    )

    limits = EngineLimits(max_batch=16, columns=256, max_batch_tokens=64, prefill_chunk=8)
    engine = BatchEngine(lm, limits)
    params = GenerationParams(temperature=0, max_tokens=TOKENS, logprobs=0)
    collected = Collector(len(jobs))
    try:
        for index, (ids, chosen) in enumerate(jobs):
            engine.submit(ids, params, collected.deliver(index), adapter=chosen)  # type: ignore[arg-type]
        assert collected.done.wait(120)
    finally:
        engine.stop()
    assert collected.errors == {}
    for index, (ids, logprobs) in enumerate(expected):
        got = [entry for chunk in collected.chunks[index] for entry in chunk.logprobs]
        assert [entry.token_id for entry in got] == ids, index
        assert torch.allclose(
            torch.tensor([entry.logprob or 0.0 for entry in got]),
            torch.tensor(logprobs),
            atol=1e-4,
        ), index


def test_an_adapter_never_restores_prefix_blocks_the_base_computed(
    base_dir: Path, lm: LoadedLM
) -> None:
    """A shared system prompt read by the base first: the adapter's rows compute their
    own keys and values, so its answer is PEFT's, not one built on the base's cache."""
    adapter_model = peft_adapter(base_dir, 7, 8, TARGETS)
    adapter = LoraWeights("p", pairs_of(adapter_model), like=next(lm.model.parameters()))
    install(lm.model, list(adapter.updates))
    prompt = "You are a careful assistant. Answer briefly and in plain words. " * 3 + "Hi"
    ids = lm.prompt_ids(prompt)
    limits = EngineLimits(max_batch=4, columns=256, max_batch_tokens=64, prefill_chunk=64)
    engine = BatchEngine(lm, limits)
    params = GenerationParams(temperature=0, max_tokens=6, logprobs=0)
    try:
        choices: list[LoraWeights | None] = [None, adapter, adapter]
        for index, chosen in enumerate(choices):
            collected = Collector(1)
            engine.submit(ids, params, collected.deliver(0), adapter=chosen)  # type: ignore[arg-type]
            assert collected.done.wait(60)
            got = [e.token_id for chunk in collected.chunks[0] for e in chunk.logprobs]
            if chosen is None:
                continue
            assert got == peft_greedy(adapter_model, ids, 6)[0], index
        assert engine.prefix_hit_tokens > 0  # the second adapter request did hit its own
    finally:
        engine.stop()
