"""Run a server's HTTP face: uvicorn, with a readiness step on SIGTERM and a cut before the
shutdown grace ends. The state it serves is assembled by `server/assembly.py`; a thread-hosted
server for tests and the demo is `hotweights.testing.ServerThread`."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
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
