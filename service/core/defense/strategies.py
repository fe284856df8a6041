"""Defense strategies behind one interface: prepare the batch, then take the step.

`st` is the plain SGD step, `gc` clips the gradient norm, `at` corrects every sample with
reverse-PGD and adds KL(p_nat || p_adv) (Tao et al. 2021), `dsc` corrects only the samples whose
Memorization Discrepancy exceeds P = mu + tau * m (Zhu et al. 2023), `guard` judges each update by
what it would do to trusted data and shrinks the ones that would hurt it (`service/core/defense/update_gate.py`).
The learner calls the same methods whatever the strategy, and never branches on its name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from service.core.config import StrategyConfig
from service.core.defense.calibration import Calibration
from service.core.defense.correction import CorrectionResult, ReversePGD
from service.core.defense.detector import DiscrepancyDetector
from service.core.defense.eval_mode import eval_mode
from service.core.defense.label_check import LabelVerdict, NeighbourLabelCheck
from service.core.defense.rolling_auxiliary import REASONS, PromotionDecision, RollingAuxiliary
from service.core.defense.running_statistics import Statistics, snapshot
from service.core.defense.update_gate import GateVerdict, UpdateGate
from service.core.models.trunk import split_mode_invariant
from service.core.strategy_registry import STRATEGY_NAMES

STRATEGIES = STRATEGY_NAMES
Trusted = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class StrategyContext:
    """What the experiment or checkpoint offers a strategy at construction: DSC's calibrated threshold
    schedule, the trusted split and stream batch size guard's gate calibrates on, and the seed."""

    calibration: Calibration | None = None
    trusted: Trusted | None = None
    batch_size: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class PreparedBatch:
    """The batch the model will learn from, with what the strategy decided about each sample."""

    x: torch.Tensor
    correction: CorrectionResult | None = None
    threshold: float | None = None
    features: torch.Tensor | None = None  # mode-invariant trunk output of the received x, with its graph
    labels: LabelVerdict | None = None  # guard's label check: the labels learned, relabelled and left-out samples


