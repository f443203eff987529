"""The OpenAI-compatible endpoints: chat completions, completions, models.

Every request takes a lease at admission and keeps it to its last byte: a stream that
starts on generation N ends on generation N whatever goes live meanwhile. Each answer
names its generation in `system_fingerprint` and in the `x-hotweights-generation` header.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from hotweights.generation import GenerationParams
from hotweights.server.adapters import adapter_entry
from hotweights.server.admission import CLIENT_CLOSED, Admission
from hotweights.server.disconnect import unless_disconnected
from hotweights.server.pins import pinned_version, requested_pin
from hotweights.server.replies import AdmittedStream, Reply
from hotweights.server.schemas import ChatCompletionRequest, CompletionRequest
from hotweights.server.server_state import ServerState
from hotweights.server.steps import engine_steps
from hotweights.server.structured_output import offers_tools, output_constraint, tool_format_of
from hotweights.server.textgen import Began, Choice, Prompt


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
    """Each model with its live generation, or, for a request its caller pinned to a
    generation (a fleet replica answering with the generation its ingress stamped: the
    fleet's committed one, before every replica has finished), that generation."""
    state = _state(request)
    data = []
    _, pin = requested_pin("", request.scope)
    for name, served in sorted(state.models.items()):
        live = pinned_version(served, pin) or served.reloader.live_version
        entry: dict[str, object] = {
            "id": name,
            "object": "model",
            "created": served.created,
            "owned_by": "hotweights",
            "generation": live.generation if live else None,
            "fingerprint": live.system_fingerprint if live else None,
        }
        if served.adapter:
            entry.update(adapter_entry(served, live))
        data.append(entry)
    return {"object": "list", "data": data}


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    messages: list[dict[str, Any]] = []
    for m in body.messages:
        message: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.text(),
        }
        if m.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or ()]
    prompt = Prompt(messages=messages, tools=tools if offers_tools(body) else None)
    return await _complete(request, body, [prompt], "chat")


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
    admission = Admission(state, served, endpoint)
    try:
        choices = _choices(body, len(prompts), max_tokens)
        await admission.admit(pin)
        try:
            return await _respond(request, body, prompts, choices, admission)
        except Exception as exc:
            if not await admission.retry_on_stable(exc):
                raise
            return await _respond(request, body, prompts, choices, admission)
    except BaseException as exc:
        admission.fail(exc)
        raise


async def _respond(
    request: Request,
    body: ChatCompletionRequest | CompletionRequest,
    prompts: list[Prompt],
    choices: list[Choice],
    admission: Admission,
) -> Response:
    """Generate on the admission's lease and answer; raises what failed before the first
    byte. A JSON answer finishes the admission here; a stream finishes it when it ends."""
    state = admission.state
    tool_format = None
    if isinstance(body, ChatCompletionRequest):
        tool_format = tool_format_of(body, admission.lease.model, state.config.tool_parser)
        constraint = output_constraint(body, tool_format)
        if constraint is not None:
            choices = [
                Choice(c.prompt, dataclasses.replace(c.params, constraint=constraint))
                for c in choices
            ]
    steps = engine_steps(
        admission.lease, prompts, choices, state.config.max_prompt_tokens, state.executor, state.cut
    )
    handed_over = False
    try:
        began = await anext(steps)  # tokenising and limits fail here, before any byte
        if not isinstance(began, Began):
            raise TypeError(f"generation began with {began!r}")
        echo = isinstance(body, CompletionRequest) and body.echo
        asked = choices[0].params.logprobs is not None
        reply = Reply(
            admission, began, choices, body.model, echo=echo, logprobs=asked, tools=tool_format
        )
        if body.stream:
            stream = reply.sse(steps, body.include_usage(), admission)
            handed_over = True  # the stream closes the steps and finishes the admission
            return AdmittedStream(stream, steps, admission, reply.headers)
        collected = await unless_disconnected(request, reply.collect(steps))
    finally:
        if not handed_over:
            await steps.aclose()
    if collected is None:  # nobody to answer; the engine dropped the request's sequences
        admission.finish(CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)
    generated = sum(answer.completion_tokens for answer in collected)
    state.metrics.generated(admission.served.name, admission.generation, generated)
    admission.finish(200, generated)
    return JSONResponse(reply.complete(collected), headers=reply.headers)
