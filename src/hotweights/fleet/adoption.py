"""Serving a LoRA adapter published while the fleet serves (the coordinator's `adopt`).

Its newest eligible version gets a generation and is written to the record first (a
coordinator that dies after this point never gives that number out again); then every
running replica loads it on its base's committed generation, under the base's lock (no
cutover of the base meanwhile). Only when all have it does the fleet serve it (`join`
names it: a replica that starts from now on loads it, one that missed it adds it when it
catches up), and then the ingress admits requests for it. If a replica cannot load it,
it is taken off every replica, its entry is reset, and that version is marked bad with
the replicas' reasons (in the record too: a restart does not try it again); if the
replicas could not be asked, nothing is marked and the next change of the repository
tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from hotweights.fleet.cutover_record import reason
from hotweights.fleet.fleet_link import FleetLink, admit_until
from hotweights.fleet.ledger import Mark
from hotweights.fleet.model_fleet import ModelFleet

log = logging.getLogger("hotweights.fleet")


def adopt_adapter(
    name: str,
    base: ModelFleet,
    build: Callable[[], ModelFleet],
    serve: Callable[[ModelFleet], None],
    link: FleetLink,
    timeout: float,
) -> ModelFleet | None:
    """Serve adapter `name` on `base` (see the module): `build` makes its `ModelFleet`,
    `serve` makes the fleet serve it. The model served, or None when it was not. Raises
    `OSError` (having asked no replica) when the record cannot be written."""
    repository, shared = base.repository, base.shared
    info = repository.target(name)
    if info is None:  # no eligible version (any more)
        return None
    with base.lock:
        model = build()
        target = model.join(0).committed
        try:
            shared.save()
        except OSError:
            _reset(model)
            raise
        try:
            answers = link.add(name, target, timeout)
        except Exception as exc:
            log.warning("adapter %s: the replicas could not be asked: %s", name, reason(exc))
            _reset(model)
            return None
        errors = [reason(answer) for answer in answers if answer is not None]
        if errors:
            link.remove(name)
            why = f"adapter {name} could not be served: {'; '.join(errors)}"
            log.error("%s", why)
            _reset(model, Mark(why, info.signature), info.number)
            repository.scan()
            return None
        serve(model)
    admit_until(link, name, base.name, target.generation, timeout)
    log.info("adapter %s on %s served from g%d", name, base.name, target.generation)
    return model


def _reset(model: ModelFleet, mark: Mark | None = None, number: int = 0) -> None:
    """Forget `model`'s committed version in the record (it was never served), keeping
    its bad marks, and `mark` version `number` bad."""
    shared = model.shared
    with shared.lock:
        entry = shared.record.model(model.name)
        entry.committed = entry.number = entry.pending = None
        if mark is not None:
            entry.bad[number] = mark
            model.repository.mark_bad(model.name, number, mark.reason, signature=mark.signature)
        shared.save_quietly()
