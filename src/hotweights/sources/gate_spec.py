"""The quality gate: what a new version must answer, how well it must predict a text, and
how fast it must generate, judged against the live version before it takes any traffic.

A gate file is JSON:

    {"prompts": [{"messages": [{"role": "user", "content": "Which version are you?"}],
                  "expect": {"contains": "version"}, "max_tokens": 16}],
     "eval_text": "evaluation.txt",
     "max_perplexity_ratio": 1.2, "max_perplexity": 50.0,
     "max_latency_ratio": 2.0}

Every key is optional (see `GateSpec` for all of them and their defaults); an unknown key is
an error. The server's gate (`--gate FILE`) applies to every version; a version may carry
its own `gate.json` in its directory, which adds its checks (it cannot loosen the server's).
All answers are greedy, generated one request at a time (`TextModel.stream`).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, get_args

from hotweights.core.gate import GateCheck, GateVerdict
from hotweights.errors import GateFileError
from hotweights.generation import GenerationParams, TokenChunk

GATE_FILE = "gate.json"
"""A version's own gate, in its directory (listed in its manifest like every file)."""

ExpectKind = Literal["exact", "contains", "regex", "same_as_live"]
EXPECT_KINDS: tuple[ExpectKind, ...] = get_args(ExpectKind)
MAX_WINDOW = 1024
"""Tokens scored in one forward pass when measuring perplexity."""
_TEXT_SUFFIXES = (".txt", ".text", ".md")
_NO_LIVE = "nothing live to compare with"


class GateModel(Protocol):
    """What the gate needs of a model (a `LoadedLM` has it all)."""

    eos_ids: frozenset[int]
    max_positions: int | None

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def stream(
        self, prompt: str | Sequence[int], params: GenerationParams
    ) -> Iterator[TokenChunk]: ...


@dataclass(frozen=True)
class GoldenPrompt:
    """A prompt whose greedy answer must meet an expectation."""

    kind: ExpectKind
    expected: str
    """The text, substring or pattern; empty for `same_as_live`."""
    messages: tuple[Mapping[str, str], ...] = ()
    """A chat prompt (rendered with the model's template), or empty for `prompt`."""
    prompt: str = ""
    """A completion prompt, used when `messages` is empty."""
    max_tokens: int = 16

    def text(self, model: GateModel) -> str:
        return model.apply_chat_template(self.messages) if self.messages else self.prompt

    def meets(self, answer: str, live_answer: str | None) -> bool | None:
        """Whether `answer` meets the expectation; None if it needs a live answer and
        there is none."""
        if self.kind == "exact":
            return answer.strip() == self.expected.strip()
        if self.kind == "contains":
            return self.expected in answer
        if self.kind == "regex":
            return re.search(self.expected, answer) is not None
        return None if live_answer is None else answer == live_answer


