from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hotweights.core import Reloader, RetryPolicy
from tests.fakes import FakeLoader, FakeModel

MakeReloader = Callable[..., Reloader[FakeModel]]


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


@pytest.fixture
def make_reloader(loader: FakeLoader) -> Iterator[MakeReloader]:
    made: list[Reloader[FakeModel]] = []

    def make(**options: Any) -> Reloader[FakeModel]:
        options.setdefault("retry", RetryPolicy(retries=3, base_delay=0.0))
        options.setdefault("drain_timeout", 60.0)
        reloader: Reloader[FakeModel] = Reloader(loader, **options)
        made.append(reloader)
        return reloader

    yield make
    for gate in loader.gates.values():
        gate.set()
    for reloader in made:
        reloader.close(timeout=10)
