"""The ingress's flip point: the generation stamped on each admitted request (its model's
committed one), and the requests in flight on each generation.

Everything here runs on the ingress's one event loop (no locks): `admit` reads the model's
committed generation and counts the request in one step, `flip` replaces it in one
assignment, so every request for that model admitted after `flip` returns carries the new
generation and every request admitted before it keeps the old one to its end. Generations
are counted by number alone: the fleet never gives one number to two models.

A request for a LoRA adapter is stamped with both generations (`Stamp`): the adapter's,
and its base's, which that adapter version is bound to. It counts in flight under both,
so a base's drain waits for the requests of the adapters on it too. A base's cutover
flips the base and its adapters in one `flip`: no request is stamped with a new base and
an adapter version bound to the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from hotweights.errors import InvalidRequest, UnknownModel


@dataclass(frozen=True)
class Stamp:
    """What one admitted request carries: its model's committed generation (the one it is
    answered on) and, for a LoRA adapter, its base's."""

    generation: int
    base_generation: int | None = None

    @property
    def counted(self) -> tuple[int, ...]:
        """The generations the request counts under while in flight."""
        base = self.base_generation
        return (self.generation,) if base is None else (self.generation, base)


class Admissions:
    """Stamps and counts requests (one per ingress; the fleet runs one ingress).
    `parents` names each LoRA adapter's base."""

    def __init__(
        self, generations: Mapping[str, int], parents: Mapping[str, str] | None = None
    ) -> None:
        self.generations = dict(generations)
        """Each model's committed generation: what `admit` stamps."""
        self.parents = dict(parents or {})
        self.admitted: Counter[int] = Counter()
        """Requests admitted on each generation since start (an adapter's request under
        the adapter's)."""
        self._inflight: Counter[int] = Counter()
        self._idle: dict[int, asyncio.Event] = {}

    def add(self, model: str, parent: str, generation: int) -> None:
        """Admit requests for adapter `model` (on base `parent`) from now on, stamped
        `generation` (a fleet adopted it)."""
        self.parents[model] = parent
        self.flip(model, generation)

    def admit(self, model: str) -> Stamp:
        """Stamp one request for `model` (one the fleet serves) with its committed
        generation (and an adapter's base's) and count it in flight."""
        base = self.parents.get(model)
        stamp = Stamp(self.generations[model], self.generations[base] if base else None)
        for generation in stamp.counted:
            self._inflight[generation] += 1
        self.admitted[stamp.generation] += 1
        return stamp

    def done(self, stamp: Stamp) -> None:
        """One request stamped `stamp` ended (answered, failed or abandoned)."""
        for generation in stamp.counted:
            self._inflight[generation] -= 1
            if self._inflight[generation] <= 0:
                del self._inflight[generation]
                idle = self._idle.pop(generation, None)
                if idle is not None:
                    idle.set()

    def flip(self, model: str, generation: int, followers: Mapping[str, int] | None = None) -> int:
        """Stamp `generation` on `model`'s requests from now on, and each of `followers`'
        generations on that adapter's, in this one step; an older one (a flip sent by a
        coordinator that died, arriving after its successor's) changes nothing. The
        generation stamped now."""
        for name, number in ((model, generation), *(followers or {}).items()):
            if number > self.generations.get(name, 0):
                self.generations[name] = number
        return self.generations[model]

    async def drained(self, generation: int, timeout: float) -> int:
        """Wait until no request stamped `generation` is in flight, or `timeout` seconds;
        the number still in flight then."""
        if self._inflight[generation] > 0:
            idle = self._idle.setdefault(generation, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(idle.wait(), timeout)
        return self._inflight[generation]

    def inflight(self) -> dict[int, int]:
        return {g: n for g, n in self._inflight.items() if n > 0}


def requested_model(body: bytes, served: list[str], bases: list[str] | None = None) -> str:
    """The model a `/v1` request is for: the one its JSON body names, or the fleet's only
    base model (`bases`: the served models that are not adapters; all when None). Raises
    `UnknownModel` for a model the fleet does not serve, `InvalidRequest` for a pin
    (`model@N` pins a version on one server; in a fleet the ingress stamps the version and
    counts the request under it for the drain) and for no model named when the fleet
    serves several base models. A body that is not JSON goes to the replica's own server,
    which says what is wrong with it."""
    try:
        parsed = json.loads(body) if body.strip() else None
    except ValueError:
        parsed = None
    model = parsed.get("model") if isinstance(parsed, dict) else None
    if isinstance(model, str):
        if "@" in model:
            raise InvalidRequest(
                f"model {model!r}: a fleet serves the committed version; pins (model@N) are "
                "for one server"
            )
        if model in served:
            return model
        raise UnknownModel(f"model {model!r} is not served here (served: {', '.join(served)})")
    bases = served if bases is None else bases
    if len(bases) == 1:
        return bases[0]
    raise InvalidRequest(f'name the model in "model": this fleet serves {", ".join(bases)}')
