"""Request dependencies shared by the routers: the server state, the admin check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from hotweights.server.server_state import ServerState


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.hotweights
    return state


def require_admin(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> ServerState:
    state = server_state(request)
    state.check_admin(authorization)
    return state


Admin = Annotated[ServerState, Depends(require_admin)]
