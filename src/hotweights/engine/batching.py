"""The batched engine of one version: every request on it is stepped together.

One thread per engine. Each turn of its loop it takes waiting sequences into free rows
(one left-padded prefill pass for all of them), then runs one decode pass over every
running sequence, samples each row's next token with that request's own parameters and
random generator, and hands the decoded text to the request's `deliver` callback.
Sequences join and leave between passes (continuous batching); the cache is the engine's
`SlotKV`, allocated once.

A sequence ends with its last `TokenChunk` (which carries the finish reason) or with an
exception delivered in its place: `ShuttingDown` once its `cut` is set, `ModelRetired` when
the engine stops under it, or the error a forward pass raised. A cancelled sequence (its
client went away) leaves at the next pass and gets nothing more.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hotweights.backends.sequence import TokenSequence
from hotweights.engine.kv import SlotKV, kv_shape
from hotweights.errors import EngineFailed, PayloadTooLarge, ShuttingDown
from hotweights.generation import Deliver, GenerationParams, TokenChunk

if TYPE_CHECKING:
    import torch

    from hotweights.backends.loaded_lm import LoadedLM

StepObserver = Callable[["StepStats"], None]

log = logging.getLogger("hotweights.engine")


@dataclass(frozen=True)
class StepStats:
    """One pass of an engine, for metrics."""

    kind: str
    """`prefill` or `decode`."""
    batch: int
    """Sequences in the pass."""
    tokens: int
    """Query tokens in the pass (padding included)."""
    waiting: int
    """Sequences still waiting for a row after it."""
    seconds: float


@dataclass(eq=False)
class _Sequence:
    tokens: TokenSequence
    deliver: Deliver
    cut: threading.Event | None
    start: int = 0
    pending: int | None = None
    """The last sampled token, not yet in the cache."""
    cancelled: bool = False
    ended: bool = False
    row: int = -1


class EngineTicket:
    """A submitted sequence. `cancel` is thread-safe and idempotent."""

    def __init__(self, engine: BatchEngine, sequence: _Sequence) -> None:
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
    """Sequences stepped together (rows of the cache)."""
    columns: int = 1024
    """Tokens one sequence may hold: prompt plus completion."""
    prefill_tokens: int = 2048
    """Most padded prompt tokens one prefill pass takes (at least one prompt)."""


class BatchEngine:
    """Generates for one `LoadedLM`'s requests, all of them together, on its own thread.

    `submit` is thread-safe; it checks sizes and returns at once. `stop` ends the thread
    after failing whatever is still running with `ModelRetired`; the loaded model must not
    be released before `stop` returns (`LoadedLM.release` calls it first).
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

        self._lm = lm
        self.limits = limits
        self.columns = limits.columns
        self._on_step = on_step
        dtype = next(lm.model.parameters()).dtype
        shape = kv_shape(lm.model.config.get_text_config(), dtype.itemsize)
        self._kv = SlotKV(shape, limits.max_batch, limits.columns, dtype, lm.device)
        self._pad = 0
        self._torch = torch
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._stopping = False
        self._thread = threading.Thread(
            target=self._loop, name=f"hotweights-engine-{next(self._ids)}", daemon=True
        )
        self._thread.start()

    @property
    def kv_bytes(self) -> int:
        return self._kv.nbytes()

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
    ) -> EngineTicket:
        """Queue a sequence. Its first chunk comes after the next prefill pass.

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
        sequence = _Sequence(tokens=tokens, deliver=deliver, cut=cut)
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
        thread (after the pass in progress). Idempotent."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the engine thread -------------------------------------------------------------

    def _loop(self) -> None:
        torch = self._torch
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self._running:
                    self._wake.wait()
                if self._stopping:
                    ending = [*self._waiting, *self._running]
                    self._waiting.clear()
                    self._running = []
                    break
                joining = self._take_waiting()
            try:
                with torch.inference_mode():
                    self._retire_stopped()
                    if joining:
                        self._prefill(joining)
                    if self._running:
                        self._decode()
            except Exception as exc:  # a failing pass fails its sequences, not the engine
                log.exception("an engine pass failed")
                self._fail_all(EngineFailed(f"generation failed: {type(exc).__name__}: {exc}"))
        error = self._lm.retired()
        for sequence in ending:
            self._end(sequence, error)
        self._kv = None  # type: ignore[assignment]

    def _take_waiting(self) -> list[_Sequence]:
        """Waiting sequences that fit in free rows and the prefill budget (under the lock)."""
        joining: list[_Sequence] = []
        free = self.limits.max_batch - len(self._running)
        longest = 0
        while self._waiting and len(joining) < free:
            head = self._waiting[0]
            if head.cancelled:
                self._waiting.popleft()
                continue
            longest_next = max(longest, len(head.tokens.prompt_ids))
            if joining and longest_next * (len(joining) + 1) > self.limits.prefill_tokens:
                break
            joining.append(self._waiting.popleft())
            longest = longest_next
        return joining

    def _retire_stopped(self) -> None:
        """Free the rows of cancelled sequences and end those whose server cut them."""
        for sequence in list(self._running):
            if sequence.cancelled:
                self._free(sequence)
            elif sequence.cut is not None and sequence.cut.is_set():
                self._free(sequence)
                self._end(sequence, ShuttingDown("the server shut down before this was complete"))

    def _prefill(self, joining: list[_Sequence]) -> None:
        torch = self._torch
        kv = self._kv
        used = len(self._running)
        queries = max(len(s.tokens.prompt_ids) for s in joining)
        starts = kv.make_room(queries, used, [s.start for s in self._running])
        for sequence, start in zip(self._running, starts, strict=True):
            sequence.start = start
        rows = slice(used, used + len(joining))
        first = kv.end - queries
        ids = torch.full((len(joining), queries), self._pad, dtype=torch.long)
        positions = torch.zeros((len(joining), queries), dtype=torch.long)
        for i, sequence in enumerate(joining):
            length = len(sequence.tokens.prompt_ids)
            ids[i, queries - length :] = torch.tensor(sequence.tokens.prompt_ids, dtype=torch.long)
            positions[i, queries - length :] = torch.arange(length)
            sequence.row, sequence.start = used + i, kv.end - length
            kv.valid[sequence.row] = False
            kv.valid[sequence.row, sequence.start : kv.end] = True
        self._running.extend(joining)
        scoring = any(s.tokens.scores_prompt for s in joining)
        began = time.perf_counter()
        logits = self._forward(ids, positions, rows, first, 0, every_position=scoring)
        self._observe("prefill", len(joining), ids.numel(), began)
        if scoring:
            for i, sequence in enumerate(joining):
                length = len(sequence.tokens.prompt_ids)
                if sequence.tokens.scores_prompt:
                    sequence.tokens.score(logits[i, queries - length : queries - 1])
            logits = logits[:, -1]
        for sequence in joining:
            if sequence.tokens.limit == 0:  # scored, nothing to generate
                self._free(sequence)
                self._end(sequence, sequence.tokens.end_scored())
        self._sample([(s, i) for i, s in enumerate(joining) if not s.tokens.finished], logits)

    def _decode(self) -> None:
        torch = self._torch
        kv = self._kv
        running = self._running
        starts = kv.make_room(0, len(running), [s.start for s in running])
        for sequence, start in zip(running, starts, strict=True):
            sequence.start = start
        first = min(starts)
        ids = torch.tensor([[s.pending] for s in running], dtype=torch.long)
        positions = torch.tensor([[kv.end - s.start] for s in running], dtype=torch.long)
        kv.valid[: len(running), kv.end] = True
        began = time.perf_counter()
        logits = self._forward(ids, positions, slice(0, len(running)), first, kv.end - first)
        kv.end += 1
        self._observe("decode", len(running), len(running), began)
        self._sample(list(zip(running, range(len(running)), strict=True)), logits)

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        rows: slice,
        first: int,
        write_at: int,
        *,
        every_position: bool = False,
    ) -> torch.Tensor:
        """One pass over `rows`; returns the last position's logits, (rows, vocab), or with
        `every_position` every query position's, (rows, queries, vocab)."""
        kv = self._kv
        device = kv.device
        queries = ids.shape[1]
        cache = kv.view(rows, first, write_at)
        mask = kv.mask(rows, first, write_at, queries)  # (rows, 1, queries, write_at+queries)
        output = self._lm.model(
            input_ids=ids.to(device),
            position_ids=positions.to(device),
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=0 if every_position else 1,
            **{self._lm.cache_arg: cache},
        )
        logits: torch.Tensor = output.logits[..., : self._lm.tokenizer_size].float()
        return logits if every_position else logits[:, -1]

    def _sample(self, sequences: list[tuple[_Sequence, int]], logits: torch.Tensor) -> None:
        """Pick and account for each sequence's next token from its row (`index`) of the
        pass's `logits` (rows, vocab)."""
        greedy = self._torch.argmax(logits, dim=-1).tolist()  # (rows,)
        for sequence, index in sequences:
            if sequence.cancelled:
                self._free(sequence)
                continue
            tokens = sequence.tokens
            try:
                row = logits[index] if tokens.needs_logits else None
                token = tokens.choose(row, int(greedy[index]))
                chunk = tokens.advance(token)
            except Exception as exc:  # one request's sampling fails that request alone
                log.exception("sampling a sequence failed")
                self._free(sequence)
                self._end(sequence, EngineFailed(f"sampling failed: {type(exc).__name__}: {exc}"))
                continue
            if tokens.finished and chunk is not None:
                self._free(sequence)
                self._end(sequence, chunk)
                continue
            sequence.pending = token
            if chunk is not None:
                self._send(sequence, chunk)

    def _free(self, sequence: _Sequence) -> None:
        """Give `sequence`'s row back, moving the last running row into it."""
        if sequence not in self._running:
            return
        running, kv = self._running, self._kv
        last = running[-1]
        if last is not sequence:
            kv.move_row(last.row, sequence.row, last.start)
            last.row = sequence.row
            running[running.index(sequence)] = last
        else:
            kv.clear_row(sequence.row)
        running.pop()
        sequence.row = -1
        if not running:
            kv.end = 0

    def _end(self, sequence: _Sequence, last: TokenChunk | BaseException) -> None:
        if sequence.ended or sequence.cancelled:
            return
        sequence.ended = True
        self._send(sequence, last)

    def _send(self, sequence: _Sequence, item: TokenChunk | BaseException) -> None:
        try:
            sequence.deliver(item)
        except Exception:
            log.exception("delivering to a sequence failed")

    def _fail_all(self, error: BaseException) -> None:
        for sequence in list(self._running):
            self._free(sequence)
            self._end(sequence, error)

    def _observe(self, kind: str, batch: int, tokens: int, began: float) -> None:
        if self._on_step is None:
            return
        with self._lock:
            waiting = len(self._waiting)
        self._on_step(StepStats(kind, batch, tokens, waiting, time.perf_counter() - began))
