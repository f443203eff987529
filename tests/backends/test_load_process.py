"""Loading in a helper process: same model, weights in one shared block, failures named."""

from __future__ import annotations

import json
import os
import signal
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotweights.backends import LoadedLM, TransformersLoader
from hotweights.errors import LoadError
from hotweights.generation import GenerationParams

pytestmark = pytest.mark.llm

GREEDY = GenerationParams(temperature=0.0, max_tokens=16)


@pytest.fixture(scope="module")
def process_loader() -> Iterator[TransformersLoader]:
    loader = TransformersLoader(load_in="process")
    yield loader
    loader.close()


def helper_pid(loader: TransformersLoader) -> int:
    helper = loader._helper
    assert helper is not None
    assert helper.pid is not None
    return helper.pid


def wait_until_in_flight(loader: TransformersLoader, thread: threading.Thread) -> None:
    """Until `thread`'s load has claimed the helper (a state, not a duration)."""
    helper = loader._helper
    assert helper is not None
    deadline = threading.Event()
    for _ in range(6000):
        if helper._busy or not thread.is_alive():
            return
        deadline.wait(0.01)
    raise AssertionError("the load never reached the helper")


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_model_loaded_in_the_helper_answers_like_one_loaded_here(
    process_loader: TransformersLoader, lively_dir: Path
) -> None:
    here = TransformersLoader().load(str(lively_dir))
    there = process_loader.load(str(lively_dir))
    try:
        process_loader.validate(there)
        process_loader.warmup(there)
        assert there.generate("Hello", GREEDY) == here.generate("Hello", GREEDY)
        assert (there.architecture, there.fingerprint) == (here.architecture, here.fingerprint)
        assert not there.model.training
        # Every parameter and buffer is a view of one shared block (one descriptor sent).
        tensors = [*there.model.parameters(), *there.model.buffers()]
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
        assert all(t.untyped_storage().is_shared() for t in tensors)
        assert helper_pid(process_loader) != os.getpid()
    finally:
        process_loader.unload(there)


def test_unloading_returns_the_block_and_its_descriptor(
    process_loader: TransformersLoader, tiny_dir: Path
) -> None:
    process_loader.unload(process_loader.load(str(tiny_dir)))  # the helper is up
    before = open_descriptors()
    for _ in range(5):
        loaded = process_loader.load(str(tiny_dir))
        module = weakref.ref(loaded.model)
        process_loader.unload(loaded)
        assert module() is None
    assert open_descriptors() == before


def test_a_checkpoint_transformers_refuses_fails_with_the_helpers_reason(
    process_loader: TransformersLoader, tiny_dir: Path, tmp_path: Path
) -> None:
    import shutil

    broken = Path(shutil.copytree(tiny_dir, tmp_path / "broken"))
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"could not load .*broken.*no-such-architecture"):
        process_loader.load(str(broken))
    loaded = process_loader.load(str(tiny_dir))  # the helper carries on
    process_loader.unload(loaded)


def test_a_helper_that_dies_mid_load_fails_that_load_only(
    process_loader: TransformersLoader, tiny_dir: Path
) -> None:
    process_loader.import_libraries()  # the helper is up
    pid = helper_pid(process_loader)
    os.kill(pid, signal.SIGSTOP)  # it cannot answer: the load below is in flight
    failures: list[BaseException] = []

    def load() -> None:
        try:
            process_loader.load(str(tiny_dir))
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    wait_until_in_flight(process_loader, thread)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert len(failures) == 1
    assert isinstance(failures[0], LoadError)
    assert "ended before answering (exit code -9)" in str(failures[0])
    loaded = process_loader.load(str(tiny_dir))  # a new helper
    assert helper_pid(process_loader) != pid
    assert loaded.generate("Hi", GREEDY).completion_tokens > 0
    process_loader.unload(loaded)


def test_a_load_abandoned_in_a_hung_helper_is_replaced_by_the_next(
    process_loader: TransformersLoader, tiny_dir: Path
) -> None:
    """A phase timeout abandons a load; the next one must not wait behind it."""
    process_loader.import_libraries()
    pid = helper_pid(process_loader)
    os.kill(pid, signal.SIGSTOP)  # hung
    abandoned: list[BaseException] = []

    def load() -> None:
        try:
            process_loader.load(str(tiny_dir))
        except BaseException as exc:
            abandoned.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    wait_until_in_flight(process_loader, thread)
    loaded: LoadedLM = process_loader.load(str(tiny_dir))
    try:
        assert helper_pid(process_loader) != pid
        thread.join(timeout=60)
        assert len(abandoned) == 1
        assert isinstance(abandoned[0], LoadError)
    finally:
        process_loader.unload(loaded)


def test_a_checkpoint_from_the_size_threshold_on_is_read_on_the_thread(tiny_dir: Path) -> None:
    big = TransformersLoader(load_in="process", thread_from=1)  # every checkpoint is "big"
    small = TransformersLoader(load_in="process", thread_from=2**40)
    try:
        on_thread = big.load(str(tiny_dir))
        assert big._helper is not None
        assert big._helper.pid is None  # never started: the load ran here
        in_helper = small.load(str(tiny_dir))
        assert small._helper is not None
        assert small._helper.pid is not None
        params = GenerationParams(temperature=0.0, max_tokens=6)
        assert on_thread.generate("Hi", params) == in_helper.generate("Hi", params)
        big.unload(on_thread)
        small.unload(in_helper)
    finally:
        big.close()
        small.close()
