"""The per-request engine: through the `Engine` protocol it generates what the model's own
loop does, and it keeps the loop's rules (no step once it stopped, none after a cancel,
`ShuttingDown` once cut, a refused prompt refused at submit)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest

from hotweights.backends import LoadedLM, TransformersLoader
from hotweights.backends.per_request import UNBOUNDED_COLUMNS, PerRequestEngine
from hotweights.errors import InvalidRequest, ModelRetired, ShuttingDown
from hotweights.generation import Engine, GenerationParams, TokenChunk
from tests.fakes import FakeTextModel, UseAfterUnload


class Sink:
    """What an engine delivers to one sequence, and when it ended."""

    def __init__(self) -> None:
        self.chunks: list[TokenChunk] = []
        self.error: BaseException | None = None
        self.ended = threading.Event()

    def __call__(self, item: TokenChunk | BaseException) -> None:
        if isinstance(item, BaseException):
            self.error = item
            self.ended.set()
            return
        self.chunks.append(item)
        if item.finish_reason is not None:
            self.ended.set()


class StepGate:
    """Holds the fake's step `at` until released; counts the steps begun."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.begun = 0
        self.reached = threading.Event()
        self.arrivals = threading.Semaphore(0)
        self.open = threading.Event()

    def __call__(self, step: int) -> None:
        self.begun += 1
        if step == self.at:
            self.reached.set()
            self.arrivals.release()
            assert self.open.wait(30)


def _fake(gate: StepGate | None = None) -> tuple[FakeTextModel, PerRequestEngine]:
    model = FakeTextModel("fake")
    model.before_step = gate
    return model, PerRequestEngine(model, columns=UNBOUNDED_COLUMNS, workers=2, name="fake")


PARAMS = [
    GenerationParams(temperature=0, max_tokens=12),
    GenerationParams(temperature=0.9, top_p=0.8, seed=11, max_tokens=12),
    GenerationParams(temperature=0.7, seed=5, max_tokens=10, logprobs=3, prompt_logprobs=2),
    GenerationParams(
        temperature=0, max_tokens=12, presence_penalty=1.5, frequency_penalty=0.5, logit_bias={7: 5}
    ),
    GenerationParams(temperature=0, max_tokens=0, prompt_logprobs=1),
]


@pytest.mark.llm
@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "seeded", "logprobs", "adjusted", "zero"])
def test_a_sequence_through_the_engine_equals_the_models_own_loop(
    lively_lm: LoadedLM, params: GenerationParams
) -> None:
    engine: Engine = lively_lm.per_request_engine(workers=2)
    try:
        ids = lively_lm.prompt_ids("The quick brown fox")
        sink = Sink()
        engine.submit(ids, params, sink)
        assert sink.ended.wait(60)
        assert sink.error is None
        assert sink.chunks == list(lively_lm.stream(ids, params))
    finally:
        engine.stop()


@pytest.mark.llm
def test_stop_strings_end_the_text_as_the_loop_does(lively_lm: LoadedLM) -> None:
    ids = lively_lm.prompt_ids("Once upon a time")
    alone = "".join(c.text for c in lively_lm.stream(ids, GenerationParams(temperature=0)))
    stop = alone[3:5] if len(alone) >= 5 else alone[-1:]
    params = GenerationParams(temperature=0, max_tokens=16, stop=[stop])
    engine = lively_lm.per_request_engine(workers=1)
    try:
        sink = Sink()
        engine.submit(ids, params, sink)
        assert sink.ended.wait(60)
        assert sink.chunks == list(lively_lm.stream(ids, params))
        assert stop not in "".join(chunk.text for chunk in sink.chunks)
    finally:
        engine.stop()


@pytest.mark.llm
def test_columns_are_the_models_positions(lively_lm: LoadedLM) -> None:
    engine = lively_lm.per_request_engine(workers=1)
    engine.stop()
    assert engine.columns == (lively_lm.max_positions or UNBOUNDED_COLUMNS)


@pytest.mark.llm
def test_the_transformers_loader_gives_a_warm_model_its_per_request_engine(
    loader: TransformersLoader, fresh_lm: LoadedLM
) -> None:
    before: object = fresh_lm.engine  # (not narrowed: warmup sets it)
    assert before is None
    loader.warmup(fresh_lm)
    engine = fresh_lm.engine
    assert isinstance(engine, PerRequestEngine)
    assert fresh_lm.engine_note == "per-request"
    loader.unload(fresh_lm)
    assert fresh_lm.engine is None
    with pytest.raises(ModelRetired):
        engine.submit([1], GenerationParams(), Sink())


