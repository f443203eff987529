"""Noticing a client that went away before its answer was ready."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

T = TypeVar("T")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None once the client has closed its connection (then `work` is
    cancelled, and awaited, so whatever it iterates can be closed after)."""
    working = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (watching, working):
            if not task.done():
                task.cancel()
        await asyncio.gather(watching, working, return_exceptions=True)
    if working.cancelled():
        return None
    return working.result()


async def _disconnect(request: Request) -> None:
    """Return when the client disconnects (the body has been read: nothing else comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
