"""hotweights: model serving with zero-downtime hot reload of model weights."""

from __future__ import annotations

__version__ = "0.1.0"
