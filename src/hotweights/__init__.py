"""hotweights: model serving with zero-downtime hot reload of model weights.

`import hotweights` loads nothing else; `hotweights.push` and `hotweights.PushFailed` (the
client that sends a trainer's weights to a running server) are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hotweights.push_client import PushFailed, push

__version__ = "0.1.0"
__all__ = ["PushFailed", "__version__", "push"]


def __getattr__(name: str) -> Any:
    if name == "push":
        from hotweights.push_client import push

        return push
    if name == "PushFailed":
        from hotweights.push_client import PushFailed

        return PushFailed
    raise AttributeError(f"module 'hotweights' has no attribute {name!r}")
