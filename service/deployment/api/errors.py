"""Every error answers the same body, {"detail", "reason"}; refusals are counted by reason.

Starlette's own errors (404 for an unknown route, 405 for a method a route does not take) and
unexpected exceptions (500) get that body too; the protocol layer's answers (400 for a request
that is not HTTP, 408 for a request head that never completes, 503 over the connection limit) are
written in `service/deployment/api/server.py`.
"""

from __future__ import annotations

from http import HTTPStatus

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.deployment.codec import BatchRejected
from service.deployment.metrics import ApiMetrics

# Starlette's HTTPException statuses that routing raises, as reasons; any other status: its phrase in snake case
_HTTP_REASONS = {404: "not_found", 405: "method_not_allowed"}


def error_body(detail: str, reason: str) -> dict[str, str]:
    return {"detail": detail, "reason": reason}


class ApiError(Exception):
    """A request refused for a reason other than its batch's content (auth, full queue, no model yet)."""

    def __init__(self, status_code: int, reason: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code, self.reason, self.message, self.headers = status_code, reason, message, headers


def install_error_handlers(app: FastAPI, metrics: ApiMetrics, retry_after_seconds: int) -> None:
    def refuse(status_code: int, reason: str, message: str, headers: dict | None = None) -> JSONResponse:
        metrics.rejected.labels(reason=reason).inc()
        return JSONResponse(error_body(message, reason), status_code=status_code, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return refuse(exc.status_code, exc.reason, exc.message, exc.headers)

    @app.exception_handler(BatchRejected)
    async def _rejected(request: Request, exc: BatchRejected) -> JSONResponse:
        return refuse(exc.status_code, exc.reason, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return refuse(422, "schema", problems)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        return refuse(503, "redis_unavailable", "the queue (Redis) is unreachable; retry later",
                      {"Retry-After": str(retry_after_seconds)})

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        reason = _HTTP_REASONS.get(exc.status_code) or HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
        detail = exc.detail
        if exc.status_code == 404:
            detail = f"no route {request.url.path}: see /docs for the routes"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path} (allowed: {exc.headers.get('Allow')})"
        return refuse(exc.status_code, reason, detail, exc.headers)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback (uvicorn: "Exception in ASGI application") after this answer
        return JSONResponse(error_body("internal error; the server log has the details", "internal"), status_code=500)