def test_many_sequences_run_side_by_side_each_with_its_own_answer() -> None:
    model, engine = _fake()
    sinks = [Sink() for _ in range(5)]
    for index, sink in enumerate(sinks):
        engine.submit([1, 2, 3], GenerationParams(max_tokens=index + 1), sink)
    for index, sink in enumerate(sinks):
        assert sink.ended.wait(10)
        assert sink.chunks == list(model.stream([1, 2, 3], GenerationParams(max_tokens=index + 1)))
    engine.stop()


def test_stop_waits_for_the_step_in_progress_then_ends_the_sequence_retired() -> None:
    gate = StepGate(at=2)
    model, engine = _fake(gate)
    sink = Sink()
    engine.submit([1], GenerationParams(max_tokens=10), sink)
    assert gate.reached.wait(10)
    stopped = threading.Event()

    def stop() -> None:
        engine.stop()
        model.unloaded = True  # what the loader does once the engine stopped
        stopped.set()

    stopper = threading.Thread(target=stop)
    stopper.start()
    assert not stopped.wait(0.2), "stop returned while a step was still running"
    gate.open.set()
    assert stopped.wait(10)
    stopper.join()
    assert sink.ended.wait(10)
    assert isinstance(sink.error, ModelRetired), sink.error
    assert not isinstance(sink.error, UseAfterUnload)
    assert [chunk.completion_tokens for chunk in sink.chunks] == [1, 2, 3]
    assert gate.begun == 3  # no step began after the gate closed
    with pytest.raises(ModelRetired):
        engine.submit([1], GenerationParams(), Sink())


def test_a_cancelled_sequence_stops_before_its_next_step() -> None:
    gate = StepGate(at=1)
    _, engine = _fake(gate)
    sink = Sink()
    ticket = engine.submit([1], GenerationParams(max_tokens=10), sink)
    assert gate.reached.wait(10)
    ticket.cancel()
    gate.open.set()
    engine.stop()  # returns once the step in progress is done
    assert gate.begun == 2
    assert sink.error is None
    assert not sink.ended.is_set()


def test_a_cut_ends_the_sequence_with_shutting_down_at_its_next_step() -> None:
    gate = StepGate(at=1)
    cut = threading.Event()
    _, engine = _fake(gate)
    sink = Sink()
    engine.submit([1], GenerationParams(max_tokens=10), sink, cut)
    assert gate.reached.wait(10)
    cut.set()
    gate.open.set()
    assert sink.ended.wait(10)
    assert isinstance(sink.error, ShuttingDown)
    assert len(sink.chunks) == 2
    engine.stop()


def test_what_the_model_refuses_is_refused_at_submit() -> None:
    _, engine = _fake()
    with pytest.raises(InvalidRequest):
        engine.submit([1], GenerationParams(logit_bias={5000: 1.0}), Sink())
    assert engine.load() == {"running": 0, "waiting": 0}
    engine.stop()


def test_sequences_beyond_the_workers_wait_for_one() -> None:
    gate = StepGate(at=0)
    _, engine = _fake(gate)  # two workers
    sinks = [Sink() for _ in range(3)]
    for sink in sinks:
        engine.submit([1], GenerationParams(max_tokens=1), sink)
    for _ in range(2):
        assert gate.arrivals.acquire(timeout=10)
    assert engine.load() == {"running": 2, "waiting": 1}
    gate.open.set()
    for sink in sinks:
        assert sink.ended.wait(10)
    engine.stop()


class Unfinished(FakeTextModel):
    """A model whose stream ends without a finish reason."""

    def stream(self, prompt: str | Sequence[int], params: GenerationParams) -> Iterator[TokenChunk]:
        yield TokenChunk("a", 1, 1)


def test_a_stream_that_ends_without_a_finish_reason_is_an_error() -> None:
    engine = PerRequestEngine(Unfinished("u"), columns=UNBOUNDED_COLUMNS, name="u")
    sink = Sink()
    engine.submit([1], GenerationParams(), sink)
    assert sink.ended.wait(10)
    assert isinstance(sink.error, RuntimeError)
    engine.stop()
