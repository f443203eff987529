"""examples/push_while_training.py runs as a user would run it (its own server): every push
goes live, no sample fails, and every sample names a generation that was live when asked."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from hotweights.core import Outcome

pytestmark = pytest.mark.llm
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "push_while_training.py"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("push_while_training", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while it is made
    spec.loader.exec_module(module)
    return module


def test_training_pushes_every_n_steps_while_a_client_samples() -> None:
    run = _example().main(["--steps", "30", "--every", "10"])
    assert [event.outcome for event in run.pushes] == [Outcome.LIVE] * 3
    assert [event.new_generation for event in run.pushes] == [2, 3, 4]
    assert all(event.trigger == "push" for event in run.pushes)
    assert run.failed == []
    generations = [generation for generation, _ in run.samples]
    assert generations == sorted(generations)  # one client, in order: never back in time
    assert set(generations) <= {1, 2, 3, 4}
    assert generations[-1] == 4  # asked after the last push: the last version answers
