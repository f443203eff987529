"""The coordinator's `FleetLink` on Ray: the replicas and the ingress reached through
Serve's deployment handles (broadcasts to every running replica, calls to the one
ingress)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from ray import serve
from ray.serve.exceptions import DeploymentUnavailableError

from hotweights.fleet.model_replica import Prepared, Target
from hotweights.fleet.names import APP, INGRESS, REPLICA

log = logging.getLogger("hotweights.fleet")
CONTROL_TIMEOUT_S = 30.0
"""Bound on the coordinator's short calls (abort, flip, describe)."""


class RayLink:
    """`FleetLink` over Serve handles (resolved on first use: the coordinator starts
    before the application is deployed)."""

    def __init__(self) -> None:
        self._replicas: Any = None
        self._ingress: Any = None

    def _handles(self) -> tuple[Any, Any]:
        if self._replicas is None:
            self._replicas = serve.get_deployment_handle(REPLICA, APP)
            self._ingress = serve.get_deployment_handle(INGRESS, APP)
        return self._replicas, self._ingress

    def prepare(self, target: Target, timeout: float) -> Sequence[Prepared | BaseException]:
        try:
            replicas, _ = self._handles()
        except Exception as exc:  # not deployed yet
            log.info("no replicas to prepare g%d on: %s", target.generation, exc)
            return []
        try:
            answers: list[Prepared | BaseException] = replicas.broadcast("prepare", target).results(
                timeout_s=timeout, return_exceptions=True
            )
        except DeploymentUnavailableError as exc:  # every replica is (re)starting
            log.info("no replicas to prepare g%d on: %s", target.generation, exc)
            return []
        return answers

    def abort(self, model: str, generation: int, reason: str) -> None:
        replicas, _ = self._handles()
        replicas.broadcast("abort", model, generation, reason).results(
            timeout_s=CONTROL_TIMEOUT_S, return_exceptions=True
        )

    def flip(self, model: str, generation: int, followers: Mapping[str, int]) -> None:
        _, ingress = self._handles()
        flip = ingress.flip.remote(model, generation, dict(followers))
        flip.result(timeout_s=CONTROL_TIMEOUT_S)

    def drained(self, generation: int, timeout: float) -> int:
        _, ingress = self._handles()
        left: int = ingress.drained.remote(generation, timeout).result(
            timeout_s=timeout + CONTROL_TIMEOUT_S
        )
        return left

    def finish(self, model: str, generation: int, timeout: float) -> Sequence[bool | BaseException]:
        replicas, _ = self._handles()
        answers: list[bool | BaseException] = replicas.broadcast(
            "finish", model, generation, timeout
        ).results(timeout_s=timeout + CONTROL_TIMEOUT_S, return_exceptions=True)
        return answers

    def add(self, model: str, target: Target, timeout: float) -> Sequence[BaseException | None]:
        try:
            replicas, _ = self._handles()
            answers: list[BaseException | None] = replicas.broadcast("add", model, target).results(
                timeout_s=timeout + CONTROL_TIMEOUT_S, return_exceptions=True
            )
        except DeploymentUnavailableError:  # none running: each loads it when it starts
            return []
        return answers

    def remove(self, model: str) -> None:
        replicas, _ = self._handles()
        replicas.broadcast("remove", model).results(
            timeout_s=CONTROL_TIMEOUT_S, return_exceptions=True
        )

    def admit(self, model: str, parent: str, generation: int) -> None:
        _, ingress = self._handles()
        ingress.add.remote(model, parent, generation).result(timeout_s=CONTROL_TIMEOUT_S)

    def replicas(self) -> Sequence[dict[str, object] | BaseException]:
        try:
            replicas, _ = self._handles()
            answers: list[dict[str, object] | BaseException] = replicas.broadcast(
                "describe"
            ).results(timeout_s=CONTROL_TIMEOUT_S, return_exceptions=True)
        except Exception as exc:
            return [exc]
        return answers

    def ingress(self) -> dict[str, object]:
        try:
            _, ingress = self._handles()
            status: dict[str, object] = ingress.status.remote().result(timeout_s=CONTROL_TIMEOUT_S)
        except Exception as exc:
            return {"error": str(exc)}
        return status
