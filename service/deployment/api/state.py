"""What the routes do, behind them: decode and validate a body, enqueue, predict, report status.

These run in the threadpool (the Redis client is synchronous), so a slow or unreachable Redis
never blocks the event loop. Long-poll waits on a batch are the exception: they are coroutines
(`waits`, redis.asyncio), so that open waits hold no thread.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, replace

import redis
from pydantic import ValidationError

from service.deployment.api.errors import ApiError
from service.deployment.api.schemas import SAFETENSORS_MEDIA_TYPES, IngestRequest, PredictRequest, ResetRequest
from service.deployment.api.waits import BatchWaits
from service.deployment.codec import (
    Batch,
    BatchRejected,
    InputSpec,
    decode_json_batch,
    decode_safetensors_batch,
    to_stream_fields,
)
from service.deployment.metrics import ApiMetrics
from service.deployment.model_store import ModelStore, PublishedModel
from service.deployment.redis_queue import RedisQueue
from service.deployment.settings import ServiceSettings

log = logging.getLogger("dscguard.api")

# what /v1/status shows at the top level; the rest of the worker's status is under "worker"
MODEL_STATUS_FIELDS = ("model_version", "batches_applied", "strategy", "threshold", "calibration", "canary_accuracy",
                       "defense")


@dataclass
class ApiState:
    settings: ServiceSettings
    queue: RedisQueue
    models: ModelStore
    metrics: ApiMetrics
    waits: BatchWaits

    def input_spec(self, learning: bool = True) -> InputSpec:
        """What a request may carry; a batch to predict may hold one sample whatever the model (BatchNorm's need
        of two is the learning step's)."""
        spec = self.models.spec()
        if spec is None:
            raise ApiError(503, "no_model", "no model is published yet: start the worker (dscguard worker)",
                           {"Retry-After": str(self.settings.retry_after_seconds)})
        accepted = InputSpec.from_model_spec(spec, self.settings.max_batch_samples)
        return accepted if learning else replace(accepted, min_samples=1)

    def decode(self, content_type: str, body: bytes, need_labels: bool) -> Batch:
        """A JSON or safetensors body as a validated batch (raises BatchRejected / ApiError)."""
        media_type = content_type.split(";")[0].strip().lower()
        if media_type in SAFETENSORS_MEDIA_TYPES:
            return decode_safetensors_batch(body, self.input_spec(need_labels), need_labels=need_labels)
        if media_type != "application/json":
            raise ApiError(415, "media_type", f"Content-Type must be application/json or "
                                              f"{' or '.join(SAFETENSORS_MEDIA_TYPES)}, got {content_type!r}")
        schema = IngestRequest if need_labels else PredictRequest
        try:
            payload = schema.model_validate_json(body)
        except ValidationError as exc:
            if any(error["type"] == "json_invalid" for error in exc.errors()):
                raise BatchRejected("encoding", "the body is not valid JSON", status_code=400) from exc
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise BatchRejected("schema", problems) from exc
        return decode_json_batch(payload.model_dump(), self.input_spec(need_labels), need_labels=need_labels)

    def ingest(self, content_type: str, body: bytes) -> tuple[str, str, str]:
        """Validate, then enqueue once: (state, batch_id, entry_id); 429 when the queue is full."""
        batch = self.decode(content_type, body, need_labels=True)
        result = self.queue.enqueue(batch.batch_id, to_stream_fields(batch))
        if result.state == "full":
            raise ApiError(429, "queue_full", f"the queue holds its maximum of {self.settings.queue_max_length} "
                                              "entries; retry later",
                           {"Retry-After": str(self.settings.retry_after_seconds)})
        if result.state == "queued":
            self.metrics.ingested_samples.inc(len(batch))
            self.metrics.ingested_batches.inc()
        return result.state, batch.batch_id, result.entry_id

    def reset(self, request: ResetRequest, client: str | None) -> tuple[str, str, str]:
        """Queue a reset of the worker's learner to `request.seed`'s starting state, in stream order, and record
        who asked (`admin-audit`): (state, reset_id, entry_id); 429 when the queue is full."""
        reset_id = request.reset_id or f"reset-{uuid.uuid4().hex}"
        result = self.queue.enqueue_reset(reset_id, request.seed)
        if result.state == "full":
            raise ApiError(429, "queue_full", f"the queue holds its maximum of {self.settings.queue_max_length} "
                                              "entries; retry later",
                           {"Retry-After": str(self.settings.retry_after_seconds)})
        self.queue.record_admin({"action": "reset", "reset_id": reset_id, "seed": request.seed,
                                 "entry_id": result.entry_id, "state": result.state, "client": client,
                                 "at": time.time()})
        log.warning("admin reset %s to seed %d from %s: %s (entry %s)", reset_id, request.seed, client, result.state,
                    result.entry_id)
        return result.state, reset_id, result.entry_id

    def current_model(self) -> PublishedModel:
        published = self.models.current()
        if published is None:
            raise ApiError(503, "no_model", "no model is published yet: start the worker (dscguard worker)",
                           {"Retry-After": str(self.settings.retry_after_seconds)})
        return published

    def predict(self, content_type: str, body: bytes) -> tuple[list[int], int]:
        batch = self.decode(content_type, body, need_labels=False)
        published = self.current_model()
        return published.predict(batch.inputs()).tolist(), published.version

    def status(self, audit_count: int) -> dict:
        worker = self.queue.worker_status() or {}
        model = {name: worker.pop(name, None) for name in MODEL_STATUS_FIELDS}
        return {**model, "worker": worker or None, "worker_alive": self.queue.worker_alive(),
                "queue": self.queue.stats(worker.get("last_applied_id")).to_dict(),
                "audit": self.queue.audit_tail(audit_count)}

    def readiness(self) -> dict:
        checks = {"redis": False, "worker": False, "model": False}
        try:
            checks["redis"] = self.queue.ping()
            checks["worker"] = self.queue.worker_alive()
            checks["model"] = self.queue.model_version() is not None
        except redis.RedisError:
            pass
        return {"ready": all(checks.values()), "checks": checks}
