"""The engine's mixed passes: prompts read in chunks beside running sequences, prefixes
restored from the cache, and tokens chosen for every row at once; on a real tiny model
whose untied head answers each prompt its own way."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotweights.backends import LoadedLM, TransformersLoader
from hotweights.demo.tinylm import TinyShape, save_tiny_model
from hotweights.engine.batching import BatchEngine, EngineLimits
from hotweights.engine.step_plan import StepStats
from hotweights.errors import ModelRetired
from hotweights.generation import GenerationParams
from tests.engine.test_batching import Collector

pytestmark = pytest.mark.llm

SHAPE = TinyShape(max_position_embeddings=1024, tie_word_embeddings=False)
HEADER = "You are a careful assistant. Answer briefly and in plain words. " * 2


def _load(path: Path, seed: int) -> LoadedLM:
    return TransformersLoader().load(str(save_tiny_model(path, seed=seed, shape=SHAPE)))


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedLM]:
    model = _load(tmp_path_factory.mktemp("m") / "1", seed=5)
    yield model
    model.release()


def _run_one(engine: BatchEngine, lm: LoadedLM, prompt: str, params: GenerationParams) -> str:
    collected = Collector(1)
    engine.submit(lm.prompt_ids(prompt), params, collected.deliver(0))  # type: ignore[arg-type]
    assert collected.done.wait(60)
    assert collected.errors == {}
    return collected.texts[0]


def test_a_long_prompt_is_read_in_chunks_while_the_others_keep_generating(lm: LoadedLM) -> None:
    """Every pass that reads part of the long prompt also steps the running sequences, so
    a join delays them by one chunk; every answer still equals its answer alone."""
    passes: list[StepStats] = []
    running = threading.Event()
    release = threading.Event()

    def observe(stats: StepStats) -> None:
        passes.append(stats)
        if stats.kind == "decode" and stats.batch == 2 and not running.is_set():
            running.set()
            release.wait(30)

    limits = EngineLimits(max_batch=4, columns=600, max_batch_tokens=18, prefill_chunk=16)
    engine = BatchEngine(lm, limits, on_step=observe)
    greedy = GenerationParams(temperature=0, max_tokens=40)
    short = ["Hello there", "Count to five"]
    long = "Tell me a story about " + "the sea and the wind " * 20
    collected = Collector(3)
    try:
        for index, prompt in enumerate(short):
            engine.submit(lm.prompt_ids(prompt), greedy, collected.deliver(index))  # type: ignore[arg-type]
        assert running.wait(30)  # both short ones generate
        engine.submit(lm.prompt_ids(long), greedy, collected.deliver(2))  # type: ignore[arg-type]
        release.set()
        assert collected.done.wait(60)
    finally:
        engine.stop()
    assert collected.errors == {}
    for index, prompt in enumerate([*short, long]):
        assert collected.texts[index] == lm.generate(prompt, greedy).text, prompt
    reading = [p for p in passes if p.kind != "decode"][1:]  # after the short ones joined
    chunks = (len(lm.prompt_ids(long)) + 15) // 16
    assert len(reading) >= chunks  # the long prompt took many passes...
    assert all(p.kind == "mixed" and p.tokens <= 18 for p in reading)  # ...each beside them


def test_a_shared_prefix_is_restored_and_answers_do_not_change(lm: LoadedLM) -> None:
    greedy = GenerationParams(temperature=0, max_tokens=24, logprobs=2)
    limits = EngineLimits(max_batch=4, columns=600, prefix_block=8)
    engine = BatchEngine(lm, limits)
    try:
        first = _run_one(engine, lm, HEADER + "What is rain?", greedy)
        assert engine.prefix_hit_tokens == 0
        second = _run_one(engine, lm, HEADER + "Why is snow white?", greedy)
        header_blocks = len(lm.prompt_ids(HEADER)) // 8
        assert engine.prefix_hit_tokens >= header_blocks * 8
        again = _run_one(engine, lm, HEADER + "What is rain?", greedy)
    finally:
        engine.stop()
    assert first == again == lm.generate(HEADER + "What is rain?", greedy).text
    assert second == lm.generate(HEADER + "Why is snow white?", greedy).text


def test_a_new_version_never_reads_a_prefix_the_old_one_computed(
    lm: LoadedLM, tmp_path: Path
) -> None:
    """Two versions with different weights, as during a swap: the prompt the old one
    cached is computed afresh on the new one, which answers with its own weights."""
    other = _load(tmp_path / "2", seed=6)
    prompt = HEADER + "What is rain?"
    greedy = GenerationParams(temperature=0, max_tokens=24)
    assert lm.generate(prompt, greedy).text != other.generate(prompt, greedy).text
    limits = EngineLimits(max_batch=2, columns=600, prefix_block=8)
    old, new = BatchEngine(lm, limits), BatchEngine(other, limits)
    try:
        _run_one(old, lm, prompt, greedy)
        _run_one(old, lm, prompt, greedy)
        assert old.prefix_hit_tokens > 0
        assert _run_one(new, other, prompt, greedy) == other.generate(prompt, greedy).text
        assert new.prefix_hit_tokens == 0
    finally:
        old.stop()
        new.stop()
        other.release()


def test_a_seeded_request_gives_the_same_text_in_any_batch(lm: LoadedLM) -> None:
    sampled = GenerationParams(temperature=0.9, top_p=0.95, seed=11, max_tokens=30)
    penalised = GenerationParams(
        temperature=0.7, seed=12, max_tokens=30, frequency_penalty=1.0, logit_bias={65: 5.0}
    )
    engine = BatchEngine(lm, EngineLimits(max_batch=8, columns=300))
    try:
        alone = [_run_one(engine, lm, "Once upon", p) for p in (sampled, penalised)]
        crowd = Collector(8)
        for index in range(8):
            plain = GenerationParams(temperature=1.0, max_tokens=30)
            params = (sampled, penalised, plain)[index % 3]
            engine.submit(lm.prompt_ids("Once upon"), params, crowd.deliver(index))  # type: ignore[arg-type]
        assert crowd.done.wait(60)
    finally:
        engine.stop()
    assert crowd.errors == {}
    assert [crowd.texts[i] for i in (0, 3, 6)] == [alone[0]] * 3
    assert [crowd.texts[i] for i in (1, 4, 7)] == [alone[1]] * 3
    assert alone[0] == lm.generate("Once upon", sampled).text
    assert alone[1] == lm.generate("Once upon", penalised).text


def test_on_a_gpu_the_engine_answers_as_the_loop(tmp_path: Path) -> None:
    """Runs only where CUDA is (`bench/gpu_check.sh`): the same code, in bfloat16 on the
    GPU, gives each prompt in a mixed batch its greedy answer alone."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    source = save_tiny_model(tmp_path / "1", seed=5, shape=SHAPE)
    model = TransformersLoader(device="cuda:0", dtype="bfloat16").load(str(source))
    greedy = GenerationParams(temperature=0, max_tokens=16, logprobs=1)
    prompts = [HEADER + "What is rain?", "Hi", HEADER + "Why is snow white?", "Count"]
    limits = EngineLimits(max_batch=4, columns=400, max_batch_tokens=24, prefill_chunk=16)
    engine = BatchEngine(model, limits)
    collected = Collector(len(prompts))
    try:
        for index, prompt in enumerate(prompts):
            engine.submit(model.prompt_ids(prompt), greedy, collected.deliver(index))  # type: ignore[arg-type]
        assert collected.done.wait(120)
    finally:
        engine.stop()
    assert collected.errors == {}
    alone = [model.generate(prompt, greedy).text for prompt in prompts]
    agreeing = sum(collected.texts[i] == text for i, text in enumerate(alone))
    assert agreeing >= len(prompts) - 1  # bfloat16 rounding may flip one near-tie
    model.release()


def test_a_deliver_callback_may_stop_the_engine(lm: LoadedLM) -> None:
    """A request's last chunk can release the last lease on a retired version, which
    stops its engine: from the engine's own text thread that must not wait for itself."""
    engine = BatchEngine(lm, EngineLimits(max_batch=2, columns=200))
    stopped = threading.Event()

    def deliver(item: object) -> None:
        if getattr(item, "finish_reason", None) is not None:
            engine.stop(timeout=30)
            stopped.set()

    engine.submit(lm.prompt_ids("Hi"), GenerationParams(temperature=0, max_tokens=3), deliver)
    assert stopped.wait(30)
    engine.stop(timeout=30)
    with pytest.raises(ModelRetired):
        engine.submit(lm.prompt_ids("Hi"), GenerationParams(), deliver)
