"""Output constraints as token masks: compiled once per tokenizer and constraint, applied
to one sequence's logits at a time.

llguidance does the work (chosen by measuring; see bench/README.md): it compiles a JSON
Schema or a Lark grammar against a tokenizer in about a millisecond, and refuses, naming
them, the schema keywords it cannot enforce, so nothing is ever left unconstrained in
silence. `GrammarCache` keeps the compiled grammars of the last few tokenizers, keyed by a
digest of the tokenizer, so a reload that changes only weights finds them compiled and a
new tokenizer does not see another's. Each sequence gets its own `GrammarMatcher`, a copy
of the compiled one.

Thread-safety: `GrammarCache` may be used from any thread. A `GrammarMatcher` belongs to
its sequence, like the sequence itself: one thread at a time.
"""

from __future__ import annotations

import collections
import hashlib
import json
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hotweights.backends.tool_grammar import tool_call_lark
from hotweights.errors import InvalidRequest
from hotweights.generation import JsonOutput, OutputConstraint, ToolCallOutput

if TYPE_CHECKING:
    import llguidance
    import torch
    from transformers import PreTrainedTokenizerBase

COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How generated JSON is laid out: one space after `,` and `:`, no other whitespace, so a
model cannot spend its tokens on blanks."""
GRAMMARS_KEPT = 256
"""Compiled grammars the cache holds, the least recently used dropped first."""
TOKENIZERS_KEPT = 2
"""Tokenizers whose grammars the cache holds: the live version's and, during a swap, the
new one's. A third clears the oldest and its grammars."""


@dataclass(frozen=True)
class GrammarTokenizer:
    """A tokenizer as the grammar library sees it, with the digest that keys its grammars."""

    key: str
    """sha256 of the tokenizer's serialized form and eos ids."""
    size: int
    """Width of a logits row: the ids the tokenizer can produce."""
    library: llguidance.LLTokenizer


@dataclass(frozen=True)
class GrammarStats:
    """What the cache has done since the process started, for metrics."""

    compiles: int
    compile_seconds: float
    hits: int
    masks: int
    """Logits rows masked."""
    mask_seconds: float


class GrammarCache:
    """Compiled grammars by tokenizer digest and constraint; see the module docstring."""

    def __init__(self, grammars: int = GRAMMARS_KEPT, tokenizers: int = TOKENIZERS_KEPT) -> None:
        self._lock = threading.Lock()
        self._grammars: collections.OrderedDict[
            tuple[str, OutputConstraint], llguidance.LLMatcher
        ] = collections.OrderedDict()
        self._tokenizers: collections.OrderedDict[str, GrammarTokenizer] = collections.OrderedDict()
        self._grammar_limit = grammars
        self._tokenizer_limit = tokenizers
        self._compiles = self._hits = self._masks = 0
        self._compile_seconds = self._mask_seconds = 0.0

    def tokenizer(
        self, tokenizer: PreTrainedTokenizerBase, size: int, eos_ids: Collection[int]
    ) -> GrammarTokenizer:
        """`tokenizer` for the grammar library, built once per digest (about a second for a
        large vocabulary; the caller keeps the result)."""
        import llguidance.hf

        backend = tokenizer.backend_tokenizer  # fast tokenizers only, as llguidance needs
        eos = sorted(eos_ids)
        digest = hashlib.sha256(backend.to_str().encode())
        digest.update(json.dumps([size, eos]).encode())
        key = digest.hexdigest()
        with self._lock:
            known = self._tokenizers.get(key)
            if known is not None:
                self._tokenizers.move_to_end(key)
                return known
        fast: Any = tokenizer  # llguidance takes fast tokenizers, which every served one is
        library = llguidance.hf.from_tokenizer(fast, n_vocab=size, eos_token=eos)
        made = GrammarTokenizer(key, size, library)
        with self._lock:
            self._tokenizers[key] = made
            while len(self._tokenizers) > self._tokenizer_limit:
                old, _ = self._tokenizers.popitem(last=False)
                for entry in [k for k in self._grammars if k[0] == old]:
                    del self._grammars[entry]
        return made

    def matcher(self, tokenizer: GrammarTokenizer, constraint: OutputConstraint) -> GrammarMatcher:
        """A fresh matcher of `constraint` for one sequence, compiling it on first use.
        Raises `InvalidRequest` naming what the grammar cannot enforce."""
        return GrammarMatcher(self.compiled(tokenizer, constraint).deep_copy(), tokenizer, self)

    def compiled(
        self, tokenizer: GrammarTokenizer, constraint: OutputConstraint
    ) -> llguidance.LLMatcher:
        """The compiled matcher of `constraint`, in its start state (copy it to use it)."""
        import llguidance

        entry = (tokenizer.key, constraint)
        with self._lock:
            found = self._grammars.get(entry)
            if found is not None:
                self._grammars.move_to_end(entry)
                self._hits += 1
                return found
        began = time.perf_counter()
        grammar = _grammar_text(constraint, tokenizer.library)
        compiled = llguidance.LLMatcher(tokenizer.library, grammar, log_level=0)
        if compiled.is_error():
            raise InvalidRequest(_refusal(constraint, compiled.get_error()))
        seconds = time.perf_counter() - began
        with self._lock:
            self._compiles += 1
            self._compile_seconds += seconds
            self._grammars[entry] = compiled
            while len(self._grammars) > self._grammar_limit:
                self._grammars.popitem(last=False)
        return compiled

    def masked(self, seconds: float) -> None:
        """Count one masked row (called by matchers)."""
        with self._lock:
            self._masks += 1
            self._mask_seconds += seconds

    def stats(self) -> GrammarStats:
        with self._lock:
            return GrammarStats(
                self._compiles, self._compile_seconds, self._hits, self._masks, self._mask_seconds
            )


