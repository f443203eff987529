"""Generation's shared vocabulary: parameters, the pieces a token stream yields, and what
the server needs from a text model.

Server, engine and backends all use these; none of them owns them. Pure Python.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from hotweights.errors import InvalidRequest

FinishReason = Literal["stop", "length"]
"""`stop`: an eos token or a stop string ended the text; `length`: `max_tokens` did."""

MAX_STOP_STRINGS = 4
MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0
MAX_LOGIT_BIAS = 100.0
MAX_TOP_LOGPROBS = 20
GREEDY_BELOW = 1e-5
"""Temperatures below this sample greedily: dividing logits by them overflows."""


ToolCallFormat = Literal["hermes", "llama3_json", "mistral"]
"""How a chat template's family writes tool calls: `hermes` (Hermes, Qwen) puts each in
`<tool_call>` tags around `{"name", "arguments"}`; `llama3_json` writes bare
`{"name", "parameters"}` objects joined by `; `; `mistral` writes `[TOOL_CALLS]` and a JSON
list of `{"name", "arguments"}`."""


@dataclass(frozen=True)
class JsonOutput:
    """The whole completion is one JSON value valid against `schema` (JSON text; an object
    of any shape for `response_format` `json_object`)."""

    schema: str


@dataclass(frozen=True)
class ToolCallOutput:
    """The completion calls tools in `format`: `tools` pairs each function's name with its
    parameters' JSON Schema (JSON text). With `required` it is one or more calls and nothing
    else; otherwise free text, or calls, each constrained once its start marker appears.
    Without `parallel`, at most one call."""

    format: ToolCallFormat
    tools: tuple[tuple[str, str], ...]
    required: bool = False
    parallel: bool = True


OutputConstraint = JsonOutput | ToolCallOutput
"""What a grammar holds a completion to; backends compile it into a token mask."""


@dataclass(frozen=True)
class GenerationParams:
    """How to sample one completion. Raises `InvalidRequest` for out-of-range values."""

    temperature: float = 1.0
    """Softmax temperature in [0, 2]; 0 (or below `GREEDY_BELOW`) picks the most likely
    token (greedy)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the smallest set of tokens holding this much
    probability, in (0, 1]."""
    max_tokens: int = 16
    """Most tokens to generate; 0 generates nothing (the prompt alone, scored if
    `prompt_logprobs` is set)."""
    stop: Sequence[str] = ()
    """Up to 4 non-empty strings; the text ends before the first one that appears, which
    is not part of the output. Stored as a tuple."""
    seed: int | None = None
    """Seeds this request's own random generator: same seed, same prompt, same text."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it was generated, in [-2, 2]."""
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    """Added to the logits of these token ids before sampling, each in [-100, 100]."""
    logprobs: int | None = None
    """Report each generated token's log-probability and this many most likely
    alternatives (0 to 20); None reports none."""
    prompt_logprobs: int | None = None
    """The same for every prompt token (the first has none); None skips the prompt."""
    constraint: OutputConstraint | None = None
    """A grammar every generated token must keep the text inside; it masks the logits after
    temperature, penalties and logit_bias, and the completion ends once it is complete."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            raise InvalidRequest("stop must be a list of strings, not a string")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "logit_bias", dict(self.logit_bias))
        if not _is_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequest(
                f"temperature must be between 0 and {MAX_TEMPERATURE}, got {self.temperature!r}"
            )
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.max_tokens) or self.max_tokens < 0:
            raise InvalidRequest(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(
                f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}"
            )
        if not all(isinstance(stop, str) and stop for stop in self.stop):
            raise InvalidRequest(f"stop strings must be non-empty strings, got {self.stop!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise InvalidRequest(f"seed must be an integer, got {self.seed!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise InvalidRequest(
                    f"{name} must be between -{MAX_PENALTY} and {MAX_PENALTY}, got {value!r}"
                )
        for token, bias in self.logit_bias.items():
            if not _is_int(token) or token < 0:
                raise InvalidRequest(f"logit_bias keys must be token ids, got {token!r}")
            if not _is_number(bias) or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise InvalidRequest(
                    f"logit_bias values must be between -{MAX_LOGIT_BIAS} and "
                    f"{MAX_LOGIT_BIAS}, got {bias!r} for token {token}"
                )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_TOP_LOGPROBS):
                raise InvalidRequest(
                    f"{name} must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {value!r}"
                )

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is picked (temperature 0, or too small to divide by)."""
        return self.temperature < GREEDY_BELOW

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or a bias change the logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass(frozen=True)
class TokenLogprob:
    """One token of a prompt or a completion with its log-probability.

    Log-probabilities are those of the model's own distribution at that position (a
    log-softmax of its logits), before temperature, top_p, penalties and logit_bias: what
    vLLM reports by default (`raw_logprobs`).
    """

    token_id: int
    token: str
    """The token decoded alone, special tokens included (a byte-level piece of a
    multi-byte character decodes to U+FFFD)."""
    logprob: float | None
    """None for a prompt's first token, which nothing predicts."""
    top: tuple[tuple[str, float], ...] = ()
    """The most likely tokens at this position, most likely first, as many as asked."""


