"""Admin endpoints: reload, rollback, versions, the reload log, status, health.

Every /admin route checks the admin token when one is configured. A reload answers with
its outcome (or 202 and the event id when asked not to wait); a failed one answers 422
with the cause while the old version keeps serving.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from hotweights.core import ReloadEvent, ReloadTicket
from hotweights.errors import NotReady, ReloadFailed
from hotweights.server.metrics import CONTENT_TYPE
from hotweights.server.schemas import ReloadRequest, RollbackRequest
from hotweights.server.state import ServerState

router = APIRouter()


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.hotweights
    return state


def require_admin(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> ServerState:
    state = _state(request)
    state.check_admin(authorization)
    return state


Admin = Annotated[ServerState, Depends(require_admin)]


@router.get("/health")
async def health() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict[str, object]:
    """Ready: every served model has a live version."""
    state = _state(request)
    if state.stopping:
        raise NotReady("the server is shutting down")
    live = {name: m.reloader.slot.live_version for name, m in state.models.items()}
    missing = sorted(name for name, version in live.items() if version is None)
    if missing or not live:
        raise NotReady(f"no live version yet for: {', '.join(missing) or 'any model'}")
    return {"status": "ready", "generations": {n: v.generation for n, v in live.items() if v}}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


@router.post("/admin/reload", response_model=None)
async def reload(state: Admin, body: ReloadRequest | None = None) -> Response:
    body = body or ReloadRequest()
    served = state.only_model()
    if body.path is not None:
        target = state.check_reload_path(body.path)
    else:
        live = served.reloader.slot.live_version or served.reloader.coordinator.current_version()
        if live is None:
            raise NotReady("nothing was ever live: give a path to reload")
        target = live.source
    ticket = served.reloader.submit(target, trigger="api", description=body.description)
    return await _answer(ticket, body.wait)


@router.post("/admin/rollback", response_model=None)
async def rollback(state: Admin, body: RollbackRequest | None = None) -> Response:
    body = body or RollbackRequest()
    ticket = state.only_model().reloader.rollback(description=body.description)
    return await _answer(ticket, body.wait)


async def _answer(ticket: ReloadTicket, wait: bool) -> Response:
    if not wait:
        return JSONResponse(
            {"id": ticket.id, "target": ticket.target, "status_url": f"/admin/reloads/{ticket.id}"},
            status_code=202,
        )
    event = await ticket.wait_async()
    if not event.succeeded:
        raise ReloadFailed(_failure_message(event), event.to_dict())
    return JSONResponse(event.to_dict())


def _failure_message(event: ReloadEvent) -> str:
    reason = event.error_message or event.outcome.value
    kind = f"{event.error_type}: " if event.error_type else ""
    return (
        f"reload of {event.target} did not go live ({event.outcome.value}): {kind}{reason}; "
        f"generation {event.old_generation} keeps serving"
    )


@router.get("/admin/versions")
async def versions(state: Admin) -> dict[str, Any]:
    reloader = state.only_model().reloader
    return {
        "model": reloader.name,
        "generation": reloader.generation,
        "versions": [version.to_dict() for version in reloader.coordinator.history()],
    }


@router.get("/admin/reloads")
async def reloads(state: Admin, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> dict[str, Any]:
    served = state.only_model()
    log = served.reloader.log
    if state.audit is not None:  # survives restarts
        events = state.audit.read(limit, served.name)
        return {"events": events, "summary": log.summary(), "source": str(state.audit.path)}
    return {"events": [e.to_dict() for e in log.recent(limit)], "summary": log.summary()}


@router.get("/admin/reloads/{event_id}")
async def reload_event(state: Admin, event_id: int) -> dict[str, Any]:
    reloader = state.only_model().reloader
    event = reloader.log.get(event_id)
    if event is not None:
        return event.to_dict()
    status = reloader.status()
    for key in ("reloading", "queued"):
        job = status[key]
        if isinstance(job, dict) and job.get("id") == event_id:
            return {"id": event_id, "outcome": None, "status": key, **job}
    raise HTTPException(404, f"no reload event {event_id} in the log")


@router.get("/admin/status")
async def status(state: Admin) -> dict[str, Any]:
    return {
        "models": {name: m.reloader.status() for name, m in state.models.items()},
        "config": {
            "policy": state.config.policy,
            "drain_timeout": state.config.drain_timeout,
            "admission_timeout": state.config.admission_timeout,
        },
    }
