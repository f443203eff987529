"""What hotweights prints for a person at a terminal."""

from __future__ import annotations

import sys
import time

from hotweights.core import Notice, ReloadFinished, ReloadStarted, VersionChanged, VersionState


def say(message: str) -> None:
    """One line on stderr, flushed: progress, never data."""
    print(f"hotweights: {message}", file=sys.stderr, flush=True)


class LoadProgress:
    """Reloader observer that prints a line per load phase, so an operator sees a model
    coming up (and how long it took)."""

    def __init__(self) -> None:
        self._started: dict[str, float] = {}

    def __call__(self, notice: Notice) -> None:
        if isinstance(notice, ReloadStarted):
            self._started[notice.model] = time.monotonic()
            say(f"[{notice.model}] loading {notice.target} ({notice.trigger})")
        elif isinstance(notice, VersionChanged):
            self._version(notice)
        elif isinstance(notice, ReloadFinished) and not notice.drained:
            event = notice.event
            if not event.succeeded:
                reason = f"{event.outcome.value}: {event.error_message}"
                say(f"[{notice.model}] reload {event.id} of {event.target} {reason}")

    def _version(self, notice: VersionChanged) -> None:
        version, model = notice.version, notice.model
        if notice.new is VersionState.VALIDATING:
            say(f"[{model}] loaded {version.source}; validating and warming up")
        elif notice.new is VersionState.LIVE:
            took = time.monotonic() - self._started.pop(model, time.monotonic())
            fingerprint = version.system_fingerprint
            say(f"[{model}] generation {version.generation} is live ({fingerprint}, {took:.1f} s)")
        elif notice.new is VersionState.RETIRED:
            say(f"[{model}] generation {version.generation} retired and unloaded")
