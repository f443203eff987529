"""A loaded causal language model and its tokenizer, ready to generate text.

`LoadedLM` is what `TransformersLoader.load` returns and what the server's leases hand
out. The server generates through its `engine`, which the loader's warmup starts: the
batched engine (every request of the version stepped together) or, for a model that engine
cannot run, the per-request engine, which runs `stream` for each sequence (a decode loop:
one forward pass per token, under `torch.inference_mode()`, stepped from any thread and
stopped between any two tokens).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hotweights.backends.chat_template import detect_tool_format, render_with_tools
from hotweights.backends.grammar import (
    SHARED_GRAMMARS,
    GrammarCache,
    GrammarMatcher,
    GrammarTokenizer,
)
from hotweights.backends.per_request import UNBOUNDED_COLUMNS, PerRequestEngine
from hotweights.backends.sequence import TokenSequence
from hotweights.errors import InvalidRequest, ModelRetired
from hotweights.generation import (
    Completion,
    Engine,
    FinishReason,
    GenerationParams,
    OutputConstraint,
    TokenChunk,
    ToolCallFormat,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def fallback_chat_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """A plain prompt for tokenizers without a chat template: one `role: content` line
    per message, then an open `assistant:` turn."""
    lines = [f"{message['role']}: {message['content']}" for message in messages]
    return "\n".join([*lines, "assistant:"])


class LoadedLM:
    """A causal LM with its tokenizer, on one device, until it is unloaded.

    Thread-safety: any number of threads may run `stream`, `generate`, `count_tokens`
    and `apply_chat_template` at once. Each stream keeps its own KV cache and random
    numbers; the weights are only read; tokenizer calls are serialised by a lock
    (fast tokenizers can refuse concurrent use). Once `release` has run (the loader's
    `unload`), every method that needs the model raises `ModelRetired`, including a
    stream already in progress, at its next token. A stream in progress holds its KV
    cache, never the model, so unloading frees the weights even before it is closed.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        source: str,
        device: str,
        dtype: str,
        fingerprint: str,
        grammars: GrammarCache | None = None,
    ) -> None:
        config = model.config
        architectures = getattr(config, "architectures", None) or [type(model).__name__]
        self.source = source
        self.device = device
        self.dtype = dtype
        """Weight dtype: `float32`, `bfloat16` or `float16`."""
        self.fingerprint = fingerprint
        self.architecture: str = architectures[0]
        """The model class, e.g. `Qwen3ForCausalLM` (`config.architectures[0]`)."""
        self.model_type: str = getattr(config, "model_type", "") or ""
        embedding: Any = model.get_input_embeddings()
        self.vocab_size: int = int(embedding.weight.shape[0])
        """Rows of the input embedding: the ids the model can read."""
        self.tokenizer_size: int = len(tokenizer)
        """Ids the tokenizer can produce, special tokens included."""
        positions = getattr(config, "max_position_embeddings", None)
        self.max_positions: int | None = positions if isinstance(positions, int) else None
        self.eos_ids = _eos_ids(model, tokenizer)
        """Every id that ends a completion."""
        parameters = inspect.signature(model.forward).parameters
        # transformers 5 renamed `past_key_values` to `cache` (the old name warns).
        self.cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self._trim_logits = "logits_to_keep" in parameters
        self._model: PreTrainedModel | None = model
        self._tokenizer: PreTrainedTokenizerBase | None = tokenizer
        self._tokenizer_lock = threading.Lock()
        self._token_texts: dict[int, str] = {}
        self.engine: Engine | None = None
        """The engine the loader started at warmup: batched, or per-request (see
        `per_request_engine`); None before warmup and after `release`."""
        self.engine_note = "not started"
        """How `engine` generates: `batched (...)`, or `per-request (why)`."""
        self.tool_format: ToolCallFormat | None = detect_tool_format(
            getattr(tokenizer, "chat_template", None)
        )
        """The tool-call format the chat template writes (`ToolPrompting`)."""
        self._grammars = grammars or SHARED_GRAMMARS
        self._grammar_tokenizer: GrammarTokenizer | None = None

    @property
    def unloaded(self) -> bool:
        return self._model is None

    @property
    def model(self) -> PreTrainedModel:
        """The transformers model; raises `ModelRetired` once unloaded."""
        if self._model is None:
            raise self.retired()
        return self._model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer; raises `ModelRetired` once unloaded."""
        if self._tokenizer is None:
            raise self.retired()
        return self._tokenizer

    def release(self) -> None:
        """Stop the engine (what still runs on it ends with `ModelRetired`), then drop the
        model and tokenizer. Idempotent; called by the loader's `unload`."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.stop()
        self._model = None
        self._tokenizer = None

    def per_request_engine(self, workers: int) -> PerRequestEngine:
        """An engine that runs each sequence through `stream`, up to `workers` at once:
        the loaders' fallback when the batched engine cannot run this model."""
        return PerRequestEngine(
            self,
            columns=self.max_positions or UNBOUNDED_COLUMNS,
            workers=workers,
            name=f"{self.architecture} from {self.source}",
        )

    def retired(self) -> ModelRetired:
        """The error for work on this model once it was unloaded."""
        return ModelRetired(f"{self.architecture} from {self.source} was unloaded")

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt for `messages` (`role`, `content`), with the assistant turn opened.

        Raises `InvalidRequest` when the template refuses the messages (many templates
        insist that roles alternate)."""
        from jinja2 import TemplateError

        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            return fallback_chat_prompt(messages)
        try:
            with self._tokenizer_lock:
                prompt = tokenizer.apply_chat_template(
                    [dict(m) for m in messages], tokenize=False, add_generation_prompt=True
                )
        except TemplateError as exc:
            raise InvalidRequest(f"the chat template refused these messages: {exc}") from exc
        if not isinstance(prompt, str):
            raise InvalidRequest("the chat template did not render to text")
        return prompt

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> str:
        """The prompt of OpenAI-shaped `messages` and `tools` (`ToolPrompting`); raises
        `InvalidRequest` when the template refuses them or renders no tools."""
        tokenizer = self.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise InvalidRequest("this model has no chat template to render tools with")
        with self._tokenizer_lock:
            return render_with_tools(tokenizer, messages, tools)

    def check_constraint(self, constraint: OutputConstraint) -> None:
        """Compile `constraint` for this tokenizer (cached); raises `InvalidRequest` naming
        what cannot be enforced (`ConstraintChecking`)."""
        self._grammars.compiled(self._grammar_vocabulary(), constraint)

    def grammar_matcher(self, constraint: OutputConstraint) -> GrammarMatcher:
        """A fresh matcher of `constraint` for one sequence (the `Vocabulary` hook)."""
        return self._grammars.matcher(self._grammar_vocabulary(), constraint)

    def _grammar_vocabulary(self) -> GrammarTokenizer:
        if self._grammar_tokenizer is None:
            tokenizer = self.tokenizer
            with self._tokenizer_lock:
                made = self._grammars.tokenizer(tokenizer, self.tokenizer_size, self.eos_ids)
            self._grammar_tokenizer = made
        return self._grammar_tokenizer

    def encode(self, text: str) -> list[int]:
        """Token ids for `text` as a prompt. Special tokens (a BOS) are added unless the
        text already starts with the BOS token, as a rendered chat template usually does."""
        tokenizer = self.tokenizer
        bos = getattr(tokenizer, "bos_token", None)
        add_special = not (isinstance(bos, str) and bos and text.startswith(bos))
        with self._tokenizer_lock:
            ids = tokenizer.encode(text, add_special_tokens=add_special)
        return [int(token) for token in ids]

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` is as a prompt (as `stream` encodes it)."""
        return len(self.encode(text))

    def stream(self, prompt: str | Sequence[int], params: GenerationParams) -> Iterator[TokenChunk]:
        """Generate from `prompt` (text, or token ids), yielding text pieces as they are
        decoded.

        Encodes the prompt now: raises `ModelRetired` if unloaded and `InvalidRequest` if
        the prompt is empty or too long for the model, or `params` name a token it does
        not have. The returned iterator raises `ModelRetired` at the next token if the
        model is unloaded meanwhile. The last chunk carries the finish reason. Text never
        contains a stop string or anything after it, and never a partial UTF-8 character
        before the end.
        """
        prompt_ids = self.prompt_ids(prompt)
        limit = params.max_tokens
        if self.max_positions is not None:
            limit = min(limit, self.max_positions - len(prompt_ids))
        return self._run(TokenSequence(self, prompt_ids, params, limit))

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """`prompt` encoded (or, given as token ids, checked); raises `InvalidRequest` if it
        is empty, names an id the model cannot read, or is too long for its positions."""
        if isinstance(prompt, str):
            prompt_ids = self.encode(prompt)
        else:
            prompt_ids = [int(token) for token in prompt]
            outside = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
            if outside:
                raise InvalidRequest(
                    f"the prompt has token id {outside[0]}; this model reads ids 0 to "
                    f"{self.vocab_size - 1}"
                )
        if not prompt_ids:
            raise InvalidRequest("the prompt is empty: it encodes to no tokens")
        if self.max_positions is not None and len(prompt_ids) >= self.max_positions:
            raise InvalidRequest(
                f"the prompt is {len(prompt_ids)} tokens; {self.architecture} from "
                f"{self.source} reads at most {self.max_positions} positions"
            )
        return prompt_ids

    def generate(self, prompt: str, params: GenerationParams) -> Completion:
        """The whole completion of `prompt`: `stream` collected. Raises as `stream` does."""
        pieces: list[str] = []
        finish: FinishReason = "length"
        counts = (0, 0)
        for chunk in self.stream(prompt, params):
            pieces.append(chunk.text)
            finish = chunk.finish_reason or finish
            counts = (chunk.prompt_tokens, chunk.completion_tokens)
        return Completion("".join(pieces), finish, *counts)

    def _run(self, sequence: TokenSequence) -> Iterator[TokenChunk]:
        cache: Any = None
        step_ids = sequence.prompt_ids
        every_position = sequence.scores_prompt
        while True:
            logits, cache = self._step(step_ids, cache, every_position)
            if every_position:
                sequence.score(logits[:-1])
                every_position = False
            if sequence.limit <= 0:
                yield sequence.end_scored()
                return
            token = sequence.choose(logits[-1])
            chunk = sequence.advance(token)
            if chunk is not None:
                yield chunk
            if sequence.finished:
                return
            step_ids = [token]

    def _step(self, ids: list[int], cache: Any, every_position: bool) -> tuple[torch.Tensor, Any]:
        """One forward pass over `ids` after `cache`: the logits of the last position (or
        with `every_position` of each), (positions, tokenizer vocab) float32, and the cache.

        Reads the model afresh so a suspended stream never keeps an unloaded model alive.
        """
        import torch

        model = self.model
        with torch.inference_mode():
            inputs = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, n)
            kwargs: dict[str, Any] = {"use_cache": True, self.cache_arg: cache}
            if self._trim_logits and not every_position:
                kwargs["logits_to_keep"] = 1
            output = model(input_ids=inputs, **kwargs)
            last = slice(None) if every_position else slice(-1, None)
            logits = output.logits[0, last, : self.tokenizer_size].float()
            return logits, getattr(output, self.cache_arg)

    def token_text(self, token_id: int) -> str:
        """One token decoded alone, special tokens included; cached. Thread-safe."""
        text = self._token_texts.get(token_id)
        if text is None:
            tokenizer = self.tokenizer
            with self._tokenizer_lock:
                text = str(tokenizer.decode([token_id], skip_special_tokens=False))
            self._token_texts[token_id] = text
        return text

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens skipped. Thread-safe."""
        tokenizer = self.tokenizer
        with self._tokenizer_lock:
            text = tokenizer.decode(
                list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        return str(text)


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Every id that ends a completion: the generation config's, the config's and the
    tokenizer's eos tokens."""
    found: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (
        getattr(generation_config, "eos_token_id", None),
        getattr(model.config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            found.add(value)
        elif isinstance(value, list | tuple):
            found.update(item for item in value if isinstance(item, int))
    return frozenset(found)
