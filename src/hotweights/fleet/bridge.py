"""One request through a replica's own hotweights app, in process.

The fleet's ingress hands a replica the request it admitted (method, path, headers, body)
and the generation it stamped; the replica runs it through the same ASGI app `hotweights
serve` runs, pinned to that generation through the ASGI scope (`SCOPE_PIN`), and yields
the answer back over Ray: first its `Head` (status, headers, and the whole body when the
answer is not a stream), then a stream's bytes as they come. Closing the generator (the
client went away, the ingress cancelled) tells the app its client disconnected, so a
stream stops at its next token and releases its lease.

Pure asyncio and ASGI: nothing here imports Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Message

from hotweights.server.pins import SCOPE_PIN

Headers = tuple[tuple[bytes, bytes], ...]
EVENT_STREAM = b"text/event-stream"


@dataclass(frozen=True)
class Forwarded:
    """A request as the ingress admitted it."""

    method: str
    path: str
    query: bytes
    headers: Headers
    body: bytes


@dataclass(frozen=True)
class Head:
    """The start of an answer: its status and headers; `body` is the whole body unless
    `streamed` (then the bytes follow, one item each)."""

    status: int
    headers: Headers
    body: bytes
    streamed: bool


class AppFailed(RuntimeError):
    """The app ended without starting a response."""


async def answer(
    app: ASGIApp, request: Forwarded, pin: str, headers: Headers = ()
) -> AsyncGenerator[Head | bytes, None]:
    """Run `request` through `app` pinned to `pin` (`gN`: generation N); yield its `Head`,
    with `headers` added, then a stream's bytes. Cancellation-safe: leaving early
    disconnects the request and waits for the app to let go of it."""
    messages: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(_scope(request, pin), receive, send)
        finally:
            await messages.put(None)

    task = asyncio.create_task(run())
    try:
        start = await messages.get()
        if start is None or start["type"] != "http.response.start":
            await task  # raises what the app raised, if it did
            raise AppFailed(f"{request.method} {request.path}: the app sent no response")
        reply_headers: Headers = (*tuple(start.get("headers", ())), *headers)
        streamed = any(
            key.lower() == b"content-type" and value.startswith(EVENT_STREAM)
            for key, value in reply_headers
        )
        if not streamed:
            body = b"".join([chunk async for chunk in _body(messages)])
            yield Head(start["status"], reply_headers, body, streamed=False)
            return
        yield Head(start["status"], reply_headers, b"", streamed=True)
        async for chunk in _body(messages):
            yield chunk
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout=30.0)
        if not task.done():
            task.cancel()


async def _body(messages: asyncio.Queue[Message | None]) -> AsyncIterator[bytes]:
    while True:
        message = await messages.get()
        if message is None or message["type"] != "http.response.body":
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def _scope(request: Forwarded, pin: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "root_path": "",
        "query_string": request.query,
        "headers": list(request.headers),
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        "state": {},
        SCOPE_PIN: pin,
    }
