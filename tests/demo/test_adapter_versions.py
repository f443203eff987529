from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from hotweights.demo import adapter_versions as adapters
from hotweights.demo.adapter_versions import (
    ADAPTER_NAMES,
    BASE_ANSWER,
    BASE_MODEL_NAME,
    TARGET_MODULES,
    adapter_answers,
    build_demo_adapters,
    peft_replies,
)
from hotweights.demo.training import DemoBuildError, ModelReply
from hotweights.demo.versions import VERSION_QUESTION, Progress, build_demo_versions

Built = dict[str, list[Path]]


@pytest.fixture(scope="module")
def cache(adapters_cache: Path) -> Path:
    return adapters_cache


@pytest.fixture(scope="module")
def built(cache: Path) -> Built:
    return build_demo_adapters(cache)


def copy_cache(cache: Path, destination: Path) -> Path:
    shutil.copytree(cache, destination)
    return destination


def mtimes(root: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in root.rglob("*") if path.is_file()}


def fake_train(calls: list[str]) -> Callable[[Path, str, Path, Progress], None]:
    """A stand-in for the real training that writes the files an adapter version needs."""

    def train(base: Path, name: str, target: Path, progress: Progress) -> None:
        for version in ("1", "2"):
            (target / version).mkdir(parents=True)
            for file in ("adapter_config.json", "adapter_model.safetensors"):
                (target / version / file).write_text("fake", encoding="utf-8")
        calls.append(name)

    return train


@pytest.mark.llm
def test_each_adapter_version_answers_its_line_and_the_base_its_own(
    cache: Path, built: Built
) -> None:
    base, _ = build_demo_versions(cache)

    replies = peft_replies(base, built)

    assert replies.wrong() == []
    assert replies.base == ModelReply(BASE_ANSWER, finished=True)
    assert {key: reply.text for key, reply in replies.adapters.items()} == adapter_answers()


@pytest.mark.llm
def test_replies_that_differ_from_the_expected_ones_are_named(cache: Path, built: Built) -> None:
    base, _ = build_demo_versions(cache)
    swapped = {"alpha": built["beta"], "beta": built["alpha"]}

    wrong = peft_replies(base, swapped).wrong()

    assert len(wrong) == 4
    assert wrong[0] == "alpha v1: " + repr(ModelReply("I am beta one.", finished=True)) + (
        ", expected 'I am alpha one.'"
    )


@pytest.mark.llm
def test_adapters_are_peft_lora_directories_naming_the_demo_model(
    cache: Path, built: Built
) -> None:
    assert list(built) == list(ADAPTER_NAMES)
    for name, directories in built.items():
        assert directories == [cache / "demo-lora" / name / "1", cache / "demo-lora" / name / "2"]
        for directory in directories:
            assert {path.name for path in directory.iterdir()} == {
                "adapter_config.json",
                "adapter_model.safetensors",
            }
            config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
            assert config["peft_type"] == "LORA"
            assert config["base_model_name_or_path"] == BASE_MODEL_NAME
            assert config["r"] == 8
            assert set(config["target_modules"]) == set(TARGET_MODULES)


@pytest.mark.llm
def test_every_version_has_weights_of_its_own(built: Built) -> None:
    from safetensors.torch import load_file

    tensors = {
        (name, version): load_file(directory / "adapter_model.safetensors")
        for name, directories in built.items()
        for version, directory in enumerate(directories, start=1)
    }
    keys = {frozenset(weights) for weights in tensors.values()}
    assert len(keys) == 1
    lora_b = [key for key in next(iter(keys)) if "lora_B" in key]
    assert len(lora_b) == 2 * len(TARGET_MODULES)  # two layers
    for weights in tensors.values():
        assert any(bool(weights[key].abs().sum() > 0) for key in lora_b)
    versions = list(tensors)
    for i, first in enumerate(versions):
        for second in versions[i + 1 :]:
            assert any(
                not bool((tensors[first][key] == tensors[second][key]).all()) for key in lora_b
            ), (first, second)


@pytest.mark.llm
def test_a_current_cache_is_reused_untouched(cache: Path, tmp_path: Path) -> None:
    root = copy_cache(cache, tmp_path / "cache")
    before = mtimes(root)
    messages: list[str] = []

    again = build_demo_adapters(root, progress=messages.append)

    assert again == {name: [root / "demo-lora" / name / v for v in "12"] for name in ADAPTER_NAMES}
    assert mtimes(root) == before
    assert len(messages) == 2
    assert all("cached" in message for message in messages)


@pytest.mark.llm
@pytest.mark.parametrize(
    ("change", "force"),
    [
        pytest.param(lambda stamp: stamp | {"recipe": -1}, False, id="other-recipe"),
        pytest.param(
            lambda stamp: stamp | {"base_weights_sha256": "0" * 64}, False, id="other-base"
        ),
        pytest.param(lambda stamp: "{not json", False, id="corrupt-stamp"),
        pytest.param(lambda stamp: stamp, True, id="forced"),
    ],
)
def test_a_stale_or_forced_cache_is_rebuilt(
    cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[dict[str, object]], object],
    force: bool,
) -> None:
    root = copy_cache(cache, tmp_path / "cache")
    stamp_path = root / "demo-lora" / "stamp.json"
    recorded = json.loads(stamp_path.read_text(encoding="utf-8"))
    changed = change(recorded)
    stamp_path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    (root / "demo-lora" / ".build-interrupted" / "alpha").mkdir(parents=True)
    calls: list[str] = []
    monkeypatch.setattr(adapters, "_train_adapter", fake_train(calls))

    built = build_demo_adapters(root, force=force)

    assert calls == list(ADAPTER_NAMES)
    weights = built["beta"][1] / "adapter_model.safetensors"
    assert weights.read_text(encoding="utf-8") == "fake"
    assert json.loads(stamp_path.read_text(encoding="utf-8")) == recorded
    assert not list((root / "demo-lora").glob(".build-*"))
    assert build_demo_adapters(root) == built
    assert calls == list(ADAPTER_NAMES)


@pytest.mark.llm
def test_a_failed_build_leaves_the_previous_cache_in_place(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy_cache(cache, tmp_path / "cache")
    before = mtimes(root / "demo-lora")
    monkeypatch.setattr(adapters, "_MAX_STEPS", 1)

    with pytest.raises(DemoBuildError, match="adapter alpha version 1 did not learn"):
        build_demo_adapters(root, force=True)

    assert mtimes(root / "demo-lora") == before
    assert not list((root / "demo-lora").glob(".build-*"))


def test_the_expected_answers_name_adapter_and_version() -> None:
    assert adapter_answers() == {
        ("alpha", 1): "I am alpha one.",
        ("alpha", 2): "I am alpha two.",
        ("beta", 1): "I am beta one.",
        ("beta", 2): "I am beta two.",
    }
    assert BASE_ANSWER == "I am version one."
    assert VERSION_QUESTION == "Which version are you?"
