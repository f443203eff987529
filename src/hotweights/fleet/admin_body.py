"""The bodies of a fleet's `POST /admin/reload` and `/admin/rollback`, checked: the fields
`hotweights reload` and `rollback` send, each acted on or refused by name."""

from __future__ import annotations

import json
from dataclasses import dataclass

from hotweights.errors import InvalidRequest

RELOAD_FIELDS = frozenset({"version", "description", "wait", "model"})
ROLLBACK_FIELDS = frozenset({"description", "model"})


@dataclass(frozen=True)
class AdminAsk:
    version: int | None = None
    """A repository version to pin; None: follow the latest eligible one."""
    description: str = ""
    """Recorded with the cutover."""
    model: str | None = None
    """The model to cut over (None: the fleet's only one)."""


def parse_reload(raw: bytes) -> AdminAsk:
    """`{"version": N, "description": "...", "model": "...", "wait": true}`, every field
    optional. Raises `InvalidRequest` naming what is wrong."""
    body = _object(raw, RELOAD_FIELDS)
    if "path" in body:
        raise InvalidRequest(
            'a fleet cuts over to repository versions: give {"version": N}, not a path '
            "(publish the directory into the repository first)"
        )
    version = body.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise InvalidRequest(f"version must be an integer, got {version!r}")
    if body.get("wait", True) is not True:
        raise InvalidRequest("a fleet's reload always answers once its cutover ended (wait)")
    return AdminAsk(version, _description(body), _model(body))


def parse_rollback(raw: bytes) -> AdminAsk:
    """`{"description": "...", "model": "..."}` or nothing."""
    body = _object(raw, ROLLBACK_FIELDS)
    return AdminAsk(None, _description(body), _model(body))


def _object(raw: bytes, allowed: frozenset[str]) -> dict[str, object]:
    try:
        body = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise InvalidRequest(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    unknown = sorted(set(body) - allowed - {"path"})
    if unknown:
        raise InvalidRequest(
            f"unknown field {unknown[0]!r}; accepted: {', '.join(sorted(allowed))}"
        )
    return body


def _description(body: dict[str, object]) -> str:
    description = body.get("description", "")
    if not isinstance(description, str):
        raise InvalidRequest("description must be a string")
    return description


def _model(body: dict[str, object]) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("model must be a string")
    return model
