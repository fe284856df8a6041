"""The discrepancy detector: DSC's verdict, apart from what is done about it.

`score` is the per-sample Memorization Discrepancy of a batch between the auxiliary and the current model;
`predict` judges it against a threshold, per sample or on the batch mean (the research code's rule, where
every sample of a batch whose mean is above the threshold is flagged), and returns the score, the threshold,
the verdict and its unit, as drift and outlier detectors do (alibi-detect's `predict`). The correction
(`ReversePGD`), the strategy, the learner's report and the metrics all read the same verdict.

>>> import torch
>>> detector = DiscrepancyDetector(unit="batch")
>>> detector.flags(torch.tensor([0.1, 0.5]), threshold=0.2).tolist()
[True, True]
>>> DiscrepancyDetector(unit="sample").flags(torch.tensor([0.1, 0.5]), threshold=0.2).tolist()
[False, True]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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

    def flags(self, score: torch.Tensor, threshold: float) -> torch.Tensor:
        """The verdict per sample: above the threshold, or (batch unit) all of a batch whose mean is."""
        if self.unit == "batch":
            return torch.full_like(score, bool(score.mean() > threshold), dtype=torch.bool)
        return score > threshold

    def predict(self, auxiliary: nn.Module, model: nn.Module, x: torch.Tensor, threshold: float,
                current_logits: torch.Tensor | None = None) -> Verdict:
        score = self.score(auxiliary, model, x, current_logits)
        return Verdict(score, threshold, self.flags(score, threshold), self.unit)
