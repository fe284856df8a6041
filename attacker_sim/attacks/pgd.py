"""PGD delusive poisons (Fowl et al.): error-maximising perturbations of correctly labelled data."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from attacker_sim.attacks.base import ErrorMaximizingAttack, Objective


class PGDDelusive(ErrorMaximizingAttack):
    """Maximise CE(f(x'), y) by signed-gradient ascent inside the L-inf ball.

    >>> import torch
    >>> from attacker_sim.attacks import Budget
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    >>> x, y = torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0])
    >>> x_adv = PGDDelusive(Budget(epsilon=0.1, steps=2, step_size=0.05))(net, x, y)
    >>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all())
    True
    >>> bool(torch.nn.functional.cross_entropy(net(x_adv), y) > torch.nn.functional.cross_entropy(net(x), y))
    True
    """

    def _objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Objective:
        def objective(x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(x_adv)
            return F.cross_entropy(logits, y), logits

        return objective
