"""A prepared version: the handle `Reloader.prepare` gives, until a commit or a discard.

```
prepare ──► PreparedVersion ──► commit  (the one reference swap; the old version drains)
                   │        └──► discard (it drains and is unloaded; why is recorded)
                   └── nobody decides within its hold time ──► discarded by itself
```

The first decision wins: `claim` is atomic, and a second decision raises `NotPrepared`
in the reloader. `settled` is set once the decision was applied and its event recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from enum import Enum
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from hotweights.core.version import ModelVersion

if TYPE_CHECKING:
    from hotweights.core.canary import CanaryMonitor
    from hotweights.core.events import Outcome, ReloadEvent
    from hotweights.core.phases import Attempt
    from hotweights.core.reload_queue import ReloadJob
    from hotweights.core.slot import ModelSlot

ModelT = TypeVar("ModelT")


class Decision(Enum):
    """What became of a prepared version."""

    COMMIT = "commit"
    DISCARD = "discard"


class DecisionRecords(Protocol):
    """Where a prepared version's decision is written down (`ReloadRecords`)."""

    def event(
        self, job: ReloadJob, outcome: Outcome, *, error: BaseException | str | None = None
    ) -> ReloadEvent: ...

    def committed(self, handle: PreparedVersion[Any], old: int | None) -> ReloadEvent: ...


class PreparedVersion(Generic[ModelT]):
    """A version loaded, validated, warmed up and gated beside the live one: resident,
    counted by the memory check, numbered, reachable only by a request pinned to its
    generation. Thread-safe.

    Give it to `Reloader.commit` (alone, or with prepared versions of other models, such
    as adapters on this base: all swap in one step) or to `Reloader.discard`.
    """

    def __init__(
        self,
        model: str,
        version: ModelVersion,
        slot: ModelSlot[ModelT],
        records: DecisionRecords,
        job: ReloadJob,
        attempt: Attempt,
        *,
        previous: ModelVersion | None = None,
    ) -> None:
        self.model = model
        """The name of the model (the reloader) it belongs to."""
        self.version = version
        self.slot = slot
        self.records = records
        """Where its commit or discard is written down (its own reloader's)."""
        self.job = job
        self.attempt = attempt
        self.previous = previous
        """Under `resource`: the version unloaded to make room, brought back on discard."""
        self.monitor: CanaryMonitor | None = None
        """While it bakes as a canary: its requests and the stable version's."""
        self.bake_started: float | None = None
        """Monotonic time its bake began, if it baked."""
        self.followers: tuple[PreparedVersion[Any], ...] = ()
        """Versions of other models prepared on this one (its adapters, `Followers`):
        committed and discarded with it."""
        self.replaces: ModelVersion | None = None
        """For a follower: the live version of its model it was prepared again from
        (`prepare_followers` sets it). Its commit is refused if another version of that
        model went live meanwhile: it would take the model back to an older version."""
        self._applying = False
        self._lock = threading.Lock()
        self._decided = threading.Event()
        self._decision: Decision | None = None
        self._reason = ""
        self._event: ReloadEvent | None = None
        self.settled = threading.Event()
        """Set once the decision was applied and its event recorded."""

    @property
    def generation(self) -> int:
        return self.version.generation

    @property
    def decision(self) -> Decision | None:
        return self._decision

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def event(self) -> ReloadEvent | None:
        """The event of its commit or discard, once settled."""
        return self._event

    def claim(self, decision: Decision, reason: str) -> bool:
        """Decide now; False if it was already decided (the first decision wins)."""
        return claim_all((self,), decision, reason)

    def wait_decided(self, timeout: float | None) -> bool:
        """Until decided or `timeout` seconds pass; True if decided."""
        return self._decided.wait(timeout)

    def begin_apply(self) -> bool:
        """Take the work of applying the decision; False if someone else has it. The
        committer applies a commit; a discard is applied by whoever calls this first
        (the discarding caller, or the reloader's worker for a discard that was only
        claimed, such as a canary's breach on the request path)."""
        with self._lock:
            if self._decision is None or self._applying:
                return False
            self._applying = True
            return True

    def settle(self, event: ReloadEvent) -> None:
        self._event = event
        self.settled.set()

    def __repr__(self) -> str:
        return f"PreparedVersion({self.model!r}, {self.version.label})"


def claim_all(handles: Sequence[PreparedVersion[Any]], decision: Decision, reason: str) -> bool:
    """Claim every handle or none, atomically: False (nothing claimed) if one was decided."""
    ordered = sorted({id(handle): handle for handle in handles}.values(), key=id)
    with contextlib.ExitStack() as locks:
        for handle in ordered:
            locks.enter_context(handle._lock)
        if any(handle._decision is not None for handle in ordered):
            return False
        for handle in ordered:
            handle._decision, handle._reason = decision, reason
            handle.job.decided = True
            handle._decided.set()
    return True


class PrepareTicket(Generic[ModelT]):
    """A handle on an accepted prepare request. Its result is the prepared version, or the
    reload event of the attempt that failed (with its outcome and phase) or was
    superseded."""

    def __init__(self, job: ReloadJob) -> None:
        self.id = job.id
        self.target = job.source
        self._future: Future[PreparedVersion[ModelT] | ReloadEvent] = job.future

    def done(self) -> bool:
        return self._future.done()

    def wait(self, timeout: float | None = None) -> PreparedVersion[ModelT] | ReloadEvent:
        """Block until prepared or failed; raises `TimeoutError` if neither in time."""
        return self._future.result(timeout)

    async def wait_async(self) -> PreparedVersion[ModelT] | ReloadEvent:
        return await asyncio.wrap_future(self._future)

    def then(self, callback: Callable[[PreparedVersion[ModelT] | ReloadEvent], object]) -> None:
        """Call `callback` with the result once there is one: at once if there is, else on
        the reloader's worker as it hands the result over (a callback may `discard`)."""
        self._future.add_done_callback(lambda done: callback(done.result()))
