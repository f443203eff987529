"""Devices: the names accepted, and the free memory each reports to the memory check and
the engine's cache sizing. A GPU's free memory comes from `torch.cuda.mem_get_info`,
replaced here by a fake so the wiring is checked on a machine without one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hotweights.backends import TransformersLoader
from hotweights.backends.devices import check_cuda, free_bytes, parse_device
from hotweights.config import Config
from hotweights.core import MemoryCheck, Outcome, Reloader
from hotweights.core.memory import available_memory
from hotweights.engine.batching_loader import BatchingLoader, EngineSettings
from hotweights.engine.kv import KVShape
from hotweights.errors import InsufficientMemory
from hotweights.server.assembly import memory_check

GIB = 2**30


@pytest.mark.parametrize("name", ["cpu", "cuda", "cuda:0", "cuda:12", " cuda:1 "])
def test_devices_hotweights_can_load_onto(name: str) -> None:
    assert parse_device(name) == name.strip()


@pytest.mark.parametrize("name", ["gpu", "cpu:0", "cuda:", "cuda:-1", "CUDA", "", "cuda:1x"])
def test_other_names_are_refused_with_the_accepted_forms(name: str) -> None:
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
        parse_device(name)


class FakeGpus:
    """Stands in for torch.cuda: `count` GPUs, each with `free` bytes free."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, free: int, count: int = 2) -> None:
        import torch

        self.asked: list[Any] = []
        self.free = free
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "mem_get_info", self.mem_get_info)

    def mem_get_info(self, device: Any) -> tuple[int, int]:
        self.asked.append(device)
        return self.free, 80 * GIB


def test_the_cpu_reports_what_the_kernel_says_is_available() -> None:
    assert free_bytes("cpu") == pytest.approx(available_memory(), rel=0.05)


def test_a_gpu_reports_what_the_driver_says_is_free_on_that_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus = FakeGpus(monkeypatch, free=3 * GIB)
    assert free_bytes("cuda:1") == 3 * GIB
    assert [(d.type, d.index) for d in gpus.asked] == [("cuda", 1)]


def test_a_gpu_that_is_not_there_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeGpus(monkeypatch, free=GIB, count=2)
    assert check_cuda("cuda:1") is None
    assert check_cuda("cuda:2") == "there is no GPU 2 (this machine has 2)"
    assert check_cuda("cpu") is None


def test_without_cuda_the_free_memory_is_unknown_and_a_load_says_why() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert free_bytes("cuda:0") is None
    assert check_cuda("cuda:0") == "CUDA is not available here"


def test_a_version_that_does_not_fit_beside_the_live_one_on_the_gpu_is_refused_with_the_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server's memory check reads the GPU's free memory, not the host's: 2 GiB free
    on the GPU refuses a 3 GiB version under availability and names the resource policy,
    which would fit it beside nothing (the live 4 GiB version unloaded first)."""
    FakeGpus(monkeypatch, free=2 * GIB)
    check = memory_check(Config.load({"device": "cuda:0"}, environ={}))
    assert check is not None
    with pytest.raises(InsufficientMemory, match="the resource policy would fit it"):
        check.check("v2", 3 * GIB, "availability", resident=4 * GIB)
    check.check("v2", 3 * GIB, "resource", resident=4 * GIB)  # fits once the live one goes
    FakeGpus(monkeypatch, free=8 * GIB)
    check.check("v2", 3 * GIB, "availability", resident=4 * GIB)


def test_the_engine_sizes_its_automatic_cache_from_the_gpu_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A quarter of what is free on the device, at most what a full batch can use."""
    shape = KVShape(layers=2, kv_heads=2, head_dim=16, dtype_bytes=2)  # 256 bytes a token
    loader = BatchingLoader(
        TransformersLoader(device="cuda:0"), EngineSettings(max_batch=4, max_sequence_tokens=4096)
    )
    FakeGpus(monkeypatch, free=4 * 256 * 4 * 1000)  # a quarter: 1000 tokens for 4 rows
    limits = loader.limits(shape, max_positions=None)
    # The prefix cache takes an eighth of the budget, in blocks of 32 tokens; the rows the rest.
    assert (limits.columns, limits.prefix_blocks) == (875, 15)
    FakeGpus(monkeypatch, free=GIB)
    assert loader.limits(shape, max_positions=None).columns == 4096


def test_a_gpu_loader_reads_on_its_own_thread() -> None:
    """The helper process hands weights over in the host's shared memory; for a GPU that
    would be one more copy, so a GPU loader never starts it."""
    assert TransformersLoader(device="cuda:0", load_in="process")._helper is None
    assert TransformersLoader(device="cpu", load_in="process")._helper is not None
    with pytest.raises(ValueError, match="device must be"):
        TransformersLoader(device="tpu")


def test_on_a_gpu_a_swap_returns_the_old_versions_memory(lively_dir: Path) -> None:
    """Runs only where CUDA is: two versions on the GPU through the batched engine, then
    the memory the old one held (weights and its engine's cache) is back after the swap."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    loader = BatchingLoader(
        TransformersLoader(device="cuda:0", dtype="bfloat16"),
        EngineSettings(max_batch=4, kv_cache_bytes=2**24),
    )
    reloader: Reloader[Any] = Reloader(loader, memory=MemoryCheck(lambda: free_bytes("cuda:0")))
    try:
        before = torch.cuda.memory_allocated()
        assert reloader.reload(str(lively_dir)).outcome is Outcome.LIVE
        [(_, first)] = reloader.models()
        assert first.engine is not None, first.engine_note  # batched, not the fallback
        one = torch.cuda.memory_allocated() - before
        assert one >= 2**24  # the cache at least, on the GPU
        assert reloader.reload(str(lively_dir), description="again").outcome is Outcome.LIVE
        second = reloader.models()[0][1]
        assert second.engine is not None, second.engine_note
        assert reloader.wait_drained(60)
        assert torch.cuda.memory_allocated() - before <= one * 1.05
    finally:
        reloader.close(30)


def test_the_cli_names_the_accepted_devices(capsys: pytest.CaptureFixture[str]) -> None:
    from hotweights.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", "--device", "gpu"])
    assert exited.value.code == 2
    assert (
        "device must be cpu, cuda or cuda:N (N a GPU index), got 'gpu'" in capsys.readouterr().err
    )
