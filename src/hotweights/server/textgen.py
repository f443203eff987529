"""The item stream the server turns a request into, and the prompt checks before it.

A request yields `Started` (its prompt size), then `TextPiece`s, then one `Finished`. For a
model served by the per-request loop, `start_generation` produces them on a generation
worker; for a batched model, `prepare_batched` renders and encodes the prompt (on a worker)
and the version's engine produces the rest (see `steps.engine_steps`). The prompt is
refused before `Started` when it is too long for the server or the engine's cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from hotweights.errors import PayloadTooLarge
from hotweights.generation import BatchedModel, Engine, GenerationParams, TextModel


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


def _check_size(prompt_tokens: int, max_prompt_tokens: int) -> None:
    if prompt_tokens > max_prompt_tokens:
        raise PayloadTooLarge(
            f"the prompt is {prompt_tokens} tokens; this server accepts at most {max_prompt_tokens}"
        )


def start_generation(
    model: TextModel, prompt: Prompt, params: GenerationParams, max_prompt_tokens: int
) -> Iterator[Started | TextPiece | Finished]:
    """Generate for one request with the model's own loop; raises `PayloadTooLarge` or
    `InvalidRequest` before the first item when the prompt is refused."""
    text = model.apply_chat_template(prompt.messages) if prompt.messages else prompt.text or ""
    prompt_tokens = model.count_tokens(text)
    _check_size(prompt_tokens, max_prompt_tokens)
    chunks = model.stream(text, params)
    yield Started(prompt_tokens)
    for chunk in chunks:
        if chunk.text:
            yield TextPiece(chunk.text)
        if chunk.finish_reason is not None:
            yield Finished(chunk.finish_reason, chunk.completion_tokens)
            return
    raise RuntimeError("the model's token stream ended without a finish reason")


def prepare_batched(
    model: BatchedModel, engine: Engine, prompt: Prompt, max_prompt_tokens: int
) -> list[int]:
    """The prompt's token ids for `engine`; raises `PayloadTooLarge` when it is longer than
    the server accepts or than one row of the engine's cache holds (with room for one
    generated token), `InvalidRequest` when it is empty."""
    columns = engine.columns
    text = model.apply_chat_template(prompt.messages) if prompt.messages else prompt.text or ""
    ids = model.prompt_ids(text)
    _check_size(len(ids), max_prompt_tokens)
    if len(ids) >= columns:
        raise PayloadTooLarge(
            f"the prompt is {len(ids)} tokens; this model's engine holds at most {columns} per "
            f"sequence, its completion included (raise --kv-cache-memory or lower "
            f"--max-batch-size)"
        )
    return ids
