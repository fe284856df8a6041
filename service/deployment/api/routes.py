"""The routes: thin, each one parse -> ApiState -> answer."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from service.deployment.api.deps import State, require_admin, require_client
from service.deployment.api.errors import ApiError
from service.deployment.api.schemas import (
    SAFETENSORS_MEDIA_TYPES,
    BatchState,
    ErrorResponse,
    IngestResponse,
    PredictResponse,
    Readiness,
    ResetRequest,
    ResetResponse,
    StatusResponse,
)
from service.deployment.metrics import render

router = APIRouter()
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 413, 415, 422, 429, 503)}


def _batch_body(schema: str) -> dict:
    """OpenAPI: the two encodings of a batch body (JSON with base64, or safetensors)."""
    binary = {"schema": {"type": "string", "format": "binary",
                         "description": "safetensors with x (U8 or F32 [N, C, H, W]) and y (I64 or I32 [N]); "
                                        "__metadata__.batch_id is the idempotency key (predict: x only)"}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}},
        **{media_type: binary for media_type in SAFETENSORS_MEDIA_TYPES}}}}


@router.post("/v1/ingest", status_code=202, response_model=IngestResponse, tags=["stream"],
             dependencies=[Depends(require_client)], openapi_extra=_batch_body("IngestRequest"),
             responses={200: {"model": IngestResponse, "description": "a repeated batch_id: not enqueued again"},
                        **_ERRORS})
async def ingest(request: Request, state: State):
    """Validate one mini-batch and enqueue it for the worker (202); nothing is enqueued when refused."""
    body = await request.body()
    outcome, batch_id, entry_id = await run_in_threadpool(state.ingest, request.headers.get("content-type", ""), body)
    return JSONResponse(IngestResponse(batch_id=batch_id, entry_id=entry_id, state=outcome).model_dump(),
                        status_code=202 if outcome == "queued" else 200)


@router.get("/v1/batches/{batch_id}", response_model=BatchState, tags=["stream"],
            dependencies=[Depends(require_client)], responses={404: {"model": ErrorResponse}})
async def batch_state(batch_id: str, state: State,
                      wait: Annotated[float, Query(ge=0, le=30, description="seconds to wait while it is queued")] = 0):
    """Queued, applied (with its audit record and per-sample discrepancy), dead-lettered or skipped.

    With `wait`, the answer comes once the batch has left the queue (or after `wait` seconds). A wait
    holds no thread (it is a coroutine woken by the worker's batch events), but it holds its
    connection, which counts towards DSCGUARD_MAX_CONNECTIONS.
    """
    found = await state.waits.wait(batch_id, wait)
    if found is None:
        raise ApiError(404, "unknown_batch", f"no batch {batch_id!r} is known (never ingested, or forgotten)")
    return BatchState(batch_id=batch_id, **found)


@router.post("/v1/predict", response_model=PredictResponse, tags=["model"], dependencies=[Depends(require_client)],
             openapi_extra=_batch_body("PredictRequest"), responses=_ERRORS)
async def predict(request: Request, state: State):
    """Labels for a batch, from the newest published online model."""
    body = await request.body()
    labels, version = await run_in_threadpool(state.predict, request.headers.get("content-type", ""), body)
    return PredictResponse(labels=labels, model_version=version)


@router.get("/v1/status", response_model=StatusResponse, tags=["model"], dependencies=[Depends(require_client)])
def status(state: State, audit: Annotated[int, Query(ge=0, le=1000, description="how many audit records")] = 10):
    """Model version, batches applied, threshold and calibration, queue depth and lag, last audit records."""
    return state.status(audit)


@router.get("/v1/model", tags=["model"], dependencies=[Depends(require_admin)],
            responses={200: {"content": {"application/vnd.safetensors": {}},
                             "description": "the current weights; metadata: model_spec, model_version"},
                       **_ERRORS})
def model(state: State):
    """The current online weights as safetensors (admin token only: white-box evaluation)."""
    published = state.current_model()
    return Response(published.weights, media_type="application/vnd.safetensors",
                    headers={"X-Model-Version": str(published.version)})


@router.post("/v1/admin/reset", status_code=202, response_model=ResetResponse, tags=["admin"],
             dependencies=[Depends(require_admin)],
             responses={200: {"model": ResetResponse, "description": "a repeated reset_id: not enqueued again"},
                        **_ERRORS})
def reset(body: ResetRequest, request: Request, state: State):
    """Reset the learner to its starting state for `seed` (admin token only; recorded in the admin audit trail).

    Queued in the batches' stream: those queued before it are applied to the old model, those after it to the
    new one (published under a new model version). Its state is GET /v1/batches/{reset_id}.
    """
    outcome, reset_id, entry_id = state.reset(body, request.client.host if request.client else None)
    return JSONResponse(ResetResponse(reset_id=reset_id, entry_id=entry_id, seed=body.seed, state=outcome).model_dump(),
                        status_code=202 if outcome == "queued" else 200)


@router.get("/health/live", tags=["health"])
async def live():
    """Answers on the event loop itself: no thread, no Redis, so nothing the other routes hold can delay it."""
    return {"status": "ok"}


@router.get("/health/ready", response_model=Readiness, tags=["health"], responses={503: {"model": Readiness}})
def ready(state: State):
    """Ready when Redis answers, the worker's heartbeat is fresh and a model is published."""
    readiness = state.readiness()
    return JSONResponse(readiness, status_code=200 if readiness["ready"] else 503)


@router.get("/metrics", tags=["health"], response_class=Response)
def metrics(state: State):
    body, content_type = render(state.metrics.registry)
    return Response(body, media_type=content_type)
