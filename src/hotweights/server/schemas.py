"""Request bodies of the OpenAI-compatible and admin endpoints (pydantic models).

Nothing is accepted and ignored. Every field of OpenAI's chat and completions requests is
either acted on, accepted because it cannot change the answer (`user`, `metadata`, ...),
or refused with a 400 that names it when it asks for something hotweights does not do
(audio, predicted outputs, ...). A field OpenAI does not define is refused too. JSON
schemas (`response_format`, tool parameters) must be valid JSON Schema. The README's table
of request fields lists each and what the server does with it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hotweights.generation import MAX_LOGIT_BIAS, MAX_PENALTY, MAX_TOP_LOGPROBS
from hotweights.server.schema_check import check_json_schema

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


class CalledFunction(_Strict):
    name: str
    arguments: str


class AssistantToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(default=None, description="the call is always enforced")

    @field_validator("parameters")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_json_schema(value)
        return value


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = Field(default=None, description="the schema is always enforced")

    @field_validator("schema_")
    @classmethod
    def _schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_json_schema(value)
        return value


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, description="accepted; not shown to the model")
    tool_call_id: str | None = None
    refusal: str | None = None
    tool_calls: list[AssistantToolCall] | None = None

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
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema")
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = Field(default=None, description="read as tools")
    function_call: Literal["none", "auto"] | NamedFunction | None = Field(
        default=None, description="read as tool_choice"
    )
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

    @model_validator(mode="before")
    @classmethod
    def _functions_as_tools(cls, data: Any) -> Any:
        """`functions` and `function_call`, OpenAI's older spelling, read as tools."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        functions = data.pop("functions", None)
        choice = data.pop("function_call", None)
        if functions is not None:
            if data.get("tools") is not None:
                raise ValueError("functions: give tools or functions, not both")
            data["tools"] = [{"type": "function", "function": f} for f in functions]
        if isinstance(choice, dict):
            choice = {"type": "function", "function": choice}
        if choice is not None:
            if data.get("tool_choice") is not None:
                raise ValueError("function_call: give tool_choice or function_call, not both")
            data["tool_choice"] = choice
        return data

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, value: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        names = [tool.function.name for tool in value or ()]
        if len(set(names)) != len(names):
            raise ValueError("two functions have the same name")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_in_tools(cls, value: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        names = [tool.function.name for tool in info.data.get("tools") or ()]
        if value == "required" and not names:
            raise ValueError("required needs tools")
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise ValueError(f"names function {value.function.name!r}, which is not in tools")
        return value

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
    model: str | None = Field(default=None, description="the model; default: the only one")
    path: str | None = Field(default=None, description="model directory; default: the live one")
    description: str = Field(default="", max_length=1000)
    wait: bool = Field(default=True, description="false: answer 202 with the event id at once")


class RollbackRequest(_Request):
    model: str | None = Field(default=None, description="the model; default: the only one")
    description: str = Field(default="", max_length=1000)
    wait: bool = True


class LoadLoraAdapterRequest(_Request):
    """`POST /v1/load_lora_adapter`, as vLLM's clients send it."""

    lora_name: str = Field(max_length=200)
    lora_path: str = Field(max_length=4096)
    load_inplace: bool = Field(
        default=False,
        description="vLLM's flag to replace a loaded adapter's weights in place; accepted "
        "either way: a name already served always gets a new version beside the old one",
    )


class UnloadLoraAdapterRequest(_Request):
    """`POST /v1/unload_lora_adapter`."""

    lora_name: str = Field(max_length=200)
