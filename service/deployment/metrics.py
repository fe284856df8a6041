"""Prometheus metrics of the API and of the worker, all named `dscguard_*` in base units.

Each side owns its metrics on its own registry (so an API and a worker can share a process in tests).
The API may run several uvicorn worker processes: `dscguard serve --workers N` sets
`PROMETHEUS_MULTIPROC_DIR` before they start, and `/metrics` then aggregates every process's files
(prometheus_client's multiprocess mode; the API only has counters and histograms, which aggregate
exactly). With one process (the default) the registry is served directly.

>>> metrics = WorkerMetrics(CollectorRegistry())
>>> metrics.dead_letters.labels(reason="entry").inc()
>>> b"dscguard_dead_letters_total" in render(metrics.registry)[0]
True
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from service.core.defense.rolling_auxiliary import REASONS

if TYPE_CHECKING:
    from service.core.learner import StepReport

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DISCREPANCY_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
CORRECTION_STEP_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50)


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The exposition text of `registry`, or of every process when in multiprocess mode."""
    if os.environ.get(MULTIPROCESS_ENV):
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


class GaugeOnceSet(Collector):
    """A gauge whose series is absent until it is first set: a default 0 would read as a measurement (a
    canary accuracy of 0 when no canary runs). The family (HELP, TYPE) is always described.

    >>> registry = CollectorRegistry()
    >>> gauge = GaugeOnceSet("dscguard_example_ratio", "An example", registry=registry)
    >>> [family.samples for family in registry.collect()]
    [[]]
    >>> gauge.set(0.5)
    >>> b"dscguard_example_ratio 0.5" in generate_latest(registry)
    True
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self._value: float | None = None
        registry.register(self)

    def set(self, value: float) -> None:
        self._value = float(value)

    def describe(self):
        yield GaugeMetricFamily(self.name, self.documentation)

    def collect(self):
        family = GaugeMetricFamily(self.name, self.documentation)
        if self._value is not None:
            family.add_metric([], self._value)
        yield family


class ApiMetrics:
    """Requests, latency, ingested samples and rejections, by route and reason (never by client)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("dscguard_http_requests_total", "HTTP requests answered, by route and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("dscguard_http_request_duration_seconds", "Time to answer an HTTP request",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.ingested_samples = Counter("dscguard_ingested_samples_total", "Samples accepted into the queue",
                                        registry=r)
        self.ingested_batches = Counter("dscguard_ingested_batches_total", "Batches accepted into the queue",
                                        registry=r)
        self.rejected = Counter("dscguard_rejected_requests_total", "Requests refused, by reason", ["reason"],
                                registry=r)


