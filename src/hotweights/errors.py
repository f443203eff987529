"""The exceptions hotweights raises, in one hierarchy.

The HTTP edge maps each class (never a message text) to a status code and an OpenAI-shaped
error body. Messages name the model version, the path and what was expected.
"""

from __future__ import annotations


class HotweightsError(Exception):
    """Base of every error hotweights raises on purpose."""


class LoadError(HotweightsError):
    """A version could not be loaded: missing or corrupt files, a refused format, a loader bug."""


class TransientLoadError(LoadError):
    """A load failed for a reason that may pass (a busy disk, a file still being copied).

    The reloader retries these with bounded backoff before giving up.
    """


class ValidationError(HotweightsError):
    """A loaded version failed its checks (validate or warmup) and will not go live."""


class NotReady(HotweightsError):
    """No version is live, or none became live within the admission timeout."""


class ModelRetired(HotweightsError):
    """A lease outlived its version's drain deadline; the version was unloaded beneath it."""


class NoPreviousVersion(HotweightsError):
    """A rollback was asked for but the history holds no earlier version to return to."""


class NoCanary(HotweightsError):
    """A promotion (or the end of a bake) was asked for, but no canary is baking."""


class NotPrepared(HotweightsError):
    """A commit or discard named a prepared version that was already decided."""


class ReloaderClosed(HotweightsError):
    """A reload was requested after the reloader was closed."""


class IllegalTransition(HotweightsError):
    """A version was moved between two lifecycle states that have no edge between them."""


class InvalidRequest(HotweightsError):
    """A client request is malformed or asks for something out of range."""


class UnknownModel(HotweightsError):
    """A request names a model this server does not serve."""


class PayloadTooLarge(InvalidRequest):
    """A request body or prompt is over the configured size limits."""


class Unauthorized(HotweightsError):
    """A protected endpoint was called without credentials."""


class Forbidden(HotweightsError):
    """Credentials were wrong, or a reload path lies outside the model roots."""


class ReloadFailed(HotweightsError):
    """An admin reload or rollback ended without its target going live.

    `event` is the reload event as a JSON-ready dict; what was serving still serves.
    """

    def __init__(self, message: str, event: dict[str, object]) -> None:
        super().__init__(message)
        self.event = event


class ReloadSuperseded(ReloadFailed):
    """A reload or push ended `superseded`: a newer request replaced it while it waited."""


class GateFileError(HotweightsError):
    """A gate file is unreadable or malformed, or asks for what cannot be measured."""


class ManifestError(HotweightsError):
    """A version's manifest (`hotweights.json`) is missing, unreadable or malformed."""


class VerificationError(HotweightsError):
    """A version's files do not match its manifest: a file is missing, extra, or differs
    in size or sha256. `problems` lists each difference, one line per file."""

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems


class UnknownVersion(HotweightsError):
    """A model repository holds no version with the requested number (or no such model)."""


class PublishError(HotweightsError):
    """A publish did not complete; nothing of it is visible as a version."""


class VersionExists(PublishError):
    """A publish asked for a version number that already exists; versions are never
    overwritten."""


class WatcherUnavailable(HotweightsError):
    """The requested file-watching strategy cannot run here (e.g. watchfiles is missing)."""


class EscapesRoot(HotweightsError):
    """A path under a model repository is a symlink that resolves outside the repository."""


class FollowFailed(LoadError):
    """A model that must follow a new version of its base (a LoRA adapter) could not be
    prepared on it, so the base's new version is refused."""


class PhaseTimeout(LoadError):
    """A load, validation or warmup did not finish within the configured phase timeout."""


class InsufficientMemory(LoadError):
    """The new version would not fit in the memory available under the swap policy."""


class ShuttingDown(HotweightsError):
    """The server's shutdown grace period ended before this response did."""


class Overloaded(HotweightsError):
    """A model's admission queue is full; the client should retry later."""


class EngineFailed(HotweightsError):
    """A batched generation pass failed; every request in that pass ends with this error,
    and the engine goes on with the next ones."""


class ReplicaFailed(HotweightsError):
    """A fleet replica failed or died while it held the request."""
