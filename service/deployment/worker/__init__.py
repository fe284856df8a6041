"""The defense worker: read batches from the stream, defend and learn, record, checkpoint, acknowledge.

One worker serves a namespace. For each entry, oldest first: decode and re-validate it (undecodable entries
go to the dead-letter stream with the reason), skip it if its update is already in the model, take
`learner.step` (DSC against the frozen auxiliary checkpoint, then the SGD step). What it applied is
published in one atomic round trip per *flush*; a batch is never seen as applied before the published
weights hold it.

Durability: an entry is acknowledged (XACK) only once a checkpoint holds its update, and deleted
only once the oldest of the `checkpoints_kept` checkpoints holds it. Checkpoints are written every
`checkpoint_every` batches and on shutdown, atomically (temp dir, rename, fsync), and record the
last applied stream id and the recent batch ids. On start the worker loads the newest valid
checkpoint, reclaims the group's pending entries (XAUTOCLAIM) and replays every entry after the
checkpoint's last applied id: a restart, clean or after a crash, neither loses nor repeats an
update, and a replayed batch whose record went out before the crash gets no second audit record.
A checkpoint that cannot be loaded (truncated, corrupt) is refused with an error, moved aside as
`refused-step-...`, and the next older one is loaded; the updates between the two are replayed
from the entries kept in the stream.

A reset (`POST /v1/admin/reset`: a control entry in the same stream) is applied in stream order: what was applied
before it is published with the old model, then the learner is rebuilt from its starting state for the seed the
reset names (`Bootstrap.fresh`: the burn-in of that seed, or the bundle), under the next model version, and
checkpointed at once (the checkpoint records the seed). A crash before that checkpoint replays the reset from the
stream at the same place, so the rebuilt model and its version come out the same. The batch ids remembered
against re-sent batches are kept across a reset, as the API's idempotency keys are.

What readers see never goes backwards. A batch is `applied` once the published model holds it, and
`committed` once a checkpoint does too (a crash costs only its replay).

The parts, one job each; `Worker` here wires them and does the one job left, applying an entry:

| part | its job |
|---|---|
| `lease.Lease` | the namespace's lease (a redis-py `Lock`) and its heartbeat; taking it back after an outage |
| `consumer.StreamConsumer` | what to apply next: the backlog to replay, new reads, reclaims after an outage, backoff |
| `publisher.Publisher` | weights, audit records and status in one round trip; no publishing while a replay catches up |
| `bootstrap.Bootstrap` | the configuration and bundle served; the newest checkpoint, or a new learner and its canary |
| `service.deployment.checkpoint_store.CheckpointStore` | checkpoints on disk: rotation, fallback, refusal, canary |

Each part takes the `RedisQueue` it is given, so a test that needs Redis to fail at one call passes
`Worker(settings, queue=...)` a queue that does.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict

import redis
import torch

from service.core.learner import OnlineLearner, StepReport
from service.deployment.checkpoint_store import WorkerError
from service.deployment.codec import MIN_SAMPLES_KEY, BatchRejected, InputSpec, from_stream_fields
from service.deployment.metrics import WorkerMetrics
from service.deployment.redis_queue import CONTROL_FIELD, RESET, AppliedBatch, RedisQueue, entry_id_key
from service.deployment.settings import ServiceSettings
from service.deployment.worker.bootstrap import Bootstrap
from service.deployment.worker.consumer import StreamConsumer
from service.deployment.worker.lease import Lease
from service.deployment.worker.publisher import Publisher

__all__ = ["Worker", "WorkerError", "run_worker"]

log = logging.getLogger("dscguard.worker")


class Worker:
    """The consumer that applies the stream to the online model.

    `run(max_batches=..., idle_timeout=...)` bounds a run (tests, benchmarks); `request_stop()`
    (SIGTERM in `dscguard worker`) finishes the batch in flight, checkpoints and returns.
    """

    def __init__(self, settings: ServiceSettings, *, queue: RedisQueue | None = None,
                 metrics: WorkerMetrics | None = None):
        self.settings = settings
        self.bootstrap = Bootstrap(settings)  # a bad bundle is refused here, before anything is read or written
        self.config, self.bundle = self.bootstrap.config, self.bootstrap.bundle
        self.bundle_fingerprint = self.bootstrap.bundle_fingerprint
        self.store = self.bootstrap.store
        self.queue = queue or RedisQueue.from_settings(settings)
        self.metrics = metrics or WorkerMetrics()
        self.consumer = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self._stop = threading.Event()
        self.lease = Lease(self.queue, self.consumer, settings.heartbeat_ttl_seconds)
        self.stream = StreamConsumer(self.queue, self.consumer, read_block_ms=settings.read_block_ms, stop=self._stop)
        self.publisher = Publisher(self.queue, self.metrics)
        self.learner: OnlineLearner | None = None
        self.spec: InputSpec | None = None
        self.last_applied_id = "0-0"
        self.recent_ids: OrderedDict[str, None] = OrderedDict()
        self.uncommitted: dict[bytes, str] = {}  # applied entries no checkpoint holds yet -> their batch ids
        self.committed_id = "0-0"  # the last entry the newest checkpoint holds
        self.recorded: set[bytes] = set()  # replayed entries whose records went out before a crash
        self.keep_after = "0-0"  # the last entry the oldest kept checkpoint holds: older ones may leave the stream
        self.canary: tuple[torch.Tensor, torch.Tensor] | None = None
        self.canary_accuracy: float | None = None
        self._checkpointed_batches = -1
        self._checkpointed_version = -1
        self.seed = settings.seed  # the starting state's seed: the configured one, or the last reset's
        self._metrics_server = None
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Take the namespace's lease, load (or create) the learner, publish it, and join the group."""
        held = self.settings.checkpoints_kept * self.settings.checkpoint_every
        if self.settings.queue_max_length <= held:
            # applied entries stay in the stream until the oldest kept checkpoint holds them: a full stream of
            # those would refuse every new batch (429) while the worker waits for the batches that make the
            # next checkpoint due
            raise WorkerError(f"DSCGUARD_QUEUE_MAX_LENGTH ({self.settings.queue_max_length}) must exceed "
                              f"DSCGUARD_CHECKPOINTS_KEPT x DSCGUARD_CHECKPOINT_EVERY ({held})")
        if self.settings.torch_threads:
            torch.set_num_threads(self.settings.torch_threads)
        if not self.lease.acquire(wait_seconds=self.settings.heartbeat_ttl_seconds + 1.0):
            raise WorkerError(f"namespace {self.queue.namespace!r} is held by worker {self.lease.holder()!r}; "
                              "one worker serves a namespace")
        self._stop.clear()
        self.lease.beat_until(self._stop)
        try:
            self._resume()
            # entries are checked as the API checks requests, the fewest samples the learner takes included
            published = {**self.learner.model_spec, MIN_SAMPLES_KEY: self.learner.min_batch_samples}
            self.spec = InputSpec.from_model_spec(published, max_samples=2**31)
            self.queue.publish_spec(published)
            self.publish()
            self.metrics.model_info.labels(model=self.learner.model_spec["name"], profile=self.bootstrap.profile(),
                                           strategy=self.learner.strategy.name, device=str(self.learner.device)).set(1)
            self._observe_model()
            self.queue.ensure_group()
            if self.settings.worker_metrics_port:
                from prometheus_client import start_http_server

                self._metrics_server, _ = start_http_server(self.settings.worker_metrics_port,
                                                            addr=self.settings.worker_metrics_host,
                                                            registry=self.metrics.registry)
        except BaseException:
            self._release()
            raise
        self._started = True
        log.info("worker %s serving namespace %r on %s: model version %d, %d batches applied", self.consumer,
                 self.queue.namespace, self.learner.device, self.learner.model_version, self.learner.batches_applied)

    def _resume(self) -> None:
        """The learner from the newest checkpoint (or a new one, checkpointed at once), and what it holds."""
        start = self.bootstrap.load_or_create()
        self.learner, self.canary, self.seed = start.learner, start.canary, start.seed
        if start.created:
            self.commit()
        else:
            self.last_applied_id = self.committed_id = start.last_applied_id
            for batch_id in start.recent_batch_ids:
                self._remember(batch_id)
            self._checkpointed_batches = self.learner.batches_applied
            self._checkpointed_version = self.learner.model_version
            self.keep_after = self.store.oldest_kept_id()
        self.publisher.hold_back(self.learner)

    def request_stop(self) -> None:
        self._stop.set()

    def run(self, max_batches: int | None = None, idle_timeout: float | None = None) -> int:
        """Apply batches until stopped, `max_batches` applied, or `idle_timeout` seconds without work."""
        if not self._started:
            self.start()
        applied = 0
        try:
            backlog = self.stream.backlog(self.last_applied_id)
            self.recorded = backlog.recorded
            replay_pending = bool(backlog.entries)  # the first pass over the backlog is the replay
            if not replay_pending:
                self._end_replay()
            idle_since = time.monotonic()
            entries: list[tuple[bytes, dict]] = []
            while not self._stop.is_set() and (max_batches is None or applied < max_batches):
                self.metrics.loop_timestamp.set(time.time())
                try:
                    remaining = self.settings.read_count if max_batches is None else max_batches - applied
                    # with applied batches not yet published, only look (no wait) for more work
                    entries = self.stream.next(min(self.settings.read_count, remaining),
                                               wait=not self.publisher.unpublished, applied=self.uncommitted,
                                               last_applied_id=self.last_applied_id)
                    for entry_id, fields in entries:
                        if self._stop.is_set() or (max_batches is not None and applied >= max_batches):
                            break  # entries left pending are reclaimed by the next start
                        applied += self.process(entry_id, fields)
                    else:
                        if replay_pending:
                            replay_pending = False
                            self._end_replay()
                    interval = self.settings.publish_interval_seconds
                    if not entries or time.monotonic() - self.publisher.published_at >= interval:
                        self.flush()
                    self.stream.answered()
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    self.stream.wait_out(exc)
                if entries:  # work came (and an outage that interrupted it is no idleness either)
                    idle_since = time.monotonic()
                elif idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout:
                    break
        finally:
            self.shutdown()
        return applied

    def shutdown(self) -> None:
        """Checkpoint what is applied, acknowledge it, stop serving metrics and give the lease back.

        A worker that lost its lease to another writes nothing: the namespace is no longer its own (its
        unacknowledged entries stay pending for the worker that serves it now)."""
        if not self._started:
            return
        self._started = False
        try:
            if self.lease.lost:
                log.error("not checkpointing or publishing: another worker serves namespace %r",
                          self.queue.namespace)
            else:
                self.commit()
        finally:
            self._release()
        log.info("worker %s stopped at model version %d", self.consumer, self.learner.model_version)

    def _release(self) -> None:
        self._stop.set()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        self.lease.release()

    # -- one entry ---------------------------------------------------------------------------------
    def process(self, entry_id: bytes, fields: dict) -> int:
        """Apply one stream entry; returns 1 if the model was updated, 0 if skipped or dead-lettered.

        The batch's record waits in the publisher for the next `flush`.
        """
        started = time.perf_counter()
        if CONTROL_FIELD.encode() in fields:
            return self.control(entry_id, fields)
        try:
            batch = from_stream_fields(fields, self.spec)
        except BatchRejected as exc:
            log.warning("entry %s dead-lettered (%s): %s", entry_id.decode(), exc.reason, exc.message)
            self.queue.dead_letter(entry_id, fields, exc.reason, exc.message)
            self.metrics.dead_letters.labels(reason=exc.reason).inc()
            return 0
        if entry_id_key(entry_id) <= entry_id_key(self.last_applied_id):
            # a replayed entry the checkpoint already holds (a crash came between the checkpoint and the XACK)
            self.queue.settle([entry_id], self.keep_after, committed_batch_ids=[batch.batch_id])
            self.metrics.duplicates.inc()
            return 0
        if batch.batch_id in self.recent_ids:  # re-sent after the API forgot its id: applied once already
            self.queue.skip(entry_id, batch.batch_id, "this batch_id was already applied")
            self.metrics.duplicates.inc()
            return 0
        x, y = batch.inputs(), batch.labels()
        decoded = time.perf_counter()
        report = self.learner.step(x, y)
        self.last_applied_id = entry_id.decode()
        self._remember(batch.batch_id)
        self.uncommitted[entry_id] = batch.batch_id
        canary_due = self.settings.canary_every and self.learner.batches_applied % self.settings.canary_every == 0
        if canary_due and self.canary is not None:
            self.canary_accuracy = self.learner.accuracy(*self.canary)
            self.metrics.canary_accuracy.set(self.canary_accuracy)
        discrepancy = report.discrepancy_before.tolist() if report.discrepancy_before is not None else None
        self.publisher.add(AppliedBatch(batch.batch_id, self.audit_record(batch.batch_id, entry_id, report),
                                        discrepancy, in_audit=entry_id in self.recorded))
        self.recorded.discard(entry_id)
        self.metrics.observe_step(report, self.learner.threshold(), self.defense_status())
        if report.promotion is not None and not report.promotion.promoted:
            p = report.promotion
            log.warning("auxiliary promotion refused (%s) at batch %d: snapshot of batch %d, canary %.3f vs best %.3f "
                        "(bound %.3f), flagged share %.3f vs band %.3f", p.reason, p.batch, p.candidate, p.canary,
                        p.canary_best, p.canary_bound, p.flag_rate, p.flag_bound)
        self.metrics.step_duration.labels(phase="decode").observe(decoded - started)
        if len(self.uncommitted) >= self.settings.checkpoint_every:
            self.commit()
        return 1

    def control(self, entry_id: bytes, fields: dict) -> int:
        """Apply a control entry (a reset); returns 0: no batch was applied."""
        reset_id = fields.get(b"batch_id", b"").decode(errors="replace")
        try:
            if fields[CONTROL_FIELD.encode()] != RESET.encode():
                raise ValueError(f"unknown control {fields[CONTROL_FIELD.encode()].decode(errors='replace')!r}")
            seed = int(fields[b"seed"])
            if seed < 0 or not reset_id:
                raise ValueError("a reset needs a batch_id and a seed >= 0")
        except (KeyError, ValueError) as exc:
            log.warning("control entry %s dead-lettered: %s", entry_id.decode(), exc)
            self.queue.dead_letter(entry_id, fields, "control", str(exc))
            self.metrics.dead_letters.labels(reason="control").inc()
            return 0
        if entry_id_key(entry_id) <= entry_id_key(self.last_applied_id):  # replayed, and a checkpoint holds it
            self.queue.settle([entry_id], self.keep_after, committed_batch_ids=[reset_id])
            return 0
        self.reset(entry_id, reset_id, seed)
        return 0

    def reset(self, entry_id: bytes, reset_id: str, seed: int) -> None:
        """Rebuild the learner from `seed`'s starting state at this point of the stream, publish it under the next
        model version and checkpoint it."""
        self.flush()  # the batches before the reset go out with the model that applied them
        previous = self.learner
        started = time.perf_counter()
        learner = self.bootstrap.fresh(seed)
        learner.model_version = previous.model_version + 1  # readers see a new model, never a mix
        self.learner, self.seed = learner, seed
        self.last_applied_id = entry_id.decode()
        self.uncommitted[entry_id] = reset_id
        record = {"batch_id": reset_id, "entry_id": entry_id.decode(), "control": RESET, "seed": seed,
                  "strategy": learner.strategy.name, "model_version": learner.model_version,
                  "previous_model_version": previous.model_version,
                  "previous_batches_applied": previous.batches_applied, "threshold": learner.threshold(),
                  "calibration": learner.calibration.to_dict() if learner.calibration else None,
                  "batch_index": None, "samples": 0, "flagged": 0, "corrected": 0,
                  "step_seconds": time.perf_counter() - started, "applied_at": time.time()}
        self.publisher.add(AppliedBatch(reset_id, record, None, in_audit=entry_id in self.recorded))
        self.recorded.discard(entry_id)
        log.info("reset %s: learner rebuilt from the starting state of seed %d at model version %d (was %d batches "
                 "applied)", reset_id, seed, learner.model_version, previous.batches_applied)
        self._observe_model()
        self.commit()

    def _observe_model(self) -> None:
        """The served learner's version and threshold on the gauges (at start, and after a reset)."""
        self.metrics.model_version.set(self.learner.model_version)
        threshold = self.learner.threshold()
        if threshold is not None:
            self.metrics.threshold.set(threshold)

    def audit_record(self, batch_id: str, entry_id: bytes, report: StepReport) -> dict:
        summary = report.summary()
        return {"batch_id": batch_id, "entry_id": entry_id.decode(), "batch_index": report.batch_index,
                "samples": report.samples, "flagged": summary["flagged"], "corrected": summary["corrected"],
                "correction_steps": summary["correction_steps"], "discrepancy_mean": summary["discrepancy_mean"],
                "discrepancy_max": summary["discrepancy_max"], "threshold": report.threshold, "loss": report.loss,
                "model_version": report.model_version, "strategy": report.strategy, "promotion": summary["promotion"],
                "step_seconds": report.seconds.get("total"), "applied_at": time.time()}

    def defense_status(self) -> dict:
        """What the strategy says about itself (auxiliary age and promotions, gate threshold) and its target."""
        learner = self.learner
        return {**learner.strategy.health(learner.batches_applied),
                "target_false_flag_rate": learner.strategy.target_false_flag_rate()}

    def status(self) -> dict:
        """The worker's status; while it replays behind the published model, the served model's fields stay
        as published and `replaying` says where the replay is."""
        learner = self.learner
        bundle = None if self.bundle is None else {"directory": str(self.bundle.directory),
                                                   "fingerprint": self.bundle_fingerprint}
        status = {"consumer": self.consumer, "bundle": bundle, "seed": self.seed, "strategy": learner.strategy.name,
                  "device": str(learner.device),
                  "model_version": learner.model_version, "batches_applied": learner.batches_applied,
                  "threshold": learner.threshold(),
                  "calibration": learner.calibration.to_dict() if learner.calibration else None,
                  "last_applied_id": self.last_applied_id, "checkpointed_batches": self._checkpointed_batches,
                  "canary_accuracy": self.canary_accuracy, "defense": self.defense_status(), "replaying": None,
                  "updated_at": time.time()}
        return self.publisher.overlay(status, learner)

    # -- publishing and checkpoints -------------------------------------------------------------------
    def publish(self) -> None:
        """Publish the current weights and status (the API serves /v1/predict and /v1/model from them)."""
        self.flush(force=True)

    def flush(self, force: bool = False) -> None:
        """Publish what was applied since the last flush (weights, then records and status) in one round
        trip; nothing to do when nothing was applied, unless `force`."""
        self.publisher.flush(self.learner, self.status, committed_through=self.committed_id,
                             last_applied_id=self.last_applied_id, force=force)

    def _end_replay(self) -> None:
        """The replay is over: a worker still behind the published model cannot rebuild it; it publishes."""
        if self.publisher.end_replay(self.learner):
            self.flush(force=True)

    def commit(self) -> None:
        """Publish and checkpoint the applied updates, then acknowledge their entries (never the other way
        round)."""
        self.flush()
        started = time.perf_counter()
        learner = self.learner
        if learner.model_version != self._checkpointed_version:
            self.store.write(learner, {"last_applied_id": self.last_applied_id, "seed": self.seed,
                                       "recent_batch_ids": list(self.recent_ids), "namespace": self.queue.namespace})
            self._checkpointed_batches = learner.batches_applied
            self._checkpointed_version = learner.model_version
            self.committed_id = self.last_applied_id
            self.keep_after = self.store.oldest_kept_id()
            self.metrics.checkpoints.inc()
            self.metrics.step_duration.labels(phase="checkpoint").observe(time.perf_counter() - started)
        self.queue.settle(list(self.uncommitted), self.keep_after, committed_batch_ids=list(self.uncommitted.values()))
        self.uncommitted = {}

    def _remember(self, batch_id: str) -> None:
        self.recent_ids[batch_id] = None
        while len(self.recent_ids) > self.settings.recent_batch_ids:
            self.recent_ids.popitem(last=False)


def run_worker(settings: ServiceSettings, max_batches: int | None = None, idle_timeout: float | None = None) -> int:
    """`dscguard worker`: run until SIGTERM/SIGINT (or the bounds), checkpointing on the way out."""
    import signal

    worker = Worker(settings)
    previous = {sig: signal.signal(sig, lambda *_: worker.request_stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        applied = worker.run(max_batches=max_batches, idle_timeout=idle_timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("applied %d batches in this run", applied)
    return applied
