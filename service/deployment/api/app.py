"""The FastAPI application: `create_app(settings)`; `dscguard serve` runs it under uvicorn.

The API is stateless: it validates batches and enqueues them in Redis, and reads what the worker
publishes there (model spec and weights, status, audit records).
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.deployment.api.errors import install_error_handlers
from service.deployment.api.middleware import RequestGuard, RequestMetrics
from service.deployment.api.routes import router
from service.deployment.api.schemas import IngestRequest, PredictRequest
from service.deployment.api.state import ApiState
from service.deployment.api.waits import BatchWaits
from service.deployment.metrics import ApiMetrics
from service.deployment.model_store import ModelStore
from service.deployment.redis_queue import RedisQueue
from service.deployment.settings import ServiceSettings


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The API for `settings` (default: read from the DSCGUARD_* environment)."""
    settings = settings or ServiceSettings()
    settings.client_key("the API")
    queue = RedisQueue.from_settings(settings)
    metrics = ApiMetrics()
    waits = BatchWaits(settings, queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await waits.close()

    app = FastAPI(title="dscguard", version="0.1.0", lifespan=lifespan,
                  description="Online learning behind a poisoning defense (DSC): ingest mini-batches, predict, "
                              "watch what the defense decides.")
    app.state.api = ApiState(settings, queue, ModelStore(queue), metrics, waits)
    app.include_router(router)
    install_error_handlers(app, metrics, settings.retry_after_seconds)
    app.add_middleware(RequestGuard, max_bytes=settings.max_body_bytes, body_timeout=settings.body_timeout_seconds,
                       retry_after_seconds=settings.retry_after_seconds, metrics=metrics)
    app.add_middleware(RequestMetrics, metrics=metrics)  # added last: outermost, so it sees 503s, 413s and 408s too

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (IngestRequest, PredictRequest):
                definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(definition.pop("$defs", {}))
                components[model.__name__] = definition
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
