"""The online learner: one defended SGD step per incoming batch.

It owns the online model, its SGD optimizer, the frozen auxiliary checkpoint, the strategy and
the calibration. `step(x, y)` lets the strategy prepare the batch (e.g. DSC corrects samples with a
high Memorization Discrepancy), takes the SGD step, and returns a `StepReport` that the worker
turns into metrics, the campaign into tables and the audit trail into records.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.core.bundle.architecture import build_model_from_spec, input_box
from service.core.checkpoint import load_checkpoint, save_checkpoint, split_prefix
from service.core.config import StrategyConfig
from service.core.defense.calibration import Calibration
from service.core.defense.correction import ReversePGD
from service.core.defense.rolling_auxiliary import PromotionDecision
from service.core.defense.strategies import Strategy, build_strategy
from service.core.defense.update_gate import GateVerdict
from service.core.models.inference import logits_in_chunks
from service.core.randomness import UPDATE, key_seed, seeded_draws

FORMAT_VERSION = 1


@dataclass
class StepReport:
    """What one stream step did. Per-sample arrays are numpy; discrepancy is None when not measured."""

    batch_index: int
    samples: int
    strategy: str
    loss: float
    grad_norm: float
    threshold: float | None = None
    discrepancy_before: np.ndarray | None = None
    discrepancy_after: np.ndarray | None = None
    flagged: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    correction_steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    left_out: np.ndarray | None = None  # per sample: left out of the update before it was taken (guard's label check)
    relabelled: np.ndarray | None = None  # per sample: learned with its trusted lookalikes' label (guard's label check)
    seconds: dict[str, float] = field(default_factory=dict)
    model_version: int = 0
    update_scale: float = 1.0  # share of the batch's gradient applied (the guard's gate may shrink it)
    gate: GateVerdict | None = None  # the update gate's verdict, when it judged this update
    promotion: PromotionDecision | None = None  # DSC's rolling auxiliary: the health gate's decision, if due

    @property
    def flagged_count(self) -> int:
        return int(self.flagged.sum())

    @property
    def left_out_count(self) -> int:
        """Samples left out of the update: by the strategy before it (label check) or by the gate's 'drop'."""
        before = int(self.left_out.sum()) if self.left_out is not None else 0
        return before + (len(self.gate.dropped) if self.gate is not None else 0)

    @property
    def relabelled_count(self) -> int:
        return int(self.relabelled.sum()) if self.relabelled is not None else 0

    @property
    def corrected_count(self) -> int:
        return int((self.correction_steps > 0).sum())

    def summary(self) -> dict:
        """Scalars only: one audit record, one metrics update, one table row."""
        before = self.discrepancy_before
        return {
            "batch_index": self.batch_index, "samples": self.samples, "strategy": self.strategy,
            "flagged": self.flagged_count, "corrected": self.corrected_count, "left_out": self.left_out_count,
            "relabelled": self.relabelled_count,
            "correction_steps": int(self.correction_steps.sum()),
            "discrepancy_mean": float(before.mean()) if before is not None and len(before) else None,
            "discrepancy_max": float(before.max()) if before is not None and len(before) else None,
            "threshold": self.threshold, "loss": self.loss, "grad_norm": self.grad_norm,
            "model_version": self.model_version, "update_scale": self.update_scale, "seconds": dict(self.seconds),
            "promotion": self.promotion.to_dict() if self.promotion is not None else None,
        }


