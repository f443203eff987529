"""Run a model's synchronous token iterator off the event loop, one leased step at a time.

Each step (one `next()`) runs on a worker thread inside `lease.use()`, so a version is
never unloaded in the middle of a step, and a version retired at its drain deadline stops
the stream with `ModelRetired` at the next step. Closing the async iterator (the client
went away) stops the worker before its next step; so does `cut` (the server is shutting
down), with `ShuttingDown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import Executor
from typing import Any, TypeVar

from hotweights.core import Lease
from hotweights.errors import ShuttingDown

ModelT = TypeVar("ModelT")
ItemT = TypeVar("ItemT")

_END = object()


async def leased_steps(
    lease: Lease[ModelT],
    start: Callable[[ModelT], Iterator[ItemT]],
    executor: Executor,
    cut: threading.Event | None = None,
) -> AsyncGenerator[ItemT, None]:
    """Yield the items of `start(model)`, computing each on `executor` under the lease."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()

    def deliver(kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    def produce() -> None:
        iterator: Iterator[ItemT] | None = None
        try:
            with lease.use() as model:
                iterator = start(model)
            while not stop.is_set():
                if cut is not None and cut.is_set():
                    raise ShuttingDown("the server shut down before this response was complete")
                with lease.use():
                    item = next(iterator, _END)
                if item is _END:
                    break
                deliver("item", item)
        except BaseException as exc:
            deliver("error", exc)
        finally:
            if iterator is not None and hasattr(iterator, "close"):
                with contextlib.suppress(Exception):
                    iterator.close()
            deliver("end", None)

    worker = loop.run_in_executor(executor, produce)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        stop.set()
        if worker.done():
            worker.result()
