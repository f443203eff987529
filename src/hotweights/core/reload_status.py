"""A reloader's status, typed: what the server's `/admin/status`, the CLI and the fleet
read. `to_dict` gives the JSON the admin endpoints answer with."""

from __future__ import annotations

from dataclasses import dataclass

from hotweights.core.reload_queue import JobStatus
from hotweights.core.swap_policy import SwapPolicy
from hotweights.core.version import ModelVersion


@dataclass(frozen=True)
class CanaryStatus:
    """The canary baking now."""

    version: ModelVersion
    share: float
    figures: dict[str, object]
    """Both generations' requests, errors and latencies so far."""

    def to_dict(self) -> dict[str, object]:
        return {"version": self.version.to_dict(), "share": self.share, **self.figures}


@dataclass(frozen=True)
class ReloaderStatus:
    """A snapshot of one reloader."""

    model: str
    policy: SwapPolicy
    generation: int
    """The newest generation given so far (live, canary or prepared)."""
    live: ModelVersion | None
    inflight: dict[int, int]
    """Leases held now, by generation."""
    resident: list[int]
    """Generations loaded now (prepared, canary, live, draining), newest first."""
    prepared: ModelVersion | None
    """A version prepared and waiting for a commit or a discard (a canary included)."""
    canary: CanaryStatus | None
    reloading: JobStatus | None
    queued: JobStatus | None

    def job(self, job_id: int) -> tuple[str, JobStatus] | None:
        """The running or queued job with `job_id`, with which of the two it is."""
        for key, job in (("reloading", self.reloading), ("queued", self.queued)):
            if job is not None and job.id == job_id:
                return key, job
        return None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "canary": self.canary.to_dict() if self.canary is not None else None,
            "model": self.model,
            "policy": self.policy,
            "generation": self.generation,
            "live": self.live.to_dict() if self.live else None,
            "prepared": self.prepared.to_dict() if self.prepared else None,
            "inflight": {str(gen): n for gen, n in self.inflight.items()},
            "resident": list(self.resident),
            "reloading": self.reloading.to_dict() if self.reloading else None,
            "queued": self.queued.to_dict() if self.queued else None,
        }
