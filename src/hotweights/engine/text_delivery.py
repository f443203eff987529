"""The text side of an engine: tokens become text and reach their requests here, on a
thread of their own, while the engine runs its next pass.

The engine hands over each step's chosen tokens in one call (`tokens`) and goes on. This
thread decodes them (`TokenSequence.advance`: the clean-UTF-8 hold-back, stop strings),
builds each request's chunk with its log-probabilities, and calls the request's `deliver`.
The engine decides the ends it can see from token ids alone (an eos token, the length
limit); a stop string is found here, and the thread marks the sequence `stopped` so the
engine frees its row at its next step (a token or two it chose meanwhile are dropped).
Per sequence, everything is delivered in the order it was handed over: its chunks, then
its last chunk or the error that ends it.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING

from hotweights.engine.step_plan import EngineSequence
from hotweights.generation import TokenChunk

if TYPE_CHECKING:
    from hotweights.engine.batch_sampling import Picked

log = logging.getLogger("hotweights.engine")


_Item = tuple[EngineSequence, "Picked | BaseException | None"]
"""A chosen token, the error that ends the sequence, or None: its prompt is scored and
nothing is generated."""


class TextDelivery:
    """One engine's text thread. `tokens`, `end` and `scored` are called by the engine
    thread; `close` drains what was handed over and ends the thread."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[list[_Item] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def tokens(self, batch: list[tuple[EngineSequence, Picked]]) -> None:
        if batch:
            self._queue.put(list(batch))

    def end(self, sequence: EngineSequence, error: BaseException) -> None:
        """End `sequence` with `error` after what it was handed before."""
        self._queue.put([(sequence, error)])

    def scored(self, sequence: EngineSequence) -> None:
        """`sequence`'s prompt is scored and it generates nothing: its only chunk."""
        self._queue.put([(sequence, None)])

    def close(self, timeout: float | None = None) -> None:
        self._queue.put(None)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            if batch is None:
                return
            for sequence, item in batch:
                if sequence.stopped or sequence.cancelled:
                    continue
                try:
                    self._one(sequence, item)
                except Exception as exc:  # one request's text fails that request alone
                    log.exception("turning a sequence's tokens into text failed")
                    sequence.stopped = True
                    _send(sequence, exc)

    @staticmethod
    def _one(sequence: EngineSequence, item: Picked | BaseException | None) -> None:
        tokens = sequence.tokens
        if item is None:
            sequence.stopped = True
            _send(sequence, tokens.end_scored())
            return
        if isinstance(item, BaseException):
            sequence.stopped = True
            _send(sequence, item)
            return
        if item.logprob is not None:
            tokens.record(item.token, item.logprob, item.top)
        chunk = tokens.advance(item.token)
        if tokens.finished:
            sequence.stopped = True
        if chunk is not None:
            _send(sequence, chunk)


def _send(sequence: EngineSequence, item: TokenChunk | BaseException) -> None:
    try:
        sequence.deliver(item)
    except Exception:
        log.exception("delivering to a sequence failed")
