"""The framework-free hot-reload engine: versions, history, the reload log, the slot with
its leases, and the reloader with its swap policies. Imports no third-party package."""

from __future__ import annotations

from hotweights.core.canary import CanaryPolicy
from hotweights.core.events import (
    PHASES,
    TRIGGERS,
    Outcome,
    Phase,
    ReloadEvent,
    ReloadLog,
    Trigger,
)
from hotweights.core.history import VersionHistory
from hotweights.core.lease import Lease
from hotweights.core.loader import Fingerprinting, Loader, SizeEstimating
from hotweights.core.memory import MemoryCheck, available_memory
from hotweights.core.observers import (
    Notice,
    Observer,
    ReloadFinished,
    ReloadStarted,
    VersionChanged,
)
from hotweights.core.prepared import Decision, PreparedVersion, PrepareTicket
from hotweights.core.reload_queue import JobStatus, ReloadTicket
from hotweights.core.reload_status import CanaryStatus, ReloaderStatus
from hotweights.core.reloader import Reloader
from hotweights.core.serving_view import ServingView
from hotweights.core.slot import DrainReport, ModelSlot
from hotweights.core.swap_policy import SWAP_POLICIES, RetryPolicy, SwapPolicy
from hotweights.core.version import LEGAL_TRANSITIONS, ModelVersion, VersionState

__all__ = [
    "LEGAL_TRANSITIONS",
    "PHASES",
    "SWAP_POLICIES",
    "TRIGGERS",
    "CanaryPolicy",
    "CanaryStatus",
    "Decision",
    "DrainReport",
    "Fingerprinting",
    "JobStatus",
    "Lease",
    "Loader",
    "MemoryCheck",
    "ModelSlot",
    "ModelVersion",
    "Notice",
    "Observer",
    "Outcome",
    "Phase",
    "PrepareTicket",
    "PreparedVersion",
    "ReloadEvent",
    "ReloadFinished",
    "ReloadLog",
    "ReloadStarted",
    "ReloadTicket",
    "Reloader",
    "ReloaderStatus",
    "RetryPolicy",
    "ServingView",
    "SizeEstimating",
    "SwapPolicy",
    "Trigger",
    "VersionChanged",
    "VersionHistory",
    "VersionState",
    "available_memory",
]
