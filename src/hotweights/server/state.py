"""What a running server holds: its configuration, its models and their reloaders."""

from __future__ import annotations

import hmac
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotweights.config import Config
from hotweights.core import Reloader
from hotweights.errors import Forbidden, InvalidRequest, Unauthorized, UnknownModel
from hotweights.server.metrics import Metrics


@dataclass
class ServedModel:
    """One model the server answers for, with the reloader that owns its versions."""

    name: str
    reloader: Reloader[Any]
    created: int = 0


@dataclass
class ServerState:
    """Shared by every route of one app. Thread-safe where it is mutated (the reloaders)."""

    config: Config
    models: dict[str, ServedModel]
    executor: ThreadPoolExecutor = field(init=False)
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(
            max_workers=self.config.generation_workers, thread_name_prefix="hotweights-gen"
        )
        self.metrics = Metrics(lambda: {name: m.reloader for name, m in self.models.items()})
        for served in self.models.values():
            served.reloader.subscribe(self.metrics.observe)

    def resolve(self, name: str) -> ServedModel:
        """The model a request names; raises `UnknownModel` listing the served ones."""
        served = self.models.get(name)
        if served is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise UnknownModel(f"model {name!r} is not served here (served: {known})")
        return served

    def only_model(self) -> ServedModel:
        """The model admin calls address when they name none."""
        if len(self.models) != 1:
            raise InvalidRequest("this server serves several models: name one")
        return next(iter(self.models.values()))

    def check_admin(self, authorization: str | None) -> None:
        """Raise `Unauthorized`/`Forbidden` unless the admin token (if any) was presented."""
        token = self.config.admin_token
        if not token:
            return
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthorized("admin endpoints need 'Authorization: Bearer <admin token>'")
        presented = authorization.removeprefix("Bearer ").strip()
        if not hmac.compare_digest(presented.encode(), token.encode()):
            raise Forbidden("the admin token is wrong")

    def check_reload_path(self, path: str) -> str:
        """Resolve `path` (symlinks included) and refuse it unless it lies in a model root."""
        resolved = Path(os.path.realpath(path))
        roots = self.config.roots()
        if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
            allowed = ", ".join(str(root) for root in roots) or "none configured"
            raise Forbidden(f"reload path {path} is outside the model roots ({allowed})")
        return str(resolved)

    def close(self, timeout: float | None = None) -> None:
        for served in self.models.values():
            served.reloader.close(timeout)
        self.executor.shutdown(wait=False, cancel_futures=True)
