"""Run a server's HTTP face: uvicorn, with a readiness step on SIGTERM and a cut before the
shutdown grace ends. The state it serves is assembled by `server/assembly.py`."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from hotweights.config import Config
from hotweights.server.app import create_app
from hotweights.server.assembly import freeze_startup_heap, load_initial
from hotweights.server.server_state import ServerState

log = logging.getLogger("hotweights.server")

# How long before uvicorn cancels what is left of a shutdown the responses still
# generating are told to stop (each at its next token, with an error).
CUT_MARGIN_S = 1.0


def build_app(state: ServerState) -> FastAPI:
    """The HTTP app serving `state`; its startup begins loading what should be live."""
    return create_app(state, on_startup=load_initial)


class GracefulServer(uvicorn.Server):
    """uvicorn with a readiness step: on SIGTERM, /ready turns 503 and new requests are
    refused for `shutdown_delay` seconds before the listener closes; requests in flight
    (streams included) then get up to the drain timeout to finish. Those still generating
    a moment before that grace ends stop at their next token with an error (an SSE error
    event, or a 503) rather than being cut off without a word when uvicorn cancels them."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        delay = self.state.config.shutdown_delay
        if sig != signal.SIGTERM or self.state.stopping or delay <= 0:
            self.state.stopping = True
            super().handle_exit(sig, frame)
            return
        self.state.stopping = True
        log.info("SIGTERM: not ready; closing the listener in %.1f s", delay)
        timer = threading.Timer(delay, super().handle_exit, args=(sig, frame))
        timer.daemon = True
        timer.start()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        grace = self.config.timeout_graceful_shutdown
        if grace:
            margin = min(CUT_MARGIN_S, grace / 2)
            asyncio.get_running_loop().call_later(grace - margin, self.state.cut.set)
        await super().shutdown(sockets)


def serve(state: ServerState) -> None:
    """Run until interrupted (SIGINT/SIGTERM end it gracefully)."""
    freeze_startup_heap(state)
    config = state.config
    uvicorn_config = uvicorn.Config(
        build_app(state),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=int(config.drain_timeout) or None,
        timeout_keep_alive=keep_alive(config),
    )
    GracefulServer(uvicorn_config, state).run()


def keep_alive(config: Config) -> int:
    """uvicorn's idle-connection timeout (whole seconds, at least one)."""
    return max(1, round(config.keep_alive_timeout))


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
