"""The quality gate: a new version is judged against the live one (its answers to the
gate's prompts, its perplexity on a text, its time per token) before it takes any traffic.
The checks come from the server's gate file and the version's own (`sources/gate_spec.py`).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hotweights.core.gate import GateCheck, GateVerdict
from hotweights.errors import GateFileError
from hotweights.generation import GenerationParams
from hotweights.sources.gate_spec import GATE_FILE, GateModel, GateSpec, GoldenPrompt

MAX_WINDOW = 1024
"""Tokens scored in one forward pass when measuring perplexity."""
_NO_LIVE = "nothing live to compare with"


@dataclass(frozen=True)
class LiveFigures:
    """What one spec measured on the live version (empty when nothing was live)."""

    live: bool
    answers: Mapping[int, str] = field(default_factory=dict)
    """The live answer of each `same_as_live` prompt, by index."""
    perplexity: float | None = None
    seconds_per_token: float | None = None


class QualityGate:
    """`Gate[GateModel]`: the server's spec (if any) and each version's own `gate.json`.

    Called from the reloader's worker (or the `hotweights gate` command), one call at a
    time. `clock` times generation (tests pass a fake one).
    """

    def __init__(
        self, spec: GateSpec | None = None, *, clock: Callable[[], float] = time.perf_counter
    ) -> None:
        self.spec = spec
        self.clock = clock

    def specs(self, source: str) -> list[GateSpec]:
        """The server's spec, then the version's own; raises `GateFileError` for a
        version gate file that cannot be read or is malformed."""
        found = [] if self.spec is None else [self.spec]
        own = Path(source) / GATE_FILE
        try:
            present = own.is_file()
        except OSError:  # not a directory path at all: the loader says what is wrong
            present = False
        if present:
            found.append(GateSpec.from_file(own))
        return found

    def baseline(self, source: str, live: GateModel | None) -> object:
        return [self._measure_live(spec, live) for spec in self.specs(source)]

    def judge(self, source: str, candidate: GateModel, baseline: object) -> GateVerdict:
        specs = self.specs(source)
        figures = baseline if isinstance(baseline, list) else []
        checks: list[GateCheck] = []
        for index, spec in enumerate(specs):
            live = figures[index] if index < len(figures) else LiveFigures(live=False)
            prefix = "" if index == 0 and self.spec is not None else f"{GATE_FILE}: "
            checks.extend(
                GateCheck(prefix + c.name, c.passed, c.value, c.threshold, c.detail)
                for c in self._judge_one(spec, candidate, live)
            )
        return GateVerdict(tuple(checks))

    # -- one spec -----------------------------------------------------------------------

    def _measure_live(self, spec: GateSpec, live: GateModel | None) -> LiveFigures:
        if live is None:
            return LiveFigures(live=False)
        answers = {
            index: greedy_answer(live, prompt)
            for index, prompt in enumerate(spec.prompts)
            if prompt.kind == "same_as_live"
        }
        return LiveFigures(
            live=True,
            answers=answers,
            perplexity=perplexity(live, spec.eval_text) if spec.eval_text is not None else None,
            seconds_per_token=self._time_per_token(live, spec) if spec.measures_latency else None,
        )

    def _judge_one(
        self, spec: GateSpec, candidate: GateModel, live: LiveFigures
    ) -> Iterator[GateCheck]:
        for index, prompt in enumerate(spec.prompts):
            answer = greedy_answer(candidate, prompt)
            live_answer = live.answers.get(index)
            passed = prompt.meets(answer, live_answer)
            expected = live_answer if prompt.kind == "same_as_live" else prompt.expected
            detail = _NO_LIVE if passed is None else ""
            yield GateCheck(f"prompt {index + 1} ({prompt.kind})", passed, answer, expected, detail)
        if spec.eval_text is not None:
            value = perplexity(candidate, spec.eval_text)
            ceiling = spec.max_perplexity
            yield GateCheck(
                "perplexity", ceiling is None or value <= ceiling, round(value, 4), ceiling
            )
            if spec.max_perplexity_ratio is not None:
                yield _ratio_check(
                    "perplexity ratio", value, live.perplexity, spec.max_perplexity_ratio
                )
        if spec.max_latency_ratio is not None:
            seconds = self._time_per_token(candidate, spec)
            yield _ratio_check(
                "latency ratio", seconds, live.seconds_per_token, spec.max_latency_ratio
            )

    def _time_per_token(self, model: GateModel, spec: GateSpec) -> float:
        """Median seconds per generated token over `spec.latency_runs` greedy runs."""
        params = GenerationParams(
            temperature=0.0,
            max_tokens=spec.latency_tokens,
            logit_bias={token: -100.0 for token in model.eos_ids},
        )
        timings = []
        for _ in range(spec.latency_runs):
            started = self.clock()
            tokens = 0
            for chunk in model.stream(spec.latency_prompt, params):
                tokens = chunk.completion_tokens
            timings.append((self.clock() - started) / max(1, tokens))
        return statistics.median(timings)


def verdict_table(verdict: GateVerdict) -> str:
    """The checks as an aligned text table: check, result, figure, threshold, detail."""
    rows = [("check", "result", "figure", "threshold", "detail")]
    for check in verdict.checks:
        result = {True: "pass", False: "FAIL", None: "skip"}[check.passed]
        rows.append(
            (check.name, result, _shown(check.value), _shown(check.threshold), check.detail)
        )
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    lines = [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[4]])
        for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def _shown(figure: object) -> str:
    if figure is None:
        return "-"
    text = (
        figure
        if isinstance(figure, str)
        else f"{figure:g}"
        if isinstance(figure, float)
        else str(figure)
    )
    return repr(text) if isinstance(figure, str) else text


def greedy_answer(model: GateModel, prompt: GoldenPrompt) -> str:
    params = GenerationParams(temperature=0.0, max_tokens=prompt.max_tokens)
    return "".join(chunk.text for chunk in model.stream(prompt.text(model), params))


def perplexity(model: GateModel, text: str) -> float:
    """exp of the mean negative log-likelihood of `text`'s tokens, scored in windows of
    at most `MAX_WINDOW` tokens (each window's first token is not predicted)."""
    ids = model.encode(text)
    window = MAX_WINDOW if model.max_positions is None else min(MAX_WINDOW, model.max_positions - 1)
    params = GenerationParams(temperature=0.0, max_tokens=0, prompt_logprobs=0)
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        piece = ids[start : start + window]
        if len(piece) < 2:
            continue
        for chunk in model.stream(piece, params):
            for entry in chunk.prompt_logprobs or ():
                if entry.logprob is not None:
                    total -= entry.logprob
                    count += 1
    if count == 0:
        raise GateFileError("the eval_text is too short: it must be at least two tokens")
    return math.exp(total / count)


def _ratio_check(name: str, value: float, live: float | None, ceiling: float) -> GateCheck:
    if live is None:
        return GateCheck(name, None, None, ceiling, _NO_LIVE)
    ratio = value / live if live > 0 else math.inf
    detail = f"new {value:.6g}, live {live:.6g}"
    return GateCheck(name, ratio <= ceiling, round(ratio, 4), ceiling, detail)
