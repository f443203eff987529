"""How the coordinator reaches the replicas and the ingress (`FleetLink`), and the three
conversations it has over it for one model: prepare on every replica, flip the ingress,
finish on every replica. Each says what went wrong in words for the cutover's record;
none decides what to do about it (the coordinator does)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from hotweights.fleet.cutover_record import reason
from hotweights.fleet.model_replica import Prepared, Target
from hotweights.fleet.settings import PREPARE_ROUNDS

log = logging.getLogger("hotweights.fleet")

FINISH_ATTEMPTS = 3
FLIP_RETRY_S = 0.5
"""Pause between attempts to flip an ingress that did not answer (Serve restarts it)."""


class FleetLink(Protocol):
    """How the coordinator reaches the replicas and the ingress. Blocking calls, which
    the cutovers of different models may make at the same time."""

    def prepare(self, target: Target, timeout: float) -> Sequence[Prepared | BaseException]:
        """Every running replica's answer (`target.model` names the model); raises
        `TimeoutError` past `timeout`."""

    def abort(self, model: str, generation: int, reason: str) -> None: ...

    def flip(self, model: str, generation: int, followers: Mapping[str, int]) -> None:
        """The ingress stamps `generation` on every request for `model` admitted from now
        on, and each of `followers`' generations (by adapter) on that adapter's, in one
        step (never an older one: a flip that arrives late changes nothing)."""

    def drained(self, generation: int, timeout: float) -> int:
        """Wait until the ingress has no request on `generation` in flight, or `timeout`;
        the number still in flight."""

    def finish(
        self, model: str, generation: int, timeout: float
    ) -> Sequence[bool | BaseException]: ...

    def add(self, model: str, target: Target, timeout: float) -> Sequence[BaseException | None]:
        """Every running replica serves LoRA adapter `model` from now on, `target` live
        (each replica's answer: None, or why it could not)."""

    def remove(self, model: str) -> None:
        """Every running replica stops serving `model` (an adapter whose first version
        failed to load somewhere)."""

    def admit(self, model: str, parent: str, generation: int) -> None:
        """The ingress admits requests for adapter `model` (on base `parent`) from now on,
        stamped `generation`."""

    def replicas(self) -> Sequence[dict[str, object] | BaseException]: ...

    def ingress(self) -> dict[str, object]: ...


def prepare_everywhere(
    link: FleetLink, target: Target, timeout: float
) -> tuple[list[Prepared], list[str]]:
    """Prepare `target` on every replica, in rounds until one finds every replica already
    holding it (a replica that started during a round holds it too), at most
    `PREPARE_ROUNDS`. Each replica's answer, and what failed."""
    answers: dict[str, Prepared] = {}
    errors: list[str] = []
    for _ in range(PREPARE_ROUNDS):
        try:
            results = link.prepare(target, timeout)
        except TimeoutError:
            errors.append(f"not every replica was ready within {timeout:g} s")
            break
        except Exception as exc:
            errors.append(f"preparing failed: {reason(exc)}")
            break
        fresh = False
        for result in results:
            if isinstance(result, BaseException):
                errors.append(f"a replica failed: {reason(result)}")
            elif not result.ok:
                errors.append(result.error or f"replica {result.replica} failed")
            else:
                fresh = fresh or result.fresh
                if result.replica not in answers or result.fresh:
                    answers[result.replica] = result
        if errors or not fresh:
            break
    return list(answers.values()), errors


def flip_until(
    link: FleetLink,
    model: str,
    generation: int,
    timeout: float,
    followers: Mapping[str, int] | None = None,
) -> bool:
    """Make the ingress stamp `generation` on `model`'s requests (and `followers`' on
    the adapters that follow it), again until it answers or `timeout` passed (an ingress
    that Serve restarts asks for the committed generations by itself). True if it
    answered."""
    return _until(lambda: link.flip(model, generation, followers or {}), generation, timeout)


def admit_until(link: FleetLink, model: str, parent: str, generation: int, timeout: float) -> bool:
    """Make the ingress admit requests for adapter `model` (on `parent`), stamped
    `generation`, again until it answers or `timeout` passed. True if it answered."""
    return _until(lambda: link.admit(model, parent, generation), generation, timeout)


def _until(call: Callable[[], None], generation: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            call()
            return True
        except Exception as exc:
            if time.monotonic() >= deadline:
                log.error("the ingress never took g%d: %s", generation, reason(exc))
                return False
            log.warning("telling the ingress of g%d failed, again: %s", generation, exc)
            time.sleep(FLIP_RETRY_S)


def finish_everywhere(link: FleetLink, model: str, generation: int, timeout: float) -> str | None:
    """Every replica makes `generation` live for `model` (a replica that lacks it catches
    up first). Retried; what still failed, for the record (None: all finished)."""
    finished: Sequence[bool | BaseException] = []
    for _ in range(FINISH_ATTEMPTS):
        try:
            finished = link.finish(model, generation, timeout)
        except Exception as exc:
            finished = [exc]
        if all(answer is True for answer in finished):
            return None
    failed = [a if isinstance(a, bool) else reason(a) for a in finished if a is not True]
    error = f"committed, but {len(failed)} replica(s) did not finish: {failed}"
    log.error("cutover g%d: %s", generation, error)
    return error
