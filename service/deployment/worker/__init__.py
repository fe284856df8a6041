"""The defense worker: read batches from the stream, defend and learn, record, checkpoint, acknowledge.

One worker serves a namespace (the online model is one sequential state; a lease in Redis keeps a
second worker out). For each entry, oldest first: decode and re-validate it (undecodable entries
go to the dead-letter stream with the reason), skip it if its update is already in the model, take
`learner.step` (DSC against the frozen auxiliary checkpoint, then the SGD step). What it applied
is published in one atomic round trip per *flush*: the new weights first, then each batch's audit
record and state, then the worker's status. A flush happens whenever the stream has nothing more
for the worker (so a client that waits for its batch to be applied, as `HttpTarget` does, then
predicts with the model that learnt from it), and at least every `publish_interval_seconds` under
a backlog, rather than after every batch: serialising a model and a Redis round trip per batch
would cost more than a small model's step. A batch is never seen as applied before the published
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

What readers see never goes backwards. A batch is `applied` once the published model holds it, and
`committed` once a checkpoint does too (a crash costs only its replay). A worker that restarts from a
checkpoint older than the published model (a crash after updates that no checkpoint held) replays
them without publishing: the API keeps serving the newer model, its status and batch states, and the
worker's status says how far the replay is (`replaying`); it publishes again once it has caught up.
If the replay cannot catch up (the published updates are in neither a checkpoint nor the stream: a
replaced checkpoint directory, a Redis that lost its stream), it says so in an error and publishes
what it has.

The model is a profile's burn-in (`DSCGUARD_PROFILE`), or a model bundle (`DSCGUARD_BUNDLE`, `dscguard worker
--bundle`): its online and auxiliary models, its trusted set (calibration, guard's gate, the canary), its stream and
defense settings, and its input spec, which the API validates batches against (value range and feature bounds
included). A bad bundle is refused when the worker is built, and a checkpoint of another bundle when it starts,
before anything is written to the checkpoint directory.

Redis going away is waited out with exponential backoff (capped); once it answers again the
worker takes back the entries it was handed but never applied, and carries on.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from pathlib import Path

import redis
import torch

from service.core.bundle import BundleError, LoadedBundle, load_bundle
from service.core.bundle.serving import bundle_config, bundle_experiment, bundle_fingerprint
from service.core.device import resolve_device
from service.core.learner import OnlineLearner, StepReport
from service.deployment.checkpoint_store import CheckpointStore, WorkerError
from service.deployment.codec import BatchRejected, InputSpec, from_stream_fields
from service.deployment.metrics import WorkerMetrics
from service.deployment.model_store import weights_to_bytes
from service.deployment.redis_queue import AppliedBatch, RedisQueue, entry_id_key
from service.deployment.settings import ServiceSettings

log = logging.getLogger("dscguard.worker")

RECONNECT_BACKOFF_SECONDS = (0.2, 5.0)  # first wait after a Redis error, doubled up to the second
# the published status fields that describe the served model: kept as published while a replay catches up
SERVED_MODEL_FIELDS = ("model_version", "batches_applied", "threshold", "calibration", "canary_accuracy", "defense")


class Worker:
    """The consumer that applies the stream to the online model.

    `run(max_batches=..., idle_timeout=...)` bounds a run (tests, benchmarks); `request_stop()`
    (SIGTERM in `dscguard worker`) finishes the batch in flight, checkpoints and returns.
    """

    def __init__(self, settings: ServiceSettings, *, queue: RedisQueue | None = None,
                 metrics: WorkerMetrics | None = None):
        self.settings = settings
        self.config = settings.experiment_config()
        # a bundle is loaded and checked (a BundleError otherwise) before anything is read or written
        self.bundle: LoadedBundle | None = load_bundle(settings.bundle) if settings.bundle is not None else None
        self.bundle_fingerprint: str | None = None
        if self.bundle is not None:
            self.config = bundle_config(self.bundle.manifest, self.config, settings.strategy,
                                        settings.config_overrides)
            self.bundle_fingerprint = bundle_fingerprint(self.bundle.directory)
        self.queue = queue or RedisQueue.from_settings(settings)
        self.metrics = metrics or WorkerMetrics()
        self.consumer = settings.consumer_name or f"{socket.gethostname()}-{os.getpid()}"
        self.store = CheckpointStore(Path(settings.checkpoint_dir), settings.checkpoints_kept, self.config,
                                     self.bundle_fingerprint)
        self.learner: OnlineLearner | None = None
        self.spec: InputSpec | None = None
        self.last_applied_id = "0-0"
        self.recent_ids: OrderedDict[str, None] = OrderedDict()
        self.uncommitted: dict[bytes, str] = {}  # applied entries no checkpoint holds yet -> their batch ids
        self.committed_id = "0-0"  # the last entry the newest checkpoint holds
        self.unpublished: list[AppliedBatch] = []
        self.recorded: set[bytes] = set()  # replayed entries whose records went out before a crash
        self.keep_after = "0-0"  # the last entry the oldest kept checkpoint holds: older ones may leave the stream
        self.canary: tuple[torch.Tensor, torch.Tensor] | None = None
        self.canary_accuracy: float | None = None
        self._checkpointed_batches = -1
        self._replaying_below: int | None = None  # the published model version while this worker is behind it
        self._served_status: dict = {}  # the published status of that model
        self._published_at = 0.0
        self._stop = threading.Event()
        self._lease_lost = False
        self._heartbeat: threading.Thread | None = None
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
        ttl = self.settings.heartbeat_ttl_seconds
        if not self.queue.acquire_lease(self.consumer, ttl, wait_seconds=ttl + 1.0):
            raise WorkerError(f"namespace {self.queue.namespace!r} is held by worker {self.queue.lease_holder()!r}; "
                              "one worker serves a namespace")
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="dscguard-heartbeat", daemon=True)
        self._heartbeat.start()
        try:
            published = self.queue.model_version()
            if published is not None:
                self._replaying_below, self._served_status = published, self.queue.worker_status() or {}
            self.learner = self._load_or_create()
            if self._replaying_below is not None and self.learner.model_version >= self._replaying_below:
                self._replaying_below = None  # the checkpoint holds the published model (a clean restart)
            if self._replaying_below is not None:
                log.info("the published model (version %d) is ahead of checkpoint version %d: replaying without "
                         "publishing until caught up", self._replaying_below, self.learner.model_version)
            self.spec = InputSpec.from_model_spec(self.learner.model_spec, max_samples=2**31)
            self.queue.publish_spec(self.learner.model_spec)
            self.publish()
            self.metrics.model_version.set(self.learner.model_version)
            profile = self.settings.profile if self.bundle is None else f"bundle:{self.bundle.directory.name}"
            self.metrics.model_info.labels(model=self.learner.model_spec["name"], profile=profile,
                                           strategy=self.learner.strategy.name, device=str(self.learner.device)).set(1)
            threshold = self.learner.threshold()
            if threshold is not None:
                self.metrics.threshold.set(threshold)
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

    def request_stop(self) -> None:
        self._stop.set()

    def run(self, max_batches: int | None = None, idle_timeout: float | None = None) -> int:
        """Apply batches until stopped, `max_batches` applied, or `idle_timeout` seconds without work."""
        if not self._started:
            self.start()
        applied = 0
        try:
            backlog = self._backlog()
            replay_pending = bool(backlog)  # the first pass over the backlog is the replay
            if not replay_pending:
                self._end_replay()
            idle_since = time.monotonic()
            backoff = 0.0
            entries: list[tuple[bytes, dict]] = []
            while not self._stop.is_set() and (max_batches is None or applied < max_batches):
                self.metrics.loop_timestamp.set(time.time())
                try:
                    if backoff:  # Redis is back: take back what it handed out and this worker never applied
                        backlog = [e for e in self.queue.reclaim(self.consumer) if e[0] not in self.uncommitted]
                    remaining = self.settings.read_count if max_batches is None else max_batches - applied
                    # with applied batches not yet published, only look (no wait) for more work
                    block_ms = None if self.unpublished else self.settings.read_block_ms
                    entries = backlog or self.queue.read(self.consumer, min(self.settings.read_count, remaining),
                                                         block_ms)
                    backlog = []
                    for entry_id, fields in entries:
                        if self._stop.is_set() or (max_batches is not None and applied >= max_batches):
                            break  # entries left pending are reclaimed by the next start
                        applied += self.process(entry_id, fields)
                    else:
                        if replay_pending:
                            replay_pending = False
                            self._end_replay()
                    if not entries or time.monotonic() - self._published_at >= self.settings.publish_interval_seconds:
                        self.flush()
                    backoff = 0.0
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    first, cap = RECONNECT_BACKOFF_SECONDS
                    backoff = min(cap, max(first, 2 * backoff))
                    log.warning("Redis unavailable (%s); retrying in %.1f s", exc, backoff)
                    self._stop.wait(backoff)
                if entries:  # work came (and an outage that interrupted it is no idleness either)
                    idle_since = time.monotonic()
                elif idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout:
                    break
        finally:
            self.shutdown()
        return applied

    def _backlog(self) -> list[tuple[bytes, dict]]:
        """What a (re)start must replay, oldest first: the group's pending entries (reclaimed by this
        consumer) and the entries after the loaded checkpoint that were acknowledged for a newer one
        since refused. Those whose records went out before a crash are remembered, not re-recorded."""
        pending = self.queue.reclaim(self.consumer)
        replay = {entry_id: fields for entry_id, fields in pending}
        replay.update(self.queue.delivered_after(self.last_applied_id))
        backlog = sorted(replay.items(), key=lambda item: entry_id_key(item[0]))
        todo = [e for e in backlog if entry_id_key(e[0]) > entry_id_key(self.last_applied_id)]
        if backlog:
            self.recorded = self.queue.recorded_entries(todo)
            log.info("replaying %d entries after the checkpoint (%d of them applied and recorded before a crash); "
                     "%d pending entries reclaimed", len(todo), len(self.recorded), len(pending))
        return backlog

    def shutdown(self) -> None:
        """Checkpoint what is applied, acknowledge it, stop serving metrics and give the lease back.

        A worker that lost its lease to another writes nothing: the namespace is no longer its own (its
        unacknowledged entries stay pending for the worker that serves it now)."""
        if not self._started:
            return
        self._started = False
        try:
            if self._lease_lost:
                log.error("not checkpointing or publishing: another worker serves namespace %r",
                          self.queue.namespace)
            else:
                self.commit()
        finally:
            self._release()
        log.info("worker %s stopped at model version %d", self.consumer, self.learner.model_version)

    def _release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if not self._lease_lost:
            try:
                self.queue.release_lease(self.consumer)
            except redis.RedisError as exc:
                log.warning("could not release the lease: %s", exc)

    def _beat(self) -> None:
        ttl = self.settings.heartbeat_ttl_seconds
        while not self._stop.wait(ttl / 3):
            try:
                if not self.queue.refresh_lease(self.consumer, ttl) and not self._retake_lease(ttl):
                    log.error("lost the lease on namespace %r; stopping", self.queue.namespace)
                    self._lease_lost = True
                    self._stop.set()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _retake_lease(self, ttl: float) -> bool:
        """After the lease expired (a Redis outage longer than its TTL): take it back, but only if no other
        worker served the namespace meanwhile (the published status is still this worker's)."""
        if not self.queue.acquire_lease(self.consumer, ttl, wait_seconds=0):
            return False
        status = self.queue.worker_status() or {}
        if status.get("consumer") != self.consumer:
            self.queue.release_lease(self.consumer)
            return False
        log.warning("the lease on namespace %r had expired (Redis unreachable for longer than its %.0f s TTL?); "
                    "no other worker served meanwhile: taken back", self.queue.namespace, ttl)
        return True

    # -- one entry ---------------------------------------------------------------------------------
    def process(self, entry_id: bytes, fields: dict) -> int:
        """Apply one stream entry; returns 1 if the model was updated, 0 if skipped or dead-lettered.

        The batch's record waits in `unpublished` for the next `flush`.
        """
        started = time.perf_counter()
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
        self.unpublished.append(AppliedBatch(batch.batch_id, self.audit_record(batch.batch_id, entry_id, report),
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
        status = {"consumer": self.consumer, "bundle": bundle, "strategy": learner.strategy.name,
                  "device": str(learner.device),
                  "model_version": learner.model_version, "batches_applied": learner.batches_applied,
                  "threshold": learner.threshold(),
                  "calibration": learner.calibration.to_dict() if learner.calibration else None,
                  "last_applied_id": self.last_applied_id, "checkpointed_batches": self._checkpointed_batches,
                  "canary_accuracy": self.canary_accuracy, "defense": self.defense_status(), "replaying": None,
                  "updated_at": time.time()}
        if self._replaying_below is not None:
            status["replaying"] = {"model_version": learner.model_version, "batches_applied": learner.batches_applied,
                                   "until_model_version": self._replaying_below}
            status.update({name: self._served_status.get(name) for name in SERVED_MODEL_FIELDS})
        return status

    def publish(self) -> None:
        """Publish the current weights and status (the API serves /v1/predict and /v1/model from them)."""
        self.flush(force=True)

    def flush(self, force: bool = False) -> None:
        """Publish what was applied since the last flush (weights, then records and status) in one round
        trip, and refresh the queue gauges; nothing to do when nothing was applied, unless `force`."""
        if not (self.unpublished or force):
            return
        started = time.perf_counter()
        self._caught_up()
        if self._replaying_below is not None:  # the published model is newer: leave it, and its batches' states
            self.queue.publish_status(self.status())
        else:
            self.queue.record_steps(self.unpublished, status=self.status(), version=self.learner.model_version,
                                    weights=self._weights(), committed_through=self.committed_id)
            self.unpublished = []
        self._published_at = time.monotonic()
        self.metrics.observe_queue(**self.queue.stats(self.last_applied_id).to_dict())
        self.metrics.step_duration.labels(phase="publish").observe(time.perf_counter() - started)

    def _caught_up(self) -> None:
        if self._replaying_below is not None and self.learner.model_version >= self._replaying_below:
            log.info("caught up with the published model at version %d: publishing again", self.learner.model_version)
            self._replaying_below = None

    def _end_replay(self) -> None:
        """The replay is over: a worker still behind the published model cannot rebuild it; say so, publish."""
        if self._replaying_below is None:
            return
        log.error("the published model (version %d) is ahead of what the checkpoints and the stream rebuild "
                  "(version %d): its last updates are lost (checkpoint directory replaced, or stream entries gone); "
                  "publishing version %d", self._replaying_below, self.learner.model_version,
                  self.learner.model_version)
        self._replaying_below = None
        self.flush(force=True)

    def _weights(self) -> bytes:
        return weights_to_bytes(self.learner.model, self.learner.model_version, self.learner.model_spec)

    def _remember(self, batch_id: str) -> None:
        self.recent_ids[batch_id] = None
        while len(self.recent_ids) > self.settings.recent_batch_ids:
            self.recent_ids.popitem(last=False)

    # -- checkpoints ---------------------------------------------------------------------------------
    def commit(self) -> None:
        """Publish and checkpoint the applied updates, then acknowledge their entries (never the other way
        round)."""
        self.flush()
        started = time.perf_counter()
        learner = self.learner
        if learner.batches_applied != self._checkpointed_batches:
            self.store.write(learner, {"last_applied_id": self.last_applied_id,
                                       "recent_batch_ids": list(self.recent_ids), "namespace": self.queue.namespace})
            self._checkpointed_batches = learner.batches_applied
            self.committed_id = self.last_applied_id
            self.keep_after = self.store.oldest_kept_id()
            self.metrics.checkpoints.inc()
            self.metrics.step_duration.labels(phase="checkpoint").observe(time.perf_counter() - started)
        self.queue.settle(list(self.uncommitted), self.keep_after, committed_batch_ids=list(self.uncommitted.values()))
        self.uncommitted = {}

    def _load_or_create(self) -> OnlineLearner:
        device = resolve_device(self.config.device)
        learner = self.store.load_newest(device)
        if learner is None:
            return self._create(device)
        extra = learner.extra_meta
        self.last_applied_id = self.committed_id = extra.get("last_applied_id", "0-0")
        for batch_id in extra.get("recent_batch_ids", []):
            self._remember(batch_id)
        self._checkpointed_batches = learner.batches_applied
        self.keep_after = self.store.oldest_kept_id()
        self.canary = self.store.load_canary()
        return learner

    def _create(self, device: torch.device) -> OnlineLearner:
        from service.core.experiment import Experiment

        config = self.config.model_copy(update={"device": str(device)})
        if self.bundle is not None:
            log.info("no checkpoint in %s: calibrating a new learner from bundle %s", self.store.directory,
                     self.bundle.directory)
            experiment = bundle_experiment(self.bundle, config, device=device)
            strategy = config.strategy
            if self.bundle.auxiliary is None and strategy.name == "dsc" and strategy.auxiliary == "frozen":
                log.warning("bundle %s has no auxiliary: dsc's frozen auxiliary is the online model as it starts, so "
                            "its discrepancy measures only the drift since then; bundle an earlier checkpoint "
                            "(--auxiliary) or set strategy.auxiliary=rolling", self.bundle.directory)
            try:
                learner = experiment.new_learner()
            except ValueError as exc:  # the strategy refuses the trusted set (too few samples for guard's gate)
                raise BundleError(self.bundle.directory / self.bundle.manifest.files.trusted, "x", str(exc)) from exc
        else:
            log.info("no checkpoint in %s: burning in (cached) and calibrating a new learner", self.store.directory)
            experiment = Experiment.prepare(config, cache_dir=self.settings.cache_dir, progress=False)
            learner = experiment.new_learner()
        calibration = experiment.splits.calibration.subset(list(range(min(self.settings.canary_samples,
                                                                          len(experiment.splits.calibration)))))
        x, y = calibration.tensors()
        # a profile's images stay uint8 on disk (4x smaller); a bundle's inputs are float already
        self.store.save_canary(x if self.bundle is not None else torch.from_numpy(calibration.x), y)
        self.canary = (x, y)
        self.learner = learner
        self.commit()
        return learner


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
