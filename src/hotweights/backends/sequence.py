"""One completion's state, token by token: what both the batched engine and the
per-request loop do with a position's logits.

`TokenSequence` picks each token (penalties and logit_bias, then greedy or sampled with the
request's own random numbers), records log-probabilities when asked, decodes text safely and
cuts at stop strings, and says when the completion is over. A request's output constraint
(`params.constraint`) masks the logits it samples from, through the sequence's own
`GrammarMatcher` (`constraint`). Whoever runs the forward
passes owns the cache and feeds it logits; the sequence never touches the model. Not
thread-safe: one sequence belongs to one thread at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from hotweights.backends.decoding import IncrementalDecoder, StopMatcher
from hotweights.backends.sampling import (
    adjust_logits,
    random_numbers,
    sample_next_token,
    top_tokens,
)
from hotweights.errors import InvalidRequest
from hotweights.generation import (
    FinishReason,
    GenerationParams,
    OutputConstraint,
    TokenChunk,
    TokenLogprob,
)

if TYPE_CHECKING:
    import torch

    from hotweights.backends.grammar import GrammarMatcher


class Vocabulary(Protocol):
    """What a sequence needs of its model's tokenizer."""

    eos_ids: frozenset[int]
    tokenizer_size: int

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_text(self, token_id: int) -> str: ...

    def grammar_matcher(self, constraint: OutputConstraint) -> GrammarMatcher:
        """A fresh matcher of `constraint`; raises `InvalidRequest` when it cannot be
        enforced."""
        ...


