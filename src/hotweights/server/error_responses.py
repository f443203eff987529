"""Exceptions become OpenAI-shaped JSON errors here, at the HTTP edge, and nowhere else."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from hotweights.errors import (
    EngineFailed,
    EscapesRoot,
    Forbidden,
    HotweightsError,
    InvalidRequest,
    LoadError,
    ModelRetired,
    NoCanary,
    NoPreviousVersion,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    ReloaderClosed,
    ReloadFailed,
    ReloadSuperseded,
    ReplicaFailed,
    ShuttingDown,
    Unauthorized,
    UnknownModel,
    UnknownVersion,
    ValidationError,
)

log = logging.getLogger("hotweights.server")

# Most specific first: the first class an error is an instance of decides.
STATUS: tuple[tuple[type[HotweightsError], int, str, str], ...] = (
    (PayloadTooLarge, 413, "invalid_request_error", "payload_too_large"),
    (InvalidRequest, 400, "invalid_request_error", "invalid_request"),
    (UnknownModel, 404, "invalid_request_error", "model_not_found"),
    (UnknownVersion, 404, "invalid_request_error", "version_not_found"),
    (EscapesRoot, 403, "permission_error", "outside_repository"),
    (NotReady, 503, "service_unavailable", "no_live_version"),
    (Overloaded, 429, "rate_limit_error", "overloaded"),
    (ReloaderClosed, 503, "service_unavailable", "shutting_down"),
    (ShuttingDown, 503, "service_unavailable", "shutting_down"),
    (ModelRetired, 503, "service_unavailable", "version_retired"),
    (ReplicaFailed, 503, "service_unavailable", "replica_failed"),
    (EngineFailed, 500, "server_error", "generation_failed"),
    (Unauthorized, 401, "authentication_error", "missing_token"),
    (Forbidden, 403, "permission_error", "forbidden"),
    (NoPreviousVersion, 409, "invalid_request_error", "no_previous_version"),
    (NoCanary, 409, "invalid_request_error", "no_canary"),
    (ReloadSuperseded, 409, "reload_error", "reload_superseded"),
    (ReloadFailed, 422, "reload_error", "reload_failed"),
    (LoadError, 422, "reload_error", "load_failed"),
    (ValidationError, 422, "reload_error", "validation_failed"),
)


def error_body(
    message: str, kind: str, code: str | None = None, param: str | None = None
) -> dict[str, object]:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def classify(exc: HotweightsError) -> tuple[int, str, str]:
    """(HTTP status, OpenAI error type, code) for a hotweights error."""
    for cls, status, kind, code in STATUS:
        if isinstance(exc, cls):
            return status, kind, code
    return 500, "server_error", "internal_error"


def install(app: FastAPI) -> None:
    """Register the exception handlers on `app`."""

    @app.exception_handler(HotweightsError)
    async def hotweights_error(request: Request, exc: HotweightsError) -> JSONResponse:
        status, kind, code = classify(exc)
        body = error_body(str(exc), kind, code)
        if isinstance(exc, ReloadFailed):
            body["event"] = exc.event
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        if isinstance(exc, Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        first = problems[0] if problems else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        message = (
            f"{where}: {first.get('msg', 'invalid value')}"
            if where
            else str(first.get("msg", "malformed request"))
        )
        return JSONResponse(
            error_body(message, "invalid_request_error", "invalid_request", where or None),
            status_code=400,
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(
            error_body(str(exc.detail), kind, f"http_{exc.status_code}"),
            status_code=exc.status_code,
            headers=exc.headers,
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(
            error_body(f"internal error: {type(exc).__name__}", "server_error", "internal_error"),
            status_code=500,
        )
