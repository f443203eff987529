"""Tool calls in generated text: parsed into OpenAI's `tool_calls`, whole or as a stream.

Each chat-template family writes calls its own way (`ToolCallFormat`): Hermes and Qwen wrap
each `{"name", "arguments"}` in `<tool_call>` tags, Llama 3 writes bare `{"name",
"parameters"}` objects joined by `;`, Mistral a JSON list after `[TOOL_CALLS]`. Text that is
not a call stays the message's content; a call that does not parse (cut by `max_tokens`)
stays text too, so nothing generated is lost.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from hotweights.generation import ToolCallFormat

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
MISTRAL_OPEN = "[TOOL_CALLS]"
LLAMA_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class ToolCall:
    """One parsed call, as OpenAI names its parts."""

    name: str
    arguments: str
    """The arguments as JSON text."""
    id: str

    def openai(self, index: int | None = None) -> dict[str, Any]:
        """The `tool_calls` entry (with `index`, the streamed delta's)."""
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


def parse_tool_calls(text: str, format: ToolCallFormat) -> tuple[str | None, list[ToolCall]]:
    """`text` split into its content (None when empty) and the calls it makes."""
    if format == "hermes":
        return _hermes(text)
    body = text.strip()
    opening = LLAMA_TAG if format == "llama3_json" else MISTRAL_OPEN
    body = body.removeprefix(opening).strip()
    calls = _json_calls(body, format)
    if calls is None:
        return (text or None), []
    return None, calls


class ToolCallStream:
    """Splits a streamed answer into content and whole calls as its text arrives.

    `feed` returns the pieces that are certain now: content text (a `str`) and parsed
    calls. Text that may begin a call is held until the call is complete (Hermes) or the
    answer ends (the other families, whose answer is calls or text from its first
    character). `finish` releases the rest. Not thread-safe: one per streamed choice.
    """

    def __init__(self, format: ToolCallFormat) -> None:
        self._format = format
        self._held = ""
        self._text_only = False
        self.calls = 0
        """Calls parsed so far."""

    def feed(self, text: str) -> list[str | ToolCall]:
        if self._text_only:
            return [text] if text else []
        self._held += text
        if self._format == "hermes":
            return self._hermes_pieces(final=False)
        start = self._held.lstrip()
        if not start:
            return []
        marks = ("{", LLAMA_TAG) if self._format == "llama3_json" else ("[", MISTRAL_OPEN)
        if any(mark.startswith(start[: len(mark)]) for mark in marks):
            return []  # may be calls: hold to the end
        self._text_only = True
        held, self._held = self._held, ""
        return [held]

    def finish(self) -> list[str | ToolCall]:
        if self._format == "hermes":
            return self._hermes_pieces(final=True)
        held, self._held = self._held, ""
        if not held:
            return []
        content, calls = parse_tool_calls(held, self._format)
        self.calls += len(calls)
        return [content] if content else list(calls)

    def _hermes_pieces(self, *, final: bool) -> list[str | ToolCall]:
        pieces: list[str | ToolCall] = []
        while True:
            start = self._held.find(HERMES_OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self._held, HERMES_OPEN)
                text = self._held[: len(self._held) - keep]
                self._held = self._held[len(self._held) - keep :]
                if text:
                    pieces.append(text)
                return pieces
            if start:
                pieces.append(self._held[:start])
                self._held = self._held[start:]
            end = self._held.find(HERMES_CLOSE)
            if end < 0:
                if final and self._held:
                    pieces.append(self._held)
                    self._held = ""
                return pieces
            block = self._held[: end + len(HERMES_CLOSE)]
            self._held = self._held[end + len(HERMES_CLOSE) :].lstrip("\n")
            content, calls = _hermes(block)
            self.calls += len(calls)
            pieces.extend(calls if calls else [content or block])


def _hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    content: list[str] = []
    calls: list[ToolCall] = []
    rest = text
    while True:
        start = rest.find(HERMES_OPEN)
        end = rest.find(HERMES_CLOSE, start + 1) if start >= 0 else -1
        if start < 0 or end < 0:
            content.append(rest)
            break
        content.append(rest[:start])
        inner = rest[start + len(HERMES_OPEN) : end]
        call = _call(_loads(inner), "arguments")
        if call is None:
            content.append(rest[: end + len(HERMES_CLOSE)][start:])
        else:
            calls.append(call)
        rest = rest[end + len(HERMES_CLOSE) :]
    joined = "".join(content).strip()
    return (joined or None), calls


def _json_calls(body: str, format: ToolCallFormat) -> list[ToolCall] | None:
    """The calls `body` is made of entirely, or None when it is anything else."""
    if format == "mistral":
        value = _loads(body)
        items = value if isinstance(value, list) and value else None
        if items is None:
            return None
        calls = [_call(item, "arguments") for item in items]
    else:
        decoder = json.JSONDecoder()
        calls, position = [], 0
        while position < len(body):
            try:
                item, position = decoder.raw_decode(body, position)
            except ValueError:
                return None
            calls.append(_call(item, "parameters") or _call(item, "arguments"))
            while position < len(body) and body[position] in " \n\t;":
                position += 1
        if not calls:
            return None
    found = [call for call in calls if call is not None]
    return found if len(found) == len(calls) else None


def _call(value: Any, arguments_key: str) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, {})
    if not isinstance(arguments, dict):
        return None
    text = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(value["name"], text, f"call_{uuid.uuid4().hex[:24]}")


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _partial_suffix(text: str, mark: str) -> int:
    """Length of the longest end of `text` that begins `mark`."""
    for size in range(min(len(mark) - 1, len(text)), 0, -1):
        if mark.startswith(text[-size:]):
            return size
    return 0
