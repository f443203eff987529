"""Fakes shared by the tests: a loader whose models refuse to run once unloaded."""

from __future__ import annotations

import hashlib
import math
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from hotweights.backends.per_request import UNBOUNDED_COLUMNS, PerRequestEngine
from hotweights.core import Lease, Reloader
from hotweights.core.gate import GateCheck, GateVerdict
from hotweights.errors import InvalidRequest, LoadError
from hotweights.generation import Engine, GenerationParams, TokenChunk, TokenLogprob

Phase = str


class UseAfterUnload(AssertionError):
    """A fake model was called after its loader unloaded it: invariant 3 broken."""


class DoubleUnload(AssertionError):
    """A fake model was unloaded twice."""


class FakeModel:
    """Answers with its source; raises `UseAfterUnload` once unloaded."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.unloaded = False
        self.calls = 0

    def __call__(self) -> str:
        if self.unloaded:
            raise UseAfterUnload(f"model for {self.source} used after unload")
        self.calls += 1
        return self.source


@dataclass
class FakeLoader:
    """A `Loader` of `FakeModel`s with scripted failures and gates.

    `fail[(source, phase)]` is raised in that phase; `transient[source]` transient load
    failures come first; `gates[source]` blocks `load(source)` until set; `load_started`
    fires when a load begins.
    """

    fail: dict[tuple[str, Phase], BaseException] = field(default_factory=dict)
    transient: Counter[str] = field(default_factory=Counter)
    gates: dict[str, threading.Event] = field(default_factory=dict)
    loads: Counter[str] = field(default_factory=Counter)
    models: list[FakeModel] = field(default_factory=list)
    unloaded: list[FakeModel] = field(default_factory=list)
    load_started: dict[str, threading.Event] = field(default_factory=dict)
    loaded_when_load_began: dict[str, list[str]] = field(default_factory=dict)
    unload_signal: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def started(self, source: str) -> threading.Event:
        with self._lock:
            return self.load_started.setdefault(source, threading.Event())

    def load(self, source: str) -> FakeModel:
        from hotweights.errors import TransientLoadError

        with self._lock:
            self.loads[source] += 1
            self.loaded_when_load_began[source] = [m.source for m in self.models if not m.unloaded]
        self.started(source).set()
        gate = self.gates.get(source)
        if gate is not None:
            gate.wait()
        if self.transient[source] > 0:
            self.transient[source] -= 1
            raise TransientLoadError(f"{source}: disk busy")
        self._maybe_fail(source, "load")
        model = FakeModel(source)
        with self._lock:
            self.models.append(model)
        return model

    def validate(self, model: FakeModel) -> None:
        model()
        self._maybe_fail(model.source, "validate")

    def warmup(self, model: FakeModel) -> None:
        model()
        gate = self.gates.get(f"warmup:{model.source}")
        if gate is not None:
            gate.wait()
        model()
        self._maybe_fail(model.source, "warmup")

    def unload(self, model: FakeModel) -> None:
        with self._lock:
            if model.unloaded:
                raise DoubleUnload(f"model for {model.source} unloaded twice")
            model.unloaded = True
            self.unloaded.append(model)
        self.unload_signal.set()

    def fingerprint(self, source: str) -> str:
        return hashlib.sha256(source.encode()).hexdigest()[:16]

    def estimate_bytes(self, source: str) -> int:
        return 1000 + len(source)

    def live_models(self) -> list[FakeModel]:
        with self._lock:
            return [m for m in self.models if not m.unloaded]

    def _maybe_fail(self, source: str, phase: Phase) -> None:
        error = self.fail.get((source, phase))
        if error is not None:
            raise error


class FakeTextModel:
    """A text model for server tests: answers `<source>:<i>` tokens, one per step.

    Its vocabulary is `FAKE_VOCAB` ids, each as likely as any other, so every log-probability
    it reports is `-log(FAKE_VOCAB)`; a prompt's tokens are its words (or the ids given;
    `prompt_ids` gives each word an id of its own). `before_step(i)` (if set) runs before
    step i, so a test can hold a stream mid-way. Raises `UseAfterUnload` if a step runs
    after its loader unloaded it. Its loader's warmup gives it a per-request engine, as
    the transformers loader does.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.unloaded = False
        self.before_step: Callable[[int], None] | None = None
        self.engine: Engine | None = None
        self.engine_note = "not started"

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return [zlib.crc32(word.encode()) % FAKE_VOCAB for word in prompt.split()]
        return [int(token) for token in prompt]

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        return "\n".join(message["content"] for message in messages)

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(f"t{token}" for token in ids)

    def stream(self, prompt: str | Sequence[int], params: GenerationParams) -> Iterator[TokenChunk]:
        words = prompt.split() if isinstance(prompt, str) else [f"t{t}" for t in prompt]
        if any(token >= FAKE_VOCAB for token in params.logit_bias):
            raise InvalidRequest(f"logit_bias: the fake's tokens are 0 to {FAKE_VOCAB - 1}")
        return self._steps(words, params)

    def _steps(self, words: list[str], params: GenerationParams) -> Iterator[TokenChunk]:
        prompt_tokens = len(words)
        scored: tuple[TokenLogprob, ...] | None = None
        if params.prompt_logprobs is not None:
            scored = tuple(
                _fake_entry(i, word, params.prompt_logprobs, first=i == 0)
                for i, word in enumerate(words)
            )
        if params.max_tokens == 0:
            yield TokenChunk("", prompt_tokens, 0, "length", prompt_logprobs=scored)
            return
        for i in range(params.max_tokens):
            if self.before_step is not None:
                self.before_step(i)
            if self.unloaded:
                raise UseAfterUnload(f"text model {self.source} used after unload")
            last = i == params.max_tokens - 1
            text = f"{self.source}:{i} "
            entries = () if params.logprobs is None else (_fake_entry(i, text, params.logprobs),)
            yield TokenChunk(
                text,
                prompt_tokens,
                i + 1,
                "length" if last else None,
                entries,
                prompt_logprobs=scored if i == 0 else None,
            )


