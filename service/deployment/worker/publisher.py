"""Publishing: what the worker applied goes out in one atomic round trip per flush, and readers never see
the served model go back.

A flush writes the new weights first, then each batch's audit record and state, then the worker's status
(`RedisQueue.record_steps`), so a batch is never seen as applied before the published weights hold it. The
worker flushes whenever the stream has nothing more for it, and at least every `publish_interval_seconds`
under a backlog, rather than after every batch: serialising a model and a Redis round trip per batch would
cost more than a small model's step.

A worker that restarts from a checkpoint older than the published model (a crash after updates that no
checkpoint held) replays them without publishing: the API keeps serving the newer model, its status and
batch states, and the worker's status says how far the replay is (`replaying`, the served model's fields
kept as published); it publishes again once it has caught up. If the replay cannot catch up (the published
updates are in neither a checkpoint nor the stream), `end_replay` says so in an error and publishes what it has.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from service.core.learner import OnlineLearner
from service.deployment.metrics import WorkerMetrics
from service.deployment.model_store import weights_to_bytes
from service.deployment.redis_queue import AppliedBatch, RedisQueue

log = logging.getLogger("dscguard.worker")

# the published status fields that describe the served model: kept as published while a replay catches up
SERVED_MODEL_FIELDS = ("model_version", "batches_applied", "threshold", "calibration", "canary_accuracy", "defense")


class Publisher:
    """Collects the records of applied batches and publishes them, with the weights and the status."""

    def __init__(self, queue: RedisQueue, metrics: WorkerMetrics):
        self.queue, self.metrics = queue, metrics
        self.unpublished: list[AppliedBatch] = []
        self.published_at = 0.0  # time.monotonic() of the last flush
        self.replaying_below: int | None = None  # the published model version while this worker is behind it
        self.served_status: dict = {}  # the published status of that model

    def hold_back(self, learner: OnlineLearner) -> None:
        """At start: if the published model is ahead of `learner` (restored from an older checkpoint), publish
        nothing of it until the replay has caught up."""
        published = self.queue.model_version()
        if published is None or learner.model_version >= published:
            return  # nothing published yet, or the checkpoint holds the published model (a clean restart)
        self.replaying_below, self.served_status = published, self.queue.worker_status() or {}
        log.info("the published model (version %d) is ahead of checkpoint version %d: replaying without "
                 "publishing until caught up", self.replaying_below, learner.model_version)

    def add(self, applied: AppliedBatch) -> None:
        self.unpublished.append(applied)

    def overlay(self, status: dict, learner: OnlineLearner) -> dict:
        """While replaying behind the published model, `status` keeps the served model's fields as published,
        and `replaying` says where the replay is."""
        if self.replaying_below is not None:
            status["replaying"] = {"model_version": learner.model_version, "batches_applied": learner.batches_applied,
                                   "until_model_version": self.replaying_below}
            status.update({name: self.served_status.get(name) for name in SERVED_MODEL_FIELDS})
        return status

    def flush(self, learner: OnlineLearner, status: Callable[[], dict], *, committed_through: str,
              last_applied_id: str, force: bool = False) -> None:
        """Publish what was applied since the last flush (weights, then records and status) in one round
        trip, and refresh the queue gauges; nothing to do when nothing was applied, unless `force`."""
        if not (self.unpublished or force):
            return
        started = time.perf_counter()
        if self.replaying_below is not None and learner.model_version >= self.replaying_below:
            log.info("caught up with the published model at version %d: publishing again", learner.model_version)
            self.replaying_below = None
        if self.replaying_below is not None:  # the published model is newer: leave it, and its batches' states
            self.queue.publish_status(status())
        else:
            self.queue.record_steps(self.unpublished, status=status(), version=learner.model_version,
                                    weights=weights_to_bytes(learner.model, learner.model_version, learner.model_spec),
                                    committed_through=committed_through)
            self.unpublished = []
        self.published_at = time.monotonic()
        self.metrics.observe_queue(**self.queue.stats(last_applied_id).to_dict())
        self.metrics.step_duration.labels(phase="publish").observe(time.perf_counter() - started)

    def end_replay(self, learner: OnlineLearner) -> bool:
        """The replay is over: a worker still behind the published model cannot rebuild it; say so. True when it
        was behind (the caller then publishes what it has)."""
        if self.replaying_below is None:
            return False
        log.error("the published model (version %d) is ahead of what the checkpoints and the stream rebuild "
                  "(version %d): its last updates are lost (checkpoint directory replaced, or stream entries gone); "
                  "publishing version %d", self.replaying_below, learner.model_version, learner.model_version)
        self.replaying_below = None
        return True
