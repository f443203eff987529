"""What a running server holds: its configuration, its models and their reloaders."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hotweights.config import Config
from hotweights.core import Loader, Notice, Reloader
from hotweights.core.loader import Closing
from hotweights.engine.batching_loader import BatchingLoader
from hotweights.errors import Forbidden, InvalidRequest, Overloaded, UnknownModel
from hotweights.server.audit import AuditTrail
from hotweights.server.bearer import check_bearer
from hotweights.server.memory_versions import MemoryVersions
from hotweights.server.metrics import Metrics
from hotweights.sources import RepositorySync


class Residency(Protocol):
    """Which adapters keep their weights in memory (`server.adapters.AdapterResidency`)."""

    over: bool
    """More adapters are resident than the limit."""

    def touch(self, name: str) -> None:
        """Adapter `name` was just asked for."""
        ...

    def make_room(self, keep: str) -> list[str]:
        """Evict idle adapters beyond the limit (never `keep`); those evicted."""
        ...

    def observe(self, name: str) -> Callable[[Notice], None]:
        """An observer for adapter `name`'s reloader."""
        ...


@dataclass
class ServedModel:
    """One model the server answers for, with the reloader that owns its versions."""

    name: str
    reloader: Reloader[Any]
    created: int = 0
    pending: int = 0
    """Requests admitted and not yet finished (touched on the event loop only)."""
    adapter: bool = False
    """A LoRA adapter: its versions are bound to versions of a base model it follows."""

    def admit(self, limit: int) -> None:
        """Count one more request in, or raise `Overloaded` at `limit`."""
        if self.pending >= limit:
            raise Overloaded(
                f"model {self.name!r} has {self.pending} requests in progress, its limit; "
                "retry shortly"
            )
        self.pending += 1

    def done(self) -> None:
        self.pending -= 1


@dataclass
class ServerState:
    """Shared by every route of one app. Thread-safe where it is mutated (the reloaders)."""

    config: Config
    models: dict[str, ServedModel]
    executor: ThreadPoolExecutor = field(init=False)
    metrics: Metrics = field(init=False)
    audit: AuditTrail | None = field(init=False, default=None)
    sync: RepositorySync | None = None
    """Keeps the models in line with the repository, when serving one."""
    stopping: bool = False
    """Set when shutdown begins: /ready turns false and new requests get 503."""
    make_reloader: Callable[[Loader[Any], str], Reloader[Any]] | None = None
    """Builds the reloader of a model added while serving (an adapter), configured as the
    others are (gate, canary, memory check)."""
    ended: dict[str, int] = field(default_factory=dict)
    """The last generation of each model no longer served (an adapter unloaded): served
    again, it numbers after it (a generation is never reused)."""
    residency: Residency | None = None
    """Caps the adapters whose weights are resident (`--max-resident-adapters`)."""
    pushed: MemoryVersions = field(default_factory=MemoryVersions)
    """Directories of versions pushed without a repository (removed with their version)."""
    cut: threading.Event = field(default_factory=threading.Event)
    """Set just before a shutdown's grace period ends: responses still generating stop at
    their next token with `ShuttingDown` (an error event in a stream) instead of being
    dropped mid-way."""

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(
            max_workers=self.config.generation_workers, thread_name_prefix="hotweights-gen"
        )
        self.metrics = Metrics(lambda: {name: m.reloader for name, m in self.models.items()})
        if self.config.audit_file:
            self.audit = AuditTrail(Path(self.config.audit_file))
        for served in self.models.values():
            self._observe(served)

    def new_reloader(self, loader: Loader[Any], name: str) -> Reloader[Any]:
        """A reloader for a model added while serving (see `make_reloader`)."""
        if self.make_reloader is None:
            return Reloader(loader, name=name, policy=self.config.policy)
        return self.make_reloader(loader, name)

    def add(self, served: ServedModel) -> None:
        """Serve one more model (an adapter loaded through the API); its name is new."""
        if served.name in self.models:
            raise ValueError(f"model {served.name!r} is already served")
        self._observe(served)
        self.models = {**self.models, served.name: served}  # readers see the old or the new

    def remove(self, name: str) -> ServedModel:
        """Stop answering for `name` (new requests get `UnknownModel`); the caller closes
        its reloader, which drains what is in flight."""
        served = self.resolve(name)
        self.models = {key: value for key, value in self.models.items() if key != name}
        self.ended[name] = max(self.ended.get(name, 0), served.reloader.history.generation)
        return served

    def _observe(self, served: ServedModel) -> None:
        loader = served.reloader.loader
        if isinstance(loader, BatchingLoader):
            loader.on_step = self.metrics.engine_step(served.name)
        served.reloader.subscribe(self.metrics.observe)
        served.reloader.subscribe(self.pushed.observe)
        if self.audit is not None:
            served.reloader.subscribe(self.audit)

    def finished(
        self,
        served: ServedModel,
        endpoint: str,
        generation: int,
        status: int,
        seconds: float,
        tokens: int = 0,
    ) -> None:
        """A request ended with `status` after `seconds` (admission to last byte): count it,
        and tell the model's reloader (a canary's bake judges its successes and server
        errors; client errors and hang-ups say nothing about a version)."""
        self.metrics.request(served.name, endpoint, generation, status, seconds)
        if generation and (status == 200 or status >= 500):
            served.reloader.record(generation, ok=status == 200, seconds=seconds, tokens=tokens)

    def resolve(self, name: str) -> ServedModel:
        """The model a request names; raises `UnknownModel` listing the served ones."""
        served = self.models.get(name)
        if served is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise UnknownModel(f"model {name!r} is not served here (served: {known})")
        return served

    def only_model(self) -> ServedModel:
        """The model admin calls address when they name none: the only base model (its
        adapters aside)."""
        bases = [served for served in self.models.values() if not served.adapter]
        if len(bases) != 1:
            names = ", ".join(sorted(self.models))
            raise InvalidRequest(f"this server serves several models ({names}): name one")
        return bases[0]

    def check_admin(self, authorization: str | None) -> None:
        """Raise `Unauthorized`/`Forbidden` unless the admin token (if any) was presented."""
        check_bearer(self.config.admin_token, authorization, "admin token")

    def check_api_key(self, authorization: str | None) -> None:
        """Raise `Unauthorized`/`Forbidden` unless the inference API key (if any) was given."""
        check_bearer(self.config.api_key, authorization, "API key")

    def check_reload_path(self, path: str) -> str:
        """Resolve `path` (symlinks included) and refuse it unless it lies in a model root."""
        if "\x00" in path:  # realpath would raise ValueError: no file can have this name
            raise InvalidRequest("reload path contains a NUL byte")
        resolved = Path(os.path.realpath(path))
        roots = self.config.roots()
        if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
            allowed = ", ".join(str(root) for root in roots) or "none configured"
            raise Forbidden(f"reload path {path} is outside the model roots ({allowed})")
        return str(resolved)

    def close(self, timeout: float | None = None) -> None:
        if self.sync is not None:
            self.sync.close()
        # Adapters first: each of their versions holds a lease on a version of its base.
        for served in sorted(self.models.values(), key=lambda model: not model.adapter):
            served.reloader.close(timeout)
            loader = served.reloader.loader
            if isinstance(loader, Closing):  # a transformers loader's load process, say
                loader.close()
        self.pushed.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
