"""What a campaign attacks: a learner in this process, or (later) the running service over HTTP.

Both offer the same four verbs, so one campaign's code measures either: `step` submits one batch
for learning and says what the defense did with it, `predict` labels a batch, `white_box_model`
hands the attacker a copy of the current model, and `close` releases what the target holds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from service.core.learner import OnlineLearner


@dataclass(frozen=True)
class StepOutcome:
    """What the target's defense did with one submitted batch."""

    samples: int
    flagged: int
    corrected: int
    threshold: float | None
    seconds: float
    discrepancy: np.ndarray | None = None  # per sample, when the target exposes it


class Target(Protocol):
    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutcome: ...

    def predict(self, x: torch.Tensor) -> torch.Tensor: ...

    def white_box_model(self) -> nn.Module: ...

    def close(self) -> None: ...


class InProcessTarget:
    """A learner in this process: the fast way to fill tables.

    >>> import torch
    >>> from service.core.defense import build_strategy
    >>> from service.core.models import build_model
    >>> spec = {"name": "digitscnn", "num_classes": 10, "input_shape": [1, 8, 8]}
    >>> target = InProcessTarget(OnlineLearner(build_model(**spec), None, build_strategy("st"), model_spec=spec))
    >>> target.step(torch.rand(5, 1, 8, 8), torch.zeros(5, dtype=torch.long)).samples
    5
    """

    def __init__(self, learner: OnlineLearner):
        self.learner = learner

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutcome:
        report = self.learner.step(x, y)
        return StepOutcome(samples=report.samples, flagged=report.flagged_count, corrected=report.corrected_count,
                           threshold=report.threshold, seconds=report.seconds["total"],
                           discrepancy=report.discrepancy_before)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.learner.predict(x)

    def white_box_model(self) -> nn.Module:
        return copy.deepcopy(self.learner.model).eval()

    def close(self) -> None:
        """Nothing to release in-process."""
