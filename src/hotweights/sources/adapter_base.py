"""Which base model a LoRA adapter of the repository applies to, decided from names
alone: the served model its `adapter_config.json` names (`base_model_name_or_path`, or
the model directory a path to a version names), else the one `--lora-base` names, else
the only base model served. A single server (`server/adapters.py`) and a fleet's
coordinator (`fleet/fleet_models.py`) decide it the same way, so a fleet's replicas bind
each adapter to the base the coordinator cuts it over with."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

from hotweights.errors import LoadError

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_version(version: Path) -> bool:
    """Whether the version directory `version` holds a LoRA adapter (PEFT's config)."""
    try:
        return (version / ADAPTER_CONFIG).is_file()
    except OSError:
        return False


def named_base(version: Path) -> str | None:
    """The `base_model_name_or_path` of the adapter in `version`; None when it names none
    or its config cannot be read (the adapter's load then says what is wrong with it)."""
    try:
        config = json.loads((version / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    named = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return named if isinstance(named, str) and named else None


def choose_base(
    adapter: str, named: str | None, bases: Collection[str], fallback: str | None
) -> str:
    """The base model among `bases` that `adapter` applies to (see the module); `named`
    is its config's `base_model_name_or_path`, `fallback` the `--lora-base` name. Raises
    `LoadError` naming what was looked for."""
    if named:
        for candidate in (named, model_name(named)):
            if candidate in bases:
                return candidate
    if fallback is not None:
        if fallback not in bases:
            raise LoadError(f"--lora-base {fallback!r} is not a served model ({_listed(bases)})")
        return fallback
    if len(bases) == 1:
        return next(iter(bases))
    raise LoadError(
        f"adapter {adapter}: its adapter_config.json names base model {named!r}, which is "
        f"not served here ({_listed(bases)}); name one with --lora-base"
    )


def model_name(named: str) -> str:
    """`models/my-llm/3` names `my-llm`; any other path its last part."""
    path = Path(named)
    return path.parent.name if path.name.isdigit() else path.name


def _listed(bases: Collection[str]) -> str:
    return "served: " + (", ".join(sorted(bases)) or "none")
