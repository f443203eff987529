"""LoRA updates applied inside a base model's linear layers, per token, for many adapters
in one forward pass.

An adapter version's low-rank updates (`LoraWeights`) never touch the base weights: each
targeted `nn.Linear` of the base model is wrapped once (`install`) by a module that
computes the base layer's output and then adds, for each group of tokens that asked for an
adapter, that adapter's update to those tokens' rows only (`y[i] += (x[i] @ A.T) @ B.T *
scale`), as punica and S-LoRA do: tokens are grouped by adapter, so a pass costs one pair
of small matrix products per adapter present in it, whatever the batch.

Which tokens belong to which adapter is per thread (`selecting`): the batched engine sets
it around each pass from its sequences; the per-request loop sets one adapter for its
whole pass. Outside both, and for rows with no adapter, the wrapped layer is the base
layer exactly (one attribute read more). A wrapped model stays the same model: its
parameters, and so every base version's own weights, are unchanged, and wrapping a layer
is one reference assignment, safe while another thread runs a pass.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from hotweights.errors import LoadError

if TYPE_CHECKING:
    import torch

_local = threading.local()
_serials = itertools.count(1)


class LoraWeights:
    """One adapter version's updates on its base model's device and dtype: per module
    name, `A.T` (in, rank) and `B.T * scale` (rank, out). Read-only once built; `key` is
    unique in the process (a prefix cache keys adapter rows with it, so no two versions,
    nor an adapter and its base, ever share cached keys and values)."""

    def __init__(self, name: str, pairs: Mapping[str, tuple[Any, Any, float]], *, like: Any):
        """`pairs`: module name -> (A (rank, in), B (out, rank), scale), as PEFT saves them;
        `like`: a base parameter whose device and dtype the updates take."""
        self.name = name
        self.key = f"lora-{next(_serials)}"
        self.updates: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
            module: (
                a.to(device=like.device, dtype=like.dtype).t().contiguous(),
                (b.to(device=like.device, dtype=like.dtype).t() * scale).contiguous(),
            )
            for module, (a, b, scale) in pairs.items()
        }
        self.nbytes = sum(a.nbytes + b.nbytes for a, b in self.updates.values())

    def __repr__(self) -> str:
        return f"LoraWeights({self.name!r}, {len(self.updates)} modules, {self.key})"


@dataclass(frozen=True)
class AdapterGroup:
    """The tokens of one pass that use one adapter: flat positions (a (n,) long tensor on
    the model's device), or None for every token of the pass."""

    weights: LoraWeights
    index: torch.Tensor | None


@contextmanager
def selecting(groups: tuple[AdapterGroup, ...]) -> Iterator[None]:
    """Apply `groups`' adapters in this thread's forward passes for the duration."""
    previous = getattr(_local, "groups", ())
    _local.groups = groups
    try:
        yield
    finally:
        _local.groups = previous


def install(model: Any, modules: list[str]) -> None:
    """Wrap each named `nn.Linear` of `model` (once; a wrapped one stays as it is). Raises
    `LoadError` for a name that is not a linear layer of `model`."""
    import torch

    wrapper = _wrapper_class()
    for name in modules:
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            current = getattr(parent, child)
        except AttributeError as exc:
            raise LoadError(f"the base model has no module {name!r}") from exc
        if isinstance(current, wrapper):
            continue
        if not isinstance(current, torch.nn.Linear):
            raise LoadError(
                f"module {name!r} of the base model is a {type(current).__name__}; "
                "LoRA updates apply to linear layers only"
            )
        setattr(parent, child, wrapper(name, current))


def linear_shapes(model: Any) -> dict[str, tuple[int, int]]:
    """Every linear layer of `model` (wrapped or not) by name: (in_features, out_features)."""
    import torch

    wrapper = _wrapper_class()
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, wrapper):
            module = module.base
        elif name.endswith(".base") and isinstance(model.get_submodule(name[:-5]), wrapper):
            continue
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.in_features, module.out_features)
    return shapes


@cache
def _wrapper_class() -> type[Any]:
    """`LoraLinear`, built on first use (so importing this module imports no torch)."""
    import torch

    class LoraLinear(torch.nn.Module):
        """A base linear layer plus the updates of the adapters selected on this thread."""

        def __init__(self, name: str, base: torch.nn.Linear) -> None:
            super().__init__()
            self.name = name
            self.base = base

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
            out: torch.Tensor = self.base(x)  # (..., out), a fresh tensor: updated in place
            groups: tuple[AdapterGroup, ...] = getattr(_local, "groups", ())
            if not groups:
                return out
            flat = x.reshape(-1, x.shape[-1])  # (tokens, in)
            flat_out = out.view(-1, out.shape[-1])  # (tokens, out)
            for group in groups:
                update = group.weights.updates.get(self.name)
                if update is None:
                    continue
                down, up = update  # (in, rank), (rank, out)
                if group.index is None:
                    flat_out.addmm_(flat @ down, up)
                else:
                    picked = flat.index_select(0, group.index) @ down  # (n, rank)
                    flat_out.index_add_(0, group.index, picked @ up)
            return out

        def extra_repr(self) -> str:
            return f"name={self.name!r}"

    return LoraLinear