class GrammarMatcher:
    """One sequence's place in its grammar: which tokens may come next, and the tokens
    taken so far."""

    def __init__(
        self, matcher: llguidance.LLMatcher, tokenizer: GrammarTokenizer, cache: GrammarCache
    ) -> None:
        import torch

        self._matcher = matcher
        self._size = tokenizer.size
        self._cache = cache
        self._words = torch.zeros((tokenizer.size + 31) // 32, dtype=torch.int32)
        self._shifts = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """Which tokens may come next: a bool tensor (vocab,). Raises `RuntimeError` if the
        matcher is in error (it took a token its own mask ruled out)."""
        began = time.perf_counter()
        if self._matcher.is_error():
            raise RuntimeError(f"the grammar matcher failed: {self._matcher.get_error()}")
        # Written straight into the buffer (llguidance.torch would torch.compile at import).
        words = self._words
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        bits = (words[:, None] >> self._shifts) & 1  # (words, 32)
        allowed = bits.flatten()[: self._size].bool()  # (vocab,)
        self._cache.masked(time.perf_counter() - began)
        return allowed

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits (vocab,) of every token the grammar rules out to -inf, in place."""
        logits.masked_fill_(~self.allowed().to(logits.device), float("-inf"))

    def accept(self, token: int) -> None:
        """Advance past `token`, which the mask allowed; raises `RuntimeError` if the
        grammar refuses it."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self._matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """Whether nothing but an end of sequence may follow."""
        return self._matcher.is_stopped()


def grammar_masks(
    matchers: Sequence[GrammarMatcher | None], logits: torch.Tensor
) -> torch.Tensor | None:
    """What each row of `logits` (rows, vocab) may pick, (rows, vocab) bool, every token for
    a row without a matcher; None when no row has one."""
    if all(matcher is None for matcher in matchers):
        return None
    import torch

    allowed = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    for row, matcher in enumerate(matchers):
        if matcher is not None:
            allowed[row] = matcher.allowed().to(logits.device)
    return allowed


def _grammar_text(constraint: OutputConstraint, tokenizer: llguidance.LLTokenizer) -> str:
    import llguidance

    if isinstance(constraint, JsonOutput):
        try:
            schema = json.loads(constraint.schema)
        except ValueError as exc:
            raise InvalidRequest(f"the JSON schema is not JSON: {exc}") from exc
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=COMPACT_JSON)  # type: ignore[arg-type]
    return tool_call_lark(constraint, lambda marker: _marker(marker, tokenizer))


def _marker(text: str, tokenizer: llguidance.LLTokenizer) -> str:
    """A tool-call marker in Lark: the special token it is, when it is one, else its text."""
    ids = tokenizer.tokenize_str(text, parse_special=True)
    if len(ids) == 1 and tokenizer.is_special_token(ids[0]):
        return f"<[{ids[0]}]>"
    return json.dumps(text)


def _refusal(constraint: OutputConstraint, error: str) -> str:
    where = "tools" if isinstance(constraint, ToolCallOutput) else "response_format"
    first = error.strip().splitlines()[0] if error.strip() else "unknown error"
    return f"{where}: the schema cannot be enforced by the grammar: {first}"


SHARED_GRAMMARS = GrammarCache()
"""The process's compiled grammars, shared by every version (keyed by tokenizer digest)."""
