"""A loaded model owns its weights: rewriting or truncating its checkpoint in place (a
training job saving into the served directory) changes nothing that serves."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from hotweights.backends import LoadedLM, TransformersLoader
from hotweights.backends.files import inspect_model_dir
from hotweights.backends.private_weights import make_weights_private
from hotweights.generation import GenerationParams

GREEDY = GenerationParams(temperature=0.0, max_tokens=12)


def _checksum(model: LoadedLM) -> float:
    with torch.no_grad():
        return sum(float(p.double().abs().sum()) for p in model.model.parameters())


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "delete"])
def test_a_loaded_model_survives_its_checkpoint_changing_in_place(
    lively_dir: Path, tmp_path: Path, damage: str
) -> None:
    source = tmp_path / "model"
    shutil.copytree(lively_dir, source)
    loader = TransformersLoader(load_in="thread")
    model = loader.load(str(source))
    before = (_checksum(model), model.generate("The quick", GREEDY).text)
    weights = source / "model.safetensors"
    size = weights.stat().st_size
    if damage == "overwrite":  # same size, new bytes: a mapped model would read them
        with weights.open("r+b") as stream:
            stream.seek(size // 10)
            stream.write(b"\x00" * (size * 8 // 10))
    elif damage == "truncate":  # a mapped model would die of SIGBUS at its next pass
        with weights.open("r+b") as stream:
            stream.truncate(size // 3)
    else:
        weights.unlink()
    after = (_checksum(model), model.generate("The quick", GREEDY).text)
    assert after == before
    loader.unload(model)


def test_private_weights_keep_ties_and_answers(lively_dir: Path) -> None:
    loader = TransformersLoader(load_in="thread")
    private = loader.load(str(lively_dir))
    network: Any = private.model
    embed, head = network.model.embed_tokens.weight, network.lm_head.weight
    if network.config.tie_word_embeddings:
        assert head.data_ptr() == embed.data_ptr()
    files = inspect_model_dir(lively_dir)
    assert make_weights_private(private.model, files.headers) > 0  # idempotent: reads again
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(lively_dir)
    for (name, ours), (_, theirs) in zip(
        private.model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    loader.unload(private)


def test_a_file_shorter_than_its_header_says_is_refused(lively_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lively_dir)
    source = tmp_path / "model"
    shutil.copytree(lively_dir, source)
    headers = inspect_model_dir(source).headers
    with (source / "model.safetensors").open("r+b") as stream:
        stream.truncate(headers[0].file_size - 100)
    with pytest.raises(OSError, match="ended after"):
        make_weights_private(model, headers)