FAKE_VOCAB = 1000
FAKE_LOGPROB = -math.log(FAKE_VOCAB)


def _fake_entry(token_id: int, text: str, top: int, first: bool = False) -> TokenLogprob:
    alternatives = tuple((f"alt{k}", FAKE_LOGPROB) for k in range(top))
    return TokenLogprob(token_id, text, None if first else FAKE_LOGPROB, alternatives)


@dataclass
class FakeTextLoader:
    """Loads `FakeTextModel`s; `fail[(source, phase)]` is raised in that phase."""

    fail: dict[tuple[str, Phase], BaseException] = field(default_factory=dict)
    models: list[FakeTextModel] = field(default_factory=list)
    before_step: Callable[[int], None] | None = None

    def load(self, source: str) -> FakeTextModel:
        self._maybe_fail(source, "load")
        model = FakeTextModel(source)
        model.before_step = self.before_step
        self.models.append(model)
        return model

    def validate(self, model: FakeTextModel) -> None:
        self._maybe_fail(model.source, "validate")

    def warmup(self, model: FakeTextModel) -> None:
        self._maybe_fail(model.source, "warmup")
        engine = PerRequestEngine(model, columns=UNBOUNDED_COLUMNS, workers=16, name=model.source)
        model.engine, model.engine_note = engine, "per-request"

    def unload(self, model: FakeTextModel) -> None:
        if model.unloaded:
            raise DoubleUnload(f"text model {model.source} unloaded twice")
        engine, model.engine = model.engine, None
        if engine is not None:  # as `LoadedLM.release` does: no step runs past this
            engine.stop()
        model.unloaded = True

    def fingerprint(self, source: str) -> str:
        return hashlib.sha256(source.encode()).hexdigest()[:16]

    def _maybe_fail(self, source: str, phase: Phase) -> None:
        error = self.fail.get((source, phase))
        if error is not None:
            raise error


