"""Which models of the repository a fleet serves: every base model (or the one `--model`
names) and the LoRA adapters that apply to them. An adapter is a model whose newest
version directory holds PEFT's `adapter_config.json`; its base is decided as a single
server decides it (`sources/adapter_base.py`), so each replica binds the
adapter to the base the coordinator cuts it over with. An adapter whose base is not
served, or with no eligible version (all marked bad, say), is left out, and the log says
why."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from hotweights.errors import LoadError
from hotweights.sources import ModelRepository
from hotweights.sources.adapter_base import choose_base, is_adapter_version, named_base

log = logging.getLogger("hotweights.fleet")


@dataclass(frozen=True)
class FleetModels:
    """The base models a fleet serves, and each adapter it serves with its base."""

    bases: list[str]
    adapters: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Every model served: the bases first (an adapter's versions bind to its base's)."""
        return [*self.bases, *self.adapters]


def fleet_models(
    repository: ModelRepository, only: str | None = None, lora_base: str | None = None
) -> FleetModels:
    """The models a fleet serves from `repository` (scanned): `only` (or every base
    model) and the adapters on them; `lora_base` is `--lora-base`. Raises `ValueError`
    naming what is wrong: an `only` that is not there or is an adapter, or a repository
    with no base model."""
    models = repository.models()
    adapters = [m for m in models if _is_adapter(repository, m)]
    if only is not None:
        if only not in models:
            raise ValueError(
                f"model {only!r} is not in the repository {repository.root} "
                f"(models there: {', '.join(models) or 'none'})"
            )
        if only in adapters:
            raise ValueError(
                f"{only!r} in {repository.root} is a LoRA adapter: name its base model with "
                "--model (the fleet serves the adapters on it too)"
            )
    bases = [only] if only is not None else [m for m in models if m not in adapters]
    if not bases:
        raise ValueError(
            f"the model repository {repository.root} holds no base model to serve "
            f"(models there: {', '.join(models) or 'none'})"
        )
    every_base = [m for m in models if m not in adapters]
    served: dict[str, str] = {}
    for adapter in adapters:
        if repository.target(adapter) is None:
            log.warning("the fleet leaves out adapter %s: it has no eligible version", adapter)
            continue
        newest = repository.versions(adapter)[-1]
        try:
            base = choose_base(adapter, named_base(newest.path), every_base, lora_base)
        except LoadError as exc:
            log.warning("the fleet leaves out adapter %s: %s", adapter, exc)
            continue
        if base in bases:
            served[adapter] = base
        else:
            log.info("the fleet leaves out adapter %s: its base %s is not served", adapter, base)
    return FleetModels(bases, served)


def _is_adapter(repository: ModelRepository, model: str) -> bool:
    """Whether `model`'s newest version directory holds an adapter (as a server decides)."""
    versions = repository.versions(model)
    return bool(versions) and is_adapter_version(versions[-1].path)
