"""Admin endpoints of a served model repository: rescan, its state, pin and unpin.

With a repository, what is live follows the repository's version policy, so reloads and
rollbacks go through it (a pin survives rescans); a reload of some other path would be
undone by the next change the watcher sees.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from hotweights.core import ReloadTicket
from hotweights.errors import Forbidden, InvalidRequest
from hotweights.server.deps import Admin
from hotweights.server.outcomes import answer
from hotweights.server.server_state import ServedModel, ServerState
from hotweights.sources import RepositorySync

router = APIRouter()


class PinRequest(BaseModel):
    version: int = Field(ge=1, description="the version directory number")
    wait: bool = True


async def repository_reload(
    sync: RepositorySync, served: ServedModel, path: str | None
) -> ReloadTicket | None:
    """No path: rescan and follow the policy. A path: pin the model to that version."""
    if path is None:
        report = await asyncio.to_thread(sync.rescan)
        return report.submitted.get(served.name)
    located = sync.repository.locate(path)
    if located is None or located[0] != served.name:
        raise Forbidden(
            f"{path} is not a version of {served.name!r} in the repository {sync.repository.root}"
        )
    report = await asyncio.to_thread(sync.pin, served.name, located[1])
    return report.submitted.get(served.name)


async def repository_rollback(sync: RepositorySync, served: ServedModel) -> ReloadTicket | None:
    report = await asyncio.to_thread(sync.rollback, served.name)
    return report.submitted.get(served.name)


def _sync(state: ServerState) -> RepositorySync:
    if state.sync is None:
        raise InvalidRequest("this server does not serve a model repository (see --repo)")
    return state.sync


@router.post("/admin/rescan")
async def rescan(state: Admin) -> dict[str, Any]:
    """Scan the repository now (as SIGHUP does) and submit what changed."""
    report = await asyncio.to_thread(_sync(state).rescan)
    return {
        "readable": report.readable,
        "submitted": {name: ticket.id for name, ticket in report.submitted.items()},
    }


@router.get("/admin/repository")
async def repository(state: Admin) -> dict[str, object]:
    """Every model and version of the repository with its status, policy and pin."""
    return await asyncio.to_thread(_sync(state).status)


@router.post("/admin/models/{name}/pin", response_model=None)
async def pin(state: Admin, name: str, body: PinRequest) -> Response:
    served = state.resolve(name)
    report = await asyncio.to_thread(_sync(state).pin, name, body.version)
    return await answer(report.submitted.get(name), body.wait, served)


@router.post("/admin/models/{name}/unpin", response_model=None)
async def unpin(state: Admin, name: str) -> Response:
    served = state.resolve(name)
    report = await asyncio.to_thread(_sync(state).unpin, name)
    return await answer(report.submitted.get(name), True, served)