class TokenSequence:
    """The completion of `prompt_ids` under `params`, at most `limit` tokens.

    Raises `InvalidRequest` when `logit_bias` names an id the tokenizer cannot produce, or
    the output constraint cannot be enforced.

    The grammar hook, for whoever samples: a sequence with a `constraint` needs its logits.
    Its row is masked to `constraint.allowed()` after penalties and logit_bias, before
    sampling or argmax (log-probabilities stay the raw ones): `choose` does so itself, a
    batched engine in its own pass. The chosen token then goes to `accept` on the same
    thread, before the next mask; when that returns True the sequence is over, and
    `advance` ends it with `stop` at that token.
    """

    def __init__(
        self, vocabulary: Vocabulary, prompt_ids: list[int], params: GenerationParams, limit: int
    ) -> None:
        outside = [t for t in params.logit_bias if t >= vocabulary.tokenizer_size]
        if outside:
            raise InvalidRequest(
                f"logit_bias names token id {outside[0]}; this model's tokens are 0 to "
                f"{vocabulary.tokenizer_size - 1}"
            )
        self.prompt_ids = prompt_ids
        self.params = params
        self.limit = limit
        self.produced = 0
        self.finished = False
        self._vocabulary = vocabulary
        self.numbers = None if params.greedy else random_numbers(params.seed)
        """The request's own uniform numbers, one per sampled token."""
        self._decoder = IncrementalDecoder(vocabulary.decode)
        self._stops = StopMatcher(params.stop)
        self._generated: dict[int, int] = {}
        self._entries: list[TokenLogprob] = []
        self._prompt_entries: tuple[TokenLogprob, ...] | None = None
        self.constraint: GrammarMatcher | None = None
        """The grammar this sequence's tokens must follow; None leaves them free."""
        if params.constraint is not None:
            self.constraint = vocabulary.grammar_matcher(params.constraint)
        self._accepted = 0
        self.grammar_end: int | None = None
        """The count of tokens after which the grammar was complete; set once, by
        `accept`, before that token is handed to `advance` (which may run on another
        thread and never touches the matcher)."""
        self.plain_greedy = params.greedy and not params.adjusts_logits and self.constraint is None
        """Greedy on the raw logits: a batch's shared argmax is this sequence's token."""
        self.needs_logits = not self.plain_greedy or params.logprobs is not None
        """Whether `choose` reads the logits, or only the shared argmax."""

    @property
    def scores_prompt(self) -> bool:
        """Whether the prompt's own logits are wanted (all positions, not just the last)."""
        return self.params.prompt_logprobs is not None

    def score(self, logits: torch.Tensor) -> None:
        """Record the prompt's log-probabilities from `logits` (len(prompt) - 1, vocab): the
        logits at each prompt position but the last, each predicting the next token."""
        import torch

        ids = self.prompt_ids
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (prompt - 1, vocab)
        targets = torch.tensor(ids[1:], dtype=torch.long, device=logits.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()  # (prompt - 1,)
        tops = top_tokens(logprobs, self.params.prompt_logprobs or 0)
        text = self._vocabulary.token_text
        entries = [TokenLogprob(ids[0], text(ids[0]), None)]
        for token, value, top in zip(ids[1:], chosen, tops, strict=True):
            entries.append(TokenLogprob(token, text(token), value, self._named(top)))
        self._prompt_entries = tuple(entries)

    def choose(self, logits: torch.Tensor | None, greedy: int | None = None) -> int:
        """The next token from `logits` (vocab,), float32; `greedy` is the raw argmax if the
        caller already has it, and then `logits` may be None unless `needs_logits`.
        Records the token's log-probability when asked."""
        if not self.needs_logits and greedy is not None:  # the hot path: plain greedy
            self._generated[greedy] = self._generated.get(greedy, 0) + 1
            return greedy
        if logits is None:
            raise ValueError("this sequence needs its logits to choose a token")
        import torch

        params = self.params
        picked = logits
        if params.adjusts_logits:
            picked = adjust_logits(logits, params, self._generated)
        if self.constraint is not None:
            picked = picked.clone() if picked is logits else picked
            self.constraint.mask(picked)
        if self.numbers is None:
            token = greedy if greedy is not None and self.plain_greedy else None
            if token is None:
                token = int(torch.argmax(picked).item())
        else:
            token = sample_next_token(picked, params, self.numbers)
        if params.logprobs is not None:
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (vocab,)
            top = top_tokens(logprobs[None, :], params.logprobs)[0]
            self.record(token, float(logprobs[token].item()), top)
        self._generated[token] = self._generated.get(token, 0) + 1
        self.accept(token)
        return token

    def accept(self, token: int) -> bool:
        """Feed `token`, just chosen, to the grammar, on the thread that chose it (before
        the next mask); True when the grammar is complete, so the sequence ends here. A
        sequence without a constraint accepts anything and never completes this way."""
        if self.constraint is None:
            return False
        self.constraint.accept(token)
        self._accepted += 1
        if self.constraint.complete:
            self.grammar_end = self._accepted
        return self.grammar_end is not None

    def record(self, token: int, logprob: float, top: list[tuple[int, float]]) -> None:
        """Keep `token`'s log-probability and its position's most likely tokens for the
        next chunk (for an engine that chose the token itself)."""
        entry = TokenLogprob(token, self._vocabulary.token_text(token), logprob, self._named(top))
        self._entries.append(entry)

    def advance(self, token: int) -> TokenChunk | None:
        """Account for `token`, just chosen: the chunk to send now, if any. Sets `finished`
        when this was the last token; the chunk returned then is the last one."""
        self.produced += 1
        finish: FinishReason | None = None
        text = ""
        if token in self._vocabulary.eos_ids:
            finish = "stop"
        else:
            text, stopped = self._stops.feed(self._decoder.push(token))
            if stopped or (self.grammar_end is not None and self.produced >= self.grammar_end):
                finish = "stop"
            elif self.produced >= self.limit:
                finish = "length"
        if finish is None:
            return self._chunk(text, None)
        if not self._stops.stopped:
            tail, stopped = self._stops.feed(self._decoder.flush())
            text += tail if stopped else tail + self._stops.flush()
            finish = "stop" if stopped else finish
        self.finished = True
        return self._chunk(text, finish)

    def end_scored(self) -> TokenChunk:
        """The only chunk of a sequence that generates nothing (`limit` 0): the prompt's
        log-probabilities, finish reason `length`."""
        self.finished = True
        prompt, self._prompt_entries = self._prompt_entries, None
        return TokenChunk("", len(self.prompt_ids), 0, "length", prompt_logprobs=prompt)

    def _chunk(self, text: str, finish: FinishReason | None) -> TokenChunk | None:
        prompt, self._prompt_entries = self._prompt_entries, None
        entries = tuple(self._entries)
        if finish is None and not text and not entries and prompt is None:
            return None
        self._entries.clear()
        return TokenChunk(
            text, len(self.prompt_ids), self.produced, finish, entries, prompt_logprobs=prompt
        )

    def _named(self, top: list[tuple[int, float]]) -> tuple[tuple[str, float], ...]:
        text = self._vocabulary.token_text
        return tuple((text(token), value) for token, value in top)
