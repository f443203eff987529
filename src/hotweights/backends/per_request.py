"""The per-request engine: each sequence runs its model's own decode loop on a worker thread.

`PerRequestEngine` is the `Engine` a loader gives a version when the batched engine cannot
run it (or batching is off): the server submits to it exactly as to a `BatchEngine`. Each
sequence is one `TextModel.stream`, stepped one token at a time (one `next()`: a forward
pass with the sequence's own cache and random numbers) on one of the engine's workers.

Unload never overlaps a step: every step runs inside the engine's gate, and `stop` (which
the model's release calls before the weights go) closes the gate, waits for the steps
already inside, and ends every sequence with `ModelRetired` at its next step. A cancelled
sequence stops before its next step; one whose `cut` is set ends with `ShuttingDown`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from hotweights.backends.lora_layers import AdapterGroup, LoraWeights, selecting
from hotweights.errors import ModelRetired, ShuttingDown
from hotweights.generation import Deliver, GenerationParams, TextModel, TokenChunk

UNBOUNDED_COLUMNS = 2**31 - 1
"""`columns` of a model with no position limit: the loop keeps no cache of fixed size."""
DEFAULT_WORKERS = 4
"""Sequences generated at once when the loader names no number."""


@dataclass(eq=False)
class LoopTicket:
    """One submitted sequence: its stream, where its chunks go, and whether it was
    cancelled."""

    chunks: Iterator[TokenChunk]
    deliver: Deliver
    cut: threading.Event | None
    adapters: tuple[AdapterGroup, ...] = ()
    """The LoRA adapter its every pass applies, if it asked for one."""
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Stop before the sequence's next step; thread-safe, idempotent."""
        self.cancelled.set()


class PerRequestEngine:
    """Generates each sequence of one model with the model's own `stream`, up to `workers`
    at once (more wait for a worker).

    Thread-safety: `submit`, `stop` and `load` may be called from any thread. `stop` must
    return before the model is released (`LoadedLM.release` and the fakes' unload call it
    first): it is what keeps an unload from overlapping a step.
    """

    def __init__(
        self, model: TextModel, *, columns: int, workers: int = DEFAULT_WORKERS, name: str
    ) -> None:
        self._model = model
        self.columns = columns
        self.name = name
        """What the model is, for errors (`Qwen3ForCausalLM from models/m/3`)."""
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hotweights-gen")
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stopping = False
        self._stepping = 0
        """Steps inside the gate now."""
        self._running = 0
        self._waiting = 0

    def submit(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        deliver: Deliver,
        cut: threading.Event | None = None,
        adapter: LoraWeights | None = None,
    ) -> LoopTicket:
        """Queue a sequence (every pass of it with `adapter`'s updates, when given).
        Starts the model's stream now, so a prompt or parameters the model refuses raise
        here (`InvalidRequest`), as does a stopping engine (`ModelRetired`)."""
        with self._step():
            chunks = self._model.stream(prompt_ids, params)
        groups = (AdapterGroup(adapter, None),) if adapter is not None else ()
        run = LoopTicket(chunks, deliver, cut, groups)
        with self._lock:
            if self._stopping:
                _close(chunks)
                raise self._retired()
            self._waiting += 1
            self._pool.submit(self._run, run)
        return run

    def stop(self, timeout: float | None = None) -> None:
        """Close the gate: what runs ends with `ModelRetired` at its next step, and
        nothing new is taken. Returns once no step is inside the gate (or after
        `timeout`). Idempotent."""
        with self._lock:
            self._stopping = True
            self._idle.wait_for(lambda: self._stepping == 0, timeout)
        self._pool.shutdown(wait=False)  # queued sequences still run, into the closed gate

    def load(self) -> dict[str, int]:
        """Sequences `running` and `waiting` for a worker now."""
        with self._lock:
            return {"running": self._running, "waiting": self._waiting}

    # -- the workers -------------------------------------------------------------------

    @contextlib.contextmanager
    def _step(self) -> Iterator[None]:
        with self._lock:
            if self._stopping:
                raise self._retired()
            self._stepping += 1
        try:
            yield
        finally:
            with self._lock:
                self._stepping -= 1
                if self._stepping == 0:
                    self._idle.notify_all()

    def _run(self, run: LoopTicket) -> None:
        with self._lock:
            self._waiting -= 1
            self._running += 1
        try:
            self._generate(run)
        except BaseException as exc:
            if not run.cancelled.is_set():
                run.deliver(exc)
        finally:
            _close(run.chunks)
            with self._lock:
                self._running -= 1

    def _generate(self, run: LoopTicket) -> None:
        """Step `run` until its last chunk (or it is cancelled); raises what ends it."""
        while not run.cancelled.is_set():
            if run.cut is not None and run.cut.is_set():
                raise ShuttingDown("the server shut down before this response was complete")
            with self._step(), selecting(run.adapters):
                chunk = next(run.chunks, None)
            if chunk is None:
                raise RuntimeError("the model's token stream ended without a finish reason")
            run.deliver(chunk)
            if chunk.finish_reason is not None:
                return

    def _retired(self) -> ModelRetired:
        return ModelRetired(
            f"{self.name} was unloaded while this request was still running (its version "
            "passed its drain deadline)"
        )


def _close(chunks: Iterator[TokenChunk]) -> None:
    """Let a generator's cleanup run now rather than whenever it is collected."""
    if isinstance(chunks, Generator):
        with contextlib.suppress(Exception):
            chunks.close()
