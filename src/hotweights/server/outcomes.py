"""How a reload request is answered over HTTP: its event, 202 with its id, or 422."""

from __future__ import annotations

from fastapi.responses import JSONResponse, Response

from hotweights.core import ReloadEvent, ReloadTicket
from hotweights.errors import ReloadFailed
from hotweights.server.server_state import ServedModel


async def answer(ticket: ReloadTicket | None, wait: bool, served: ServedModel) -> Response:
    """The event once it ends (`wait`), else 202 with its id. A failed reload raises
    `ReloadFailed` (422, with the cause). No ticket means nothing needed to change."""
    if ticket is None:
        live = served.reloader.live_version
        return JSONResponse(
            {"outcome": "unchanged", "model": served.name, "live": live.to_dict() if live else None}
        )
    if not wait:
        status_url = f"/admin/models/{served.name}/reloads/{ticket.id}"
        return JSONResponse(
            {"id": ticket.id, "target": ticket.target, "status_url": status_url}, status_code=202
        )
    event = await ticket.wait_async()
    if not event.succeeded:
        raise ReloadFailed(failure_message(event), event.to_dict())
    return JSONResponse(event.to_dict())


def failure_message(event: ReloadEvent) -> str:
    reason = event.error_message or event.outcome.value
    kind = f"{event.error_type}: " if event.error_type else ""
    return (
        f"reload of {event.target} did not go live ({event.outcome.value}): {kind}{reason}; "
        f"generation {event.old_generation} keeps serving"
    )
