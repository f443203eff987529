"""The batched engine of one version: every request on it is stepped together.

One thread per engine runs one forward pass per step over a budget of tokens
(`EngineLimits.max_batch_tokens`): the next token of every sequence that is generating,
then chunks of prompts still being read (`prefill_chunk` at most each), the oldest first,
then the first chunks of waiting sequences while cache rows are free. A join therefore
delays the running streams by one chunk, never by a whole prompt. The pass is flat: every
token carries its own position and the model's attention is routed to each token's own
cache row (`row_attention`); rows never move (`KVRows`). A prompt that starts with blocks
another prompt already computed on this engine restores them (`PrefixCache`) instead of
computing them again. The step's tokens are chosen for all rows together (`RowSampler`:
one host synchronisation), and handed to the engine's text thread (`TextDelivery`), which
decodes them and calls each request's `deliver` while the next pass runs.

A sequence ends with its last `TokenChunk` (which carries the finish reason) or with an
exception delivered in its place: `ShuttingDown` once its `cut` is set, `ModelRetired` when
the engine stops under it, or the error a forward pass raised. A cancelled sequence (its
client went away) leaves at the next pass and gets nothing more.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hotweights.backends.grammar import grammar_masks
from hotweights.backends.lora_layers import LoraWeights, selecting
from hotweights.backends.sequence import TokenSequence
from hotweights.engine.batch_sampling import Draw, Picked, RowSampler
from hotweights.engine.kv import KVRows, kv_shape
from hotweights.engine.prefix_cache import PrefixCache, PrefixStats
from hotweights.engine.row_attention import running
from hotweights.engine.step_plan import EngineSequence, Plan, StepKind, StepStats, lay_out, plan
from hotweights.engine.text_delivery import TextDelivery
from hotweights.errors import EngineFailed, PayloadTooLarge, ShuttingDown
from hotweights.generation import Deliver, GenerationParams

if TYPE_CHECKING:
    import torch

    from hotweights.backends.loaded_lm import LoadedLM

StepObserver = Callable[[StepStats], None]

log = logging.getLogger("hotweights.engine")


class EngineTicket:
    """A submitted sequence. `cancel` is thread-safe and idempotent."""

    def __init__(self, engine: BatchEngine, sequence: EngineSequence) -> None:
        self._engine = engine
        self._sequence = sequence

    def cancel(self) -> None:
        """Stop generating for this sequence at the engine's next pass; nothing more is
        delivered after the pass in progress."""
        self._sequence.cancelled = True
        self._engine.wake()


@dataclass
class EngineLimits:
    """How much one engine takes on."""

    max_batch: int = 32
    """Sequences in the cache at once (rows)."""
    columns: int = 1024
    """Tokens one sequence may hold: prompt plus completion."""
    max_batch_tokens: int = 256
    """Tokens in one pass: a decode token per generating sequence, the rest prompt chunks.
    At least `max_batch`, so every generating sequence steps in every pass."""
    prefill_chunk: int = 128
    """Most tokens of one prompt in one pass."""
    prefix_blocks: int = 256
    """Blocks the prefix cache keeps (0: none)."""
    prefix_block: int = 32
    """Tokens per prefix block."""

    def tokens(self) -> int:
        """Tokens the cache can hold in all: its rows and the prefix pool."""
        return self.max_batch * self.columns + self.prefix_blocks * self.prefix_block

    def __post_init__(self) -> None:
        if self.max_batch_tokens < self.max_batch:
            raise ValueError(
                f"max_batch_tokens ({self.max_batch_tokens}) must be at least max_batch "
                f"({self.max_batch}): every generating sequence takes a token of each pass"
            )
        if self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {self.prefill_chunk}")


class BatchEngine:
    """Generates for one `LoadedLM`'s requests, all of them together, on its own thread.

    `submit` is thread-safe; it checks sizes and returns at once. `stop` ends the thread
    after failing whatever is still running with `ModelRetired`; the loaded model must not
    be released before `stop` returns (`LoadedLM.release` calls it first). Starting an
    engine switches the model's attention to `row_attention` (which stays SDPA outside the
    engine's passes); a model that does not attend with SDPA raises `ValueError`.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        lm: LoadedLM,
        limits: EngineLimits,
        *,
        on_step: StepObserver | None = None,
    ) -> None:
        import torch

        from hotweights.engine.row_attention import adopt

        model = lm.model
        adopt(model)
        number = next(self._ids)
        self._lm = lm
        self.limits = limits
        self.columns = limits.columns
        self._on_step = on_step
        dtype = next(model.parameters()).dtype
        text_config = model.config.get_text_config()
        shape = kv_shape(text_config, dtype.itemsize)
        self._layers = shape.layers
        self._kv = KVRows(shape, limits.max_batch, limits.columns, dtype, lm.device)
        self._prefix = (
            PrefixCache(
                shape,
                limits.prefix_blocks,
                limits.prefix_block,
                dtype,
                lm.device,
                namespace=f"{lm.fingerprint}|engine-{number}",
            )
            if limits.prefix_blocks
            else None
        )
        self._prefix_stats = self._prefix.stats if self._prefix is not None else PrefixStats()
        self._sampler = RowSampler(limits.max_batch, lm.tokenizer_size, lm.device)
        self._trims = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._no_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=lm.device)
        """A 4D mask transformers passes through untouched: `row_attention` masks."""
        self._torch = torch
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: collections.deque[EngineSequence] = collections.deque()
        self._running: list[EngineSequence] = []
        self._stopping = False
        self._text = TextDelivery(f"hotweights-engine-{number}-text")
        self._thread = threading.Thread(
            target=self._loop, name=f"hotweights-engine-{number}", daemon=True
        )
        self._thread.start()

    @property
    def kv_bytes(self) -> int:
        """The cache's budget: its rows and the prefix pool (reserved as written)."""
        prefix = self._prefix.nbytes() if self._prefix is not None else 0
        return self._kv.nbytes() + prefix

    @property
    def prefix_hit_tokens(self) -> int:
        """Prompt tokens restored from the prefix cache rather than computed, so far."""
        return self._prefix_stats.hit_tokens

    def load(self) -> dict[str, int]:
        """Sequences running and waiting now."""
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    def submit(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        deliver: Deliver,
        cut: threading.Event | None = None,
        adapter: LoraWeights | None = None,
    ) -> EngineTicket:
        """Queue a sequence (generated with `adapter`'s updates, when given: it shares
        the passes of every other sequence, with or without an adapter). Its first chunk
        comes after the pass that reads the end of its prompt.

        Raises `ModelRetired` once the engine is stopping, `PayloadTooLarge` for a prompt
        that leaves no room in a row for one generated token, `InvalidRequest` for a
        `logit_bias` outside the vocabulary. The completion is cut to what a row and the
        model's positions hold (`finish_reason` `length`).
        """
        if len(prompt_ids) >= self.columns:
            raise PayloadTooLarge(
                f"the prompt is {len(prompt_ids)} tokens; this engine holds at most "
                f"{self.columns} per sequence, its completion included"
            )
        limit = min(params.max_tokens, self.columns - len(prompt_ids))
        if self._lm.max_positions is not None:
            limit = min(limit, self._lm.max_positions - len(prompt_ids))
        limit = max(limit, 1) if params.max_tokens else 0
        tokens = TokenSequence(self._lm, prompt_ids, params, limit)
        sequence = EngineSequence(tokens=tokens, deliver=deliver, cut=cut, adapter=adapter)
        with self._lock:
            if self._stopping:
                raise self._lm.retired()
            self._waiting.append(sequence)
            self._wake.notify()
        return EngineTicket(self, sequence)

    def wake(self) -> None:
        with self._lock:
            self._wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Fail every sequence still queued or running with `ModelRetired` and end the
        thread (after the pass in progress) and the text thread (after what it was
        handed). Idempotent."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        # Called from one of the engine's own threads (a deliver callback), joining would
        # wait for itself.
        if threading.current_thread() not in (self._thread, self._text.thread):
            self._thread.join(timeout)

    # -- the engine thread -------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopping:
                    ending = [*self._waiting, *self._running]
                    self._waiting.clear()
                    self._running = []
                    break
            try:
                with self._torch.inference_mode():
                    self._step()
            except Exception as exc:  # a failing pass fails its sequences, not the engine
                log.exception("an engine pass failed")
                self._fail_all(EngineFailed(f"generation failed: {type(exc).__name__}: {exc}"))
        error = self._lm.retired()
        for sequence in ending:
            self._text.end(sequence, error)
        self._text.close()
        self._kv = None  # type: ignore[assignment]
        self._prefix = None

    def _step(self) -> None:
        self._retire_stopped()
        step = plan(
            self._running, self.limits.max_batch_tokens, self.limits.prefill_chunk, self._admit
        )
        if step:
            self._pass(step)

    def _admit(self) -> EngineSequence | None:
        """The next waiting sequence, given a row and what the prefix cache holds of its
        prompt; None when none waits."""
        if not self._kv.free_rows:
            return None
        with self._lock:
            while self._waiting and self._waiting[0].cancelled:
                self._waiting.popleft()
            if not self._waiting:
                return None
            sequence = self._waiting.popleft()
        sequence.row = self._kv.take_row()
        self._sampler.join(sequence.row, sequence.tokens.params)
        self._running.append(sequence)
        if self._prefix is not None and not sequence.tokens.scores_prompt:
            slots = self._prefix.lookup(sequence.prompt, sequence.prefix_salt)
            self._prefix.restore(self._kv, sequence.row, slots)
            sequence.length = len(slots) * self._prefix.block
        return sequence

    def _retire_stopped(self) -> None:
        """Free the rows of cancelled sequences, of those the text thread ended (a stop
        string), and end those whose server cut them."""
        for sequence in list(self._running):
            if sequence.cancelled or sequence.stopped:
                self._free(sequence)
            elif sequence.cut is not None and sequence.cut.is_set():
                self._free(sequence)
                shut = ShuttingDown("the server shut down before this was complete")
                self._text.end(sequence, shut)

    def _pass(self, step: Plan) -> None:
        """One forward pass over `step`, then the next token of every sequence that has
        read its whole prompt."""
        torch = self._torch
        device = self._lm.device
        inputs = lay_out(step, self._kv, device)
        keep = torch.tensor(inputs.keep, dtype=torch.long, device=device)
        began = time.perf_counter()
        with running(inputs.layout), selecting(inputs.adapters):
            output = self._lm.model(
                input_ids=torch.tensor([inputs.ids], dtype=torch.long, device=device),
                position_ids=torch.tensor([inputs.positions], dtype=torch.long, device=device),
                attention_mask=self._no_mask,
                use_cache=False,
                logits_to_keep=keep,
            )
        if inputs.layout.calls != self._layers:
            raise EngineFailed(
                f"{inputs.layout.calls} of the model's {self._layers} attention layers ran "
                f"through the engine's attention"
            )
        logits = output.logits[0] if self._trims else output.logits[0, keep]
        logits = logits[:, : self._lm.tokenizer_size].float()  # (kept, vocab)
        self._observe(step, len(inputs.ids), began)
        for sequence in step.decoding:
            sequence.length += 1
        for sequence, count in step.chunks:
            sequence.length += count
        choosing = list(step.decoding)
        rows = [logits[: len(step.decoding)]]  # each (n, vocab): the choosing sequences' logits
        for sequence, first, kept in inputs.reads:
            if sequence.tokens.scores_prompt:
                sequence.scored.append(logits[first : first + kept])
            if sequence.reading:
                continue
            if self._prefix is not None:
                self._prefix.store(self._kv, sequence.row, sequence.prompt, sequence.prefix_salt)
            last = logits[first : first + 1]
            if sequence.tokens.scores_prompt:
                whole = torch.cat(sequence.scored)  # (prompt, vocab)
                sequence.scored = []
                sequence.tokens.score(whole[:-1])
                last = whole[-1:]
            if sequence.tokens.limit == 0:  # the prompt alone: nothing to generate
                self._free(sequence)
                self._text.scored(sequence)
                continue
            rows.append(last)
            choosing.append(sequence)
        if choosing:
            self._choose(choosing, torch.cat(rows))

    def _choose(self, choosing: list[EngineSequence], logits: torch.Tensor) -> None:
        """Pick the next token of each of `choosing` (its row of `logits`), hand them to
        the text thread, and free the rows of the sequences that ended."""
        draws = [Draw(s.row, s.tokens.params, s.tokens.numbers) for s in choosing]
        allowed = grammar_masks([s.tokens.constraint for s in choosing], logits)
        picked = self._sampler.pick(logits, draws, allowed)
        handed: list[tuple[EngineSequence, Picked]] = []
        eos = self._lm.eos_ids
        for sequence, pick in zip(choosing, picked, strict=True):
            if sequence.cancelled:
                self._free(sequence)
                continue
            sequence.produced += 1
            try:
                complete = sequence.tokens.accept(pick.token)  # the grammar's, before the next mask
            except RuntimeError as exc:  # its grammar failed: that request alone ends
                self._free(sequence)
                self._text.end(sequence, EngineFailed(f"the output grammar failed: {exc}"))
                continue
            handed.append((sequence, pick))
            if pick.token in eos or sequence.produced >= sequence.tokens.limit or complete:
                self._free(sequence)
            else:
                sequence.pending = pick.token
        self._text.tokens(handed)

    def _free(self, sequence: EngineSequence) -> None:
        """Give `sequence`'s row back."""
        if sequence.row < 0:
            return
        self._running.remove(sequence)
        self._kv.give_row(sequence.row)
        sequence.row = -1

    def _fail_all(self, error: BaseException) -> None:
        for sequence in list(self._running):
            self._free(sequence)
            self._text.end(sequence, error)

    def _observe(self, step: Plan, tokens: int, began: float) -> None:
        if self._on_step is None:
            return
        seconds = time.perf_counter() - began
        kind: StepKind = (
            "mixed" if step.decoding and step.chunks else "decode" if step.decoding else "prefill"
        )
        with self._lock:
            waiting = len(self._waiting)
        batch = len(step.decoding) + len(step.chunks)
        self._on_step(StepStats(kind, batch, tokens, waiting, seconds))
