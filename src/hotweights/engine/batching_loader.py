"""A loader whose versions generate through a batched engine of their own.

`BatchingLoader` wraps the transformers loader: loading and validating are its, warmup
starts the version's `BatchEngine` (beside the live version's, under `availability`) and
runs a few prompts through it together, and unload stops the engine before the weights go
(`LoadedLM.release`). A model the engine cannot run (the batched pass raises, or picks a
token that one plain forward pass over the same text does not rank first) is served by
the per-request engine instead (`PerRequestEngine`: each sequence through the model's own
decode loop), warmed up for it; `LoadedLM.engine_note` says why, and `/admin/status` shows
it. The check runs once per configuration: a later version with the
same one (`engine_key`) only sends one short prompt through its new engine.
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
from hotweights.backends.devices import free_bytes
from hotweights.engine.batching import BatchEngine, EngineLimits, StepObserver
from hotweights.engine.kv import KVShape, kv_shape
from hotweights.errors import HotweightsError
from hotweights.generation import Engine, GenerationParams, TokenChunk

log = logging.getLogger("hotweights.engine")

CHECK_PROMPTS = ("Hi", "Hello", "1 2 3")
"""Prompts of different lengths (so the prefill pads), run together through a new engine
at warmup. Short: the check's passes cost in proportion to their tokens, and a few tokens
exercise every layer, the padding and the cache as well as many would."""
CHECK_TOKENS = 2
"""The first token comes from the prefill pass, the second from a decode pass on the
cache: both paths are checked."""
CHECK_TOLERANCE = 1e-3
"""How far below the best logit (of a plain forward pass) the engine's greedy pick may be:
float noise between a padded batch and one sequence, not a different token."""
AUTO_KV_SHARE = 0.25
"""With no explicit budget, the cache takes at most this share of available memory."""
PREFIX_SHARE = 0.125
"""The share of the cache budget kept for the prefix cache's blocks."""
PREFIX_BLOCK = 32
"""Tokens per prefix-cache block: long enough that a lookup costs little per token, short
enough that a shared system prompt of a few hundred tokens fills most of its blocks."""
MIN_COLUMNS = 64
_HALF = ("bfloat16", "float16")


