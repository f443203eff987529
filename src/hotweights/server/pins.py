"""Which resident version a request is admitted to: the live one, or with `model@N` the
version from directory `N` (`model@gN`: generation `N`), live or still draining."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hotweights.core import Lease, ModelVersion
from hotweights.errors import InvalidRequest, UnknownModel
from hotweights.server.server_state import ServedModel

_PIN = re.compile(r"(g?)([0-9]{1,18})", re.ASCII)  # model@N or model@gN

SCOPE_PIN = "hotweights.pin"
"""The ASGI scope key through which an in-process caller (a fleet replica, which gets the
generation the fleet's ingress stamped) pins a request as `model@...` would. No HTTP
client can set a scope key; a pin in the request's own `model` wins."""


def requested_pin(model: str, scope: Mapping[str, Any]) -> tuple[str, str]:
    """The model name and the pin of a request for `model` (`name@pin`), or the pin its
    caller put in the ASGI scope."""
    name, _, pin = model.partition("@")
    return name, pin or str(scope.get(SCOPE_PIN, ""))


def pinned_version(served: ServedModel, pin: str) -> ModelVersion | None:
    """The resident version a generation pin (`gN`) names, if there is one."""
    match = _PIN.fullmatch(pin)
    if match is None or not match.group(1):
        return None
    generation = int(match.group(2))
    found = [v for v in served.reloader.resident() if v.generation == generation]
    return found[0] if found else None


async def admit(served: ServedModel, pin: str) -> Lease[Any]:
    """Lease the live version, or with `model@N` the resident version from directory `N`
    (`model@gN`: generation N), live or still draining."""
    if not pin:
        return await served.reloader.acquire_async()
    match = _PIN.fullmatch(pin)
    if match is not None and match.group(1):
        generation = int(match.group(2))
        lease = served.reloader.acquire_resident(lambda v: v.generation == generation)
    elif match is not None:
        number = str(int(match.group(2)))  # "007" names directory 7
        lease = served.reloader.acquire_resident(lambda v: Path(v.source).name == number)
    else:
        raise InvalidRequest(f"model@{pin}: a version is a directory number N or a generation gN")
    if lease is None:
        resident = ", ".join(
            f"{Path(v.source).name} (g{v.generation})" for v in served.reloader.resident()
        )
        raise UnknownModel(
            f"version {pin} of model {served.name!r} is not resident (live or draining); "
            f"resident: {resident or 'none'}"
        )
    return lease
