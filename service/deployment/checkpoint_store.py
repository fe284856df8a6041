"""The worker's checkpoints on disk: written with rotation, read back newest first with fallback, and the
trusted canary beside them.

A checkpoint is a directory `step-<model version>` (safetensors + JSON, `service/core/checkpoint.py`); the
newest `kept` stay. The model version counts the batches applied and the resets (`POST /v1/admin/reset`), so it
only grows, where the batches applied start again from 0 at a reset. On start the newest loadable one wins: an
unreadable one is moved aside as `refused-step-...` (kept for inspection) and the next older one is tried, while
one written for another
configuration (its deployment fingerprint differs), or of another bundle (its bundle fingerprint differs), stops
the worker before anything is loaded or written: resuming it would mix deployments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from service.core.checkpoint import CheckpointError, load_meta
from service.core.config import ExperimentConfig
from service.core.learner import OnlineLearner

log = logging.getLogger("dscguard.worker")

CHECKPOINT_PREFIX = "step-"
REFUSED_PREFIX = "refused-"
CANARY_FILE = "canary.safetensors"


class WorkerError(RuntimeError):
    """The worker cannot (or must not) go on: a checkpoint of another deployment, a lost lease, ..."""


def deployment_fingerprint(config: ExperimentConfig, bundle: str | None = None) -> str:
    """What a checkpoint must match to be resumed: the burn-in (or the served bundle's fingerprint), the stream
    optimizer, the defense."""
    payload = {"burnin": bundle or config.burnin_fingerprint(), "stream": config.stream.model_dump(),
               "strategy": config.strategy.model_dump(), "calibration": config.calibration.model_dump()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def checkpoints(directory: Path) -> list[Path]:
    """Checkpoint directories under `directory`, newest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)),
                  reverse=True)


class CheckpointStore:
    """`bundle`: the fingerprint of the bundle served (`service.core.bundle.bundle_fingerprint`), None for a profile's
    burn-in; every checkpoint records it, and one of another bundle is never resumed."""

    def __init__(self, directory: Path, kept: int, config: ExperimentConfig, bundle: str | None = None):
        self.directory, self.kept = Path(directory), kept
        self.bundle, self.config = bundle, config
        self.fingerprint = deployment_fingerprint(config, bundle)

    def fingerprint_for(self, seed: int | None) -> str:
        """The deployment's fingerprint once reset to `seed`'s starting state (None, or the configured seed: as
        configured)."""
        if seed is None or seed == self.config.seed:
            return self.fingerprint
        return deployment_fingerprint(self.config.model_copy(update={"seed": seed}), self.bundle)

    def write(self, learner: OnlineLearner, extra: dict) -> Path:
        """Save `learner` (with `extra`, the deployment and bundle fingerprints) and drop checkpoints beyond `kept`;
        `extra["seed"]` names the starting state when a reset changed it."""
        path = self.directory / f"{CHECKPOINT_PREFIX}{learner.model_version:012d}"
        learner.save(path, extra_meta={**extra, "deployment": self.fingerprint_for(extra.get("seed")),
                                       "bundle": self.bundle})
        for old in checkpoints(self.directory)[self.kept :]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def oldest_kept_id(self) -> str:
        """The last stream entry the oldest readable checkpoint on disk holds ("0-0" when none says)."""
        for path in reversed(checkpoints(self.directory)):
            try:
                return load_meta(path)["extra"]["last_applied_id"]
            except (CheckpointError, KeyError, TypeError):
                continue
        return "0-0"

    def load_newest(self, device: torch.device) -> OnlineLearner | None:
        """The newest loadable checkpoint of this deployment (None when there is none)."""
        refused: list[Path] = []
        for path in checkpoints(self.directory):
            try:
                extra = load_meta(path).get("extra", {})
            except CheckpointError as exc:
                refused.append(self._refuse(path, exc))
                continue
            self._check_origin(path, extra)  # a WorkerError: raised, never taken for a corrupt checkpoint
            try:
                learner = OnlineLearner.load(path, device=device)
            except (CheckpointError, KeyError, ValueError, RuntimeError) as exc:
                refused.append(self._refuse(path, exc))
                continue
            log.info("resumed from checkpoint %s", path)
            if refused:
                lost = int(refused[0].name.rsplit("-", 1)[-1]) - learner.model_version
                log.error("fell back to checkpoint %s: the %d updates after it that the refused %s held are "
                          "replayed from the stream (kept there until the oldest kept checkpoint holds them)",
                          path.name, lost, refused[0].name)
            return learner
        if refused:
            log.error("no checkpoint could be loaded: starting a new learner from the burn-in; the updates that "
                      "%s held are lost", refused[0].name)
        return None

    def _check_origin(self, path: Path, extra: dict) -> None:
        """A checkpoint of another bundle, or of another configuration, stops the worker (before its tensors are
        read: a different architecture would not even load, and must not be moved aside as corrupt)."""
        found = extra.get("bundle")
        if found != self.bundle:
            def name(fingerprint):
                return f"bundle {fingerprint}" if fingerprint else "a profile's burn-in (no bundle)"

            raise WorkerError(f"checkpoint {path} was written for {name(found)}, but this worker serves "
                              f"{name(self.bundle)}; serve the bundle it was written for, or use an empty "
                              "DSCGUARD_CHECKPOINT_DIR for a new deployment")
        found, expected = extra.get("deployment"), self.fingerprint_for(extra.get("seed"))
        if found != expected:
            raise WorkerError(f"checkpoint {path} was written for another configuration (fingerprint "
                              f"{found}, these settings give {expected}); use an empty "
                              "DSCGUARD_CHECKPOINT_DIR for a new deployment")

    def _refuse(self, path: Path, exc: Exception) -> Path:
        """Move an unloadable checkpoint aside (kept for inspection, out of the rotation) and say why."""
        aside = path.with_name(REFUSED_PREFIX + path.name)
        try:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
        except OSError as move_error:
            log.error("could not move %s aside: %s", path, move_error)
            aside = path
        log.error("refusing checkpoint %s (%s: %s); moved to %s, trying the next older one", path.name,
                  type(exc).__name__, exc, aside.name)
        return path

    def save_canary(self, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        """The trusted canary (uint8 pixels, or a bundle's float inputs; labels), written once when the deployment
        starts."""
        self.directory.mkdir(parents=True, exist_ok=True)
        save_file({"x": inputs.contiguous(), "y": labels}, self.directory / CANARY_FILE)

    def load_canary(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self.directory / CANARY_FILE
        if not path.is_file():
            return None
        tensors = load_file(path)
        x = tensors["x"]
        return (x.float() / 255.0 if x.dtype == torch.uint8 else x), tensors["y"]
