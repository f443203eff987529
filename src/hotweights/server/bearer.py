"""Bearer tokens: the admin token and the API key, checked the same way by a server and by
a fleet's ingress."""

from __future__ import annotations

import hmac

from hotweights.errors import Forbidden, Unauthorized


def check_bearer(expected: str | None, authorization: str | None, what: str) -> None:
    """Compare the bearer token in an `Authorization` header with `expected` in constant
    time; nothing to check when none is configured. Raises `Unauthorized` when no bearer
    token was presented, `Forbidden` when it is not `expected`; `what` names the token in
    the message."""
    if not expected:
        return
    if not authorization or not authorization.startswith("Bearer "):
        raise Unauthorized(f"this endpoint needs 'Authorization: Bearer <{what}>'")
    presented = authorization.removeprefix("Bearer ").strip()
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise Forbidden(f"the {what} is wrong")
