"""A server's LoRA adapters: each a served model with a reloader of its own, whose
versions are bound to versions of a base model it follows.

- `serve_adapter` makes an adapter name a served model (its reloader's loader is an
  `AdapterLoader`): at startup for an adapter in the repository, or when
  `/v1/load_lora_adapter` names a new one.
- `find_base` decides which served model an adapter applies to: the one its config's
  `base_model_name_or_path` names, else `--lora-base`, else the only base model served.
- `AdapterFollowers` is given to each base model's reloader (`Followers`): once a new base
  version is prepared, every adapter serving on that base is prepared again on it (no
  gate: those versions served), and the base and its adapters are committed together. One
  that does not fit the new base refuses it, and the refusal names the adapter.
- `stamp` names both generations in a response: `x-hotweights-generation` the base's,
  `x-hotweights-adapter-generation` the adapter's, `system_fingerprint`
  `hw-g<base>-a<adapter>-<hash>`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hotweights.backends.lora_loader import AdapterLoader, AdapterModel
from hotweights.core import (
    Decision,
    Lease,
    ModelVersion,
    PreparedVersion,
    Reloader,
    ServingView,
)
from hotweights.errors import FollowFailed, InvalidRequest, LoadError
from hotweights.server.server_state import ServedModel, ServerState

log = logging.getLogger("hotweights.server")

GENERATION_HEADER = "x-hotweights-generation"
ADAPTER_GENERATION_HEADER = "x-hotweights-adapter-generation"
FOLLOW_SECONDS = 600.0
"""How long a base reload waits for one adapter to be prepared on the new base."""


def stamp(lease: Lease[Any]) -> tuple[str, dict[str, str]]:
    """The `system_fingerprint` and headers of a response served on `lease`."""
    version = lease.version
    model = lease.model if not lease.released else None
    if isinstance(model, AdapterModel):
        digest = (version.fingerprint or "00000000")[:8]
        fingerprint = f"hw-g{model.base_generation}-a{version.generation}-{digest}"
        headers = {
            GENERATION_HEADER: str(model.base_generation),
            ADAPTER_GENERATION_HEADER: str(version.generation),
        }
        return fingerprint, headers
    return version.system_fingerprint, {GENERATION_HEADER: str(lease.generation)}


def adapter_entry(served: ServedModel, version: ModelVersion | None) -> dict[str, object]:
    """What `/v1/models` adds for an adapter: its base (`parent`, as vLLM names it), the
    base generation its `version` is bound to, and its fingerprint with both generations."""
    for resident, model in served.reloader.models():
        if resident is version and isinstance(model, AdapterModel):
            digest = (resident.fingerprint or "00000000")[:8]
            return {
                "parent": model.base_name,
                "base_generation": model.base_generation,
                "fingerprint": f"hw-g{model.base_generation}-a{resident.generation}-{digest}",
            }
    return {"parent": None, "base_generation": None}


def check_adapter_name(state: ServerState, name: str) -> None:
    """Raise `InvalidRequest` for a name an adapter cannot have: empty, with `@` or `/`
    (pins and paths), or a served base model's."""
    if not name or "@" in name or "/" in name or name != name.strip():
        raise InvalidRequest(
            f"lora_name {name!r}: give a non-empty name without '@', '/' or surrounding spaces"
        )
    served = state.models.get(name)
    if served is not None and not served.adapter:
        raise InvalidRequest(f"lora_name {name!r} is a served base model's name")


def find_base(state: ServerState, adapter: str, named: str | None) -> tuple[str, ServingView[Any]]:
    """The served base model `adapter` applies to (see the module); `named` is its config's
    `base_model_name_or_path`. Raises `LoadError` naming what was looked for."""
    bases = {name: m for name, m in state.models.items() if not m.adapter}
    if named:
        for candidate in (named, _model_name(named)):
            if candidate in bases:
                return candidate, bases[candidate].reloader
    fallback = state.config.lora_base
    if fallback is not None:
        if fallback not in bases:
            raise LoadError(f"--lora-base {fallback!r} is not a served model ({_listed(bases)})")
        return fallback, bases[fallback].reloader
    if len(bases) == 1:
        (name, served), = bases.items()  # fmt: skip
        return name, served.reloader
    raise LoadError(
        f"adapter {adapter}: its adapter_config.json names base model {named!r}, which is "
        f"not served here ({_listed(bases)}); name one with --lora-base"
    )


def serve_adapter(state: ServerState, name: str) -> ServedModel:
    """A served model for adapter `name`, with its own reloader (not yet added to
    `state`, and with nothing loaded)."""
    config = state.config
    if config.policy != "availability":
        raise InvalidRequest(
            "LoRA adapters need the availability policy: an adapter version holds its base "
            "version, which the resource policy unloads before loading the next"
        )

    def resolve(adapter: str, named: str | None) -> tuple[str, ServingView[Any]]:
        return find_base(state, adapter, named)

    loader = AdapterLoader(name, resolve, allow_pickle=config.allow_pickle)
    return ServedModel(name, state.new_reloader(loader, name), int(time.time()), adapter=True)


def follow_bases(state: ServerState) -> None:
    """Have every base model's reloader bring its adapters along (`AdapterFollowers`)."""
    for name, served in state.models.items():
        if not served.adapter:
            served.reloader.follow_with(AdapterFollowers(state, name))


class AdapterFollowers:
    """The adapters of one base model, as that base's reloader's `Followers`."""

    def __init__(self, state: ServerState, base: str) -> None:
        self.state = state
        self.base = base

    def prepare_on(self, base: PreparedVersion[Any]) -> tuple[PreparedVersion[Any], ...]:
        prepared: list[PreparedVersion[Any]] = []
        try:
            for name, reloader in self._adapters():
                live = reloader.live_version
                if live is None:
                    continue
                ticket = reloader.prepare(
                    live.source,
                    trigger="follow",
                    description=f"{name} on {self.base} g{base.generation}",
                    base_generation=base.generation,
                    hold_seconds=FOLLOW_SECONDS,
                )
                result = ticket.wait(FOLLOW_SECONDS)
                if not isinstance(result, PreparedVersion):
                    reason = result.error_message or result.outcome.value
                    raise FollowFailed(
                        f"adapter {name} (from {live.source}) does not follow {self.base} "
                        f"g{base.generation}: {reason}"
                    )
                prepared.append(result)
        except BaseException:
            for handle in prepared:
                handle.claim(Decision.DISCARD, f"{self.base} g{base.generation} was refused")
            raise
        return tuple(prepared)

    def _adapters(self) -> list[tuple[str, Reloader[Any]]]:
        """The adapters whose live version is bound to this base."""
        found = []
        for name, served in self.state.models.items():
            if not served.adapter:
                continue
            models = served.reloader.models()
            live = served.reloader.live_version
            for version, model in models:
                bound = isinstance(model, AdapterModel) and model.base_name == self.base
                if version is live and bound:
                    found.append((name, served.reloader))
        return found


def _model_name(named: str) -> str:
    """`models/my-llm/3` names `my-llm`; any other path its last part."""
    path = Path(named)
    return path.parent.name if path.name.isdigit() else path.name


def _listed(bases: dict[str, ServedModel]) -> str:
    return "served: " + (", ".join(sorted(bases)) or "none")
