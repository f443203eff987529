"""Support for tests and for the demo's scripted run, not for serving: a real server on a
background thread of this process, and a free port to put one on.

`hotweights serve` runs its server with `server.runner.serve`; nothing in the product
imports this module except the demo, which drives a server from the same process.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from hotweights.server.runner import GracefulServer, build_app, keep_alive
from hotweights.server.server_state import ServerState


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (another process may still take it first)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class ServerThread:
    """A real uvicorn server on a background thread, for tests, the demo and benchmarks.

    `start` returns once it listens; `stop` asks it to exit and joins the thread. Also a
    context manager. The state it serves is built by the caller (`server.assembly`)."""

    def __init__(self, state: ServerState, port: int | None = None, grace: int = 5) -> None:
        self.state = state
        self.port = port or free_port(state.config.host)
        self.url = f"http://{state.config.host}:{self.port}"
        config = uvicorn.Config(
            build_app(state),
            host=state.config.host,
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=grace,
            timeout_keep_alive=keep_alive(state.config),
        )
        self.server = GracefulServer(config, state)
        self._thread = threading.Thread(target=self.server.run, name="hotweights-uvicorn")

    def start(self, timeout: float = 60.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def wait_live(self, timeout: float = 120.0) -> None:
        """Wait until every model has a live version; raise if a load failed first."""
        deadline = time.monotonic() + timeout
        for served in self.state.models.values():
            while served.reloader.live_version is None:
                # A repository falls back to older versions; a lone source has no fallback.
                failed = [e for e in served.reloader.log.recent() if not e.succeeded]
                if failed and self.state.sync is None:
                    raise RuntimeError(f"{served.name} failed to load: {failed[0].error_message}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{served.name} did not go live within {timeout} s")
                time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
