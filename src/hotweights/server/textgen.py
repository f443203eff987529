"""What the server needs from a text model, and the item stream it turns a request into.

A served model is anything with `apply_chat_template`, `count_tokens` and `stream` (the
transformers backend's `LoadedLM`, or a fake in tests). `start_generation` renders the
prompt, enforces the prompt-size limit, and yields `Started`, then `TextPiece`s, then one
`Finished`: all of it runs on a generation worker, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from hotweights.backends.sampling import GenerationParams, TokenChunk
from hotweights.errors import PayloadTooLarge


class TextModel(Protocol):
    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str: ...

    def count_tokens(self, text: str) -> int: ...

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[TokenChunk]: ...


@dataclass(frozen=True)
class Prompt:
    """Either chat messages (rendered with the model's template) or raw text."""

    messages: list[dict[str, str]] | None
    text: str | None


@dataclass(frozen=True)
class Started:
    prompt_tokens: int


@dataclass(frozen=True)
class TextPiece:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str
    completion_tokens: int


def start_generation(
    model: TextModel,
    prompt: Prompt,
    *,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int,
    stop: tuple[str, ...],
    seed: int | None,
    max_prompt_tokens: int,
) -> Iterator[Started | TextPiece | Finished]:
    """Generate for one request; raises `PayloadTooLarge` or `InvalidRequest` before the
    first item when the prompt or the parameters are refused."""
    params = GenerationParams(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        max_tokens=max_tokens,
        stop=stop,
        seed=seed,
    )
    text = model.apply_chat_template(prompt.messages) if prompt.messages else prompt.text or ""
    prompt_tokens = model.count_tokens(text)
    if prompt_tokens > max_prompt_tokens:
        raise PayloadTooLarge(
            f"the prompt is {prompt_tokens} tokens; this server accepts at most {max_prompt_tokens}"
        )
    chunks = model.stream(text, params)
    yield Started(prompt_tokens)
    for chunk in chunks:
        if chunk.text:
            yield TextPiece(chunk.text)
        if chunk.finish_reason is not None:
            yield Finished(chunk.finish_reason, chunk.completion_tokens)
            return
    raise RuntimeError("the model's token stream ended without a finish reason")
