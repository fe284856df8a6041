"""Bootstrap: the learner a worker starts from, and the configuration it serves.

The model is a profile's burn-in (`DSCGUARD_PROFILE`), or a model bundle (`DSCGUARD_BUNDLE`, `dscguard worker
--bundle`): its online and auxiliary models, its trusted set (calibration, guard's gate, the canary), its stream and
defense settings, and its input spec, which the API validates batches against (value range and feature bounds
included). A bad bundle is refused when the worker is built (`Bootstrap(settings)`), and a checkpoint of another
bundle when it starts, before anything is written to the checkpoint directory.

On start the newest valid checkpoint wins (`CheckpointStore.load_newest`: rotation, fallback, refusal); with none,
a new learner is calibrated from the burn-in (cached) or the bundle, and the trusted canary saved beside the
checkpoints. The caller writes the new learner's first checkpoint.

A reset (`POST /v1/admin/reset`) asks for `fresh(seed)`: the learner a new deployment with that seed would start
from (the profile's burn-in for that seed, cached on disk and deterministic, or the bundle with that seed), built
as `dscguard eval` builds each run's learner (`Experiment.new_learner`). The last seed's experiment is kept, so
resets to the same seed do not split the data and calibrate again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from service.core.bundle import BundleError, LoadedBundle, load_bundle
from service.core.bundle.serving import bundle_config, bundle_experiment, bundle_fingerprint
from service.core.config import ExperimentConfig
from service.core.device import resolve_device
from service.core.learner import OnlineLearner
from service.deployment.checkpoint_store import CheckpointStore
from service.deployment.settings import ServiceSettings

log = logging.getLogger("dscguard.worker")


@dataclass
class Start:
    """A learner to serve: resumed from a checkpoint (with what it recorded of the stream), or `created`."""

    learner: OnlineLearner
    created: bool
    last_applied_id: str = "0-0"
    recent_batch_ids: list[str] = field(default_factory=list)
    canary: tuple[torch.Tensor, torch.Tensor] | None = None
    seed: int = 0  # the starting state's seed: the configured one, or the last reset's


class Bootstrap:
    """The configuration and the served bundle (loaded and checked here: a `BundleError` otherwise), and the
    checkpoint store they imply."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.config: ExperimentConfig = settings.experiment_config()
        self.bundle: LoadedBundle | None = load_bundle(settings.bundle) if settings.bundle is not None else None
        self.bundle_fingerprint: str | None = None
        if self.bundle is not None:
            self.config = bundle_config(self.bundle.manifest, self.config, settings.strategy,
                                        settings.config_overrides)
            self.bundle_fingerprint = bundle_fingerprint(self.bundle.directory)
        self.store = CheckpointStore(Path(settings.checkpoint_dir), settings.checkpoints_kept, self.config,
                                     self.bundle_fingerprint)
        self._experiment: tuple[int, object] | None = None  # (seed, Experiment) of the last learner built

    def profile(self) -> str:
        """What the metrics call the model's origin: the profile, or `bundle:<directory name>`."""
        return self.settings.profile if self.bundle is None else f"bundle:{self.bundle.directory.name}"

    def load_or_create(self) -> Start:
        """The learner to serve, made ready: a calibration its first update would take (guard's first, with its
        anchored cap: 4 s on digits) is taken here, before the worker reads a batch, not inside the first one; the
        decisions are the same (`OnlineLearner.ready`)."""
        device = resolve_device(self.config.device)
        learner = self.store.load_newest(device)
        if learner is None:
            start = self._create(device)
            start.learner.ready()
            return start
        extra = learner.extra_meta
        return Start(learner.ready(), created=False, last_applied_id=extra.get("last_applied_id", "0-0"),
                     recent_batch_ids=list(extra.get("recent_batch_ids", [])), canary=self.store.load_canary(),
                     seed=int(extra.get("seed", self.config.seed)))

    def fresh(self, seed: int) -> OnlineLearner:
        """A new learner at `seed`'s starting state (a reset): what a deployment with that seed starts from, made
        ready as at start-up."""
        return self._experiment_for(seed, resolve_device(self.config.device)).new_learner().ready()

    def _experiment_for(self, seed: int, device: torch.device):
        """The experiment of `seed` (data splits, burn-in or bundle, calibrations), the last one kept."""
        from service.core.experiment import Experiment

        if self._experiment is not None and self._experiment[0] == seed:
            return self._experiment[1]
        self._experiment = None  # one at a time: a large model's burn-in and splits are not kept twice
        config = self.config.model_copy(update={"device": str(device), "seed": seed})
        if self.bundle is not None:
            experiment = bundle_experiment(self.bundle, config, device=device)
        else:
            experiment = Experiment.prepare(config, cache_dir=self.settings.cache_dir, progress=False)
        self._experiment = (seed, experiment)
        return experiment

    def _create(self, device: torch.device) -> Start:
        config = self.config.model_copy(update={"device": str(device)})
        if self.bundle is not None:
            log.info("no checkpoint in %s: calibrating a new learner from bundle %s", self.store.directory,
                     self.bundle.directory)
            experiment = self._experiment_for(config.seed, device)
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
            experiment = self._experiment_for(config.seed, device)
            learner = experiment.new_learner()
        calibration = experiment.splits.calibration.subset(list(range(min(self.settings.canary_samples,
                                                                          len(experiment.splits.calibration)))))
        x, y = calibration.tensors()
        # a profile's images stay uint8 on disk (4x smaller); a bundle's inputs are float already
        self.store.save_canary(x if self.bundle is not None else torch.from_numpy(calibration.x), y)
        return Start(learner, created=True, canary=(x, y), seed=config.seed)
