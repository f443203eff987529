"""The OpenAI-compatible endpoints: chat completions, completions, models.

Every request takes a lease at admission and keeps it to its last byte: a stream that
starts on generation N ends on generation N whatever goes live meanwhile. Each answer
names its generation in `system_fingerprint` and in the `x-hotweights-generation` header.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from hotweights.core import Lease
from hotweights.errors import HotweightsError, NotReady
from hotweights.generation import BatchedModel, GenerationParams
from hotweights.server.disconnect import unless_disconnected
from hotweights.server.errors import classify
from hotweights.server.pins import admit
from hotweights.server.replies import CLIENT_CLOSED, LeasedStream, Reply
from hotweights.server.schemas import ChatCompletionRequest, CompletionRequest
from hotweights.server.state import ServerState
from hotweights.server.steps import engine_steps, leased_steps
from hotweights.server.textgen import Prompt, Started, start_generation


def require_api_key(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> None:
    _state(request).check_api_key(authorization)


router = APIRouter(dependencies=[Depends(require_api_key)])


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
            lease = await admit(served, pin)
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
        reply = Reply(served, lease, endpoint, started.prompt_tokens, body.model)
        if body.stream:
            stream = reply.sse(steps, body.include_usage(), state, started_at)
            response: Response = LeasedStream(stream, steps, lease, served, reply.headers)
            owner = False  # the stream releases the lease when it ends
            return response
        collected = await unless_disconnected(request, reply.collect(steps))
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
