"""Every built-in profile becomes a bundle: its burn-in (cached) as the online and auxiliary models, its trusted
calibration split as the trusted set, its stream, strategy and calibration settings as the bundle's."""

from __future__ import annotations

from pathlib import Path

from service.core.bundle.manifest import BundleManifest
from service.core.bundle.store import create_bundle, empty_output
from service.core.config import ExperimentConfig


def create_bundle_from_profile(config: ExperimentConfig, out_dir: str | Path, *, cache_dir: str | Path | None = None,
                               progress: bool = True) -> Path:
    """Burn in `config` (or load its burn-in from the cache) and write it as a bundle into `out_dir` (new or empty:
    checked before the burn-in starts)."""
    from service.core.experiment import Experiment  # loads the data and trains: imported when a bundle is made

    out = empty_output(out_dir)
    experiment = Experiment.prepare(config, cache_dir=cache_dir, progress=progress)
    burnin = experiment.burnin
    manifest = BundleManifest.from_model_spec(
        burnin.model_spec, input={"class_names": list(experiment.splits.calibration.classes)},
        stream=config.stream, strategy=config.strategy, calibration=config.calibration,
        description=f"the burn-in of profile {config.profile!r}, seed {config.seed} (burn-in "
                    f"{config.burnin_fingerprint()}, {config.burnin.epochs} epochs; auxiliary: epoch "
                    f"{config.burnin.auxiliary_epoch})")
    return create_bundle(out, manifest, burnin.model, experiment.calibration_tensors, auxiliary=burnin.auxiliary)
