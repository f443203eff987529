"""Tool calls as a Lark grammar (llguidance's dialect), one layout per chat-template family.

Each family writes a call as a JSON object naming the function and holding its arguments,
and marks where calls begin. The arguments are held to the function's parameter schema
(`%json`); under `required` the completion is calls and nothing else, under `auto` it is
free text or calls, and a call is constrained from its start marker on. A marker that is a
special token of the tokenizer is written as that token (`<[id]>`), so free text, which
never contains special tokens, cannot swallow it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hotweights.errors import InvalidRequest
from hotweights.generation import ToolCallFormat, ToolCallOutput

COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class CallLayout:
    """How one family writes its calls."""

    arguments_key: str
    """The key holding the arguments: `arguments`, or `parameters` (Llama 3)."""
    opening: str | None
    """What starts the calls (`<tool_call>`), or None when a call is bare JSON."""
    closing: str | None
    """What ends each call (`</tool_call>`)."""
    separator: str
    """Between two calls."""
    as_list: bool = False
    """All calls in one JSON list after one opening (Mistral)."""


LAYOUTS: dict[ToolCallFormat, CallLayout] = {
    "hermes": CallLayout("arguments", "<tool_call>", "</tool_call>", "\n"),
    "llama3_json": CallLayout("parameters", None, None, "; "),
    "mistral": CallLayout("arguments", "[TOOL_CALLS]", None, "", as_list=True),
}


def tool_call_lark(constraint: ToolCallOutput, marker: Callable[[str], str]) -> str:
    """The Lark grammar of `constraint`; `marker` writes a marker string as a Lark item.
    Raises `InvalidRequest` for a parameter schema that is not a JSON object."""
    layout = LAYOUTS[constraint.format]
    call = _call_schema(constraint, layout.arguments_key)
    repeat = constraint.parallel
    if layout.as_list:  # one list of calls after one opening
        call = {"type": "array", "items": call, "minItems": 1, "x-guidance": COMPACT}
        if not constraint.parallel:
            call["maxItems"] = 1
        repeat = False
    after = f"%json {json.dumps(call)}"  # a call's text after its opening
    if layout.opening is not None and not layout.as_list:
        closing = f" {marker(layout.closing)}" if layout.closing else ""
        after = f'"\\n" {after} "\\n"{closing}'
    opening = marker(layout.opening) if layout.opening is not None else ""
    more = f" ({json.dumps(layout.separator)} {opening} {after})*" if repeat else ""
    lines = ["%llguidance {}", f"calls: {opening} {after}{more}"]
    if constraint.required:
        lines.insert(1, "start: calls")
    elif layout.opening is None:  # a bare JSON call: text is whatever does not open with `{`
        lines += ["start: TEXT? | calls", r"TEXT: /[^{](.|\n)*/"]
    elif opening.startswith("<["):  # a special token, which free text never holds
        lines += ["start: TEXT? calls?", r"TEXT: /(.|\n)+/"]
    else:  # a marker written as text: free text ends at the first marker (lazily)
        lines += [
            "start: TEXT? | head after",
            f"head[lazy]: /(.|\\n)*/ {opening}",
            f"after: {after}{more}",
            r"TEXT: /(.|\n)+/",
        ]
    return "\n".join(lines) + "\n"


def _call_schema(constraint: ToolCallOutput, arguments_key: str) -> dict[str, Any]:
    """One call of any of the tools: `{"name": <const>, arguments_key: <parameters>}`, with
    each tool's `$defs` moved to the root under names of its own."""
    options: list[dict[str, Any]] = []
    definitions: dict[str, Any] = {}
    for index, (name, parameters) in enumerate(constraint.tools):
        schema = json.loads(parameters) if parameters else {}
        if not isinstance(schema, dict):
            raise InvalidRequest(f"tools: the parameters of {name!r} must be a JSON object")
        prefix = f"t{index}_"
        for key in ("$defs", "definitions"):
            for local, value in (schema.pop(key, None) or {}).items():
                definitions[prefix + local] = _rerooted(value, prefix)
        schema = _rerooted(schema, prefix)
        if not schema:
            schema = {"type": "object", "properties": {}, "additionalProperties": False}
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, arguments_key: schema},
                "required": ["name", arguments_key],
                "additionalProperties": False,
            }
        )
    call: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    call = {**call, "x-guidance": COMPACT}
    if definitions:
        call["$defs"] = definitions
    return call


def _rerooted(node: Any, prefix: str) -> Any:
    """`node` with every local `$ref` pointing at the root's renamed `$defs`."""
    if isinstance(node, list):
        return [_rerooted(item, prefix) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _rerooted(value, prefix) for key, value in node.items()}
    ref = out.get("$ref")
    if isinstance(ref, str):
        for root in ("#/$defs/", "#/definitions/"):
            if ref.startswith(root):
                out["$ref"] = "#/$defs/" + prefix + ref[len(root) :]
    return out