class Strategy:
    """Plain SGD (`st`): learn from the batch as received."""

    name = "st"
    uses_auxiliary = False
    needs_calibration = False  # DSC's threshold schedule, from the trusted split (`Experiment.calibration_for`)
    calibration: Calibration | None = None

    def __init__(self, config: StrategyConfig):
        self.config = config

    @classmethod
    def from_context(cls, config: StrategyConfig, context: StrategyContext) -> Strategy:
        """Build the strategy, taking from `context` what it needs (most need nothing)."""
        return cls(config)

    def prepare(self, model: nn.Module, auxiliary: nn.Module | None, x: torch.Tensor, y: torch.Tensor,
                batch_index: int) -> PreparedBatch:
        return PreparedBatch(x)

    def loss(self, model: nn.Module, prepared: PreparedBatch, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(prepared.x), y)

    def ready(self, model: nn.Module, optimizer: torch.optim.Optimizer, applied: int) -> None:
        """Do now what the next update (after `applied` ones) would do first (guard: its gate's calibration when one
        is due, the first included, and its label check's trusted features), so that a learner made ready once can
        be copied for many batches without paying it again."""

    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> GateVerdict | None:
        """Hook between backward and the optimizer step (gradient clipping and the update gate live here)."""
        return None

    def threshold(self, batch_index: int) -> float | None:
        """The threshold the `batch_index`-th batch is judged against (None: the strategy judges nothing)."""
        return None

    def after_step(self, model: nn.Module, auxiliary: nn.Module | None, applied: int,
                   flagged_share: float) -> PromotionDecision | None:
        """Hook after the optimizer step (`applied` batches so far): DSC's rolling auxiliary lives here."""
        return None

    def target_false_flag_rate(self) -> float | None:
        """The share of clean samples the strategy's verdict is calibrated to flag (None: it flags none)."""
        return None

    def state(self) -> dict:
        """What the strategy learned along the stream, as JSON (saved with the learner's checkpoint)."""
        return {}

    def health(self, applied: int) -> dict:
        """What the strategy reports about itself after `applied` batches (status, metrics, the arena), as JSON."""
        return {}

    def restore(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what `state` and `tensors` returned."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the strategy needs to be rebuilt (saved with the checkpoint, given back to `build_strategy`)."""
        return {}


class GradientClipping(Strategy):
    """`gc`: bound the gradient norm (inf-norm at 0.01 in the research code) before each step."""

    name = "gc"

    def before_optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        norm_type = float("inf") if self.config.clip_norm == "inf" else 2.0
        nn.utils.clip_grad_norm_(model.parameters(), self.config.clip_value, norm_type=norm_type)


class AdversarialTraining(Strategy):
    """`at`: reverse-PGD on every sample for all K steps, loss CE(x_adv) + w * KL(p_nat || p_adv)."""

    name = "at"

    def target_false_flag_rate(self) -> float:
        return 1.0  # every sample is corrected, by design

    def __init__(self, config: StrategyConfig):
        super().__init__(config)
        self.correct = ReversePGD(config.steps, config.step_size, config.epsilon, early_stop="none")

    def prepare(self, model, auxiliary, x, y, batch_index):
        result = self.correct(model, x, y)
        return PreparedBatch(result.x, result)

    def loss(self, model, prepared, x, y):
        # one forward for both views, so BatchNorm sees the same batch statistics for each
        logits = model(torch.cat([x, prepared.x]))
        logits_nat, logits_adv = logits[: len(x)], logits[len(x) :]
        kl = F.kl_div(F.log_softmax(logits_adv, dim=1), F.log_softmax(logits_nat, dim=1),
                      reduction="batchmean", log_target=True)
        return F.cross_entropy(logits_adv, y) + self.config.at_kl_weight * kl


class DiscrepancyAwareCorrection(Strategy):
    """`dsc`: correct only samples whose discrepancy exceeds P = mu + tau * m, then learn.

    With `auxiliary="rolling"` the auxiliary follows the online model `auxiliary_window` batches behind,
    promoted from healthy windows only, and mu is recalibrated at each promotion
    (`service/core/defense/rolling_auxiliary.py`); with `"frozen"` (the paper) it is the burn-in checkpoint.
    """

    name = "dsc"
    uses_auxiliary = True
    needs_calibration = True

    def __init__(self, config: StrategyConfig, calibration: Calibration | None = None, trusted: Trusted | None = None,
                 batch_size: int | None = None, seed: int = 0):
        super().__init__(config)
        self.calibration = calibration
        self.detector = DiscrepancyDetector(config.divergence, config.early_stop)
        self.correct = ReversePGD(config.steps, config.step_size, config.epsilon, early_stop=config.early_stop,
                                  divergence=config.divergence)
        self._flagged = False  # the verdict on the batch being learned (prepare -> before_optimizer_step)
        self.trusted = (trusted[0].detach().cpu().float(), trusted[1].detach().cpu().long()) if trusted else None
        self.gate = None
        if config.flag_action == "gate":
            if trusted is None:
                raise ValueError("dsc with flag_action='gate' needs the trusted split (its gate calibrates on it)")
            self.gate = _gate(config, trusted, batch_size, seed)
        self.rolling = None
        if config.auxiliary == "rolling":
            if trusted is None or calibration is None:
                raise ValueError("dsc with auxiliary='rolling' needs the trusted split and the calibration "
                                 "(its promotions are judged and recalibrated on them)")
            self.rolling = RollingAuxiliary(
                *trusted, window=config.auxiliary_window, every=config.auxiliary_every, ring=config.auxiliary_ring,
                target_false_flag_rate=calibration.target_false_flag_rate, max_age=config.auxiliary_max_age,
                canary_drop=config.promotion_canary_drop, z=config.promotion_z, divergence=config.divergence,
                unit=config.early_stop, batch_size=batch_size or len(trusted[0]) // 4, seed=seed)

    @classmethod
    def from_context(cls, config: StrategyConfig, context: StrategyContext) -> Strategy:
        return cls(config, context.calibration, context.trusted, context.batch_size, context.seed)

    def target_false_flag_rate(self) -> float | None:
        return self.calibration.target_false_flag_rate if self.calibration is not None else None

    def threshold(self, batch_index: int) -> float:
        """P for the m-th stream batch (m since the last promotion when rolling); hand-set mu/tau win."""
        recalibrated = self.rolling.mu if self.rolling is not None else None
        mu = self.config.mu if self.config.mu is not None else recalibrated
        mu = mu if mu is not None else getattr(self.calibration, "mu", None)
        tau = self.config.tau if self.config.tau is not None else getattr(self.calibration, "tau", None)
        if mu is None or tau is None:
            raise RuntimeError("dsc has no threshold: calibrate on clean data first or set mu and tau")
        m = self.rolling.batches_since_promotion(batch_index) if self.rolling is not None else batch_index
        return mu + tau * m

    def after_step(self, model, auxiliary, applied, flagged_share):
        if self.rolling is None:
            return None
        return self.rolling.observe(model, auxiliary, applied, flagged_share)

    def state(self) -> dict:
        state = {"rolling": self.rolling.state()} if self.rolling is not None else {}
        return {**state, "gate": self.gate.state()} if self.gate is not None else state

    def health(self, applied: int) -> dict:
        if self.rolling is None:
            return {"auxiliary": "frozen", "auxiliary_age": applied}
        last = self.rolling.decisions[-1].to_dict() if self.rolling.decisions else None
        return {"auxiliary": "rolling", "auxiliary_age": applied - self.rolling.promoted_at,
                "mu": self.rolling.mu, "promotions": {reason: self.rolling.counts.get(reason, 0) for reason in REASONS},
                "last_promotion": last}

    def restore(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        if self.rolling is not None and state.get("rolling"):
            self.rolling.restore(state["rolling"], tensors)
        if self.gate is not None and state.get("gate"):
            self.gate.restore(state["gate"])

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.rolling is None and self.gate is None:
            return {}
        return {"trusted_x": self.trusted[0], "trusted_y": self.trusted[1],
                **(self.rolling.tensors() if self.rolling is not None else {})}

    def prepare(self, model, auxiliary, x, y, batch_index):
        if auxiliary is None:
            raise RuntimeError("dsc needs the frozen auxiliary checkpoint")
        threshold = self.threshold(batch_index)
        split = split_mode_invariant(model)
        features, current = None, None
        if split is not None:
            trunk, head = split
            features = trunk(x)  # kept with its graph: the update reuses it for the samples left alone
            with torch.no_grad(), eval_mode(head):
                current = head(features.detach())
        verdict = self.detector.predict(auxiliary, model, x, threshold, current)
        if self.config.flag_action == "correct":
            result = self.correct(model, x, y, auxiliary=auxiliary, threshold=threshold, discrepancy=verdict.score)
        else:
            result = CorrectionResult(x, verdict.score, verdict.score, verdict.flagged,
                                      torch.zeros_like(verdict.flagged, dtype=torch.long))
        self._flagged = bool(result.flagged.any())
        return PreparedBatch(result.x, result, threshold, features)

    def loss(self, model, prepared, x, y):
        correction = prepared.correction
        head = split_mode_invariant(model)[1] if prepared.features is not None else None
        if self.config.flag_action == "skip":
            keep = ~correction.flagged
            if not keep.any():  # every sample skipped: no gradient from this batch
                return sum(p.sum() for p in model.parameters()) * 0.0
            logits = model(x[keep]) if head is None else head(prepared.features[keep])
            return F.cross_entropy(logits, y[keep])
        if head is None:
            return super().loss(model, prepared, x, y)  # one forward of the batch as corrected
        changed = correction.steps_taken > 0
        logits, labels = head(prepared.features[~changed]), y[~changed]
        if changed.any():
            logits = torch.cat([logits, model(prepared.x[changed])])
            labels = torch.cat([labels, y[changed]])
        return F.cross_entropy(logits, labels)

    def before_optimizer_step(self, model, optimizer):
        if self.gate is None or not self._flagged:
            return None
        return self.gate.judge(model, optimizer)


class TrustedUpdateGuard(Strategy):
    """`guard`: learn from every batch, but judge its update by what it would do to trusted data first.

    The update gate (`UpdateGate`) is calibrated on the trusted split for a false-flag target; a flagged
    update is shrunk until it no longer raises the trusted probe loss beyond the threshold (or dropped,
    `gate_action="skip"`), and every update is capped at the `gate_cap_level` quantile (0.2) of the norms of clean
    trusted updates (`gate_norm_cap`). Honest batches, drifted ones included, are learned at most at the pace of the
    smaller clean batches. Before the update, the label check (`label_check`, `NeighbourLabelCheck`) finds lied-about
    pairs (most recent stream samples that look like trusted class a carry label b) and lied-about classes (nearly all
    of them carry other labels) and learns their samples as a.
    """

    name = "guard"

    def __init__(self, config: StrategyConfig, trusted: Trusted | None = None, batch_size: int | None = None,
                 seed: int = 0):
        super().__init__(config)
        if trusted is None:
            raise ValueError("strategy 'guard' needs the trusted split (trusted=(x, y)) to calibrate its gate")
        self.gate = _gate(config, trusted, batch_size, seed)
        self.label_check = None
        if config.label_check:
            self.label_check = NeighbourLabelCheck(
                *self.gate.trusted, neighbours=config.label_check_neighbours,
                radius_level=config.label_check_radius_level, refresh_every=config.gate_recalibrate_every,
                window=config.label_check_window, share=config.label_check_share,
                class_share=config.label_check_class_share, min_count=config.label_check_min_count)
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._lies: torch.Tensor | None = None
        self._statistics: Statistics | None = None
        self._size: int | None = None

    @classmethod
    def from_context(cls, config: StrategyConfig, context: StrategyContext) -> Strategy:
        return cls(config, context.trusted, context.batch_size, context.seed)

    def ready(self, model, optimizer, applied):
        if self.label_check is not None:
            self.label_check.ready(model, applied)
        if self.gate.due(optimizer):
            self.gate.calibrate(model, optimizer)  # the calibration the next judge would take, on the same draws

    def prepare(self, model, auxiliary, x, y, batch_index):
        if self.label_check is None:
            return PreparedBatch(x)
        self.label_check.ready(model, batch_index)
        return PreparedBatch(x, labels=self.label_check.judge(model, x, y))

    def loss(self, model, prepared, x, y):
        verdict = prepared.labels
        y = y if verdict is None else verdict.labels
        kept = slice(None) if verdict is None else ~verdict.left_out
        self._batch = (prepared.x[kept], y[kept])  # gate_action 'drop' takes the gradient again on what it keeps
        self._size = len(x)  # as received: what gate_size_rule paces (or which rung's threshold judges it)
        self._lies = None if verdict is None else verdict.lies[kept]  # what 'drop_lies' leaves out of a flagged one
        self._statistics = snapshot(model)  # BatchNorm's, before this forward moves them: the gate scales the move
        if verdict is None:
            return super().loss(model, prepared, x, y)
        # the whole batch goes forward (BatchNorm normalises it as received); the left-out samples carry no gradient
        losses = F.cross_entropy(model(prepared.x), y, reduction="none")
        return (losses * kept).sum() / kept.sum().clamp(min=1)

    def before_optimizer_step(self, model, optimizer):
        (batch, lies, statistics, size) = self._batch, self._lies, self._statistics, self._size
        self._batch = self._lies = self._statistics = self._size = None
        return self.gate.judge(model, optimizer, batch=batch, statistics=statistics, lies=lies, size=size)

    def threshold(self, batch_index: int) -> float | None:
        return self.gate.threshold  # None until the first update calibrates it

    def target_false_flag_rate(self) -> float:
        return self.config.gate_target_false_flag_rate

    def state(self) -> dict:
        return {"gate": self.gate.state(), **({"label_check": self.label_check.state()} if self.label_check else {})}

    def health(self, applied: int) -> dict:
        checked = {} if self.label_check is None else {"label_check_radius": self.label_check.radius,
                                                        "label_check_lied_pairs": self.label_check.lied_pairs(),
                                                        "label_check_lied_classes": self.label_check.lied_classes()}
        sized = {"gate_thresholds_by_batch_size": {str(rung): gate.threshold for rung, gate in self.gate.sized.items()}
                 } if self.gate.sized else {}  # gate_size_rule 'pace_rungs', 'rungs': the other sizes' gates
        return {"gate_threshold": self.gate.threshold, "gate_cap": self.gate.cap, "gate_level": self.gate.level,
                "gate_calibrations": self.gate.calibrations, **sized, **checked}

    def restore(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        if state.get("gate"):
            self.gate.restore(state["gate"])
        if self.label_check is not None and state.get("label_check"):
            self.label_check.restore(state["label_check"], tensors)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"trusted_x": self.gate.trusted[0], "trusted_y": self.gate.trusted[1],
                **(self.label_check.tensors() if self.label_check is not None else {})}


def _gate(config: StrategyConfig, trusted: Trusted, batch_size: int | None, seed: int) -> UpdateGate:
    """Guard's update gate on the trusted split (x, y), with the gate_* settings of `config`."""
    x, y = trusted
    return UpdateGate(x.detach().cpu().float(), y.detach().cpu().long(), batch_size=batch_size or len(x) // 4,
                      target_false_flag_rate=config.gate_target_false_flag_rate,
                      calibration_updates=config.gate_calibration_updates,
                      recalibrate_every=config.gate_recalibrate_every, action=config.gate_action,
                      probe_samples=config.gate_probe_samples,
                      norm_cap=None if config.gate_norm_cap == "none" else config.gate_norm_cap,
                      cap_level=config.gate_cap_level, cap_anchor=config.gate_cap_anchor,
                      cap_updates=config.gate_cap_updates, calibration_window=config.gate_calibration_window,
                      probe_winsor=config.gate_probe_winsor, level_rule=config.gate_level_rule,
                      lookahead_from=config.gate_lookahead_from,
                      level_splits=config.gate_level_splits, first_interval=config.gate_first_interval,
                      recalibrate_after_zero=config.gate_recalibrate_after_zero, size_rule=config.gate_size_rule,
                      seed=seed)


_STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Strategy, GradientClipping, AdversarialTraining, DiscrepancyAwareCorrection,
                              TrustedUpdateGuard)}
if tuple(_STRATEGY_CLASSES) != STRATEGY_NAMES:  # the registry and the classes must name the same strategies
    raise ImportError(f"strategy classes {tuple(_STRATEGY_CLASSES)} != registry {STRATEGY_NAMES}")


def strategy_class(name: str) -> type[Strategy]:
    """The class behind a registered strategy name."""
    if name not in _STRATEGY_CLASSES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
    return _STRATEGY_CLASSES[name]


def build_strategy(config: StrategyConfig | str, calibration: Calibration | None = None,
                   trusted: Trusted | None = None, batch_size: int | None = None, seed: int = 0) -> Strategy:
    """The strategy named in `config` (or by a bare name, with default budgets).

    `calibration` is DSC's threshold schedule; `trusted` (x, y) the trusted split the guard's gate
    calibrates on, with the stream's `batch_size`.

    >>> build_strategy("gc").name
    'gc'
    """
    if isinstance(config, str):
        config = StrategyConfig(name=strategy_class(config).name)
    context = StrategyContext(calibration, trusted, batch_size, seed)
    return strategy_class(config.name).from_context(config, context)
