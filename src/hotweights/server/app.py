"""The FastAPI application: routes, error handlers, the body-size guard, the lifespan."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hotweights import __version__
from hotweights.server import (
    admin,
    error_responses,
    lora_api,
    openai_api,
    push_api,
    repository_api,
)
from hotweights.server.error_responses import error_body
from hotweights.server.server_state import ServerState

log = logging.getLogger("hotweights.server")


class BodyLimit:
    """Refuse request bodies over `limit` bytes with an OpenAI-shaped 413, whether the
    client declared the length or streams the body."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _streams_to_disk(scope):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        message = f"request body is over the limit of {self.limit} bytes"
        body = json.dumps(error_body(message, "invalid_request_error", "payload_too_large"))
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})


class _TooLarge(Exception):
    pass


def _streams_to_disk(scope: Scope) -> bool:
    """A push of weights (`push_api`): its body is written to disk as it arrives, never
    held, so it has no size limit (it is an admin route, behind the admin token)."""
    path = str(scope.get("path", ""))
    return (
        scope.get("method") == "POST" and path.startswith("/admin/") and path.endswith("/versions")
    )


def _rescan_on_sighup(rescan: Callable[[], None]) -> None:
    """SIGHUP forces a repository rescan (where signals can be handled: the main thread)."""
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, rescan)
    except (RuntimeError, NotImplementedError, ValueError, AttributeError):
        log.debug("SIGHUP rescan unavailable here (not the main thread, or no SIGHUP)")


def create_app(
    state: ServerState, on_startup: Callable[[ServerState], None] | None = None
) -> FastAPI:
    """Build the app for `state`. `on_startup` runs when the server starts (the CLI submits
    the first loads there); `state.close()` runs when it stops."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if on_startup is not None:
            on_startup(state)
        if state.sync is not None:
            _rescan_on_sighup(state.sync.request_rescan)
        try:
            yield
        finally:
            state.close(timeout=state.config.drain_timeout)

    app = FastAPI(title="hotweights", version=__version__, lifespan=lifespan)
    app.state.hotweights = state
    error_responses.install(app)
    app.include_router(openai_api.router)
    app.include_router(admin.router)
    app.include_router(repository_api.router)
    app.include_router(push_api.router)
    app.include_router(lora_api.router)
    app.add_middleware(BodyLimit, limit=state.config.max_body_bytes)
    return app
