"""The names a fleet's parts find each other by in Ray."""

from __future__ import annotations

NAMESPACE = "hotweights"
"""The Ray namespace of the coordinator and of the driver."""
COORDINATOR = "hotweights-coordinator"
"""The coordinator actor's name (detached: it outlives the driver that started it)."""
APP = "hotweights"
"""The Serve application: deployments `Ingress` (one replica) and `Replica` (N)."""
INGRESS = "Ingress"
REPLICA = "Replica"
