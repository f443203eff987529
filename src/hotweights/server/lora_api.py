"""vLLM's adapter endpoints, so that its clients work unchanged:
`POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`.

Loading a name already served makes a new version of it: the adapter's reloader prepares
it beside the live one (load, validate, warm up, gate) and commits it, so requests admitted
on the old version finish there while new ones get the new one. Nothing is written into a
loaded adapter. The call answers once the version is live (after a canary's bake, with
`--canary`) with its reload event, or 422 with the reason it was refused (the live version
serves on). Unloading stops new requests for the name (404), lets those in flight finish,
and releases the adapter's memory after the last one.

Both calls are admin calls (the admin token, when set), and a path must lie inside the
model roots (403). With `--repo`, a loaded path is the adapter's next version in memory:
nothing is written into the repository, and only a version published there later than its
newest now supersedes it; an unloaded adapter is brought back by the watcher only for a
version newer than its newest now. A name served again numbers its generations after the
last one it had.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from hotweights.errors import ReloadFailed
from hotweights.server.adapters import check_adapter_name, serve_adapter
from hotweights.server.deps import Admin
from hotweights.server.outcomes import failure_message
from hotweights.server.schemas import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from hotweights.server.server_state import ServerState

router = APIRouter()
log = logging.getLogger("hotweights.server")


@router.post("/v1/load_lora_adapter", response_model=None)
async def load_lora_adapter(state: Admin, body: LoadLoraAdapterRequest) -> Response:
    name = body.lora_name
    check_adapter_name(state, name)
    path = state.check_reload_path(body.lora_path)
    served = state.models.get(name)
    created = served is None
    if served is None:
        served = serve_adapter(state, name)
        state.add(served)
        if state.sync is not None:
            state.sync.add(name, served.reloader)
    if state.sync is not None:
        state.sync.supersede_only_by_newer(name)
    ticket = served.reloader.submit(path, trigger="api", description=f"load_lora_adapter {path}")
    event = await ticket.wait_async()
    if not event.succeeded:
        if created and served.reloader.live_version is None:
            await _withdraw(state, name)
        raise ReloadFailed(failure_message(event), event.to_dict())
    return JSONResponse(event.to_dict())


@router.post("/v1/unload_lora_adapter", response_model=None)
async def unload_lora_adapter(state: Admin, body: UnloadLoraAdapterRequest) -> Response:
    name = body.lora_name
    served = state.resolve(name)  # 404 for a name not served
    if not served.adapter:
        check_adapter_name(state, name)  # 400: a base model is not unloaded here
    live = served.reloader.live_version
    await _withdraw(state, name)
    return JSONResponse(
        {
            "lora_name": name,
            "unloaded": live.generation if live is not None else None,
            "inflight": served.reloader.inflight(),
        }
    )


async def _withdraw(state: ServerState, name: str) -> None:
    """Stop serving adapter `name`; its reloader closes in the background (what is in
    flight finishes, then its versions are unloaded, releasing their base versions)."""
    served = state.remove(name)
    if state.sync is not None:
        state.sync.forget(name)
    loop = asyncio.get_running_loop()
    loop.run_in_executor(None, served.reloader.close, state.config.drain_timeout)