@dataclass(frozen=True)
class GateSpec:
    """One gate file, parsed. Thresholds left out are not checked."""

    prompts: tuple[GoldenPrompt, ...] = ()
    eval_text: str | None = None
    """Text whose perplexity is measured on both versions (inline, or read from a file)."""
    max_perplexity_ratio: float | None = None
    """The new version's perplexity on `eval_text` over the live one's, at most."""
    max_perplexity: float | None = None
    """The new version's perplexity on `eval_text`, at most (needs no live version)."""
    max_latency_ratio: float | None = None
    """The new version's time per generated token over the live one's, at most."""
    latency_prompt: str = "Once upon a time"
    latency_tokens: int = 32
    """Tokens generated per timed run (eos is suppressed so every run is as long)."""
    latency_runs: int = 5
    """Timed runs on each version; the medians are compared."""
    origin: str = "gate"
    """Where the spec came from, for messages."""

    @property
    def measures_latency(self) -> bool:
        return self.max_latency_ratio is not None

    @classmethod
    def from_file(cls, path: str | Path) -> GateSpec:
        """Read and check a gate file; raises `GateFileError` naming the file and the key."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise GateFileError(f"cannot read the gate file {path}: {exc}") from exc
        except ValueError as exc:
            raise GateFileError(f"the gate file {path} is not valid JSON: {exc}") from exc
        return cls.parse(data, origin=str(path), base=path.parent)

    @classmethod
    def parse(cls, data: object, *, origin: str = "gate", base: Path | None = None) -> GateSpec:
        """Check `data` (a gate file's JSON); `base` resolves a relative `eval_text` path."""
        reader = _Reader(origin)
        if not isinstance(data, dict):
            raise reader.error("", "must be a JSON object")
        known = {
            "prompts",
            "eval_text",
            "max_perplexity_ratio",
            "max_perplexity",
            "max_latency_ratio",
            "latency_prompt",
            "latency_tokens",
            "latency_runs",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise reader.error(unknown[0], f"is not a gate key (known: {', '.join(sorted(known))})")
        prompts = data.get("prompts", [])
        if not isinstance(prompts, list):
            raise reader.error("prompts", "must be a list")
        eval_text = data.get("eval_text")
        if eval_text is not None:
            eval_text = _eval_text(reader, eval_text, base)
        spec = cls(
            prompts=tuple(reader.prompt(item, index) for index, item in enumerate(prompts)),
            eval_text=eval_text,
            max_perplexity_ratio=reader.positive(data, "max_perplexity_ratio"),
            max_perplexity=reader.positive(data, "max_perplexity"),
            max_latency_ratio=reader.positive(data, "max_latency_ratio"),
            latency_prompt=reader.text(data, "latency_prompt", cls.latency_prompt),
            latency_tokens=reader.count(data, "latency_tokens", cls.latency_tokens),
            latency_runs=reader.count(data, "latency_runs", cls.latency_runs),
            origin=origin,
        )
        if eval_text is None:
            for key in ("max_perplexity_ratio", "max_perplexity"):
                if data.get(key) is not None:
                    raise reader.error(key, "needs an eval_text to measure perplexity on")
        return spec


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


def _eval_text(reader: _Reader, value: object, base: Path | None) -> str:
    """`value` itself, or a file's text when it names one (relative to `base`)."""
    if not isinstance(value, str) or not value.strip():
        raise reader.error("eval_text", "must be non-empty text or the path of a text file")
    if "\n" not in value and len(value) < 4096:
        path = Path(value) if base is None else base / value
        try:
            is_file = path.is_file()
        except OSError:  # too long or otherwise no possible file name: the text itself
            is_file = False
        if is_file:
            try:
                return path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise reader.error("eval_text", f"cannot read {path}: {exc}") from exc
        if not any(c.isspace() for c in value) and value.endswith(_TEXT_SUFFIXES):
            raise reader.error("eval_text", f"names the file {path}, which does not exist")
    return value


class _Reader:
    """Reads keys of one gate file, raising `GateFileError` naming the file and key."""

    def __init__(self, origin: str) -> None:
        self.origin = origin

    def error(self, key: str, problem: str) -> GateFileError:
        where = f"{key!r} " if key else ""
        return GateFileError(f"gate {self.origin}: {where}{problem}")

    def positive(self, data: Mapping[str, object], key: str) -> float | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise self.error(key, f"must be a positive number, got {value!r}")
        if not math.isfinite(value):
            raise self.error(key, f"must be finite, got {value!r}")
        return float(value)

    def count(self, data: Mapping[str, object], key: str, default: int) -> int:
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
            raise self.error(key, f"must be an integer from 1 to 4096, got {value!r}")
        return value

    def text(self, data: Mapping[str, object], key: str, default: str) -> str:
        value = data.get(key, default)
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be non-empty text, got {value!r}")
        return value

    def prompt(self, item: object, index: int) -> GoldenPrompt:
        key = f"prompts[{index}]"
        if not isinstance(item, dict):
            raise self.error(key, "must be an object")
        unknown = sorted(set(item) - {"messages", "prompt", "expect", "max_tokens"})
        if unknown:
            raise self.error(f"{key}.{unknown[0]}", "is not a prompt key")
        messages, prompt = item.get("messages"), item.get("prompt")
        if (messages is None) == (prompt is None):
            raise self.error(key, "needs exactly one of messages and prompt")
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise self.error(f"{key}.prompt", "must be non-empty text")
        kind, expected = self._expect(item.get("expect"), f"{key}.expect")
        return GoldenPrompt(
            kind=kind,
            expected=expected,
            messages=self._messages(messages, f"{key}.messages") if messages is not None else (),
            prompt=prompt or "",
            max_tokens=self.count(item, "max_tokens", 16),
        )

    def _messages(self, value: object, key: str) -> tuple[Mapping[str, str], ...]:
        if not isinstance(value, list) or not value:
            raise self.error(key, "must be a non-empty list of messages")
        messages = []
        for message in value:
            if (
                not isinstance(message, dict)
                or set(message) != {"role", "content"}
                or not all(isinstance(part, str) for part in message.values())
            ):
                raise self.error(key, f"each message is {{role, content}} text, got {message!r}")
            messages.append(dict(message))
        return tuple(messages)

    def _expect(self, value: object, key: str) -> tuple[ExpectKind, str]:
        if not isinstance(value, dict) or len(value) != 1:
            raise self.error(key, f"must be one of {{{', '.join(EXPECT_KINDS)}: ...}}")
        [(kind, expected)] = value.items()
        if kind == "same_as_live":
            if expected is not True:
                raise self.error(key, "same_as_live must be true")
            return "same_as_live", ""
        if kind not in EXPECT_KINDS:
            raise self.error(key, f"{kind!r} is not one of {', '.join(EXPECT_KINDS)}")
        if not isinstance(expected, str) or not expected:
            raise self.error(f"{key}.{kind}", "must be non-empty text")
        if kind == "regex":
            try:
                re.compile(expected)
            except re.error as exc:
                raise self.error(f"{key}.regex", f"is not a valid pattern: {exc}") from exc
        return kind, expected
