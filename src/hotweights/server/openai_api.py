"""The OpenAI-compatible endpoints: chat completions, completions, models.

Every request takes a lease at admission and keeps it to its last byte: a stream that
starts on generation N ends on generation N whatever goes live meanwhile. Each answer
names its generation in `system_fingerprint` and in the `x-hotweights-generation` header.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from hotweights.core import Lease
from hotweights.errors import HotweightsError, NotReady
from hotweights.generation import BatchedModel, GenerationParams
from hotweights.server.disconnect import unless_disconnected
from hotweights.server.error_responses import classify
from hotweights.server.pins import admit, requested_pin
from hotweights.server.replies import CLIENT_CLOSED, LeasedStream, Reply
from hotweights.server.schemas import ChatCompletionRequest, CompletionRequest
from hotweights.server.server_state import ServedModel, ServerState
from hotweights.server.steps import engine_steps, leased_choices
from hotweights.server.textgen import Began, Choice, Prompt


def require_api_key(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> None:
    _state(request).check_api_key(authorization)


router = APIRouter(dependencies=[Depends(require_api_key)])
log = logging.getLogger("hotweights.server")


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
    return await _complete(request, body, [Prompt(messages=messages)], "chat")


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> Response:
    prompts = [
        Prompt(text=prompt) if isinstance(prompt, str) else Prompt(ids=prompt)
        for prompt in body.prompts()
    ]
    return await _complete(request, body, prompts, "completions")


def _choices(
    body: ChatCompletionRequest | CompletionRequest, prompts: int, max_tokens: int
) -> list[Choice]:
    """`n` sequences per prompt, index `prompt * n + i`; with a seed, choice `i` of a
    prompt samples with `seed + i`, so the choices differ and each is reproducible."""
    if isinstance(body, ChatCompletionRequest):
        logprobs, prompt_logprobs = body.logprobs_count(), None
    else:
        logprobs = body.logprobs
        prompt_logprobs = body.logprobs if body.echo else None
    choices = []
    for prompt in range(prompts):
        for i in range(body.n):
            params = GenerationParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                max_tokens=max_tokens,
                stop=body.stops(),
                seed=None if body.seed is None else body.seed + i,
                presence_penalty=body.presence_penalty or 0.0,
                frequency_penalty=body.frequency_penalty or 0.0,
                logit_bias=body.bias(),
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
            )
            choices.append(Choice(prompt, params))
    return choices


async def _complete(
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    prompts: list[Prompt],
    endpoint: str,
) -> Response:
    state = _state(request)
    name, pin = requested_pin(body.model, request.scope)
    served = state.resolve(name)
    config = state.config
    default_max = config.default_max_tokens if endpoint == "chat" else 16
    requested = body.requested_max_tokens()
    max_tokens = min(default_max if requested is None else requested, config.max_tokens_limit)
    started_at = time.monotonic()
    try:
        choices = _choices(body, len(prompts), max_tokens)
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
        state.finished(served, endpoint, 0, classify(exc)[0], elapsed)
        raise
    owner = True
    try:
        try:
            response, owner = await _respond(
                request, body, prompts, choices, endpoint, served, lease, state, started_at
            )
        except Exception as exc:
            if pin or not _on_canary(served, lease) or _client_error(exc):
                raise
            # The canary failed before the first byte: count it against the canary and
            # answer from the stable version (a bad canary costs latency, not failures).
            failed_on = lease.generation
            served.reloader.record(failed_on, ok=False, seconds=time.monotonic() - started_at)
            state.metrics.retried(served.name, failed_on)
            log.info(
                "%s: canary g%d failed a request (%r); answering from stable", name, failed_on, exc
            )
            lease.release()
            lease = await served.reloader.acquire_async(stable=True)
            response, owner = await _respond(
                request, body, prompts, choices, endpoint, served, lease, state, started_at
            )
        return response
    except Exception as exc:
        status = classify(exc)[0] if isinstance(exc, HotweightsError) else 500
        state.finished(served, endpoint, lease.generation, status, time.monotonic() - started_at)
        raise
    finally:
        if owner:
            lease.release()
            served.done()


def _on_canary(served: ServedModel, lease: Lease[Any]) -> bool:
    """Whether an unpinned request's lease is on a canary (baking, or just rolled back):
    the only way such a request gets a version newer than the live one."""
    live = served.reloader.live_version
    return live is not None and lease.generation > live.generation


def _client_error(exc: Exception) -> bool:
    """An error the request itself caused (retrying it elsewhere would change nothing)."""
    return isinstance(exc, HotweightsError) and classify(exc)[0] < 500


async def _respond(
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    prompts: list[Prompt],
    choices: list[Choice],
    endpoint: str,
    served: ServedModel,
    lease: Lease[Any],
    state: ServerState,
    started_at: float,
) -> tuple[Response, bool]:
    """Generate on `lease` and answer; raises what failed before the first byte. Returns
    the response and whether the caller still owns the lease (a stream takes it over and
    releases it, and the model's pending count, when it ends)."""
    steps = _generation(lease, prompts, choices, state)
    handed_over = False
    try:
        began = await anext(steps)  # tokenising and limits fail here, before any byte
        if not isinstance(began, Began):
            raise TypeError(f"generation began with {began!r}")
        echo = isinstance(body, CompletionRequest) and body.echo
        asked = choices[0].params.logprobs is not None
        reply = Reply(
            served, lease, endpoint, began, choices, body.model, echo=echo, logprobs=asked
        )
        if body.stream:
            stream = reply.sse(steps, body.include_usage(), state, started_at)
            response = LeasedStream(stream, steps, lease, served, reply.headers)
            handed_over = True  # the stream closes the steps
            return response, False
        collected = await unless_disconnected(request, reply.collect(steps))
        seconds = time.monotonic() - started_at
        if collected is None:  # nobody to answer; the worker stopped at its next token
            state.finished(served, endpoint, lease.generation, CLIENT_CLOSED, seconds)
            return Response(status_code=CLIENT_CLOSED), True
        generated = sum(answer.completion_tokens for answer in collected)
        state.metrics.generated(served.name, lease.generation, generated)
        state.finished(served, endpoint, lease.generation, 200, seconds, generated)
        return JSONResponse(reply.complete(collected), headers=reply.headers), True
    finally:
        if not handed_over:
            await steps.aclose()


def _generation(
    lease: Lease[Any], prompts: list[Prompt], choices: list[Choice], state: ServerState
) -> AsyncGenerator[Any, None]:
    """The request's items: from its version's engine, or its model's own loop."""
    model = lease.model
    limit = state.config.max_prompt_tokens
    if isinstance(model, BatchedModel) and model.engine is not None:
        return engine_steps(
            lease, model, model.engine, prompts, choices, limit, state.executor, state.cut
        )
    return leased_choices(lease, prompts, choices, limit, state.executor, state.cut)
