"""The ingress's flip point: the generation stamped on each admitted request (its model's
committed one), and the requests in flight on each generation.

Everything here runs on the ingress's one event loop (no locks): `admit` reads the model's
committed generation and counts the request in one step, `flip` replaces it in one
assignment, so every request for that model admitted after `flip` returns carries the new
generation and every request admitted before it keeps the old one to its end. Generations
are counted by number alone: the fleet never gives one number to two models.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Mapping

from hotweights.errors import InvalidRequest, UnknownModel


class Admissions:
    """Stamps and counts requests (one per ingress; the fleet runs one ingress)."""

    def __init__(self, generations: Mapping[str, int]) -> None:
        self.generations = dict(generations)
        """Each model's committed generation: what `admit` stamps."""
        self.admitted: Counter[int] = Counter()
        """Requests admitted on each generation since start."""
        self._inflight: Counter[int] = Counter()
        self._idle: dict[int, asyncio.Event] = {}

    def admit(self, model: str) -> int:
        """Stamp one request for `model` (one the fleet serves) with its committed
        generation and count it in flight."""
        generation = self.generations[model]
        self._inflight[generation] += 1
        self.admitted[generation] += 1
        return generation

    def done(self, generation: int) -> None:
        """One request stamped `generation` ended (answered, failed or abandoned)."""
        self._inflight[generation] -= 1
        if self._inflight[generation] <= 0:
            del self._inflight[generation]
            idle = self._idle.pop(generation, None)
            if idle is not None:
                idle.set()

    def flip(self, model: str, generation: int) -> int:
        """Stamp `generation` on `model`'s requests from now on; an older one (a flip sent
        by a coordinator that died, arriving after its successor's) changes nothing. The
        generation stamped now."""
        if generation > self.generations.get(model, 0):
            self.generations[model] = generation
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


def requested_model(body: bytes, served: list[str]) -> str:
    """The model a `/v1` request is for: the one its JSON body names, or the fleet's only
    one. Raises `UnknownModel` for a model the fleet does not serve, `InvalidRequest` for
    a pin (`model@N` pins a version on one server; in a fleet the ingress stamps the
    version and counts the request under it for the drain) and for no model named when
    the fleet serves several. A body that is not JSON goes to the replica's own server
    (one model), which says what is wrong with it."""
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
    if len(served) == 1:
        return served[0]
    raise InvalidRequest(f'name the model in "model": this fleet serves {", ".join(served)}')
