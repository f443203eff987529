"""What a chat request asks its output to be: JSON (`response_format`) or tool calls
(`tools` with `tool_choice`), as the `OutputConstraint` the engine enforces.

A schema must be valid JSON Schema (`schema_check`, a 400 naming the field); whether the
grammar can enforce every keyword of it is the backend's to say (`ConstraintChecking`),
and it says so with a 400 too. Nothing falls back to unconstrained text.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, get_args

from hotweights.errors import InvalidRequest
from hotweights.generation import (
    JsonOutput,
    OutputConstraint,
    ToolCallFormat,
    ToolCallOutput,
    ToolPrompting,
)

if TYPE_CHECKING:
    from hotweights.server.schemas import ChatCompletionRequest

ANY_OBJECT = '{"type": "object"}'
"""The schema of `response_format` `json_object`."""


def offers_tools(body: ChatCompletionRequest) -> bool:
    """Whether the model is shown tools it may call (`tool_choice` other than `none`)."""
    return bool(body.tools) and body.tool_choice != "none"


def tool_format_of(
    body: ChatCompletionRequest, model: object, setting: str
) -> ToolCallFormat | None:
    """The format calls are written in for this request on `model`, or None when it offers
    no tools; `setting` is the server's `tool_parser` (`auto`: the model's own). Raises
    `InvalidRequest` when the model's template writes no known format."""
    if not offers_tools(body):
        return None
    detected = model.tool_format if isinstance(model, ToolPrompting) else None
    for family in get_args(ToolCallFormat):
        if setting == family:
            detected = family
    if detected is None:
        raise InvalidRequest(
            "tools: this model's chat template writes no tool calls that hotweights knows; "
            "start the server with --tool-parser to name the format"
        )
    return detected


def output_constraint(
    body: ChatCompletionRequest, tool_format: ToolCallFormat | None
) -> OutputConstraint | None:
    """The constraint of `body`'s `response_format` or tools (`tool_format` from
    `tool_format_of`). Raises `InvalidRequest` when both ask for one."""
    response_format = body.response_format
    wants_json = response_format is not None and response_format.type != "text"
    if tool_format is not None:
        if wants_json:
            raise InvalidRequest(
                "response_format: a JSON format and tools cannot both shape one answer; "
                "set tool_choice none or drop response_format"
            )
        return _tool_constraint(body, tool_format)
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return JsonOutput(ANY_OBJECT)
    schema = response_format.json_schema.schema_ if response_format.json_schema else None
    return JsonOutput(json.dumps(schema if schema is not None else {}))


def _tool_constraint(body: ChatCompletionRequest, tool_format: ToolCallFormat) -> ToolCallOutput:
    choice = body.tool_choice
    named = None if isinstance(choice, str) or choice is None else choice.function.name
    tools = tuple(
        (tool.function.name, json.dumps(tool.function.parameters or {}))
        for tool in body.tools or ()
        if named is None or tool.function.name == named
    )
    return ToolCallOutput(
        format=tool_format,
        tools=tools,
        required=choice == "required" or named is not None,
        parallel=body.parallel_tool_calls is not False,
    )
