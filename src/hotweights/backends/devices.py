"""Where a model's weights live: `cpu`, `cuda` (the current CUDA device) or `cuda:N`, and
how much memory that device has free for the next version.

Only `free_bytes` of a CUDA device imports torch; parsing is pure Python so the
configuration can be checked before anything heavy is imported.
"""

from __future__ import annotations

import re

from hotweights.core.memory import available_memory

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def parse_device(value: str) -> str:
    """`value` if it names a device hotweights can load onto (`cpu`, `cuda`, `cuda:N`);
    raises `ValueError` naming the accepted forms otherwise."""
    match = _DEVICE.match(value.strip())
    if match is None or (match.group(1) == "cpu" and match.group(2) is not None):
        raise ValueError(f"device must be cpu, cuda or cuda:N (N a GPU index), got {value!r}")
    return value.strip()


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def free_bytes(device: str) -> int | None:
    """Bytes that can be allocated on `device` now: `MemAvailable` for the CPU, what the
    CUDA driver reports free (`torch.cuda.mem_get_info`) for a GPU; None where unknown
    (CUDA not available, or not Linux). Memory this process's allocator caches but does not
    use counts as used: the reloader empties the cache after each unload."""
    if not is_cuda(device):
        return available_memory()
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def check_cuda(device: str) -> str | None:
    """Why `device` cannot be used here (no CUDA, or no GPU with that index), or None."""
    if not is_cuda(device):
        return None
    import torch

    if not torch.cuda.is_available():
        return "CUDA is not available here"
    index = torch.device(device).index
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        return f"there is no GPU {index} (this machine has {count})"
    return None
