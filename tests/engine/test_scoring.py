"""Log-probabilities, penalties and logit_bias in the batched engine, against the
per-request loop and against one plain forward pass of the same weights."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from hotweights.backends import LoadedLM, TransformersLoader
from hotweights.engine.batching import BatchEngine, EngineLimits
from hotweights.errors import InvalidRequest
from hotweights.generation import GenerationParams, TokenChunk, TokenLogprob
from tests.backends.conftest import save_lively_model
from tests.engine.test_batching import Collector

pytestmark = pytest.mark.llm

PROMPTS = ["a", "The cat sat on the mat.", "xyz " * 9, "Once upon a time, there was", "??"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedLM]:
    source = save_lively_model(tmp_path_factory.mktemp("lively") / "1", seed=5)
    loader = TransformersLoader()
    model = loader.load(str(source))
    yield model
    loader.unload(model)


@pytest.fixture
def engine(lm: LoadedLM) -> Iterator[BatchEngine]:
    limits = EngineLimits(max_batch=3, columns=96, max_batch_tokens=40, prefill_chunk=8)
    engine = BatchEngine(lm, limits)
    yield engine
    engine.stop()


def _run(engine: BatchEngine, lm: LoadedLM, jobs: list[tuple[str, GenerationParams]]) -> Collector:
    collected = Collector(len(jobs))
    for index, (prompt, params) in enumerate(jobs):
        engine.submit(lm.prompt_ids(prompt), params, collected.deliver(index))  # type: ignore[arg-type]
    assert collected.done.wait(120)
    assert collected.errors == {}
    return collected


def _reference(lm: LoadedLM, ids: list[int]) -> torch.Tensor:
    """Log-probabilities at every position of `ids` from one unbatched, uncached pass:
    (len(ids), vocab)."""
    with torch.inference_mode():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0, :, : lm.tokenizer_size]
    return torch.log_softmax(logits.float(), dim=-1)


def _entries(chunks: list[TokenChunk]) -> list[TokenLogprob]:
    return [entry for chunk in chunks for entry in chunk.logprobs]


def test_prompt_logprobs_in_a_padded_batch_equal_a_plain_forward_pass(
    engine: BatchEngine, lm: LoadedLM
) -> None:
    """Prompts of different lengths share prefill passes (left-padded), some only scored,
    some also generating: each prompt's scores are its own."""
    jobs = [
        (prompt, GenerationParams(temperature=0, max_tokens=i % 2 * 4, prompt_logprobs=2))
        for i, prompt in enumerate(PROMPTS * 2)
    ]
    collected = _run(engine, lm, jobs)
    for index, (prompt, params) in enumerate(jobs):
        ids = lm.prompt_ids(prompt)
        first = collected.chunks[index][0]
        scored = first.prompt_logprobs
        assert scored is not None
        assert [entry.token_id for entry in scored] == ids
        assert scored[0].logprob is None
        reference = _reference(lm, ids)
        for position, entry in enumerate(scored[1:], start=1):
            expected = reference[position - 1, ids[position]].item()
            assert entry.logprob == pytest.approx(expected, abs=1e-4), (prompt, position)
            assert len(entry.top) == 2
            assert entry.top[0][1] >= entry.top[1][1]
            assert entry.top[0][1] == pytest.approx(reference[position - 1].max().item(), abs=1e-4)
        last = collected.chunks[index][-1]
        assert last.completion_tokens == params.max_tokens
        if params.max_tokens == 0:
            assert (last.finish_reason, last.text) == ("length", "")


def test_generated_logprobs_equal_the_loops_and_a_plain_forward_pass(
    engine: BatchEngine, lm: LoadedLM
) -> None:
    jobs = [
        (prompt, GenerationParams(temperature=t, seed=i, max_tokens=12, logprobs=3))
        for i, (prompt, t) in enumerate(zip(PROMPTS, [0.0, 0.9, 0.0, 1.0, 0.0], strict=True))
    ]
    collected = _run(engine, lm, jobs)
    for index, (prompt, params) in enumerate(jobs):
        batched = _entries(collected.chunks[index])
        alone = _entries(list(lm.stream(prompt, params)))
        assert [e.token_id for e in batched] == [e.token_id for e in alone]
        assert len(batched) == collected.chunks[index][-1].completion_tokens
        ids = lm.prompt_ids(prompt)
        reference = _reference(lm, ids + [e.token_id for e in batched])
        for step, (entry, loop_entry) in enumerate(zip(batched, alone, strict=True)):
            assert entry.logprob == pytest.approx(loop_entry.logprob, abs=1e-4)
            expected = reference[len(ids) - 1 + step, entry.token_id].item()
            assert entry.logprob == pytest.approx(expected, abs=1e-4)
            assert entry.token == lm.token_text(entry.token_id)
            assert len(entry.top) == 3
            if params.temperature == 0:  # greedy picks the most likely token
                assert entry.top[0][0] == entry.token
                assert entry.top[0][1] == pytest.approx(entry.logprob, abs=1e-6)


