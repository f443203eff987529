"""What a model's chat template does with tools: which tool-call format its family writes,
and rendering OpenAI-shaped messages (tool calls, tool results) and tool definitions
through it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hotweights.errors import InvalidRequest
from hotweights.generation import ToolCallFormat

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FAMILY_MARKS: tuple[tuple[str, ToolCallFormat], ...] = (
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),
)
"""A string each family's template writes, in the order they are looked for."""


def detect_tool_format(template: str | None) -> ToolCallFormat | None:
    """The tool-call format a chat template writes, or None when it renders no tools."""
    if not template or "tools" not in template:
        return None
    for mark, family in FAMILY_MARKS:
        if mark in template:
            return family
    if "ipython" in template and "parameters" in template:  # Llama 3 without the tag
        return "llama3_json"
    return None


def template_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates read them: an assistant's call arguments as
    objects (OpenAI sends JSON text), everything else as given."""
    rendered: list[dict[str, Any]] = []
    for message in messages:
        item = dict(message)
        calls = item.get("tool_calls")
        if calls:
            item["tool_calls"] = [_template_call(call) for call in calls]
        rendered.append(item)
    return rendered


def render_with_tools(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None,
) -> str:
    """The prompt of `messages` and `tools` through `tokenizer`'s template, assistant turn
    opened. The caller serialises tokenizer calls. Raises `InvalidRequest` when the template
    refuses them."""
    from jinja2 import TemplateError

    try:
        prompt = tokenizer.apply_chat_template(
            template_messages(messages),
            tools=[dict(tool) for tool in tools] if tools else None,
            tokenize=False,
            add_generation_prompt=True,
        )
    except TemplateError as exc:
        raise InvalidRequest(f"the chat template refused these messages: {exc}") from exc
    if not isinstance(prompt, str):
        raise InvalidRequest("the chat template did not render to text")
    return prompt


def _template_call(call: Mapping[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):  # a template that prints it as text still can
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
    return {**call, "function": function}
