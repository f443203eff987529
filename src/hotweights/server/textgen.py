"""The item stream the server turns a request into, and the prompt checks before it.

A request has one or more prompts (a list in `/v1/completions`) and `n` choices per
prompt. Its generation yields one `Began` (every prompt's size, once all were accepted),
then `Step`s: a `TokenChunk` of one choice, by the choice's index. `prepare_prompt`
encodes a prompt (on a worker) and the version's engine, batched or per-request, produces
the rest (see `steps.engine_steps`). A prompt is refused before `Began` when it is too
long for the server or for one sequence of the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hotweights.errors import InvalidRequest, PayloadTooLarge
from hotweights.generation import BatchedModel, Engine, GenerationParams, TokenChunk, ToolPrompting


@dataclass(frozen=True)
class Prompt:
    """Chat messages (rendered with the model's template), raw text, or token ids. Chat
    messages are OpenAI-shaped: text content, and an assistant's `tool_calls` or a tool
    result's `tool_call_id` where they have them; `tools` are the functions offered."""

    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    ids: list[int] | None = None
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class Choice:
    """One sequence a request generates: which prompt, with what parameters."""

    prompt: int
    params: GenerationParams


@dataclass(frozen=True)
class Started:
    """A prompt accepted: its size, and its text as `echo` returns it."""

    prompt_tokens: int
    text: str


@dataclass(frozen=True)
class Began:
    """Every prompt accepted, in the request's order."""

    prompts: tuple[Started, ...]


@dataclass(frozen=True)
class Step:
    choice: int
    chunk: TokenChunk


def _check_size(prompt_tokens: int, max_prompt_tokens: int) -> None:
    if prompt_tokens > max_prompt_tokens:
        raise PayloadTooLarge(
            f"the prompt is {prompt_tokens} tokens; this server accepts at most {max_prompt_tokens}"
        )


def _rendered(model: BatchedModel, prompt: Prompt) -> str:
    messages = prompt.messages
    if not messages:
        return prompt.text or ""
    with_tools = prompt.tools or any("tool_calls" in m or "tool_call_id" in m for m in messages)
    if with_tools and isinstance(model, ToolPrompting):
        return model.render_chat(messages, prompt.tools)
    if prompt.tools:
        raise InvalidRequest("tools: this model has no chat template that renders tools")
    return model.apply_chat_template(
        [{"role": m["role"], "content": m["content"] or ""} for m in messages]
    )


def prepare_prompt(
    model: BatchedModel, engine: Engine, prompt: Prompt, max_prompt_tokens: int
) -> tuple[list[int], Started]:
    """The prompt's token ids for `engine`; raises `PayloadTooLarge` when it is longer than
    the server accepts or than one sequence of the engine holds (with room for one
    generated token), `InvalidRequest` when it is empty or names ids the model lacks."""
    columns = engine.columns
    if prompt.ids is not None:
        ids = model.prompt_ids(prompt.ids)
        echo = model.decode(ids)
    else:
        echo = _rendered(model, prompt)
        ids = model.prompt_ids(echo)
    _check_size(len(ids), max_prompt_tokens)
    if len(ids) >= columns:
        raise PayloadTooLarge(
            f"the prompt is {len(ids)} tokens; this model's engine holds at most {columns} per "
            f"sequence, its completion included (raise --kv-cache-memory or lower "
            f"--max-batch-size)"
        )
    return ids, Started(len(ids), echo)
