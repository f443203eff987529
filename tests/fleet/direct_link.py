"""A `FleetLink` that calls the replicas and the ingress's `Admissions` directly, in one
process (no Ray): the two phases racing real requests in a test."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence

from hotweights.fleet.admissions import Admissions
from hotweights.fleet.model_replica import Joined, Prepared, Target
from hotweights.fleet.replica import FleetReplica

TIMEOUT = 30.0


class DirectLink:
    """`FleetLink` by direct calls; the ingress parts run on `loop`."""

    def __init__(
        self,
        replicas: list[FleetReplica],
        admissions: Admissions,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.members = replicas
        self.admissions = admissions
        self.loop = loop
        self.preparing = threading.Event()
        """Set while a version prepares: requests admitted now are held back."""
        self.flipped = asyncio.Event()
        self.draining = threading.Event()
        """Set once the coordinator waits for the ingress's drain."""
        self.calls: list[str] = []

    def prepare(self, target: Target, timeout: float) -> Sequence[Prepared | BaseException]:
        self.calls.append("prepare")
        self.loop.call_soon_threadsafe(self.flipped.clear)
        self.preparing.set()
        return [replica.model(target.model).hold(target, timeout) for replica in self.members]

    def abort(self, model: str, generation: int, reason: str) -> None:
        for replica in self.members:
            replica.model(model).abort(generation, reason)

    def flip(self, model: str, generation: int, followers: Mapping[str, int]) -> None:
        self.calls.append("flip")

        async def flip() -> None:
            self.admissions.flip(model, generation, followers)
            self.preparing.clear()
            self.flipped.set()

        asyncio.run_coroutine_threadsafe(flip(), self.loop).result(TIMEOUT)

    def drained(self, generation: int, timeout: float) -> int:
        self.calls.append("drained")
        self.draining.set()
        waiting = self.admissions.drained(generation, timeout)
        return asyncio.run_coroutine_threadsafe(waiting, self.loop).result(timeout + TIMEOUT)

    def finish(self, model: str, generation: int, timeout: float) -> Sequence[bool | BaseException]:
        self.calls.append("finish")
        return [replica.model(model).finish(generation, timeout) for replica in self.members]

    def add(self, model: str, target: Target, timeout: float) -> Sequence[BaseException | None]:
        answers: list[BaseException | None] = []
        for replica in self.members:
            try:
                replica.add(model, Joined(target), timeout)
                answers.append(None)
            except Exception as exc:
                answers.append(exc)
        return answers

    def remove(self, model: str) -> None:
        for replica in self.members:
            replica.remove(model, TIMEOUT)

    def admit(self, model: str, parent: str, generation: int) -> None:
        async def admit() -> None:
            self.admissions.add(model, parent, generation)

        asyncio.run_coroutine_threadsafe(admit(), self.loop).result(TIMEOUT)

    def replicas(self) -> Sequence[dict[str, object] | BaseException]:
        return [replica.describe() for replica in self.members]

    def ingress(self) -> dict[str, object]:
        return {}
