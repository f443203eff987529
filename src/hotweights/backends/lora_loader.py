"""LoRA adapters as versions of their own, each bound to one version of its base model.

`AdapterLoader` is the `Loader` of one adapter name (a reloader per adapter, as per
model): it reads a PEFT adapter directory (`lora_files`), takes a lease on a version of
the base model (the live one, or the one a base reload prepares: `BaseBound.load_on`),
checks the adapter's shapes against that version's layers, wraps the targeted layers
(`lora_layers.install`, once per base version) and gives an `AdapterModel`.

An `AdapterModel` is what a lease on the adapter's version hands out. It generates through
its base version's engine, its sequences sharing that engine's passes with the base's own
and other adapters' (each row with its adapter's update). It holds its base lease until
it is unloaded, so the base version stays resident while any adapter version on it does:
a lease on an adapter version also holds its base version.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from hotweights.backends.loaded_lm import LoadedLM
from hotweights.backends.lora_files import AdapterFiles, check_fits, estimate_bytes, read_adapter
from hotweights.backends.lora_layers import (
    AdapterGroup,
    LoraWeights,
    install,
    linear_shapes,
    selecting,
)
from hotweights.core import Lease, ServingView
from hotweights.errors import LoadError, ValidationError
from hotweights.generation import (
    Deliver,
    Engine,
    GenerationParams,
    OutputConstraint,
    Ticket,
    TokenChunk,
    ToolCallFormat,
)

BaseResolver = Callable[[str, str | None], tuple[str, ServingView[Any]]]
"""(adapter name, the base its config names or None) -> the base model's name and its
reloader's serving view; raises `LoadError` when no served model is its base."""

WARMUP_PROMPT = "Hi"
BASE_WAIT = 600.0
"""Seconds an adapter's load waits for its base to have a live version."""
BASE_POLL = 0.05


@runtime_checkable
class TakesAdapters(Protocol):
    """An engine that can generate a sequence with a LoRA adapter's updates (the batched
    engine and the per-request one both can)."""

    columns: int

    def submit(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        deliver: Deliver,
        cut: threading.Event | None = None,
        adapter: LoraWeights | None = None,
    ) -> Ticket: ...

    def stop(self, timeout: float | None = None) -> None: ...

    def load(self) -> dict[str, int]: ...


class AdapterEngine:
    """The base version's engine, seen from one adapter version: every sequence submitted
    here carries the adapter. Stopping it stops nothing (the base owns its engine)."""

    def __init__(self, engine: TakesAdapters, weights: LoraWeights) -> None:
        self._engine = engine
        self._weights = weights
        self.columns = engine.columns

    def submit(
        self,
        prompt_ids: list[int],
        params: GenerationParams,
        deliver: Deliver,
        cut: threading.Event | None = None,
    ) -> Ticket:
        return self._engine.submit(prompt_ids, params, deliver, cut, adapter=self._weights)

    def stop(self, timeout: float | None = None) -> None:
        """Nothing: the adapter's version goes, its base's engine stays."""

    def load(self) -> dict[str, int]:
        return self._engine.load()


@dataclass(frozen=True)
class Binding:
    """An adapter's weights on one base version, and the lease that holds that version."""

    weights: LoraWeights
    base_name: str
    lease: Lease[Any]


