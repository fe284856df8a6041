"""C&W-inf poisons: the Carlini-Wagner margin loss maximised under an L-inf budget (PGD style)."""

from __future__ import annotations

import math

import torch
from torch import nn

from attacker_sim.attacks.base import ErrorMaximizingAttack, Objective
from service.core.defense.projection import Budget


def cw_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y per row: positive once the sample is misclassified.

    >>> cw_margin(torch.tensor([[2.0, 0.5, 1.0]]), torch.tensor([0])).tolist()
    [-1.0]
    """
    true_logit = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), -math.inf)
    return others.amax(dim=1) - true_logit


class CarliniWagnerInf(ErrorMaximizingAttack):
    """Minimise the C&W loss max(z_y - max_{j != y} z_j, -kappa), batch mean, inside the L-inf ball.

    Equivalently maximise min(margin, kappa): a sample stops pulling once it is misclassified by
    `kappa` (confidence, >= 0), so the budget goes to the samples still classified correctly.

    >>> import torch
    >>> from attacker_sim.attacks import Budget
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> x, y = torch.rand(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    >>> x_adv = CarliniWagnerInf(Budget(epsilon=0.1, steps=3, step_size=0.05), kappa=5.0)(net, x, y)
    >>> bool(cw_margin(net(x_adv), y).mean() > cw_margin(net(x), y).mean())
    True
    """

    def __init__(self, budget: Budget | None = None, *, kappa: float = 0.0, **options):
        """`options`: those of `SignedGradientAttack` (model_mode, random_start, auxiliary, beta)."""
        if not (math.isfinite(kappa) and kappa >= 0):
            raise ValueError(f"kappa (confidence margin) must be a finite number >= 0, got {kappa}")
        super().__init__(budget, **options)
        self.kappa = float(kappa)

    def _objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Objective:
        def objective(x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(x_adv)
            return cw_margin(logits, y).clamp(max=self.kappa).mean(), logits

        return objective
