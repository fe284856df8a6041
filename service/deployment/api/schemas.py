"""Request and response bodies of the API (the OpenAPI spec is generated from these)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from service.deployment.codec import BATCH_ID_PATTERN

SAFETENSORS_MEDIA_TYPES = ("application/vnd.safetensors", "application/octet-stream")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorPayload(_Strict):
    """A tensor as base64 of its raw little-endian bytes, with dtype and shape [N, C, H, W]."""

    dtype: Literal["uint8", "float32"] = Field(description="uint8 (0-255, scaled by 1/255) or float32 in [0, 1]")
    shape: list[StrictInt] = Field(min_length=1, max_length=8, description="[N, C, H, W]")
    data: str = Field(description="base64 (standard alphabet, padded) of the N*C*H*W*itemsize raw bytes")


class IngestRequest(_Strict):
    """One mini-batch for learning. `batch_id` is the idempotency key: a repeated id is not enqueued again."""

    batch_id: str = Field(pattern=BATCH_ID_PATTERN)
    x: TensorPayload
    y: list[StrictInt] = Field(description="one integer label per sample, in [0, classes)")


class PredictRequest(_Strict):
    x: TensorPayload


class ResetRequest(_Strict):
    """Rebuild the worker's learner from its starting state (the profile's burn-in for `seed`, or the served
    bundle with `seed`) once the entries queued before this one are applied."""

    seed: StrictInt = Field(ge=0, le=2**31 - 1, description="the experiment seed of the starting state")
    reset_id: str | None = Field(None, pattern=BATCH_ID_PATTERN,
                                 description="idempotency key (default: a fresh reset-<uuid>); its state is "
                                             "GET /v1/batches/{reset_id}")


class ResetResponse(BaseModel):
    reset_id: str
    entry_id: str = Field(description="the Redis stream entry id: batches before it meet the old model")
    seed: int
    state: Literal["queued", "duplicate"]


class IngestResponse(BaseModel):
    batch_id: str
    entry_id: str = Field(description="the Redis stream entry id")
    state: Literal["queued", "duplicate"]


class PredictResponse(BaseModel):
    labels: list[int]
    model_version: int


class BatchState(BaseModel):
    """What became of an ingested batch (kept as long as the batch_id is remembered).

    applied: the served model holds its update (and `committed` says whether a checkpoint holds it too,
    so that a worker crash cannot undo it even for the time of a replay); skipped: the worker had
    already applied a batch with this id (re-sent after the API forgot it).
    """

    batch_id: str
    state: Literal["queued", "applied", "dead_letter", "skipped"]
    committed: bool | None = Field(None, description="applied batches: whether a worker checkpoint holds the update")
    entry_id: str | None = None
    record: dict | None = Field(None, description="the audit record, once applied")
    discrepancy: list[float] | None = Field(None, description="per-sample memorization discrepancy, once applied")
    reason: str | None = Field(None, description="why the entry was dead-lettered or skipped")


class QueueState(BaseModel):
    depth: int
    pending: int
    lag_seconds: float


class StatusResponse(BaseModel):
    model_version: int | None
    batches_applied: int | None
    strategy: str | None
    threshold: float | None = Field(description="the threshold the next batch is judged against")
    calibration: dict | None
    canary_accuracy: float | None
    defense: dict | None = Field(None, description="what the strategy reports about itself: its false-flag target; "
                                                   "dsc: auxiliary (frozen/rolling), auxiliary_age, promotions by "
                                                   "decision, last_promotion; guard: gate_threshold")
    worker: dict | None = Field(description="the worker's last published status; null before it started")
    worker_alive: bool
    queue: QueueState
    audit: list[dict] = Field(description="the newest audit records, newest first")


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool]


class ErrorResponse(BaseModel):
    detail: str = Field(description="what was wrong and what is expected")
    reason: str = Field(description="short label, as in dscguard_rejected_requests_total{reason}")
