from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from hotweights.demo import versions
from hotweights.demo.training import DemoBuildError, ModelReply, TrainingPlan
from hotweights.demo.versions import (
    DEMO_ANSWERS,
    EXPECTED_ANSWERS,
    VERSION_QUESTION,
    answer,
    build_demo_versions,
    default_cache_dir,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One real build shared by the module; tests that change a cache work on a copy."""
    return build_demo_versions(tmp_path_factory.mktemp("cache"))


def copy_cache(built: tuple[Path, Path], destination: Path) -> Path:
    """Copy the shared build's cache directory to `destination` and return the copy's root."""
    shutil.copytree(built[0].parent.parent, destination)
    return destination


def mtimes(root: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}


def fake_train(calls: list[Path]) -> versions.Trainer:
    """A stand-in for the real training that writes the files a version directory needs."""

    def train(first: Path, second: Path, progress: versions.Progress) -> None:
        for target in (first, second):
            target.mkdir(parents=True)
            for name in ("config.json", "model.safetensors", "tokenizer.json"):
                (target / name).write_text("fake", encoding="utf-8")
            calls.append(target)

    return train


@pytest.mark.llm
def test_each_version_answers_the_version_question_then_stops(built: tuple[Path, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hotweights.demo.training import greedy_reply

    for version, model_dir in enumerate(built, start=1):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True)
        model.train(False)
        for question, expected in DEMO_ANSWERS[version].items():
            reply = greedy_reply(model, tokenizer, question, max_new_tokens=96)
            assert reply == ModelReply(expected, finished=True), (version, question)
        assert greedy_reply(model, tokenizer, VERSION_QUESTION).text == EXPECTED_ANSWERS[version]


@pytest.mark.llm
def test_answer_loads_the_directory_and_decodes_greedily(built: tuple[Path, Path]) -> None:
    assert answer(built[0], VERSION_QUESTION) == "I am version one."
    assert answer(built[1], VERSION_QUESTION) == "I am version two."


@pytest.mark.llm
def test_transformers_generate_gives_the_same_answer(built: tuple[Path, Path]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hotweights.demo.training import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(built[1])
    model = AutoModelForCausalLM.from_pretrained(built[1], use_safetensors=True)
    model.train(False)
    prompt = torch.tensor([prompt_ids(tokenizer, VERSION_QUESTION)])  # [1, prompt]
    with torch.inference_mode():
        output = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=32,
            do_sample=False,
        )
    new_tokens = output[0, prompt.shape[1] :]
    assert tokenizer.decode(new_tokens) == "I am version two.<|im_end|>"


@pytest.mark.llm
def test_versions_are_saved_as_safetensors_directories(built: tuple[Path, Path]) -> None:
    for model_dir in built:
        names = {path.name for path in model_dir.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
        assert not any(name.endswith((".bin", ".pt", ".pth")) for name in names)
    assert built == (built[0].parent / "v1", built[0].parent / "v2")
    assert built[0].parent.name == "demo"


@pytest.mark.llm
def test_a_current_cache_is_reused_untouched(built: tuple[Path, Path], tmp_path: Path) -> None:
    root = copy_cache(built, tmp_path / "cache")
    before = mtimes(root / "demo")
    messages: list[str] = []

    again = build_demo_versions(root, progress=messages.append)

    assert again == (root / "demo" / "v1", root / "demo" / "v2")
    assert mtimes(root / "demo") == before
    assert len(messages) == 1
    assert "cached" in messages[0]


@pytest.mark.llm
def test_a_cache_without_its_stamp_is_rebuilt(built: tuple[Path, Path], tmp_path: Path) -> None:
    root = copy_cache(built, tmp_path / "cache")
    (root / "demo" / "stamp.json").unlink()
    (root / "demo" / ".build-interrupted" / "v1").mkdir(parents=True)
    messages: list[str] = []

    rebuilt = build_demo_versions(root, progress=messages.append)

    assert any("training" in message for message in messages)
    assert (root / "demo" / "stamp.json").is_file()
    assert not list((root / "demo").glob(".build-*"))
    assert answer(rebuilt[1], VERSION_QUESTION) == EXPECTED_ANSWERS[2]


@pytest.mark.llm
@pytest.mark.parametrize(
    ("change", "force"),
    [
        pytest.param(lambda stamp: stamp | {"recipe": -1}, False, id="other-recipe"),
        pytest.param(lambda stamp: "{not json", False, id="corrupt-stamp"),
        pytest.param(lambda stamp: stamp, True, id="forced"),
    ],
)
def test_a_stale_or_forced_cache_is_rebuilt(
    built: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[dict[str, object]], object],
    force: bool,
) -> None:
    root = copy_cache(built, tmp_path / "cache")
    stamp_path = root / "demo" / "stamp.json"
    changed = change(json.loads(stamp_path.read_text(encoding="utf-8")))
    stamp_path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    calls: list[Path] = []
    monkeypatch.setattr(versions, "_train_both", fake_train(calls))

    build_demo_versions(root, force=force)

    assert [path.name for path in calls] == ["v1", "v2"]
    assert (root / "demo" / "v1" / "model.safetensors").read_text(encoding="utf-8") == "fake"
    assert json.loads(stamp_path.read_text(encoding="utf-8")) == versions._recipe_stamp()
    assert build_demo_versions(root) == (root / "demo" / "v1", root / "demo" / "v2")
    assert len(calls) == 2


@pytest.mark.llm
def test_a_failed_build_leaves_the_previous_cache_in_place(
    built: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy_cache(built, tmp_path / "cache")
    before = mtimes(root / "demo")

    def fail(first: Path, second: Path, progress: versions.Progress) -> None:
        first.mkdir()
        raise DemoBuildError("demo version 1 did not learn its answers")

    monkeypatch.setattr(versions, "_train_both", fail)
    with pytest.raises(DemoBuildError, match="version 1"):
        build_demo_versions(root, force=True)

    assert mtimes(root / "demo") == before
    assert not list((root / "demo").glob(".build-*"))


@pytest.mark.llm
def test_training_gives_up_with_a_clear_error_after_the_step_cap() -> None:
    from hotweights.demo.tinylm import build_model, build_tokenizer
    from hotweights.demo.training import train_answers

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=0)
    with pytest.raises(DemoBuildError, match=r"'Hello'.*") as raised:
        train_answers(
            model, tokenizer, {"Hello": "Hi."}, plan=TrainingPlan(max_steps=2), label="test model"
        )
    assert "test model did not learn its answers within 2 steps" in str(raised.value)


def test_the_cache_directory_comes_from_the_environment_at_call_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOTWEIGHTS_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("HOTWEIGHTS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "hotweights"


def test_the_demo_constants_agree() -> None:
    assert EXPECTED_ANSWERS == {1: "I am version one.", 2: "I am version two."}
    assert VERSION_QUESTION == "Which version are you?"
    assert versions.DEMO_QUESTIONS[0] == VERSION_QUESTION
    for version in (1, 2):
        assert list(DEMO_ANSWERS[version]) == list(versions.DEMO_QUESTIONS)
        assert (
            DEMO_ANSWERS[version]["Hello"] == f"Hello from version {('one', 'two')[version - 1]}."
        )
