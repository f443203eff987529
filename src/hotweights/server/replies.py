"""The OpenAI response shapes of one request: a JSON body or an SSE stream, each naming the
generation that served it; and the streaming response that finishes the request's
admission when it ends."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from hotweights.errors import HotweightsError
from hotweights.generation import TokenChunk, TokenLogprob, ToolCallFormat
from hotweights.server.adapters import stamp
from hotweights.server.admission import CLIENT_CLOSED, Admission
from hotweights.server.error_responses import classify, error_body
from hotweights.server.textgen import Began, Choice, Started, Step
from hotweights.server.tool_calls import ToolCall, ToolCallStream, parse_tool_calls


class AdmittedStream(StreamingResponse):
    """A streaming response that finishes its request's admission (releasing the lease)
    when the stream ends for any reason: done, failed, or the client went away (starlette
    cancels the body on disconnect, and may never start a body it could not send)."""

    def __init__(
        self,
        content: AsyncGenerator[bytes, None],
        steps: AsyncGenerator[Any, None],
        admission: Admission,
        headers: dict[str, str],
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._admission = admission
        self._closing = (content, steps)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                for generator in self._closing:  # stops the engine before its next step
                    await generator.aclose()
            finally:
                # The body records its own end; this one counts only if it never ran.
                self._admission.finish(CLIENT_CLOSED)


class Reply:
    """Shapes one request's answer in the OpenAI formats: one choice per sequence, by
    index, with its log-probabilities when they were asked for."""

    def __init__(
        self,
        admission: Admission,
        began: Began,
        choices: list[Choice],
        model_name: str,
        *,
        echo: bool = False,
        logprobs: bool = False,
        tools: ToolCallFormat | None = None,
    ) -> None:
        self.served = admission.served
        self.lease = lease = admission.lease
        self.endpoint = endpoint = admission.endpoint
        self.began = began
        self.choices = choices
        self.model_name = model_name
        self.echo = echo
        self.logprobs = logprobs
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.fingerprint, self.headers = stamp(lease)
        self._offsets = [0] * len(choices)
        """Characters of each completion choice's text so far, for `text_offset`."""
        self.tools = tools
        """The format tool calls are parsed from, when the request offered tools."""
        self._calls = [ToolCallStream(tools) for _ in choices] if tools is not None else None
        self._sent = [0] * len(choices)
        """Calls streamed so far, per choice: the next one's `index`."""

    @property
    def prompt_tokens(self) -> int:
        return sum(started.prompt_tokens for started in self.began.prompts)

    async def collect(self, steps: AsyncIterator[Any]) -> list[Collected]:
        """Every choice's whole answer."""
        collected = [Collected() for _ in self.choices]
        async for item in steps:
            if isinstance(item, Step):
                collected[item.choice].add(item.chunk)
        if not all(c.finish_reason is not None for c in collected):
            raise RuntimeError("generation ended without a finish")
        return collected

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model_name,
            "system_fingerprint": self.fingerprint,
            "choices": choices,
        }

    def complete(self, collected: list[Collected]) -> dict[str, Any]:
        out: list[dict[str, Any]] = []
        for index, answer in enumerate(collected):
            if self.endpoint == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": answer.text}
                finish = answer.finish_reason
                if self.tools is not None:
                    message["content"], calls = parse_tool_calls(answer.text, self.tools)
                    if calls:
                        message["tool_calls"] = [call.openai() for call in calls]
                        finish = "tool_calls" if finish == "stop" else finish
                out.append(
                    {
                        "index": index,
                        "message": message,
                        "finish_reason": finish,
                        "logprobs": self._chat_logprobs(answer.entries),
                    }
                )
                continue
            text, entries = answer.text, answer.entries
            if self.echo:
                text = self._prompt(index).text + text
                entries = [*answer.prompt_entries, *entries]
            out.append(
                {
                    "index": index,
                    "text": text,
                    "finish_reason": answer.finish_reason,
                    "logprobs": self._completion_logprobs(index, entries),
                }
            )
        body = self._envelope(_object(self.endpoint), out)
        body["usage"] = self.usage(sum(answer.completion_tokens for answer in collected))
        return body

    def _prompt(self, index: int) -> Started:
        return self.began.prompts[self.choices[index].prompt]

    def _chat_logprobs(self, entries: Sequence[TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        content = [
            {
                **_chat_token(entry.token, entry.logprob),
                "top_logprobs": [_chat_token(token, value) for token, value in entry.top],
            }
            for entry in entries
        ]
        return {"content": content, "refusal": None}

    def _completion_logprobs(
        self, index: int, entries: Sequence[TokenLogprob]
    ) -> dict[str, Any] | None:
        """OpenAI's legacy shape; each token's `top_logprobs` holds the sampled token too,
        as vLLM's do, and the prompt's first token has nulls."""
        if not self.logprobs:
            return None
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for entry in entries:
            tokens.append(entry.token)
            offsets.append(self._offsets[index])
            self._offsets[index] += len(entry.token)
            if entry.logprob is None:
                values.append(None)
                tops.append(None)
                continue
            values.append(_finite(entry.logprob))
            top: dict[str, float] = {}
            for token, value in (*entry.top, (entry.token, entry.logprob)):
                top.setdefault(token, _finite(value))  # ids that decode alike: the likelier
            tops.append(top)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _chunk(
        self,
        index: int,
        text: str | None,
        reason: str | None,
        entries: Sequence[TokenLogprob] = (),
        first: bool = False,
        call: dict[str, Any] | None = None,
    ) -> bytes:
        if self.endpoint == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            if call is not None:
                delta["tool_calls"] = [call]
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": reason}
            if entries:
                choice["logprobs"] = self._chat_logprobs(entries)
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            choice = {
                "index": index,
                "text": text or "",
                "finish_reason": reason,
                "logprobs": self._completion_logprobs(index, entries) if entries else None,
            }
            body = self._envelope("text_completion", [choice])
        return _sse(body)

    def _opening(self) -> list[bytes]:
        """Each choice's first chunk: the assistant role (chat) or the echoed prompt."""
        if self.endpoint == "chat":
            return [self._chunk(i, "", None, first=True) for i in range(len(self.choices))]
        if self.echo and not self.logprobs:  # with logprobs, it comes with its scores
            return [self._chunk(i, self._prompt(i).text, None) for i in range(len(self.choices))]
        return []

    def _pieces(self, step: Step) -> list[bytes]:
        chunk, index = step.chunk, step.choice
        pieces = []
        if chunk.prompt_logprobs is not None and self.echo and self.endpoint != "chat":
            pieces.append(self._chunk(index, self._prompt(index).text, None, chunk.prompt_logprobs))
        entries = chunk.logprobs if self.logprobs else ()
        if self._calls is not None:
            return pieces + self._tool_pieces(index, chunk, entries)
        if chunk.text or entries:
            pieces.append(self._chunk(index, chunk.text, None, entries))
        if chunk.finish_reason is not None:
            text = None if self.endpoint == "chat" else ""
            pieces.append(self._chunk(index, text, chunk.finish_reason))
        return pieces

    def _tool_pieces(
        self, index: int, chunk: TokenChunk, entries: Sequence[TokenLogprob]
    ) -> list[bytes]:
        """A chat chunk's events when tools were offered: content as it is certain, each
        call whole once it is complete (`delta.tool_calls` with its `index`)."""
        if self._calls is None:
            return []
        calls = self._calls[index]
        parts = calls.feed(chunk.text)
        if chunk.finish_reason is not None:
            parts += calls.finish()
        pieces = []
        for part in parts:
            if isinstance(part, ToolCall):
                pieces.append(self._chunk(index, None, None, call=part.openai(self._sent[index])))
                self._sent[index] += 1
            else:
                pieces.append(self._chunk(index, part, None, entries))
                entries = ()
        if entries:
            pieces.append(self._chunk(index, None, None, entries))
        if chunk.finish_reason is not None:
            finish = chunk.finish_reason
            called = calls.calls and finish == "stop"
            pieces.append(self._chunk(index, None, "tool_calls" if called else finish))
        return pieces

    async def sse(
        self, steps: AsyncGenerator[Any, None], include_usage: bool, admission: Admission
    ) -> AsyncGenerator[bytes, None]:
        """The stream's events; when it ends, `steps` is closed and the admission finished
        with how it ended (an error after the first byte is an error event)."""
        status = 200
        generated = [0] * len(self.choices)
        try:
            for piece in self._opening():
                yield piece
            async for item in steps:
                if not isinstance(item, Step):
                    continue
                generated[item.choice] = item.chunk.completion_tokens
                for piece in self._pieces(item):
                    yield piece
            if include_usage:
                usage = self._envelope(_stream_object(self.endpoint), [])
                usage["usage"] = self.usage(sum(generated))
                yield _sse(usage)
        except HotweightsError as exc:
            status, kind, code = classify(exc)
            yield _sse(error_body(str(exc), kind, code))
        except (asyncio.CancelledError, GeneratorExit):
            status = CLIENT_CLOSED
            raise
        except Exception as exc:
            status = 500
            yield _sse(error_body(f"internal error: {type(exc).__name__}", "server_error"))
        finally:
            await steps.aclose()  # nothing generates for this request once it is counted out
            metrics = admission.state.metrics
            metrics.generated(self.served.name, self.lease.generation, sum(generated))
            admission.finish(status, sum(generated))
        yield b"data: [DONE]\n\n"


@dataclass
class Collected:
    """One choice's whole answer, gathered from its chunks."""

    parts: list[str] = field(default_factory=list)
    entries: list[TokenLogprob] = field(default_factory=list)
    prompt_entries: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    completion_tokens: int = 0

    def add(self, chunk: TokenChunk) -> None:
        self.parts.append(chunk.text)
        self.entries.extend(chunk.logprobs)
        if chunk.prompt_logprobs is not None:
            self.prompt_entries = chunk.prompt_logprobs
        self.completion_tokens = chunk.completion_tokens
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason

    @property
    def text(self) -> str:
        return "".join(self.parts)


LOWEST_LOGPROB = -9999.0
"""What an impossible token's log-probability (-inf) is reported as: JSON has no infinity."""


def _finite(value: float) -> float:
    return max(value, LOWEST_LOGPROB)


def _chat_token(token: str, logprob: float | None) -> dict[str, Any]:
    return {
        "token": token,
        "logprob": _finite(logprob if logprob is not None else LOWEST_LOGPROB),
        "bytes": list(token.encode("utf-8")),
    }


def _object(endpoint: str) -> str:
    return "chat.completion" if endpoint == "chat" else "text_completion"


def _stream_object(endpoint: str) -> str:
    return "chat.completion.chunk" if endpoint == "chat" else "text_completion"


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
