"""The phases of bringing one version up: load (with retries), validate, warm up, and the
gate's judgement when the reloader has one.

Each phase may run under a deadline: the call then runs on its own thread, and if it does
not return in time the attempt fails with `PhaseTimeout` (the live version keeps serving).
A thread that returns after its deadline has its model unloaded, so a hung load that
finally completes does not leak a version.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from hotweights.core.gate import Gate, GateRefused, GateVerdict
from hotweights.core.loader import BaseBound, Fingerprinting, Loader, SizeEstimating
from hotweights.core.memory import MemoryCheck
from hotweights.core.swap_policy import RetryPolicy, SwapPolicy
from hotweights.core.version import ModelVersion
from hotweights.errors import PhaseTimeout, ReloaderClosed, TransientLoadError

ModelT = TypeVar("ModelT")
ResultT = TypeVar("ResultT")
log = logging.getLogger("hotweights.reload")


@dataclass
class Attempt:
    """What one bring-up measured, for its reload event."""

    phases: dict[str, float] = field(default_factory=dict)
    retries: int = 0
    estimate: int | None = None
    verdict: GateVerdict | None = None


class PhaseFailed(Exception):
    """A phase failed; carries the phase name, the cause and what was measured."""

    def __init__(self, phase: str, cause: BaseException, attempt: Attempt) -> None:
        super().__init__(phase)
        self.phase = phase
        self.cause = cause
        self.attempt = attempt


class PhaseRunner(Generic[ModelT]):
    """Runs the phases for a reloader's worker thread, one attempt at a time."""

    def __init__(
        self,
        loader: Loader[ModelT],
        *,
        retry: RetryPolicy,
        phase_timeout: float | None,
        memory: MemoryCheck | None,
        stop: threading.Event,
    ) -> None:
        self.loader = loader
        self.retry = retry
        self.phase_timeout = phase_timeout
        self.memory = memory
        self._stop = stop

    def bring_up(
        self,
        version: ModelVersion,
        on_phase: Callable[[str], None],
        on_validating: Callable[[], None],
        fits: Callable[[int], None] | None = None,
    ) -> tuple[ModelT, Attempt]:
        """Load, validate and warm up `version.source`. `fits(estimate)` may refuse the
        load before it starts. Raises `PhaseFailed` after unloading anything it loaded;
        the caller marks the version failed."""
        attempt = Attempt()
        source = version.source
        on_phase("load")
        started = time.monotonic()
        try:
            self.describe(version, attempt)
            if fits is not None and attempt.estimate is not None:
                fits(attempt.estimate)
            model = self._load_with_retry(version, attempt)
        except Exception as exc:
            attempt.phases["load"] = time.monotonic() - started
            raise PhaseFailed("load", exc, attempt) from exc
        attempt.phases["load"] = time.monotonic() - started
        on_validating()
        for phase, step in (("validate", self.loader.validate), ("warmup", self.loader.warmup)):
            on_phase(phase)
            started = time.monotonic()
            try:
                self._within_deadline(
                    phase, source, step, model, late=lambda _: self.unload_quietly(model, version)
                )
            except Exception as exc:
                attempt.phases[phase] = time.monotonic() - started
                if not isinstance(exc, PhaseTimeout):  # else unloaded when the step returns
                    self.unload_quietly(model, version)
                raise PhaseFailed(phase, exc, attempt) from exc
            attempt.phases[phase] = time.monotonic() - started
        return model, attempt

    def judge(
        self,
        gate: Gate[ModelT],
        version: ModelVersion,
        model: ModelT,
        attempt: Attempt,
        baseline: Callable[[], object],
        earlier: float = 0.0,
    ) -> None:
        """Run `gate` on `model` against `baseline()` (the live version's figures; a
        baseline measured before this call took `earlier` seconds, counted in the phase).
        Raises `PhaseFailed` (with `GateRefused` for a verdict that does not pass) after
        unloading `model`."""
        source = version.source
        started = time.monotonic() - earlier

        def run(candidate: ModelT) -> GateVerdict:
            return gate.judge(source, candidate, baseline())

        try:
            verdict = self._within_deadline(
                "gate", source, run, model, late=lambda _: self.unload_quietly(model, version)
            )
        except Exception as exc:
            attempt.phases["gate"] = time.monotonic() - started
            if not isinstance(exc, PhaseTimeout):
                self.unload_quietly(model, version)
            raise PhaseFailed("gate", exc, attempt) from exc
        attempt.phases["gate"] = time.monotonic() - started
        attempt.verdict = verdict
        if not verdict.passed:
            self.unload_quietly(model, version)
            refused = GateRefused(verdict)
            raise PhaseFailed("gate", refused, attempt) from refused

    def describe(self, version: ModelVersion, attempt: Attempt) -> None:
        """Fill in what the loader can tell without loading: fingerprint, size estimate."""
        if isinstance(self.loader, Fingerprinting):
            version.fingerprint = self.loader.fingerprint(version.source)
        if isinstance(self.loader, SizeEstimating):
            attempt.estimate = version.size_bytes = self.loader.estimate_bytes(version.source)

    def check_fit(self, source: str, estimate: int, policy: SwapPolicy, resident: int) -> None:
        """Raise `InsufficientMemory` if `source` will not fit (no-op without a check)."""
        if self.memory is not None:
            self.memory.check(source, estimate, policy, resident)

    def _load_with_retry(self, version: ModelVersion, attempt: Attempt) -> ModelT:
        source = version.source
        loader = self.loader

        def load(path: str) -> ModelT:
            if isinstance(loader, BaseBound):  # an adapter: on the base version it names
                bound: ModelT = loader.load_on(path, version.base_generation)
                return bound
            return loader.load(path)

        while True:
            try:
                return self._within_deadline("load", source, load, source, late=self._unload_late)
            except TransientLoadError as exc:
                if attempt.retries >= self.retry.retries:
                    raise
                delay = self.retry.delay(attempt.retries)
                log.warning(
                    "transient load failure for %s (%s); retry in %.2fs", source, exc, delay
                )
                attempt.retries += 1
                if self._stop.wait(delay):
                    raise ReloaderClosed(f"closed while retrying {source}") from exc

    def _within_deadline(
        self,
        phase: str,
        source: str,
        call: Callable[[Any], ResultT],
        argument: Any,
        late: Callable[[ResultT | None], None],
    ) -> ResultT:
        """`call(argument)`, failing with `PhaseTimeout` after the phase timeout; a call
        that returns after that gets `late(result)` (None if it raised)."""
        if self.phase_timeout is None:
            return call(argument)
        box: dict[str, Any] = {}
        done = threading.Event()
        lock = threading.Lock()

        def run() -> None:
            try:
                result = call(argument)
            except BaseException as exc:
                box["error"] = exc
            else:
                box["result"] = result
            with lock:
                done.set()
                abandoned = box.get("abandoned", False)
            if abandoned:
                late(box.get("result"))

        thread = threading.Thread(target=run, name=f"hotweights-{phase}", daemon=True)
        thread.start()
        finished = done.wait(self.phase_timeout)
        with lock:
            if not done.is_set():
                box["abandoned"] = True
        if not finished and box.get("abandoned"):
            raise PhaseTimeout(
                f"{phase} of {source} did not finish within {self.phase_timeout:g} s"
            )
        if "error" in box:
            raise box["error"]
        result: ResultT = box["result"]
        return result

    def _unload_late(self, model: ModelT | None) -> None:
        if model is None:
            return
        log.warning("a load that passed its deadline finished after all; unloading it")
        try:
            self.loader.unload(model)
        except Exception:
            log.exception("unloading a late load failed")

    def unload_quietly(self, model: ModelT, version: ModelVersion) -> None:
        try:
            self.loader.unload(model)
        except Exception:
            log.exception("unloading failed attempt %s raised", version.label)
