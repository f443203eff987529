"""The quality gate's file format and checks, on a scripted text model and a fake clock."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from hotweights.errors import GateFileError
from hotweights.generation import GenerationParams, TokenChunk, TokenLogprob
from hotweights.sources.gate_spec import GATE_FILE, GateSpec
from hotweights.sources.quality_gate import QualityGate, verdict_table
from tests.fakes import FakeClock


class ScriptedModel:
    """Answers each prompt from a table; every text token has `logprob`; each generated
    token advances `clock` by `seconds_per_token`."""

    def __init__(
        self,
        answers: Mapping[str, str],
        *,
        logprob: float = -1.0,
        clock: FakeClock | None = None,
        seconds_per_token: float = 0.01,
    ) -> None:
        self.answers = answers
        self.logprob = logprob
        self.clock = clock or FakeClock()
        self.seconds_per_token = seconds_per_token
        self.eos_ids = frozenset({0})
        self.max_positions: int | None = 8
        self.windows: list[int] = []

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        return messages[-1]["content"]

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def stream(self, prompt: str | Sequence[int], params: GenerationParams) -> Iterator[TokenChunk]:
        if params.max_tokens == 0:
            ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
            self.windows.append(len(ids))
            scored = tuple(
                TokenLogprob(t, chr(t), None if i == 0 else self.logprob) for i, t in enumerate(ids)
            )
            yield TokenChunk("", len(prompt), 0, "length", prompt_logprobs=scored)
            return
        if params.logit_bias:  # a timed run: eos suppressed, every token generated
            assert params.logit_bias == {0: -100.0}
            for i in range(params.max_tokens):
                self.clock.advance(self.seconds_per_token)
                yield TokenChunk("x", 1, i + 1, "length" if i == params.max_tokens - 1 else None)
            return
        answer = self.answers[str(prompt)][: params.max_tokens]
        yield TokenChunk(answer, 1, len(answer), "stop")


def spec(**data: Any) -> GateSpec:
    return GateSpec.parse(data)


def prompt(text: str, expect: dict[str, object], **more: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], "expect": expect, **more}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object"),
        ({"prompt": []}, "'prompt' is not a gate key"),
        ({"prompts": {}}, "'prompts' must be a list"),
        ({"prompts": [{"expect": {"exact": "a"}}]}, "needs exactly one of messages and prompt"),
        ({"prompts": [{"prompt": "q", "expect": {"equals": "a"}}]}, "'equals' is not one of"),
        ({"prompts": [{"prompt": "q", "expect": {"regex": "("}}]}, "is not a valid pattern"),
        ({"prompts": [{"prompt": "q", "expect": {"same_as_live": 1}}]}, "must be true"),
        ({"prompts": [{"prompt": "q", "expect": {}}]}, "must be one of"),
        ({"prompts": [{"prompt": "q", "expect": {"exact": "a"}, "n": 2}]}, "'prompts[0].n'"),
        ({"prompts": [{"prompt": "q", "expect": {"exact": ""}}]}, "must be non-empty text"),
        ({"prompts": [{"messages": [{"role": "user"}], "expect": {"exact": "a"}}]}, "each message"),
        ({"prompts": [{"prompt": "q", "expect": {"exact": "a"}, "max_tokens": 0}]}, "from 1"),
        ({"max_perplexity_ratio": 1.2}, "needs an eval_text"),
        ({"eval_text": "x y", "max_perplexity_ratio": -1}, "must be a positive number"),
        ({"eval_text": "x y", "max_perplexity": True}, "must be a positive number"),
        ({"eval_text": "missing.txt"}, "which does not exist"),
        ({"eval_text": ""}, "must be non-empty text"),
        ({"latency_runs": 0}, "'latency_runs' must be an integer"),
    ],
)
def test_a_malformed_gate_file_is_refused_naming_its_key(data: object, message: str) -> None:
    with pytest.raises(GateFileError, match=message.replace("(", r"\(").replace("[", r"\[")):
        GateSpec.parse(data, origin="gate.json", base=Path("/nonexistent"))


def test_a_gate_file_reads_its_eval_text_from_a_file_beside_it(tmp_path: Path) -> None:
    (tmp_path / "eval.txt").write_text("held-out text\nof two lines")
    (tmp_path / "gate.json").write_text('{"eval_text": "eval.txt", "max_perplexity": 9}')
    loaded = GateSpec.from_file(tmp_path / "gate.json")
    assert loaded.eval_text == "held-out text\nof two lines"
    assert GateSpec.parse({"eval_text": "inline words"}).eval_text == "inline words"
    one_long_line = "word " * 400  # no file can have a name this long: it is the text
    assert GateSpec.parse({"eval_text": one_long_line}, base=tmp_path).eval_text == one_long_line
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(GateFileError, match="not valid JSON"):
        GateSpec.from_file(tmp_path / "broken.json")
    with pytest.raises(GateFileError, match="cannot read"):
        GateSpec.from_file(tmp_path / "absent.json")


def test_golden_prompts_hold_each_kind_of_expectation() -> None:
    gate = QualityGate(
        spec(
            prompts=[
                prompt("a", {"exact": "I am two."}),
                prompt("b", {"contains": "two"}),
                prompt("c", {"regex": r"^\d+$"}),
                prompt("d", {"same_as_live": True}),
                prompt("e", {"exact": "long answer"}, max_tokens=4),
            ]
        )
    )
    live = ScriptedModel({"d": "same"})
    good = ScriptedModel(
        {"a": " I am two.\n", "b": "version two", "c": "42", "d": "same", "e": "long answer"}
    )
    bad = ScriptedModel(
        {"a": "I am one.", "b": "one", "c": "4x2", "d": "other", "e": "long answer"}
    )
    verdict = gate.judge("/v", good, gate.baseline("/v", live))
    assert [c.passed for c in verdict.checks] == [True, True, True, True, False]
    assert verdict.checks[4].value == "long"  # max_tokens cut the answer
    verdict = gate.judge("/v", bad, gate.baseline("/v", live))
    assert [c.passed for c in verdict.checks] == [False, False, False, False, False]
    assert verdict.checks[3].threshold == "same"
    assert not verdict.passed
    table = verdict_table(verdict)
    assert "prompt 4 (same_as_live)  FAIL    'other'" in table


def test_with_nothing_live_the_comparisons_are_skipped_not_passed() -> None:
    gate = QualityGate(
        spec(
            prompts=[prompt("d", {"same_as_live": True})],
            eval_text="abcdef",
            max_perplexity_ratio=1.1,
            max_latency_ratio=1.5,
        )
    )
    verdict = gate.judge("/v", ScriptedModel({"d": "x"}), gate.baseline("/v", None))
    assert [(c.name, c.passed) for c in verdict.checks] == [
        ("prompt 1 (same_as_live)", None),
        ("perplexity", True),
        ("perplexity ratio", None),
        ("latency ratio", None),
    ]
    assert verdict.passed
    assert "nothing live" in verdict.checks[0].detail


def test_perplexity_is_scored_in_windows_and_compared_with_the_live_one() -> None:
    gate = QualityGate(spec(eval_text="abcdefghijklmnopqrst", max_perplexity_ratio=1.5))
    live = ScriptedModel({}, logprob=-1.0)
    worse = ScriptedModel({}, logprob=-2.0)
    verdict = gate.judge("/v", worse, gate.baseline("/v", live))
    perplexity, ratio = verdict.checks
    assert perplexity.value == pytest.approx(math.exp(2.0), rel=1e-4)
    assert ratio.value == pytest.approx(math.e, rel=1e-4)
    assert ratio.passed is False
    assert worse.windows == [7, 7, 6]  # 20 tokens in windows of max_positions - 1
    assert gate.judge("/v", ScriptedModel({}, logprob=-1.1), gate.baseline("/v", live)).passed
    with_ceiling = QualityGate(spec(eval_text="abcdef", max_perplexity=5.0))
    assert with_ceiling.judge("/v", worse, None).checks[0].passed is False


def test_time_per_token_is_compared_as_a_ratio_of_medians() -> None:
    clock = FakeClock()
    gate = QualityGate(spec(max_latency_ratio=2.0, latency_tokens=10, latency_runs=3), clock=clock)
    live = ScriptedModel({}, clock=clock, seconds_per_token=0.010)
    slow = ScriptedModel({}, clock=clock, seconds_per_token=0.025)
    verdict = gate.judge("/v", slow, gate.baseline("/v", live))
    [latency] = verdict.checks
    assert latency.value == pytest.approx(2.5)
    assert latency.passed is False
    assert latency.detail == "new 0.025, live 0.01"
    fast = ScriptedModel({}, clock=clock, seconds_per_token=0.015)
    assert gate.judge("/v", fast, gate.baseline("/v", live)).passed


def test_a_version_gate_file_adds_to_the_servers_and_cannot_loosen_it(tmp_path: Path) -> None:
    (tmp_path / GATE_FILE).write_text('{"prompts": [{"prompt": "b", "expect": {"exact": "B"}}]}')
    server = spec(prompts=[prompt("a", {"exact": "A"})])
    model = ScriptedModel({"a": "wrong", "b": "B"})
    gate = QualityGate(server)
    verdict = gate.judge(str(tmp_path), model, gate.baseline(str(tmp_path), None))
    assert [(c.name, c.passed) for c in verdict.checks] == [
        ("prompt 1 (exact)", False),
        ("gate.json: prompt 1 (exact)", True),
    ]
    (tmp_path / GATE_FILE).write_text('{"prompts": 3}')
    with pytest.raises(GateFileError, match=r"gate\.json: 'prompts' must be a list"):
        gate.baseline(str(tmp_path), None)


def test_the_readme_example_gate_parses(tmp_path: Path) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### A quality gate") :]
    example = section[section.index("```json") + len("```json") : section.index("```\n\n|")]
    (tmp_path / "heldout.txt").write_text("a held-out text")
    parsed = GateSpec.parse(json.loads(example), base=tmp_path)
    assert [p.kind for p in parsed.prompts] == ["regex", "contains", "same_as_live"]
    assert parsed.eval_text == "a held-out text"
    assert parsed.prompts[0].meets("I am version two.", None)