class OnlineLearner:
    """A model that keeps learning from a stream, behind a poisoning defense.

    >>> import copy
    >>> import torch
    >>> from service.core.models import build_model
    >>> from service.core.defense import build_strategy
    >>> spec = {"name": "digitscnn", "num_classes": 10, "input_shape": [1, 8, 8]}
    >>> model = build_model(**spec)
    >>> learner = OnlineLearner(model, copy.deepcopy(model), build_strategy("st"), model_spec=spec)
    >>> report = learner.step(torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    >>> report.batch_index, learner.batches_applied
    (0, 1)
    """

    def __init__(self, model: nn.Module, auxiliary: nn.Module | None, strategy: Strategy, *, model_spec: dict,
                 lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 0.0,
                 device: str | torch.device = "cpu", seed: int = 0):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.device = torch.device(device)
        self.seed = seed  # the n-th update's dropout masks are drawn from (seed, n): see `step`
        self.model = model.to(self.device)
        self.auxiliary = auxiliary.to(self.device).eval().requires_grad_(False) if auxiliary is not None else None
        if strategy.uses_auxiliary and self.auxiliary is None:
            raise ValueError(f"strategy {strategy.name!r} needs an auxiliary checkpoint")
        self.strategy = strategy
        self.model_spec = dict(model_spec)
        box = input_box(self.model_spec)
        if box is not None:  # a bundle's feature bounds (or value range): corrected inputs stay inside them
            for part in vars(strategy).values():
                if isinstance(part, ReversePGD):
                    part.box = box
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        # the fewest samples a batch to learn from may hold: in training BatchNorm has no statistics of one sample,
        # and torch refuses it (found once here, not on every step)
        self.min_batch_samples = 2 if any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                          for m in self.model.modules()) else 1
        self.batches_applied = 0
        self.model_version = 0

    def ready(self) -> OnlineLearner:
        """Take now the work the next update would take first (guard's calibration when one is due: the first,
        with its anchored cap of 256 gradients, or one at the end of an interval), and return the learner: copies
        of it then step exactly as the learner would have."""
        self.strategy.ready(self.model, self.optimizer, self.batches_applied)
        return self

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.model_spec["input_shape"])

    @property
    def num_classes(self) -> int:
        return int(self.model_spec["num_classes"])

    @property
    def calibration(self) -> Calibration | None:
        """DSC's threshold schedule, as its strategy holds it (None for strategies that need none)."""
        return self.strategy.calibration

    def threshold(self) -> float | None:
        """The threshold the next batch will be judged against (None for strategies without one, or not
        calibrated yet)."""
        try:
            return self.strategy.threshold(self.batches_applied)
        except RuntimeError:  # dsc before its calibration
            return None

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepReport:
        """Defend, then learn from one batch: x float in [0,1] shaped [N, *input_shape], y int labels."""
        x, y = self._check_batch(x, y)
        start = time.perf_counter()
        # dropout's masks for this update come from (seed, update number), not from whatever the process drew before:
        # a run repeats beside any other, and a learner restored from its checkpoint draws what the original would have
        with seeded_draws(self.device, key_seed(self.seed, UPDATE, self.batches_applied)):
            prepared = self.strategy.prepare(self.model, self.auxiliary, x, y, self.batches_applied)
            prepared_at = time.perf_counter()
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.strategy.loss(self.model, prepared, x, y)
            loss.backward()
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.detach().norm() for p in self.model.parameters() if p.grad is not None])
            )
            verdict = self.strategy.before_optimizer_step(self.model, self.optimizer)
        self.optimizer.step()
        self.batches_applied += 1
        self.model_version += 1
        loss_value, grad_norm_value = float(loss.detach()), float(grad_norm)
        done = time.perf_counter()
        report = StepReport(
            batch_index=self.batches_applied - 1, samples=len(x), strategy=self.strategy.name, loss=loss_value,
            grad_norm=grad_norm_value, threshold=prepared.threshold,
            seconds={"prepare": prepared_at - start, "update": done - prepared_at, "total": done - start},
        )
        correction = prepared.correction
        if correction is not None:
            report.flagged = correction.flagged.cpu().numpy()
            report.correction_steps = correction.steps_taken.cpu().numpy()
            if correction.discrepancy_before is not None:
                report.discrepancy_before = correction.discrepancy_before.cpu().numpy()
                report.discrepancy_after = correction.discrepancy_after.cpu().numpy()
        else:
            report.flagged = np.zeros(len(x), dtype=bool)
            report.correction_steps = np.zeros(len(x), dtype=np.int64)
        if verdict is not None:
            report.gate, report.update_scale = verdict, verdict.scale
            if correction is None:  # the gate is the strategy's only verdict, on the whole update
                report.flagged = np.full(len(x), verdict.flagged)
                report.threshold = verdict.threshold
        if prepared.labels is not None:  # samples whose label the strategy changed or left out are flagged ones too
            report.left_out = prepared.labels.left_out.cpu().numpy()
            report.relabelled = prepared.labels.relabelled.cpu().numpy()
            report.flagged = report.flagged | report.left_out | report.relabelled
        report.promotion = self.strategy.after_step(self.model, self.auxiliary, self.batches_applied,
                                                    float(report.flagged.mean()))
        report.model_version = self.model_version
        return report

    def predict_proba(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        return logits_in_chunks(self.model, x, batch_size, self.device).softmax(1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels for a batch of images in [0, 1]."""
        return self.predict_proba(x).argmax(1).cpu()

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.predict(x) == y.cpu()).float().mean())

    def _check_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must be shaped [N, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}")
        if len(x) == 0 or len(y) != len(x):
            raise ValueError(f"need a non-empty batch with one label per sample, got {len(x)} inputs, {len(y)} labels")
        if len(x) < self.min_batch_samples:
            raise ValueError(f"this model has BatchNorm layers: a batch to learn from must hold at least "
                             f"{self.min_batch_samples} samples, got {len(x)}")
        return x.to(self.device, torch.float32), y.to(self.device, torch.long)

    # -- persistence -------------------------------------------------------------------------
    def save(self, directory: str | Path, extra_meta: dict | None = None) -> Path:
        """Write the whole state (weights, optimizer, auxiliary, calibration, counters, seed)."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        if self.auxiliary is not None:
            tensors.update({f"auxiliary.{k}": v for k, v in self.auxiliary.state_dict().items()})
        for index, param in enumerate(self.model.parameters()):
            buffer = self.optimizer.state.get(param, {}).get("momentum_buffer")
            if buffer is not None:
                tensors[f"optimizer.{index}.momentum_buffer"] = buffer
        tensors.update({f"strategy.{k}": v for k, v in self.strategy.tensors().items()})
        group = self.optimizer.param_groups[0]
        meta = {
            "format_version": FORMAT_VERSION,
            "model_spec": self.model_spec,
            "strategy": self.strategy.config.model_dump(),
            "optimizer": {k: group[k] for k in ("lr", "momentum", "weight_decay")},
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "strategy_state": self.strategy.state(),
            "batches_applied": self.batches_applied,
            "model_version": self.model_version,
            "seed": self.seed,
            "extra": extra_meta or {},
        }
        return save_checkpoint(directory, tensors, meta)

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> OnlineLearner:
        """Rebuild a learner saved with `save` (a built-in's model, or a bundle's architecture from its spec: a
        factory's package must be importable); the next step is identical to the one it would have taken."""
        tensors, meta = load_checkpoint(directory)
        spec = meta["model_spec"]
        model = build_model_from_spec(spec)
        model.load_state_dict(split_prefix(tensors, "model"))
        aux_state = split_prefix(tensors, "auxiliary")
        auxiliary = None
        if aux_state:
            auxiliary = copy.deepcopy(model)
            auxiliary.load_state_dict(aux_state)
        calibration = Calibration.from_dict(meta["calibration"]) if meta.get("calibration") else None
        strategy_tensors = split_prefix(tensors, "strategy")
        trusted = (strategy_tensors["trusted_x"], strategy_tensors["trusted_y"]) if strategy_tensors else None
        strategy = build_strategy(StrategyConfig(**meta["strategy"]), calibration, trusted=trusted)
        strategy.restore(meta.get("strategy_state", {}), strategy_tensors)
        # a checkpoint from before the seed was saved draws its updates' masks as seed 0's
        learner = cls(model, auxiliary, strategy, model_spec=spec, device=device, seed=int(meta.get("seed", 0)),
                      **meta["optimizer"])
        for index, param in enumerate(learner.model.parameters()):
            buffer = tensors.get(f"optimizer.{index}.momentum_buffer")
            if buffer is not None:
                learner.optimizer.state[param]["momentum_buffer"] = buffer.to(learner.device)
        learner.batches_applied = int(meta["batches_applied"])
        learner.model_version = int(meta["model_version"])
        learner.extra_meta = meta.get("extra", {})
        return learner
