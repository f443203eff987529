from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def adapters_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding demo version one and the demo adapters, built once for the session
    (the build trains five models); tests that change a cache work on a copy."""
    from hotweights.demo.adapter_versions import build_demo_adapters

    root = tmp_path_factory.mktemp("adapters-cache")
    build_demo_adapters(root)
    return root
