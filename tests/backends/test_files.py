"""Checking model directories: clear refusals, fingerprints and size estimates."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from hotweights.backends import LoadedLM, TransformersLoader, inspect_model_dir
from hotweights.backends.safetensors_header import read_header
from hotweights.errors import LoadError
from hotweights.generation import GenerationParams

pytestmark = pytest.mark.llm

Breaker = Callable[[Path], tuple[Path, str]]
"""Damages a copy of a good model directory; returns the source to load and a text the
error message must contain."""


def truncate_data(root: Path) -> tuple[Path, str]:
    weights = root / "model.safetensors"
    header = read_header(weights)
    cut = weights.read_bytes()[:-1000]
    weights.write_bytes(cut)
    has = len(cut) - header.data_start
    return (
        root,
        f"model.safetensors is truncated: header says {header.tensor_bytes} bytes of tensor "
        f"data, file has {has}",
    )


def truncate_header(root: Path) -> tuple[Path, str]:
    weights = root / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return root, f"{weights} is truncated"


def drop_tokenizer(root: Path) -> tuple[Path, str]:
    (root / "tokenizer.json").unlink()
    return root, f"no tokenizer in {root}: expected tokenizer.json"


def only_pickle(root: Path) -> tuple[Path, str]:
    (root / "model.safetensors").unlink()
    (root / "pytorch_model.bin").write_bytes(b"pretend pickle")
    return root, "refusing pickle-based weights in"


def drop_config(root: Path) -> tuple[Path, str]:
    (root / "config.json").unlink()
    return root, f"{root / 'config.json'} is missing"


def drop_weights(root: Path) -> tuple[Path, str]:
    (root / "model.safetensors").unlink()
    return root, "expected model.safetensors"


def missing_shard(root: Path) -> tuple[Path, str]:
    (root / "model.safetensors").rename(root / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return root, "model-00002-of-00002.safetensors is missing"


def missing_path(root: Path) -> tuple[Path, str]:
    gone = root.parent / "no-such-model"
    return gone, f"model path {gone} does not exist"


def not_a_directory(root: Path) -> tuple[Path, str]:
    return root / "config.json", f"model path {root / 'config.json'} is not a directory"


@pytest.mark.parametrize(
    "breaker",
    [
        truncate_data,
        truncate_header,
        drop_tokenizer,
        only_pickle,
        drop_config,
        drop_weights,
        missing_shard,
        missing_path,
        not_a_directory,
    ],
)
def test_a_bad_directory_fails_to_load_naming_the_file(
    tiny_dir: Path, tmp_path: Path, loader: TransformersLoader, breaker: Breaker
) -> None:
    root = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    source, expected = breaker(root)
    with pytest.raises(LoadError) as caught:
        loader.load(str(source))
    assert expected in str(caught.value)
    with pytest.raises(LoadError):
        loader.fingerprint(str(source))


def test_pickle_weights_load_only_when_allowed(tiny_dir: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    root = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    state = load_file(root / "model.safetensors")
    torch.save(state, root / "pytorch_model.bin")
    (root / "model.safetensors").unlink()
    with pytest.raises(LoadError, match=r"pytorch_model\.bin.*allow_pickle"):
        TransformersLoader().load(str(root))
    permissive = TransformersLoader(allow_pickle=True)
    model = permissive.load(str(root))
    try:
        permissive.validate(model)
        assert model.generate("hi", _greedy(3)).completion_tokens == 3
    finally:
        permissive.unload(model)


def test_cuda_without_cuda_is_a_load_error(tiny_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(LoadError, match="CUDA is not available"):
        TransformersLoader(device="cuda").load(str(tiny_dir))


def test_fingerprint_is_stable_and_ignores_the_path(
    tiny_dir: Path, tmp_path: Path, loader: TransformersLoader
) -> None:
    first = loader.fingerprint(str(tiny_dir))
    assert len(first) == 16
    assert set(first) <= set("0123456789abcdef"), first
    assert loader.fingerprint(str(tiny_dir)) == first
    copy = shutil.copytree(tiny_dir, tmp_path / "copy")
    assert loader.fingerprint(str(copy)) == first


def test_fingerprint_changes_with_weights_config_or_tokenizer(
    tiny_dir: Path, tmp_path: Path, loader: TransformersLoader
) -> None:
    from safetensors.torch import load_file, save_file

    from hotweights.demo.tinylm import save_tiny_model

    original = loader.fingerprint(str(tiny_dir))
    reseeded = save_tiny_model(tmp_path / "reseeded", seed=1)
    assert loader.fingerprint(str(reseeded)) != original

    one_tensor = Path(shutil.copytree(tiny_dir, tmp_path / "one-tensor"))
    state = load_file(one_tensor / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"] + 1.0  # same shapes, same header
    save_file(state, one_tensor / "model.safetensors", metadata={"format": "pt"})
    assert (
        read_header(one_tensor / "model.safetensors").raw
        == read_header(tiny_dir / "model.safetensors").raw
    )
    assert loader.fingerprint(str(one_tensor)) != original

    config = Path(shutil.copytree(tiny_dir, tmp_path / "config"))
    settings = json.loads((config / "config.json").read_text())
    settings["rms_norm_eps"] = 1e-5
    (config / "config.json").write_text(json.dumps(settings))
    assert loader.fingerprint(str(config)) != original

    template = Path(shutil.copytree(tiny_dir, tmp_path / "template"))
    (template / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert loader.fingerprint(str(template)) != original


def test_estimate_matches_the_loaded_parameters(
    lively_dir: Path, lively_lm: LoadedLM, loader: TransformersLoader
) -> None:
    # Parameters are counted once each: the tied output layer shares the embedding.
    loaded = sum(p.numel() * p.element_size() for p in lively_lm.model.parameters())
    assert loader.estimate_bytes(str(lively_dir)) == pytest.approx(loaded, rel=0.01)
    halved = TransformersLoader(dtype="bfloat16").estimate_bytes(str(lively_dir))
    assert halved == pytest.approx(loaded / 2, rel=0.01)


def test_auto_dtype_follows_the_config(tiny_dir: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(tiny_dir, tmp_path / "model"))
    settings = json.loads((root / "config.json").read_text())
    full = TransformersLoader().estimate_bytes(str(root))
    settings["dtype"] = "bfloat16"
    (root / "config.json").write_text(json.dumps(settings))
    assert inspect_model_dir(root).config_dtype == "bfloat16"
    assert TransformersLoader().estimate_bytes(str(root)) == full // 2
    assert TransformersLoader(dtype="float32").estimate_bytes(str(root)) == full


def test_a_chosen_dtype_is_the_loaded_dtype(tiny_dir: Path) -> None:
    import torch

    loader = TransformersLoader(dtype="bfloat16")
    model = loader.load(str(tiny_dir))
    try:
        assert model.dtype == "bfloat16"
        assert {p.dtype for p in model.model.parameters()} == {torch.bfloat16}
        loader.validate(model)
        assert model.generate("hi", _greedy(2)).completion_tokens == 2
    finally:
        loader.unload(model)


def _greedy(max_tokens: int) -> GenerationParams:
    return GenerationParams(temperature=0, max_tokens=max_tokens)
