"""The batched engine against the per-request loop, on a real tiny model."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotweights.backends import LoadedLM, TransformersLoader
from hotweights.backends.per_request import PerRequestEngine
from hotweights.demo.tinylm import TinyShape, save_tiny_model
from hotweights.engine import row_attention
from hotweights.engine.batching import BatchEngine, EngineLimits
from hotweights.engine.batching_loader import BatchingLoader, EngineSettings
from hotweights.engine.batching_loader import _check as engine_check
from hotweights.engine.step_plan import StepStats
from hotweights.errors import ModelRetired, ShuttingDown
from hotweights.generation import GenerationParams, TokenChunk, TokenLogprob

pytestmark = pytest.mark.llm


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedLM]:
    shape = TinyShape(max_position_embeddings=512, tie_word_embeddings=False)
    source = save_tiny_model(tmp_path_factory.mktemp("m") / "1", seed=3, shape=shape)
    loader = TransformersLoader()
    model = loader.load(str(source))
    yield model
    loader.unload(model)


class Collector:
    """Collects what an engine delivers to each of many sequences."""

    def __init__(self, count: int, ending: int | None = None) -> None:
        self.texts: dict[int, str] = {}
        self.errors: dict[int, BaseException] = {}
        self.chunks: dict[int, list[TokenChunk]] = {i: [] for i in range(count)}
        self._left = count if ending is None else ending
        """Sequences still to end before `done` is set."""
        self._lock = threading.Lock()
        self.done = threading.Event()

    def deliver(self, index: int) -> object:
        def deliver(item: TokenChunk | BaseException) -> None:
            if isinstance(item, BaseException):
                self.errors[index] = item
                self._end()
                return
            self.chunks[index].append(item)
            if item.finish_reason is not None:
                self.texts[index] = "".join(chunk.text for chunk in self.chunks[index])
                self._end()

        return deliver

    def _end(self) -> None:
        with self._lock:
            self._left -= 1
            if self._left == 0:
                self.done.set()


def _submit_all(
    engine: BatchEngine, lm: LoadedLM, prompts: list[str], params: list[GenerationParams]
) -> Collector:
    collected = Collector(len(prompts))
    for index, (prompt, param) in enumerate(zip(prompts, params, strict=True)):
        engine.submit(lm.prompt_ids(prompt), param, collected.deliver(index))  # type: ignore[arg-type]
    assert collected.done.wait(120)
    return collected


def test_many_prompts_at_once_equal_their_outputs_alone(lm: LoadedLM) -> None:
    """Different lengths, greedy and seeded sampling, stops and limits, joining and leaving
    a batch smaller than the load; prompts read in chunks beside running sequences, and
    prompts that start alike restored from the prefix cache."""
    rng = random.Random(0)
    headers = ["", "You are a helpful assistant. ", "System: answer in French please. "]
    prompts = [rng.choice(headers) + f"p{i} " + "abc" * rng.randint(0, 30) for i in range(48)]
    params = [
        GenerationParams(
            temperature=rng.choice([0.0, 0.0, 0.8]),
            top_p=rng.choice([1.0, 0.9]),
            seed=i,
            max_tokens=rng.randint(1, 50),
            stop=rng.choice([(), ("a",), ("bc", "zz")]),
        )
        for i in range(48)
    ]
    alone = [lm.generate(prompt, param) for prompt, param in zip(prompts, params, strict=True)]
    passes: list[StepStats] = []
    engine = BatchEngine(
        lm,
        EngineLimits(
            max_batch=6, columns=200, max_batch_tokens=64, prefill_chunk=16, prefix_block=4
        ),
        on_step=passes.append,
    )
    try:
        collected = _submit_all(engine, lm, prompts, params)
    finally:
        engine.stop()
    assert collected.errors == {}
    for index, completion in enumerate(alone):
        assert collected.texts[index] == completion.text, (index, prompts[index])
        last = collected.chunks[index][-1]
        assert (last.finish_reason, last.completion_tokens) == (
            completion.finish_reason,
            completion.completion_tokens,
        )
    assert max(p.batch for p in passes) == 6  # the batch really filled
    assert len(passes) < sum(c.completion_tokens for c in alone)  # fewer passes
    assert any(p.kind == "mixed" for p in passes)  # prompts read beside generating ones
    assert engine.prefix_hit_tokens > 0


def test_a_cancelled_sequence_leaves_and_the_others_finish(lm: LoadedLM) -> None:
    reached, gate = threading.Event(), threading.Event()
    passes: list[StepStats] = []

    def hold(stats: StepStats) -> None:
        passes.append(stats)
        if len(passes) == 1:  # the prefill of both, before either token is delivered
            reached.set()
            gate.wait(30)

    engine = BatchEngine(lm, EngineLimits(max_batch=4, columns=200), on_step=hold)
    params = GenerationParams(temperature=0, max_tokens=40)
    ids = lm.prompt_ids("Once upon a time")
    collected = Collector(2, ending=1)  # the cancelled one never ends
    try:
        doomed = engine.submit(ids, params, collected.deliver(0))  # type: ignore[arg-type]
        engine.submit(ids, params, collected.deliver(1))  # type: ignore[arg-type]
        assert reached.wait(30)
        assert passes[0].batch == 2
        doomed.cancel()
        gate.set()
        assert collected.done.wait(30)
        assert engine.load() == {"running": 0, "waiting": 0}
    finally:
        engine.stop()
    assert collected.chunks[0] == []
    assert 0 not in collected.errors
    assert collected.texts[1] == lm.generate("Once upon a time", params).text
    assert {p.batch for p in passes[1:]} == {1}


def test_stop_ends_every_sequence_with_model_retired(lm: LoadedLM) -> None:
    started = threading.Event()

    def note(stats: StepStats) -> None:
        started.set()

    engine = BatchEngine(lm, EngineLimits(max_batch=2, columns=300), on_step=note)
    collected = Collector(3)
    never_ends = dict.fromkeys(lm.eos_ids, -100.0)  # greedy from "tell" may reach eos at once
    params = GenerationParams(temperature=0, max_tokens=250, logit_bias=never_ends)
    for index in range(3):  # two run, one waits for a row
        engine.submit(lm.prompt_ids("tell"), params, collected.deliver(index))  # type: ignore[arg-type]
    assert started.wait(30)
    engine.stop(timeout=30)
    assert collected.done.wait(30)
    assert set(collected.errors) == {0, 1, 2}
    assert all(isinstance(error, ModelRetired) for error in collected.errors.values())
    with pytest.raises(ModelRetired):
        engine.submit(lm.prompt_ids("late"), params, lambda item: None)


def test_a_cut_ends_a_sequence_with_shutting_down(lm: LoadedLM) -> None:
    cut = threading.Event()
    cut.set()
    engine = BatchEngine(lm, EngineLimits(max_batch=2, columns=100))
    try:
        collected = Collector(1)
        params = GenerationParams(temperature=0, max_tokens=50)
        engine.submit(lm.prompt_ids("hi"), params, collected.deliver(0), cut)  # type: ignore[arg-type]
        assert collected.done.wait(30)
    finally:
        engine.stop()
    assert isinstance(collected.errors.get(0), ShuttingDown)


def test_completions_are_cut_to_what_a_row_holds(lm: LoadedLM) -> None:
    engine = BatchEngine(lm, EngineLimits(max_batch=2, columns=80))
    try:
        ids = lm.prompt_ids("x" * 70)
        collected = Collector(1)
        engine.submit(ids, GenerationParams(temperature=0, max_tokens=50), collected.deliver(0))  # type: ignore[arg-type]
        assert collected.done.wait(30)
    finally:
        engine.stop()
    last = collected.chunks[0][-1]
    assert last.completion_tokens <= 80 - len(ids)


def test_the_loader_starts_an_engine_and_unload_stops_it(tmp_path: Path) -> None:
    source = save_tiny_model(tmp_path / "1", seed=1)
    loader = BatchingLoader(TransformersLoader(), EngineSettings(max_batch=4, kv_cache_bytes=2**22))
    model = loader.load(str(source))
    loader.validate(model)
    loader.warmup(model)
    engine = model.engine
    assert isinstance(engine, BatchEngine), model.engine_note
    assert model.engine_note.startswith("batched (4 sequences")
    # Weights plus a cache of exactly the budget's rows and columns.
    assert loader.estimate_bytes(str(source)) - loader.inner.estimate_bytes(str(source)) == (
        engine.kv_bytes
    )
    loader.unload(model)
    assert model.engine is None
    with pytest.raises(ModelRetired):
        engine.submit([1, 2], GenerationParams(), lambda item: None)


def test_a_model_the_engine_cannot_run_falls_back_to_the_per_request_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> object:
        raise RuntimeError("this architecture's attention cannot read a shared cache")

    monkeypatch.setattr(row_attention, "_sdpa", broken)
    source = save_tiny_model(tmp_path / "1", seed=1)
    loader = BatchingLoader(TransformersLoader(), EngineSettings(max_batch=4, kv_cache_bytes=2**22))
    model = loader.load(str(source))
    loader.warmup(model)
    engine = model.engine
    assert isinstance(engine, PerRequestEngine), model.engine_note
    assert model.engine_note.startswith("per-request (the batched check failed")
    assert "shared cache" in model.engine_note
    params = GenerationParams(temperature=0, max_tokens=3)
    collected = Collector(1)
    engine.submit(model.prompt_ids("Hi"), params, collected.deliver(0))  # type: ignore[arg-type]
    assert collected.done.wait(60)
    assert collected.texts[0] == model.generate("Hi", params).text
    loader.unload(model)
    assert model.engine is None
    with pytest.raises(ModelRetired):
        engine.submit([1, 2], GenerationParams(), lambda item: None)


def test_a_budget_too_small_for_a_batch_falls_back_with_the_reason(tmp_path: Path) -> None:
    source = save_tiny_model(tmp_path / "1", seed=1)
    loader = BatchingLoader(TransformersLoader(), EngineSettings(max_batch=64, kv_cache_bytes=4096))
    model = loader.load(str(source))
    loader.warmup(model)
    assert isinstance(model.engine, PerRequestEngine)
    assert "--kv-cache-memory" in model.engine_note
    loader.unload(model)


class OffByOneEngine:
    """An engine that answers every prompt with the token after the right greedy one."""

    columns = 64

    def __init__(self, model: LoadedLM) -> None:
        self.model = model

    def submit(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        deliver: Any,
        cut: threading.Event | None = None,
    ) -> Any:
        import torch

        with torch.inference_mode():
            logits = self.model.model(input_ids=torch.tensor([prompt_ids])).logits
        right = int(logits[0, -1, : self.model.tokenizer_size].argmax())
        wrong = (right + 1) % self.model.tokenizer_size
        deliver(TokenChunk("?", len(prompt_ids), 1, "length", (TokenLogprob(wrong, "?", 0.0),)))
        return self

    def cancel(self) -> None: ...

    def stop(self, timeout: float | None = None) -> None: ...

    def load(self) -> dict[str, int]:
        return {}


def test_the_warmup_check_catches_an_engine_that_picks_other_tokens(tmp_path: Path) -> None:
    from tests.backends.conftest import save_lively_model

    source = save_lively_model(tmp_path / "1", seed=2)
    loader = TransformersLoader()
    model = loader.load(str(source))
    problem = engine_check(model, OffByOneEngine(model))
    assert problem is not None
    assert "where a plain forward pass ranks" in problem
    assert engine_check(model, BatchEngine(model, EngineLimits(max_batch=4, columns=64))) is None
    loader.unload(model)


def test_the_check_runs_once_per_configuration_and_later_versions_only_warm_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new version of the same model (other weights, same config) skips the three-pass
    check and gets one short prompt through its engine; a new configuration is checked."""
    import hotweights.engine.batching_loader as engine_loader

    checked: list[str] = []
    real_check = engine_loader._check

    def counting_check(model: LoadedLM, engine: Any) -> str | None:
        checked.append(model.source)
        return real_check(model, engine)

    monkeypatch.setattr(engine_loader, "_check", counting_check)
    small = TinyShape(hidden_size=64, num_hidden_layers=2)
    wider = TinyShape(hidden_size=96, num_hidden_layers=2)
    sources = [
        save_tiny_model(tmp_path / "1", seed=1, shape=small),
        save_tiny_model(tmp_path / "2", seed=2, shape=small),
        save_tiny_model(tmp_path / "3", seed=3, shape=wider),
    ]
    loader = BatchingLoader(TransformersLoader(), EngineSettings(max_batch=4, kv_cache_bytes=2**22))
    answers = []
    for source in sources:
        model = loader.load(str(source))
        loader.warmup(model)
        assert model.engine is not None
        assert model.engine_note.startswith("batched")
        params = GenerationParams(temperature=0.0, max_tokens=4)
        answers.append(model.generate("Hello", params).text)
        loader.unload(model)
    assert checked == [str(sources[0]), str(sources[2])]
    assert all(len(answer) > 0 for answer in answers)  # each engine generates