class WorkerMetrics:
    """What the defense decided and how the worker keeps up, updated once per applied batch."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.discrepancy = Histogram("dscguard_memorization_discrepancy",
                                     "Per-sample memorization discrepancy of received samples, by the defense's "
                                     "verdict on them (see dscguard_samples_flagged_total)",
                                     ["verdict"], buckets=DISCREPANCY_BUCKETS, registry=r)
        self.flagged = Counter("dscguard_samples_flagged_total", "Samples the defense flagged, counted by its "
                               "strategy's verdict unit: a per-sample verdict flags the samples whose discrepancy "
                               "is above the threshold; a batch verdict (dsc's batch-mean rule, the default) flags "
                               "every sample of a batch whose mean discrepancy is above it, those below included",
                               registry=r)
        self.corrected = Counter("dscguard_samples_corrected_total", "Samples changed by correction steps",
                                 registry=r)
        self.left_out = Counter("dscguard_samples_left_out_total", "Samples left out of the update they came in: "
                                "guard's label check (labelled as a lied-about pair's label, looking like neither "
                                "class of the pair) and its gate's 'drop' and 'drop_lies' actions (the samples that "
                                "pushed a flagged update uphill most; those the label check found lying)",
                                registry=r)
        self.relabelled = Counter("dscguard_samples_relabelled_total", "Samples guard's label check learned with "
                                  "the label of the trusted class they look like, their own label being the lied-"
                                  "about one of a pair or their class being lied about", registry=r)
        self.correction_steps = Histogram("dscguard_correction_steps", "Correction steps taken per flagged sample",
                                          buckets=CORRECTION_STEP_BUCKETS, registry=r)
        self.threshold = Gauge("dscguard_threshold", "Discrepancy threshold the next batch is judged against",
                               registry=r)
        self.loss = Gauge("dscguard_loss", "Training loss of the last applied batch", registry=r)
        self.batches = Counter("dscguard_batches_applied_total", "Batches applied to the online model", registry=r)
        self.samples = Counter("dscguard_samples_applied_total", "Samples applied to the online model", registry=r)
        self.step_duration = Histogram("dscguard_step_duration_seconds", "Worker time per batch, by phase",
                                       ["phase"], buckets=STEP_BUCKETS, registry=r)
        self.queue_depth = Gauge("dscguard_queue_depth", "Entries in the ingest stream (waiting, in flight, "
                                 "or applied and kept until the oldest kept checkpoint holds them)", registry=r)
        self.queue_pending = Gauge("dscguard_queue_pending", "Entries delivered to the worker, not yet acknowledged",
                                   registry=r)
        self.queue_lag = Gauge("dscguard_queue_lag_seconds", "Age of the oldest entry not yet applied", registry=r)
        self.model_version = Gauge("dscguard_model_version", "Version of the online model (one per update)",
                                   registry=r)
        self.canary_accuracy = GaugeOnceSet("dscguard_canary_accuracy", "Accuracy of the online model on the "
                                            "trusted canary set (ratio); absent until measured (canary off: "
                                            "DSCGUARD_CANARY_EVERY=0)", registry=r)
        self.gate_increase = GaugeOnceSet("dscguard_gate_increase", "Increase of the trusted probe loss the last "
                                          "judged update would have caused (guard's gate; absent until it judges)",
                                          registry=r)
        self.gate_threshold = GaugeOnceSet("dscguard_gate_threshold", "The update gate's calibrated threshold on "
                                           "that increase", registry=r)
        self.updates_shrunk = Counter("dscguard_updates_shrunk_total", "Updates the gate flagged and shrank or "
                                      "dropped", registry=r)
        self.updates_capped = Counter("dscguard_updates_capped_total", "Updates the gate did not flag but capped at "
                                      "its norm cap (larger than the gate_cap_level quantile of clean update norms: "
                                      "most fresh clean updates at the default 0.2)", registry=r)
        self.gate_cap = GaugeOnceSet("dscguard_gate_cap", "The update gate's norm cap (the gate_cap_level quantile "
                                     "of the norms of clean trusted updates, measured at the first calibration, or at "
                                     "the last with gate_cap_anchor=current); absent without a cap", registry=r)
        self.target_flag_ratio = Gauge("dscguard_target_false_flag_ratio", "Share of clean samples the defense is "
                                       "calibrated to flag (compare with the flagged fraction)", registry=r)
        self.auxiliary_age = GaugeOnceSet("dscguard_auxiliary_age_batches", "Batches since dsc's auxiliary was "
                                          "taken (frozen: since deployment; rolling: since its last promotion); "
                                          "absent for strategies without one", registry=r)
        self.promotions = Counter("dscguard_auxiliary_promotions_total", "Health-gate decisions of dsc's rolling "
                                  "auxiliary: promoted (healthy, max_age) or refused (canary, flag_rate)",
                                  ["decision"], registry=r)
        for reason in REASONS:  # every decision's series exists from the start, at 0
            self.promotions.labels(decision=reason)
        self.dead_letters = Counter("dscguard_dead_letters_total", "Entries moved to the dead-letter stream",
                                    ["reason"], registry=r)
        self.duplicates = Counter("dscguard_duplicates_skipped_total", "Entries skipped: their update was "
                                  "already applied", registry=r)
        self.checkpoints = Counter("dscguard_checkpoints_total", "Checkpoints written", registry=r)
        self.loop_timestamp = Gauge("dscguard_worker_loop_timestamp_seconds", "Unix time of the worker loop's last "
                                    "turn (it turns at least every read_block_ms while idle; a stuck worker's "
                                    "stops)", registry=r)
        self.model_info = Gauge("dscguard_model_info", "The model and defense the worker serves (value 1)",
                                ["model", "profile", "strategy", "device"], registry=r)

    def observe_step(self, report: StepReport, threshold_next: float | None, defense: dict) -> None:
        """Everything a StepReport says, as metrics (no per-sample labels: samples go into histograms), and
        the strategy's own health (`Strategy.health`)."""
        flagged = report.flagged.astype(bool)
        if report.discrepancy_before is not None:
            by_verdict = {True: self.discrepancy.labels(verdict="flagged"),
                          False: self.discrepancy.labels(verdict="clean")}
            for value, is_flagged in zip(report.discrepancy_before.tolist(), flagged.tolist(), strict=True):
                by_verdict[is_flagged].observe(value)
        for steps in report.correction_steps[flagged].tolist():
            self.correction_steps.observe(steps)
        self.flagged.inc(report.flagged_count)
        self.corrected.inc(report.corrected_count)
        self.left_out.inc(report.left_out_count)
        self.relabelled.inc(report.relabelled_count)
        self.loss.set(report.loss)
        if threshold_next is not None:
            self.threshold.set(threshold_next)
        self.batches.inc()
        self.samples.inc(report.samples)
        self.model_version.set(report.model_version)
        if report.gate is not None:  # only the update gate scales an update
            self.gate_increase.set(report.gate.increase)
            self.gate_threshold.set(report.gate.threshold)
            if report.gate.cap is not None:
                self.gate_cap.set(report.gate.cap)
            if report.gate.flagged:
                self.updates_shrunk.inc()
            elif report.gate.cap is not None and report.gate.norm is not None and report.gate.norm > report.gate.cap:
                self.updates_capped.inc()  # not a small batch's pace (gate_size_rule 'pace'), which no cap decided
        if report.promotion is not None:
            self.promotions.labels(decision=report.promotion.reason).inc()
        if defense.get("auxiliary_age") is not None:
            self.auxiliary_age.set(defense["auxiliary_age"])
        if defense.get("target_false_flag_rate") is not None:
            self.target_flag_ratio.set(defense["target_false_flag_rate"])
        for phase in ("prepare", "update"):
            if phase in report.seconds:
                self.step_duration.labels(phase=phase).observe(report.seconds[phase])

    def observe_queue(self, depth: int, pending: int, lag_seconds: float) -> None:
        self.queue_depth.set(depth)
        self.queue_pending.set(pending)
        self.queue_lag.set(lag_seconds)

