"""Request bodies of the OpenAI-compatible and admin endpoints (pydantic models).

Nothing is accepted and ignored. Every field of OpenAI's chat and completions requests is
either acted on, accepted because it cannot change the answer (`user`, `metadata`, ...),
or refused with a 400 that names it when it asks for something hotweights does not do
(`tools`, `response_format` JSON, audio, ...). A field OpenAI does not define is refused
too. The README's table of request fields lists each and what the server does with it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hotweights.generation import MAX_LOGIT_BIAS, MAX_PENALTY, MAX_TOP_LOGPROBS

MAX_N = 16
"""Most choices (`n`) one request asks for."""
MAX_CHOICES = 64
"""Most sequences one request generates: prompts times `n`."""
MAX_PROMPTS = 64
"""Most prompts in one `/v1/completions` request."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _refuse(field: str, what: str) -> ValueError:
    return ValueError(f"{field}: {what} is not supported by this server")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, description="accepted; not shown to the model")
    tool_call_id: str | None = Field(default=None, description="accepted; not shown to the model")
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise _refuse("tool_calls", "tool calling")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = Field(
        default=None, description="accepted; no obfuscation field is sent"
    )


class _Sampling(_Strict):
    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float | None = Field(default=None, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(default=None, description="accepted; not used")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not stop for stop in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isascii() or not key.isdigit() or len(key) > 18:
                raise ValueError(f"keys are token ids (digits), got {key!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"biases are between -100 and 100, got {bias} for {key}")
        return value

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def bias(self) -> dict[int, float]:
        return {int(key): value for key, value in (self.logit_bias or {}).items()}


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = Field(
        default=None, description="accepted; no effect, since tools are refused"
    )
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = Field(default=None, description="accepted; not used")
    store: bool | None = Field(default=None, description="accepted; nothing is stored")
    service_tier: str | None = Field(default=None, description="accepted; one tier")
    prompt_cache_key: str | None = Field(default=None, description="accepted; not used")
    safety_identifier: str | None = Field(default=None, description="accepted; not used")

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: ResponseFormat | None) -> ResponseFormat | None:
        if value is not None and value.type != "text":
            raise _refuse("response_format", f"type {value.type!r} (constrained decoding)")
        return value

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value:
            raise _refuse("tools", "tool calling")
        return value

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if value is not None and value != "none":
            raise _refuse("tool_choice", "tool calling")
        return value

    @field_validator("modalities")
    @classmethod
    def _text_modality(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and set(value) - {"text"}:
            raise _refuse("modalities", "output other than text")
        return value

    @field_validator("audio", "prediction", "web_search_options")
    @classmethod
    def _unsupported(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            raise ValueError("not supported by this server")
        return value

    @field_validator("reasoning_effort", "verbosity")
    @classmethod
    def _unsupported_level(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("not supported by this server")
        return value

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_count(self) -> int | None:
        """Alternatives per generated token, or None when no logprobs are asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Sampling):
    prompt: PromptInput
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: PromptInput) -> PromptInput:
        if isinstance(value, list):
            if not value:
                raise ValueError("no prompt: the list is empty")
            if len(value) > MAX_PROMPTS and not isinstance(value[0], int):
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            if any(isinstance(item, list) and not item for item in value):
                raise ValueError("a token-id prompt is empty")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise _refuse("suffix", "insertion (a suffix)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported by this server")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it needs echo: true")
        if len(self.prompts()) * self.n > MAX_CHOICES:
            raise ValueError(f"prompts times n is at most {MAX_CHOICES}")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts: texts or token-id lists."""
        value = self.prompt
        if isinstance(value, str):
            return [value]
        if all(isinstance(item, int) for item in value):
            return [[int(item) for item in value]]  # type: ignore[arg-type]
        return [item for item in value if isinstance(item, str | list)]

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class ReloadRequest(_Request):
    path: str | None = Field(default=None, description="model directory; default: the live one")
    description: str = Field(default="", max_length=1000)
    wait: bool = Field(default=True, description="false: answer 202 with the event id at once")


class RollbackRequest(_Request):
    description: str = Field(default="", max_length=1000)
    wait: bool = True