class AdapterModel:
    """One adapter version, bound to one base version, until unloaded (see the module).

    Thread-safe as `LoadedLM` is: it only reads the adapter's weights and delegates to its
    base. `evict` drops the weights and the base lease of an idle version, which stays the
    live version of its adapter; `restore` (a request for it) reads its files again, on the
    base's live version. After `release`, `engine` is None and the rest raises
    `ModelRetired`."""

    def __init__(
        self, name: str, files: AdapterFiles, binding: Binding, bind: Callable[[], Binding]
    ) -> None:
        self.name = name
        self.source = str(files.path)
        self.fingerprint = files.fingerprint
        self._bind = bind
        self._lock = threading.Lock()
        self._binding: Binding | None = None
        self._released = False
        self._take(binding)

    def _take(self, binding: Binding) -> None:
        self._binding = binding
        self._base: LoadedLM = binding.lease.model
        self.base_name = binding.base_name
        """The base model's name."""
        self.base_generation = binding.lease.generation
        """The base version this adapter version is bound to (the last, once evicted)."""
        self.base_fingerprint = binding.lease.version.fingerprint or ""

    @property
    def weights(self) -> LoraWeights | None:
        binding = self._binding
        return binding.weights if binding is not None else None

    @property
    def evicted(self) -> bool:
        """Its weights were dropped to make room; `restore` brings them back."""
        return self._binding is None and not self._released

    @property
    def base(self) -> LoadedLM:
        return self._base

    @property
    def engine(self) -> Engine | None:
        weights, engine = self.weights, self._base.engine
        if weights is None or not isinstance(engine, TakesAdapters):
            return None
        return AdapterEngine(engine, weights)

    @property
    def engine_note(self) -> str:
        return f"adapter on {self.base_name} g{self.base_generation}: {self._base.engine_note}"

    @property
    def eos_ids(self) -> frozenset[int]:
        return self._base.eos_ids

    @property
    def max_positions(self) -> int | None:
        return self._base.max_positions

    @property
    def tool_format(self) -> ToolCallFormat | None:
        return self._base.tool_format

    def evict(self) -> bool:
        """Drop the weights and the base lease (the caller knows no request holds this
        version); False if they were already dropped or the version unloaded."""
        with self._lock:
            binding, self._binding = self._binding, None
        if binding is None:
            return False
        binding.lease.release()
        return True

    def restore(self) -> None:
        """Bring evicted weights back, on the base's live version: the same files (their
        fingerprint is checked), no gate (this version served). Blocks while it reads
        them; raises `LoadError` if they changed or no longer fit, `ModelRetired` once
        unloaded."""
        with self._lock:
            if self._released:
                raise self._base.retired()
            if self._binding is None:
                self._take(self._bind())

    def release(self) -> None:
        """Drop the adapter's weights and the lease on its base version. Idempotent."""
        with self._lock:
            self._released = True
            binding, self._binding = self._binding, None
        if binding is not None:
            binding.lease.release()

    # The base's tokenizer and chat template serve the adapter unchanged.
    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        return self._base.apply_chat_template(messages)

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> str:
        return self._base.render_chat(messages, tools)

    def check_constraint(self, constraint: OutputConstraint) -> None:
        self._base.check_constraint(constraint)

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        return self._base.prompt_ids(prompt)

    def encode(self, text: str) -> list[int]:
        return self._base.encode(text)

    def count_tokens(self, text: str) -> int:
        return self._base.count_tokens(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._base.decode(ids)

    def stream(self, prompt: str | Sequence[int], params: GenerationParams) -> Iterator[TokenChunk]:
        """The base's own decode loop with this adapter applied (the gate's way to ask)."""
        self.restore()
        weights = self.weights
        if weights is None:
            raise self._base.retired()
        chunks = self._base.stream(prompt, params)
        return _with_adapter(chunks, (AdapterGroup(weights, None),))


def _with_adapter(
    chunks: Iterator[TokenChunk], groups: tuple[AdapterGroup, ...]
) -> Iterator[TokenChunk]:
    try:
        while True:
            with selecting(groups):
                chunk = next(chunks, None)
            if chunk is None:
                return
            yield chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


class AdapterLoader:
    """`Loader[AdapterModel]` of one adapter (see the module). Called by its reloader's
    worker, like every loader; `resolve` finds the base model."""

    def __init__(self, name: str, resolve: BaseResolver, *, allow_pickle: bool = False) -> None:
        self.name = name
        self.resolve = resolve
        self.allow_pickle = allow_pickle

    def load(self, source: str) -> AdapterModel:
        return self.load_on(source, None)

    def load_on(self, source: str, base_generation: int | None) -> AdapterModel:
        """Read `source` and bind it to the base's `base_generation` (live when None)."""
        files = read_adapter(source, allow_pickle=self.allow_pickle)
        binding = self._bind(files, base_generation)

        def again() -> Binding:  # an evicted version brought back: its files, unchanged
            now = read_adapter(source, allow_pickle=self.allow_pickle)
            if now.fingerprint != files.fingerprint:
                raise LoadError(
                    f"adapter {self.name}: the files in {source} changed since this version "
                    "was loaded, so it cannot be brought back; load or publish it again"
                )
            return self._bind(now, None)

        return AdapterModel(self.name, files, binding, again)

    def _bind(self, files: AdapterFiles, base_generation: int | None) -> Binding:
        """`files`' updates on the base's `base_generation` (live when None), checked
        against its layers, which are wrapped to apply them."""
        base_name, base = self.resolve(self.name, files.base_model)
        lease = _lease_base(base, base_name, base_generation)
        try:
            with lease.use() as lm:
                check_fits(files, linear_shapes(lm.model))
                _refuse_head(files, lm.model)
                install(lm.model, list(files.pairs))
                like = next(lm.model.parameters())
                pairs = {name: (p.a, p.b, p.scale) for name, p in files.pairs.items()}
                weights = LoraWeights(self.name, pairs, like=like)
        except BaseException:
            lease.release()
            raise
        return Binding(weights, base_name, lease)

    def validate(self, model: AdapterModel) -> None:
        """Every update must be finite (a diverged fine-tune saves NaNs)."""
        import torch

        weights = model.weights
        if weights is None:
            raise ValidationError(f"adapter {self.name} from {model.source} was unloaded")
        for module, (down, up) in weights.updates.items():
            if not (bool(torch.isfinite(down).all()) and bool(torch.isfinite(up).all())):
                raise ValidationError(
                    f"adapter {self.name} from {model.source}: module {module} has values "
                    "that are not finite (NaN or infinity)"
                )

    def warmup(self, model: AdapterModel) -> None:
        """Two greedy tokens through the base's engine with this adapter: the adapter's
        first pass is not a request's."""
        engine = model.engine
        if engine is None:
            raise ValidationError(f"base {model.base_name} g{model.base_generation} has no engine")
        done = threading.Event()
        failed: list[BaseException] = []

        def deliver(item: TokenChunk | BaseException) -> None:
            if isinstance(item, BaseException):
                failed.append(item)
                done.set()
            elif item.finish_reason is not None:
                done.set()

        params = GenerationParams(temperature=0.0, max_tokens=2)
        engine.submit(model.prompt_ids(WARMUP_PROMPT), params, deliver)
        if not done.wait(300):
            raise ValidationError(f"adapter {self.name}: warmup did not finish in 300 s")
        if failed:
            raise ValidationError(f"adapter {self.name}: warmup failed: {failed[0]}")

    def unload(self, model: AdapterModel) -> None:
        model.release()

    def fingerprint(self, source: str) -> str:
        return read_adapter(source, allow_pickle=self.allow_pickle).fingerprint

    def estimate_bytes(self, source: str) -> int:
        return estimate_bytes(source)


def _refuse_head(files: AdapterFiles, model: Any) -> None:
    """The engine computes the output head only at the positions whose logits it keeps,
    so an update to the head could not be matched to its tokens: refuse one."""
    head = model.get_output_embeddings()
    for name in files.pairs:
        if head is not None and model.get_submodule(name) is head:
            raise LoadError(
                f"{files.path}: module {name} is the model's output head; LoRA updates of "
                "the output head are not supported (the layers inside the model are)"
            )


def _lease_base(base: ServingView[Any], name: str, generation: int | None) -> Lease[Any]:
    """A lease on the base's `generation` (resident) or on its live version (waiting up
    to `BASE_WAIT` seconds for one: at startup the base may still be loading)."""
    if generation is None:
        deadline = time.monotonic() + BASE_WAIT
        while base.live_version is None and time.monotonic() < deadline:
            time.sleep(BASE_POLL)
        live = base.live_version
        lease = base.acquire_resident(lambda v: v is live) if live is not None else None
        if lease is None:
            raise LoadError(f"base model {name} has no live version to load the adapter on")
    else:
        lease = base.acquire_resident(lambda v: v.generation == generation)
        if lease is None:
            raise LoadError(f"base model {name} has no resident generation {generation}")
    if not isinstance(lease.model, LoadedLM):
        lease.release()
        raise LoadError(f"base model {name} is not a transformers model: LoRA needs one")
    return lease