@dataclass(frozen=True)
class TokenChunk:
    """One piece of a token stream.

    Every chunk but the last has `finish_reason` None and new `text` or new `logprobs`;
    the last has `finish_reason` set and may have empty text. Counts are totals so far.
    `logprobs` holds one entry per token sampled since the previous chunk, in order, so
    a whole stream has exactly `completion_tokens` entries when they were asked for (the
    text of a token may arrive in a later chunk than its entry: text is held back until
    it decodes cleanly and cannot be part of a stop string).
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    """Tokens sampled so far, the eos or stop-completing token included."""
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    """Every prompt token's entry, on the first chunk of a stream that asked for them."""


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


class TextModel(Protocol):
    """A model with its own per-request token stream (run on a worker thread, one step at
    a time): what the gate asks, and what the per-request engine steps. The server
    generates through a `BatchedModel`'s engine."""

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str: ...

    def count_tokens(self, text: str) -> int: ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens skipped."""
        ...

    def stream(self, prompt: str | Sequence[int], params: GenerationParams) -> Iterator[TokenChunk]:
        """Raises `InvalidRequest` for a prompt or parameters the model cannot take."""
        ...


Deliver = Callable[[TokenChunk | BaseException], None]
"""Called on an engine's thread with each chunk of a sequence, then its last chunk (with a
finish reason) or the exception that ends it. Must be quick and must not raise."""


class Ticket(Protocol):
    """A sequence submitted to an engine."""

    def cancel(self) -> None:
        """Stop generating at the engine's next pass; nothing more is delivered after the
        pass in progress. Thread-safe, idempotent."""
        ...


class Engine(Protocol):
    """Generates for all of one version's requests together (see `hotweights.engine`)."""

    columns: int
    """Tokens one sequence may hold, prompt and completion."""

    def submit(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        deliver: Deliver,
        cut: threading.Event | None = None,
    ) -> Ticket:
        """Queue a sequence; raises `ModelRetired` once the engine is stopping. A set
        `cut` ends the sequence with `ShuttingDown` at the next pass."""
        ...

    def stop(self, timeout: float | None = None) -> None:
        """End what runs with `ModelRetired` and stop. Idempotent."""
        ...

    def load(self) -> dict[str, int]:
        """Sequences `running` and `waiting` now."""
        ...


@runtime_checkable
class ToolPrompting(Protocol):
    """An optional ability of a served model: a chat template that renders tool definitions,
    assistant tool calls and tool results, and the tool-call format its family writes."""

    tool_format: ToolCallFormat | None
    """Detected from the chat template (or set by the operator); None when it has none."""

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> str:
        """The prompt for OpenAI-shaped `messages` (tool calls and tool results included) and
        `tools` (OpenAI function definitions), with the assistant turn opened. Raises
        `InvalidRequest` when the template refuses them."""
        ...


@runtime_checkable
class ConstraintChecking(Protocol):
    """An optional ability of a served model: it compiles output constraints for its
    tokenizer (cached), so a request can be refused before it is queued."""

    def check_constraint(self, constraint: OutputConstraint) -> None:
        """Compile `constraint` now; raises `InvalidRequest` naming what cannot be enforced.
        Thread-safe; may take a while for a large schema (call it on a worker)."""
        ...


@runtime_checkable
class BatchedModel(Protocol):
    """What the server needs of a served model: a prompt from chat messages, its token ids,
    and the engine its loader started (the batched engine, or the per-request one where
    that cannot run); None only before warmup and after unload."""

    engine: Engine | None
    engine_note: str
    """How it generates: `batched (...)`, or `per-request (why)`."""

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str: ...

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
