"""The rows a reload-under-load run can compare, and the names that select them.

`--policies` names hotweights rows (`HOTWEIGHTS_ROWS`: each swap policy, and the
`availability/batch1` control); `--peers` names peer rows, or a group of them (`ray`: both
Ray Serve rows). A peer's driver module is imported only when one of its rows is asked
for, and the rows of one peer share its cached environment.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peers.hotweights_server import HOTWEIGHTS_ROWS, HotweightsRow
from peers.system import System

# A peer row: (driver module, class, the cached environment it runs from, keyword arguments).
PEER_SYSTEMS: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "torchserve": ("torchserve", "TorchServeSystem", "torchserve", {}),
    "mlserver": ("mlserver", "MLServerSystem", "mlserver", {}),
    "ray-reconfigure": ("ray_serve", "RayServeSystem", "ray", {"update": "reconfigure"}),
    "ray-rolling": ("ray_serve", "RayServeSystem", "ray", {"update": "rolling"}),
}
PEER_GROUPS = {"ray": ("ray-reconfigure", "ray-rolling")}
PEERS = ("torchserve", "mlserver", "ray")
"""What `--peers` runs by default: every peer row."""


def hotweights_rows(listed: str) -> list[HotweightsRow]:
    """The rows a comma-separated `--policies` names; SystemExit for an unknown one."""
    rows = []
    for name in _names(listed):
        if name not in HOTWEIGHTS_ROWS:
            known = ", ".join(HOTWEIGHTS_ROWS)
            raise SystemExit(f"unknown hotweights row {name!r}; choose from {known}")
        rows.append(HOTWEIGHTS_ROWS[name])
    return rows


def peer_rows(listed: str) -> list[str]:
    """The peer rows a comma-separated `--peers` names, groups expanded; SystemExit for an
    unknown name."""
    rows: list[str] = []
    for name in _names(listed):
        if name in PEER_GROUPS:
            rows += PEER_GROUPS[name]
        elif name in PEER_SYSTEMS:
            rows.append(name)
        else:
            known = ", ".join([*PEER_GROUPS, *PEER_SYSTEMS])
            raise SystemExit(f"unknown peer {name!r}; choose from {known}")
    return rows


def make_peer(
    row: str, *, cache: Path, workdir: Path, install_timeout: float, start_timeout: float
) -> System:
    """The driver of peer row `row`: its environment under `cache`, its files under
    `workdir`."""
    module_name, class_name, environment, options = PEER_SYSTEMS[row]
    module = importlib.import_module(f"peers.{module_name}")
    maker: Callable[..., System] = getattr(module, class_name)
    return maker(
        cache=cache / environment,
        workdir=workdir / row,
        install_timeout=install_timeout,
        start_timeout=start_timeout,
        **options,
    )


def _names(listed: str) -> list[str]:
    return [name for name in listed.split(",") if name]