@dataclass(frozen=True)
class EngineSettings:
    """How a server sizes its engines."""

    max_batch: int = 32
    """Sequences one engine steps together (the per-request engine: runs at once)."""
    kv_cache_bytes: int | None = None
    """Each engine's cache budget in bytes; None sizes it from the model and memory."""
    max_sequence_tokens: int = 4096 + 1024
    """The longest sequence worth a cache row: the server's prompt limit plus `max_tokens`."""
    batched: bool = True
    """False serves every request through the per-request engine."""
    max_batch_tokens: int = 256
    """Tokens in one engine pass: a decode token per generating sequence, the rest chunks
    of prompts being read."""
    prefill_chunk: int = 128
    """Most tokens of one prompt read in one pass."""
    prefix_cache: bool = True
    """Keep prompt prefixes' keys and values for later prompts that start the same way."""
    threads: int = 0
    """torch's intra-op threads, set once the libraries are imported; 0 leaves torch's."""


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
        self._checked: set[str] = set()
        """`engine_key`s of the configurations whose engine passed `_check`."""

    # -- the Loader role -------------------------------------------------------------

    def load(self, source: str) -> LoadedLM:
        return self.inner.load(source)

    def validate(self, model: LoadedLM) -> None:
        self.inner.validate(model)

    def warmup(self, model: LoadedLM) -> None:
        """Start the engine and check it with a few prompts at once (which runs every
        layer); a model the batched engine cannot run gets the per-request engine and that
        loop's warmup instead.
        A version whose configuration (`engine_key`) already passed the check, as each new
        version of a model usually does, only warms its engine up with one short prompt:
        the check costs three passes of the model and its verdict depends on the shapes,
        not on the weights' values."""
        if not self.settings.batched:
            self._per_request(model, "batching turned off")
            return
        try:
            limits = self.limits(kv_shape_of(model), model.max_positions)
            engine = BatchEngine(model, limits, on_step=self.on_step)
        except Exception as exc:
            self._fall_back(model, f"the engine could not start: {type(exc).__name__}: {exc}")
            return
        key = engine_key(model, limits)
        if key in self._checked:
            problem = _warm(model, engine)
        else:
            problem = _check(model, engine)
            if problem is None:
                self._checked.add(key)
        if problem is not None:
            engine.stop()
            self._fall_back(model, problem)
            return
        model.engine = engine
        model.engine_note = (
            f"batched ({limits.max_batch} sequences of up to {limits.columns} tokens, "
            f"{limits.max_batch_tokens} tokens a pass, cache {engine.kv_bytes / 2**20:.0f} MiB"
            f"{f', prefix cache {limits.prefix_blocks} blocks' if limits.prefix_blocks else ''})"
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
        return weights + limits.tokens() * shape.bytes_per_token()

    def import_libraries(self) -> None:
        """Import torch and transformers, and give torch its threads (once, in a process
        that serves, before the first load)."""
        self.inner.import_libraries()
        if self.settings.threads:
            import torch

            torch.set_num_threads(self.settings.threads)

    def close(self) -> None:
        self.inner.close()

    # -- sizing -----------------------------------------------------------------------

    def limits(self, shape: KVShape, max_positions: int | None) -> EngineLimits:
        """Rows, columns and prefix blocks from the budget: every row gets the same
        columns, at most the longest useful sequence; the prefix cache `PREFIX_SHARE` of
        the budget."""
        settings = self.settings
        longest = settings.max_sequence_tokens
        if max_positions is not None:
            longest = min(longest, max_positions)
        rows = settings.max_batch
        share = PREFIX_SHARE if settings.prefix_cache else 0.0
        need = int(shape.bytes_per_token() * rows * longest / (1 - share))
        budget = settings.kv_cache_bytes
        if budget is None:
            free = free_bytes(self.inner.device)
            budget = min(need, int(free * AUTO_KV_SHARE)) if free is not None else need
        prefix_blocks = int(budget * share) // (shape.bytes_per_token() * PREFIX_BLOCK)
        columns = min(longest, shape.columns_for(budget - int(budget * share), rows))
        if columns < MIN_COLUMNS:
            raise HotweightsError(
                f"a cache of {budget} bytes holds only {columns} tokens for each of {rows} "
                f"sequences; give more (--kv-cache-memory) or fewer (--max-batch-size)"
            )
        return EngineLimits(
            max_batch=rows,
            columns=columns,
            max_batch_tokens=max(settings.max_batch_tokens, rows),
            prefill_chunk=settings.prefill_chunk,
            prefix_blocks=prefix_blocks,
            prefix_block=PREFIX_BLOCK,
        )

    def _fall_back(self, model: LoadedLM, reason: str) -> None:
        log.warning("%s: serving without batching: %s", model.source, reason)
        self._per_request(model, reason)

    def _per_request(self, model: LoadedLM, reason: str) -> None:
        """Serve `model` through the per-request engine, as many sequences at once as a
        batch would hold, and warm up its loop."""
        model.engine = model.per_request_engine(self.settings.max_batch)
        model.engine_note = f"per-request ({reason})"
        self.inner.warmup(model)


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


def _check(model: LoadedLM, engine: Engine) -> str | None:
    """Run `CHECK_PROMPTS` through `engine` together, greedily, then score each prompt and
    its completion with one plain forward pass: every token the engine picked must be the
    pass's most likely one at its position (within `CHECK_TOLERANCE`). The reason it is
    not (or the error), or None."""
    import torch

    prompts = [model.prompt_ids(prompt) for prompt in CHECK_PROMPTS]
    completions = _generate_together(engine, prompts, CHECK_TOKENS)
    if isinstance(completions, str):
        return completions
    texts = [ids + got for ids, got in zip(prompts, completions, strict=True)]
    longest = max(len(text) for text in texts)
    # One pass over every prompt and completion, padded on the right: causal attention
    # leaves each real position's logits as they would be alone.
    with torch.inference_mode():
        inputs = torch.zeros((len(texts), longest), dtype=torch.long, device=model.device)
        mask = torch.zeros_like(inputs)
        for row, text in enumerate(texts):
            inputs[row, : len(text)] = torch.tensor(text, dtype=torch.long)
            mask[row, : len(text)] = 1
        logits = model.model(input_ids=inputs, attention_mask=mask, use_cache=False).logits
    for index, (ids, got) in enumerate(zip(prompts, completions, strict=True)):
        for step, token in enumerate(got):
            scores = logits[index, len(ids) + step - 1, : model.tokenizer_size].float()  # (vocab,)
            best = int(scores.argmax())
            if float(scores[best] - scores[token]) > CHECK_TOLERANCE:
                return (
                    f"the batched engine picked token {token} after {CHECK_PROMPTS[index]!r} "
                    f"where a plain forward pass ranks {best} first"
                )
    return None


def _warm(model: LoadedLM, engine: Engine) -> str | None:
    """One short prompt through `engine`: a prefill and a decode pass on the cache, every
    layer run once each way. The reason it failed, or None."""
    done = _generate_together(engine, [model.prompt_ids(CHECK_PROMPTS[0])], CHECK_TOKENS)
    return done if isinstance(done, str) else None


def _generate_together(
    engine: Engine, prompts: list[list[int]], tokens: int
) -> list[list[int]] | str:
    """Submit every prompt at once for `tokens` greedy tokens; each one's token ids, or why
    it failed."""
    params = GenerationParams(temperature=0.0, max_tokens=tokens, logprobs=0)
    results: dict[int, list[int] | BaseException] = {}
    finished = threading.Semaphore(0)

    def collector(index: int) -> object:
        picked: list[int] = []

        def deliver(item: TokenChunk | BaseException) -> None:
            if isinstance(item, BaseException):
                results[index] = item
                finished.release()
                return
            picked.extend(entry.token_id for entry in item.logprobs)
            if item.finish_reason is not None:
                results[index] = picked
                finished.release()

        return deliver

    try:
        for index, ids in enumerate(prompts):
            engine.submit(ids, params, collector(index))  # type: ignore[arg-type]
        for _ in prompts:
            if not finished.acquire(timeout=300):
                return "the batched check did not finish in 300 s"
    except Exception as exc:
        return f"the batched check failed: {type(exc).__name__}: {exc}"
    completions: list[list[int]] = []
    for index in range(len(prompts)):
        got = results[index]
        if isinstance(got, BaseException):
            return f"the batched check failed: {type(got).__name__}: {got}"
        completions.append(got)
    return completions


def engine_key(model: LoadedLM, limits: EngineLimits) -> str:
    """What decides whether the engine computes a model right: its configuration (not its
    weights' values: the engine's padding, positions and cache depend on shapes alone),
    dtype, device and the engine's rows and columns."""
    config = model.model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_commit_hash"):
        config.pop(volatile, None)
    described = json.dumps(config, sort_keys=True, default=str)
    return f"{described}|{model.dtype}|{model.device}|{limits.max_batch}x{limits.columns}"
