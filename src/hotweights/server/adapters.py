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

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hotweights.backends.lora_loader import AdapterLoader, AdapterModel
from hotweights.core import (
    Lease,
    ModelVersion,
    Notice,
    PreparedVersion,
    Reloader,
    ServingView,
    VersionChanged,
    VersionState,
)
from hotweights.core.following import prepare_followers
from hotweights.errors import InvalidRequest, NotReady
from hotweights.server.server_state import ServedModel, ServerState
from hotweights.sources.adapter_base import choose_base, is_adapter_version

log = logging.getLogger("hotweights.server")

GENERATION_HEADER = "x-hotweights-generation"
ADAPTER_GENERATION_HEADER = "x-hotweights-adapter-generation"


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
                "resident": not model.evicted,
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
    """The served base model `adapter` applies to (`choose_base`); `named` is its config's
    `base_model_name_or_path`. Raises `LoadError` naming what was looked for."""
    bases = {name: m for name, m in state.models.items() if not m.adapter}
    name = choose_base(adapter, named, bases, state.config.lora_base)
    return name, bases[name].reloader


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
    reloader = state.new_reloader(loader, name)
    reloader.history.continue_after(state.ended.get(name, 0))
    if state.residency is not None:
        reloader.subscribe(state.residency.observe(name))
    return ServedModel(name, reloader, int(time.time()), adapter=True)


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

    def prepare_on(
        self, base: PreparedVersion[Any], generations: Mapping[str, int]
    ) -> tuple[PreparedVersion[Any], ...]:
        return prepare_followers(base, self._adapters(), generations)

    def _adapters(self) -> list[Reloader[Any]]:
        """The reloaders of the adapters whose live version is bound to this base (an
        evicted one holds no base: it binds to the live base when it comes back)."""
        return [
            served.reloader
            for _, served, model in live_adapters(self.state)
            if model.base_name == self.base and not model.evicted
        ]


class AdapterResidency:
    """Keeps the weights of at most `limit` adapters resident (0: no limit), evicting the
    least recently used idle ones: an adapter with a lease on any of its versions is never
    evicted. An evicted adapter's live version stays its live version (its generation, its
    source); a request for it waits in admission while its weights are read again
    (`admit_adapter`). Thread-safe."""

    def __init__(self, state: ServerState, limit: int) -> None:
        self.state = state
        self.limit = limit
        self._lock = threading.Lock()
        self._used: dict[str, float] = {}
        self.over = False
        """More adapters resident than the limit (those beyond it had requests in flight):
        a later admission tries again. Read on the request path instead of counting."""

    def touch(self, name: str) -> None:
        self._used[name] = time.monotonic()

    def observe(self, name: str) -> Callable[[Notice], None]:
        """An observer for adapter `name`'s reloader: a version of it going live may
        leave one adapter too many resident."""

        def observer(notice: Notice) -> None:
            if isinstance(notice, VersionChanged) and notice.new is VersionState.LIVE:
                self.touch(name)
                self.make_room(keep=name)

        return observer

    def make_room(self, keep: str) -> list[str]:
        """Evict idle adapters, least recently used first (never `keep`), until at most
        `limit` are resident; returns those evicted. Leaves more resident when the others
        all have requests in flight."""
        if not self.limit:
            return []
        evicted: list[str] = []
        with self._lock:
            resident = [
                (name, served, model)
                for name, served, model in live_adapters(self.state)
                if not model.evicted
            ]
            excess = len(resident) - self.limit
            for name, served, model in sorted(resident, key=lambda r: self._used.get(r[0], 0.0)):
                if excess <= 0:
                    break
                if name == keep or any(served.reloader.inflight().values()):
                    continue
                if model.evict():
                    excess -= 1
                    evicted.append(name)
                    log.info("adapter %s evicted (--max-resident-adapters %d)", name, self.limit)
            self.over = excess > 0
        return evicted

    def resident(self) -> dict[str, bool]:
        """Each adapter with a live version: whether its weights are resident."""
        return {name: not model.evicted for name, _, model in live_adapters(self.state)}


def live_adapters(state: ServerState) -> list[tuple[str, ServedModel, AdapterModel]]:
    """Each adapter with a live version: its name, its served model, that version's model."""
    found = []
    for name, served in state.models.items():
        live = served.reloader.live_version
        for version, model in served.reloader.models() if served.adapter else ():
            if version is live and isinstance(model, AdapterModel):
                found.append((name, served, model))
    return found


async def admit_adapter(state: ServerState, served: ServedModel, lease: Lease[Any]) -> None:
    """After a request for an adapter took its lease: note the use, bring its weights back
    if they were evicted (waiting up to the admission timeout), and evict idle others
    beyond the limit.
    Raises `NotReady` when they did not come back in time, `LoadError` when they cannot."""
    model = lease.model
    if not isinstance(model, AdapterModel):
        return
    residency = state.residency
    if residency is not None:
        residency.touch(served.name)
    if not model.evicted:
        if residency is not None and residency.over:  # one kept by its requests may go now
            residency.make_room(keep=served.name)
        return
    loop = asyncio.get_running_loop()
    limit = state.config.admission_timeout
    try:
        await asyncio.wait_for(loop.run_in_executor(state.executor, model.restore), limit)
    except TimeoutError:
        raise NotReady(
            f"adapter {served.name} was evicted and not read back within the admission "
            f"timeout ({limit:g} s)"
        ) from None
    if residency is not None:
        residency.make_room(keep=served.name)


def holds_adapters(model_dir: Path) -> bool:
    """Whether a repository's model directory holds LoRA adapter versions (its newest
    version directory has an `adapter_config.json`)."""
    numbers = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir()]
    return bool(numbers) and is_adapter_version(model_dir / str(max(numbers)))


def adopt_adapter(state: ServerState, model_dir: Path) -> Reloader[Any] | None:
    """Serve the adapter in `model_dir`, a model directory of the repository that appeared
    (or got a newer version after an unload) while serving: its reloader, for the
    repository's sync to drive; None for a directory that holds no adapter (a new base
    model is served after a restart)."""
    name = model_dir.name
    if name in state.models or not holds_adapters(model_dir):
        return None
    served = serve_adapter(state, name)
    state.add(served)
    log.info("%s: a new adapter in the repository, served", name)
    return served.reloader
