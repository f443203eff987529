from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hotweights.config import Config
from hotweights.core import Loader
from hotweights.server.assembly import build_state
from hotweights.testing import ServerThread

Serve = Callable[..., ServerThread]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start a real uvicorn server on a free loopback port; stopped at teardown."""
    running: list[ServerThread] = []

    def start(
        loader: Loader[Any], source: Path | None, *, wait: bool = True, **options: Any
    ) -> ServerThread:
        """Serve `source` (a directory) or, with `repo=...`, a repository."""
        if source is not None:
            options.setdefault("model_name", "m")
            options.setdefault("model_roots", (str(source.parent),))
            options["source"] = str(source)
        config = Config.load(options, environ={})
        server = ServerThread(build_state(config, loader)).start()
        running.append(server)
        if wait:
            server.wait_live()
        return server

    yield start
    for server in running:
        server.stop()
