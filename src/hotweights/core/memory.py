"""Will a new version fit? Compares a loader's size estimate with the memory available.

Under `availability` the new version loads beside the live one, so it must fit in what is
available now; under `resource` the live one is unloaded first, so its size counts too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hotweights.core.swap_policy import SwapPolicy
from hotweights.errors import InsufficientMemory


def human_size(n: int) -> str:
    """`1.50 GiB`, `12.0 MiB`, `900 B`."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes the kernel says can be allocated without swapping (`MemAvailable`), or None
    where that is unknown (not Linux, or unreadable)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class MemoryCheck:
    """Refuses a load that would not fit. `available` is injectable for tests."""

    available: Callable[[], int | None] = field(default=available_memory)
    """Bytes available now, or None to skip the check."""
    headroom: float = 1.1
    """Loading needs a little more than the weights (buffers, allocator slack)."""

    def check(self, source: str, needed: int, policy: SwapPolicy, resident: int) -> None:
        """Raise `InsufficientMemory` if `needed` bytes (the estimate for `source`) will not
        fit beside `resident` bytes of live versions under `policy`."""
        free = self.available()
        if free is None:
            return
        want = int(needed * self.headroom)
        room = free if policy == "availability" else free + resident
        if want <= room:
            return
        message = (
            f"{source} needs about {human_size(want)} but only {human_size(room)} is "
            f"available under the {policy} policy"
        )
        if policy == "availability" and want <= free + resident:
            message += (
                f"; the resource policy would fit it (it unloads the live version, about "
                f"{human_size(resident)}, before loading)"
            )
        raise InsufficientMemory(message)
