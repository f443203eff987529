"""The assembly of a server: one reloader per model, and a loader's optional abilities
(closing, importing its libraries ahead) used when, and only when, it declares them."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from hotweights.config import Config
from hotweights.core.loader import Closing, LibraryImporting
from hotweights.server.assembly import build_state, default_model_name, freeze_startup_heap
from tests.fakes import FakeTextLoader


class AbleLoader(FakeTextLoader):
    """A fake loader with both optional abilities, counting their calls."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = 0
        self.imported = 0

    def close(self) -> None:
        self.closed += 1

    def import_libraries(self) -> None:
        self.imported += 1


def _config(tmp_path: Path) -> Config:
    source = tmp_path / "models" / "my-llm" / "3"
    source.mkdir(parents=True)
    return Config.load({"source": str(source)}, environ={})


def test_a_loader_declaring_the_abilities_is_closed_and_imported_ahead(tmp_path: Path) -> None:
    loader = AbleLoader()
    assert isinstance(loader, Closing)
    assert isinstance(loader, LibraryImporting)
    state = build_state(_config(tmp_path), loader)
    assert list(state.models) == ["my-llm"]
    try:
        freeze_startup_heap(state)
    finally:
        gc.unfreeze()
    assert loader.imported == 1
    state.close(timeout=5)
    assert loader.closed == 1


def test_a_loader_without_them_is_left_alone(tmp_path: Path) -> None:
    loader = FakeTextLoader()
    assert not isinstance(loader, Closing)
    assert not isinstance(loader, LibraryImporting)
    state = build_state(_config(tmp_path), loader)
    try:
        freeze_startup_heap(state)
    finally:
        gc.unfreeze()
    state.close(timeout=5)


@pytest.mark.parametrize(
    ("source", "name"), [("models/my-llm/3", "my-llm"), ("models/my-llm", "my-llm")]
)
def test_a_served_directory_is_named_by_its_model(source: str, name: str) -> None:
    assert default_model_name(source) == name


def test_nothing_to_serve_is_refused() -> None:
    with pytest.raises(ValueError, match="nothing to serve"):
        build_state(Config.load({}, environ={}), FakeTextLoader())


@pytest.mark.parametrize(
    ("verify", "given", "scan_mode", "checked"),
    [
        ("digest", None, "size", True),  # the default loader hashes on its read
        ("size", None, "size", False),
        ("none", None, "none", False),
        ("digest", "fake", "digest", False),  # a loader that does not say so: the scan hashes
    ],
)
def test_the_scan_leaves_digests_to_a_loader_that_checks_them(
    tmp_path: Path, verify: str, given: str | None, scan_mode: str, checked: bool
) -> None:
    from hotweights.backends import TransformersLoader
    from hotweights.engine.batching_loader import BatchingLoader
    from hotweights.sources import expected_digests
    from tests.sources.layouts import make_version

    repo = tmp_path / "repo"
    make_version(repo, "m", 1)
    config = Config.load({"repo": str(repo), "verify": verify}, environ={})
    state = build_state(config, FakeTextLoader() if given else None)
    assert state.sync is not None
    assert state.sync.repository.scan_mode == scan_mode
    loader = state.models["m"].reloader.loader
    if given is None:
        assert isinstance(loader, BatchingLoader)
        inner = loader.inner
        assert isinstance(inner, TransformersLoader)
        assert inner.expected_digests is (expected_digests if checked else None)
