"""A canary's bake: a prepared version takes a share of new requests beside the live one,
then is committed (the clock ran out, or an operator promoted it) or discarded (its
requests crossed a threshold, or an operator rolled it back), whichever comes first."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from hotweights.core.canary import CanaryMonitor, CanaryPolicy
from hotweights.core.prepared import Decision, PreparedVersion
from hotweights.core.version import ModelVersion
from hotweights.errors import NotPrepared

log = logging.getLogger("hotweights.reload")


def bake(
    policy: CanaryPolicy,
    handle: PreparedVersion[Any],
    stable: ModelVersion,
    commit: Callable[[PreparedVersion[Any], str], object],
) -> None:
    """Give `handle` its share of new requests beside `stable` and wait for the decision;
    with none by the end of the bake, `commit` it. Runs on the reloader's worker. The
    monitor's breach only claims the discard (it fires on the request path); the worker
    applies it."""

    def breach(reason: str) -> None:
        handle.claim(Decision.DISCARD, reason)

    monitor = CanaryMonitor(policy, stable.generation, handle.generation, breach)
    handle.bake_started = time.monotonic()
    handle.slot.start_canary(handle.generation, policy.share)
    handle.monitor = monitor  # only now may an operator promote or roll it back
    handle.job.phase = "bake"
    log.info(
        "%s: %s takes %g%% of new requests for %g s",
        handle.model,
        handle.version.label,
        policy.share * 100,
        policy.bake_seconds,
    )
    if not handle.wait_decided(policy.bake_seconds):
        with contextlib.suppress(NotPrepared):  # decided just now: that decision stands
            commit(handle, f"the bake of {policy.bake_seconds:g} s passed")


def figures(handle: PreparedVersion[Any]) -> dict[str, object] | None:
    """What a reload event says of a bake: share, decision and why, and both versions'
    requests; None if `handle` did not bake."""
    if handle.monitor is None:
        return None
    decision = "promoted" if handle.decision is Decision.COMMIT else "rolled back"
    return {
        "share": handle.monitor.policy.share,
        "decision": decision,
        "reason": handle.reason,
        **handle.monitor.figures(),
    }
