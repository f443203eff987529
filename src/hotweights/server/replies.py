"""The OpenAI response shapes of one request: a JSON body or an SSE stream, each naming the
generation that served it; and the streaming response that holds the request's lease."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from hotweights.core import Lease
from hotweights.errors import HotweightsError
from hotweights.server.errors import classify, error_body
from hotweights.server.state import ServedModel, ServerState
from hotweights.server.textgen import Finished, TextPiece

GENERATION_HEADER = "x-hotweights-generation"
CLIENT_CLOSED = 499  # the client went away mid-stream (nginx's convention)


class LeasedStream(StreamingResponse):
    """A streaming response that releases its lease when the stream ends for any reason:
    done, failed, or the client went away (starlette cancels the body on disconnect)."""

    def __init__(
        self,
        content: AsyncGenerator[bytes, None],
        steps: AsyncGenerator[Any, None],
        lease: Lease[Any],
        served: ServedModel,
        headers: dict[str, str],
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._lease = lease
        self._served = served
        self._closing = (content, steps)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for generator in self._closing:  # stops the worker before its next step
                await generator.aclose()
            self._lease.release()
            self._served.done()


class Reply:
    """Shapes one request's answer in the OpenAI formats."""

    def __init__(
        self,
        served: ServedModel,
        lease: Lease[Any],
        endpoint: str,
        prompt_tokens: int,
        model_name: str,
    ) -> None:
        self.served = served
        self.lease = lease
        self.endpoint = endpoint
        self.prompt_tokens = prompt_tokens
        self.model_name = model_name
        prefix = "chatcmpl" if endpoint == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.fingerprint = lease.version.system_fingerprint
        self.headers = {GENERATION_HEADER: str(lease.generation)}

    async def collect(self, steps: AsyncIterator[Any]) -> tuple[str, Finished]:
        parts: list[str] = []
        async for item in steps:
            if isinstance(item, TextPiece):
                parts.append(item.text)
            elif isinstance(item, Finished):
                return "".join(parts), item
        raise RuntimeError("generation ended without a finish")

    def _usage(self, finished: Finished) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": finished.completion_tokens,
            "total_tokens": self.prompt_tokens + finished.completion_tokens,
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

    def complete(self, text: str, finished: Finished) -> dict[str, Any]:
        if self.endpoint == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finished.reason,
                "logprobs": None,
            }
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": text, "finish_reason": finished.reason, "logprobs": None}
            body = self._envelope("text_completion", [choice])
        body["usage"] = self._usage(finished)
        return body

    def _chunk(self, text: str | None, reason: str | None, first: bool = False) -> bytes:
        if self.endpoint == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason}
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
            body = self._envelope("text_completion", [choice])
        return _sse(body)

    async def sse(
        self,
        steps: AsyncGenerator[Any, None],
        include_usage: bool,
        state: ServerState,
        started_at: float,
    ) -> AsyncGenerator[bytes, None]:
        status = 200
        generated = 0
        try:
            if self.endpoint == "chat":
                yield self._chunk("", None, first=True)
            async for item in steps:
                if isinstance(item, TextPiece):
                    yield self._chunk(item.text, None)
                elif isinstance(item, Finished):
                    generated = item.completion_tokens
                    yield self._chunk(None if self.endpoint == "chat" else "", item.reason)
                    if include_usage:
                        usage = self._envelope(_stream_object(self.endpoint), [])
                        usage["usage"] = self._usage(item)
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
            name, generation = self.served.name, self.lease.generation
            state.metrics.generated(name, generation, generated)
            state.metrics.request(
                name, self.endpoint, generation, status, time.monotonic() - started_at
            )
        yield b"data: [DONE]\n\n"


def _stream_object(endpoint: str) -> str:
    return "chat.completion.chunk" if endpoint == "chat" else "text_completion"


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
