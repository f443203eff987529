"""The quality gate's file: what a new version must answer, how well it must predict a
text, and how fast it must generate (`sources/quality_gate.py` judges it).

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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

from hotweights.errors import GateFileError
from hotweights.generation import GenerationParams, TokenChunk

GATE_FILE = "gate.json"
"""A version's own gate, in its directory (listed in its manifest like every file)."""

ExpectKind = Literal["exact", "contains", "regex", "same_as_live"]
EXPECT_KINDS: tuple[ExpectKind, ...] = get_args(ExpectKind)
_TEXT_SUFFIXES = (".txt", ".text", ".md")


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
