"""The startup freeze: what the libraries allocate is never walked again by a collection."""

from __future__ import annotations

import gc
import sys
import weakref
from pathlib import Path

import pytest

from hotweights.backends import LoadedLM
from hotweights.config import Config
from hotweights.demo.tinylm import save_tiny_model
from hotweights.engine.batching_loader import BatchingLoader
from hotweights.server.assembly import build_state, freeze_startup_heap

pytestmark = pytest.mark.llm


def test_freeze_before_the_first_load_leaves_the_collector_only_the_models(
    tmp_path: Path,
) -> None:
    source = save_tiny_model(tmp_path / "models" / "1")
    config = Config.load({"source": str(source), "model_name": "m"}, environ={})
    state = build_state(config)
    loader = state.models["m"].reloader.loader
    assert isinstance(loader, BatchingLoader)
    try:
        freeze_startup_heap(state)
        assert "transformers.models.auto" in sys.modules
        frozen = gc.get_freeze_count()
        assert frozen > 50_000, frozen  # torch and transformers alone hold ~350,000

        first: LoadedLM = loader.load(str(source))
        loader.validate(first)
        loader.warmup(first)
        assert first.engine is not None, first.engine_note
        module = weakref.ref(first.model)
        # What an unload's full collection still walks: objects made since the freeze.
        assert len(gc.get_objects()) < frozen // 4
        loader.unload(first)
        assert module() is None, "the model (or its engine) outlived its unload"
        stopped: object = first.engine  # release() cleared it
        assert stopped is None

        # A model loaded after the freeze is not frozen: a later version is freed too.
        second = loader.load(str(source))
        module = weakref.ref(second.model)
        loader.unload(second)
        assert module() is None
    finally:
        gc.unfreeze()
        state.close(timeout=10)
