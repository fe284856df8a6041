"""Every refusal answers the same body, {"detail", "reason"}, and is counted by reason."""

from __future__ import annotations

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.codec import BatchRejected
from service.metrics import ApiMetrics


class ApiError(Exception):
    """A request refused for a reason other than its batch's content (auth, full queue, no model yet)."""

    def __init__(self, status_code: int, reason: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status_code, self.reason, self.message, self.headers = status_code, reason, message, headers


def install_error_handlers(app: FastAPI, metrics: ApiMetrics, retry_after_seconds: int) -> None:
    def refuse(status_code: int, reason: str, message: str, headers: dict | None = None) -> JSONResponse:
        metrics.rejected.labels(reason=reason).inc()
        return JSONResponse({"detail": message, "reason": reason}, status_code=status_code, headers=headers)

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
