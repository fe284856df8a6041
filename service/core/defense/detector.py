"""The discrepancy detector: DSC's verdict, apart from what is done about it.

`score` is the per-sample Memorization Discrepancy of a batch between the auxiliary and the current model;
`threshold` sets the bar for a false-flag target from clean scores, for the detector's unit (the rolling
auxiliary's promotion recalibrates through it); `predict` judges a batch against a threshold, per sample or on
the batch mean (the research code's rule, where every sample of a batch whose mean is above the threshold is
flagged), and returns the score, the threshold, the verdict and its unit, as drift and outlier detectors do
(alibi-detect's `predict`). The correction (`ReversePGD`), the strategy, the learner's report and the metrics
all read the same verdict.

>>> import torch
>>> detector = DiscrepancyDetector(unit="batch")
>>> detector.flags(torch.tensor([0.1, 0.5]), threshold=0.2).tolist()
[True, True]
>>> DiscrepancyDetector(unit="sample").flags(torch.tensor([0.1, 0.5]), threshold=0.2).tolist()
[False, True]
>>> DiscrepancyDetector(unit="sample").threshold(torch.arange(1.0, 101.0), target_false_flag_rate=0.1, batch_size=10)
91.0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from service.core.defense.calibration import threshold_statistic
from service.core.defense.discrepancy import divergence_from_logits
from service.core.defense.eval_mode import eval_mode

UNITS = ("sample", "batch")


@dataclass(frozen=True)
class Verdict:
    """What the detector decided about one batch; tensors are per sample."""

    score: torch.Tensor
    threshold: float
    flagged: torch.Tensor
    unit: str


class DiscrepancyDetector:
    def __init__(self, divergence: str = "kl", unit: str = "batch"):
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {', '.join(UNITS)}, got {unit!r}")
        self.divergence, self.unit = divergence, unit

    @torch.no_grad()
    def score(self, auxiliary: nn.Module, model: nn.Module, x: torch.Tensor,
              current_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample discrepancy of `x` (both models in eval mode); `current_logits` if already computed."""
        with eval_mode(auxiliary, model):
            current = model(x) if current_logits is None else current_logits.detach()
            return divergence_from_logits(auxiliary(x), current, self.divergence)

    def score_logits(self, auxiliary_logits: torch.Tensor, current_logits: torch.Tensor) -> torch.Tensor:
        """Per-sample discrepancy from logits already computed (the rolling auxiliary keeps its candidates')."""
        return divergence_from_logits(auxiliary_logits, current_logits, self.divergence)

    def threshold(self, clean_scores: torch.Tensor, target_false_flag_rate: float, batch_size: int,
                  seed: int = 0) -> float:
        """The threshold that flags `target_false_flag_rate` of clean data: the conformal quantile of what the
        verdict judges (each score, or the mean of clean batches of `batch_size`)."""
        return threshold_statistic(clean_scores, 1.0 - target_false_flag_rate, self.unit, batch_size, seed)

    def flags(self, score: torch.Tensor, threshold: float) -> torch.Tensor:
        """The verdict per sample: above the threshold, or (batch unit) all of a batch whose mean is."""
        if self.unit == "batch":
            return torch.full_like(score, bool(score.mean() > threshold), dtype=torch.bool)
        return score > threshold

    def predict(self, auxiliary: nn.Module, model: nn.Module, x: torch.Tensor, threshold: float,
                current_logits: torch.Tensor | None = None) -> Verdict:
        score = self.score(auxiliary, model, x, current_logits)
        return Verdict(score, threshold, self.flags(score, threshold), self.unit)
