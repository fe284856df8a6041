"""`check_bundle`: load a bundle, predict its trusted set, and calibrate guard's update gate on it, as the worker
would before taking traffic.

Loading already refuses a bad manifest, weights that do not fit the architecture (names, shapes, NaN/Inf), and a
trusted set that does not fit the input spec. The check adds what needs the models to run: a forward of both models
on the whole trusted set (finite scores; accuracy), and the calibration of guard's gate (`UpdateGate`, the
default defense) with the bundle's stream optimizer and gate settings: its threshold and target false-flag rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from service.core.bundle.manifest import BundleError, BundleManifest
from service.core.bundle.store import apply_optimizer_state, load_bundle
from service.core.defense.strategies import build_strategy
from service.core.device import model_device
from service.core.models.inference import logits_in_chunks


@dataclass(frozen=True)
class CheckReport:
    """What `check_bundle` found: the bundle passed every check, and these are its numbers."""

    directory: Path
    manifest: BundleManifest
    parameters: int
    trusted_samples: int
    online_accuracy: float
    auxiliary_accuracy: float | None
    gate_threshold: float
    target_false_flag_rate: float
    gate_updates: int  # clean trusted updates the threshold was calibrated from
    optimizer_tensors: int = 0  # the optimizer state's tensors the stream optimizer starts from (0: none, fresh)


def check_bundle(path: str | Path, device: str | torch.device = "cpu", seed: int = 0) -> CheckReport:
    """Check the bundle at `path`; a BundleError naming the file and the field at the first problem."""
    bundle = load_bundle(path, device)
    manifest, (x, y) = bundle.manifest, bundle.trusted
    files = manifest.files
    online_accuracy = _accuracy(bundle.model, x, y, bundle.directory / files.online)
    auxiliary_accuracy = None
    if bundle.auxiliary is not None:
        auxiliary_accuracy = _accuracy(bundle.auxiliary, x, y, bundle.directory / files.auxiliary)
    strategy, stream = manifest.strategy, manifest.stream
    optimizer = torch.optim.SGD(bundle.model.parameters(), lr=stream.lr, momentum=stream.momentum,
                                weight_decay=stream.weight_decay)
    apply_optimizer_state(optimizer, bundle.model, bundle.optimizer_state)  # the worker's learner starts from it
    try:
        guard = build_strategy(strategy.model_copy(update={"name": "guard"}), trusted=(x, y),
                               batch_size=stream.batch_size, seed=seed)
    except ValueError as exc:  # the gate refuses a trusted set it cannot calibrate on (too few samples)
        raise BundleError(bundle.directory / files.trusted, "x", str(exc)) from exc
    threshold = guard.gate.calibrate(bundle.model, optimizer)
    return CheckReport(bundle.directory, manifest, sum(p.numel() for p in bundle.model.parameters()), len(x),
                       online_accuracy, auxiliary_accuracy, threshold, strategy.gate_target_false_flag_rate,
                       strategy.gate_calibration_updates,
                       sum(len(kinds) for kinds in (bundle.optimizer_state or {}).values()))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, file: Path) -> float:
    device = model_device(model)
    logits = logits_in_chunks(model, x, device=device).cpu()
    if not torch.isfinite(logits).all():
        raise BundleError(file, None, "the model's class scores on the trusted set are not all finite")
    return float((logits.argmax(1) == y).float().mean())
