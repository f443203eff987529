"""The `Gate` role: judges a new version's answers before it may go live.

A gate runs after validate and warmup, on the reloader's worker, while the live version
keeps serving. It works in two calls so that both swap policies can compare the new version
with the live one: `baseline` measures the live model (under `availability` just before the
judgement, the live version still serving; under `resource` before the live version is
taken down), then `judge` measures the new one against that baseline. A verdict that does
not pass makes the reload end `gated`: the live version keeps serving, untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

from hotweights.errors import HotweightsError

ModelT = TypeVar("ModelT", contravariant=True)

Figure = float | str | None


@dataclass(frozen=True)
class GateCheck:
    """One check of a gate and what it measured."""

    name: str
    """What was checked, e.g. `prompt 1 (exact)`, `perplexity ratio`."""
    passed: bool | None
    """True or False; None when it could not run (e.g. nothing live to compare with)."""
    value: Figure = None
    """The figure measured (a ratio, a perplexity, the answer's text)."""
    threshold: Figure = None
    """What the figure was held to (a ceiling, the expected text)."""
    detail: str = ""

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "passed": self.passed,
            "value": self.value,
            "threshold": self.threshold,
            "detail": self.detail,
        }

    def describe(self) -> str:
        """One line for logs and error messages."""
        verdict = {True: "passed", False: "FAILED", None: "skipped"}[self.passed]
        figures = (
            f": {self.value!r} against {self.threshold!r}" if self.threshold is not None else ""
        )
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.name} {verdict}{figures}{detail}"


@dataclass(frozen=True)
class GateVerdict:
    """Every check a gate ran on one version; it passes when none failed."""

    checks: tuple[GateCheck, ...] = ()

    @property
    def passed(self) -> bool:
        return all(check.passed is not False for check in self.checks)

    def failures(self) -> tuple[GateCheck, ...]:
        return tuple(check for check in self.checks if check.passed is False)

    def summary(self) -> str:
        failed = self.failures()
        if not failed:
            return f"all {len(self.checks)} gate checks passed"
        return "; ".join(check.describe() for check in failed)


class GateRefused(HotweightsError):
    """A version loaded and warmed up, but its gate's verdict did not pass."""

    def __init__(self, verdict: GateVerdict) -> None:
        super().__init__(verdict.summary())
        self.verdict = verdict


class Gate(Protocol[ModelT]):
    """Judges versions of one model. Called only from the reloader's worker thread, one
    attempt at a time; the models it is handed are leased (the live one) or not yet
    published (the new one), so they stay loaded for the whole call. Any exception other
    than a verdict fails the reload in the `gate` phase."""

    def baseline(self, source: str, live: ModelT | None) -> object:
        """Measure what the version at `source` will be compared with on `live` (None when
        nothing is live); the result goes to `judge` as it is."""
        ...

    def judge(self, source: str, candidate: ModelT, baseline: object) -> GateVerdict:
        """Measure `candidate` (loaded from `source`) and compare it with `baseline`."""
        ...
