"""A request's admission: its place in its model's pending count, its lease, and the one
record of how it ended.

The router opens an `Admission` for every inference request it resolved to a model, and
whatever ends the request (its JSON answer, the end of its stream, an error before the
first byte, a client that went away) calls `finish`. The first call counts the request
(metrics, and the canary's bake through `ServerState.finished`), releases the lease and
leaves the pending count; later calls do nothing. So a request is recorded exactly once,
and nobody has to know who else might record it.

Used on the event loop only; not thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from hotweights.core import Lease
from hotweights.errors import HotweightsError, NotReady
from hotweights.server.adapters import admit_adapter
from hotweights.server.error_responses import classify
from hotweights.server.pins import admit
from hotweights.server.server_state import ServedModel, ServerState

CLIENT_CLOSED = 499
"""The client went away before its answer was complete (nginx's convention)."""

log = logging.getLogger("hotweights.server")


class Admission:
    """One request to `served`, from admission to its end (see the module)."""

    def __init__(self, state: ServerState, served: ServedModel, endpoint: str) -> None:
        self.state = state
        self.served = served
        self.endpoint = endpoint
        self.started_at = time.monotonic()
        self.pin = ""
        self._lease: Lease[Any] | None = None
        self._pending = False
        self._finished = False

    @property
    def lease(self) -> Lease[Any]:
        """The lease `admit` took (a retry on the stable version replaces it)."""
        if self._lease is None:
            raise RuntimeError("the request was not admitted")
        return self._lease

    @property
    def generation(self) -> int:
        """The generation the request is on; 0 before it has a lease."""
        return self._lease.generation if self._lease is not None else 0

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def seconds(self) -> float:
        """Since admission began."""
        return time.monotonic() - self.started_at

    async def admit(self, pin: str = "") -> Lease[Any]:
        """Count the request in and lease the live version (or, with `pin`, the resident
        version it names). Raises `NotReady` while the server shuts down, `Overloaded` at
        the model's limit, and what `pins.admit` raises; `finish` still has to be called."""
        if self.state.stopping:
            raise NotReady("the server is shutting down")
        self.served.admit(self.state.config.max_pending)
        self._pending = True
        self.pin = pin
        self._lease = await admit(self.served, pin)
        if self.served.adapter:
            await admit_adapter(self.state, self.served, self._lease)
        return self._lease

    async def retry_on_stable(self, error: Exception) -> bool:
        """After `error` before the first byte: if the request was unpinned and on a
        canary, and the error is not its own doing, count the failure against the canary
        and move the request to a lease on the stable version (a bad canary costs
        latency, not failures). Whether it moved (never once finished: the request was
        answered); raises what leasing the stable version raises."""
        if self._lease is None or self._finished or self.pin or _client_error(error):
            return False
        failed_on = self._lease.generation
        stable = await self.served.reloader.retry_on_stable(self._lease, seconds=self.seconds)
        if stable is None:
            return False
        self._lease = stable
        self.state.metrics.retried(self.served.name, failed_on)
        log.info(
            "%s: canary g%d failed a request (%r); answering from stable",
            self.served.name,
            failed_on,
            error,
        )
        return True

    def finish(self, status: int, tokens: int = 0) -> None:
        """Record that the request ended with `status` (and `tokens` generated), release
        its lease and leave the pending count. Idempotent: only the first call counts."""
        if self._finished:
            return
        self._finished = True
        try:
            self.state.finished(
                self.served, self.endpoint, self.generation, status, self.seconds, tokens
            )
        finally:
            if self._lease is not None:
                self._lease.release()
            if self._pending:
                self._pending = False
                self.served.done()

    def fail(self, error: BaseException) -> None:
        """`finish` with the status `error` answers with."""
        self.finish(status_of(error))


def status_of(error: BaseException) -> int:
    """The HTTP status a request that ended with `error` answers with (a cancelled one:
    the client went away)."""
    if isinstance(error, HotweightsError):
        return classify(error)[0]
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return CLIENT_CLOSED
    return 500


def _client_error(error: Exception) -> bool:
    """An error the request itself caused (retrying it elsewhere would change nothing)."""
    return isinstance(error, HotweightsError) and classify(error)[0] < 500
