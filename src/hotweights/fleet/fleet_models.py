"""Which models of the repository a fleet serves: every base model, or the one `--model`
names. A LoRA adapter (a model whose version directories hold PEFT's `adapter_config.json`
and no `config.json`) is not a base model and is left out: how adapters follow their base
across a fleet's replicas is the LoRA work's to decide."""

from __future__ import annotations

import logging
from pathlib import Path

from hotweights.sources import ModelRepository

log = logging.getLogger("hotweights.fleet")
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CONFIG = "config.json"


def is_adapter(version: Path) -> bool:
    """Whether the version directory `version` holds a LoRA adapter, not a base model."""
    return (version / ADAPTER_CONFIG).is_file() and not (version / MODEL_CONFIG).is_file()


def fleet_models(repository: ModelRepository, only: str | None = None) -> list[str]:
    """The models a fleet serves from `repository` (scanned): `only`, or every base model.
    Raises `ValueError` naming what is wrong: an `only` that is not there or is an
    adapter, or a repository with no base model."""
    models = repository.models()
    adapters = {m for m in models if any(is_adapter(v.path) for v in repository.versions(m))}
    if only is not None:
        if only not in models:
            raise ValueError(
                f"model {only!r} is not in the repository {repository.root} "
                f"(models there: {', '.join(models) or 'none'})"
            )
        if only in adapters:
            raise ValueError(
                f"{only!r} in {repository.root} is a LoRA adapter: a fleet serves base "
                "models (adapters in a fleet are not built yet)"
            )
        return [only]
    if adapters:
        log.info("the fleet leaves out the LoRA adapters %s", ", ".join(sorted(adapters)))
    served = [m for m in models if m not in adapters]
    if not served:
        raise ValueError(
            f"the model repository {repository.root} holds no base model to serve "
            f"(models there: {', '.join(models) or 'none'})"
        )
    return served
