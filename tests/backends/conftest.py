"""Tiny models for the backend tests, built once per session in a temporary directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hotweights.backends import LoadedLM, TransformersLoader
from hotweights.demo.tinylm import build_model, build_tokenizer, save_pretrained, save_tiny_model


def save_lively_model(path: Path, *, seed: int = 0) -> Path:
    """A tiny model with large random weights, so greedy and sampled text vary.

    `save_tiny_model`'s initialisation gives near-uniform logits, so greedy decoding
    repeats one byte; these weights make every token depend on the ones before it.
    """
    import torch

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.3, generator=generator)
    return save_pretrained(path, model, tokenizer)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def lively_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lively_model(tmp_path_factory.mktemp("lively") / "model")


@pytest.fixture(scope="session")
def loader() -> TransformersLoader:
    return TransformersLoader()


@pytest.fixture(scope="session")
def lively_lm(loader: TransformersLoader, lively_dir: Path) -> Iterator[LoadedLM]:
    """One loaded, validated and warmed-up model shared by the tests that only read it."""
    model = loader.load(str(lively_dir))
    loader.validate(model)
    loader.warmup(model)
    yield model
    loader.unload(model)


@pytest.fixture
def fresh_lm(loader: TransformersLoader, tiny_dir: Path) -> Iterator[LoadedLM]:
    """A model of its own, for tests that unload it or change it."""
    model = loader.load(str(tiny_dir))
    yield model
    loader.unload(model)