def _greedy_with_penalties(
    lm: LoadedLM, ids: list[int], params: GenerationParams, steps: int
) -> list[int]:
    """Greedy decoding with OpenAI's penalty formula, recomputed from scratch each step."""
    out: list[int] = []
    for _ in range(steps):
        with torch.inference_mode():
            logits = lm.model(input_ids=torch.tensor([ids + out])).logits[0, -1]
        logits = logits[: lm.tokenizer_size].float().clone()
        for token, bias in params.logit_bias.items():
            logits[token] += bias
        for token in set(out):
            count = out.count(token)
            logits[token] -= count * params.frequency_penalty + params.presence_penalty
        token = int(torch.argmax(logits))
        if token in lm.eos_ids:
            break
        out.append(token)
    return out


def test_penalties_and_bias_steer_the_engine_and_the_loop_alike(
    engine: BatchEngine, lm: LoadedLM
) -> None:
    z = lm.prompt_ids("z")[-1]
    jobs = [
        ("abc abc abc", GenerationParams(temperature=0, max_tokens=10, frequency_penalty=2.0)),
        ("abc abc abc", GenerationParams(temperature=0, max_tokens=10, presence_penalty=1.5)),
        ("Once upon", GenerationParams(temperature=0, max_tokens=6, logit_bias={z: 100.0})),
        ("Once upon", GenerationParams(temperature=0, max_tokens=10)),
    ]
    collected = _run(engine, lm, jobs)
    assert collected.texts[2] == "z" * 6
    for index, (prompt, params) in enumerate(jobs):
        expected = _greedy_with_penalties(lm, lm.prompt_ids(prompt), params, params.max_tokens)
        assert collected.texts[index] == lm.decode(expected), (index, params)
        assert lm.generate(prompt, params).text == collected.texts[index]
    plain = _greedy_with_penalties(lm, lm.prompt_ids("abc abc abc"), jobs[3][1], 10)
    penalised = _greedy_with_penalties(lm, lm.prompt_ids("abc abc abc"), jobs[0][1], 10)
    assert plain != penalised  # the penalty changed something, so the check above means it


def test_a_bias_on_a_token_the_model_lacks_and_bad_token_prompts_are_refused(
    engine: BatchEngine, lm: LoadedLM
) -> None:
    outside = GenerationParams(logit_bias={lm.tokenizer_size: 1.0})
    with pytest.raises(InvalidRequest, match="logit_bias"):
        engine.submit([1, 2], outside, lambda item: None)
    with pytest.raises(InvalidRequest, match="logit_bias"):
        lm.stream("hello", outside)
    with pytest.raises(InvalidRequest, match="token id"):
        lm.prompt_ids([1, lm.vocab_size])
    with pytest.raises(InvalidRequest, match="empty"):
        lm.prompt_ids([])
    assert lm.prompt_ids(lm.prompt_ids("hello")) == lm.prompt_ids("hello")


def test_the_loop_scores_a_prompt_like_the_engine(lm: LoadedLM, tmp_path: Path) -> None:
    params = GenerationParams(max_tokens=0, prompt_logprobs=0)
    (chunk,) = list(lm.stream(PROMPTS[1], params))
    ids = lm.prompt_ids(PROMPTS[1])
    reference = _reference(lm, ids)
    assert chunk.prompt_logprobs is not None
    values = [entry.logprob for entry in chunk.prompt_logprobs[1:]]
    expected = [reference[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert values == pytest.approx(expected, abs=1e-4)
    assert (chunk.finish_reason, chunk.completion_tokens) == ("length", 0)
