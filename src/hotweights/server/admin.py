"""Admin endpoints: reload, rollback, versions, the reload log, status, health.

Every /admin route checks the admin token when one is configured. A reload answers with
its outcome (or 202 and the event id when asked not to wait); a failed one answers 422
with the cause while the old version keeps serving.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from hotweights.core import ReloadTicket
from hotweights.errors import NoCanary, NotReady
from hotweights.generation import BatchedModel
from hotweights.server.deps import Admin, server_state
from hotweights.server.metrics import CONTENT_TYPE
from hotweights.server.outcomes import answer
from hotweights.server.repository_api import repository_reload, repository_rollback
from hotweights.server.schemas import ReloadRequest, RollbackRequest
from hotweights.server.server_state import ServedModel, ServerState

router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    """Alive: the process answers."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> dict[str, object]:
    """Ready: every served model has a live version."""
    state = server_state(request)
    if state.stopping:
        raise NotReady("the server is shutting down")
    live = {name: m.reloader.live_version for name, m in state.models.items()}
    missing = sorted(name for name, version in live.items() if version is None)
    if missing or not live:
        raise NotReady(f"no live version yet for: {', '.join(missing) or 'any model'}")
    return {"status": "ready", "generations": {n: v.generation for n, v in live.items() if v}}


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(server_state(request).metrics.render(), media_type=CONTENT_TYPE)


def _model(state: ServerState, name: str | None) -> ServedModel:
    """The model a route names (`/admin/models/{name}/...`), or the only one served."""
    return state.only_model() if name is None else state.resolve(name)


@router.post("/admin/reload", response_model=None)
@router.post("/admin/models/{name}/reload", response_model=None)
async def reload(
    state: Admin, name: str | None = None, body: ReloadRequest | None = None
) -> Response:
    """Make a version live. With a repository: no path re-syncs with the repository, a
    path pins the model to that version. Otherwise: the path's directory, or the live
    version's directory again."""
    body = body or ReloadRequest()
    served = _model(state, name or body.model)
    if state.sync is not None:
        ticket = await repository_reload(state.sync, served, body.path)
        return await answer(ticket, body.wait, served)
    if body.path is not None:
        target = state.check_reload_path(body.path)
    else:
        live = served.reloader.live_version or served.reloader.last_live()
        if live is None:
            raise NotReady("nothing was ever live: give a path to reload")
        target = live.source
    ticket = served.reloader.submit(target, trigger="api", description=body.description)
    return await answer(ticket, body.wait, served)


@router.post("/admin/rollback", response_model=None)
@router.post("/admin/models/{name}/rollback", response_model=None)
async def rollback(
    state: Admin, name: str | None = None, body: RollbackRequest | None = None
) -> Response:
    """The previous version, live again. With a repository this pins the model to its
    newest eligible version older than the live one (unpin to follow the latest again)."""
    body = body or RollbackRequest()
    served = _model(state, name or body.model)
    if served.reloader.canary_version is not None:  # end the bake: the canary goes
        with contextlib.suppress(NoCanary):  # unless the bake ended meanwhile
            reason = body.description or "rolled back by an operator"
            return await _bake_ended(served.reloader.end_bake(promote=False, reason=reason))
    if state.sync is not None:
        ticket = await repository_rollback(state.sync, served)
        return await answer(ticket, body.wait, served)
    ticket = served.reloader.rollback(description=body.description)
    return await answer(ticket, body.wait, served)


@router.post("/admin/promote", response_model=None)
@router.post("/admin/models/{name}/promote", response_model=None)
async def promote(state: Admin, name: str | None = None) -> Response:
    """End the canary's bake now and make it live (409 when no canary is baking)."""
    served = _model(state, name)
    return await _bake_ended(served.reloader.promote())


async def _bake_ended(ticket: ReloadTicket) -> Response:
    """The event of a bake an operator ended: promoted, or rolled back."""
    event = await ticket.wait_async()
    return JSONResponse(event.to_dict())


@router.get("/admin/versions")
@router.get("/admin/models/{name}/versions")
async def versions(state: Admin, name: str | None = None) -> dict[str, Any]:
    reloader = _model(state, name).reloader
    return {
        "model": reloader.name,
        "generation": reloader.generation,
        "versions": [version.to_dict() for version in reloader.versions()],
    }


@router.get("/admin/reloads")
@router.get("/admin/models/{name}/reloads")
async def reloads(
    state: Admin, name: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> dict[str, Any]:
    served = _model(state, name)
    log = served.reloader.log
    if state.audit is not None:  # survives restarts
        events = state.audit.read(limit, served.name)
        return {"events": events, "summary": log.summary(), "source": str(state.audit.path)}
    return {"events": [e.to_dict() for e in log.recent(limit)], "summary": log.summary()}


@router.get("/admin/reloads/{event_id}")
@router.get("/admin/models/{name}/reloads/{event_id}")
async def reload_event(state: Admin, event_id: int, name: str | None = None) -> dict[str, Any]:
    reloader = _model(state, name).reloader
    event = reloader.log.get(event_id)
    if event is not None:
        return event.to_dict()
    found = reloader.status().job(event_id)
    if found is not None:
        key, job = found
        return {"id": event_id, "outcome": None, "status": key, **job.to_dict()}
    raise HTTPException(404, f"no reload event {event_id} in the log")


@router.get("/admin/status")
async def status(state: Admin) -> dict[str, Any]:
    return {
        "models": {
            name: {**m.reloader.status().to_dict(), "engines": _engines(m)}
            for name, m in state.models.items()
        },
        "config": {
            "policy": state.config.policy,
            "drain_timeout": state.config.drain_timeout,
            "admission_timeout": state.config.admission_timeout,
            "max_batch_size": state.config.max_batch_size,
            "kv_cache_memory": state.config.kv_cache_memory,
            "batching": state.config.batching,
        },
    }


def _engines(served: ServedModel) -> dict[str, dict[str, Any]]:
    """How each resident generation generates: batched (with its load) or per-request."""
    engines: dict[str, dict[str, Any]] = {}
    for version, model in served.reloader.models():
        if isinstance(model, BatchedModel):
            load = model.engine.load() if model.engine is not None else {}
            engines[str(version.generation)] = {"mode": model.engine_note, **load}
        else:
            engines[str(version.generation)] = {"mode": "per-request"}
    return engines
