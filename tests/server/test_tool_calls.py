"""Parsing generated tool calls, per template family, whole and streamed (tables)."""

from __future__ import annotations

import json

import pytest

from hotweights.generation import ToolCallFormat
from hotweights.server.tool_calls import ToolCall, ToolCallStream, parse_tool_calls

HERMES_ONE = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
HERMES_TWO = HERMES_ONE + '\n<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'


@pytest.mark.parametrize(
    ("format", "text", "content", "calls"),
    [
        ("hermes", HERMES_ONE, None, [("f", {"x": 1})]),
        ("hermes", HERMES_TWO, None, [("f", {"x": 1}), ("g", {})]),
        ("hermes", "Let me look.\n" + HERMES_ONE, "Let me look.", [("f", {"x": 1})]),
        ("hermes", "no calls here", "no calls here", []),
        ("hermes", '<tool_call>\n{"name": "f", "argu', '<tool_call>\n{"name": "f", "argu', []),
        (
            "hermes",
            "<tool_call>\nnot json\n</tool_call>",
            "<tool_call>\nnot json\n</tool_call>",
            [],
        ),
        ("llama3_json", '{"name": "f", "parameters": {"x": 1}}', None, [("f", {"x": 1})]),
        (
            "llama3_json",
            '<|python_tag|>{"name": "f", "parameters": {}}; '
            '{"name": "g", "parameters": {"y": "z"}}',
            None,
            [("f", {}), ("g", {"y": "z"})],
        ),
        ("llama3_json", "The answer is {not json", "The answer is {not json", []),
        ("llama3_json", '{"name": "f", "parameters": {"x"', '{"name": "f", "parameters": {"x"', []),
        (
            "mistral",
            '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}, {"name": "g", "arguments": {}}]',
            None,
            [("f", {"x": 1}), ("g", {})],
        ),
        ("mistral", '[{"name": "f", "arguments": {}}]', None, [("f", {})]),
        ("mistral", "plain words", "plain words", []),
    ],
)
def test_calls_are_parsed_per_family(
    format: ToolCallFormat, text: str, content: str | None, calls: list[tuple[str, object]]
) -> None:
    found_content, found = parse_tool_calls(text, format)
    assert found_content == content
    assert [(call.name, json.loads(call.arguments)) for call in found] == calls
    assert len({call.id for call in found}) == len(found)


def _streamed(format: ToolCallFormat, pieces: list[str]) -> tuple[str, list[ToolCall]]:
    stream = ToolCallStream(format)
    parts = [part for piece in pieces for part in stream.feed(piece)] + stream.finish()
    text = "".join(part for part in parts if isinstance(part, str))
    return text, [part for part in parts if isinstance(part, ToolCall)]


@pytest.mark.parametrize(
    ("format", "text"),
    [
        ("hermes", "Looking it up.\n" + HERMES_TWO),
        ("hermes", "just text, with < and <tool in it"),
        ("llama3_json", '{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}'),
        ("llama3_json", "plain text {with braces}"),
        ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}}]'),
        ("mistral", "words [and brackets]"),
    ],
)
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_a_stream_cut_anywhere_gives_what_the_whole_text_gives(
    format: ToolCallFormat, text: str, size: int
) -> None:
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    streamed_text, streamed_calls = _streamed(format, pieces)
    content, calls = parse_tool_calls(text, format)
    assert streamed_text.strip() == (content or "")
    assert [(c.name, c.arguments) for c in streamed_calls] == [(c.name, c.arguments) for c in calls]


def test_hermes_text_before_a_call_streams_before_the_call_is_complete() -> None:
    stream = ToolCallStream("hermes")
    assert stream.feed("Let me check. <tool") == ["Let me check. "]
    assert stream.feed('_call>\n{"name": "f", "arguments": {}}') == []
    (call,) = stream.feed("\n</tool_call>")
    assert isinstance(call, ToolCall)
    assert call.openai(0)["index"] == 0
    assert stream.calls == 1