class FakeClock:
    """A monotonic clock that moves only when a test says so (`advance`)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakePretrained:
    """Stands in for a transformers model or tokenizer: `save_pretrained` writes `files`
    and records the keyword arguments it got; `fail` (if set) is raised after the first
    file is written."""

    files: dict[str, bytes]
    fail: BaseException | None = None
    calls: list[dict[str, object]] = field(default_factory=list)

    def save_pretrained(self, save_directory: str, /, **kwargs: object) -> list[str]:
        import os

        self.calls.append(dict(kwargs))
        written = []
        for name, data in self.files.items():
            path = os.path.join(save_directory, name)
            with open(path, "wb") as file:
                file.write(data)
            written.append(path)
            if self.fail is not None:
                raise self.fail
        return written


@dataclass
class ScriptedGate:
    """A `Gate[FakeModel]` whose verdict on each source is scripted.

    `refuse` holds sources whose verdict fails; `errors[source]` is raised by `judge`;
    `hold` (if set) blocks `judge` until set, after `judging` fires. Records what each
    `baseline` call saw: the live model's source (None when nothing was live) and whether
    that model was already unloaded.
    """

    refuse: set[str] = field(default_factory=set)
    errors: dict[str, BaseException] = field(default_factory=dict)
    hold: threading.Event | None = None
    judging: threading.Event = field(default_factory=threading.Event)
    baselines: list[tuple[str | None, bool]] = field(default_factory=list)
    judged: list[str] = field(default_factory=list)

    def baseline(self, source: str, live: FakeModel | None) -> object:
        if live is None:
            self.baselines.append((None, False))
            return None
        self.baselines.append((live.source, live.unloaded))
        return live()

    def judge(self, source: str, candidate: FakeModel, baseline: object) -> GateVerdict:
        self.judged.append(source)
        self.judging.set()
        if self.hold is not None:
            self.hold.wait()
        error = self.errors.get(source)
        if error is not None:
            raise error
        answer = candidate()
        passed = source not in self.refuse
        return GateVerdict((GateCheck("prompt 1 (exact)", passed, answer, "good"),))


def engine_modes(url: str, model: str) -> dict[int, str]:
    """How each resident generation of `model` generates, as the server at `url` says in
    /admin/status: "batched (...)" once its engine started, "per-request (why)" when the
    loader fell back to the per-request loop."""
    import httpx

    status = httpx.get(f"{url}/admin/status", timeout=30).json()
    engines = status["models"][model]["engines"]
    return {int(generation): engine["mode"] for generation, engine in engines.items()}


def assert_batched(url: str, model: str, *generations: int) -> None:
    """Fail unless each of `generations` runs on its batched engine, not the fallback."""
    modes = engine_modes(url, model)
    for generation in generations:
        mode = modes.get(generation, "not resident")
        assert mode.startswith("batched"), f"g{generation} generates {mode}: {modes}"


class StepGate:
    """Holds every stream at step `at` until `release()`."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.reached = threading.Event()
        self._open = threading.Event()

    def __call__(self, step: int) -> None:
        if step == self.at:
            self.reached.set()
            self._open.wait(30)

    def release(self) -> None:
        self._open.set()


class FakeAdapter:
    """An adapter version on one base version: calling it calls its base model too, so it
    raises `UseAfterUnload` if it or the base version it holds was unloaded."""

    def __init__(self, source: str, base: Lease[FakeModel]) -> None:
        self.source = source
        self.base = base
        self.base_generation = base.generation
        self.unloaded = False

    def __call__(self) -> str:
        if self.unloaded:
            raise UseAfterUnload(f"adapter {self.source} used after unload")
        return f"{self.source} on {self.base.model()}"


class FakeAdapterLoader:
    """Loads `FakeAdapter`s bound to a version of `base` (`BaseBound`); refuses to load
    on a base version whose source is in `unfit`."""

    def __init__(self, base: Reloader[FakeModel]) -> None:
        self.base = base
        self.unfit: set[str] = set()
        self.loaded: list[FakeAdapter] = []
        self._lock = threading.Lock()

    def load(self, source: str) -> FakeAdapter:
        return self.load_on(source, None)

    def load_on(self, source: str, base_generation: int | None) -> FakeAdapter:
        live = self.base.live_version
        lease = self.base.acquire_resident(
            lambda v: v is live if base_generation is None else v.generation == base_generation
        )
        if lease is None:
            raise LoadError(f"no base version {base_generation} for {source}")
        if lease.version.source in self.unfit:
            lease.release()
            raise LoadError(f"{source} does not fit base {lease.version.source}")
        adapter = FakeAdapter(source, lease)
        with self._lock:
            self.loaded.append(adapter)
        return adapter

    def validate(self, model: FakeAdapter) -> None:
        pass

    def warmup(self, model: FakeAdapter) -> None:
        model()

    def unload(self, model: FakeAdapter) -> None:
        if model.unloaded:
            raise DoubleUnload(f"adapter {model.source} unloaded twice")
        model.unloaded = True
        model.base.release()
