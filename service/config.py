"""One configuration object for an experiment or a deployment: `ExperimentConfig`.

Every section validates at construction, so a negative epsilon or an unknown strategy fails with
a message that names the field, before any data is loaded or any model is trained.

>>> cfg = ExperimentConfig.from_profile("digits", strategy={"name": "dsc"})
>>> cfg.strategy.name, cfg.strategy.epsilon
('dsc', 0.2)
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

StrategyName = Literal["st", "gc", "at", "dsc"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    """Which dataset and how it is split (sample counts; burn-in takes what is left)."""

    dataset: Literal["digits", "mnist", "cifar10", "cifar100", "svhn"] = "digits"
    data_dir: str | None = None
    download: bool = False
    stream: int = Field(500, ge=1)
    attacker_val: int = Field(100, ge=1)
    calibration: int = Field(200, ge=2)
    burnin: int | None = Field(None, ge=1)
    test: int | None = Field(400, ge=1)


class ModelConfig(_Section):
    name: Literal["digitscnn", "smallcnn", "resnet18", "vgg11"] = "digitscnn"
    options: dict[str, Any] = Field(default_factory=dict)


class BurnInConfig(_Section):
    """Training on trusted data before the stream; checkpoints every `checkpoint_every` epochs."""

    epochs: int = Field(30, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(64, ge=1)
    checkpoint_every: int = Field(5, ge=1)
    auxiliary_epoch: int = Field(15, ge=0)

    @model_validator(mode="after")
    def _auxiliary_is_a_checkpoint(self):
        if self.auxiliary_epoch > self.epochs:
            raise ValueError(f"auxiliary_epoch {self.auxiliary_epoch} is after the last epoch {self.epochs}")
        if self.auxiliary_epoch % self.checkpoint_every and self.auxiliary_epoch != self.epochs:
            raise ValueError(
                f"auxiliary_epoch {self.auxiliary_epoch} is not a checkpoint "
                f"(checkpoints are kept every {self.checkpoint_every} epochs)"
            )
        return self


class StreamConfig(_Section):
    """The online phase: one SGD step per incoming batch (fresh optimizer state at the start)."""

    batch_size: int = Field(50, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


class StrategyConfig(_Section):
    """The defense applied before each update: st, gc, at or dsc, with their budgets."""

    name: StrategyName = "dsc"
    clip_value: float = Field(0.01, gt=0, description="gc: gradient-norm bound")
    clip_norm: Literal["inf", "2"] = "inf"
    steps: int = Field(10, ge=1, description="at/dsc: reverse-PGD steps K")
    step_size: float = Field(0.02, gt=0, description="at/dsc: step delta in [0,1] pixel units")
    epsilon: float = Field(0.2, gt=0, le=1, description="at/dsc: L-inf radius around the received sample")
    at_kl_weight: float = Field(1.0, ge=0, description="at: weight of KL(p_nat || p_adv)")
    early_stop: Literal["sample", "batch"] = Field(
        "batch", description="dsc: judge each sample (paper's Algorithm 1) or the batch mean (research code)")
    divergence: Literal["kl", "reverse_kl", "js"] = "kl"
    mu: float | None = Field(None, ge=0, description="dsc: hand-set threshold base (None: calibrated)")
    tau: float | None = Field(None, ge=0, description="dsc: hand-set threshold drift per batch")


class CalibrationConfig(_Section):
    """Thresholds from trusted clean data: mu for a false-flag target, tau from a clean warm-up."""

    target_false_flag_rate: float = Field(0.1, gt=0, lt=1)
    warmup_batches: int = Field(8, ge=0)


class AttackConfig(_Section):
    """The adversary: accumulative poisoning (Pang et al.) or a plain poison generator, and its budget."""

    kind: Literal["accumulative", "pgd", "trades_kl", "cw_inf"] = "accumulative"
    epsilon: float = Field(0.2, gt=0, le=1)
    steps: int = Field(2, ge=1)
    step_size: float = Field(0.2, gt=0)
    trigger_steps: int = Field(2, ge=1)
    trigger_step_size: float = Field(0.2, gt=0)
    gamma: float = Field(1.0, ge=0, description="weight of the clean-gradient term")
    objective: Literal["full", "second_order_only", "clean_only"] = "full"
    model_mode: Literal["eval", "train"] = Field("eval", description="mode of the model while crafting")
    beta: float = Field(0.0, ge=0, description="adaptive attacker: weight of the discrepancy penalty")
    setting: Literal["white_box", "black_box"] = "white_box"
    surrogate_epoch: int = Field(0, ge=0, description="black box: burn-in checkpoint used as surrogate")


class CampaignConfig(_Section):
    """How long the attacker accumulates and when it fires the trigger."""

    max_batches: int = Field(20, ge=1, description="accumulative batches before the trigger at the latest")
    monitor_drop: float = Field(0.05, gt=0, lt=1, description="fire once monitor accuracy fell this much")
    clean_batches: int | None = Field(None, ge=1, description="clean-oracle length (default: max_batches + 1)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])


class ExperimentConfig(_Section):
    """Everything one run needs; `fingerprint()` hashes the parts that decide the burn-in."""

    profile: str = "digits"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    burnin: BurnInConfig = BurnInConfig()
    stream: StreamConfig = StreamConfig()
    strategy: StrategyConfig = StrategyConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    attack: AttackConfig = AttackConfig()
    campaign: CampaignConfig = CampaignConfig()

    @classmethod
    def from_profile(cls, profile: str, **overrides: Any) -> ExperimentConfig:
        """The named profile's settings, with section overrides given as dicts."""
        if profile not in PROFILES:
            raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
        base = json.loads(json.dumps(PROFILES[profile]))
        for key, value in overrides.items():
            if isinstance(value, dict):
                base.setdefault(key, {}).update(value)
            else:
                base[key] = value
        return cls(profile=profile, **base)

    def with_strategy(self, **fields: Any) -> ExperimentConfig:
        return self.model_copy(update={"strategy": self.strategy.model_copy(update=fields)})

    def burnin_fingerprint(self) -> str:
        """Hash of what decides the burn-in result (data split, model, burn-in, seed)."""
        payload = {
            "data": self.data.model_dump(exclude={"data_dir", "download"}),
            "model": self.model.model_dump(),
            "burnin": self.burnin.model_dump(),
            "seed": self.seed,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


PROFILES: dict[str, dict[str, Any]] = {
    "digits": {},
    "mnist": {
        "data": {"dataset": "mnist", "stream": 5000, "attacker_val": 500, "calibration": 1000,
                 "burnin": 10000, "test": 2000},
        "model": {"name": "smallcnn"},
        "burnin": {"epochs": 4, "lr": 0.05, "batch_size": 100, "checkpoint_every": 1, "auxiliary_epoch": 2},
        "stream": {"batch_size": 100, "lr": 0.01, "momentum": 0.9},
    },
    "cifar10-small": {
        "data": {"dataset": "cifar10", "stream": 5000, "attacker_val": 500, "calibration": 1000,
                 "burnin": 10000, "test": 2000},
        "model": {"name": "smallcnn"},
        "burnin": {"epochs": 8, "lr": 0.05, "batch_size": 100, "checkpoint_every": 2, "auxiliary_epoch": 4},
        "stream": {"batch_size": 100, "lr": 0.01, "momentum": 0.9},
    },
    "paper": {
        "data": {"dataset": "cifar10", "stream": 10000, "attacker_val": 500, "calibration": 1000,
                 "burnin": None, "test": None},
        "model": {"name": "resnet18"},
        "burnin": {"epochs": 40, "lr": 0.1, "batch_size": 100, "checkpoint_every": 10, "auxiliary_epoch": 20},
        "stream": {"batch_size": 100, "lr": 0.1, "momentum": 0.9},
    },
}
