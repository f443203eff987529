"""Reading PEFT LoRA adapter directories: what PEFT saves reads back as the modules, shapes
and scales PEFT itself uses, fits (or does not fit) a base, and every bad input is refused
with a message naming the file and the field."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from hotweights.backends.lora_files import (
    ADAPTER_CONFIG,
    check_fits,
    estimate_bytes,
    is_adapter_dir,
    read_adapter,
    read_adapter_config,
)
from hotweights.demo.tinylm import TinyShape, build_model, build_tokenizer
from hotweights.errors import LoadError

pytestmark = pytest.mark.llm

WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
Q1 = "model.layers.1.self_attn.q_proj"
V1 = "model.layers.1.self_attn.v_proj"


def peft_adapter(base_dir: Path, out: Path, **lora: Any) -> Any:
    """A PEFT model over a fresh copy of the base with random LoRA B matrices (PEFT starts
    them at zero), saved with `save_pretrained` into `out`; returned in eval mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with warnings.catch_warnings():
        # transformers 5 deprecates the attribute PEFT 0.21 reads while wrapping.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        peft_model: Any = get_peft_model(model, LoraConfig(**lora))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.5, generator=generator)
    peft_model.save_pretrained(out)
    return peft_model.eval()


def peft_layers(peft_model: Any) -> dict[str, Any]:
    """Module name in the base model -> PEFT's LoRA layer wrapping it."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix(PREFIX): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }


def linears_of(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


@pytest.fixture(scope="module")
def adapter(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """r=4, alpha=8 on q_proj and v_proj of both layers of the tiny model."""
    path = tmp_path_factory.mktemp("lora") / "adapter"
    model = peft_adapter(tiny_dir, path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return path, model


@pytest.fixture(scope="module")
def base_linears(tiny_dir: Path) -> dict[str, tuple[int, int]]:
    from transformers import AutoModelForCausalLM

    return linears_of(AutoModelForCausalLM.from_pretrained(tiny_dir))


# -- what PEFT saves reads back as PEFT uses it ------------------------------------------


def test_reads_the_modules_shapes_and_scales_peft_uses(
    adapter: tuple[Path, Any], tiny_dir: Path
) -> None:
    path, peft_model = adapter
    files = read_adapter(path)
    layers = peft_layers(peft_model)
    assert sorted(files.pairs) == sorted(layers) == [Q0, V0, Q1, V1]
    for name, pair in files.pairs.items():
        layer = layers[name]
        assert pair.a.shape == (4, 64)
        assert pair.b.shape == (layer.out_features, 4)
        assert pair.a.dtype == pair.b.dtype == torch.float32
        assert pair.scale == layer.scaling["default"] == 2.0
        assert torch.equal(pair.b, layer.lora_B["default"].weight)
    assert files.pairs[V0].b.shape == (32, 4)
    assert files.base_model == str(tiny_dir)
    assert files.nbytes == sum(4 * (p.a.numel() + p.b.numel()) for p in files.pairs.values())


def test_a_pair_adds_what_the_peft_layer_adds(adapter: tuple[Path, Any]) -> None:
    path, peft_model = adapter
    pair = read_adapter(path).pairs[V1]
    layer = peft_layers(peft_model)[V1]
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))  # (tokens, in)
    with torch.no_grad():
        expected = layer(x)  # (tokens, out)
        got = layer.base_layer(x) + pair.scale * (x @ pair.a.T) @ pair.b.T
    assert not torch.allclose(expected, layer.base_layer(x))
    torch.testing.assert_close(got, expected)


def test_config_size_and_fingerprint_come_cheap_and_from_content(
    adapter: tuple[Path, Any], tiny_dir: Path, tmp_path: Path
) -> None:
    path, _ = adapter
    files = read_adapter(path)
    assert is_adapter_dir(path)
    assert not is_adapter_dir(tiny_dir)
    assert not is_adapter_dir(tmp_path / "nowhere")
    assert read_adapter_config(path)["r"] == 4
    assert estimate_bytes(path) == files.nbytes
    assert len(files.fingerprint) == 64
    copy = shutil.copytree(path, tmp_path / "copy")
    assert read_adapter(copy).fingerprint == files.fingerprint
    config = json.loads((copy / ADAPTER_CONFIG).read_text())
    (copy / ADAPTER_CONFIG).write_text(json.dumps({**config, "lora_alpha": 16}))
    changed = read_adapter(copy)
    assert changed.fingerprint != files.fingerprint
    assert changed.pairs[Q0].scale == 4.0


def test_rank_and_alpha_patterns_scale_each_module_as_peft_does(
    tiny_dir: Path, tmp_path: Path
) -> None:
    rank_pattern = {"^model.layers.1.self_attn.q_proj": 2, "v_proj": 6}
    alpha_pattern = {"layers.0.self_attn.q_proj": 3, "self_attn.v_proj": 12}
    peft_model = peft_adapter(
        tiny_dir,
        tmp_path / "patterns",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
    )
    pairs = read_adapter(tmp_path / "patterns").pairs
    layers = peft_layers(peft_model)
    expected = {Q0: (4, 3 / 4), Q1: (2, 8 / 2), V0: (6, 12 / 6), V1: (6, 12 / 6)}
    for name, (rank, scale) in expected.items():
        assert pairs[name].a.shape[0] == layers[name].r["default"] == rank
        assert pairs[name].scale == pytest.approx(layers[name].scaling["default"])
        assert pairs[name].scale == pytest.approx(scale)


def test_rslora_scales_by_the_root_of_the_rank(tiny_dir: Path, tmp_path: Path) -> None:
    peft_model = peft_adapter(
        tiny_dir, tmp_path / "rs", r=9, lora_alpha=6, target_modules=["o_proj"], use_rslora=True
    )
    pairs = read_adapter(tmp_path / "rs").pairs
    layers = peft_layers(peft_model)
    assert sorted(pairs) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    for name, pair in pairs.items():
        assert pair.scale == pytest.approx(layers[name].scaling["default"])
        assert pair.scale == pytest.approx(6 / math.sqrt(9))


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": r".*\.layers\.1\.mlp\.(up|down)_proj"},
        {"target_modules": ["up_proj", "down_proj"], "layers_to_transform": [1]},
        {"target_modules": ["up_proj", "down_proj"], "exclude_modules": ["layers.0.mlp.up_proj"]},
    ],
    ids=["regex", "layers_to_transform", "exclude_modules"],
)
def test_targets_read_as_peft_matches_them(
    lora: dict[str, Any], tiny_dir: Path, tmp_path: Path
) -> None:
    peft_model = peft_adapter(tiny_dir, tmp_path / "a", r=2, lora_alpha=2, **lora)
    assert sorted(read_adapter(tmp_path / "a").pairs) == sorted(peft_layers(peft_model))


def test_a_hand_written_all_linear_targets_any_module(
    adapter: tuple[Path, Any], tmp_path: Path
) -> None:
    copy = shutil.copytree(adapter[0], tmp_path / "all")
    config = json.loads((copy / ADAPTER_CONFIG).read_text())
    (copy / ADAPTER_CONFIG).write_text(json.dumps({**config, "target_modules": "all-linear"}))
    assert sorted(read_adapter(copy).pairs) == [Q0, V0, Q1, V1]


def test_keys_with_the_adapter_name_read_the_same(
    adapter: tuple[Path, Any], tmp_path: Path
) -> None:
    path, _ = adapter
    copy = shutil.copytree(path, tmp_path / "named")
    tensors = load_file(copy / WEIGHTS)
    renamed = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    save_file(renamed, copy / WEIGHTS)
    got, want = read_adapter(copy).pairs, read_adapter(path).pairs
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name].b, want[name].b) for name in want)


def test_pickle_weights_load_only_when_allowed(adapter: tuple[Path, Any], tmp_path: Path) -> None:
    path, _ = adapter
    copy = shutil.copytree(path, tmp_path / "pickled")
    torch.save(load_file(copy / WEIGHTS), copy / "adapter_model.bin")
    (copy / WEIGHTS).unlink()
    with pytest.raises(LoadError, match="allow_pickle"):
        read_adapter(copy)
    assert estimate_bytes(copy) == (copy / "adapter_model.bin").stat().st_size
    got, want = read_adapter(copy, allow_pickle=True).pairs, read_adapter(path).pairs
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name].a, want[name].a) for name in want)


# -- fitting a base ----------------------------------------------------------------------


def test_fits_its_own_base(
    adapter: tuple[Path, Any], base_linears: dict[str, tuple[int, int]]
) -> None:
    check_fits(read_adapter(adapter[0]), base_linears)


def test_a_differently_shaped_base_is_refused_naming_the_module(adapter: tuple[Path, Any]) -> None:
    path, _ = adapter
    shape = TinyShape(hidden_size=32, intermediate_size=64)
    other = linears_of(build_model(build_tokenizer(), shape=shape))
    with pytest.raises(LoadError) as refused:
        check_fits(read_adapter(path), other)
    message = str(refused.value)
    assert str(path) in message
    assert f"module '{Q0}': the base's Linear has (in_features, out_features) = (32, 32)" in message
    assert "need (64, 64)" in message


def test_a_module_the_base_lacks_is_refused_naming_it(
    adapter: tuple[Path, Any], base_linears: dict[str, tuple[int, int]]
) -> None:
    path, _ = adapter
    lacking = {name: shape for name, shape in base_linears.items() if name != V1}
    with pytest.raises(LoadError, match=f"{V1}' is not an nn.Linear of the base model"):
        check_fits(read_adapter(path), lacking)


# -- bad input ---------------------------------------------------------------------------

Breaker = Callable[[Path], tuple[Path, str]]
"""Damages a copy of a good adapter directory; returns the file the error must name and a
text (the field and what is wrong) it must contain."""
GONE = object()


def config_with(text: str, **changes: object) -> Breaker:
    def breaker(root: Path) -> tuple[Path, str]:
        path = root / ADAPTER_CONFIG
        config = json.loads(path.read_text())
        config.update(changes)
        path.write_text(json.dumps({k: v for k, v in config.items() if v is not GONE}))
        return path, text

    return breaker


def config_text(content: str, text: str) -> Breaker:
    def breaker(root: Path) -> tuple[Path, str]:
        (root / ADAPTER_CONFIG).write_text(content)
        return root / ADAPTER_CONFIG, text

    return breaker


def tensors_with(text: str, change: Callable[[dict[str, torch.Tensor]], None]) -> Breaker:
    def breaker(root: Path) -> tuple[Path, str]:
        tensors = load_file(root / WEIGHTS)
        change(tensors)
        save_file(tensors, root / WEIGHTS)
        return root / WEIGHTS, text

    return breaker


def key(module: str, side: str) -> str:
    return f"{PREFIX}{module}.lora_{side}.weight"


def no_directory(root: Path) -> tuple[Path, str]:
    shutil.rmtree(root)
    return root, "does not exist"


def no_config(root: Path) -> tuple[Path, str]:
    (root / ADAPTER_CONFIG).unlink()
    return root / ADAPTER_CONFIG, "is missing: an adapter directory needs adapter_config.json"


def no_weights(root: Path) -> tuple[Path, str]:
    (root / WEIGHTS).unlink()
    return root / WEIGHTS, "is missing"


def only_pickle(root: Path) -> tuple[Path, str]:
    (root / WEIGHTS).rename(root / "adapter_model.bin")
    return root / "adapter_model.bin", "refusing"


def corrupt_weights(root: Path) -> tuple[Path, str]:
    (root / WEIGHTS).write_bytes(b"\xff" * 64)
    return root / WEIGHTS, "header length field"


def truncated_weights(root: Path) -> tuple[Path, str]:
    weights = root / WEIGHTS
    weights.write_bytes(weights.read_bytes()[:-100])
    return weights, "is truncated"


def drop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[name]

    return change


def put(name: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.update({name: value})


def rename(old: str, new: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.update({new: tensors.pop(old)})


def infix_on_q0(tensors: dict[str, torch.Tensor]) -> None:
    for side in "AB":
        tensors[f"{PREFIX}{Q0}.lora_{side}.other.weight"] = tensors.pop(key(Q0, side))


NOT_TARGETED = f"module '{V0}' has LoRA tensors, but"
BAD_INPUTS: dict[str, Breaker] = {
    "no directory": no_directory,
    "no config": no_config,
    "config not JSON": config_text("{r: 4", "is not valid JSON"),
    "config not an object": config_text("[4, 8]", "is not a JSON object"),
    "other peft_type": config_with("peft_type is 'IA3', expected 'LORA'", peft_type="IA3"),
    "no peft_type": config_with("peft_type is missing", peft_type=GONE),
    "no r": config_with("r is missing, expected a positive integer", r=GONE),
    "zero r": config_with("r is 0, expected a positive integer", r=0),
    "text r": config_with("r is '4', expected a positive integer", r="4"),
    "no lora_alpha": config_with("lora_alpha is missing", lora_alpha=GONE),
    "text lora_alpha": config_with("lora_alpha is 'eight'", lora_alpha="eight"),
    "bad use_rslora": config_with("use_rslora is 'yes'", use_rslora="yes"),
    "use_dora": config_with("use_dora is True: DoRA is not supported", use_dora=True),
    "bias": config_with("bias is 'all', expected 'none'", bias="all"),
    "lora_bias": config_with("lora_bias is True", lora_bias=True),
    "modules_to_save": config_with(
        "modules_to_save is ['lm_head']: not supported: those modules are full weights",
        modules_to_save=["lm_head"],
    ),
    "pissa base": config_with("init_lora_weights is 'pissa'", init_lora_weights="pissa"),
    "bad rank_pattern": config_with("rank_pattern['q_proj'] is 0", rank_pattern={"q_proj": 0}),
    "bad target regex": config_with("target_modules holds '('", target_modules="("),
    "r disagrees": config_with(f"r is 8 and no rank_pattern entry matches module '{Q0}'", r=8),
    "rank_pattern disagrees": config_with(
        f"rank_pattern['q_proj'] gives module '{Q0}' rank 2", rank_pattern={"q_proj": 2}
    ),
    "tensor not targeted": config_with(NOT_TARGETED, target_modules=["q_proj"]),
    "regex not targeting": config_with(NOT_TARGETED, target_modules=r".*q_proj"),
    "excluded tensor": config_with(NOT_TARGETED, exclude_modules=["v_proj"]),
    "layer not transformed": config_with(
        f"module '{Q0}' has LoRA tensors, but", layers_to_transform=[1]
    ),
    "target without tensors": config_with(
        "target_modules entry 'k_proj' matches no module",
        target_modules=["q_proj", "v_proj", "k_proj"],
    ),
    "A without B": tensors_with(
        f"module '{Q0}' has lora_A.weight but no lora_B.weight", drop(key(Q0, "B"))
    ),
    "B without A": tensors_with(
        f"module '{V1}' has lora_B.weight but no lora_A.weight", drop(key(V1, "A"))
    ),
    "3-D tensor": tensors_with(
        f"tensor '{key(Q0, 'A')}' has shape [1, 4, 64], expected 2-D",
        put(key(Q0, "A"), torch.zeros(1, 4, 64)),
    ),
    "integer tensor": tensors_with(
        "has dtype torch.int32, expected a float",
        put(key(Q0, "A"), torch.zeros(4, 64, dtype=torch.int32)),
    ),
    "ranks of A and B differ": tensors_with(
        "expected (rank, in) and (out, rank)", put(key(Q0, "B"), torch.zeros(64, 3))
    ),
    "embedding LoRA": tensors_with(
        "embeddings are not supported",
        put(f"{PREFIX}model.embed_tokens.lora_embedding_A", torch.zeros(4, 300)),
    ),
    "full weight": tensors_with(
        "full weights are not a low-rank update", put(f"{PREFIX}lm_head.weight", torch.zeros(3, 3))
    ),
    "lora_B bias": tensors_with(
        "lora_bias is not supported", put(f"{PREFIX}{Q0}.lora_B.bias", torch.zeros(64))
    ),
    "no prefix": tensors_with(
        "does not start with 'base_model.model.'", rename(key(Q0, "A"), f"{Q0}.lora_A.weight")
    ),
    "two adapter names": tensors_with("keys name several adapters", infix_on_q0),
    "no weights": no_weights,
    "only pickle": only_pickle,
    "corrupt weights": corrupt_weights,
    "truncated weights": truncated_weights,
}


@pytest.mark.parametrize("breaker", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_refused_naming_the_file_and_the_field(
    breaker: Breaker, adapter: tuple[Path, Any], tmp_path: Path
) -> None:
    root = shutil.copytree(adapter[0], tmp_path / "adapter")
    file, text = breaker(root)
    with pytest.raises(LoadError) as refused:
        read_adapter(root)
    message = str(refused.value)
    assert str(file) in message, message
    assert text in message, message
