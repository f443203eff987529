"""One fleet replica: the hotweights engine of `hotweights serve` on its own copy of every
model the fleet serves, answering requests pinned to the generation the ingress stamped
on them.

The replica's server is built by `server/assembly.py`'s `build_state` from the
repository, as `hotweights serve --repo` builds it (one reloader per model, one per LoRA
adapter, each adapter following its base), then narrowed to the fleet's models (`--model`
and the adapters on it), without the repository's own sync: the coordinator, not the
replica, decides which version of each model is live. Each model's versions are a `ModelReplica`.

Ray-free: `fleet/deployment.py` wraps it in a Ray Serve deployment; tests drive it
directly with a fake loader.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from hotweights.config import Config
from hotweights.core import Loader
from hotweights.core.loader import Closing
from hotweights.fleet.bridge import Forwarded, Head, answer
from hotweights.fleet.model_replica import Joined, ModelReplica
from hotweights.server.adapters import serve_adapter
from hotweights.server.app import create_app
from hotweights.server.assembly import build_state
from hotweights.server.server_state import ServerState

log = logging.getLogger("hotweights.fleet")

REPLICA_HEADER = "x-hotweights-replica"


class FleetReplica:
    """The engine of one replica: `models` by name. `start` (blocking) loads each
    model's committed version; the rest is safe to call from the replica's event loop."""

    def __init__(
        self,
        config: Config,
        models: Sequence[str],
        *,
        replica_id: str,
        hold_seconds: float,
        loader: Loader[Any] | None = None,
    ) -> None:
        self.id = replica_id
        self.hold_seconds = hold_seconds
        self.state = replica_state(config, models, loader)
        adapter = {name: self.state.models[name].adapter for name in models}
        self.models = {  # the bases first: each step reaches a base before its adapters
            name: ModelReplica(
                self.state.resolve(name).reloader,
                replica_id=replica_id,
                hold_seconds=hold_seconds,
            )
            for name in sorted(models, key=lambda name: adapter[name])
        }
        self.app = create_app(self.state)

    def model(self, name: str) -> ModelReplica:
        """The model `name`; raises `KeyError` naming the ones served here."""
        found = self.models.get(name)
        if found is None:
            raise KeyError(f"replica {self.id} serves {', '.join(self.models)}, not {name!r}")
        return found

    def start(self, joined: Mapping[str, Joined], timeout: float, *, prepare: bool = True) -> None:
        """Load every model's committed version (and the one being prepared, or the one
        draining: see `ModelReplica.start`): first what is live for every model, then
        what is held beside it, so that a base's held version brings along the adapters
        live on its live one. Raises `RuntimeError` if one fails to load, and `KeyError`
        if the fleet says nothing of a model served here."""
        for name, model in self.models.items():
            model.start_live(joined[name], timeout)
        for name, model in self.models.items():
            model.start_held(joined[name], timeout, prepare=prepare)

    def catch_up(
        self, joined: Mapping[str, Joined], timeout: float, *, prepare: bool = True
    ) -> bool:
        """Bring every model in line with the fleet (see `ModelReplica.catch_up`),
        serving an adapter the fleet adopted that this replica missed. True if all were
        in line already."""
        in_line = [
            model.catch_up(joined[name], timeout, prepare=prepare)
            for name, model in self.models.items()
        ]  # the bases first: a missed adapter is loaded on what they hold now
        missed = [name for name in joined if name not in self.models]
        for name in missed:
            self.add(name, joined[name], timeout)
        return all(in_line) and not missed

    def add(self, name: str, joined: Joined, timeout: float) -> None:
        """Serve LoRA adapter `name` (one the fleet adopted) from now on, holding what
        the fleet has of it (`joined`, as `ModelReplica.start` holds it; blocking;
        nothing if it is served already: a catch-up aligns it). Raises `RuntimeError`,
        serving nothing of it, if its version cannot be loaded."""
        if name in self.models:
            return
        served = serve_adapter(self.state, name)
        model = ModelReplica(served.reloader, replica_id=self.id, hold_seconds=self.hold_seconds)
        self.state.add(served)
        try:
            model.start(joined, timeout)
        except RuntimeError:
            self.remove(name, timeout=0)
            raise
        self.models = {**self.models, name: model}

    def lagging(self, joined: Mapping[str, Joined], names: Sequence[str]) -> list[str]:
        """Those of adapters `names` whose live version here is not the fleet's committed
        one in `joined` (a finish this replica missed): a base's new version prepared
        here would bring along the wrong version of them."""
        late = []
        for name in names:
            model, fleet = self.models.get(name), joined.get(name)
            live = model.reloader.live_version if model is not None else None
            if (
                fleet is not None
                and fleet.draining is None
                and (live is None or live.generation != fleet.committed.generation)
            ):
                late.append(name)
        return late

    def remove(self, name: str, timeout: float) -> None:
        """Stop serving `name` (nothing if it is not served); what is in flight on it
        drains within `timeout`, then its memory is released."""
        self.models = {key: model for key, model in self.models.items() if key != name}
        if name in self.state.models:
            self.state.remove(name).reloader.close(timeout)

    def undecided(self) -> bool:
        """Whether some model holds a version nobody finished or aborted yet."""
        return any(model.held_generation() is not None for model in self.models.values())

    # -- requests and reports ---------------------------------------------------------------

    async def forward(self, generation: int, request: Forwarded) -> AsyncIterator[Head | bytes]:
        """Answer `request` on `generation` of the model it names (see `bridge.answer`)."""
        headers = ((REPLICA_HEADER.encode(), self.id.encode()),)
        async for item in answer(self.app, request, f"g{generation}", headers):
            yield item

    def describe(self) -> dict[str, object]:
        """This replica's versions and requests in flight by model, JSON-ready (for a
        replica of one model, that model's also at the top level)."""
        models = {name: model.describe() for name, model in self.models.items()}
        only = next(iter(models.values())) if len(models) == 1 else {}
        return {"replica": self.id, "pid": os.getpid()} | only | {"models": models}

    def metrics(self) -> bytes:
        return self.state.metrics.render()

    def close(self, timeout: float) -> None:
        self.state.close(timeout=timeout)


def replica_config(config: Config) -> Config:
    """The config a replica's own server runs with: the fleet's, with no canary of its
    own, preparing beside the live version (it serves until the commit)."""
    return replace(config, canary=None, policy="availability")


def replica_state(config: Config, models: Sequence[str], loader: Loader[Any] | None) -> ServerState:
    """The server of every model of the repository (`build_state`), narrowed to `models`:
    the others' reloaders are closed unused, and the repository's sync is dropped (the
    coordinator decides what is live). Raises `ValueError` naming a model that is not in
    the repository."""
    state = build_state(replica_config(config), loader=loader)
    if state.sync is not None:
        state.sync.close()
        state.sync = None
    missing = [name for name in models if name not in state.models]
    if missing:
        state.close(timeout=0)
        raise ValueError(
            f"the repository {config.repo} holds no model {', '.join(map(repr, missing))} "
            f"(models there: {', '.join(state.models) or 'none'})"
        )
    for name in [name for name in state.models if name not in models]:
        served = state.models.pop(name)
        served.reloader.close(0)
        if loader is None and isinstance(served.reloader.loader, Closing):  # its own
            served.reloader.loader.close()
    return state
