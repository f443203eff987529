"""A loader whose versions generate through a batched engine of their own.

`BatchingLoader` wraps the transformers loader: loading and validating are its, warmup
also starts the version's `BatchEngine` (beside the live version's, under `availability`)
and runs a few prompts through it, and unload stops the engine before the weights go
(`LoadedLM.release`). A model the engine cannot run (the batched pass raises, or gives
other greedy tokens than the per-request loop) keeps serving through the per-request loop;
`LoadedLM.engine_note` says why, and `/admin/status` shows it.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hotweights.backends import LoadedLM, TransformersLoader
from hotweights.core.memory import available_memory
from hotweights.engine.batching import BatchEngine, EngineLimits, StepObserver
from hotweights.engine.kv import KVShape, kv_shape
from hotweights.errors import HotweightsError
from hotweights.generation import GenerationParams, TokenChunk

log = logging.getLogger("hotweights.engine")

CHECK_PROMPTS = ("Hello", "The quick brown fox jumps over", "1 2 3 4 5 6 7 8")
"""Prompts of different lengths, run together through a new engine at warmup."""
CHECK_TOKENS = 6
AUTO_KV_SHARE = 0.25
"""With no explicit budget, the cache takes at most this share of available memory."""
MIN_COLUMNS = 64
_HALF = ("bfloat16", "float16")


@dataclass(frozen=True)
class EngineSettings:
    """How a server sizes its engines."""

    max_batch: int = 32
    """Sequences one engine steps together."""
    kv_cache_bytes: int | None = None
    """Each engine's cache budget in bytes; None sizes it from the model and memory."""
    max_sequence_tokens: int = 4096 + 1024
    """The longest sequence worth a cache row: the server's prompt limit plus `max_tokens`."""
    batched: bool = True
    """False serves every request through the per-request loop."""


class BatchingLoader:
    """`Loader[LoadedLM]` that gives each version a batched engine (see the module).

    Called from the reloader's worker, like every loader. `on_step` receives every engine
    pass (for metrics), on that engine's thread.
    """

    def __init__(
        self,
        inner: TransformersLoader,
        settings: EngineSettings,
        on_step: StepObserver | None = None,
    ) -> None:
        self.inner = inner
        self.settings = settings
        self.on_step = on_step

    # -- the Loader role -------------------------------------------------------------

    def load(self, source: str) -> LoadedLM:
        return self.inner.load(source)

    def validate(self, model: LoadedLM) -> None:
        self.inner.validate(model)

    def warmup(self, model: LoadedLM) -> None:
        """The per-request warmup, then the engine's start and a batched check."""
        self.inner.warmup(model)
        if not self.settings.batched:
            model.engine_note = "per-request (batching turned off)"
            return
        try:
            limits = self.limits(kv_shape_of(model), model.max_positions)
            engine = BatchEngine(model, limits, on_step=self.on_step)
        except Exception as exc:
            self._fall_back(model, f"the engine could not start: {type(exc).__name__}: {exc}")
            return
        problem = _check(model, engine)
        if problem is not None:
            engine.stop()
            self._fall_back(model, problem)
            return
        model.engine = engine
        model.engine_note = (
            f"batched ({limits.max_batch} sequences of up to {limits.columns} tokens, "
            f"cache {engine.kv_bytes / 2**20:.0f} MiB)"
        )

    def unload(self, model: LoadedLM) -> None:
        self.inner.unload(model)  # releases the model, which stops its engine first

    # -- optional roles ---------------------------------------------------------------

    def fingerprint(self, source: str) -> str:
        return self.inner.fingerprint(source)

    def estimate_bytes(self, source: str) -> int:
        """Weights plus the engine's cache, so the memory check before a load counts both."""
        weights = self.inner.estimate_bytes(source)
        if not self.settings.batched:
            return weights
        config = _read_config(source)
        dtype_bytes = 2 if _declared_dtype(config, self.inner.dtype) in _HALF else 4
        try:
            shape = kv_shape(SimpleNamespace(**config), dtype_bytes)
            limits = self.limits(shape, config.get("max_position_embeddings"))
        except (AttributeError, TypeError, ValueError, HotweightsError):
            return weights  # the load will say what is wrong with the config
        return weights + shape.bytes_per_token() * limits.max_batch * limits.columns

    def import_libraries(self) -> None:
        self.inner.import_libraries()

    def close(self) -> None:
        self.inner.close()

    # -- sizing -----------------------------------------------------------------------

    def limits(self, shape: KVShape, max_positions: int | None) -> EngineLimits:
        """Rows and columns from the budget: every row gets the same columns, at most the
        longest useful sequence."""
        longest = self.settings.max_sequence_tokens
        if max_positions is not None:
            longest = min(longest, max_positions)
        rows = self.settings.max_batch
        need = shape.bytes_per_token() * rows * longest
        budget = self.settings.kv_cache_bytes
        if budget is None:
            free = available_memory()
            budget = min(need, int(free * AUTO_KV_SHARE)) if free is not None else need
        columns = min(longest, shape.columns_for(budget, rows))
        if columns < MIN_COLUMNS:
            raise HotweightsError(
                f"a cache of {budget} bytes holds only {columns} tokens for each of {rows} "
                f"sequences; give more (--kv-cache-memory) or fewer (--max-batch-size)"
            )
        return EngineLimits(max_batch=rows, columns=columns)

    def _fall_back(self, model: LoadedLM, reason: str) -> None:
        model.engine_note = f"per-request ({reason})"
        log.warning("%s: serving without batching: %s", model.source, reason)


def _read_config(source: str) -> dict[str, Any]:
    """`config.json` of `source`, a multimodal model's `text_config` merged over it; {} when
    it cannot be read (the load reports that)."""
    try:
        config = json.loads((Path(source) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(config, dict):
        return {}
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def _declared_dtype(config: dict[str, Any], setting: str) -> str:
    if setting != "auto":
        return setting
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def kv_shape_of(model: LoadedLM) -> KVShape:
    import torch

    dtype = getattr(torch, model.dtype)
    return kv_shape(model.model.config.get_text_config(), dtype.itemsize)


def _check(model: LoadedLM, engine: BatchEngine) -> str | None:
    """Run `CHECK_PROMPTS` through `engine` together and compare each greedy completion
    with the per-request loop's; the reason they differ (or the error), or None."""
    params = GenerationParams(temperature=0.0, max_tokens=CHECK_TOKENS)
    results: dict[int, str | BaseException] = {}
    finished = threading.Semaphore(0)

    def collector(index: int) -> object:
        parts: list[str] = []

        def deliver(item: TokenChunk | BaseException) -> None:
            if isinstance(item, BaseException):
                results[index] = item
                finished.release()
                return
            parts.append(item.text)
            if item.finish_reason is not None:
                results[index] = "".join(parts)
                finished.release()

        return deliver

    try:
        for index, prompt in enumerate(CHECK_PROMPTS):
            engine.submit(model.prompt_ids(prompt), params, collector(index))  # type: ignore[arg-type]
        for _ in CHECK_PROMPTS:
            if not finished.acquire(timeout=300):
                return "the batched check did not finish in 300 s"
    except Exception as exc:
        return f"the batched check failed: {type(exc).__name__}: {exc}"
    for index, prompt in enumerate(CHECK_PROMPTS):
        got = results[index]
        if isinstance(got, BaseException):
            return f"the batched check failed: {type(got).__name__}: {got}"
        alone = model.generate(prompt, params).text
        if got != alone:
            return f"batched greedy output {got!r} differs from the per-request {alone!r}"
    return None
