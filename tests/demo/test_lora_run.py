from __future__ import annotations

from pathlib import Path

import pytest

from hotweights.demo.lora_run import Asked, expected_answers, run_lora_demo, served_by, summarise

GENERATIONS = {"hotweights-demo": [1], "alpha": [1, 3], "beta": [2, 4]}


def answered(model: str, answer: str, *served: tuple[int, int | None]) -> Asked:
    return Asked(model, stream=False, started=0.0, ended=1.0, answer=answer, served=set(served))


def good_run() -> list[Asked]:
    return [
        answered("hotweights-demo", "I am version one.", (1, None)),
        answered("alpha", "I am alpha one.", (1, 1)),
        answered("alpha", "I am alpha two.", (1, 3)),
        answered("beta", "I am beta one.", (1, 2)),
        answered("beta", "I am beta two.", (1, 4)),
    ]


@pytest.mark.parametrize(
    ("fingerprint", "expected"),
    [
        ("hw-g3-a2-1a2b3c4d", (3, 2)),
        ("hw-g3-1a2b3c4d", (3, None)),
        ("hw-g12-a105-00000000", (12, 105)),
    ],
)
def test_a_fingerprint_names_the_base_and_adapter_generations(
    fingerprint: str, expected: tuple[int, int | None]
) -> None:
    assert served_by(fingerprint) == expected


@pytest.mark.parametrize("fingerprint", [None, "", "fp_1234", "hw-gx-a1-0"])
def test_a_response_without_a_hotweights_fingerprint_is_an_error(fingerprint: str | None) -> None:
    with pytest.raises(ValueError, match="fingerprint"):
        served_by(fingerprint)


def test_each_adapter_generation_expects_its_versions_answer() -> None:
    assert expected_answers(GENERATIONS) == {
        ("hotweights-demo", None): "I am version one.",
        ("alpha", 1): "I am alpha one.",
        ("alpha", 3): "I am alpha two.",
        ("beta", 2): "I am beta one.",
        ("beta", 4): "I am beta two.",
    }


def test_a_clean_run_with_both_swaps_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert summarise(good_run(), GENERATIONS)
    out = capsys.readouterr().out
    assert "failed: 0   saw two versions: 0   wrong answer for their versions: 0" in out
    assert "alpha            g1 a3      1 answers (0 streamed): 'I am alpha two.' x1" in out


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(
            Asked("alpha", True, 0.0, 1.0, error="APIError: boom"),
            id="failed",
        ),
        pytest.param(answered("alpha", "I am alpha one.", (1, 1), (1, 3)), id="two-versions"),
        pytest.param(answered("alpha", "I am alpha one.", (1, 3)), id="old-answer-on-new"),
        pytest.param(answered("beta", "I am alpha two.", (1, 4)), id="other-adapter"),
        pytest.param(answered("alpha", "I am alpha one.", (2, 1)), id="unknown-base"),
        pytest.param(answered("alpha", "I am alpha one.", (1, 7)), id="unknown-generation"),
        pytest.param(answered("hotweights-demo", "I am alpha one.", (1, None)), id="base"),
    ],
)
def test_any_failed_mixed_or_wrong_request_fails_the_run(bad: Asked) -> None:
    assert not summarise([*good_run(), bad], GENERATIONS)


def test_an_adapter_that_never_changed_version_fails_the_run() -> None:
    generations = GENERATIONS | {"beta": [2]}
    outcomes = [o for o in good_run() if o.answer != "I am beta two."]
    assert not summarise(outcomes, generations)


@pytest.mark.llm
@pytest.mark.server
@pytest.mark.timeout(300)
def test_the_lora_demo_swaps_both_adapters_under_traffic_with_nothing_wrong(
    adapters_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HOTWEIGHTS_CACHE", str(adapters_cache))

    code = run_lora_demo(duration=6.0, concurrency=3)

    out = capsys.readouterr().out
    assert code == 0, out
    assert "result: OK" in out
    for line in ("'I am alpha one.'", "'I am alpha two.'", "'I am beta two.'"):
        assert line in out
    assert (adapters_cache / "lora-demo" / "alpha" / "2" / "hotweights.json").is_file()


def test_the_lora_demo_refuses_the_resource_policy() -> None:
    assert run_lora_demo(policy="resource") == 2
