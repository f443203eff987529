"""The OpenAI-compatible endpoints: chat completions, completions, models.

Every request takes a lease at admission and keeps it to its last byte: a stream that
starts on generation N ends on generation N whatever goes live meanwhile. Each answer
names its generation in `system_fingerprint` and in the `x-hotweights-generation` header.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from hotweights.core import Lease
from hotweights.errors import HotweightsError, InvalidRequest, NotReady, UnknownModel
from hotweights.generation import BatchedModel, GenerationParams
from hotweights.server.errors import classify, error_body
from hotweights.server.schemas import ChatCompletionRequest, CompletionRequest
from hotweights.server.state import ServedModel, ServerState
from hotweights.server.steps import engine_steps, leased_steps
from hotweights.server.textgen import Finished, Prompt, Started, TextPiece, start_generation


def require_api_key(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> None:
    _state(request).check_api_key(authorization)


router = APIRouter(dependencies=[Depends(require_api_key)])
GENERATION_HEADER = "x-hotweights-generation"
_PIN = re.compile(r"(g?)([0-9]{1,18})", re.ASCII)  # model@N or model@gN
T = TypeVar("T")
CLIENT_CLOSED = 499  # the client went away mid-stream (nginx's convention)


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.hotweights
    return state


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, object]:
    state = _state(request)
    data = []
    for name, served in sorted(state.models.items()):
        live = served.reloader.live_version
        data.append(
            {
                "id": name,
                "object": "model",
                "created": served.created,
                "owned_by": "hotweights",
                "generation": live.generation if live else None,
                "fingerprint": live.system_fingerprint if live else None,
            }
        )
    return {"object": "list", "data": data}


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
    ]
    prompt = Prompt(messages=messages, text=None)
    return await _complete(request, body, prompt, "chat")


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    prompt = Prompt(messages=None, text=body.prompt_text())
    return await _complete(request, body, prompt, "completions")


async def _complete(
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    prompt: Prompt,
    endpoint: str,
) -> Response:
    state = _state(request)
    name, _, pin = body.model.partition("@")
    served = state.resolve(name)
    config = state.config
    default_max = config.default_max_tokens if endpoint == "chat" else 16
    max_tokens = min(body.requested_max_tokens() or default_max, config.max_tokens_limit)
    started_at = time.monotonic()
    try:
        params = GenerationParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            max_tokens=max_tokens,
            stop=body.stops(),
            seed=body.seed,
        )
        if state.stopping:
            raise NotReady("the server is shutting down")
        served.admit(config.max_pending)
        try:
            lease = await _admit(served, pin)
        except BaseException:
            served.done()
            raise
    except HotweightsError as exc:
        elapsed = time.monotonic() - started_at
        state.metrics.request(served.name, endpoint, 0, classify(exc)[0], elapsed)
        raise
    steps: AsyncGenerator[Any, None] | None = None
    owner = True
    try:
        steps = _generation(lease, prompt, params, state)
        started = await anext(steps)  # tokenising and limits fail here, before any byte
        if not isinstance(started, Started):
            raise TypeError(f"generation began with {started!r}")
        reply = _Reply(served, lease, endpoint, started.prompt_tokens, body.model)
        if body.stream:
            stream = reply.sse(steps, body.include_usage(), state, started_at)
            response: Response = LeasedStream(stream, steps, lease, served, reply.headers)
            owner = False  # the stream releases the lease when it ends
            return response
        collected = await _unless_disconnected(request, reply.collect(steps))
        if collected is None:  # nobody to answer; the worker stopped at its next token
            state.metrics.request(
                served.name,
                endpoint,
                lease.generation,
                CLIENT_CLOSED,
                time.monotonic() - started_at,
            )
            return Response(status_code=CLIENT_CLOSED)
        text, finished = collected
        state.metrics.generated(served.name, lease.generation, finished.completion_tokens)
        state.metrics.request(
            served.name, endpoint, lease.generation, 200, time.monotonic() - started_at
        )
        return JSONResponse(reply.complete(text, finished), headers=reply.headers)
    except HotweightsError as exc:
        state.metrics.request(
            served.name, endpoint, lease.generation, classify(exc)[0], time.monotonic() - started_at
        )
        raise
    finally:
        if owner:
            if steps is not None:
                await steps.aclose()
            lease.release()
            served.done()


def _generation(
    lease: Lease[Any], prompt: Prompt, params: GenerationParams, state: ServerState
) -> AsyncGenerator[Any, None]:
    """The request's items: from its version's engine, or its model's own loop."""
    model = lease.model
    limit = state.config.max_prompt_tokens
    if isinstance(model, BatchedModel) and model.engine is not None:
        return engine_steps(
            lease, model, model.engine, prompt, params, limit, state.executor, state.cut
        )
    return leased_steps(
        lease,
        lambda text_model: start_generation(text_model, prompt, params, limit),
        state.executor,
        state.cut,
    )


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None once the client has closed its connection (then `work` is
    cancelled, and awaited, so whatever it iterates can be closed after)."""
    working = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (watching, working):
            if not task.done():
                task.cancel()
        await asyncio.gather(watching, working, return_exceptions=True)
    if working.cancelled():
        return None
    return working.result()


async def _disconnect(request: Request) -> None:
    """Return when the client disconnects (the body has been read: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _admit(served: ServedModel, pin: str) -> Lease[Any]:
    """Lease the live version, or with `model@N` the resident version from directory `N`
    (`model@gN`: generation N), live or still draining."""
    if not pin:
        return await served.reloader.acquire_async()
    match = _PIN.fullmatch(pin)
    if match is not None and match.group(1):
        generation = int(match.group(2))
        lease = served.reloader.acquire_resident(lambda v: v.generation == generation)
    elif match is not None:
        number = str(int(match.group(2)))  # "007" names directory 7
        lease = served.reloader.acquire_resident(lambda v: Path(v.source).name == number)
    else:
        raise InvalidRequest(f"model@{pin}: a version is a directory number N or a generation gN")
    if lease is None:
        resident = ", ".join(
            f"{Path(v.source).name} (g{v.generation})" for v in served.reloader.resident()
        )
        raise UnknownModel(
            f"version {pin} of model {served.name!r} is not resident (live or draining); "
            f"resident: {resident or 'none'}"
        )
    return lease


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


class _Reply:
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
