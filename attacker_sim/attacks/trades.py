"""The TRADES objective as a poison generator: push the prediction away from the clean one."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from attacker_sim.attacks.base import ErrorMaximizingAttack, Objective

# TRADES' start offset: KL(f(x) || f(x')) has a zero gradient at x' = x, so the first step
# needs to be taken from a point next to x (Zhang et al. use x + 0.001 * N(0, 1)).
START_NOISE = 1e-3


class TradesKL(ErrorMaximizingAttack):
    """Maximise KL(f(x) || f(x')) (batch mean) inside the L-inf ball; labels are not used.

    Without `random_start` it starts at x + 0.001 * N(0, 1), as TRADES does.

    >>> import torch
    >>> from attacker_sim.attacks import Budget
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> x = torch.rand(5, 1, 2, 2)
    >>> x_adv = TradesKL(Budget(epsilon=0.1, steps=3, step_size=0.05))(net, x, torch.zeros(5, dtype=torch.long))
    >>> bool(torch.nn.functional.kl_div(net(x_adv).log_softmax(1), net(x).softmax(1), reduction="batchmean") > 0)
    True
    """

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if self.random_start:
            return super()._start(x)
        return self.budget.project(x + START_NOISE * torch.randn_like(x), x)

    def _objective(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Objective:
        with torch.no_grad():
            p_clean = F.softmax(model(x), dim=1)

        def objective(x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(x_adv)
            # F.kl_div rather than divergence_from_logits: that one clamps at 0, which would zero the
            # gradient of rows whose KL rounds below 0 right next to x, where this attack starts
            return F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="batchmean"), logits

        return objective
